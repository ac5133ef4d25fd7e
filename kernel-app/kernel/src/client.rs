//! The client port (TCP [`CLIENT_PORT`]): the Application Agent's way into the node
//! (`unipeer_node::jobs::client` has the protocol). Up to [`SESSIONS`] sessions, each closed
//! after [`IDLE_US`] of silence, each with one request in flight: while a request waits for
//! the overlay or the agent, the session's further frames stay in its socket.
//!
//! The first frame must be `Auth(Hello)`. With trust material the node answers with the user
//! authentication's Challenge, checks the Proof and from then on seals every frame both ways
//! with the session key (`Ready { authenticated: true }` is the first sealed frame). Without
//! trust material it answers `Ready { authenticated: false }` in the clear. When the signed
//! user list lets this node serve the user but it holds no credential, the node runs the
//! handshake through a neighbour that holds it (the overlay's `CredentialDelegator`): the
//! holder makes the peer proof over this node's transcript, this node sends the Challenge,
//! relays the user's Proof back, and only once it verifies there does the holder delegate the
//! credential (kept for a bounded time), with which this node finishes the handshake. Each
//! step waits at most [`CREDENTIAL_DEADLINE_US`]; a failure is an `Auth` error saying why.
//! Replies larger than the socket's buffer (a 64 KiB chunk) are streamed out as space frees.
//!
//! A [`Service`]: record gets go to the overlay through the loop's [`OverlayAccess`]; what needs
//! the job agent (store, submit, fetch, cancel, capacity) goes to the job host as a
//! [`JobRequest`] on the bus, and the answers (and the agent's events a session waits for) come
//! back the same way.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp;
use unipeer_node::auth::delegation::DelegationError;
use unipeer_node::auth::stream::{FrameReader, StreamRole, StreamSealer, frame};
use unipeer_node::auth::{
    Csprng, DelegationEvent, UserAuthError, UserAuthMessage, UserAuthResponder,
};
use unipeer_node::jobs::chunk::ChunkError;
use unipeer_node::jobs::client::{
    CLIENT_PORT, CLIENT_STREAM_CONTEXT, ClientErrorCode, ClientReply, ClientRequest,
    MAX_CLIENT_FRAME, RecordAnswer,
};
use unipeer_node::jobs::record::JobId;
use unipeer_node::jobs::{JobEvent, agent::SubmitError};
use unipeer_node::launch::LaunchConfig;
use unipeer_node::{Event, Instant, Key, NodeId, OpId};

use crate::net::Stack;
use crate::net::guard::{self, SourcePolicy};
use crate::service::{
    Context, Demand, JobReply, JobRequest, Outbox, OverlayAccess, Service, ServiceEvent,
};

/// Client sessions at once.
pub const SESSIONS: usize = 4;
/// A session silent (and with nothing in flight) this long is closed.
pub const IDLE_US: u64 = 60_000_000;
/// A submission's records must be stored within this.
pub const SUBMIT_DEADLINE_US: u64 = 120_000_000;
/// Record gets answer within this (the rest are `Failed`).
pub const RECORDS_DEADLINE_US: u64 = 20_000_000;
/// A fetched chunk must arrive within this.
pub const FETCH_DEADLINE_US: u64 = 30_000_000;
/// The job host answers a request within this (it does at once, in the same pass, unless the
/// loop's event bus dropped the request).
pub const HOST_DEADLINE_US: u64 = 5_000_000;
/// Each relayed step of a handshake (the holder's proof, its grant) ends within this (the
/// delegator gives up sooner, after `DELEGATION_TIMEOUT_MS`; this bounds the session if it
/// never answers).
pub const CREDENTIAL_DEADLINE_US: u64 =
    (unipeer_node::auth::delegation::DELEGATION_TIMEOUT_MS + 2_000) * 1_000;
const RX_BUF: usize = 16 * 1024;
const TX_BUF: usize = 16 * 1024;

#[derive(Default, Clone, Copy)]
pub struct ClientCounters {
    pub sessions: u64,
    pub authenticated: u64,
    pub auth_failures: u64,
    pub requests: u64,
    pub errors: u64,
    /// Frames that did not decode or open (their session closed).
    pub bad_frames: u64,
    pub idle_closed: u64,
    pub timeouts: u64,
    /// Hellos relayed to a credential's holder (this node held no credential).
    pub credential_waits: u64,
    /// Of these, authenticated once the holder verified the user's proof and delegated.
    pub credential_obtained: u64,
    /// Of these, refused (the neighbours refused, or time ran out).
    pub credential_failed: u64,
    /// Sessions closed for a Hello/Proof not complete within `guard::HELLO_DEADLINE_US`.
    pub hello_timeouts: u64,
    /// Connections refused because their source held its share of the sessions.
    pub source_capped: u64,
}

enum Phase {
    AwaitHello,
    AwaitProof(UserAuthResponder),
    /// No credential here: delegation request `id` waits for a holder's peer proof.
    AwaitCredential {
        responder: UserAuthResponder,
        id: u64,
        deadline_us: u64,
    },
    /// The Challenge (with the holder's proof) went out; the user's Proof is awaited.
    AwaitRelayedProof {
        responder: UserAuthResponder,
        id: u64,
    },
    /// The user's Proof went to the holder; its grant is awaited.
    AwaitGrant {
        responder: UserAuthResponder,
        id: u64,
        proof: UserAuthMessage,
        deadline_us: u64,
    },
    Ready,
    /// Closes once the last reply has gone.
    Closing,
}

/// `Phase` without its data, to match on beside a request.
#[derive(Clone, Copy)]
enum P {
    Hello,
    Proof,
    Credential,
    RelayedProof,
    Ready,
    Closing,
}

enum Pending {
    Submit {
        job: JobId,
        deadline_us: u64,
    },
    Records {
        keys: Vec<(Key, Option<OpId>, Option<RecordAnswer>)>,
        deadline_us: u64,
    },
    Fetch {
        id: Key,
        deadline_us: u64,
    },
    /// Asked the job host; its `JobReply` follows.
    Host {
        deadline_us: u64,
    },
}

impl Pending {
    fn deadline_us(&self) -> u64 {
        match self {
            Pending::Submit { deadline_us, .. }
            | Pending::Records { deadline_us, .. }
            | Pending::Fetch { deadline_us, .. }
            | Pending::Host { deadline_us } => *deadline_us,
        }
    }
}

struct Session {
    handle: SocketHandle,
    reader: FrameReader,
    phase: Phase,
    sealer: Option<StreamSealer>,
    user: String,
    pending: Option<Pending>,
    out: Vec<u8>,
    out_offset: usize,
    active: bool,
    last_activity_us: u64,
    /// When the connection was accepted.
    since_us: u64,
}

impl Session {
    fn reset(&mut self) {
        self.reader = FrameReader::new(MAX_CLIENT_FRAME);
        self.phase = Phase::AwaitHello;
        self.sealer = None;
        self.user.clear();
        self.pending = None;
        self.out = Vec::new();
        self.out_offset = 0;
        self.active = false;
    }

    /// Queues a reply (sealed once the session is).
    fn reply(&mut self, r: &ClientReply) {
        let body = r.encode();
        let body = match self.sealer.as_mut() {
            Some(s) => match s.seal(&body) {
                Ok(b) => b,
                Err(_) => {
                    self.phase = Phase::Closing;
                    return;
                }
            },
            None => body,
        };
        if self.out_offset == self.out.len() {
            self.out.clear();
            self.out_offset = 0;
        }
        self.out.extend_from_slice(&frame(&body));
    }

    fn error(&mut self, code: ClientErrorCode, text: &str) {
        self.reply(&ClientReply::Error {
            code,
            text: String::from(text),
        });
    }
}

pub struct ClientPort {
    sessions: Vec<Session>,
    /// Users authenticate (trust material present); the user list and credentials are the
    /// overlay's delegator's.
    trust: bool,
    node: NodeId,
    server: String,
    /// A session can take its next request (bytes already in its socket): pass again at once.
    wake_now: bool,
    /// Nonces of the user authentication (`None` only while a pass borrows it).
    rng: Option<Csprng>,
    pub counters: ClientCounters,
    policy: SourcePolicy,
}

fn instant(now_us: u64) -> Instant {
    Instant::from_micros(now_us)
}

impl ClientPort {
    /// `entropy` is mixed into the seed of the nonces (RDRAND output where the CPU has it).
    pub fn new(
        stack: &mut Stack,
        config: &LaunchConfig,
        overlay: &mut dyn OverlayAccess,
        entropy: &[u8],
    ) -> ClientPort {
        let mut seed_input = Vec::with_capacity(64 + entropy.len());
        seed_input.extend_from_slice(&config.rng_seed);
        seed_input.extend_from_slice(b"unipeer client port");
        seed_input.extend_from_slice(entropy);
        let seed: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(&seed_input).into();
        let sessions = (0..SESSIONS)
            .map(|_| Session {
                handle: stack.sockets.add(tcp::Socket::new(
                    tcp::SocketBuffer::new(vec![0; RX_BUF]),
                    tcp::SocketBuffer::new(vec![0; TX_BUF]),
                )),
                reader: FrameReader::new(MAX_CLIENT_FRAME),
                phase: Phase::AwaitHello,
                sealer: None,
                user: String::new(),
                pending: None,
                out: Vec::new(),
                out_offset: 0,
                active: false,
                last_activity_us: 0,
                since_us: 0,
            })
            .collect();
        let mut port = ClientPort {
            sessions,
            trust: overlay.trusted(),
            node: overlay.node_id(),
            server: config.server_id.clone(),
            wake_now: false,
            rng: Some(Csprng::from_seed(seed)),
            counters: ClientCounters::default(),
            policy: SourcePolicy::new(config),
        };
        port.relisten(stack);
        port
    }

    fn relisten(&mut self, stack: &mut Stack) {
        for s in &mut self.sessions {
            let socket = stack.sockets.get_mut::<tcp::Socket>(s.handle);
            if socket.state() == tcp::State::Closed {
                s.reset();
                let _ = socket.listen(CLIENT_PORT);
            }
        }
    }

    /// Claims the overlay's answers to the sessions' record gets.
    pub fn on_overlay_event(&mut self, e: &Event) -> bool {
        let (op, answer) = match e {
            Event::GetDone { op, value, .. } => (
                *op,
                match value {
                    Some(v) => RecordAnswer::Value(v.clone()),
                    None => RecordAnswer::Absent,
                },
            ),
            Event::RequestFailed { op, .. } => (*op, RecordAnswer::Failed),
            _ => return false,
        };
        for s in &mut self.sessions {
            if let Some(Pending::Records { keys, .. }) = s.pending.as_mut()
                && let Some(k) = keys.iter_mut().find(|k| k.1 == Some(op) && k.2.is_none())
            {
                k.2 = Some(answer);
                return true;
            }
        }
        false
    }

    /// Claims the agent's events a session waits for; gives back the others.
    pub fn on_job_event(&mut self, e: JobEvent) -> Option<JobEvent> {
        for s in &mut self.sessions {
            match (&s.pending, &e) {
                (Some(Pending::Submit { job, .. }), JobEvent::Submitted { job: j }) if job == j => {
                    let job = *job;
                    s.pending = None;
                    s.reply(&ClientReply::Submitted { job });
                    return None;
                }
                (Some(Pending::Fetch { id, .. }), JobEvent::ChunkFetched { id: i, .. })
                    if id == i =>
                {
                    s.pending = None;
                    if let JobEvent::ChunkFetched { id, data } = e {
                        s.reply(&ClientReply::Chunk { id, data });
                    }
                    return None;
                }
                _ => {}
            }
        }
        Some(e)
    }

    /// Reads requests, answers what can be answered, completes and times out pending ones.
    /// (Credential requests the sessions started go out with the overlay's flush, in this
    /// pass.)
    fn service(
        &mut self,
        now_us: u64,
        stack: &mut Stack,
        overlay: &mut dyn OverlayAccess,
        outbox: &mut Outbox<'_>,
        rng: &mut Csprng,
    ) {
        // Sockets closed in an earlier pass listen again; one aborted in this pass keeps its
        // endpoint until the stack has sent its RST (listen() would forget it).
        self.relisten(stack);
        self.on_delegation_events(now_us, overlay);
        for i in 0..self.sessions.len() {
            self.service_session(i, now_us, stack, overlay, outbox, rng);
        }
    }

    /// Moves relayed handshakes on: a holder's proof becomes the Challenge, a grant finishes
    /// the handshake, a failure closes the session with the reason.
    fn on_delegation_events(&mut self, now_us: u64, overlay: &mut dyn OverlayAccess) {
        let Some(del) = overlay.delegator() else {
            return;
        };
        let now = instant(now_us);
        while let Some(e) = del.poll_event() {
            let id = match &e {
                DelegationEvent::Proved { id, .. }
                | DelegationEvent::Obtained { id, .. }
                | DelegationEvent::Failed { id, .. } => *id,
            };
            let Some(s) = self.sessions.iter_mut().find(|s| match &s.phase {
                Phase::AwaitCredential { id: i, .. }
                | Phase::AwaitRelayedProof { id: i, .. }
                | Phase::AwaitGrant { id: i, .. } => *i == id && s.active,
                _ => false,
            }) else {
                // Its session went away meanwhile.
                del.cancel(id);
                continue;
            };
            s.last_activity_us = now_us;
            let phase = core::mem::replace(&mut s.phase, Phase::Closing);
            match (e, phase) {
                (
                    DelegationEvent::Proved { proof, .. },
                    Phase::AwaitCredential { responder, .. },
                ) => {
                    s.reply(&ClientReply::Auth(responder.challenge(proof)));
                    s.phase = Phase::AwaitRelayedProof { responder, id };
                }
                (
                    DelegationEvent::Obtained { user, from, .. },
                    Phase::AwaitGrant {
                        responder, proof, ..
                    },
                ) => {
                    log::info!(
                        "client: credential of {user} delegated by {from} after the user's proof"
                    );
                    let key = match del.credential(now, &user) {
                        Some(c) => responder
                            .with_credential(c)
                            .and_then(|r| r.on_proof(&proof)),
                        None => Err(UserAuthError::NeedCredential),
                    };
                    match key {
                        Ok(key) => {
                            self.counters.credential_obtained += 1;
                            self.counters.authenticated += 1;
                            s.sealer = Some(StreamSealer::new(
                                &key,
                                CLIENT_STREAM_CONTEXT,
                                StreamRole::Responder,
                            ));
                            s.phase = Phase::Ready;
                            log::info!("client: user {} authenticated", s.user);
                            s.reply(&ClientReply::Ready {
                                node: self.node,
                                authenticated: true,
                            });
                        }
                        Err(err) => {
                            self.counters.credential_failed += 1;
                            self.counters.auth_failures += 1;
                            s.error(ClientErrorCode::Auth, auth_error_text(err));
                        }
                    }
                }
                (DelegationEvent::Failed { user, why, .. }, _) => {
                    log::info!("client: credential of {user} not delegated: {why}");
                    self.counters.credential_failed += 1;
                    self.counters.auth_failures += 1;
                    s.error(
                        ClientErrorCode::Auth,
                        &alloc::format!(
                            "this node holds no credential for {user} and could not obtain \
                             it by delegation: {why}"
                        ),
                    );
                }
                // An event out of step with the session (not sent by the delegator).
                (_, phase) => s.phase = phase,
            }
        }
    }

    fn service_session(
        &mut self,
        i: usize,
        now_us: u64,
        stack: &mut Stack,
        overlay: &mut dyn OverlayAccess,
        outbox: &mut Outbox<'_>,
        rng: &mut Csprng,
    ) {
        let handle = self.sessions[i].handle;
        let state = stack.sockets.get::<tcp::Socket>(handle).state();
        if matches!(
            state,
            tcp::State::Listen | tcp::State::SynReceived | tcp::State::Closed
        ) {
            return;
        }
        if !self.sessions[i].active {
            let source = stack
                .sockets
                .get::<tcp::Socket>(handle)
                .remote_endpoint()
                .map(|e| e.addr);
            if let Some(source) = source {
                let held = guard::remote_addrs(
                    &stack.sockets,
                    self.sessions.iter().filter(|s| s.active).map(|s| s.handle),
                );
                if self
                    .policy
                    .over_cap(source, held, guard::CLIENT_SLOTS_PER_SOURCE)
                {
                    self.counters.source_capped += 1;
                    stack.sockets.get_mut::<tcp::Socket>(handle).abort();
                    return;
                }
            }
            self.sessions[i].active = true;
            self.sessions[i].last_activity_us = now_us;
            self.sessions[i].since_us = now_us;
            self.counters.sessions += 1;
        }
        if matches!(
            self.sessions[i].phase,
            Phase::AwaitHello | Phase::AwaitProof(_) | Phase::AwaitRelayedProof { .. }
        ) && now_us.saturating_sub(self.sessions[i].since_us) > guard::HELLO_DEADLINE_US
        {
            // The handshake must finish within the deadline: the slot is freed.
            self.counters.hello_timeouts += 1;
            stack.sockets.get_mut::<tcp::Socket>(handle).abort();
            return;
        }
        // Pending request: complete (records) or time out.
        self.check_pending(i, now_us);
        let mut bad = false;
        // One request at a time: read only while nothing is pending or queued to go out.
        while self.sessions[i].pending.is_none()
            && matches!(
                self.sessions[i].phase,
                Phase::AwaitHello
                    | Phase::AwaitProof(_)
                    | Phase::AwaitRelayedProof { .. }
                    | Phase::Ready
            )
            && self.sessions[i].out_offset == self.sessions[i].out.len()
        {
            let s = &mut self.sessions[i];
            let socket = stack.sockets.get_mut::<tcp::Socket>(handle);
            let body = match s.reader.next_frame() {
                Ok(Some(b)) => b,
                Ok(None) => {
                    if !socket.can_recv() {
                        break;
                    }
                    let mut buf = [0u8; 2048];
                    let want = s.reader.wants().min(buf.len());
                    let n = socket.recv_slice(&mut buf[..want]).unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    s.last_activity_us = now_us;
                    s.reader.push(&buf[..n]);
                    continue;
                }
                Err(_) => {
                    bad = true;
                    break;
                }
            };
            let mut body = body;
            let len = match s.sealer.as_mut() {
                Some(sealer) => match sealer.open(&mut body) {
                    Ok(n) => n,
                    Err(_) => {
                        bad = true;
                        break;
                    }
                },
                None => body.len(),
            };
            let Ok(req) = ClientRequest::decode(&body[..len]) else {
                bad = true;
                break;
            };
            self.counters.requests += 1;
            self.request(i, now_us, req, overlay, outbox, rng);
        }
        let s = &mut self.sessions[i];
        let socket = stack.sockets.get_mut::<tcp::Socket>(handle);
        if bad {
            self.counters.bad_frames += 1;
            socket.abort();
            return;
        }
        if s.pending.is_none()
            && s.out_offset == s.out.len()
            && now_us.saturating_sub(s.last_activity_us) > IDLE_US
        {
            self.counters.idle_closed += 1;
            socket.abort();
        } else if !socket.may_recv() && state == tcp::State::CloseWait && s.pending.is_none() {
            s.phase = Phase::Closing;
        }
    }

    fn check_pending(&mut self, i: usize, now_us: u64) {
        let s = &mut self.sessions[i];
        if let Phase::AwaitCredential { deadline_us, .. } | Phase::AwaitGrant { deadline_us, .. } =
            s.phase
            && now_us >= deadline_us
        {
            self.counters.credential_failed += 1;
            self.counters.auth_failures += 1;
            self.counters.timeouts += 1;
            s.error(
                ClientErrorCode::Auth,
                "this node holds no credential for the user and no neighbour answered in time",
            );
            s.phase = Phase::Closing;
            s.last_activity_us = now_us;
            return;
        }
        let Some(p) = s.pending.as_mut() else {
            return;
        };
        let late = now_us >= p.deadline_us();
        match p {
            Pending::Records { keys, .. } if late || keys.iter().all(|k| k.2.is_some()) => {
                let answers = keys
                    .iter_mut()
                    .map(|k| (k.0, k.2.take().unwrap_or(RecordAnswer::Failed)))
                    .collect();
                if late {
                    self.counters.timeouts += 1;
                }
                s.pending = None;
                s.reply(&ClientReply::Records(answers));
                s.last_activity_us = now_us;
            }
            Pending::Submit { .. } | Pending::Fetch { .. } | Pending::Host { .. } if late => {
                let what = match p {
                    Pending::Submit { .. } => "job records not all stored in time",
                    Pending::Fetch { .. } => "chunk did not arrive in time",
                    _ => "the job host did not answer in time",
                };
                s.pending = None;
                self.counters.timeouts += 1;
                s.error(ClientErrorCode::Timeout, what);
                s.last_activity_us = now_us;
            }
            _ => {}
        }
    }

    fn request(
        &mut self,
        i: usize,
        now_us: u64,
        req: ClientRequest,
        overlay: &mut dyn OverlayAccess,
        outbox: &mut Outbox<'_>,
        rng: &mut Csprng,
    ) {
        let now = instant(now_us);
        let node = self.node;
        let s = &mut self.sessions[i];
        let phase = match s.phase {
            Phase::AwaitHello => P::Hello,
            Phase::AwaitProof(_) => P::Proof,
            Phase::AwaitCredential { .. } | Phase::AwaitGrant { .. } => P::Credential,
            Phase::AwaitRelayedProof { .. } => P::RelayedProof,
            Phase::Ready => P::Ready,
            Phase::Closing => P::Closing,
        };
        match (phase, req) {
            (P::Hello, ClientRequest::Auth(hello @ UserAuthMessage::Hello { .. })) => {
                if let UserAuthMessage::Hello { user, .. } = &hello {
                    s.user = user.clone();
                }
                if !self.trust {
                    s.phase = Phase::Ready;
                    s.reply(&ClientReply::Ready {
                        node,
                        authenticated: false,
                    });
                    return;
                }
                let Some(del) = overlay.delegator() else {
                    self.counters.auth_failures += 1;
                    s.error(
                        ClientErrorCode::Auth,
                        "this node's launch config carries no user list",
                    );
                    s.phase = Phase::Closing;
                    return;
                };
                rng.mix(&crate::arch::cpu::rdtsc().to_le_bytes());
                let nonce = rng.bytes32();
                let ephemeral = rng.bytes32();
                let user = s.user.clone();
                let answer = UserAuthResponder::on_hello(
                    &hello,
                    node,
                    &self.server,
                    del.users(),
                    del.credential(now, &user),
                    nonce,
                    ephemeral,
                );
                match answer {
                    Ok((responder, challenge)) => {
                        s.reply(&ClientReply::Auth(challenge));
                        s.phase = Phase::AwaitProof(responder);
                    }
                    Err(UserAuthError::NeedCredential) => {
                        // Run the handshake through a neighbour that holds the credential; it
                        // delegates only once the user's proof verifies there.
                        let started = UserAuthResponder::relayed(
                            &hello,
                            node,
                            &self.server,
                            del.users(),
                            nonce,
                            ephemeral,
                        )
                        .map_err(|e| String::from(auth_error_text(e)))
                        .and_then(|responder| {
                            let neighbours = overlay.delegation_neighbours();
                            let del = overlay.delegator().ok_or_else(String::new)?;
                            del.request(now, responder.transcript().clone(), &neighbours)
                                .map(|id| (responder, id))
                                .map_err(|e| alloc::format!("{e}"))
                        });
                        let s = &mut self.sessions[i];
                        match started {
                            Ok((responder, id)) => {
                                self.counters.credential_waits += 1;
                                log::info!(
                                    "client: no credential for {user}: relaying to the neighbours"
                                );
                                s.phase = Phase::AwaitCredential {
                                    responder,
                                    id,
                                    deadline_us: now_us + CREDENTIAL_DEADLINE_US,
                                };
                            }
                            Err(e) => {
                                self.counters.auth_failures += 1;
                                self.counters.credential_failed += 1;
                                s.error(
                                    ClientErrorCode::Auth,
                                    &alloc::format!(
                                        "this node holds no credential for {user} and cannot \
                                         ask for it: {e}"
                                    ),
                                );
                                s.phase = Phase::Closing;
                            }
                        }
                    }
                    Err(e) => {
                        self.counters.auth_failures += 1;
                        s.error(ClientErrorCode::Auth, auth_error_text(e));
                        s.phase = Phase::Closing;
                    }
                }
            }
            (
                P::RelayedProof,
                ClientRequest::Auth(proof_msg @ UserAuthMessage::Proof { proof }),
            ) => {
                let Phase::AwaitRelayedProof { responder, id } =
                    core::mem::replace(&mut s.phase, Phase::Closing)
                else {
                    return;
                };
                let verified = match overlay.delegator() {
                    Some(del) => del.verify(now, id, proof),
                    None => Err(DelegationError::NoSuchRequest),
                };
                let s = &mut self.sessions[i];
                match verified {
                    Ok(()) => {
                        s.phase = Phase::AwaitGrant {
                            responder,
                            id,
                            proof: proof_msg,
                            deadline_us: now_us + CREDENTIAL_DEADLINE_US,
                        };
                    }
                    Err(e) => {
                        self.counters.auth_failures += 1;
                        self.counters.credential_failed += 1;
                        s.error(
                            ClientErrorCode::Auth,
                            &alloc::format!("the credential's holder is gone: {e}"),
                        );
                    }
                }
            }
            (P::Proof, ClientRequest::Auth(proof @ UserAuthMessage::Proof { .. })) => {
                let Phase::AwaitProof(responder) = core::mem::replace(&mut s.phase, Phase::Ready)
                else {
                    return;
                };
                match responder.on_proof(&proof) {
                    Ok(key) => {
                        s.sealer = Some(StreamSealer::new(
                            &key,
                            CLIENT_STREAM_CONTEXT,
                            StreamRole::Responder,
                        ));
                        self.counters.authenticated += 1;
                        log::info!("client: user {} authenticated", s.user);
                        s.reply(&ClientReply::Ready {
                            node,
                            authenticated: true,
                        });
                    }
                    Err(e) => {
                        self.counters.auth_failures += 1;
                        s.error(ClientErrorCode::Auth, auth_error_text(e));
                        s.phase = Phase::Closing;
                    }
                }
            }
            (P::Ready, ClientRequest::Auth(_)) | (P::Hello | P::Proof | P::RelayedProof, _) => {
                self.counters.auth_failures += 1;
                s.error(
                    ClientErrorCode::Auth,
                    "authenticate first (Hello, then Proof)",
                );
                s.phase = Phase::Closing;
            }
            (P::Ready, ClientRequest::PutChunk { data }) => {
                s.pending = Some(Pending::Host {
                    deadline_us: now_us + HOST_DEADLINE_US,
                });
                outbox.post(ServiceEvent::JobRequest {
                    session: i,
                    request: JobRequest::StoreInput(data),
                });
            }
            (P::Ready, ClientRequest::Submit(req)) => {
                let user = if s.user.is_empty() {
                    "anonymous"
                } else {
                    s.user.as_str()
                };
                let request = JobRequest::Submit {
                    user: String::from(user),
                    request: req,
                };
                s.pending = Some(Pending::Host {
                    deadline_us: now_us + HOST_DEADLINE_US,
                });
                outbox.post(ServiceEvent::JobRequest {
                    session: i,
                    request,
                });
            }
            (P::Ready, ClientRequest::Records { keys }) => {
                let keys = keys
                    .into_iter()
                    .map(|k| match overlay.dht().get(now, k) {
                        Ok(op) => (k, Some(op), None),
                        Err(_) => (k, None, Some(RecordAnswer::Failed)),
                    })
                    .collect();
                s.pending = Some(Pending::Records {
                    keys,
                    deadline_us: now_us + RECORDS_DEADLINE_US,
                });
                self.check_pending(i, now_us);
            }
            (P::Ready, ClientRequest::Fetch { id }) => {
                s.pending = Some(Pending::Fetch {
                    id,
                    deadline_us: now_us + FETCH_DEADLINE_US,
                });
                outbox.post(ServiceEvent::JobRequest {
                    session: i,
                    request: JobRequest::Fetch(id),
                });
            }
            (P::Ready, ClientRequest::Cancel { job, tasks }) => {
                s.pending = Some(Pending::Host {
                    deadline_us: now_us + HOST_DEADLINE_US,
                });
                outbox.post(ServiceEvent::JobRequest {
                    session: i,
                    request: JobRequest::Cancel { job, tasks },
                });
            }
            (P::Ready, ClientRequest::Ping) => {
                s.pending = Some(Pending::Host {
                    deadline_us: now_us + HOST_DEADLINE_US,
                });
                outbox.post(ServiceEvent::JobRequest {
                    session: i,
                    request: JobRequest::Capacity,
                });
            }
            (P::Closing | P::Credential, _) => {}
        }
    }

    /// The job host's answer to session `i`'s request.
    fn on_job_reply(
        &mut self,
        i: usize,
        now_us: u64,
        reply: JobReply,
        overlay: &mut dyn OverlayAccess,
    ) {
        let node = self.node;
        let Some(s) = self.sessions.get_mut(i) else {
            return;
        };
        // Late (timed out) or for a session since closed: dropped.
        if !matches!(s.pending, Some(Pending::Host { .. })) {
            return;
        }
        s.pending = None;
        match reply {
            JobReply::Stored(Ok(id)) => s.reply(&ClientReply::ChunkStored { id }),
            JobReply::Stored(Err(ChunkError::Full)) => {
                self.counters.errors += 1;
                s.error(ClientErrorCode::Busy, "chunk store full; try again later")
            }
            JobReply::Stored(Err(e)) => {
                self.counters.errors += 1;
                s.error(
                    ClientErrorCode::OutOfBounds,
                    &alloc::format!("chunk refused: {e:?}"),
                )
            }
            JobReply::Submitted {
                result: Ok(job),
                tasks,
                app,
            } => {
                let user = if s.user.is_empty() {
                    "anonymous"
                } else {
                    s.user.as_str()
                };
                log::info!("client: job {job} ({tasks} tasks of {app}) submitted by {user}");
                s.pending = Some(Pending::Submit {
                    job,
                    deadline_us: now_us + SUBMIT_DEADLINE_US,
                });
            }
            JobReply::Submitted { result: Err(e), .. } => {
                self.counters.errors += 1;
                let code = match e {
                    SubmitError::NotJoined => ClientErrorCode::NotJoined,
                    SubmitError::Busy => ClientErrorCode::Busy,
                    SubmitError::OutOfBounds | SubmitError::MissingInput => {
                        ClientErrorCode::OutOfBounds
                    }
                };
                s.error(code, &alloc::format!("{e}"));
            }
            JobReply::Cancelled { job, asked } => {
                log::info!("client: cancel of {asked} task(s) of job {job}");
                s.reply(&ClientReply::Cancelled {
                    job,
                    tasks: asked.min(usize::from(u16::MAX)) as u16,
                });
            }
            JobReply::Capacity {
                apps,
                slots,
                running,
            } => s.reply(&ClientReply::Pong {
                node,
                joined: overlay.dht().is_joined(),
                apps,
                slots,
                running: running.min(255) as u8,
            }),
        }
    }

    /// Streams queued replies into the sockets; closes sessions that are done.
    fn flush(&mut self, now_us: u64, stack: &mut Stack) {
        self.wake_now = false;
        for s in &mut self.sessions {
            if !s.active {
                continue;
            }
            let socket = stack.sockets.get_mut::<tcp::Socket>(s.handle);
            while s.out_offset < s.out.len() && socket.can_send() {
                match socket.send_slice(&s.out[s.out_offset..]) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        s.out_offset += n;
                        s.last_activity_us = now_us;
                    }
                }
            }
            if s.out_offset == s.out.len() && !s.out.is_empty() {
                s.out = Vec::new();
                s.out_offset = 0;
            }
            let readable = socket.can_recv();
            if readable && s.pending.is_none() && s.out.is_empty() {
                self.wake_now |= !matches!(
                    s.phase,
                    Phase::Closing | Phase::AwaitCredential { .. } | Phase::AwaitGrant { .. }
                );
            }
            if matches!(s.phase, Phase::Closing)
                && s.out.is_empty()
                && !matches!(
                    socket.state(),
                    tcp::State::FinWait1
                        | tcp::State::FinWait2
                        | tcp::State::Closing
                        | tcp::State::LastAck
                        | tcp::State::TimeWait
                        | tcp::State::Closed
                )
            {
                socket.close();
            }
        }
    }

    fn next_deadline(&self, now_us: u64) -> Option<u64> {
        let wake = self.wake_now.then_some(now_us);
        self.sessions
            .iter()
            .filter(|s| s.active)
            .map(|s| match (&s.pending, &s.phase) {
                (Some(p), _) => p.deadline_us(),
                (None, Phase::AwaitCredential { deadline_us, .. })
                | (None, Phase::AwaitGrant { deadline_us, .. }) => *deadline_us,
                (
                    None,
                    Phase::AwaitHello | Phase::AwaitProof(_) | Phase::AwaitRelayedProof { .. },
                ) => s.since_us + guard::HELLO_DEADLINE_US + 1,
                (None, _) => s.last_activity_us + IDLE_US + 1,
            })
            .chain(wake)
            .min()
    }

    /// Whether a session waits for the overlay or the agent.
    fn has_pending(&self) -> bool {
        self.sessions.iter().any(|s| s.pending.is_some())
    }

    fn status_text(&self) -> String {
        let c = &self.counters;
        alloc::format!(
            "client_active={}\nclient_sessions={}\nclient_authenticated={}\nclient_auth_failures={}\n\
             client_requests={}\nclient_errors={}\nclient_bad_frames={}\nclient_idle_closed={}\nclient_timeouts={}\n\
             client_credential_waits={}\nclient_credential_obtained={}\nclient_credential_failed={}\n\
             client_hello_timeouts={}\nclient_source_capped={}\n",
            self.sessions.iter().filter(|s| s.active).count(),
            c.sessions,
            c.authenticated,
            c.auth_failures,
            c.requests,
            c.errors,
            c.bad_frames,
            c.idle_closed,
            c.timeouts,
            c.credential_waits,
            c.credential_obtained,
            c.credential_failed,
            c.hello_timeouts,
            c.source_capped,
        )
    }
}

fn auth_error_text(e: UserAuthError) -> &'static str {
    match e {
        UserAuthError::UnknownUser => "unknown user",
        UserAuthError::NotAllowed => "user not allowed on this node",
        UserAuthError::NeedCredential => "this node does not hold the user's credential",
        UserAuthError::BadProof => "proof does not verify",
        UserAuthError::BadEphemeral => "ephemeral key is not a usable X25519 public key",
        UserAuthError::Unexpected => "unexpected authentication message",
    }
}

impl Service for ClientPort {
    fn name(&self) -> &'static str {
        "client"
    }

    fn poll(&mut self, cx: &mut Context<'_>) {
        let Some(overlay) = cx.peers.overlay() else {
            return;
        };
        let Some(mut rng) = self.rng.take() else {
            return;
        };
        self.service(cx.now_us, cx.stack, overlay, &mut cx.outbox, &mut rng);
        self.rng = Some(rng);
    }

    fn flush(&mut self, cx: &mut Context<'_>) {
        self.flush(cx.now_us, cx.stack);
    }

    fn handle(
        &mut self,
        cx: &mut Context<'_>,
        _from: &'static str,
        event: ServiceEvent,
    ) -> Option<ServiceEvent> {
        match event {
            ServiceEvent::Overlay(e) => {
                (!self.on_overlay_event(&e)).then_some(ServiceEvent::Overlay(e))
            }
            ServiceEvent::Job(e) => self.on_job_event(e).map(ServiceEvent::Job),
            ServiceEvent::JobReply { session, reply } => {
                if let Some(overlay) = cx.peers.overlay() {
                    self.on_job_reply(session, cx.now_us, reply, overlay);
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

    fn demand(&self) -> Demand {
        Demand {
            requests: self.counters.requests,
            waiting: self.has_pending(),
        }
    }
}
