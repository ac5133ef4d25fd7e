//! The cluster daemon (`unipeer cluster daemon`), one per run directory, started by `up` inside
//! the cluster's network namespace. It owns the switch, every QEMU of the cluster (spawned from
//! its main thread, so they die with it) and the host side of all probes: the CLI and the
//! tests talk to it over `<run_dir>/cluster.sock` and never send to the VMs' addresses
//! themselves.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use unipeer_node::launch::{GuestExit, LogLevel, NetConfig, PeerAddr, READY_MARKER};

use super::protocol::{
    ClusterStatus, DaemonInfo, DiagSummary, GuestPlan, GuestReport, LaunchReport, LaunchSettings,
    NodePlan, NodePorts, NodeState, NodeStatus, Request, RttSummary, SOCKET_NAME, VmProbe,
};
use super::state::{self, NodeRecord, StateFile};
use crate::ca::{AuthorityStore, FrontEndIssuer, LaunchMaterial};
use crate::diag::{self, Report};
use crate::net::{
    self, PortInfo, Response, SwitchClient, SwitchConfig, UplinkConfig, UplinkStatus,
};
use crate::owner_only;
use crate::qemu::{NetAttach, RunningVm, VmSpec, mac_string};
use crate::vm::{self, DIAG_TCP_PORT, DIAG_UDP_PORT, ECHO_PORT, OVERLAY_PORT, VmOptions};

/// Most VMs one cluster holds (the switch allows more ports; this bounds QEMU processes).
pub const NODES_MAX: usize = 2048;
/// Longest line a control connection may send.
const LINE_MAX: u64 = 1 << 20;
/// Overlay peers a node is given to join through.
const BOOTSTRAP_PEERS: usize = 8;
/// Validity of a front-end's intermediate and of a VM's certificate.
const INTERMEDIATE_VALID_MS: u64 = 7 * 24 * 3600 * 1000;
const PEER_CERT_VALID_MS: u64 = 24 * 3600 * 1000;
/// How long a node command (an overlay lookup, say) may take.
const NODE_COMMAND_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a relay waits for the node to accept its TCP connection.
const RELAY_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How often booting VMs' serial logs are looked at.
const READY_POLL: Duration = Duration::from_millis(10);
/// How long a host probe of one node waits.
const HOST_PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long `status` waits for all running nodes' diagnostic answers.
const STATUS_PROBE_TIMEOUT: Duration = Duration::from_millis(1500);
/// Most nodes `status` asks in one round.
const PROBE_WINDOW: usize = 48;
/// Most echo round trips one host request may ask for.
const HOST_ECHO_MAX: usize = 100_000;

/// How to run the daemon.
#[derive(Clone, Debug)]
pub struct DaemonConfig {
    pub run_dir: PathBuf,
    /// The namespace it runs in (recorded for `status` and clean-up).
    pub netns: Option<String>,
    /// Whether to open the host uplink (only inside a namespace of our own).
    pub uplink: bool,
    /// Seed of the switch's loss RNG.
    pub seed: u64,
}

/// A VM of the cluster.
struct NodeSlot {
    plan: NodePlan,
    port: PortInfo,
    mac: [u8; 6],
    vm: Option<RunningVm>,
    state: NodeState,
    exit: Option<String>,
    restarts: u32,
    ready_ms: Option<f64>,
}

impl NodeSlot {
    /// Notices a QEMU that exited by itself.
    fn refresh(&mut self) {
        if let Some(vm) = self.vm.as_mut()
            && let Some(status) = vm.try_exit()
        {
            self.exit = Some(describe_exit(status));
            self.state = NodeState::Exited;
            self.vm = None;
        }
    }

    fn pid(&self) -> Option<u32> {
        self.vm.as_ref().and_then(RunningVm::pid)
    }

    fn serial_log(&self, run_dir: &Path) -> PathBuf {
        vms_dir(run_dir).join(format!("{}.serial.log", self.plan.name))
    }
}

fn describe_exit(status: std::process::ExitStatus) -> String {
    if let Some(sig) = status.signal() {
        return format!("killed by signal {sig}");
    }
    match status.code().and_then(GuestExit::from_qemu_status) {
        Some(g) => format!("guest exit: {}", g.describe()),
        None => format!("QEMU exited with {status}"),
    }
}

/// The loopback UDP port a node's QEMU binds for its switch port: fixed per address and below
/// the ephemeral range. A port the switch picks free and QEMU binds only later could be taken
/// meanwhile by a probe's ephemeral socket (seen at 442 VMs: QEMU exited, address in use).
fn vm_port(ip: Ipv4Addr) -> u16 {
    let offset = u32::from(ip).saturating_sub(u32::from(super::SEGMENT_BASE));
    VM_PORT_BASE + (offset.min(u32::from(u16::MAX - VM_PORT_BASE))) as u16
}

/// First loopback UDP port of the VMs' ends (node `nK` binds `VM_PORT_BASE + 10 + K`).
const VM_PORT_BASE: u16 = 20_000;

/// Where the VMs' configs, serial logs and QMP sockets live.
pub fn vms_dir(run_dir: &Path) -> PathBuf {
    run_dir.join("vms")
}

/// Work only the main thread may do: QEMU's parent-death signal follows the spawning thread.
enum MainJob {
    Spawn(Box<VmSpec>, SyncSender<Result<RunningVm, String>>),
    Stop,
}

struct Shared {
    run_dir: PathBuf,
    netns: Option<String>,
    uplink: UplinkStatus,
    main: Mutex<Sender<MainJob>>,
    nodes: Mutex<Vec<NodeSlot>>,
    /// One launch or restart at a time.
    launching: Mutex<()>,
    settings: Mutex<Option<LaunchSettings>>,
    /// VMs killed on request, healed by a restart (the dashboard's fault list).
    kills: Mutex<crate::net::faults::FaultLog>,
    server_delay_us: AtomicU64,
    /// Trust material per node, issued once so a restarted node keeps its identity.
    materials: Mutex<HashMap<String, LaunchMaterial>>,
    /// VM names in the order their launch material was first issued (for
    /// `LaunchSettings::credential_holders`).
    vm_order: Mutex<Vec<String>>,
    /// One front-end issuer per (authority store, server), holding an intermediate.
    issuers: Mutex<HashMap<(PathBuf, String), FrontEndIssuer>>,
    /// This run's key for operator commands on the nodes' diagnostic ports (also in
    /// `operator.key`, mode 0600, in the run directory).
    operator_key: diag::OperatorKey,
    /// Guests that are not nodes (`Request::Guest`), by name.
    guests: Mutex<Vec<(String, RunningVm)>>,
}

/// Most foreign guests one cluster holds.
const GUESTS_MAX: usize = 8;
/// Largest initramfs a guest may bring (the Redis baseline's is ~15 MiB).
const GUEST_INITRD_MAX: u64 = 256 << 20;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Runs the daemon until a `shutdown` request; every VM is stopped before it returns.
pub fn serve(cfg: DaemonConfig) -> Result<(), String> {
    let socket = cfg.run_dir.join(SOCKET_NAME);
    // Everything the daemon and its QEMUs create (serial logs, QMP sockets) is owner-only.
    owner_only::owner_only_umask();
    for dir in [cfg.run_dir.clone(), vms_dir(&cfg.run_dir)] {
        owner_only::create_dir(&dir)
            .map_err(|e| format!("run directory {}: {e}", dir.display()))?;
    }
    if UnixStream::connect(&socket).is_ok() {
        return Err(format!(
            "a cluster daemon already answers at {}",
            socket.display()
        ));
    }
    let mut switch_cfg = SwitchConfig::new(&cfg.run_dir);
    switch_cfg.seed = cfg.seed;
    if !cfg.uplink {
        switch_cfg.uplink = UplinkConfig {
            enabled: false,
            ..UplinkConfig::default()
        };
    }
    let switch = net::start(switch_cfg).map_err(|e| e.to_string())?;
    let listener = owner_only::bind_socket(&socket)
        .map_err(|e| format!("cannot bind {}: {e}", socket.display()))?;
    let operator_key = diag::OperatorKey::generate()
        .map_err(|e| format!("operator key from the OS random source: {e}"))?;
    let key_path = cfg.run_dir.join(diag::OPERATOR_KEY_FILE);
    operator_key
        .write(&key_path)
        .map_err(|e| format!("{}: {e}", key_path.display()))?;
    let (main_tx, main_rx) = mpsc::channel();
    let shared = Arc::new(Shared {
        run_dir: cfg.run_dir.clone(),
        netns: cfg.netns.clone(),
        uplink: switch.uplink().clone(),
        main: Mutex::new(main_tx),
        nodes: Mutex::new(Vec::new()),
        launching: Mutex::new(()),
        settings: Mutex::new(None),
        kills: Mutex::new(Default::default()),
        server_delay_us: AtomicU64::new(0),
        materials: Mutex::new(HashMap::new()),
        vm_order: Mutex::new(Vec::new()),
        issuers: Mutex::new(HashMap::new()),
        operator_key,
        guests: Mutex::new(Vec::new()),
    });
    shared.save_state();
    eprintln!(
        "unipeer cluster daemon {}: run dir {}, netns {}, uplink {:?}",
        std::process::id(),
        cfg.run_dir.display(),
        cfg.netns.as_deref().unwrap_or("(none)"),
        shared.uplink
    );
    let acceptor = shared.clone();
    thread::Builder::new()
        .name("cluster-control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                // The socket is 0600 in a 0700 directory; the uid check holds even if a
                // descriptor or a looser mode ever leaks it.
                if let Err(e) = owner_only::peer_allowed(&conn) {
                    eprintln!("unipeer cluster daemon: refused a control connection: {e}");
                    let text = serde_json::to_string(&Response::failure(e.to_string()))
                        .expect("responses serialise");
                    owner_only::refuse_peer(conn, &text);
                    continue;
                }
                let shared = acceptor.clone();
                let _ = thread::Builder::new()
                    .name("cluster-conn".into())
                    .spawn(move || serve_connection(&shared, conn));
            }
        })
        .map_err(|e| e.to_string())?;
    run_main(main_rx);
    // Stop: every VM, then the switch, then the socket and the state.
    for slot in lock(&shared.nodes).iter_mut() {
        if let Some(mut vm) = slot.vm.take() {
            vm.kill();
        }
    }
    for (_, vm) in lock(&shared.guests).iter_mut() {
        vm.kill();
    }
    switch.stop();
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(state::path(&cfg.run_dir));
    eprintln!("unipeer cluster daemon: stopped");
    Ok(())
}

/// The main thread only spawns QEMUs (so they die with it); all state lives in `Shared`.
fn run_main(jobs: Receiver<MainJob>) {
    for job in jobs.iter() {
        match job {
            MainJob::Spawn(spec, reply) => {
                let _ = reply.send(spec.spawn().map_err(|e| e.to_string()));
            }
            MainJob::Stop => return,
        }
    }
}

fn serve_connection(shared: &Arc<Shared>, conn: UnixStream) {
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    loop {
        let mut line = String::new();
        match (&mut reader).take(LINE_MAX).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if line.trim().is_empty() {
            continue;
        }
        let (response, stop) = match serde_json::from_str::<Request>(&line) {
            Err(e) => (Response::failure(format!("bad request: {e}")), false),
            Ok(Request::Relay { node, port }) => match shared.relay_connect(&node, port) {
                Ok(tcp) => {
                    let mut text = serde_json::to_string(&Response::success(None))
                        .expect("responses serialise");
                    text.push('\n');
                    if out.write_all(text.as_bytes()).is_err() {
                        return;
                    }
                    // The reader may hold bytes the client sent after its request line: it
                    // is the client's side of the pipe, buffered bytes first.
                    super::relay::pipe(reader, out, tcp);
                    return;
                }
                Err(e) => (Response::failure(e), false),
            },
            Ok(Request::Shutdown) => (Response::success(None), true),
            Ok(request) => (
                match shared.handle(request) {
                    Ok(v) => Response::success(Some(v)),
                    Err(e) => Response::failure(e),
                },
                false,
            ),
        };
        let mut text = serde_json::to_string(&response).expect("responses serialise");
        text.push('\n');
        let written = out.write_all(text.as_bytes());
        if stop {
            let _ = lock(&shared.main).send(MainJob::Stop);
            return;
        }
        if written.is_err() {
            return;
        }
    }
}

fn json<T: serde::Serialize>(v: T) -> Result<serde_json::Value, String> {
    serde_json::to_value(v).map_err(|e| e.to_string())
}

impl Shared {
    fn handle(&self, request: Request) -> Result<serde_json::Value, String> {
        match request {
            Request::Hello => json(DaemonInfo {
                pid: std::process::id(),
                run_dir: self.run_dir.clone(),
                netns: self.netns.clone(),
                uplink: self.uplink.clone(),
                nodes: lock(&self.nodes).len(),
            }),
            Request::Launch {
                settings,
                nodes,
                server_delay_us,
            } => json(self.launch(settings, nodes, server_delay_us)?),
            Request::Status { probe } => json(self.status(probe)),
            Request::Kill { node } => {
                let mut nodes = lock(&self.nodes);
                let slot = find(&mut nodes, &node)?;
                slot.refresh();
                if let Some(mut vm) = slot.vm.take() {
                    vm.kill();
                }
                slot.state = NodeState::Down;
                slot.exit = Some("killed on request".into());
                drop(nodes);
                lock(&self.kills).start("kill", &node, String::new());
                self.save_state();
                Ok(serde_json::Value::Null)
            }
            Request::Restart { node } => {
                let report = self.restart(&node)?;
                lock(&self.kills).heal("kill", Some(&node));
                json(report)
            }
            Request::HostProbe { node } => {
                let ip = self.reachable_ip(&node)?;
                // TCP: the whole report (UDP carries a compact one when it does not fit).
                let r = diag::query_tcp(SocketAddr::from((ip, DIAG_TCP_PORT)), HOST_PROBE_TIMEOUT)
                    .map_err(|e| format!("{node} ({ip}): {e}"))?;
                json(r.fields)
            }
            Request::HostEcho { node, count } => {
                let ip = self.reachable_ip(&node)?;
                let count = count.clamp(1, HOST_ECHO_MAX);
                let (mut rtts, _lost) = diag::echo_rtts(
                    SocketAddr::from((ip, ECHO_PORT)),
                    count,
                    64,
                    Duration::from_millis(500),
                )
                .map_err(|e| format!("{node} ({ip}): {e}"))?;
                rtts.sort();
                let us = |d: Duration| d.as_secs_f64() * 1e6;
                json(RttSummary {
                    sent: count,
                    received: rtts.len(),
                    p50_us: us(diag::percentile(&rtts, 50.0)),
                    p99_us: us(diag::percentile(&rtts, 99.0)),
                    max_us: rtts.last().copied().map(us).unwrap_or(0.0),
                })
            }
            Request::VmProbe { from, to, count } => json(self.vm_probe(&from, &to, count)?),
            Request::NodeCommand { node, command } => {
                if command.contains('\n') || command.len() > 4000 {
                    return Err("a node command is one line of at most 4000 bytes".into());
                }
                let ip = self.reachable_ip(&node)?;
                let reply = diag::tcp_command(
                    SocketAddr::from((ip, DIAG_TCP_PORT)),
                    Some(&self.operator_key),
                    &command,
                    NODE_COMMAND_TIMEOUT,
                )
                .map_err(|e| format!("{node} ({ip}): {e}"))?;
                json(reply)
            }
            Request::Flood { node, legit, count } => json(self.flood(&node, legit, count)?),
            Request::Handshakes { node, count } => {
                let ip = self.reachable_ip(&node)?;
                let (server, store) = self.trust_of(&node)?;
                let authority = AuthorityStore::open(&store)
                    .map_err(|e| format!("{e:#}"))?
                    .authority_public();
                let material = self.material("bench-peer", &server, &store)?;
                let target = PeerAddr {
                    ipv4: ip.octets(),
                    port: OVERLAY_PORT,
                };
                json(super::flood::handshakes(
                    target,
                    authority,
                    &material,
                    count.clamp(1, 1000),
                )?)
            }
            Request::Guest { guest } => json(self.guest(guest)?),
            Request::GuestStop { name } => {
                let mut guests = lock(&self.guests);
                let i = guests
                    .iter()
                    .position(|(n, _)| *n == name)
                    .ok_or_else(|| format!("no guest named {name:?}"))?;
                let (_, mut vm) = guests.remove(i);
                drop(guests);
                vm.kill();
                let mut switch = SwitchClient::connect(&self.run_dir).map_err(|e| e.to_string())?;
                switch.remove_port(&name).map_err(|e| e.to_string())?;
                Ok(serde_json::Value::Null)
            }
            Request::Relay { .. } => Err("a relay takes over its connection".into()),
            Request::Shutdown => Ok(serde_json::Value::Null),
        }
    }

    /// Launches a foreign guest on a port of its own, on the nodes' accelerator and machine
    /// type (the same QEMU and network path), and waits for its ready line.
    fn guest(&self, plan: GuestPlan) -> Result<GuestReport, String> {
        let _one = lock(&self.launching);
        let settings = lock(&self.settings)
            .clone()
            .ok_or("launch the nodes first: a guest takes the cluster's launch settings")?;
        {
            let mut nodes = lock(&self.nodes);
            if nodes
                .iter_mut()
                .any(|n| n.plan.name == plan.name || n.plan.ipv4 == plan.ipv4)
            {
                return Err(format!(
                    "guest {} ({}): a node has that name or address",
                    plan.name, plan.ipv4
                ));
            }
        }
        {
            let guests = lock(&self.guests);
            if guests.iter().any(|(n, _)| *n == plan.name) {
                return Err(format!("guest {} runs already", plan.name));
            }
            if guests.len() >= GUESTS_MAX {
                return Err(format!("at most {GUESTS_MAX} guests per cluster"));
            }
        }
        if !(16..=4096).contains(&plan.memory_mib) {
            return Err(format!(
                "guest memory {} MiB is outside 16..=4096",
                plan.memory_mib
            ));
        }
        let size = std::fs::metadata(&plan.initrd)
            .map_err(|e| format!("{}: {e}", plan.initrd.display()))?
            .len();
        if size > GUEST_INITRD_MAX {
            return Err(format!(
                "{}: {size} bytes, more than a guest's {GUEST_INITRD_MAX}",
                plan.initrd.display()
            ));
        }
        let initrd =
            std::fs::read(&plan.initrd).map_err(|e| format!("{}: {e}", plan.initrd.display()))?;
        let mut switch = SwitchClient::connect(&self.run_dir).map_err(|e| e.to_string())?;
        let port = switch
            .add_port_at(&plan.name, Some(&plan.server), Some(vm_port(plan.ipv4)))
            .map_err(|e| format!("guest {}: {e}", plan.name))?;
        let undo = |switch: &mut SwitchClient| {
            let _ = switch.remove_port(&plan.name);
        };
        let Some(netdev) = port.qemu_netdev_arg("net0") else {
            undo(&mut switch);
            return Err("the switch port has no VM end".into());
        };
        let spec = VmSpec {
            name: plan.name.clone(),
            kernel: plan.kernel.clone(),
            config_blob: initrd,
            run_dir: vms_dir(&self.run_dir),
            machine: settings.machine,
            accel: settings.accel,
            cpu: settings.cpu.clone(),
            memory_mib: plan.memory_mib,
            mac: vm::mac_for(&plan.name),
            net: NetAttach::Netdev(netdev.replacen(",id=net0", "", 1)),
            // QEMU's default translation cache, as `bench boot --baseline-linux` gives its
            // Linux guest (a node's small one would thrash on a stock kernel).
            tb_size_mib: None,
            append: Some(plan.append.clone()),
            die_with_parent: true,
            machine_flags: match settings.machine {
                crate::qemu::Machine::Microvm => plan.microvm_flags.clone(),
                crate::qemu::Machine::Q35 => None,
            },
        };
        let mut vm = match self.spawn(spec) {
            Ok(vm) => vm,
            Err(e) => {
                undo(&mut switch);
                return Err(format!("cannot start guest {}: {e}", plan.name));
            }
        };
        let timeout = Duration::from_millis(plan.ready_timeout_ms);
        let outcome = match &plan.fail_line {
            // Watch for either line: a failing guest is reported at once, not at the deadline.
            Some(fail) => {
                let started = Instant::now();
                loop {
                    let serial = vm.serial();
                    if let Some(l) = serial.lines().find(|l| l.contains(fail.as_str())) {
                        break Err(format!("guest {}: {l}", plan.name));
                    }
                    if serial.lines().any(|l| l.contains(plan.ready_line.as_str())) {
                        break Ok(vm.launched_at.elapsed());
                    }
                    if let Some(status) = vm.try_exit() {
                        break Err(format!(
                            "guest {} exited ({}) before its ready line",
                            plan.name,
                            describe_exit(status)
                        ));
                    }
                    if started.elapsed() > timeout {
                        break Err(format!(
                            "guest {} printed no ready line within {timeout:?}",
                            plan.name
                        ));
                    }
                    thread::sleep(READY_POLL);
                }
            }
            None => vm
                .wait_for_line(&plan.ready_line, timeout)
                .map(|(_, at)| at.duration_since(vm.launched_at))
                .map_err(|e| format!("guest {}: {e}", plan.name)),
        };
        match outcome {
            Ok(ready) => {
                let report = GuestReport {
                    name: plan.name.clone(),
                    ready_ms: ready.as_secs_f64() * 1000.0,
                    machine: settings.machine,
                    accel: settings.accel,
                    serial_log: vms_dir(&self.run_dir).join(format!("{}.serial.log", plan.name)),
                };
                lock(&self.guests).push((plan.name, vm));
                Ok(report)
            }
            Err(e) => {
                vm.kill();
                undo(&mut switch);
                Err(e)
            }
        }
    }

    /// A TCP connection from the daemon (inside the namespace) to `port` on `node`.
    fn relay_connect(&self, node: &str, port: u16) -> Result<TcpStream, String> {
        if port == 0 {
            return Err("relay: port 0".into());
        }
        let ip = self.reachable_ip(node)?;
        let addr = SocketAddr::from((ip, port));
        let tcp = TcpStream::connect_timeout(&addr, RELAY_CONNECT_TIMEOUT)
            .map_err(|e| format!("relay to {node} ({addr}): {e}"))?;
        let _ = tcp.set_nodelay(true);
        Ok(tcp)
    }

    fn uplink_ok(&self) -> Result<(), String> {
        match &self.uplink {
            UplinkStatus::Up { .. } => Ok(()),
            UplinkStatus::Off { reason } => Err(format!(
                "the host uplink is off ({reason}): the host cannot reach the VMs"
            )),
        }
    }

    /// The node's IP if the host can talk to it (uplink up, node known).
    fn reachable_ip(&self, node: &str) -> Result<Ipv4Addr, String> {
        let mut nodes = lock(&self.nodes);
        let ip = find(&mut nodes, node)?.plan.ipv4;
        drop(nodes);
        self.uplink_ok()?;
        Ok(ip)
    }

    fn vm_probe(&self, from: &str, to: &str, count: u32) -> Result<VmProbe, String> {
        let (from_ip, to_ip) = {
            let mut nodes = lock(&self.nodes);
            let to_ip = find(&mut nodes, to)?.plan.ipv4;
            let f = find(&mut nodes, from)?;
            f.refresh();
            if f.state != NodeState::Up {
                return Err(format!("{from} is {}; it cannot probe", f.state));
            }
            (f.plan.ipv4, to_ip)
        };
        self.uplink_ok()?;
        if !(1..=1000).contains(&count) {
            return Err(format!("probe count {count} is outside 1..=1000"));
        }
        // The node waits up to 0.5 s per lost answer.
        let timeout = Duration::from_secs(5) + Duration::from_millis(600) * count;
        let reply = diag::tcp_command(
            SocketAddr::from((from_ip, DIAG_TCP_PORT)),
            Some(&self.operator_key),
            &format!("probe {to_ip} {count}"),
            timeout,
        )
        .map_err(|e| format!("{from} ({from_ip}): {e}"))?;
        let line = reply
            .lines()
            .find(|l| l.starts_with("probe"))
            .ok_or_else(|| format!("{from} gave no probe answer: {reply:?}"))?;
        VmProbe::parse(from, to, line)
    }

    /// `bootstrap`: overlay peers the node joins through (empty: it starts the overlay).
    fn spec_for(
        &self,
        plan: &NodePlan,
        port: &PortInfo,
        s: &LaunchSettings,
        bootstrap: &[Ipv4Addr],
    ) -> Result<VmSpec, String> {
        let level = LogLevel::parse(&s.log_level)
            .ok_or_else(|| format!("unknown log level {:?}", s.log_level))?;
        let kernel = match &plan.image {
            Some(name) => {
                crate::image::open(name)
                    .map_err(|e| format!("image {name:?}: {e}"))?
                    .kernel
            }
            None => s.kernel.clone(),
        };
        let memory_mib = plan.memory_mib.unwrap_or(s.memory_mib);
        let mut opts = VmOptions::new(&plan.name, vms_dir(&self.run_dir), s.machine, s.accel);
        opts.server_id = plan.server.clone();
        opts.cpu = s.cpu.clone();
        opts.memory_mib = memory_mib;
        opts.log_level = level;
        opts.operator_key = Some(self.operator_key.clone());
        if let Some(l) = s.leaf_set {
            opts.extra.push(("leaf_set".to_string(), vec![l]));
        }
        if let Some(k) = s.replicas {
            opts.extra.push(("replicas".to_string(), vec![k]));
        }
        if !s.overlay {
            opts.extra.push(("overlay".to_string(), vec![0]));
        }
        let mac = vm::mac_for(&plan.name);
        let mut config = vm::launch_config(
            &opts,
            NetConfig {
                mac,
                ipv4: plan.ipv4.octets(),
                prefix_len: s.prefix_len,
                gateway: s.gateway.map(|g| g.octets()),
                overlay_port: OVERLAY_PORT,
                diag_udp_port: DIAG_UDP_PORT,
                diag_tcp_port: DIAG_TCP_PORT,
                echo_port: ECHO_PORT,
            },
        );
        config.bootstrap = bootstrap
            .iter()
            .filter(|ip| **ip != plan.ipv4)
            .take(BOOTSTRAP_PEERS)
            .map(|ip| PeerAddr {
                ipv4: ip.octets(),
                port: OVERLAY_PORT,
            })
            .collect();
        if let Some(store) = plan.ca_store.as_ref().or(s.ca_store.as_ref()) {
            let holds = {
                let mut order = lock(&self.vm_order);
                let index = match order.iter().position(|n| *n == plan.name) {
                    Some(i) => i,
                    None => {
                        order.push(plan.name.clone());
                        order.len() - 1
                    }
                };
                s.credential_holders.is_none_or(|n| index < n)
            };
            let m = self.material_for(&plan.name, &plan.server, store, holds)?;
            config.node_key = m.node_key;
            config.certificate = m.certificate;
            config.extra.extend(m.extra);
        }
        let blob = config.encode().map_err(|e| e.to_string())?;
        let netdev = port
            .qemu_netdev_arg("net0")
            .ok_or("the switch port has no VM end")?;
        let backend = netdev.replacen(",id=net0", "", 1);
        Ok(VmSpec {
            name: plan.name.clone(),
            kernel,
            config_blob: blob,
            run_dir: vms_dir(&self.run_dir),
            machine: s.machine,
            accel: s.accel,
            cpu: s.cpu.clone(),
            memory_mib,
            mac,
            net: NetAttach::Netdev(backend),
            tb_size_mib: Some(s.tb_size_mib),
            append: None,
            die_with_parent: true,
            machine_flags: None,
        })
    }

    /// A node's server and the authority store that certified it.
    fn trust_of(&self, node: &str) -> Result<(String, PathBuf), String> {
        let mut nodes = lock(&self.nodes);
        let slot = find(&mut nodes, node)?;
        let settings = lock(&self.settings).clone();
        let store = slot
            .plan
            .ca_store
            .clone()
            .or(settings.and_then(|s| s.ca_store))
            .ok_or("the cluster runs without authentication")?;
        Ok((slot.plan.server.clone(), store))
    }

    fn flood(
        &self,
        node: &str,
        legit: u64,
        count: u64,
    ) -> Result<super::flood::FloodReport, String> {
        let ip = self.reachable_ip(node)?;
        let (server, store) = self.trust_of(node)?;
        if !(1..=1000).contains(&legit) || !(1..=1_000_000).contains(&count) {
            return Err("flood: legit must be 1..=1000 and count 1..=1000000".into());
        }
        let authority = AuthorityStore::open(&store)
            .map_err(|e| format!("{e:#}"))?
            .authority_public();
        let material = self.material("flood-legit", &server, &store)?;
        let foreign_store = super::ensure_authority(&self.run_dir.join("flood-foreign-authority"))
            .map_err(|e| e.to_string())?;
        let foreign_authority = AuthorityStore::open(&foreign_store)
            .map_err(|e| format!("{e:#}"))?
            .authority_public();
        let foreign = self.material("flood-foreign", &server, &foreign_store)?;
        let mut report = super::flood::flood(
            PeerAddr {
                ipv4: ip.octets(),
                port: OVERLAY_PORT,
            },
            authority,
            &material,
            (&foreign, foreign_authority),
            legit,
            count,
        )?;
        if let UplinkStatus::Up { ifname, .. } = &self.uplink {
            report.slots = Some(super::flood::slot_flood(ip, ifname, &self.operator_key)?);
        }
        Ok(report)
    }

    /// The node's key and certificate chain: issued on first use by its server's front-end
    /// (an intermediate from the authority, limited to that server), then kept.
    fn material(&self, node: &str, server: &str, store: &Path) -> Result<LaunchMaterial, String> {
        self.material_for(node, server, store, true)
    }

    /// [`Self::material`], holding the registered users' credentials only if
    /// `with_credentials` (a VM without them obtains them by credential delegation). Issued
    /// once per node: a restarted VM keeps what it had.
    fn material_for(
        &self,
        node: &str,
        server: &str,
        store: &Path,
        with_credentials: bool,
    ) -> Result<LaunchMaterial, String> {
        if let Some(m) = lock(&self.materials).get(node) {
            return Ok(m.clone());
        }
        let err = |e: anyhow::Error| format!("certifying {node}: {e:#}");
        let mut authority = AuthorityStore::open(store).map_err(err)?;
        let mut issuers = lock(&self.issuers);
        let key = (store.to_path_buf(), server.to_string());
        if !issuers.contains_key(&key) {
            let (_, key_path, chain_path) = authority
                .add_intermediate(server, INTERMEDIATE_VALID_MS)
                .map_err(err)?;
            let issuer = FrontEndIssuer::load(&key_path, &chain_path).map_err(err)?;
            issuers.insert(key.clone(), issuer);
        }
        let issuer = issuers.get_mut(&key).expect("inserted above");
        let m = issue_material(&authority, issuer, server, with_credentials).map_err(err)?;
        lock(&self.materials).insert(node.to_string(), m.clone());
        Ok(m)
    }

    fn spawn(&self, spec: VmSpec) -> Result<RunningVm, String> {
        let (tx, rx) = mpsc::sync_channel(1);
        lock(&self.main)
            .send(MainJob::Spawn(Box::new(spec), tx))
            .map_err(|_| "the daemon is stopping".to_string())?;
        rx.recv_timeout(Duration::from_secs(30))
            .map_err(|_| "QEMU spawn did not answer".to_string())?
    }

    fn launch(
        &self,
        settings: LaunchSettings,
        plans: Vec<NodePlan>,
        server_delay_us: u64,
    ) -> Result<LaunchReport, String> {
        let _one = lock(&self.launching);
        {
            let nodes = lock(&self.nodes);
            if nodes.len() + plans.len() > NODES_MAX {
                return Err(format!(
                    "{} more node(s) would exceed the cluster's {NODES_MAX}",
                    plans.len()
                ));
            }
            for (i, p) in plans.iter().enumerate() {
                if nodes
                    .iter()
                    .any(|n| n.plan.name == p.name || n.plan.ipv4 == p.ipv4)
                    || plans[..i]
                        .iter()
                        .any(|q| q.name == p.name || q.ipv4 == p.ipv4)
                {
                    return Err(format!("node {} ({}) exists already", p.name, p.ipv4));
                }
            }
        }
        let mut switch = SwitchClient::connect(&self.run_dir).map_err(|e| e.to_string())?;
        let mut added: Vec<(NodePlan, PortInfo, VmSpec)> = Vec::new();
        let undo_ports = |switch: &mut SwitchClient, added: &[(NodePlan, PortInfo, VmSpec)]| {
            for (p, _, _) in added {
                let _ = switch.remove_port(&p.name);
            }
        };
        // Nodes join through nodes already running, then through earlier ones of this batch;
        // the very first node of a cluster starts the overlay.
        let mut known: Vec<Ipv4Addr> = lock(&self.nodes).iter().map(|n| n.plan.ipv4).collect();
        for plan in &plans {
            let bootstrap = known.clone();
            known.push(plan.ipv4);
            let made = switch
                .add_port_at(&plan.name, Some(&plan.server), Some(vm_port(plan.ipv4)))
                .map_err(|e| e.to_string())
                .and_then(|port| {
                    let spec = self.spec_for(plan, &port, &settings, &bootstrap);
                    if spec.is_err() {
                        let _ = switch.remove_port(&plan.name);
                    }
                    Ok((port, spec?))
                });
            match made {
                Ok((port, spec)) => added.push((plan.clone(), port, spec)),
                Err(e) => {
                    undo_ports(&mut switch, &added);
                    return Err(format!("cannot add {}: {e}", plan.name));
                }
            }
        }
        if let Err(e) = switch.request(&net::Request::ServerDelay {
            delay_us: server_delay_us,
        }) {
            undo_ports(&mut switch, &added);
            return Err(e.to_string());
        }
        self.server_delay_us
            .store(server_delay_us, Ordering::Relaxed);
        *lock(&self.settings) = Some(settings.clone());

        // Spawn all, then wait for all: boots overlap.
        let started = Instant::now();
        let mut spawned: Vec<(String, RunningVm)> = Vec::new();
        let mut failure = None;
        for (plan, _, spec) in &added {
            match self.spawn(spec.clone()) {
                Ok(vm) => spawned.push((plan.name.clone(), vm)),
                Err(e) => {
                    failure = Some(format!("cannot start {}: {e}", plan.name));
                    break;
                }
            }
        }
        let ready = match failure {
            Some(e) => Err(e),
            None => wait_ready(
                &mut spawned,
                Duration::from_millis(settings.ready_timeout_ms),
            ),
        };
        match ready {
            Err(e) => {
                for (_, vm) in spawned.iter_mut() {
                    vm.kill();
                }
                undo_ports(&mut switch, &added);
                Err(e)
            }
            Ok(times) => {
                let all_ready_ms = started.elapsed().as_secs_f64() * 1000.0;
                let mut nodes = lock(&self.nodes);
                for ((plan, port, spec), ((_, vm), ms)) in
                    added.into_iter().zip(spawned.into_iter().zip(&times))
                {
                    nodes.push(NodeSlot {
                        plan,
                        port,
                        mac: spec.mac,
                        vm: Some(vm),
                        state: NodeState::Up,
                        exit: None,
                        restarts: 0,
                        ready_ms: Some(*ms),
                    });
                }
                drop(nodes);
                self.save_state();
                Ok(LaunchReport {
                    ready_ms: plans
                        .iter()
                        .map(|p| p.name.clone())
                        .zip(times.iter().copied())
                        .collect(),
                    all_ready_ms,
                })
            }
        }
    }

    fn restart(&self, node: &str) -> Result<LaunchReport, String> {
        let _one = lock(&self.launching);
        let settings = lock(&self.settings)
            .clone()
            .ok_or("the cluster has no launch settings yet")?;
        let spec = {
            let mut nodes = lock(&self.nodes);
            // A restarted node rejoins through every other node (the first node included).
            let others: Vec<Ipv4Addr> = nodes
                .iter()
                .filter(|n| n.plan.name != node)
                .map(|n| n.plan.ipv4)
                .collect();
            let slot = find(&mut nodes, node)?;
            if let Some(mut vm) = slot.vm.take() {
                vm.kill();
            }
            slot.state = NodeState::Booting;
            slot.exit = None;
            self.spec_for(&slot.plan, &slot.port, &settings, &others)?
        };
        let started = Instant::now();
        let outcome = self.spawn(spec).and_then(|vm| {
            let mut one = vec![(node.to_string(), vm)];
            let times = wait_ready(&mut one, Duration::from_millis(settings.ready_timeout_ms))?;
            Ok((one.pop().expect("one VM").1, times[0]))
        });
        let mut nodes = lock(&self.nodes);
        let slot = find(&mut nodes, node)?;
        slot.restarts += 1;
        let result = match outcome {
            Ok((vm, ms)) => {
                slot.vm = Some(vm);
                slot.state = NodeState::Up;
                slot.ready_ms = Some(ms);
                Ok(LaunchReport {
                    ready_ms: vec![(node.to_string(), ms)],
                    all_ready_ms: started.elapsed().as_secs_f64() * 1000.0,
                })
            }
            Err(e) => {
                slot.state = NodeState::Exited;
                slot.exit = Some(format!("restart failed: {e}"));
                Err(format!("{node} did not come back: {e}"))
            }
        };
        drop(nodes);
        self.save_state();
        result
    }

    fn status(&self, probe: bool) -> ClusterStatus {
        let mut switch = SwitchClient::connect(&self.run_dir);
        let mut faults = switch
            .as_mut()
            .ok()
            .and_then(|c| c.faults().ok())
            .unwrap_or_default();
        faults.extend(lock(&self.kills).events());
        faults.sort_by_key(|f| f.started_ms);
        let links: HashMap<String, bool> = switch
            .and_then(|mut c| c.stats())
            .map(|s| {
                s.ports
                    .into_iter()
                    .map(|p| (p.info.name, p.link_up))
                    .collect()
            })
            .unwrap_or_default();
        let settings = lock(&self.settings).clone();
        let mut nodes: Vec<NodeStatus> = lock(&self.nodes)
            .iter_mut()
            .map(|slot| {
                slot.refresh();
                NodeStatus {
                    name: slot.plan.name.clone(),
                    state: slot.state,
                    server: slot.plan.server.clone(),
                    ipv4: slot.plan.ipv4,
                    mac: mac_string(slot.mac),
                    ports: NodePorts {
                        overlay: OVERLAY_PORT,
                        diag_udp: DIAG_UDP_PORT,
                        diag_tcp: DIAG_TCP_PORT,
                        echo: ECHO_PORT,
                    },
                    switch_port: slot.port.clone(),
                    link_up: links.get(&slot.plan.name).copied().unwrap_or(false),
                    qemu_pid: slot.pid(),
                    exit: slot.exit.clone(),
                    restarts: slot.restarts,
                    serial_log: slot.serial_log(&self.run_dir),
                    ready_ms: slot.ready_ms,
                    answering: None,
                    diag: None,
                    image: slot
                        .plan
                        .image
                        .clone()
                        .or_else(|| settings.as_ref().map(|s| s.image.clone()))
                        .unwrap_or_default(),
                    memory_mib: slot
                        .plan
                        .memory_mib
                        .or(settings.as_ref().map(|s| s.memory_mib))
                        .unwrap_or(0),
                }
            })
            .collect();
        if probe && self.uplink_ok().is_ok() {
            let targets: Vec<Ipv4Addr> = nodes
                .iter()
                .filter(|n| n.state == NodeState::Up)
                .map(|n| n.ipv4)
                .collect();
            let answers = probe_all(&targets, STATUS_PROBE_TIMEOUT);
            for n in nodes.iter_mut().filter(|n| n.state == NodeState::Up) {
                let report = answers.get(&n.ipv4);
                n.answering = Some(report.is_some());
                n.diag = report.map(|r| DiagSummary {
                    uptime_ms: r.num("uptime_us") / 1000,
                    rx_frames: r.num("rx_frames"),
                    tx_frames: r.num("tx_frames"),
                    heap_in_use: r.num("heap_in_use"),
                    overlay_id: r.get("overlay_id").unwrap_or("").to_string(),
                    overlay_joined: r.get("overlay_joined") == Some("true"),
                    leaf_set: r.num("leaf_set"),
                    table_filled: r.num("table_filled"),
                    heap_size: r.num("heap_size"),
                    jobs_slots: r.num("jobs_slots"),
                    jobs_running: r.num("jobs_running"),
                    jobs_supervising: r.num("jobs_supervising"),
                    jobs_works_run: r.num("jobs_works_run"),
                    repl: r
                        .fields
                        .iter()
                        .filter(|(k, _)| k.starts_with("repl"))
                        .take(32)
                        .map(|(k, v)| (k.clone(), v.clone()))
                        .collect(),
                });
            }
        }
        ClusterStatus {
            run_dir: self.run_dir.clone(),
            daemon_pid: std::process::id(),
            netns: self.netns.clone(),
            uplink: self.uplink.clone(),
            settings,
            server_delay_us: self.server_delay_us.load(Ordering::Relaxed),
            nodes,
            faults,
        }
    }

    fn save_state(&self) {
        let nodes = lock(&self.nodes)
            .iter()
            .map(|s| NodeRecord {
                name: s.plan.name.clone(),
                qemu_pid: s.pid(),
                serial_log: s.serial_log(&self.run_dir),
            })
            .collect();
        let st = StateFile {
            daemon_pid: std::process::id(),
            netns: self.netns.clone(),
            nodes,
        };
        if let Err(e) = state::save(&self.run_dir, &st) {
            eprintln!("unipeer cluster daemon: cannot save state: {e}");
        }
    }
}

/// A fresh VM identity on `server`, certified by `issuer`, with its launch material. A
/// credential holder gets the keys of the users registered when it launched that the signed
/// list lets it serve ([`users_to_hold`]; users added later reach it only by credential
/// delegation); the other VMs get none and obtain them from their neighbours.
pub fn issue_material(
    authority: &AuthorityStore,
    issuer: &mut FrontEndIssuer,
    server: &str,
    with_credentials: bool,
) -> anyhow::Result<LaunchMaterial> {
    let issued = issuer.issue_peer(crate::ca::store::now_unix_ms(), PEER_CERT_VALID_MS)?;
    let users: Vec<String> = if with_credentials {
        users_to_hold(&authority.user_list()?, issued.node_id, server)
    } else {
        Vec::new()
    };
    let users: Vec<&str> = users.iter().map(String::as_str).collect();
    crate::ca::launch_material_issued(authority, &issued, &users)
}

/// The users whose pre-shared keys a VM (`node` on `server`) is launched with: those the
/// authority's signed list lets it serve, no others (a VM's blob never carries a key it could
/// not use; a user it may serve but lacks still reaches it by credential delegation).
pub fn users_to_hold(
    list: &unipeer_node::auth::UserList,
    node: unipeer_node::NodeId,
    server: &str,
) -> Vec<String> {
    list.body
        .users
        .iter()
        .filter(|u| list.allows(&u.name, node, server))
        .map(|u| u.name.clone())
        .collect()
}

fn find<'a>(nodes: &'a mut [NodeSlot], name: &str) -> Result<&'a mut NodeSlot, String> {
    if let Some(i) = nodes.iter().position(|n| n.plan.name == name) {
        return Ok(&mut nodes[i]);
    }
    let mut known: Vec<&str> = nodes.iter().map(|n| n.plan.name.as_str()).take(8).collect();
    if nodes.len() > 8 {
        known.push("...");
    }
    Err(format!(
        "unknown node {name:?} (nodes: {})",
        if known.is_empty() {
            "none".to_string()
        } else {
            known.join(", ")
        }
    ))
}

/// Waits until every VM printed its ready line; answers each VM's spawn→ready milliseconds.
fn wait_ready(vms: &mut [(String, RunningVm)], timeout: Duration) -> Result<Vec<f64>, String> {
    let start = Instant::now();
    let mut times: Vec<Option<f64>> = vec![None; vms.len()];
    while start.elapsed() < timeout {
        let mut pending = 0;
        for (i, (name, vm)) in vms.iter_mut().enumerate() {
            if times[i].is_some() {
                continue;
            }
            let serial = owner_only::read_file(&vm.serial_path).unwrap_or_default();
            if contains(&serial, READY_MARKER.as_bytes()) {
                times[i] = Some(vm.launched_at.elapsed().as_secs_f64() * 1000.0);
                // QEMU read its blob long before the guest got this far.
                if let Err(e) = vm.remove_config() {
                    eprintln!(
                        "unipeer cluster daemon: {name}: cannot remove its launch config: {e}"
                    );
                }
                if let Err(e) = vm.restrict_qmp() {
                    eprintln!(
                        "unipeer cluster daemon: {name}: cannot restrict its QMP socket: {e}"
                    );
                }
                continue;
            }
            if let Some(status) = vm.try_exit() {
                return Err(format!(
                    "{name} exited while booting ({})\nQEMU command: {}\nserial log:\n{}",
                    describe_exit(status),
                    vm.command_line,
                    tail(&vm.serial(), 15)
                ));
            }
            pending += 1;
        }
        if pending == 0 {
            return Ok(times.into_iter().map(|t| t.unwrap_or(0.0)).collect());
        }
        thread::sleep(READY_POLL);
    }
    let (name, vm) = vms
        .iter()
        .zip(&times)
        .find(|(_, t)| t.is_none())
        .map(|(v, _)| v)
        .expect("a VM is still pending");
    Err(format!(
        "{} of {} VMs not ready within {:.0} s (first: {name})\nQEMU command: {}\nserial log:\n{}",
        times.iter().filter(|t| t.is_none()).count(),
        vms.len(),
        timeout.as_secs_f64(),
        vm.command_line,
        tail(&vm.serial(), 15)
    ))
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Asks every target's diagnostic UDP port, re-asking the silent ones every 100 ms, until all
/// answered or `timeout` (stretched by 15 ms per target). A round asks at most
/// [`PROBE_WINDOW`] nodes: hundreds of first-time requests at once mean hundreds of ARP
/// broadcasts flooded to every VM, and answers were lost.
fn probe_all(targets: &[Ipv4Addr], timeout: Duration) -> HashMap<Ipv4Addr, Report> {
    let mut answers = HashMap::new();
    let Ok(socket) = UdpSocket::bind("0.0.0.0:0") else {
        return answers;
    };
    let _ = socket.set_read_timeout(Some(Duration::from_millis(10)));
    let timeout = timeout + Duration::from_millis(15) * targets.len() as u32;
    let start = Instant::now();
    let mut last_round: Option<Instant> = None;
    let mut buf = vec![0u8; 65_536];
    while answers.len() < targets.len() && start.elapsed() < timeout {
        if last_round.is_none_or(|t| t.elapsed() >= Duration::from_millis(100)) {
            for ip in targets
                .iter()
                .filter(|ip| !answers.contains_key(*ip))
                .take(PROBE_WINDOW)
            {
                let _ = socket.send_to(b"stats\n", SocketAddr::from((*ip, DIAG_UDP_PORT)));
            }
            last_round = Some(Instant::now());
        }
        // Drain what arrived (bounded by the window and the deadline).
        for _ in 0..=PROBE_WINDOW {
            match socket.recv_from(&mut buf) {
                Ok((n, SocketAddr::V4(from))) if from.port() == DIAG_UDP_PORT => {
                    if let Ok(r) = Report::parse(&String::from_utf8_lossy(&buf[..n])) {
                        answers.insert(*from.ip(), r);
                    }
                }
                Ok(_) => {}
                Err(_) => break,
            }
        }
    }
    answers
}

#[cfg(test)]
mod tests {
    use super::*;
    use unipeer_node::auth::UserCredential;
    use unipeer_node::auth::users::Allowance;

    /// A VM's launch config carries the keys of exactly the users the signed list lets it
    /// serve: every-peer users, users of its server, users pinned to its node id; not users of
    /// another server or another peer (before: every registered user's key).
    #[test]
    fn a_vms_launch_material_holds_only_users_it_may_serve() {
        let root =
            std::env::temp_dir().join(format!("unipeer-daemon-users-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let mut store = AuthorityStore::init(&root).unwrap();
        let (_, key_path, chain_path) =
            store.add_intermediate("s1", INTERMEDIATE_VALID_MS).unwrap();
        let mut issuer = FrontEndIssuer::load(&key_path, &chain_path).unwrap();
        // A peer id that is not the VM's.
        let other = issuer
            .issue_peer(crate::ca::store::now_unix_ms(), PEER_CERT_VALID_MS)
            .unwrap();
        store.add_user("anyone", vec![Allowance::AnyPeer]).unwrap();
        store
            .add_user("on-s1", vec![Allowance::Server("s1".into())])
            .unwrap();
        store
            .add_user("on-s2", vec![Allowance::Server("s2".into())])
            .unwrap();
        store
            .add_user("other-peer", vec![Allowance::Peer(other.node_id)])
            .unwrap();

        let m = issue_material(&store, &mut issuer, "s1", true).unwrap();
        let creds = m
            .extra
            .iter()
            .find(|(k, _)| k == unipeer_node::auth::EXTRA_CREDENTIALS)
            .map(|(_, v)| postcard::from_bytes::<Vec<UserCredential>>(v).unwrap())
            .expect("a credentials entry");
        let mut names: Vec<&str> = creds.iter().map(|c| c.user.as_str()).collect();
        names.sort();
        assert_eq!(names, ["anyone", "on-s1"]);
        assert_eq!(
            creds.iter().find(|c| c.user == "on-s1").unwrap().psk,
            store.user_psk("on-s1").unwrap()
        );

        // The pure rule, with a node pinned by id.
        let list = store.user_list().unwrap();
        let mut pinned = users_to_hold(&list, other.node_id, "s2");
        pinned.sort();
        assert_eq!(pinned, ["anyone", "on-s2", "other-peer"]);

        // A non-holder gets none.
        let m = issue_material(&store, &mut issuer, "s1", false).unwrap();
        let creds = m
            .extra
            .iter()
            .find(|(k, _)| k == unipeer_node::auth::EXTRA_CREDENTIALS)
            .map(|(_, v)| postcard::from_bytes::<Vec<UserCredential>>(v).unwrap())
            .unwrap();
        assert!(creds.is_empty());
        std::fs::remove_dir_all(&root).unwrap();
    }
}
