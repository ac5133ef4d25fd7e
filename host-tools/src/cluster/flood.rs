//! Hostile traffic at a node's overlay port, for tests of the trust layer: after a legitimate
//! sealed session delivers a known number of datagrams, a flood of garbage, forged handshake
//! messages, replayed, tampered and truncated copies of the session's own datagrams, and a
//! handshake from a peer of another authority. Runs inside the cluster's namespace (the
//! daemon calls it), bounded in count and time.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant as StdInstant};

use serde::{Deserialize, Serialize};
use unipeer_node::auth::{CertChain, Channel, IdentityKey, SessionLayer, SessionLimits, WallClock};
use unipeer_node::launch::PeerAddr;
use unipeer_node::{Instant, Transmit};

use crate::ca::LaunchMaterial;

/// What a flood did.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct FloodReport {
    /// Sealed datagrams the legitimate session delivered before the flood.
    pub legit_sent: u64,
    pub garbage: u64,
    pub forged_handshakes: u64,
    pub replayed: u64,
    pub tampered: u64,
    pub truncated: u64,
    /// Datagrams the foreign-authority peer sent while trying to handshake.
    pub foreign: u64,
    /// Whether the foreign peer ever got a session (it must not).
    pub foreign_established: bool,
    /// Whether a fresh legitimate session could be made after the flood.
    pub after_established: bool,
    /// Handshakes the legitimate peer started before its session (1 unless one gave up).
    #[serde(default)]
    pub legit_handshakes: u32,
    /// The same for the fresh session after the flood.
    #[serde(default)]
    pub after_handshakes: u32,
    pub elapsed_ms: u64,
    /// Connection-slot exhaustion from one source (needs the host uplink).
    #[serde(default)]
    pub slots: Option<SlotFloodReport>,
}

/// A small deterministic generator (the flood is reproducible from its seed).
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len).map(|_| self.next() as u8).collect()
    }
}

/// A session-layer peer on a UDP socket, driven in real time.
struct Peer {
    layer: SessionLayer,
    socket: UdpSocket,
    start: StdInstant,
    /// Every datagram this peer sent, for replays.
    sent: Vec<Vec<u8>>,
}

impl Peer {
    fn new(material: &LaunchMaterial, authority: [u8; 32], seed: [u8; 32]) -> Result<Peer, String> {
        let seed_key: [u8; 32] = material
            .node_key
            .as_slice()
            .try_into()
            .map_err(|_| "flood peer key is not 32 bytes".to_string())?;
        let chain = CertChain::decode(&material.certificate).map_err(|e| format!("{e:?}"))?;
        let layer = SessionLayer::new(
            IdentityKey::from_seed(&seed_key),
            &chain,
            authority,
            WallClock::new(crate::ca::store::now_unix_ms(), Instant::ZERO),
            SessionLimits::default(),
            seed,
        );
        let socket = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
        socket
            .set_read_timeout(Some(Duration::from_micros(500)))
            .map_err(|e| e.to_string())?;
        Ok(Peer {
            layer,
            socket,
            start: StdInstant::now(),
            sent: Vec::new(),
        })
    }

    fn now(&self) -> Instant {
        Instant::from_micros(self.start.elapsed().as_micros() as u64)
    }

    /// Sends what the layer wants sent, takes what arrived, runs due timers.
    fn pump(&mut self) -> u64 {
        let mut sent = 0;
        while let Some(Transmit { dst, payload }) = self.layer.poll_transmit() {
            let to = SocketAddr::from((dst.ipv4, dst.port));
            if self.socket.send_to(&payload, to).is_ok() {
                sent += 1;
                if self.sent.len() < 4096 {
                    self.sent.push(payload);
                }
            }
        }
        let mut buf = [0u8; 2048];
        for _ in 0..64 {
            match self.socket.recv_from(&mut buf) {
                Ok((n, SocketAddr::V4(from))) => {
                    let from = PeerAddr {
                        ipv4: from.ip().octets(),
                        port: from.port(),
                    };
                    let now = self.now();
                    self.layer.handle_datagram(now, from, &buf[..n]);
                }
                _ => break,
            }
        }
        let now = self.now();
        if self.layer.poll_timeout().is_some_and(|t| t <= now) {
            self.layer.handle_timeout(now);
        }
        sent
    }

    /// Pumps until a session with `peer` exists or `within` passes.
    fn wait_session(&mut self, peer: PeerAddr, within: Duration) -> bool {
        let deadline = StdInstant::now() + within;
        while StdInstant::now() < deadline {
            self.pump();
            if self.layer.peer(peer).is_some() {
                // Send what the handshake released (queued payloads).
                self.pump();
                return true;
            }
        }
        false
    }

    /// Sends `payload` to `peer` over a new session, as a real peer would: if a handshake
    /// gives up (`handshake_attempts` retransmissions unanswered, e.g. while the guest is
    /// starved of CPU by other VMs on the host) another one starts, with the payload queued
    /// again, until a session exists or `within` passes. A handshake that gave up dropped
    /// its queued payload unsealed, so the payload is delivered at most once. Returns
    /// whether a session was made and the handshakes started.
    fn establish(
        &mut self,
        peer: PeerAddr,
        payload: &[u8],
        within: Duration,
    ) -> Result<(bool, u32), String> {
        let deadline = StdInstant::now() + within;
        let mut started = 0;
        while StdInstant::now() < deadline {
            if self.layer.peer(peer).is_none() && !self.layer.handshaking(peer) {
                let now = self.now();
                self.layer
                    .send(now, peer, Channel::Overlay, payload)
                    .map_err(|e| e.to_string())?;
                started += 1;
            }
            self.pump();
            if self.layer.peer(peer).is_some() {
                self.pump();
                return Ok((true, started));
            }
        }
        Ok((false, started))
    }
}

/// Time allowed to make a legitimate session (several handshake lifetimes of
/// `handshake_attempts` × `handshake_retry_ms`), times `UNIPEER_TIMEOUT_SCALE`.
fn establish_budget() -> Duration {
    Duration::from_secs(30).mul_f64(crate::vm::timeout_scale())
}

/// Floods `target` (a node's overlay address) with `count` hostile datagrams after `legit`
/// sealed ones. `material` certifies the legitimate peer under the cluster's authority;
/// `foreign` certifies a peer under another authority.
pub fn flood(
    target: PeerAddr,
    authority: [u8; 32],
    material: &LaunchMaterial,
    foreign: (&LaunchMaterial, [u8; 32]),
    legit: u64,
    count: u64,
) -> Result<FloodReport, String> {
    let started = StdInstant::now();
    let mut r = FloodReport::default();
    let mut rng = XorShift(0x5eed_f100_d000_0001);
    let mut peer = Peer::new(material, authority, rng.bytes(32).try_into().expect("32"))?;
    let to = SocketAddr::from((target.ipv4, target.port));

    // A legitimate session delivers `legit` datagrams (garbage to the overlay, but
    // authentic: the trust layer delivers them).
    let budget = establish_budget();
    let (made, tries) = peer.establish(target, b"hello from a legitimate peer", budget)?;
    if !made {
        return Err(format!(
            "the legitimate flood peer could not establish a session ({tries} handshake(s) in {budget:?})"
        ));
    }
    r.legit_handshakes = tries;
    r.legit_sent = 1;
    peer.sent.clear();
    for i in 1..legit {
        let now = peer.now();
        let payload = format!("legitimate datagram {i}");
        peer.layer
            .send(now, target, Channel::Overlay, payload.as_bytes())
            .map_err(|e| e.to_string())?;
        peer.pump();
        r.legit_sent += 1;
    }
    peer.pump();
    let captured: Vec<Vec<u8>> = peer.sent.clone();
    if captured.is_empty() {
        return Err("captured no sealed datagrams to replay".into());
    }

    // The foreign peer starts its handshake; it is pumped throughout the flood.
    let mut alien = Peer::new(foreign.0, foreign.1, rng.bytes(32).try_into().expect("32"))?;
    let now = alien.now();
    let _ = alien
        .layer
        .send(now, target, Channel::Overlay, b"let me in");

    let socket = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
    let deadline = started + Duration::from_secs(300);
    for i in 0..count {
        let kind = rng.below(100);
        let from_session = kind >= 50;
        let datagram = match kind {
            0..25 => {
                r.garbage += 1;
                let len = rng.below(1300) as usize;
                rng.bytes(len)
            }
            25..50 => {
                r.forged_handshakes += 1;
                let len = 1 + rng.below(900) as usize;
                let mut d = rng.bytes(len);
                d[0] = 1 + rng.below(5) as u8;
                d
            }
            50..75 => {
                r.replayed += 1;
                captured[rng.below(captured.len() as u64) as usize].clone()
            }
            75..90 => {
                r.tampered += 1;
                let mut d = captured[rng.below(captured.len() as u64) as usize].clone();
                let at = 1 + rng.below(d.len() as u64 - 1) as usize;
                d[at] ^= 1 << rng.below(8);
                d
            }
            _ => {
                r.truncated += 1;
                let d = &captured[rng.below(captured.len() as u64) as usize];
                d[..rng.below(d.len() as u64) as usize].to_vec()
            }
        };
        // Copies of the session's datagrams come from the session's own address (a replay
        // from elsewhere would only be an unknown session); the rest from a stranger's.
        let _ = if from_session {
            peer.socket.send_to(&datagram, to)
        } else {
            socket.send_to(&datagram, to)
        };
        // Pace: the switch and a TCG guest should see a storm, not a kernel socket overflow.
        if i % 256 == 255 {
            r.foreign += alien.pump();
            std::thread::sleep(Duration::from_millis(2));
        }
        if StdInstant::now() > deadline {
            return Err(format!("the flood took over 300 s (at {i} of {count})"));
        }
    }
    for _ in 0..200 {
        r.foreign += alien.pump();
    }
    r.foreign_established = alien.layer.peer(target).is_some();

    // After the storm: a fresh legitimate session still works.
    let mut after = Peer::new(material, authority, rng.bytes(32).try_into().expect("32"))?;
    let (made, tries) = after.establish(target, b"still there?", establish_budget())?;
    r.after_established = made;
    r.after_handshakes = tries;
    r.elapsed_ms = started.elapsed().as_millis() as u64;
    Ok(r)
}

/// Times `count` fresh handshakes with `target`, one after another (each a new key exchange
/// and certificate check on the node); returns milliseconds per handshake, failures left out.
pub fn handshakes(
    target: PeerAddr,
    authority: [u8; 32],
    material: &LaunchMaterial,
    count: u32,
) -> Result<Vec<f64>, String> {
    let mut rng = XorShift(0x4a4e_5348_414b_4501);
    let mut times = Vec::with_capacity(count as usize);
    for _ in 0..count {
        let mut peer = Peer::new(material, authority, rng.bytes(32).try_into().expect("32"))?;
        let t0 = StdInstant::now();
        let now = peer.now();
        peer.layer
            .send(now, target, Channel::Overlay, b"timing")
            .map_err(|e| e.to_string())?;
        if peer.wait_session(target, Duration::from_secs(10)) {
            times.push(t0.elapsed().as_secs_f64() * 1000.0);
        }
    }
    Ok(times)
}

/// The extra address on the host's uplink the slot flood comes from: one source that is not
/// the host (the nodes exempt the host's own address from their per-source caps).
pub const SLOT_FLOOD_SOURCE: std::net::Ipv4Addr = std::net::Ipv4Addr::new(10, 77, 255, 250);

/// What a connection-slot flood from one source did, and whether the operator still got in.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SlotFloodReport {
    /// Diagnostic-port connections (of 12 tried) greeted and open at once.
    pub diag_held: usize,
    /// Diagnostic-port connections reset during the TCP handshake or never greeted.
    pub diag_refused: usize,
    /// Client-port (of 4) and job-channel (of 8) connections open after a second.
    pub client_held: usize,
    pub job_held: usize,
    /// The operator authenticated and ran `ping` from the host while the flood held its slots.
    pub operator_ok: bool,
    /// Until the node had closed every connection of the flood (it sends no hello).
    pub freed_ms: u64,
}

/// A TCP connection from `source` to `to`, with a connect/read deadline.
fn connect_from(
    source: std::net::Ipv4Addr,
    to: SocketAddr,
    timeout: Duration,
) -> Result<std::net::TcpStream, String> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrIn, bind, connect, setsockopt, socket, sockopt,
    };
    let fd = socket(
        AddressFamily::Inet,
        SockType::Stream,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
    .map_err(|e| format!("socket: {e}"))?;
    let tv =
        nix::sys::time::TimeVal::new(timeout.as_secs() as i64, i64::from(timeout.subsec_micros()));
    setsockopt(&fd, sockopt::SendTimeout, &tv).map_err(|e| format!("SO_SNDTIMEO: {e}"))?;
    setsockopt(&fd, sockopt::ReceiveTimeout, &tv).map_err(|e| format!("SO_RCVTIMEO: {e}"))?;
    let o = source.octets();
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrIn::new(o[0], o[1], o[2], o[3], 0),
    )
    .map_err(|e| format!("bind {source}: {e}"))?;
    let SocketAddr::V4(v4) = to else {
        return Err("IPv4 only".into());
    };
    connect(std::os::fd::AsRawFd::as_raw_fd(&fd), &SockaddrIn::from(v4))
        .map_err(|e| format!("connect {to} from {source}: {e}"))?;
    Ok(std::net::TcpStream::from(fd))
}

/// Whether the node still holds `s` open (nothing but maybe data waiting; no EOF, no reset).
fn still_open(s: &std::net::TcpStream) -> bool {
    use std::io::Read;
    if s.set_nonblocking(true).is_err() {
        return false;
    }
    let mut buf = [0u8; 4096];
    let open = loop {
        match (&*s).read(&mut buf) {
            Ok(0) => break false,
            Ok(_) => continue,
            Err(e) => break e.kind() == std::io::ErrorKind::WouldBlock,
        }
    };
    let _ = s.set_nonblocking(false);
    open
}

/// Fills a node's connection slots from one source other than the host ([`SLOT_FLOOD_SOURCE`],
/// added to the uplink `ifname` for the flood and removed after): 12 silent connections to the
/// diagnostic port, 4 to the client port, 8 to the job channel. While they are held, the
/// operator (from the host's own address) authenticates with `key` and runs `ping`. Bounded:
/// 24 connections, a few seconds each.
pub fn slot_flood(
    target: std::net::Ipv4Addr,
    ifname: &str,
    key: &crate::diag::OperatorKey,
) -> Result<SlotFloodReport, String> {
    let cidr = format!("{SLOT_FLOOD_SOURCE}/16");
    let added = std::process::Command::new("ip")
        .args(["addr", "add", &cidr, "dev", ifname])
        .status()
        .map_err(|e| format!("ip addr add: {e}"))?;
    let result = slot_flood_from(target, key);
    if added.success() {
        let _ = std::process::Command::new("ip")
            .args(["addr", "del", &cidr, "dev", ifname])
            .status();
    }
    result
}

fn slot_flood_from(
    target: std::net::Ipv4Addr,
    key: &crate::diag::OperatorKey,
) -> Result<SlotFloodReport, String> {
    use std::io::Read;
    let step = Duration::from_secs(2);
    let mut r = SlotFloodReport::default();
    let diag_addr = SocketAddr::from((target, crate::vm::DIAG_TCP_PORT));
    let client_addr = SocketAddr::from((target, unipeer_node::jobs::client::CLIENT_PORT));
    let job_addr = SocketAddr::from((
        target,
        crate::vm::OVERLAY_PORT + unipeer_node::jobs::wire::JOB_PORT_OFFSET,
    ));
    let started = StdInstant::now();
    let mut flood = Vec::new();
    for (addr, n) in [(diag_addr, 12), (client_addr, 4), (job_addr, 8)] {
        for _ in 0..n {
            // A reset during the handshake is a refusal too.
            match connect_from(SLOT_FLOOD_SOURCE, addr, step) {
                Ok(s) => flood.push((addr, s)),
                Err(_) if addr == diag_addr => r.diag_refused += 1,
                Err(_) => {}
            }
        }
    }
    // The diagnostic port greets the ones it keeps; give the node a moment for the rest.
    let mut buf = [0u8; 4096];
    for (addr, s) in &mut flood {
        if *addr == diag_addr {
            let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
            if !matches!(s.read(&mut buf), Ok(n) if n > 0) {
                r.diag_refused += 1;
            }
        }
    }
    std::thread::sleep(Duration::from_millis(500));
    for (addr, s) in &flood {
        if still_open(s) {
            match *addr {
                a if a == diag_addr => r.diag_held += 1,
                a if a == client_addr => r.client_held += 1,
                _ => r.job_held += 1,
            }
        }
    }
    // The operator, from the host's address, while the flood holds what it could.
    r.operator_ok = crate::diag::tcp_command(diag_addr, Some(key), "ping", Duration::from_secs(5))
        .is_ok_and(|reply| reply == "pong\n");
    // Silent connections lose their slots at the hello deadline.
    let deadline = StdInstant::now() + Duration::from_secs(15);
    while flood.iter().any(|(_, s)| still_open(s)) && StdInstant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
    }
    r.freed_ms = started.elapsed().as_millis() as u64;
    if flood.iter().any(|(_, s)| still_open(s)) {
        r.freed_ms = u64::MAX;
    }
    Ok(r)
}
