//! The cluster daemon's control protocol: line-delimited JSON on `<run_dir>/cluster.sock`, one
//! request per line, one [`Response`] (the switch's shape) per line, in order.

use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::net::{PortInfo, Response, UplinkStatus};

/// File name of the daemon's control socket inside the run directory.
pub const SOCKET_NAME: &str = "cluster.sock";
/// Longest request or response line.
const LINE_MAX: u64 = 8 << 20;
/// How long an ordinary request may take.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// One VM to launch: the CLI decides names, servers and addresses; the daemon launches.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePlan {
    pub name: String,
    pub server: String,
    pub ipv4: Ipv4Addr,
    /// Certify this node under another authority store than the cluster's (tests of a rogue
    /// node); `None`: the cluster's.
    #[serde(default)]
    pub ca_store: Option<PathBuf>,
    /// Launch this node from another image under `images/` than the cluster's (a front-end
    /// deploying the image a job asked for); `None`: the settings' kernel.
    #[serde(default)]
    pub image: Option<String>,
    /// Guest RAM of this node in MiB; `None`: the settings' `memory_mib`.
    #[serde(default)]
    pub memory_mib: Option<u32>,
}

fn yes() -> bool {
    true
}

/// How every VM of the cluster is launched.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LaunchSettings {
    pub kernel: PathBuf,
    pub image: String,
    pub machine: crate::qemu::Machine,
    pub accel: crate::hostinfo::Accel,
    pub cpu: Option<String>,
    pub memory_mib: u32,
    /// TCG translation cache per VM (bounds host memory).
    pub tb_size_mib: u32,
    /// Guest log level (`off` .. `trace`).
    pub log_level: String,
    pub prefix_len: u8,
    /// The host uplink's address, the VMs' gateway (none without an uplink).
    pub gateway: Option<Ipv4Addr>,
    /// How long a VM may take to print its ready line.
    pub ready_timeout_ms: u64,
    /// Overlay leaf-set size for every node (`None`: the node's default).
    #[serde(default)]
    pub leaf_set: Option<u8>,
    /// Copies of every record and chunk (the root's included) for every node (`None`: 3).
    #[serde(default)]
    pub replicas: Option<u8>,
    /// The trusted authority's store: each server's front-end gets an intermediate from it
    /// and certifies its VMs; `None`: no authentication (nodes talk in the clear).
    #[serde(default)]
    pub ca_store: Option<PathBuf>,
    /// Run the overlay in the nodes (off: VMs with only their diagnostic services, for
    /// density measurements).
    #[serde(default = "yes")]
    pub overlay: bool,
    /// Which VMs hold the registered users' credentials: `None`, every VM; `Some(n)`, only
    /// the first `n` launched (the others obtain them by credential delegation).
    #[serde(default)]
    pub credential_holders: Option<usize>,
}

/// A daemon request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Answers a [`DaemonInfo`].
    Hello,
    /// Fixes the launch settings (first call) and launches VMs in parallel; answers a
    /// [`LaunchReport`] once all are ready, or an error (the new VMs then stopped again).
    Launch {
        settings: LaunchSettings,
        nodes: Vec<NodePlan>,
        /// One-way delay between servers (applied with the servers).
        server_delay_us: u64,
    },
    /// Answers a [`ClusterStatus`]; `probe` asks every running node's diagnostic port.
    Status { probe: bool },
    /// Kills a node's QEMU (SIGKILL); its state becomes `down`.
    Kill { node: String },
    /// Kills the node's QEMU if running and launches it again on the same switch port.
    Restart { node: String },
    /// The host asks a node's diagnostic UDP port; answers its report fields.
    HostProbe { node: String },
    /// UDP echo round trips from the host to a node; answers an [`RttSummary`].
    HostEcho { node: String, count: usize },
    /// Node `from` runs `probe <ip of to> <count>`; answers a [`VmProbe`].
    VmProbe {
        from: String,
        to: String,
        count: u32,
    },
    /// Sends one line to a node's diagnostic TCP port (e.g. `lookup KEY`); answers the
    /// node's reply text.
    NodeCommand { node: String, command: String },
    /// Hostile traffic at a node's overlay port after `legit` authentic datagrams (tests of
    /// the trust layer); answers a [`super::flood::FloodReport`].
    Flood {
        node: String,
        legit: u64,
        count: u64,
    },
    /// Times `count` fresh handshakes of a certified peer with a node; answers milliseconds.
    Handshakes { node: String, count: u32 },
    /// Connects (inside the daemon's namespace) to `port` on the node's address over TCP
    /// (5 s connect timeout); answers an OK line, after which the control connection is a raw
    /// byte pipe to that TCP connection in both directions until either side closes.
    Relay { node: String, port: u16 },
    /// Launches a guest that is not a node (the Linux + Redis baseline of `bench apps`) on a
    /// switch port of its own, with the nodes' accelerator and machine type, and waits for its
    /// ready line; answers a [`GuestReport`]. The guest is stopped by `GuestStop` or `Shutdown`.
    Guest { guest: GuestPlan },
    /// Kills a guest started by `Guest` and removes its switch port.
    GuestStop { name: String },
    /// Stops every VM and the switch; the daemon exits after answering.
    Shutdown,
}

/// A foreign guest on the cluster's switch: its own kernel and initramfs (files the daemon
/// reads), an address in the segment outside the nodes' range, a server like a node's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct GuestPlan {
    pub name: String,
    pub server: String,
    pub ipv4: Ipv4Addr,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub append: String,
    pub memory_mib: u32,
    /// `-M` flags when the cluster runs on microvm (`None`: the nodes' pinned ones).
    pub microvm_flags: Option<String>,
    /// A serial line containing this means the guest is ready.
    pub ready_line: String,
    /// A serial line containing this means the guest failed (reported at once).
    pub fail_line: Option<String>,
    pub ready_timeout_ms: u64,
}

/// A guest that printed its ready line.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct GuestReport {
    pub name: String,
    /// QEMU spawn to the ready line, milliseconds.
    pub ready_ms: f64,
    pub machine: crate::qemu::Machine,
    pub accel: crate::hostinfo::Accel,
    pub serial_log: PathBuf,
}

/// Who answers on the socket.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DaemonInfo {
    pub pid: u32,
    pub run_dir: PathBuf,
    pub netns: Option<String>,
    pub uplink: UplinkStatus,
    pub nodes: usize,
}

/// The result of a launch.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LaunchReport {
    /// Per node: QEMU spawn to ready line, milliseconds.
    pub ready_ms: Vec<(String, f64)>,
    /// First spawn to last ready line, milliseconds.
    pub all_ready_ms: f64,
}

/// Where a node is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    /// QEMU started, ready line not yet seen.
    Booting,
    /// QEMU running.
    Up,
    /// Stopped on request (`vm kill`).
    Down,
    /// QEMU exited on its own or was killed from outside.
    Exited,
}

impl fmt::Display for NodeState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NodeState::Booting => "booting",
            NodeState::Up => "up",
            NodeState::Down => "down",
            NodeState::Exited => "exited",
        })
    }
}

/// Guest-side ports of a node (on its own IP).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodePorts {
    pub overlay: u16,
    pub diag_udp: u16,
    pub diag_tcp: u16,
    pub echo: u16,
}

/// A few figures from a node's diagnostic report.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiagSummary {
    pub uptime_ms: u64,
    pub rx_frames: u64,
    pub tx_frames: u64,
    pub heap_in_use: u64,
    /// The node's overlay id (32 hex digits).
    #[serde(default)]
    pub overlay_id: String,
    #[serde(default)]
    pub overlay_joined: bool,
    /// Leaf-set members known.
    #[serde(default)]
    pub leaf_set: u64,
    /// Routing-table entries filled.
    #[serde(default)]
    pub table_filled: u64,
    /// The heap's size, bytes.
    #[serde(default)]
    pub heap_size: u64,
    /// Task slots, tasks running, tasks supervised, task slices run (the job service).
    #[serde(default)]
    pub jobs_slots: u64,
    #[serde(default)]
    pub jobs_running: u64,
    #[serde(default)]
    pub jobs_supervising: u64,
    #[serde(default)]
    pub jobs_works_run: u64,
    /// The replication service's report fields (`repl*`), as the node wrote them.
    #[serde(default)]
    pub repl: std::collections::BTreeMap<String, String>,
}

/// One node in a [`ClusterStatus`].
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct NodeStatus {
    pub name: String,
    pub state: NodeState,
    pub server: String,
    pub ipv4: Ipv4Addr,
    pub mac: String,
    pub ports: NodePorts,
    /// The switch port the VM's NIC is attached to.
    pub switch_port: PortInfo,
    /// Whether the switch has this node's link up (`net cut` takes it down).
    pub link_up: bool,
    pub qemu_pid: Option<u32>,
    /// How QEMU exited (state `exited`).
    pub exit: Option<String>,
    pub restarts: u32,
    pub serial_log: PathBuf,
    /// QEMU spawn to ready line, milliseconds (last launch).
    pub ready_ms: Option<f64>,
    /// `Some(true)` when the node answered its diagnostic port (status with probing).
    pub answering: Option<bool>,
    pub diag: Option<DiagSummary>,
    /// The image the node runs (its own, else the cluster's).
    #[serde(default)]
    pub image: String,
    /// Guest RAM in MiB.
    #[serde(default)]
    pub memory_mib: u32,
}

/// The whole cluster as the daemon sees it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ClusterStatus {
    pub run_dir: PathBuf,
    pub daemon_pid: u32,
    pub netns: Option<String>,
    pub uplink: UplinkStatus,
    pub settings: Option<LaunchSettings>,
    pub server_delay_us: u64,
    pub nodes: Vec<NodeStatus>,
    /// Faults injected: the switch's (network) and the daemon's (kills), oldest first.
    #[serde(default)]
    pub faults: Vec<crate::net::faults::FaultEvent>,
}

impl ClusterStatus {
    pub fn node(&self, name: &str) -> Option<&NodeStatus> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

/// Round trips measured from the host.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RttSummary {
    pub sent: usize,
    pub received: usize,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

/// A node's answer to `probe <ip> [count]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VmProbe {
    pub from: String,
    pub to: String,
    pub ip: Ipv4Addr,
    /// The peer's name as its diagnostic port gave it; `None` with `error`.
    pub name: Option<String>,
    pub sent: u32,
    pub received: u32,
    pub rtt_us_p50: u64,
    pub rtt_us_p99: u64,
    pub rtt_us_max: u64,
    /// Why the probe failed (e.g. `timeout`: the peer did not answer at all).
    pub error: Option<String>,
}

impl VmProbe {
    /// Parses the node's one-line answer:
    /// `probe ip=A name=N sent=S received=R rtt_us_p50=X rtt_us_p99=Y rtt_us_max=Z` or
    /// `probe ip=A error=REASON`.
    pub fn parse(from: &str, to: &str, line: &str) -> Result<VmProbe, String> {
        let line = line.trim();
        let mut words = line.split_ascii_whitespace();
        if words.next() != Some("probe") {
            return Err(format!("not a probe answer: {line:?}"));
        }
        let mut p = VmProbe {
            from: from.into(),
            to: to.into(),
            ip: Ipv4Addr::UNSPECIFIED,
            name: None,
            sent: 0,
            received: 0,
            rtt_us_p50: 0,
            rtt_us_p99: 0,
            rtt_us_max: 0,
            error: None,
        };
        let mut have_ip = false;
        for w in words {
            let Some((k, v)) = w.split_once('=') else {
                continue;
            };
            let num = || v.parse::<u64>().map_err(|_| format!("bad {k} in {line:?}"));
            match k {
                "ip" => {
                    p.ip = v.parse().map_err(|_| format!("bad ip in {line:?}"))?;
                    have_ip = true;
                }
                "name" => p.name = Some(v.to_string()),
                "sent" => p.sent = num()? as u32,
                "received" => p.received = num()? as u32,
                "rtt_us_p50" => p.rtt_us_p50 = num()?,
                "rtt_us_p99" => p.rtt_us_p99 = num()?,
                "rtt_us_max" => p.rtt_us_max = num()?,
                "error" => p.error = Some(v.to_string()),
                _ => {}
            }
        }
        if !have_ip && p.error.is_none() {
            return Err(format!("probe answer without ip: {line:?}"));
        }
        Ok(p)
    }

    /// Whether the peer answered its name and at least one echo.
    pub fn reached(&self) -> bool {
        self.error.is_none() && self.name.is_some() && self.received > 0
    }
}

/// Why a cluster command failed.
#[derive(Debug)]
pub enum ClusterError {
    /// No cluster daemon answers in this run directory.
    NotRunning(PathBuf),
    /// A cluster is already running there; it was left alone.
    AlreadyRunning { run_dir: PathBuf, nodes: usize },
    /// The request was refused; nothing changed. The message says why.
    Rejected(String),
    /// Bad arguments, caught before anything was touched.
    BadInput(String),
    /// Setting the cluster up failed (namespace, daemon, VMs); what was started is stopped.
    Setup(String),
    /// The control connection broke or timed out.
    Io(io::Error),
}

impl fmt::Display for ClusterError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClusterError::NotRunning(d) => write!(
                f,
                "no cluster is running in {} (start one with: unipeer up -n 4)",
                d.display()
            ),
            ClusterError::AlreadyRunning { run_dir, nodes } => write!(
                f,
                "a cluster of {nodes} node(s) is already running in {}; it was left untouched \
                 (stop it with `unipeer down`, or pick another --run-dir)",
                run_dir.display()
            ),
            ClusterError::Rejected(m) | ClusterError::BadInput(m) | ClusterError::Setup(m) => {
                f.write_str(m)
            }
            ClusterError::Io(e) => write!(f, "cluster daemon connection failed: {e}"),
        }
    }
}

impl std::error::Error for ClusterError {}

impl From<crate::net::ControlError> for ClusterError {
    fn from(e: crate::net::ControlError) -> Self {
        match e {
            crate::net::ControlError::Rejected(m) => ClusterError::Rejected(m),
            crate::net::ControlError::Io(e) => ClusterError::Io(e),
            other => ClusterError::Setup(other.to_string()),
        }
    }
}

/// A connection to a running cluster daemon.
pub struct ClusterClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    run_dir: PathBuf,
}

impl ClusterClient {
    pub fn connect(run_dir: &Path) -> Result<Self, ClusterError> {
        let stream = UnixStream::connect(run_dir.join(SOCKET_NAME))
            .map_err(|_| ClusterError::NotRunning(run_dir.to_path_buf()))?;
        let writer = stream.try_clone().map_err(ClusterError::Io)?;
        Ok(ClusterClient {
            reader: BufReader::new(stream),
            writer,
            run_dir: run_dir.to_path_buf(),
        })
    }

    /// Sends a request and waits up to `timeout` for its answer.
    pub fn call_within<T: DeserializeOwned>(
        &mut self,
        request: &Request,
        timeout: Duration,
    ) -> Result<T, ClusterError> {
        self.writer
            .set_read_timeout(Some(timeout))
            .map_err(ClusterError::Io)?;
        let mut line = serde_json::to_string(request).expect("requests serialise");
        line.push('\n');
        self.writer
            .write_all(line.as_bytes())
            .map_err(ClusterError::Io)?;
        let mut answer = String::new();
        let n = (&mut self.reader)
            .take(LINE_MAX)
            .read_line(&mut answer)
            .map_err(ClusterError::Io)?;
        if n == 0 {
            return Err(ClusterError::NotRunning(self.run_dir.clone()));
        }
        let r: Response = serde_json::from_str(&answer)
            .map_err(|e| ClusterError::Setup(format!("bad daemon answer: {e}")))?;
        if !r.ok {
            return Err(ClusterError::Rejected(
                r.error.unwrap_or_else(|| "refused".into()),
            ));
        }
        serde_json::from_value(r.result.unwrap_or(serde_json::Value::Null))
            .map_err(|e| ClusterError::Setup(format!("bad daemon answer: {e}")))
    }

    pub fn call<T: DeserializeOwned>(&mut self, request: &Request) -> Result<T, ClusterError> {
        self.call_within(request, CALL_TIMEOUT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probe_answers_parse() {
        let p = VmProbe::parse(
            "n1",
            "n2",
            "probe ip=10.77.0.12 name=n2 sent=10 received=9 rtt_us_p50=120 rtt_us_p99=300 rtt_us_max=310\n",
        )
        .unwrap();
        assert_eq!(p.ip, Ipv4Addr::new(10, 77, 0, 12));
        assert_eq!(p.name.as_deref(), Some("n2"));
        assert_eq!(
            (p.sent, p.received, p.rtt_us_p50, p.rtt_us_p99),
            (10, 9, 120, 300)
        );
        assert!(p.reached());
        let e = VmProbe::parse("n1", "n3", "probe ip=10.77.0.13 error=timeout").unwrap();
        assert_eq!(e.error.as_deref(), Some("timeout"));
        assert!(!e.reached());
        assert!(VmProbe::parse("n1", "n3", "probe error=busy").is_ok());
        assert!(VmProbe::parse("n1", "n3", "hello").is_err());
        assert!(VmProbe::parse("n1", "n3", "probe ip=x name=a").is_err());
    }
}
