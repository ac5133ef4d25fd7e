//! One VM reachable from the host through QEMU user networking: the launch config, forwarded
//! ports, and waiting for the ready line. `unipeer vm run`, the boot tests and `unipeer bench
//! boot` all start VMs through here (and so through the one launcher in `qemu`).

use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use unipeer_node::diag_command::OPERATOR_KEY_EXTRA;
use unipeer_node::launch::{
    LaunchConfig, LogLevel, NetConfig, READY_MARKER, SEED_FROM_OS, SEED_SOURCE_EXTRA,
};

use crate::diag::OperatorKey;
use crate::hostinfo::{self, Accel};
use crate::image::Image;
use crate::qemu::{Forward, LaunchError, Machine, NetAttach, RunningVm, VmSpec};

/// Guest-side ports every node uses.
pub const OVERLAY_PORT: u16 = 7000;
pub const DIAG_UDP_PORT: u16 = 7001;
pub const DIAG_TCP_PORT: u16 = 7002;
pub const ECHO_PORT: u16 = 7007;

/// Default guest RAM: the node's target budget.
pub const DEFAULT_MEMORY_MIB: u32 = 16;

/// Options for one VM.
#[derive(Clone, Debug)]
pub struct VmOptions {
    pub name: String,
    pub server_id: String,
    pub machine: Machine,
    pub accel: Accel,
    pub cpu: Option<String>,
    pub memory_mib: u32,
    pub log_level: LogLevel,
    /// The guest exits with success right after printing its ready line (boot tests).
    pub exit_after_ready: bool,
    pub run_dir: PathBuf,
    pub die_with_parent: bool,
    /// Extra named settings for the guest (`LaunchConfig::extra`).
    pub extra: Vec<(String, Vec<u8>)>,
    /// Authenticates operator commands on the node's diagnostic port (none: the node refuses
    /// them). A fresh one per VM unless the caller sets the cluster's.
    pub operator_key: Option<OperatorKey>,
}

impl VmOptions {
    pub fn new(name: &str, run_dir: PathBuf, machine: Machine, accel: Accel) -> Self {
        VmOptions {
            name: name.to_string(),
            server_id: "local".to_string(),
            machine,
            accel,
            cpu: None,
            memory_mib: DEFAULT_MEMORY_MIB,
            log_level: LogLevel::Info,
            exit_after_ready: false,
            run_dir,
            die_with_parent: true,
            extra: Vec::new(),
            operator_key: OperatorKey::generate().ok(),
        }
    }
}

/// Host ports forwarded to the VM's services.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct HostPorts {
    pub diag_udp: u16,
    pub diag_tcp: u16,
    pub echo: u16,
    pub overlay: u16,
}

impl HostPorts {
    pub fn diag_udp_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.diag_udp))
    }
    pub fn diag_tcp_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.diag_tcp))
    }
    pub fn echo_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.echo))
    }
    pub fn overlay_addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.overlay))
    }
}

/// A free port on 127.0.0.1 for both UDP and TCP (the kernel picks it; a race with another
/// process binding it in between is possible but rare).
pub fn free_port() -> std::io::Result<u16> {
    for _ in 0..32 {
        let udp = UdpSocket::bind("127.0.0.1:0")?;
        let port = udp.local_addr()?.port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Err(std::io::Error::other("no free port pair found"))
}

/// A locally administered unicast MAC derived from the node name.
pub fn mac_for(name: &str) -> [u8; 6] {
    let h = Sha256::digest(name.as_bytes());
    [0x52, 0x54, 0x00, h[0], h[1], h[2]]
}

/// A per-launch seed from the host OS's random source. `Err` only if the OS source fails;
/// nothing derived from names, times or process ids stands in for it.
pub fn launch_seed() -> std::io::Result<[u8; 32]> {
    let mut seed = [0u8; 32];
    getrandom::fill(&mut seed).map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok(seed)
}

/// Milliseconds since the Unix epoch.
pub fn unix_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The launch config for a VM behind QEMU user networking (10.0.2.15, gateway 10.0.2.2).
pub fn user_net_config(opts: &VmOptions) -> LaunchConfig {
    launch_config(
        opts,
        NetConfig {
            mac: mac_for(&opts.name),
            ipv4: [10, 0, 2, 15],
            prefix_len: 24,
            gateway: Some([10, 0, 2, 2]),
            overlay_port: OVERLAY_PORT,
            diag_udp_port: DIAG_UDP_PORT,
            diag_tcp_port: DIAG_TCP_PORT,
            echo_port: ECHO_PORT,
        },
    )
}

/// The launch config for a VM with the given network settings (user networking above, the
/// cluster switch in `cluster`).
pub fn launch_config(opts: &VmOptions, net: NetConfig) -> LaunchConfig {
    let mut extra = opts.extra.clone();
    if opts.exit_after_ready {
        extra.push(("exit_after_ready".to_string(), vec![1]));
    }
    if let Some(k) = &opts.operator_key {
        extra.push((OPERATOR_KEY_EXTRA.to_string(), k.bytes().to_vec()));
    }
    // The seed is marked as the OS's only when it is; a node with trust material refuses to
    // start on an unmarked one (the all-zero seed below never reaches a trusted node).
    let rng_seed = match launch_seed() {
        Ok(seed) => {
            extra.push((SEED_SOURCE_EXTRA.to_string(), SEED_FROM_OS.to_vec()));
            seed
        }
        Err(e) => {
            log::error!("no seed from the OS random source ({e}): the node runs without trust");
            [0; 32]
        }
    };
    LaunchConfig {
        node_name: opts.name.clone(),
        server_id: opts.server_id.clone(),
        net,
        bootstrap: Vec::new(),
        rng_seed,
        launch_unix_ms: unix_ms(),
        tsc_khz_hint: hostinfo::tsc_khz_hint(),
        log_level: opts.log_level,
        node_key: Vec::new(),
        certificate: Vec::new(),
        extra,
    }
}

/// How long to wait for a guest to become ready, scaled to the accelerator and by
/// `UNIPEER_TIMEOUT_SCALE` (a factor) for slow machines.
pub fn ready_timeout(accel: Accel) -> Duration {
    let base = match accel {
        Accel::Tcg => Duration::from_secs(30),
        // Hardware KVM boots faster; software-nested KVM (forced) is far slower.
        Accel::Kvm if hostinfo::kvm_unusable_reason().is_none() => Duration::from_secs(15),
        Accel::Kvm => Duration::from_secs(600),
    };
    base.mul_f64(timeout_scale())
}

/// The user's timeout factor (`UNIPEER_TIMEOUT_SCALE`, default 1).
pub fn timeout_scale() -> f64 {
    std::env::var("UNIPEER_TIMEOUT_SCALE")
        .ok()
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|f| *f > 0.0)
        .unwrap_or(1.0)
}

/// A single VM that has printed its ready line.
pub struct ReadyVm {
    pub vm: RunningVm,
    pub ports: HostPorts,
    pub config: LaunchConfig,
    pub ready_line: String,
    /// Host time from QEMU's spawn to the ready line appearing in the serial log.
    pub launch_to_ready: Duration,
}

impl ReadyVm {
    /// The operator key the VM was launched with.
    pub fn operator_key(&self) -> Option<OperatorKey> {
        self.config
            .extra(OPERATOR_KEY_EXTRA)
            .and_then(OperatorKey::from_bytes)
    }

    /// The guest's entry→ready time as it printed it.
    pub fn guest_entry_to_ready_us(&self) -> Option<u64> {
        self.ready_line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("entry_to_ready_us="))
            .and_then(|v| v.parse().ok())
    }
}

/// Builds the spec for one user-networked VM with forwarded diagnostic ports.
pub fn user_net_spec(
    image: &Image,
    opts: &VmOptions,
) -> Result<(VmSpec, HostPorts, LaunchConfig), LaunchError> {
    let config = user_net_config(opts);
    let blob = config
        .encode()
        .map_err(|e| LaunchError::Io(std::io::Error::other(e.to_string())))?;
    let ports = HostPorts {
        diag_udp: free_port()?,
        diag_tcp: free_port()?,
        echo: free_port()?,
        overlay: free_port()?,
    };
    let forwards = vec![
        Forward {
            udp: true,
            host_port: ports.diag_udp,
            guest_port: DIAG_UDP_PORT,
        },
        Forward {
            udp: false,
            host_port: ports.diag_tcp,
            guest_port: DIAG_TCP_PORT,
        },
        Forward {
            udp: true,
            host_port: ports.echo,
            guest_port: ECHO_PORT,
        },
        Forward {
            udp: true,
            host_port: ports.overlay,
            guest_port: OVERLAY_PORT,
        },
    ];
    let spec = VmSpec {
        name: opts.name.clone(),
        kernel: image.kernel.clone(),
        config_blob: blob,
        run_dir: opts.run_dir.clone(),
        machine: opts.machine,
        accel: opts.accel,
        cpu: opts.cpu.clone(),
        memory_mib: opts.memory_mib,
        mac: config.net.mac,
        net: NetAttach::User { forwards },
        tb_size_mib: Some(32),
        append: None,
        die_with_parent: opts.die_with_parent,
        machine_flags: None,
    };
    Ok((spec, ports, config))
}

/// Starts one VM and waits for its ready line.
pub fn launch_ready(image: &Image, opts: &VmOptions) -> Result<ReadyVm, LaunchError> {
    let (spec, ports, config) = user_net_spec(image, opts)?;
    let mut vm = spec.spawn()?;
    let (ready_line, seen_at) = vm.wait_for_line(READY_MARKER, ready_timeout(opts.accel))?;
    // QEMU read the blob (it holds the node's key) before the guest ran: it goes now.
    let _ = vm.remove_config();
    let launch_to_ready = seen_at.duration_since(vm.launched_at);
    Ok(ReadyVm {
        vm,
        ports,
        config,
        ready_line,
        launch_to_ready,
    })
}

/// Remembers the guest's PIT-calibrated TSC rate so later launches pass it as a hint.
pub fn learn_tsc(report: &crate::diag::Report) {
    if report.get("clock") == Some("PitCalibrated") {
        hostinfo::remember_tsc_khz(report.num("tsc_khz"));
    }
}

/// Waits (bounded) until the UDP diagnostic port answers; returns the report.
pub fn wait_for_diag(
    ports: &HostPorts,
    timeout: Duration,
) -> Result<crate::diag::Report, crate::diag::ProbeError> {
    let r = crate::diag::query_udp(ports.diag_udp_addr(), timeout);
    if let Ok(rep) = &r {
        learn_tsc(rep);
    }
    r
}
