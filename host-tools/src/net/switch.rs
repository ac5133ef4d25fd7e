//! The forwarder: one thread that blocks in epoll (via `mio`) on every port's socket, the tap
//! and a waker for control calls, and wakes at the next delayed frame's deadline.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashSet};
use std::fmt;
use std::io;
use std::net::{Ipv4Addr, SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

use super::UPLINK_PORT;
use super::control::{self, Call, ControlError, Request, Response, SOCKET_NAME, SwitchClient};
use super::fabric::{Fabric, FaultError, Hop};
use super::stats::{PortInfo, PortKind, UplinkStatus};
use super::uplink::{self, UplinkConfig};

const WAKER: Token = Token(usize::MAX);
/// Frames read from one port before the others get a turn.
const RX_BATCH: usize = 64;
/// Bounds on the delay queue.
const QUEUE_FRAMES_MAX: usize = 100_000;
const QUEUE_BYTES_MAX: usize = 256 << 20;
/// Largest datagram read (QEMU's dgram netdev sends one frame per datagram).
const FRAME_MAX: usize = 65_536;

/// How to start a switch.
#[derive(Clone, Debug)]
pub struct SwitchConfig {
    /// Holds the control socket `switch.sock`; created if missing.
    pub run_dir: PathBuf,
    /// Seed of the loss RNG: the same seed and the same frames give the same drops.
    pub seed: u64,
    pub uplink: UplinkConfig,
    /// Loopback address both ends of every VM port use.
    pub loopback: Ipv4Addr,
}

impl SwitchConfig {
    /// Defaults: seed 1, uplink 10.77.0.1/16 on tap `unipeer%d`, ports on 127.0.0.1.
    pub fn new(run_dir: impl Into<PathBuf>) -> Self {
        SwitchConfig {
            run_dir: run_dir.into(),
            seed: 1,
            uplink: UplinkConfig::default(),
            loopback: Ipv4Addr::LOCALHOST,
        }
    }
}

/// Why a switch did not start.
#[derive(Debug)]
pub enum StartError {
    /// The run directory could not be created or used.
    RunDir(PathBuf, io::Error),
    /// A switch already answers on this run directory's control socket.
    AlreadyRunning(PathBuf),
    /// The control socket, epoll or a thread could not be set up.
    Setup(io::Error),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::RunDir(p, e) => write!(f, "run directory {}: {e}", p.display()),
            StartError::AlreadyRunning(p) => {
                write!(f, "a switch is already running at {}", p.display())
            }
            StartError::Setup(e) => write!(f, "switch set-up failed: {e}"),
        }
    }
}

impl std::error::Error for StartError {}

/// A running switch in this process. Dropping it stops the switch.
pub struct SwitchHandle {
    socket: PathBuf,
    uplink: UplinkStatus,
    calls: Sender<Call>,
    waker: Arc<Waker>,
    stop: Arc<AtomicBool>,
    forwarder: Option<JoinHandle<()>>,
    control: Option<JoinHandle<()>>,
}

/// Starts a switch: opens the uplink (or says why it is off), binds the control socket and
/// spawns the forwarder. Ports are added afterwards ([`SwitchClient::add_port`]).
pub fn start(config: SwitchConfig) -> Result<SwitchHandle, StartError> {
    let dir = &config.run_dir;
    // 0700, ours, not a symlink: the socket inside gives control of every link.
    crate::owner_only::create_dir(dir).map_err(|e| StartError::RunDir(dir.clone(), e))?;
    let socket = dir.join(SOCKET_NAME);
    if UnixStream::connect(&socket).is_ok() {
        return Err(StartError::AlreadyRunning(socket));
    }
    // Nobody answers: a stale socket from a switch that died. Removed by the bind; 0600.
    let listener = crate::owner_only::bind_socket(&socket).map_err(StartError::Setup)?;

    let poll = Poll::new().map_err(StartError::Setup)?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKER).map_err(StartError::Setup)?);
    let (tap, uplink_status) = uplink::open(&config.uplink);
    let mut forwarder = Forwarder {
        poll,
        fabric: Fabric::new(config.seed),
        faults: Default::default(),
        io: Vec::new(),
        ready: Vec::new(),
        is_ready: Vec::new(),
        queue: BinaryHeap::new(),
        queued_bytes: 0,
        seq: 0,
        calls: None,
        loopback: config.loopback,
        reserved: HashSet::new(),
        uplink: uplink_status.clone(),
        stop: false,
    };
    if let Some(tap) = tap {
        forwarder.add_uplink(tap).map_err(StartError::Setup)?;
    }
    let (calls_tx, calls_rx) = mpsc::channel();
    forwarder.calls = Some(calls_rx);
    let stop = Arc::new(AtomicBool::new(false));
    let control = control::spawn_server(listener, calls_tx.clone(), waker.clone(), stop.clone())
        .map_err(StartError::Setup)?;
    let fwd = thread::Builder::new()
        .name("switch-forwarder".into())
        .spawn(move || forwarder.run())
        .map_err(StartError::Setup)?;
    log::info!("switch: running, control socket {}", socket.display());
    Ok(SwitchHandle {
        socket,
        uplink: uplink_status,
        calls: calls_tx,
        waker,
        stop,
        forwarder: Some(fwd),
        control: Some(control),
    })
}

impl SwitchHandle {
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// Whether the host uplink is up, and if not, why.
    pub fn uplink(&self) -> &UplinkStatus {
        &self.uplink
    }

    /// A control connection to this switch (the same protocol other processes use).
    pub fn client(&self) -> Result<SwitchClient, ControlError> {
        SwitchClient::connect_socket(self.socket.clone())
    }

    /// Blocks until the switch is asked to stop (a `shutdown` request), then cleans up.
    pub fn wait(mut self) {
        self.join_and_clean();
    }

    /// Stops the switch: closes the tap (removing it and its route) and the control socket.
    pub fn stop(mut self) {
        self.request_stop();
        self.join_and_clean();
    }

    fn request_stop(&self) {
        let (reply, _answer) = mpsc::sync_channel(1);
        let _ = self.calls.send(Call {
            request: Request::Shutdown,
            reply,
        });
        let _ = self.waker.wake();
    }

    fn join_and_clean(&mut self) {
        if let Some(f) = self.forwarder.take() {
            let _ = f.join();
        }
        if let Some(c) = self.control.take() {
            self.stop.store(true, Ordering::SeqCst);
            // Wake the accept loop so it sees the flag.
            let _ = UnixStream::connect(&self.socket);
            let _ = c.join();
            let _ = std::fs::remove_file(&self.socket);
            log::info!("switch: stopped");
        }
    }
}

impl Drop for SwitchHandle {
    fn drop(&mut self) {
        if self.forwarder.is_some() {
            self.request_stop();
        }
        self.join_and_clean();
    }
}

/// Starts a switch and serves until a `shutdown` request. For a `unipeer net serve`-style
/// daemon; if the process is killed instead, the kernel removes the tap and the next start
/// removes the stale socket.
pub fn serve(config: SwitchConfig) -> Result<(), StartError> {
    start(config)?.wait();
    Ok(())
}

/// The exact `-netdev` value for a VM whose QEMU binds `vm` and sends to the switch at `switch`
/// (QEMU 7.2 `dgram` netdev: one Ethernet frame per UDP datagram, no header).
pub fn qemu_netdev_arg(id: &str, vm: SocketAddr, switch: SocketAddr) -> String {
    format!(
        "dgram,id={id},local.type=inet,local.host={},local.port={},remote.type=inet,remote.host={},remote.port={}",
        vm.ip(),
        vm.port(),
        switch.ip(),
        switch.port()
    )
}

enum PortIo {
    Udp(mio::net::UdpSocket),
    Tap(tun::Device),
}

impl PortIo {
    fn recv(&self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            PortIo::Udp(s) => s.recv(buf),
            PortIo::Tap(t) => t.recv(buf),
        }
    }

    fn send(&self, frame: &[u8]) -> io::Result<usize> {
        match self {
            PortIo::Udp(s) => s.send(frame),
            PortIo::Tap(t) => t.send(frame),
        }
    }
}

/// A port slot's I/O and its generation, so a delayed frame never reaches a port that took a
/// removed port's slot.
struct Slot {
    io: PortIo,
    generation: u64,
}

#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Delayed {
    at: Instant,
    seq: u64,
    to: usize,
    generation: u64,
    frame: Vec<u8>,
}

struct Forwarder {
    poll: Poll,
    fabric: Fabric,
    faults: super::faults::FaultLog,
    io: Vec<Option<Slot>>,
    ready: Vec<usize>,
    is_ready: Vec<bool>,
    queue: BinaryHeap<Reverse<Delayed>>,
    queued_bytes: usize,
    /// Tie-breaker keeping delayed frames FIFO; also the slot generation source.
    seq: u64,
    calls: Option<Receiver<Call>>,
    loopback: Ipv4Addr,
    /// VM-side UDP ports handed out and not yet released.
    reserved: HashSet<u16>,
    uplink: UplinkStatus,
    stop: bool,
}

impl Forwarder {
    fn run(mut self) {
        let mut events = Events::with_capacity(1024);
        let mut buf = vec![0u8; FRAME_MAX];
        let mut hops = Vec::new();
        while !self.stop {
            let timeout = if self.ready.is_empty() {
                self.queue
                    .peek()
                    .map(|Reverse(d)| d.at.saturating_duration_since(Instant::now()))
            } else {
                Some(Duration::ZERO)
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                log::error!("switch: poll failed, stopping: {e}");
                break;
            }
            for ev in events.iter() {
                if ev.token() != WAKER {
                    self.mark_ready(ev.token().0);
                }
            }
            // Every turn, not only on the waker's event: a call never waits for another.
            self.handle_calls();
            self.drain_ready(&mut buf, &mut hops);
            self.flush_due();
        }
        // Dropping self closes every socket and the tap (removing it and its route).
    }

    fn mark_ready(&mut self, i: usize) {
        if i < self.is_ready.len() && !self.is_ready[i] {
            self.is_ready[i] = true;
            self.ready.push(i);
        }
    }

    /// Reads up to [`RX_BATCH`] frames from each ready port; a port not yet drained stays
    /// ready (mio is edge-triggered).
    fn drain_ready(&mut self, buf: &mut [u8], hops: &mut Vec<Hop>) {
        let ready = std::mem::take(&mut self.ready);
        for i in ready {
            let mut drained = false;
            for _ in 0..RX_BATCH {
                let Some(slot) = self.io.get(i).and_then(Option::as_ref) else {
                    drained = true;
                    break;
                };
                match slot.io.recv(buf) {
                    Ok(n) => {
                        let now = Instant::now();
                        hops.clear();
                        self.fabric.route(now, i, &buf[..n], hops);
                        for h in hops.iter() {
                            self.deliver(now, *h, &buf[..n]);
                        }
                    }
                    // An ICMP error from an earlier send (VM not listening): keep reading.
                    Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(e) => {
                        if e.kind() != io::ErrorKind::WouldBlock {
                            log::debug!("switch: recv on port {i}: {e}");
                        }
                        drained = true;
                        break;
                    }
                }
            }
            if drained {
                if let Some(r) = self.is_ready.get_mut(i) {
                    *r = false;
                }
            } else {
                self.ready.push(i);
            }
        }
    }

    fn deliver(&mut self, now: Instant, hop: Hop, frame: &[u8]) {
        if hop.delay_us == 0 {
            self.send_now(hop.to, frame);
            return;
        }
        if self.queue.len() >= QUEUE_FRAMES_MAX || self.queued_bytes + frame.len() > QUEUE_BYTES_MAX
        {
            self.fabric.note_queue_full(hop.to);
            return;
        }
        let generation = self.io[hop.to].as_ref().map_or(0, |s| s.generation);
        self.seq += 1;
        self.queued_bytes += frame.len();
        self.queue.push(Reverse(Delayed {
            at: now + Duration::from_micros(hop.delay_us),
            seq: self.seq,
            to: hop.to,
            generation,
            frame: frame.to_vec(),
        }));
    }

    fn send_now(&mut self, to: usize, frame: &[u8]) {
        let Some(slot) = self.io.get(to).and_then(Option::as_ref) else {
            return;
        };
        match slot.io.send(frame) {
            Ok(_) => self.fabric.note_sent(to, frame.len()),
            Err(_) => self.fabric.note_unreachable(to),
        }
    }

    /// Sends every delayed frame whose deadline has passed, unless its link was cut meanwhile.
    fn flush_due(&mut self) {
        let now = Instant::now();
        while let Some(Reverse(d)) = self.queue.peek() {
            if d.at > now {
                break;
            }
            let Some(Reverse(d)) = self.queue.pop() else {
                break;
            };
            self.queued_bytes -= d.frame.len();
            let same_port = self.io[d.to]
                .as_ref()
                .is_some_and(|s| s.generation == d.generation);
            if !same_port {
                continue;
            }
            if !self.fabric.link_up(d.to) {
                self.fabric.note_link_down(d.to);
                continue;
            }
            self.send_now(d.to, &d.frame);
        }
    }

    fn handle_calls(&mut self) {
        let Some(calls) = self.calls.take() else {
            return;
        };
        // Bounded: at most one call per control connection is outstanding; any left over are
        // taken on the next turn.
        for _ in 0..1024 {
            let Ok(call) = calls.try_recv() else { break };
            let response = match self.execute(call.request) {
                Ok(result) => Response::success(result),
                Err(e) => Response::failure(e),
            };
            let _ = call.reply.send(response);
            if self.stop {
                break;
            }
        }
        self.calls = Some(calls);
    }

    fn execute(&mut self, request: Request) -> Result<Option<serde_json::Value>, String> {
        let f = &mut self.fabric;
        let unit = |r: Result<(), FaultError>| r.map(|()| None).map_err(|e| e.to_string());
        match request {
            Request::AddPort {
                name,
                server,
                vm_port,
            } => {
                let info = self.add_vm_port(name, server, vm_port)?;
                Ok(Some(serde_json::to_value(info).expect("serialisable")))
            }
            Request::RemovePort { name } => {
                let idx = f.remove_port(&name).map_err(|e| e.to_string())?;
                if let Some(Slot {
                    io: PortIo::Udp(mut s),
                    ..
                }) = self.io[idx].take()
                {
                    let _ = self.poll.registry().deregister(&mut s);
                    if let Ok(peer) = s.peer_addr() {
                        self.reserved.remove(&peer.port());
                    }
                }
                Ok(None)
            }
            Request::Ports => Ok(Some(serde_json::to_value(f.infos()).expect("serialisable"))),
            Request::Cut { port } => {
                unit(f.set_link(&port, false))?;
                self.faults.start("cut", &port, String::new());
                Ok(None)
            }
            Request::Restore { port } => {
                unit(f.set_link(&port, true))?;
                self.faults.heal("cut", Some(&port));
                Ok(None)
            }
            Request::Partition { groups } => {
                unit(f.partition(&groups))?;
                let g: Vec<String> = groups.iter().map(|g| g.join(",")).collect();
                self.faults.heal("partition", None);
                self.faults
                    .start("partition", &g.join(" | "), String::new());
                Ok(None)
            }
            Request::Heal => {
                f.heal();
                self.faults.heal("partition", None);
                Ok(None)
            }
            Request::Loss { port, fraction } => {
                unit(f.set_loss(port.as_deref(), fraction))?;
                let target = port.as_deref().unwrap_or("*");
                if fraction > 0.0 {
                    self.faults
                        .start("loss", target, format!("{:.1}%", fraction * 100.0));
                } else {
                    self.faults.heal("loss", Some(target));
                }
                Ok(None)
            }
            Request::Delay { port, delay_us } => {
                unit(f.set_link_delay(&port, delay_us))?;
                if delay_us > 0 {
                    let ms = delay_us as f64 / 1000.0;
                    self.faults.start("delay", &port, format!("{ms:.1} ms"));
                } else {
                    self.faults.heal("delay", Some(&port));
                }
                Ok(None)
            }
            Request::DelayBetween { a, b, delay_us } => {
                unit(f.set_delay_between(&a, &b, delay_us))?;
                let target = format!("{} <-> {}", a.join(","), b.join(","));
                if delay_us > 0 {
                    let ms = delay_us as f64 / 1000.0;
                    self.faults.start("delay", &target, format!("{ms:.1} ms"));
                } else {
                    self.faults.heal("delay", Some(&target));
                }
                Ok(None)
            }
            Request::ClearDelays => {
                f.clear_delays();
                self.faults.heal("delay", None);
                Ok(None)
            }
            Request::Servers { servers, delay_us } => unit(f.set_servers(&servers, delay_us)),
            Request::ServerDelay { delay_us } => unit(f.set_server_delay(delay_us)),
            Request::Reset => {
                f.reset_faults();
                self.faults.heal_all();
                Ok(None)
            }
            Request::Faults => Ok(Some(
                serde_json::to_value(self.faults.events()).expect("serialisable"),
            )),
            Request::Stats => {
                let s = f.stats(self.uplink.clone(), self.queue.len());
                Ok(Some(serde_json::to_value(s).expect("serialisable")))
            }
            Request::Shutdown => {
                self.stop = true;
                Ok(None)
            }
        }
    }

    fn slot_for(&mut self, idx: usize, io: PortIo) {
        if self.io.len() <= idx {
            self.io.resize_with(idx + 1, || None);
            self.is_ready.resize(idx + 1, false);
        }
        self.seq += 1;
        self.io[idx] = Some(Slot {
            io,
            generation: self.seq,
        });
    }

    fn add_uplink(&mut self, tap: tun::Device) -> io::Result<()> {
        let info = PortInfo {
            name: UPLINK_PORT.into(),
            kind: PortKind::Uplink,
            server: None,
            switch_addr: None,
            vm_addr: None,
        };
        let idx = self
            .fabric
            .add_port(info)
            .map_err(|e| io::Error::other(e.to_string()))?;
        self.poll.registry().register(
            &mut SourceFd(&tap.as_raw_fd()),
            Token(idx),
            Interest::READABLE,
        )?;
        self.slot_for(idx, PortIo::Tap(tap));
        // Frames may already wait on the tap (edge-triggered): look once.
        self.mark_ready(idx);
        Ok(())
    }

    fn add_vm_port(
        &mut self,
        name: String,
        server: Option<String>,
        vm_port: Option<u16>,
    ) -> Result<PortInfo, String> {
        if !super::fabric::valid_port_name(&name) {
            return Err(FaultError::BadPortName(name).to_string());
        }
        if self.fabric.index(&name).is_ok() {
            return Err(FaultError::DuplicatePort(name).to_string());
        }
        let label = name.clone();
        let io_err = |what: &str, e: io::Error| format!("port {label:?}: {what}: {e}");
        let sock = UdpSocket::bind((self.loopback, 0)).map_err(|e| io_err("bind", e))?;
        let vm_port = match vm_port {
            Some(p) => p,
            None => self
                .reserve_port()
                .map_err(|e| io_err("reserve a VM port", e))?,
        };
        let vm_addr = SocketAddr::from((self.loopback, vm_port));
        // Connected: the kernel drops datagrams from anyone but this VM's QEMU.
        sock.connect(vm_addr).map_err(|e| io_err("connect", e))?;
        sock.set_nonblocking(true)
            .map_err(|e| io_err("non-blocking", e))?;
        let switch_addr = sock.local_addr().map_err(|e| io_err("local address", e))?;
        let mut sock = mio::net::UdpSocket::from_std(sock);
        let info = PortInfo {
            name,
            kind: PortKind::Vm,
            server,
            switch_addr: Some(switch_addr),
            vm_addr: Some(vm_addr),
        };
        let idx = self
            .fabric
            .add_port(info.clone())
            .map_err(|e| e.to_string())?;
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut sock, Token(idx), Interest::READABLE)
        {
            let _ = self.fabric.remove_port(&info.name);
            return Err(io_err("register", e));
        }
        self.reserved.insert(vm_port);
        self.slot_for(idx, PortIo::Udp(sock));
        log::debug!(
            "switch: port {} vm {} switch {}",
            info.name,
            vm_addr,
            switch_addr
        );
        Ok(info)
    }

    /// A loopback UDP port free now, and not handed to another VM of this switch.
    fn reserve_port(&mut self) -> io::Result<u16> {
        for _ in 0..64 {
            let probe = UdpSocket::bind((self.loopback, 0))?;
            let port = probe.local_addr()?.port();
            if !self.reserved.contains(&port) {
                return Ok(port);
            }
        }
        Err(io::Error::other("no free loopback UDP port after 64 tries"))
    }
}
