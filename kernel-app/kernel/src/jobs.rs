//! The job host: drives the node core's [`JobAgent`] beside the overlay peer the way the job
//! simulator does (`tests/jobsim`), runs the linked applications, and carries job messages on
//! the **job channel**. A [`Service`]: it reaches the overlay through the loop's
//! [`OverlayAccess`], takes the overlay's events and the client port's requests from the bus,
//! and puts the agent's events there.
//!
//! Job channel: TCP on the overlay port + [`JOB_PORT_OFFSET`]. Every job message is one frame
//! (`auth::stream::frame`, length-prefixed). A node keeps at most [`OUT_POOL`] outgoing
//! connections, one per destination, each with a bounded queue of frames streamed into the
//! socket as send-buffer space frees (so socket buffers stay small and 64 KiB chunks still go
//! through); idle ones close after [`OUT_IDLE_US`]. A connection that fails drops its queued
//! frames (counted): the agent retries by itself. Incoming connections land on [`IN_SOCKETS`]
//! listening sockets, each with a `FrameReader(MAX_JOB_MESSAGE)`; a frame that is too long
//! closes its connection (counted).
//!
//! Every connection starts with a clear hello frame ([`HELLO_LEN`] bytes: magic, version, the
//! connecting node's overlay address, a fresh nonce), answered by the acceptor's clear ack
//! frame ([`ACK_LEN`] bytes: magic, version, the acceptor's fresh nonce) once it takes the
//! connection; the connector sends no job frame before the ack. With trust on, the acceptor takes the
//! connection only if the trust layer holds a verified session with that overlay address and
//! the address's IP is the TCP source IP (it waits up to [`VERIFY_WAIT_US`] for the session
//! to finish, then refuses, counted); the connector opens a connection only once it has a
//! session with the destination, keeping frames queued meanwhile (bounded, up to
//! [`SESSION_WAIT_US`], asking the trust layer to open one). Every frame after the hello is
//! sealed ([`StreamSealer`], context [`JOB_STREAM_CONTEXT`]) under the connection secret
//! `SessionLayer::stream_secret_for(peer, hello nonce, ack nonce)`, so a recorded connection
//! replayed to the acceptor does not open (its ack nonce is new); the acceptor tries the candidates
//! `stream_secret_candidates_for` gives on the first frame (both ends may briefly disagree on
//! the newest session) and refuses the connection when none opens it. Without trust material
//! (a development VM) the channel runs in the clear.

use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt::Write;

use sha2::{Digest, Sha256};
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp;
use smoltcp::wire::{IpAddress, IpEndpoint, Ipv4Address};
use unipeer_node::auth::Csprng;
use unipeer_node::auth::session::connection_secret;
use unipeer_node::auth::stream::{FRAME_HEADER_LEN, FrameReader, StreamRole, StreamSealer, frame};
use unipeer_node::jobs::JobAgent;
use unipeer_node::jobs::app::{App, AppSet, Slice, SliceState};
use unipeer_node::jobs::delegation::{NodeKeyAuthority, TokenAuthority};
use unipeer_node::jobs::wire::{JOB_PORT_OFFSET, MAX_JOB_MESSAGE};
use unipeer_node::jobs::{JobConfig, JobEvent, Work};
use unipeer_node::launch::{LaunchConfig, PeerAddr};
use unipeer_node::{Instant, NodeId};

use crate::net::Stack;
use crate::net::guard::{self, SourcePolicy};
use crate::service::{
    Context, Demand, Dht, JobReply, JobRequest, Outbox, OverlayAccess, RoutedCommand, Service,
    ServiceEvent, StreamKeys, UNAUTHORIZED_REPLY,
};

/// Outgoing job connections at once (one per destination).
pub const OUT_POOL: usize = 16;
/// Listening sockets of the job port (a listening socket takes one connection).
pub const IN_SOCKETS: usize = 8;
/// An outgoing connection with nothing to send for this long is closed.
pub const OUT_IDLE_US: u64 = 30_000_000;
/// An incoming connection silent for this long is closed.
pub const IN_IDLE_US: u64 = 90_000_000;
/// An outgoing connection whose peer acknowledges nothing for this long has failed.
pub const PEER_TIMEOUT_US: u64 = 10_000_000;
/// A connection not established after this long has failed.
pub const CONNECT_TIMEOUT_US: u64 = 5_000_000;
/// Frames for a destination without a trust session wait this long, then are dropped.
pub const SESSION_WAIT_US: u64 = 10_000_000;
/// An acceptor waits this long for the trust session a hello names.
pub const VERIFY_WAIT_US: u64 = 3_000_000;
/// Frames queued per destination, and bytes.
pub const OUT_QUEUE_FRAMES: usize = 256;
pub const OUT_QUEUE_BYTES: usize = 1 << 20;
/// Bytes queued over every destination: at most this, and at most an eighth of the heap.
pub const OUT_TOTAL_BYTES: usize = 4 << 20;
/// TCP buffers of every job socket (frames are streamed through them).
const SOCKET_BUF: usize = 16 * 1024;
/// Local ports of outgoing connections cycle through this range.
const EPHEMERAL: (u16, u16) = (40_000, 60_000);
/// HKDF context of a sealed job stream.
pub const JOB_STREAM_CONTEXT: &[u8] = b"unipeer job stream v1";
const HELLO_MAGIC: &[u8; 2] = b"UJ";
const HELLO_VERSION: u8 = 2;
/// Hello body: magic (2), version (1), IPv4 (4), port (2, big-endian), nonce (16).
pub const HELLO_LEN: usize = 25;
/// Ack body: magic (2), version (1), the acceptor's nonce (16).
pub const ACK_LEN: usize = 19;
/// A connection whose ack has not come this long after it opened has failed (the acceptor
/// may wait up to [`VERIFY_WAIT_US`] for the trust session first).
pub const ACK_TIMEOUT_US: u64 = CONNECT_TIMEOUT_US + VERIFY_WAIT_US;
/// A quiet agent (nothing running, supervised, queued or asked for lately) is ticked at most
/// this often: its timers are retries and periodic adverts, and any packet that arrives runs a
/// due tick anyway. Keeps an idle node's wake-ups low.
pub const QUIET_TICK_US: u64 = 2_000_000;
/// Activity (a submission, a client request, a task run) keeps the agent's own pace this long.
pub const QUIET_AFTER_US: u64 = 10_000_000;
/// Default task slots (launch-config extra `job_slots`, one byte, overrides).
pub const DEFAULT_SLOTS: u8 = 2;
/// CPU time one slice of a task may take before the loop services the network again.
const SLICE_US: u64 = 3_000;

/// The applications linked into this image (kernel features `app-<name>`).
pub fn linked_apps() -> AppSet {
    let apps: &[&'static dyn App] = &[
        #[cfg(feature = "app-wordcount")]
        &unipeer_apps::WordCount,
        #[cfg(feature = "app-primes")]
        &unipeer_apps::Primes,
        #[cfg(feature = "app-sha256")]
        &unipeer_apps::Sha256Chunks,
        #[cfg(feature = "app-fail")]
        &unipeer_apps::Fail,
    ];
    AppSet::new(apps)
}

/// What tells one sealed node-to-node channel from another (the job channel, the
/// replication channel): its port, its stream context and hello magic, its largest message and
/// how many of its connections one source may hold.
#[derive(Clone, Copy)]
pub struct ChannelKind {
    pub port_offset: u16,
    pub context: &'static [u8],
    pub magic: &'static [u8; 2],
    pub max_message: usize,
    pub slots_per_source: usize,
}

/// The job channel.
pub const JOB_CHANNEL: ChannelKind = ChannelKind {
    port_offset: JOB_PORT_OFFSET,
    context: JOB_STREAM_CONTEXT,
    magic: HELLO_MAGIC,
    max_message: MAX_JOB_MESSAGE,
    slots_per_source: guard::JOB_SLOTS_PER_SOURCE,
};

fn sealer_for(kind: &ChannelKind, connection_secret: &[u8; 32], role: StreamRole) -> StreamSealer {
    StreamSealer::new(connection_secret, kind.context, role)
}

fn encode_hello(magic: &[u8; 2], me: PeerAddr, nonce: &[u8; 16]) -> Vec<u8> {
    let mut b = Vec::with_capacity(HELLO_LEN);
    b.extend_from_slice(magic);
    b.push(HELLO_VERSION);
    b.extend_from_slice(&me.ipv4);
    b.extend_from_slice(&me.port.to_be_bytes());
    b.extend_from_slice(nonce);
    b
}

fn decode_hello(magic: &[u8; 2], b: &[u8]) -> Option<(PeerAddr, [u8; 16])> {
    if b.len() != HELLO_LEN || &b[..2] != magic || b[2] != HELLO_VERSION {
        return None;
    }
    let addr = PeerAddr {
        ipv4: b[3..7].try_into().ok()?,
        port: u16::from_be_bytes([b[7], b[8]]),
    };
    Some((addr, b[9..25].try_into().ok()?))
}

fn encode_ack(magic: &[u8; 2], nonce: &[u8; 16]) -> Vec<u8> {
    let mut b = Vec::with_capacity(ACK_LEN);
    b.extend_from_slice(magic);
    b.push(HELLO_VERSION);
    b.extend_from_slice(nonce);
    b
}

fn decode_ack(magic: &[u8; 2], b: &[u8]) -> Option<[u8; 16]> {
    if b.len() != ACK_LEN || &b[..2] != magic || b[2] != HELLO_VERSION {
        return None;
    }
    b[3..].try_into().ok()
}

fn instant(now_us: u64) -> Instant {
    Instant::from_micros(now_us)
}

fn tcp_socket() -> tcp::Socket<'static> {
    tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; SOCKET_BUF]),
        tcp::SocketBuffer::new(vec![0; SOCKET_BUF]),
    )
}

/// Counters of the job channel and the host.
#[derive(Default, Clone, Copy)]
pub struct ChannelCounters {
    pub frames_out: u64,
    pub bytes_out: u64,
    pub frames_in: u64,
    pub bytes_in: u64,
    pub connects: u64,
    pub connect_failures: u64,
    pub accepted: u64,
    /// Queued frames lost with a failed connection.
    pub dropped_failed: u64,
    /// Frames refused by the queue or pool bounds.
    pub dropped_full: u64,
    /// Frames dropped after waiting in vain for a trust session.
    pub dropped_no_session: u64,
    /// Incoming frames too long or failing to open (their connection closed).
    pub bad_frames: u64,
    /// Incoming connections refused at the hello (bad hello, no session, IP mismatch).
    pub refused: u64,
    pub idle_closed: u64,
    /// Connections closed for a hello not complete within the deadline.
    pub hello_timeouts: u64,
    /// Connections refused because their source held its share of the slots.
    pub source_capped: u64,
    /// Messages to this node's own address, handed over without TCP.
    pub loopback: u64,
}

struct Outgoing {
    dst: PeerAddr,
    handle: Option<SocketHandle>,
    queue: VecDeque<Vec<u8>>,
    queued_bytes: usize,
    /// The frame being written and how much of it has gone.
    current: Vec<u8>,
    offset: usize,
    sealer: Option<StreamSealer>,
    /// The trust session's stream secret taken when the connection opened (the connection
    /// secret follows from it once the acceptor's nonce arrives).
    session_secret: Option<[u8; 32]>,
    hello_sent: bool,
    /// The acceptor's ack arrived (job frames flow only after it).
    acked: bool,
    /// Reads the ack.
    ack_reader: FrameReader,
    nonce: [u8; 16],
    /// When the connection was opened, or when it began waiting for a session.
    since_us: u64,
    last_activity_us: u64,
    closing: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum InState {
    AwaitHello,
    Verifying {
        peer: PeerAddr,
        nonce: [u8; 16],
        /// Ours, sent in the ack.
        acceptor_nonce: [u8; 16],
        until_us: u64,
    },
    Open,
}

struct Incoming {
    handle: SocketHandle,
    /// The overlay address the hello named.
    peer: PeerAddr,
    reader: FrameReader,
    state: InState,
    sealer: Option<StreamSealer>,
    /// Connection secrets the peer may have used, tried on the first frame after the hello.
    candidates: Vec<[u8; 32]>,
    active: bool,
    last_activity_us: u64,
    /// When the connection was accepted (the hello is due within `guard::HELLO_DEADLINE_US`).
    since_us: u64,
}

/// The TCP side of job messages (and, with another [`ChannelKind`], of replication's).
pub struct JobChannel {
    kind: ChannelKind,
    me: PeerAddr,
    port: u16,
    outgoing: Vec<Outgoing>,
    incoming: Vec<Incoming>,
    total_queued: usize,
    total_limit: usize,
    next_port: u16,
    loopback: VecDeque<Vec<u8>>,
    /// Input is waiting that the last pass left for the next (bounded work per pass).
    wake_now: bool,
    pub counters: ChannelCounters,
    policy: SourcePolicy,
}

impl JobChannel {
    pub(crate) fn new(
        kind: ChannelKind,
        stack: &mut Stack,
        me: PeerAddr,
        heap_bytes: u64,
        policy: SourcePolicy,
    ) -> Self {
        let port = me.port.wrapping_add(kind.port_offset);
        let incoming = (0..IN_SOCKETS)
            .map(|_| Incoming {
                handle: stack.sockets.add(tcp_socket()),
                peer: me,
                reader: FrameReader::new(kind.max_message),
                state: InState::AwaitHello,
                sealer: None,
                candidates: Vec::new(),
                active: false,
                last_activity_us: 0,
                since_us: 0,
            })
            .collect();
        let mut ch = JobChannel {
            kind,
            me,
            port,
            outgoing: Vec::new(),
            incoming,
            total_queued: 0,
            total_limit: OUT_TOTAL_BYTES.min((heap_bytes / 8) as usize),
            next_port: EPHEMERAL.0,
            loopback: VecDeque::new(),
            wake_now: false,
            counters: ChannelCounters::default(),
            policy,
        };
        ch.relisten(stack);
        ch
    }

    fn relisten(&mut self, stack: &mut Stack) {
        for c in &mut self.incoming {
            let socket = stack.sockets.get_mut::<tcp::Socket>(c.handle);
            if socket.state() == tcp::State::Closed {
                c.reader = FrameReader::new(self.kind.max_message);
                c.state = InState::AwaitHello;
                c.sealer = None;
                c.candidates = Vec::new();
                c.active = false;
                let _ = socket.listen(self.port);
            }
        }
    }

    /// Queues one job message for the peer whose overlay address is `dst`.
    pub(crate) fn send(&mut self, now_us: u64, dst: PeerAddr, payload: Vec<u8>) {
        if payload.len() > self.kind.max_message {
            self.counters.dropped_full += 1;
            return;
        }
        if dst == self.me {
            self.counters.loopback += 1;
            self.loopback.push_back(payload);
            return;
        }
        if self.total_queued + payload.len() > self.total_limit {
            self.counters.dropped_full += 1;
            return;
        }
        let i = match self
            .outgoing
            .iter()
            .position(|o| o.dst == dst && !o.closing)
        {
            Some(i) => i,
            None => {
                if self.outgoing.len() >= OUT_POOL {
                    // Make room by closing an idle connection; else refuse.
                    let idle = self
                        .outgoing
                        .iter_mut()
                        .filter(|o| !o.closing && o.queue.is_empty() && o.current.is_empty())
                        .min_by_key(|o| o.last_activity_us);
                    if let Some(o) = idle {
                        o.closing = true;
                    }
                    self.counters.dropped_full += 1;
                    return;
                }
                self.outgoing.push(Outgoing {
                    dst,
                    handle: None,
                    queue: VecDeque::new(),
                    queued_bytes: 0,
                    current: Vec::new(),
                    offset: 0,
                    sealer: None,
                    session_secret: None,
                    hello_sent: false,
                    acked: false,
                    ack_reader: FrameReader::new(ACK_LEN),
                    nonce: [0; 16],
                    since_us: now_us,
                    last_activity_us: now_us,
                    closing: false,
                });
                self.outgoing.len() - 1
            }
        };
        let o = &mut self.outgoing[i];
        if o.queue.len() >= OUT_QUEUE_FRAMES || o.queued_bytes + payload.len() > OUT_QUEUE_BYTES {
            self.counters.dropped_full += 1;
            return;
        }
        o.queued_bytes += payload.len();
        self.total_queued += payload.len();
        o.queue.push_back(payload);
    }

    fn ephemeral_port(&mut self) -> u16 {
        let p = self.next_port;
        self.next_port = if p + 1 >= EPHEMERAL.1 {
            EPHEMERAL.0
        } else {
            p + 1
        };
        p
    }

    /// Opens, feeds, times out and closes outgoing connections.
    pub(crate) fn pump_out(
        &mut self,
        now_us: u64,
        stack: &mut Stack,
        mut trust: Option<&mut (dyn StreamKeys + '_)>,
        rng: &mut Csprng,
    ) {
        let mut i = 0;
        while i < self.outgoing.len() {
            let keep = self.pump_one(i, now_us, stack, trust.as_deref_mut(), rng);
            if keep {
                i += 1;
            } else {
                let o = self.outgoing.swap_remove(i);
                self.total_queued -= o.queued_bytes;
                if let Some(h) = o.handle {
                    stack.sockets.remove(h);
                }
            }
        }
    }

    /// One outgoing connection; false: remove it.
    fn pump_one(
        &mut self,
        i: usize,
        now_us: u64,
        stack: &mut Stack,
        trust: Option<&mut (dyn StreamKeys + '_)>,
        rng: &mut Csprng,
    ) -> bool {
        let me = self.me;
        let Some(handle) = self.outgoing[i].handle else {
            let o = &mut self.outgoing[i];
            if o.closing {
                return false;
            }
            let mut nonce = [0u8; 16];
            rng.fill(&mut nonce);
            let mut secret = None;
            if let Some(layer) = trust {
                secret = layer.stream_secret(o.dst);
                if secret.is_none() {
                    if now_us.saturating_sub(o.since_us) > SESSION_WAIT_US {
                        self.counters.dropped_no_session += o.queue.len() as u64;
                        return false;
                    }
                    layer.ensure_session(instant(now_us), o.dst);
                    return true;
                }
            }
            let local = self.ephemeral_port();
            let o = &mut self.outgoing[i];
            let remote = IpEndpoint::new(
                IpAddress::from(Ipv4Address::from(o.dst.ipv4)),
                o.dst.port.wrapping_add(self.kind.port_offset),
            );
            let mut socket = tcp_socket();
            socket.set_nagle_enabled(false);
            // A peer that dies with data outstanding (or silently while idle) ends the
            // connection instead of leaving it retransmitting forever with frames piling up.
            socket.set_timeout(Some(smoltcp::time::Duration::from_micros(PEER_TIMEOUT_US)));
            socket.set_keep_alive(Some(smoltcp::time::Duration::from_micros(
                PEER_TIMEOUT_US / 2,
            )));
            if socket
                .connect(stack.iface.context(), remote, local)
                .is_err()
            {
                self.counters.connect_failures += 1;
                self.counters.dropped_failed += o.queue.len() as u64;
                return false;
            }
            o.nonce = nonce;
            o.session_secret = secret;
            o.sealer = None;
            o.handle = Some(stack.sockets.add(socket));
            o.since_us = now_us;
            o.last_activity_us = now_us;
            o.hello_sent = false;
            o.acked = false;
            o.ack_reader = FrameReader::new(ACK_LEN);
            self.counters.connects += 1;
            return true;
        };
        let o = &mut self.outgoing[i];
        let socket = stack.sockets.get_mut::<tcp::Socket>(handle);
        let state = socket.state();
        let idle = o.queue.is_empty() && o.current.is_empty();
        if o.closing {
            if matches!(state, tcp::State::Closed | tcp::State::TimeWait) {
                return false;
            }
            if state != tcp::State::FinWait1
                && state != tcp::State::FinWait2
                && state != tcp::State::Closing
                && state != tcp::State::LastAck
            {
                socket.close();
            }
            // A peer that never finishes the close is cut after the connect timeout.
            if now_us.saturating_sub(o.last_activity_us) > CONNECT_TIMEOUT_US {
                socket.abort();
                return false;
            }
            return true;
        }
        let failed = match state {
            tcp::State::SynSent | tcp::State::SynReceived => {
                now_us.saturating_sub(o.since_us) > CONNECT_TIMEOUT_US
            }
            tcp::State::Established => false,
            _ => true,
        };
        if failed {
            if o.hello_sent {
                // It was up: the peer closed it or it broke. Queued frames are lost.
            } else {
                self.counters.connect_failures += 1;
            }
            let lost = o.queue.len() as u64 + u64::from(!o.current.is_empty());
            self.counters.dropped_failed += lost;
            socket.abort();
            return false;
        }
        if state != tcp::State::Established {
            return true;
        }
        if !o.hello_sent {
            let hello = frame(&encode_hello(self.kind.magic, me, &o.nonce));
            if socket.send_capacity() - socket.send_queue() < hello.len() {
                return true;
            }
            let _ = socket.send_slice(&hello);
            o.hello_sent = true;
        }
        // The acceptor's ack (its nonce) comes first; anything after it is discarded.
        while !o.acked && socket.can_recv() {
            let mut buf = [0u8; FRAME_HEADER_LEN + ACK_LEN];
            let want = o.ack_reader.wants().min(buf.len());
            let n = socket.recv_slice(&mut buf[..want]).unwrap_or(0);
            if n == 0 {
                break;
            }
            o.ack_reader.push(&buf[..n]);
            let ack = match o.ack_reader.next_frame() {
                Ok(None) => continue,
                Ok(Some(body)) => decode_ack(self.kind.magic, &body),
                Err(_) => None,
            };
            match ack {
                Some(acceptor_nonce) => {
                    o.sealer = o.session_secret.take().map(|secret| {
                        let k = connection_secret(&secret, &o.nonce, &acceptor_nonce);
                        sealer_for(&self.kind, &k, StreamRole::Initiator)
                    });
                    o.acked = true;
                }
                // Not an ack: not a job channel we can trust.
                None => {
                    self.counters.connect_failures += 1;
                    self.counters.dropped_failed +=
                        o.queue.len() as u64 + u64::from(!o.current.is_empty());
                    socket.abort();
                    return false;
                }
            }
        }
        while o.acked && socket.can_recv() {
            if socket.recv(|b| (b.len(), ())).is_err() {
                break;
            }
        }
        if !o.acked {
            if now_us.saturating_sub(o.since_us) > ACK_TIMEOUT_US {
                self.counters.connect_failures += 1;
                self.counters.dropped_failed +=
                    o.queue.len() as u64 + u64::from(!o.current.is_empty());
                socket.abort();
                return false;
            }
            return true;
        }
        // Stream frames into the send buffer as space frees.
        loop {
            if o.current.is_empty() {
                let Some(payload) = o.queue.pop_front() else {
                    break;
                };
                o.queued_bytes -= payload.len();
                self.total_queued -= payload.len();
                let body = match o.sealer.as_mut() {
                    Some(s) => match s.seal(&payload) {
                        Ok(b) => b,
                        Err(_) => {
                            self.counters.dropped_failed += 1;
                            continue;
                        }
                    },
                    None => payload,
                };
                o.current = frame(&body);
                o.offset = 0;
            }
            let n = socket
                .send_slice(&o.current[o.offset..])
                .unwrap_or_default();
            if n == 0 {
                break;
            }
            o.offset += n;
            o.last_activity_us = now_us;
            self.counters.bytes_out += n as u64;
            if o.offset == o.current.len() {
                o.current = Vec::new();
                o.offset = 0;
                self.counters.frames_out += 1;
            }
        }
        if idle && now_us.saturating_sub(o.last_activity_us) > OUT_IDLE_US {
            self.counters.idle_closed += 1;
            o.closing = true;
            o.last_activity_us = now_us;
            socket.close();
        }
        true
    }

    /// Reads incoming connections; whole messages (opened) go to `deliver` with the overlay
    /// address the sender's hello named (verified against its trust session and source IP).
    pub(crate) fn pump_in(
        &mut self,
        now_us: u64,
        stack: &mut Stack,
        mut trust: Option<&mut (dyn StreamKeys + '_)>,
        rng: &mut Csprng,
        mut deliver: impl FnMut(PeerAddr, &[u8]),
    ) {
        let kind = self.kind;
        let me = self.me;
        // Sockets closed in an earlier pass listen again; one aborted in this pass keeps its
        // endpoint until the stack has sent its RST (listen() would forget it).
        self.relisten(stack);
        self.wake_now = false;
        while let Some(m) = self.loopback.pop_front() {
            deliver(me, &m);
        }
        // Sources of the connections already accepted, for the per-source cap.
        let mut held: Vec<IpAddress> = self
            .incoming
            .iter()
            .filter(|c| c.active)
            .filter_map(|c| {
                stack
                    .sockets
                    .get::<tcp::Socket>(c.handle)
                    .remote_endpoint()
                    .map(|e| e.addr)
            })
            .collect();
        for c in &mut self.incoming {
            let socket = stack.sockets.get_mut::<tcp::Socket>(c.handle);
            let state = socket.state();
            if matches!(
                state,
                tcp::State::Listen | tcp::State::SynReceived | tcp::State::Closed
            ) {
                continue;
            }
            if !c.active {
                if let Some(source) = socket.remote_endpoint().map(|e| e.addr) {
                    if self
                        .policy
                        .over_cap(source, held.iter().copied(), kind.slots_per_source)
                    {
                        self.counters.source_capped += 1;
                        socket.abort();
                        continue;
                    }
                    held.push(source);
                }
                c.active = true;
                c.last_activity_us = now_us;
                c.since_us = now_us;
                self.counters.accepted += 1;
            }
            if c.state == InState::AwaitHello
                && now_us.saturating_sub(c.since_us) > guard::HELLO_DEADLINE_US
            {
                self.counters.hello_timeouts += 1;
                socket.abort();
                continue;
            }
            if let InState::Verifying {
                peer,
                nonce,
                acceptor_nonce,
                until_us,
            } = c.state
            {
                match verify(trust.as_deref_mut(), now_us, peer, &nonce, &acceptor_nonce) {
                    Verdict::Ok(candidates) => {
                        if !send_ack(kind.magic, socket, &acceptor_nonce) {
                            self.counters.refused += 1;
                            socket.abort();
                            continue;
                        }
                        c.candidates = candidates;
                        c.state = InState::Open;
                    }
                    Verdict::Wait if now_us < until_us => continue,
                    _ => {
                        log::debug!("jobs: refused a job connection from {:?}", peer.ipv4);
                        self.counters.refused += 1;
                        socket.abort();
                        continue;
                    }
                }
            }
            let mut budget = 2 * kind.max_message;
            let mut buf = [0u8; 2048];
            let mut bad = false;
            while budget > 0 && socket.can_recv() && !bad {
                let want = c.reader.wants().min(buf.len()).min(budget);
                let n = socket.recv_slice(&mut buf[..want]).unwrap_or(0);
                if n == 0 {
                    break;
                }
                budget -= n;
                c.last_activity_us = now_us;
                self.counters.bytes_in += n as u64;
                c.reader.push(&buf[..n]);
                loop {
                    let body = match c.reader.next_frame() {
                        Ok(Some(b)) => b,
                        Ok(None) => break,
                        Err(_) => {
                            // Too long: a hello that is not one, or a frame over the bound.
                            if c.state == InState::AwaitHello {
                                self.counters.refused += 1;
                            } else {
                                self.counters.bad_frames += 1;
                            }
                            bad = true;
                            break;
                        }
                    };
                    match c.state {
                        InState::AwaitHello => {
                            let IpAddress::Ipv4(src) = socket
                                .remote_endpoint()
                                .map(|e| e.addr)
                                .unwrap_or(IpAddress::Ipv4(Ipv4Address::UNSPECIFIED));
                            match decode_hello(kind.magic, &body) {
                                Some((peer, nonce)) if peer.ipv4 == src.octets() => {
                                    c.peer = peer;
                                    let mut acceptor_nonce = [0u8; 16];
                                    rng.fill(&mut acceptor_nonce);
                                    c.state = InState::Verifying {
                                        peer,
                                        nonce,
                                        acceptor_nonce,
                                        until_us: now_us + VERIFY_WAIT_US,
                                    };
                                    match verify(
                                        trust.as_deref_mut(),
                                        now_us,
                                        peer,
                                        &nonce,
                                        &acceptor_nonce,
                                    ) {
                                        Verdict::Ok(candidates) => {
                                            if !send_ack(kind.magic, socket, &acceptor_nonce) {
                                                self.counters.refused += 1;
                                                bad = true;
                                                break;
                                            }
                                            c.candidates = candidates;
                                            c.state = InState::Open;
                                        }
                                        // Stop reading until the session is there.
                                        _ => break,
                                    }
                                }
                                _ => {
                                    self.counters.refused += 1;
                                    bad = true;
                                    break;
                                }
                            }
                        }
                        InState::Verifying { .. } => break,
                        InState::Open => {
                            let mut body = body;
                            if c.sealer.is_none() && !c.candidates.is_empty() {
                                // The first sealed frame: the secret that opens it is the
                                // session the peer keyed the connection with.
                                let mut opened = None;
                                for k in core::mem::take(&mut c.candidates) {
                                    let mut sealer = sealer_for(&kind, &k, StreamRole::Responder);
                                    let mut copy = body.clone();
                                    if let Ok(n) = sealer.open(&mut copy) {
                                        opened = Some((sealer, copy, n));
                                        break;
                                    }
                                }
                                let Some((sealer, copy, n)) = opened else {
                                    self.counters.refused += 1;
                                    bad = true;
                                    break;
                                };
                                c.sealer = Some(sealer);
                                self.counters.frames_in += 1;
                                deliver(c.peer, &copy[..n]);
                                continue;
                            }
                            let len = match c.sealer.as_mut() {
                                Some(s) => match s.open(&mut body) {
                                    Ok(n) => n,
                                    Err(_) => {
                                        self.counters.bad_frames += 1;
                                        bad = true;
                                        break;
                                    }
                                },
                                None => body.len(),
                            };
                            self.counters.frames_in += 1;
                            deliver(c.peer, &body[..len]);
                        }
                    }
                }
                if matches!(c.state, InState::Verifying { .. }) {
                    break;
                }
            }
            if bad {
                socket.abort();
                continue;
            }
            if c.state == InState::Open && socket.can_recv() {
                // Budget spent with bytes left: come back at once.
                self.wake_now = true;
            }
            if !socket.may_recv() && state == tcp::State::CloseWait {
                socket.close();
            } else if now_us.saturating_sub(c.last_activity_us) > IN_IDLE_US {
                self.counters.idle_closed += 1;
                socket.abort();
            }
        }
    }

    pub(crate) fn next_deadline_us(&self, now_us: u64) -> Option<u64> {
        let mut at: Option<u64> = None;
        let mut take = |t: u64| at = Some(at.map_or(t, |a: u64| a.min(t)));
        if !self.loopback.is_empty() || self.wake_now {
            take(now_us);
        }
        for o in &self.outgoing {
            match o.handle {
                // Waiting for a trust session: look again soon.
                None => take(now_us + 20_000),
                Some(_) if o.closing => take(o.last_activity_us + CONNECT_TIMEOUT_US + 1),
                Some(_) if !o.hello_sent => take(o.since_us + CONNECT_TIMEOUT_US + 1),
                Some(_) if !o.acked => take(o.since_us + ACK_TIMEOUT_US + 1),
                Some(_) if o.queue.is_empty() && o.current.is_empty() => {
                    take(o.last_activity_us + OUT_IDLE_US + 1)
                }
                Some(_) => {}
            }
        }
        for c in &self.incoming {
            if let InState::Verifying { .. } = c.state {
                take(now_us + 20_000);
            } else if c.active && c.state == InState::AwaitHello {
                take(c.since_us + guard::HELLO_DEADLINE_US + 1);
            } else if c.active {
                take(c.last_activity_us + IN_IDLE_US + 1);
            }
        }
        at
    }

    fn queued_frames(&self) -> usize {
        self.outgoing
            .iter()
            .map(|o| o.queue.len() + usize::from(!o.current.is_empty()))
            .sum()
    }
}

/// Sends the ack (the acceptor's nonce) on a connection just taken; false if it does not fit
/// (it always does in a fresh socket's buffer).
fn send_ack(magic: &[u8; 2], socket: &mut tcp::Socket<'_>, acceptor_nonce: &[u8; 16]) -> bool {
    let ack = frame(&encode_ack(magic, acceptor_nonce));
    socket.send_capacity() - socket.send_queue() >= ack.len()
        && socket.send_slice(&ack) == Ok(ack.len())
}

enum Verdict {
    /// A session with the peer exists: the connection secrets to try on the first frame
    /// (none without trust: the channel runs in the clear).
    Ok(Vec<[u8; 32]>),
    Wait,
}

fn verify(
    trust: Option<&mut (dyn StreamKeys + '_)>,
    now_us: u64,
    peer: PeerAddr,
    nonce: &[u8; 16],
    acceptor_nonce: &[u8; 16],
) -> Verdict {
    let Some(layer) = trust else {
        return Verdict::Ok(Vec::new());
    };
    let candidates = layer.stream_secret_candidates_for(peer, nonce, acceptor_nonce);
    if candidates.is_empty() {
        layer.ensure_session(instant(now_us), peer);
        Verdict::Wait
    } else {
        Verdict::Ok(candidates)
    }
}

/// Work and job counters of the host itself.
#[derive(Default, Clone, Copy)]
pub struct HostCounters {
    pub works_run: u64,
    /// Slices of tasks run (a long task runs in many).
    pub slices: u64,
    pub works_failed: u64,
    pub events_unclaimed: u64,
    pub diag_submits: u64,
    /// Time spent inside applications (the loop services nothing meanwhile), and the longest.
    pub work_us: u64,
    pub work_max_us: u64,
}

/// The job agent, its applications and the job channel.
pub struct JobHost {
    agent: JobAgent,
    apps: AppSet,
    channel: JobChannel,
    work: VecDeque<Work>,
    /// The task being run in slices, and the app's progress.
    current: Option<(Work, SliceState, u64)>,
    rng: Csprng,
    pub counters: HostCounters,
    #[cfg_attr(not(feature = "diag-test"), allow(dead_code))]
    diag_nonce: u64,
    /// Whether this node delegates tasks (only with trust material).
    delegation: bool,
    chunk_bytes_max: usize,
    /// When the agent's timers last ran.
    last_tick_us: u64,
    /// Last submission, client request or task run (None: never).
    last_busy_us: Option<u64>,
    /// The other services' demand when last looked at (requests served, some waiting).
    demand: Demand,
}

impl JobHost {
    /// The agent with `JobConfig::default()`, chunk bytes bounded to a third of the heap, slots
    /// from the launch config's `job_slots` (one byte), chunk copies from `replicas` (one byte).
    pub fn new(
        config: &LaunchConfig,
        stack: &mut Stack,
        overlay: &mut dyn OverlayAccess,
        heap_bytes: u64,
        entropy: &[u8],
        now_us: u64,
    ) -> JobHost {
        let mut cfg = JobConfig::default();
        cfg.max_chunk_bytes = cfg.max_chunk_bytes.min((heap_bytes / 3) as usize);
        if let Some(&[k]) = config.extra("replicas")
            && k > 0
        {
            cfg.replicas = usize::from(k);
        }
        cfg.slots = match config.extra("job_slots") {
            Some(&[s]) if s > 0 => s,
            _ => DEFAULT_SLOTS,
        };
        let apps = linked_apps();
        let mut seed_input = Vec::with_capacity(64 + entropy.len());
        seed_input.extend_from_slice(&config.rng_seed);
        seed_input.extend_from_slice(b"unipeer job host");
        seed_input.extend_from_slice(entropy);
        let seed: [u8; 32] = Sha256::digest(&seed_input).into();
        let mut rng = Csprng::from_seed(seed);
        // Delegation tokens: signed with the node's identity key and checked against the keys
        // of peers with verified sessions. Without trust material (a development VM in the
        // clear) there is no key to sign with: the node neither delegates nor accepts
        // delegated tasks (the report says `jobs_delegation=off`).
        let auth: alloc::boxed::Box<dyn TokenAuthority> = match overlay.take_token_identity() {
            Some(identity) => {
                alloc::boxed::Box::new(NodeKeyAuthority::new(identity, overlay.peer_keys()))
            }
            None => {
                cfg.delegation = false;
                log::warn!("jobs: no trust material: job delegation is off");
                alloc::boxed::Box::new(NoDelegation)
            }
        };
        let agent = JobAgent::new(
            cfg,
            apps.clone(),
            auth,
            overlay.dht().contact(),
            rng.bytes32(),
            instant(now_us),
        );
        let me = PeerAddr {
            ipv4: config.net.ipv4,
            port: config.net.overlay_port,
        };
        let channel = JobChannel::new(
            JOB_CHANNEL,
            stack,
            me,
            heap_bytes,
            SourcePolicy::new(config),
        );
        JobHost {
            agent,
            apps,
            channel,
            work: VecDeque::new(),
            current: None,
            rng,
            counters: HostCounters::default(),
            diag_nonce: 0,
            delegation: cfg.delegation,
            chunk_bytes_max: cfg.max_chunk_bytes,
            last_tick_us: now_us,
            last_busy_us: None,
            demand: Demand::default(),
        }
    }

    /// One line about the host, for the log after the ready line (serial output is slow).
    pub fn log_summary(&self) {
        log::info!(
            "jobs: apps [{}], {} slots, chunk store {} KiB, job port {} (TCP)",
            AppsList(&self.apps),
            self.agent.slots(),
            self.chunk_bytes_max / 1024,
            self.channel.port
        );
    }

    /// Channel I/O, timers, at most one slice of work; the agent's output goes out in `flush`.
    fn service(
        &mut self,
        now_us: u64,
        stack: &mut Stack,
        overlay: &mut dyn OverlayAccess,
        demand: Demand,
    ) {
        let now = instant(now_us);
        {
            let agent = &mut self.agent;
            let (dht, trust) = overlay.dht_and_keys();
            let mut node = Dht(dht);
            self.channel
                .pump_in(now_us, stack, trust, &mut self.rng, |_, m| {
                    agent.handle_message(now, &mut node, m)
                });
        }
        if self.agent.poll_timeout().is_some_and(|t| t <= now) {
            self.agent.handle_timeout(now, &mut Dht(overlay.dht()));
            self.last_tick_us = now_us;
        }
        // One task per pass, so the network keeps being serviced between tasks.
        while let Some(w) = self.agent.poll_work() {
            self.work.push_back(w);
        }
        // Requests served by other services (the client port) since the last pass.
        if demand.requests != self.demand.requests {
            self.last_busy_us = Some(now_us);
        }
        self.demand = demand;
        // One slice of the current task per pass (about SLICE_US of CPU), so leases are
        // renewed and keepalives answered while a long task runs.
        if self.current.is_none()
            && let Some(w) = self.work.pop_front()
        {
            self.current = Some((w, None, 0));
        }
        if let Some((w, state, spent_us)) = self.current.as_mut() {
            self.last_busy_us = Some(now_us);
            let inputs: Vec<&[u8]> = w.inputs.iter().map(Vec::as_slice).collect();
            let started = crate::clock::now_us();
            let mut yield_now = || crate::clock::now_us().saturating_sub(started) >= SLICE_US;
            let slice = self.apps.run_slice(&w.spec, &inputs, state, &mut yield_now);
            *spent_us += crate::clock::now_us().saturating_sub(started);
            self.counters.slices += 1;
            drop(inputs);
            if let Slice::Done(result) = slice {
                let (w, _, spent_us) = self.current.take().expect("current work");
                self.counters.works_run += 1;
                if result.is_err() {
                    self.counters.works_failed += 1;
                }
                self.counters.work_us += spent_us;
                self.counters.work_max_us = self.counters.work_max_us.max(spent_us);
                log::debug!(
                    "jobs: ran {} task {} in {} us",
                    w.spec.app,
                    w.task,
                    spent_us
                );
                let now_after = crate::clock::now_us();
                self.agent.handle_work_done(
                    instant(now_after),
                    &mut Dht(overlay.dht()),
                    w.id,
                    result,
                );
            }
        }
    }

    /// Moves the agent's transmits to the channel and its events onto the bus (for the client
    /// port; what nobody claims comes back to `log_event`).
    fn drain(&mut self, now_us: u64, outbox: &mut Outbox<'_>) {
        while let Some(t) = self.agent.poll_transmit() {
            self.channel.send(now_us, t.dst, t.payload);
        }
        while let Some(w) = self.agent.poll_work() {
            self.work.push_back(w);
        }
        while let Some(e) = self.agent.poll_event() {
            outbox.post(ServiceEvent::Job(e));
        }
    }

    /// An agent event no other service claimed.
    fn log_event(&mut self, e: JobEvent) {
        self.counters.events_unclaimed += 1;
        match e {
            JobEvent::TaskRegistered {
                job,
                task,
                verified,
                ..
            } => log::info!("jobs: task {task} of job {job} registered (verified={verified})"),
            JobEvent::TaskFailed { job, task, failure } => {
                log::info!("jobs: task {task} of job {job} failed: {failure:?}")
            }
            JobEvent::TaskDisputed { job, task, .. } => {
                log::info!("jobs: task {task} of job {job} disputed")
            }
            JobEvent::ReduceSpawned { job, task } => {
                log::info!("jobs: reduce task {task} of job {job} spawned")
            }
            JobEvent::Submitted { job } => log::info!("jobs: job {job} submitted"),
            JobEvent::Dispatched { task, to } => log::debug!("jobs: {task} leased to {to}"),
            JobEvent::ChunkFetched { id, .. } => log::debug!("jobs: chunk {id} fetched"),
        }
    }

    /// The earliest time the host needs a pass.
    fn next_deadline(&self, now_us: u64) -> Option<u64> {
        let busy = !self.work.is_empty() || self.current.is_some();
        let mut agent = self.agent.poll_timeout().map(Instant::as_micros);
        if self.quiet(now_us) {
            agent = agent.map(|t| t.max(self.last_tick_us + QUIET_TICK_US));
        }
        [
            busy.then_some(now_us),
            agent,
            self.channel.next_deadline_us(now_us),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    /// Nothing running, supervised, queued or asked for lately.
    fn quiet(&self, now_us: u64) -> bool {
        self.agent.running() == 0
            && self.agent.supervising() == 0
            && self.work.is_empty()
            && self.current.is_none()
            && self.channel.queued_frames() == 0
            && !self.demand.waiting
            && self
                .last_busy_us
                .is_none_or(|t| now_us.saturating_sub(t) > QUIET_AFTER_US)
    }

    #[cfg(feature = "diag-test")]
    /// `job-primes START END TASKS` from the diagnostic port: a primes job submitted from
    /// inside the node (user `diag`).
    fn submit_primes(
        &mut self,
        now_us: u64,
        overlay: &mut dyn OverlayAccess,
        start: u64,
        end: u64,
        tasks: u64,
    ) -> Result<String, String> {
        use unipeer_apps::primes::{MAX_END, MAX_SPAN};
        let tasks = u32::try_from(tasks).unwrap_or(u32::MAX);
        let ranges =
            unipeer_node::diag_command::split_range(start, end, tasks).ok_or_else(|| {
                String::from("usage: job-primes START END TASKS (START < END, 1..=256 tasks)")
            })?;
        if end > MAX_END || ranges.iter().any(|(a, b)| b - a > MAX_SPAN) {
            return Err(alloc::format!(
                "job-primes counts below {MAX_END} with at most {MAX_SPAN} numbers a task"
            ));
        }
        let list: Vec<_> = ranges
            .into_iter()
            .map(|(a, b)| (unipeer_apps::primes::params(a, b), Vec::new()))
            .collect();
        self.diag_nonce = self.diag_nonce.wrapping_add(1);
        let nonce = now_us ^ (self.diag_nonce << 48);
        let n = list.len();
        let name = alloc::format!("diag-primes-{start}-{end}");
        let job = self.diag_submit(now_us, overlay, name, "primes", nonce, list)?;
        log::info!("jobs: diag submitted primes job {job} ({n} tasks over [{start}, {end}))");
        Ok(alloc::format!("job-primes job={job} tasks={n}\n"))
    }

    #[cfg(feature = "diag-test")]
    /// Submits a job made by a diagnostic command as user `diag`.
    fn diag_submit(
        &mut self,
        now_us: u64,
        overlay: &mut dyn OverlayAccess,
        name: String,
        app: &str,
        nonce: u64,
        tasks: Vec<(Vec<u8>, Vec<Vec<u8>>)>,
    ) -> Result<unipeer_node::jobs::record::JobId, String> {
        let s = unipeer_node::jobs::Submission {
            name,
            user: String::from("diag"),
            app: String::from(app),
            nonce,
            tasks,
            reducers: 0,
            exec_copies: 1,
            replication: 0,
        };
        let job = self
            .agent
            .submit(instant(now_us), &mut Dht(overlay.dht()), &s)
            .map_err(|e| alloc::format!("{e}"))?;
        self.counters.diag_submits += 1;
        self.last_busy_us = Some(now_us);
        Ok(job)
    }

    #[cfg(feature = "diag-test")]
    /// `job-sha256 TASKS` from the diagnostic port: TASKS tasks of the `sha256` app, each over
    /// one full-size (64 KiB) pseudo-random input chunk made here: a smoke test of big frames
    /// on the job channel (chunk uploads to their roots, executors' input fetches).
    fn submit_sha256(
        &mut self,
        now_us: u64,
        overlay: &mut dyn OverlayAccess,
        tasks: u64,
    ) -> Result<String, String> {
        if tasks == 0 || tasks > 16 {
            return Err(String::from("usage: job-sha256 TASKS (1..=16)"));
        }
        self.diag_nonce += 1;
        let nonce = now_us ^ (self.diag_nonce << 48);
        let mut list = Vec::new();
        for t in 0..tasks {
            let mut data = vec![0u8; unipeer_node::jobs::app::MAX_CHUNK_LEN];
            let mut block = [0u8; 32];
            for (i, piece) in data.chunks_mut(32).enumerate() {
                if i == 0 {
                    block = Sha256::digest([nonce.to_le_bytes(), t.to_le_bytes()].concat()).into();
                } else {
                    block = Sha256::digest(block).into();
                }
                piece.copy_from_slice(&block[..piece.len()]);
            }
            list.push((Vec::new(), vec![data]));
        }
        let name = alloc::format!("diag-sha256-{nonce:x}");
        let job = self.diag_submit(now_us, overlay, name, "sha256", nonce, list)?;
        log::info!("jobs: diag submitted sha256 job {job} ({tasks} tasks of 64 KiB)");
        Ok(alloc::format!("job-sha256 job={job} tasks={tasks}\n"))
    }

    /// `jobs tasks`: one line per task this node supervises (at most 256), with its state.
    fn tasks_text(&self, overlay: &mut dyn OverlayAccess) -> String {
        let overlay = overlay.dht();
        use unipeer_node::jobs::record::TaskState;
        let mut out = String::new();
        let mut after = None;
        let mut shown = 0;
        'scan: loop {
            let keys = overlay.record_keys_after(after, 64);
            let Some(&last) = keys.last() else {
                break;
            };
            after = Some(last);
            for k in keys {
                let Some((rec, tried)) = self.agent.supervision(k) else {
                    continue;
                };
                let state = match &rec.state {
                    TaskState::Pending => String::from("pending"),
                    TaskState::Running { leases, results } => {
                        let mut t = alloc::format!("running leases={}", leases.len());
                        for l in leases {
                            let a = l.executor.addr.ipv4;
                            let _ = write!(t, " {}.{}.{}.{}#{}", a[0], a[1], a[2], a[3], l.attempt);
                        }
                        let _ = write!(t, " results={}", results.len());
                        t
                    }
                    TaskState::Done { verified, .. } => alloc::format!("done verified={verified}"),
                    other => alloc::format!("{other:?}"),
                };
                let _ = writeln!(
                    out,
                    "task={k} job={} index={} app={} attempts={} tried={} state={state}",
                    rec.job,
                    rec.index,
                    rec.spec.app,
                    rec.attempts,
                    tried.len()
                );
                shown += 1;
                if shown >= 256 {
                    break 'scan;
                }
            }
        }
        out.push_str("end\n");
        out
    }

    /// `key=value` lines for the report and the `jobs` command (the client port's follow).
    fn status_text(&self) -> String {
        let a = self.agent.counters();
        let c = &self.channel.counters;
        let h = &self.counters;
        let mut out = String::with_capacity(1024);
        let _ = write!(
            out,
            "jobs=on\njobs_delegation={}\njobs_hello_timeouts={}\njobs_source_capped={}\njobs_apps={}\njobs_slots={}\njobs_running={}\njobs_supervising={}\n\
             jobs_adverts_heard={}\njobs_chunks={}\njobs_chunk_bytes={}\njobs_works_started={}\njobs_works_run={}\n\
             jobs_works_failed={}\njobs_work_queued={}\njobs_slices={}\njobs_work_us={}\njobs_work_max_us={}\n",
            if self.delegation { "on" } else { "off" },
            c.hello_timeouts,
            c.source_capped,
            AppsList(&self.apps),
            self.agent.slots(),
            self.agent.running(),
            self.agent.supervising(),
            self.agent.adverts_heard(),
            self.agent.chunks().len(),
            self.agent.chunks().bytes(),
            a.works_started,
            h.works_run,
            h.works_failed,
            self.work.len() + usize::from(self.current.is_some()),
            h.slices,
            h.work_us,
            h.work_max_us,
        );
        let _ = write!(
            out,
            "jobs_undecodable={}\njobs_bad_version={}\njobs_chunks_corrupt={}\njobs_chunks_refused={}\n\
             jobs_delegations_sent={}\njobs_delegations_accepted={}\njobs_delegations_refused={}\n\
             jobs_leases_expired={}\njobs_stale_reports={}\njobs_late_disagreements={}\n\
             jobs_records_unencodable={}\njobs_transmit_drops={}\njobs_event_drops={}\njobs_busy_drops={}\n\
             jobs_events_unclaimed={}\njobs_diag_submits={}\n",
            a.undecodable,
            a.bad_version,
            a.chunks_corrupt,
            a.chunks_refused,
            a.delegations_sent,
            a.delegations_accepted,
            a.delegations_refused,
            a.leases_expired,
            a.stale_reports,
            a.late_disagreements,
            a.records_unencodable,
            a.transmit_drops,
            a.event_drops,
            a.busy_drops,
            h.events_unclaimed,
            h.diag_submits,
        );
        let _ = write!(
            out,
            "jobch_out_conns={}\njobch_queued_frames={}\njobch_queued_bytes={}\n\
             jobch_frames_out={}\njobch_bytes_out={}\njobch_frames_in={}\njobch_bytes_in={}\n\
             jobch_connects={}\njobch_connect_failures={}\njobch_accepted={}\n\
             jobch_dropped_failed={}\njobch_dropped_full={}\njobch_dropped_no_session={}\n\
             jobch_bad_frames={}\njobch_refused={}\njobch_idle_closed={}\njobch_loopback={}\n",
            self.channel.outgoing.len(),
            self.channel.queued_frames(),
            self.channel.total_queued,
            c.frames_out,
            c.bytes_out,
            c.frames_in,
            c.bytes_in,
            c.connects,
            c.connect_failures,
            c.accepted,
            c.dropped_failed,
            c.dropped_full,
            c.dropped_no_session,
            c.bad_frames,
            c.refused,
            c.idle_closed,
            c.loopback,
        );
        out
    }

    /// A diagnostic command for the job host (`jobs tasks`, `job-primes`, `job-sha256`), as
    /// diag parsed it.
    fn command(
        &mut self,
        now_us: u64,
        overlay: &mut dyn OverlayAccess,
        command: &RoutedCommand,
    ) -> Result<String, String> {
        #[cfg(not(feature = "diag-test"))]
        let _ = now_us;
        match *command {
            RoutedCommand::JobsTasks => Ok(self.tasks_text(overlay)),
            #[cfg(feature = "diag-test")]
            RoutedCommand::JobSha256 { tasks } => {
                self.submit_sha256(now_us, overlay, u64::from(tasks))
            }
            #[cfg(feature = "diag-test")]
            RoutedCommand::JobPrimes { start, end, tasks } => {
                self.submit_primes(now_us, overlay, start, end, u64::from(tasks))
            }
            #[cfg(not(feature = "diag-test"))]
            RoutedCommand::JobSha256 { .. } | RoutedCommand::JobPrimes { .. } => {
                Err(String::from("a test helper"))
            }
            RoutedCommand::Overlay(_) | RoutedCommand::App(_) => {
                Err(String::from("not a job host command"))
            }
        }
    }

    /// What the client port asks of the agent.
    fn client_request(
        &mut self,
        now_us: u64,
        overlay: &mut dyn OverlayAccess,
        request: JobRequest,
    ) -> Option<JobReply> {
        let now = instant(now_us);
        self.last_busy_us = Some(now_us);
        let mut node = Dht(overlay.dht());
        Some(match request {
            JobRequest::StoreInput(data) => JobReply::Stored(self.agent.store_input(now, &data)),
            JobRequest::Submit { user, request } => JobReply::Submitted {
                result: self.agent.submit_stored(now, &mut node, &user, &request),
                tasks: request.tasks.len(),
                app: request.app,
            },
            JobRequest::Fetch(id) => {
                self.agent.fetch_chunk(now, &mut node, id);
                return None;
            }
            JobRequest::Cancel { job, tasks } => JobReply::Cancelled {
                job,
                asked: self.agent.cancel(now, &mut node, &tasks),
            },
            JobRequest::Capacity => JobReply::Capacity {
                apps: self.apps.names().map(String::from).collect(),
                slots: self.agent.slots(),
                running: self.agent.running(),
            },
        })
    }
}

impl Service for JobHost {
    fn name(&self) -> &'static str {
        "jobs"
    }

    fn poll(&mut self, cx: &mut Context<'_>) {
        let demand = cx.peers.demand();
        if let Some(overlay) = cx.peers.overlay() {
            self.service(cx.now_us, cx.stack, overlay, demand);
        }
    }

    /// The agent's transmits into the channel, its events onto the bus; channel output.
    fn flush(&mut self, cx: &mut Context<'_>) {
        self.drain(cx.now_us, &mut cx.outbox);
        let trust = cx.peers.overlay().and_then(|o| o.dht_and_keys().1);
        self.channel
            .pump_out(cx.now_us, cx.stack, trust, &mut self.rng);
    }

    fn handle(
        &mut self,
        cx: &mut Context<'_>,
        from: &'static str,
        event: ServiceEvent,
    ) -> Option<ServiceEvent> {
        let Some(overlay) = cx.peers.overlay() else {
            return Some(event);
        };
        match event {
            ServiceEvent::Overlay(e) => {
                let used = self.agent.handle_overlay_event(
                    instant(cx.now_us),
                    &mut Dht(overlay.dht()),
                    &e,
                );
                (!used).then_some(ServiceEvent::Overlay(e))
            }
            // Its own event, back after every other service passed on it.
            ServiceEvent::Job(e) => {
                self.log_event(e);
                None
            }
            // The overlay's commands are not its own.
            ServiceEvent::Command {
                session,
                command,
                operator,
            } if !matches!(command, RoutedCommand::Overlay(_) | RoutedCommand::App(_)) => {
                let (text, failed) = if !command.allowed(operator) {
                    (String::from(UNAUTHORIZED_REPLY), true)
                } else {
                    match self.command(cx.now_us, overlay, &command) {
                        Ok(text) => (text, false),
                        Err(e) => (alloc::format!("error: {e}\n"), true),
                    }
                };
                cx.outbox.reply(from, session, text, failed);
                None
            }
            ServiceEvent::JobRequest { session, request } => {
                if let Some(reply) = self.client_request(cx.now_us, overlay, request) {
                    cx.outbox
                        .send_to(from, ServiceEvent::JobReply { session, reply });
                }
                None
            }
            other => Some(other),
        }
    }

    fn next_deadline_us(&self, now_us: u64, _stack: &Stack) -> Option<u64> {
        self.next_deadline(now_us)
    }

    fn report(&self, out: &mut String) {
        out.push_str(&self.status_text());
    }

    fn log_summary(&self) {
        JobHost::log_summary(self);
    }
}

/// `a,b,c` of an app set.
struct AppsList<'a>(&'a AppSet);

impl core::fmt::Display for AppsList<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for (i, n) in self.0.names().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            f.write_str(n)?;
        }
        Ok(())
    }
}

/// The token authority of a node without trust material: it signs nothing anyone accepts and
/// accepts no token, so such a node neither delegates nor runs delegated tasks.
struct NoDelegation;

impl TokenAuthority for NoDelegation {
    fn sign(&self, _msg: &[u8]) -> Vec<u8> {
        Vec::new()
    }

    fn verify(&self, _signer: NodeId, _msg: &[u8], _sig: &[u8]) -> bool {
        false
    }
}
