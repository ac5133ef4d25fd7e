//! Local clusters: `unipeer up`, `status`, `logs`, `net ...`, `vm kill|restart`, `down`.
//!
//! A cluster lives in a run directory (default `run/cluster/` under the repository), so every
//! command works from any shell. `up` creates a network namespace of its own
//! (`unipeer-<hash of the run dir>`, root only) and starts the cluster daemon inside it
//! ([`daemon`]): the daemon owns the switch ([`crate::net`]) with its tap uplink (host
//! 10.77.0.1/16), every QEMU, and the host side of all probes, so the VMs' addresses
//! (`n1` = 10.77.0.11, `n2` = 10.77.0.12, ...) exist only inside that namespace. Clients reach a
//! node with `ip netns exec <netns> nc 10.77.0.11 7002`. Without root there is no namespace and
//! no uplink: the VMs still reach each other through the switch on loopback; host probes fail
//! with a clear error.
//!
//! Nodes on `--servers S` are split into S contiguous blocks (`s1` = the first N/S nodes, ...);
//! the switch delays frames between servers by `--server-delay`.
//!
//! A run directory whose daemon is gone is stale: the next command kills what is left of it
//! (QEMU pids it recorded), deletes its namespace and removes it, and says so.

pub mod apps;
pub mod daemon;
pub mod flood;
pub mod netns;
pub mod protocol;
pub mod relay;
pub mod state;

use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

pub use daemon::{DaemonConfig, NODES_MAX, serve};
pub use protocol::{
    ClusterClient, ClusterError, ClusterStatus, DaemonInfo, GuestPlan, GuestReport, LaunchReport,
    LaunchSettings, NodePlan, NodeState, NodeStatus, Request, RttSummary, VmProbe,
};

use crate::hostinfo::Accel;
use crate::net::{SwitchClient, UplinkStatus};
use crate::qemu::Machine;

/// The segment's first address; node `nK` has `base + 10 + K`.
pub const SEGMENT_BASE: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 0);
pub const SEGMENT_PREFIX: u8 = 16;
/// The host's address on the uplink (the switch's default).
pub const HOST_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
/// How long a freshly spawned daemon may take to answer.
const DAEMON_START_TIMEOUT: Duration = Duration::from_secs(15);
/// How long `down` waits for the daemon to exit before killing it.
const DAEMON_STOP_TIMEOUT: Duration = Duration::from_secs(20);

/// The default run directory: `run/cluster/` under the repository root.
pub fn default_run_dir() -> PathBuf {
    crate::image::repo_root().join("run").join("cluster")
}

/// Node `k` (1-based): its name.
pub fn node_name(k: usize) -> String {
    format!("n{k}")
}

/// Node `k` (1-based): its address.
pub fn node_ip(k: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(SEGMENT_BASE) + 10 + k as u32)
}

/// Nodes `first..first+count` (1-based) split over `servers` contiguous servers `s1..`.
pub fn plan(first: usize, count: usize, servers: usize) -> Vec<NodePlan> {
    let servers = servers.max(1);
    (0..count)
        .map(|i| NodePlan {
            name: node_name(first + i),
            server: format!("s{}", i * servers / count.max(1) + 1),
            ipv4: node_ip(first + i),
            ca_store: None,
            image: None,
            memory_mib: None,
        })
        .collect()
}

/// What `up` needs.
#[derive(Clone, Debug)]
pub struct UpOptions {
    pub nodes: usize,
    pub servers: usize,
    pub server_delay: Duration,
    pub image: String,
    pub accel: Accel,
    pub machine: Machine,
    pub cpu: Option<String>,
    pub memory_mib: u32,
    pub tb_size_mib: u32,
    pub log_level: String,
    /// Seed of the switch's loss RNG.
    pub seed: u64,
    /// The `unipeer` binary that runs the daemon (`cluster daemon`).
    pub daemon_exe: PathBuf,
    /// Make a network namespace (and so a host uplink) when root; `false`: never.
    pub use_netns: bool,
    /// Overlay leaf-set size handed to every node (`None`: the node's default).
    pub leaf_set: Option<u8>,
    /// Copies of every record and chunk (`None`: the node's default, 3).
    pub replicas: Option<u8>,
    /// The authority store that certifies the nodes (created if missing); `None`: no
    /// authentication.
    pub ca_store: Option<PathBuf>,
    /// Run the overlay in the nodes (default); off for VM density measurements.
    pub overlay: bool,
    /// Put every node on this server (a front-end starting the cluster with its own VMs);
    /// `None`: split them over `servers` as `s1`, `s2`, ...
    pub server: Option<String>,
    /// Only the first n VMs (launch order) hold the registered users' credentials; `None`:
    /// every VM holds every one.
    pub credential_holders: Option<usize>,
}

impl UpOptions {
    pub fn new(nodes: usize, accel: Accel, daemon_exe: PathBuf) -> Self {
        UpOptions {
            nodes,
            servers: 1,
            server_delay: Duration::ZERO,
            image: "default".into(),
            accel,
            machine: Machine::Microvm,
            cpu: None,
            memory_mib: crate::vm::DEFAULT_MEMORY_MIB,
            tb_size_mib: 16,
            log_level: "info".into(),
            seed: 1,
            daemon_exe,
            use_netns: true,
            leaf_set: None,
            replicas: None,
            ca_store: Some(crate::image::repo_root().join(crate::ca::DEFAULT_STORE)),
            overlay: true,
            server: None,
            credential_holders: None,
        }
    }
}

/// What `up` did.
#[derive(Debug)]
pub struct UpReport {
    pub launch: LaunchReport,
    pub status: ClusterStatus,
    /// Things the user should know (stale run cleaned, no namespace, uplink off).
    pub notes: Vec<String>,
}

/// What a run directory holds right now.
enum Found {
    Live(DaemonInfo),
    /// A daemon process exists but does not answer.
    Hung(u32),
    /// Leftovers of a cluster whose daemon is gone.
    Stale(state::StateFile),
    Absent,
}

fn inspect(run_dir: &Path) -> Found {
    if let Ok(mut c) = ClusterClient::connect(run_dir)
        && let Ok(info) = c.call_within::<DaemonInfo>(&Request::Hello, Duration::from_secs(5))
    {
        return Found::Live(info);
    }
    match state::load(run_dir) {
        Some(st) if state::is_cluster_daemon(st.daemon_pid, run_dir) => Found::Hung(st.daemon_pid),
        Some(st) => Found::Stale(st),
        None if run_dir.join(protocol::SOCKET_NAME).exists() => {
            Found::Stale(state::StateFile::default())
        }
        None => Found::Absent,
    }
}

/// Removes a dead cluster's leftovers; answers what was done.
fn clean(run_dir: &Path, st: &state::StateFile) -> String {
    let mut killed = 0;
    for n in &st.nodes {
        if let Some(pid) = n.qemu_pid
            && state::is_cluster_qemu(pid, run_dir)
        {
            state::kill_process(pid);
            killed += 1;
        }
    }
    let ns = st.netns.clone().unwrap_or_else(|| netns::name_for(run_dir));
    let ns_note = match netns::delete(&ns) {
        Ok(()) => String::new(),
        Err(e) => format!("; {e}"),
    };
    let _ = std::fs::remove_dir_all(run_dir);
    format!(
        "cleaned stale cluster run directory {} (daemon gone; {killed} leftover QEMU killed{ns_note})",
        run_dir.display()
    )
}

/// Connects to the live cluster in `run_dir`; a stale one is cleaned and reported as not
/// running.
pub fn connect(run_dir: &Path) -> Result<ClusterClient, ClusterError> {
    match inspect(run_dir) {
        Found::Live(_) => ClusterClient::connect(run_dir),
        Found::Hung(pid) => Err(ClusterError::Setup(format!(
            "the cluster daemon (pid {pid}) of {} does not answer; `unipeer down` stops it",
            run_dir.display()
        ))),
        Found::Stale(st) => {
            let note = clean(run_dir, &st);
            Err(ClusterError::Setup(format!(
                "{note}\nno cluster is running in {}",
                run_dir.display()
            )))
        }
        Found::Absent => Err(ClusterError::NotRunning(run_dir.to_path_buf())),
    }
}

/// The switch of the live cluster in `run_dir` (for `unipeer net ...`).
pub fn switch(run_dir: &Path) -> Result<SwitchClient, ClusterError> {
    connect(run_dir)?;
    Ok(SwitchClient::connect(run_dir)?)
}

/// Starts a cluster of `opts.nodes` VMs and waits until all printed their ready line.
pub fn up(run_dir: &Path, opts: &UpOptions) -> Result<UpReport, ClusterError> {
    if opts.nodes == 0 || opts.nodes > NODES_MAX {
        return Err(ClusterError::BadInput(format!(
            "-n {} is outside 1..={NODES_MAX}",
            opts.nodes
        )));
    }
    if opts.servers == 0 || opts.servers > opts.nodes {
        return Err(ClusterError::BadInput(format!(
            "--servers {} is outside 1..={} (one server holds at least one node)",
            opts.servers, opts.nodes
        )));
    }
    let image =
        crate::image::open(&opts.image).map_err(|e| ClusterError::BadInput(e.to_string()))?;
    let mut notes = Vec::new();
    match inspect(run_dir) {
        Found::Live(info) => {
            return Err(ClusterError::AlreadyRunning {
                run_dir: run_dir.to_path_buf(),
                nodes: info.nodes,
            });
        }
        Found::Hung(pid) => {
            return Err(ClusterError::Setup(format!(
                "a cluster daemon (pid {pid}) of {} exists but does not answer; left alone \
                 (`unipeer down` stops it)",
                run_dir.display()
            )));
        }
        Found::Stale(st) => notes.push(clean(run_dir, &st)),
        Found::Absent => {}
    }
    crate::owner_only::create_dir(run_dir)
        .map_err(|e| ClusterError::Setup(format!("cannot create {}: {e}", run_dir.display())))?;
    let netns = if opts.use_netns {
        match netns::unavailable_reason() {
            None => {
                let name = netns::name_for(run_dir);
                let _ = netns::delete(&name);
                netns::create(&name).map_err(ClusterError::Setup)?;
                Some(name)
            }
            Some(why) => {
                notes.push(format!(
                    "no network namespace ({why}): no host uplink; the VMs reach each other \
                     through the switch, the host cannot reach them"
                ));
                None
            }
        }
    } else {
        notes.push("no network namespace (disabled): no host uplink".into());
        None
    };
    let mut st = state::StateFile {
        daemon_pid: 0,
        netns: netns.clone(),
        nodes: Vec::new(),
    };
    let fail = |e: ClusterError| {
        let _ = down(run_dir);
        if let Some(ns) = &netns {
            let _ = netns::delete(ns);
        }
        e
    };
    state::save(run_dir, &st).map_err(|e| fail(ClusterError::Setup(e.to_string())))?;
    let daemon =
        spawn_daemon(run_dir, netns.as_deref(), opts).map_err(|e| fail(ClusterError::Setup(e)))?;
    st.daemon_pid = daemon.id();
    if state::load(run_dir).is_some_and(|s| s.daemon_pid == 0) {
        let _ = state::save(run_dir, &st);
    }
    let info = wait_daemon(run_dir, daemon).map_err(|e| fail(ClusterError::Setup(e)))?;
    if let UplinkStatus::Off { reason } = &info.uplink
        && netns.is_some()
    {
        notes.push(format!("host uplink is off: {reason}"));
    }
    let gateway = matches!(info.uplink, UplinkStatus::Up { .. }).then_some(HOST_ADDR);
    let settings = LaunchSettings {
        kernel: image.kernel.clone(),
        image: opts.image.clone(),
        machine: opts.machine,
        accel: opts.accel,
        cpu: opts.cpu.clone(),
        memory_mib: opts.memory_mib,
        tb_size_mib: opts.tb_size_mib,
        log_level: opts.log_level.clone(),
        prefix_len: SEGMENT_PREFIX,
        gateway,
        ready_timeout_ms: ready_timeout(opts.accel, opts.nodes).as_millis() as u64,
        leaf_set: opts.leaf_set,
        replicas: opts.replicas,
        ca_store: match &opts.ca_store {
            Some(p) => Some(ensure_authority(p)?),
            None => None,
        },
        overlay: opts.overlay,
        credential_holders: opts.credential_holders,
    };
    let mut nodes = plan(1, opts.nodes, opts.servers);
    if let Some(server) = &opts.server {
        for n in &mut nodes {
            n.server = server.clone();
        }
    }
    let launch = launch(run_dir, settings, nodes, opts.server_delay).map_err(fail)?;
    let status = status(run_dir, true).map_err(fail)?;
    Ok(UpReport {
        launch,
        status,
        notes,
    })
}

/// Asks every running node's diagnostic port until all answer or `within` passes; answers the
/// last status (nodes still silent show `answering: Some(false)`).
pub fn wait_answering(run_dir: &Path, within: Duration) -> Result<ClusterStatus, ClusterError> {
    let start = Instant::now();
    loop {
        let st = status(run_dir, true)?;
        let silent = st
            .nodes
            .iter()
            .filter(|n| n.state == NodeState::Up && n.answering == Some(false))
            .count();
        if silent == 0 || start.elapsed() > within {
            return Ok(st);
        }
    }
}

/// How long `n` VMs booting at once may take to all be ready.
pub fn ready_timeout(accel: Accel, n: usize) -> Duration {
    crate::vm::ready_timeout(accel) + Duration::from_millis(300) * n as u32
}

fn launch(
    run_dir: &Path,
    settings: LaunchSettings,
    nodes: Vec<NodePlan>,
    server_delay: Duration,
) -> Result<LaunchReport, ClusterError> {
    let timeout = Duration::from_millis(settings.ready_timeout_ms) + Duration::from_secs(60);
    ClusterClient::connect(run_dir)?.call_within(
        &Request::Launch {
            settings,
            nodes,
            server_delay_us: server_delay.as_micros() as u64,
        },
        timeout,
    )
}

/// Adds `count` nodes to a live cluster (same settings), numbered after the last one.
pub fn grow(run_dir: &Path, count: usize) -> Result<LaunchReport, ClusterError> {
    grow_with(run_dir, count, None)
}

/// Like [`grow`], with the new nodes certified by `ca_store` instead of the cluster's
/// authority (a rogue node, for tests of the trust layer).
pub fn grow_with(
    run_dir: &Path,
    count: usize,
    ca_store: Option<PathBuf>,
) -> Result<LaunchReport, ClusterError> {
    grow_nodes(
        run_dir,
        &GrowOptions {
            count,
            ca_store,
            ..GrowOptions::default()
        },
    )
}

/// Like [`grow`], the new nodes booting `image` (a name under `images/`; `None`: the
/// cluster's) on `server` (e.g. `"s2"`; `None`: the last node's server).
pub fn grow_image(
    run_dir: &Path,
    count: usize,
    image: Option<&str>,
    server: Option<&str>,
) -> Result<LaunchReport, ClusterError> {
    grow_nodes(
        run_dir,
        &GrowOptions {
            count,
            image: image.map(str::to_string),
            server: server.map(str::to_string),
            ..GrowOptions::default()
        },
    )
}

/// What [`grow_nodes`] adds.
#[derive(Clone, Debug, Default)]
pub struct GrowOptions {
    pub count: usize,
    /// Image under `images/` (`None`: the cluster's).
    pub image: Option<String>,
    /// Server tag of the new nodes (`None`: the last node's server, `s1` in an empty cluster).
    pub server: Option<String>,
    /// Guest RAM in MiB (`None`: the cluster's).
    pub memory_mib: Option<u32>,
    /// Authority store that certifies them (`None`: the cluster's).
    pub ca_store: Option<PathBuf>,
}

/// Adds `opts.count` nodes to a live cluster, numbered after the last one; waits until all
/// are ready.
pub fn grow_nodes(run_dir: &Path, opts: &GrowOptions) -> Result<LaunchReport, ClusterError> {
    if opts.count == 0 || opts.count > NODES_MAX {
        return Err(ClusterError::BadInput(format!(
            "{} node(s) is outside 1..={NODES_MAX}",
            opts.count
        )));
    }
    if let Some(name) = &opts.image {
        crate::image::open(name).map_err(|e| ClusterError::BadInput(e.to_string()))?;
    }
    if opts.memory_mib == Some(0) {
        return Err(ClusterError::BadInput("memory of 0 MiB".into()));
    }
    let st = status(run_dir, false)?;
    let mut settings = st
        .settings
        .clone()
        .ok_or_else(|| ClusterError::Setup("the cluster has no launch settings".into()))?;
    settings.ready_timeout_ms = ready_timeout(settings.accel, opts.count).as_millis() as u64;
    let first = st.nodes.len() + 1;
    let server = opts.server.clone().unwrap_or_else(|| {
        st.nodes
            .last()
            .map(|n| n.server.clone())
            .unwrap_or("s1".into())
    });
    let mut nodes = plan(first, opts.count, 1);
    for n in &mut nodes {
        n.server = server.clone();
        n.ca_store = opts.ca_store.clone();
        n.image = opts.image.clone();
        n.memory_mib = opts.memory_mib;
    }
    launch(
        run_dir,
        settings,
        nodes,
        Duration::from_micros(st.server_delay_us),
    )
}

/// Opens a byte pipe to TCP `port` on `node` through the cluster daemon (which alone can
/// reach the nodes' addresses, inside its namespace). The returned stream is positioned right
/// after the daemon's OK line: what is written goes to the node, what the node sends can be
/// read, until either side closes. An unknown node or a refused connection is an error.
pub fn relay(run_dir: &Path, node: &str, port: u16) -> Result<UnixStream, ClusterError> {
    use std::io::{Read, Write};
    drop(connect(run_dir)?);
    let mut stream = UnixStream::connect(run_dir.join(protocol::SOCKET_NAME))
        .map_err(|_| ClusterError::NotRunning(run_dir.to_path_buf()))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(15)))
        .map_err(ClusterError::Io)?;
    let mut line = serde_json::to_string(&Request::Relay {
        node: node.into(),
        port,
    })
    .expect("requests serialise");
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .map_err(ClusterError::Io)?;
    // Byte by byte: nothing past the answer line may be taken from the stream.
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match stream.read(&mut byte) {
            Ok(0) => return Err(ClusterError::NotRunning(run_dir.to_path_buf())),
            Ok(_) if byte[0] == b'\n' => break,
            Ok(_) if answer.len() >= 64 * 1024 => {
                return Err(ClusterError::Setup("relay: answer line too long".into()));
            }
            Ok(_) => answer.push(byte[0]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(ClusterError::Io(e)),
        }
    }
    let r: crate::net::Response = serde_json::from_slice(&answer)
        .map_err(|e| ClusterError::Setup(format!("bad daemon answer: {e}")))?;
    if !r.ok {
        return Err(ClusterError::Rejected(
            r.error.unwrap_or_else(|| "refused".into()),
        ));
    }
    stream.set_read_timeout(None).map_err(ClusterError::Io)?;
    Ok(stream)
}

fn spawn_daemon(run_dir: &Path, netns: Option<&str>, opts: &UpOptions) -> Result<Child, String> {
    use std::os::unix::process::CommandExt;
    let log = crate::owner_only::create_file(&run_dir.join("daemon.log"))
        .map_err(|e| format!("{}: {e}", run_dir.join("daemon.log").display()))?;
    let log2 = log.try_clone().map_err(|e| e.to_string())?;
    let mut cmd = netns::command(netns, &opts.daemon_exe);
    cmd.args(["cluster", "daemon", "--run-dir"])
        .arg(run_dir)
        .args(["--seed", &opts.seed.to_string()]);
    if let Some(ns) = netns {
        cmd.args(["--netns", ns, "--uplink"]);
    }
    // Its own process group: a Ctrl-C in the shell that ran `up` leaves the cluster alone.
    cmd.stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .process_group(0);
    cmd.spawn().map_err(|e| {
        format!(
            "cannot start the cluster daemon {}: {e}",
            opts.daemon_exe.display()
        )
    })
}

fn wait_daemon(run_dir: &Path, mut daemon: Child) -> Result<DaemonInfo, String> {
    let start = Instant::now();
    while start.elapsed() < DAEMON_START_TIMEOUT {
        if let Ok(mut c) = ClusterClient::connect(run_dir)
            && let Ok(info) = c.call_within::<DaemonInfo>(&Request::Hello, Duration::from_secs(5))
        {
            return Ok(info);
        }
        if let Ok(Some(status)) = daemon.try_wait() {
            let log = crate::owner_only::read_file(&run_dir.join("daemon.log"))
                .map(|b| String::from_utf8_lossy(&b).into_owned())
                .unwrap_or_default();
            return Err(format!(
                "the cluster daemon exited ({status}):\n{}",
                log.trim()
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = daemon.kill();
    Err(format!(
        "the cluster daemon did not answer within {} s",
        DAEMON_START_TIMEOUT.as_secs()
    ))
}

/// Stops the cluster: every VM, the switch, the daemon and the namespace; removes the run
/// directory. Answers what it did.
pub fn down(run_dir: &Path) -> Result<String, ClusterError> {
    match inspect(run_dir) {
        Found::Live(info) => {
            let stopped = ClusterClient::connect(run_dir)
                .and_then(|mut c| c.call_within::<()>(&Request::Shutdown, Duration::from_secs(30)));
            let start = Instant::now();
            while state::is_cluster_daemon(info.pid, run_dir)
                && start.elapsed() < DAEMON_STOP_TIMEOUT
            {
                std::thread::sleep(Duration::from_millis(20));
            }
            let st = state::load(run_dir).unwrap_or_default();
            if state::is_cluster_daemon(info.pid, run_dir) {
                state::kill_process(info.pid);
            }
            let mut st = st;
            st.netns = info.netns.clone().or(st.netns);
            clean(run_dir, &st);
            let how = if stopped.is_ok() { "" } else { " (forced)" };
            Ok(format!(
                "stopped the cluster in {}{how}: {} node(s){}",
                run_dir.display(),
                info.nodes,
                info.netns
                    .map(|n| format!(", network namespace {n} deleted"))
                    .unwrap_or_default()
            ))
        }
        Found::Hung(pid) => {
            state::kill_process(pid);
            let st = state::load(run_dir).unwrap_or_default();
            Ok(format!(
                "daemon {pid} did not answer: killed; {}",
                clean(run_dir, &st)
            ))
        }
        Found::Stale(st) => Ok(clean(run_dir, &st)),
        Found::Absent => Err(ClusterError::NotRunning(run_dir.to_path_buf())),
    }
}

/// Every node's state; `probe` also asks each running node's diagnostic port.
pub fn status(run_dir: &Path, probe: bool) -> Result<ClusterStatus, ClusterError> {
    connect(run_dir)?.call(&Request::Status { probe })
}

/// Starts a foreign guest on the cluster's switch (see [`Request::Guest`]) and waits for its
/// ready line.
pub fn guest(run_dir: &Path, plan: GuestPlan) -> Result<GuestReport, ClusterError> {
    let wait = Duration::from_millis(plan.ready_timeout_ms) + Duration::from_secs(30);
    connect(run_dir)?.call_within(&Request::Guest { guest: plan }, wait)
}

/// Stops a guest started by [`guest`] and removes its switch port.
pub fn guest_stop(run_dir: &Path, name: &str) -> Result<(), ClusterError> {
    connect(run_dir)?.call(&Request::GuestStop { name: name.into() })
}

/// Who answers on the cluster's socket: its namespace, uplink and size.
pub fn hello(run_dir: &Path) -> Result<DaemonInfo, ClusterError> {
    connect(run_dir)?.call(&Request::Hello)
}

pub fn kill(run_dir: &Path, node: &str) -> Result<(), ClusterError> {
    connect(run_dir)?.call(&Request::Kill { node: node.into() })
}

pub fn restart(run_dir: &Path, node: &str) -> Result<LaunchReport, ClusterError> {
    let mut c = connect(run_dir)?;
    c.call_within(
        &Request::Restart { node: node.into() },
        crate::vm::ready_timeout(Accel::Tcg) + Duration::from_secs(60),
    )
}

/// The host asks a node's diagnostic port (from inside the cluster's namespace).
pub fn host_probe(
    run_dir: &Path,
    node: &str,
) -> Result<std::collections::BTreeMap<String, String>, ClusterError> {
    connect(run_dir)?.call(&Request::HostProbe { node: node.into() })
}

/// UDP echo round trips from the host to a node.
pub fn host_echo(run_dir: &Path, node: &str, count: usize) -> Result<RttSummary, ClusterError> {
    connect(run_dir)?.call_within(
        &Request::HostEcho {
            node: node.into(),
            count,
        },
        Duration::from_secs(30) + Duration::from_millis(count as u64),
    )
}

/// Node `from` probes node `to` (`count` echo round trips).
pub fn vm_probe(run_dir: &Path, from: &str, to: &str, count: u32) -> Result<VmProbe, ClusterError> {
    connect(run_dir)?.call_within(
        &Request::VmProbe {
            from: from.into(),
            to: to.into(),
            count,
        },
        Duration::from_secs(10) + Duration::from_millis(700) * count,
    )
}

/// Node `node` runs one diagnostic command line (`lookup KEY`, `overlay`, ...); returns its
/// reply text.
pub fn node_command(run_dir: &Path, node: &str, command: &str) -> Result<String, ClusterError> {
    connect(run_dir)?.call_within(
        &Request::NodeCommand {
            node: node.into(),
            command: command.into(),
        },
        Duration::from_secs(30),
    )
}

/// Floods a node's overlay port with hostile traffic after `legit` authentic datagrams.
pub fn flood(
    run_dir: &Path,
    node: &str,
    legit: u64,
    count: u64,
) -> Result<flood::FloodReport, ClusterError> {
    connect(run_dir)?.call_within(
        &Request::Flood {
            node: node.into(),
            legit,
            count,
        },
        Duration::from_secs(360),
    )
}

/// Times `count` fresh handshakes of a certified peer with `node` (milliseconds each).
pub fn handshakes(run_dir: &Path, node: &str, count: u32) -> Result<Vec<f64>, ClusterError> {
    connect(run_dir)?.call_within(
        &Request::Handshakes {
            node: node.into(),
            count,
        },
        Duration::from_secs(30) + Duration::from_secs(11) * count,
    )
}

/// A node's serial log (the node must belong to the cluster, live or stale-but-present).
pub fn serial_log(run_dir: &Path, node: &str) -> Result<PathBuf, ClusterError> {
    let st = state::load(run_dir).ok_or_else(|| ClusterError::NotRunning(run_dir.to_path_buf()))?;
    st.nodes
        .iter()
        .find(|n| n.name == node)
        .map(|n| n.serial_log.clone())
        .ok_or_else(|| {
            let names: Vec<&str> = st.nodes.iter().map(|n| n.name.as_str()).take(8).collect();
            ClusterError::BadInput(format!(
                "unknown node {node:?} (nodes: {})",
                names.join(", ")
            ))
        })
}

/// Whether the daemon of `run_dir` is alive (for `logs -f`).
pub fn daemon_alive(run_dir: &Path) -> bool {
    state::load(run_dir).is_some_and(|s| state::is_cluster_daemon(s.daemon_pid, run_dir))
}

/// How a client on the host reaches a node (printed by `up` and `status`).
pub fn client_hint(netns: Option<&str>, ip: Ipv4Addr) -> String {
    match netns {
        Some(ns) => format!("ip netns exec {ns} nc {ip} 7002"),
        None => "(no host uplink: the host cannot reach the VMs)".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plans_split_servers_in_blocks() {
        let p = plan(1, 4, 2);
        let got: Vec<(&str, &str)> = p
            .iter()
            .map(|n| (n.name.as_str(), n.server.as_str()))
            .collect();
        assert_eq!(
            got,
            [("n1", "s1"), ("n2", "s1"), ("n3", "s2"), ("n4", "s2")]
        );
        assert_eq!(p[0].ipv4, Ipv4Addr::new(10, 77, 0, 11));
        assert_eq!(node_ip(300), Ipv4Addr::new(10, 77, 1, 54));
        assert!(plan(1, 5, 1).iter().all(|n| n.server == "s1"));
    }
}

/// A parsed `lookup ...` answer line of a node.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LookupAnswer {
    pub from: String,
    pub key: String,
    pub root: String,
    pub root_addr: String,
    pub hops: usize,
    pub path: Vec<String>,
}

impl LookupAnswer {
    /// Parses `lookup key=K root=R root_addr=A hops=N path=a,b,c`.
    pub fn parse(from: &str, line: &str) -> Option<LookupAnswer> {
        let field = |name: &str| {
            line.split_whitespace()
                .find_map(|w| w.strip_prefix(name).and_then(|r| r.strip_prefix('=')))
        };
        Some(LookupAnswer {
            from: from.to_string(),
            key: field("key")?.to_string(),
            root: field("root")?.to_string(),
            root_addr: field("root_addr")?.to_string(),
            hops: field("hops")?.parse().ok()?,
            path: field("path")?.split(',').map(str::to_string).collect(),
        })
    }
}

/// Node `from` (default: the first node up) looks `key` up in the overlay.
pub fn lookup_from(
    run_dir: &Path,
    key: &str,
    from: Option<&str>,
) -> Result<LookupAnswer, ClusterError> {
    let from = node_or_first_up(run_dir, from)?;
    let reply = node_command(run_dir, &from, &format!("lookup {key}"))?;
    let line = reply
        .lines()
        .find(|l| l.starts_with("lookup"))
        .unwrap_or("");
    LookupAnswer::parse(&from, line).ok_or_else(|| {
        ClusterError::Rejected(format!("{from} could not look {key} up: {}", reply.trim()))
    })
}

/// Opens the authority store at `path`, creating one when there is none; returns its path.
pub fn ensure_authority(path: &Path) -> Result<PathBuf, ClusterError> {
    if !path.exists() {
        let mut store = crate::ca::AuthorityStore::init(path)
            .map_err(|e| ClusterError::Setup(format!("creating the authority store: {e:#}")))?;
        store
            .add_user(
                crate::ca::DEFAULT_USER,
                vec![unipeer_node::auth::Allowance::AnyPeer],
            )
            .map_err(|e| ClusterError::Setup(format!("adding the default user: {e:#}")))?;
        eprintln!(
            "created a trusted-authority store at {} with user {:?} (manage it with `unipeer ca`)",
            path.display(),
            crate::ca::DEFAULT_USER
        );
    } else {
        let mut store = crate::ca::AuthorityStore::open(path)
            .map_err(|e| ClusterError::Setup(format!("authority store: {e:#}")))?;
        // A store made before users existed gets the default one, so `unipeer submit` works.
        if store.state.users.is_empty() {
            store
                .add_user(
                    crate::ca::DEFAULT_USER,
                    vec![unipeer_node::auth::Allowance::AnyPeer],
                )
                .map_err(|e| ClusterError::Setup(format!("adding the default user: {e:#}")))?;
        }
    }
    Ok(path.to_path_buf())
}

/// Pushes the authority's current revocation list into the running cluster through `node`
/// (default: the first node up); the node installs it, cuts sessions with revoked peers and
/// passes it on over its sealed sessions. Returns the node's answer.
pub fn publish_revocations(
    run_dir: &Path,
    store: &Path,
    node: Option<&str>,
) -> Result<String, ClusterError> {
    let authority = crate::ca::AuthorityStore::open(store)
        .map_err(|e| ClusterError::BadInput(format!("authority store: {e:#}")))?;
    let list = authority
        .revocations()
        .map_err(|e| ClusterError::BadInput(format!("revocation list: {e:#}")))?;
    let node = node_or_first_up(run_dir, node)?;
    let hex = crate::ca::store::hex(&list.encode());
    let reply = node_command(run_dir, &node, &format!("revoke {hex}"))?;
    if reply.starts_with("revocations") {
        Ok(format!("{node}: {}", reply.trim()))
    } else {
        Err(ClusterError::Rejected(format!("{node}: {}", reply.trim())))
    }
}

/// `node` itself, or the first node of the cluster that is up.
pub fn node_or_first_up(run_dir: &Path, node: Option<&str>) -> Result<String, ClusterError> {
    match node {
        Some(n) => Ok(n.to_string()),
        None => status(run_dir, false)?
            .nodes
            .iter()
            .find(|n| n.state == NodeState::Up)
            .map(|n| n.name.clone())
            .ok_or_else(|| ClusterError::Rejected("no node of the cluster is up".into())),
    }
}
