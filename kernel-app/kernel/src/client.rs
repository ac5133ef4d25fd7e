//! The client port (TCP [`CLIENT_PORT`]): the Application Agent's way into the node
//! (`unipeer_node::jobs::client` has the protocol). Up to [`SESSIONS`] sessions, each closed
//! after [`IDLE_US`] of silence, each with one request in flight: while a request waits for
//! the overlay or the agent, the session's further frames stay in its socket.
//!
//! The first frame must be `Auth(Hello)`. With trust material the node answers with the user
//! authentication's Challenge, checks the Proof and from then on seals every frame both ways
//! with the session key (`Ready { authenticated: true }` is the first sealed frame). Without
//! trust material it answers `Ready { authenticated: false }` in the clear. When the signed
//! user list lets this node serve the user but it holds no credential, the session waits
//! (up to [`CREDENTIAL_DEADLINE_US`]) while the node asks its neighbours for it through the
//! overlay's `CredentialDelegator`; then it answers the Hello with the Challenge, or with an
//! `Auth` error saying why the credential could not be had. Replies larger than
//! the socket's buffer (a 64 KiB chunk) are streamed out as space frees.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp;
use unipeer_node::auth::stream::{FrameReader, StreamRole, StreamSealer, frame};
use unipeer_node::auth::{
    Csprng, DelegationEvent, UserAuthError, UserAuthMessage, UserAuthResponder,
};
use unipeer_node::jobs::JobAgent;
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
use crate::overlay::Overlay;

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
/// A Hello waiting for a delegated credential is answered within this (the delegator gives
/// up sooner, after `DELEGATION_TIMEOUT_MS`; this bounds the session if it never answers).
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
    /// Hellos that waited for a delegated credential.
    pub credential_waits: u64,
    /// Of these, answered with a Challenge once the credential came.
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
    /// The Hello waits for the user's credential from a neighbour.
    AwaitCredential {
        hello: UserAuthMessage,
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
}

impl Pending {
    fn deadline_us(&self) -> u64 {
        match self {
            Pending::Submit { deadline_us, .. }
            | Pending::Records { deadline_us, .. }
            | Pending::Fetch { deadline_us, .. } => *deadline_us,
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
    pub counters: ClientCounters,
    policy: SourcePolicy,
}

fn instant(now_us: u64) -> Instant {
    Instant::from_micros(now_us)
}

impl ClientPort {
    pub fn new(
        stack: &mut Stack,
        config: &LaunchConfig,
        overlay: &mut Overlay,
        _rng: &mut Csprng,
    ) -> ClientPort {
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
            trust: overlay.trust.is_some(),
            node: overlay.node.id(),
            server: config.server_id.clone(),
            wake_now: false,
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
    pub fn service(
        &mut self,
        now_us: u64,
        stack: &mut Stack,
        overlay: &mut Overlay,
        agent: &mut JobAgent,
        rng: &mut Csprng,
    ) {
        // Sockets closed in an earlier pass listen again; one aborted in this pass keeps its
        // endpoint until the stack has sent its RST (listen() would forget it).
        self.relisten(stack);
        self.on_delegation_events(now_us, overlay, rng);
        for i in 0..self.sessions.len() {
            self.service_session(i, now_us, stack, overlay, agent, rng);
        }
        // Credential requests the sessions started go out in this pass.
        overlay.pump_delegation(instant(now_us));
        overlay.send_trust(stack);
    }

    /// Answers the Hellos that waited for a credential the delegator obtained or gave up on.
    fn on_delegation_events(&mut self, now_us: u64, overlay: &mut Overlay, rng: &mut Csprng) {
        let Some(del) = overlay.delegator.as_mut() else {
            return;
        };
        while let Some(e) = del.poll_event() {
            let user = match &e {
                DelegationEvent::Obtained { user, .. } | DelegationEvent::Failed { user, .. } => {
                    user.clone()
                }
            };
            if let DelegationEvent::Obtained { from, .. } = &e {
                log::info!("client: credential of {user} obtained from {from}");
            }
            for s in &mut self.sessions {
                let Phase::AwaitCredential { hello, .. } = &s.phase else {
                    continue;
                };
                if s.user != user {
                    continue;
                }
                let hello = hello.clone();
                s.last_activity_us = now_us;
                match &e {
                    DelegationEvent::Obtained { .. } => {
                        rng.mix(&crate::arch::cpu::rdtsc().to_le_bytes());
                        match UserAuthResponder::on_hello(
                            &hello,
                            self.node,
                            &self.server,
                            del.users(),
                            del.credentials(),
                            rng.bytes32(),
                        ) {
                            Ok((responder, challenge)) => {
                                self.counters.credential_obtained += 1;
                                s.reply(&ClientReply::Auth(challenge));
                                s.phase = Phase::AwaitProof(responder);
                            }
                            Err(err) => {
                                self.counters.credential_failed += 1;
                                self.counters.auth_failures += 1;
                                s.error(ClientErrorCode::Auth, auth_error_text(err));
                                s.phase = Phase::Closing;
                            }
                        }
                    }
                    DelegationEvent::Failed { why, .. } => {
                        log::info!("client: credential of {user} not obtained: {why}");
                        self.counters.credential_failed += 1;
                        self.counters.auth_failures += 1;
                        s.error(
                            ClientErrorCode::Auth,
                            &alloc::format!(
                                "this node holds no credential for {user} and could not obtain \
                                 it by delegation: {why}"
                            ),
                        );
                        s.phase = Phase::Closing;
                    }
                }
            }
        }
    }

    fn service_session(
        &mut self,
        i: usize,
        now_us: u64,
        stack: &mut Stack,
        overlay: &mut Overlay,
        agent: &mut JobAgent,
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
                let held = self.sessions.iter().filter(|s| s.active).filter_map(|s| {
                    stack
                        .sockets
                        .get::<tcp::Socket>(s.handle)
                        .remote_endpoint()
                        .map(|e| e.addr)
                });
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
            Phase::AwaitHello | Phase::AwaitProof(_)
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
                Phase::AwaitHello | Phase::AwaitProof(_) | Phase::Ready
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
            self.request(i, now_us, req, overlay, agent, rng);
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
        if let Phase::AwaitCredential { deadline_us, .. } = s.phase
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
            Pending::Submit { .. } | Pending::Fetch { .. } if late => {
                let what = if matches!(p, Pending::Submit { .. }) {
                    "job records not all stored in time"
                } else {
                    "chunk did not arrive in time"
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
        overlay: &mut Overlay,
        agent: &mut JobAgent,
        rng: &mut Csprng,
    ) {
        let now = instant(now_us);
        let node = self.node;
        let s = &mut self.sessions[i];
        let phase = match s.phase {
            Phase::AwaitHello => P::Hello,
            Phase::AwaitProof(_) => P::Proof,
            Phase::AwaitCredential { .. } => P::Credential,
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
                let Some(del) = overlay.delegator.as_mut() else {
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
                match UserAuthResponder::on_hello(
                    &hello,
                    node,
                    &self.server,
                    del.users(),
                    del.credentials(),
                    nonce,
                ) {
                    Ok((responder, challenge)) => {
                        s.reply(&ClientReply::Auth(challenge));
                        s.phase = Phase::AwaitProof(responder);
                    }
                    Err(UserAuthError::NeedCredential) => {
                        let user = s.user.clone();
                        // One request per user: another session may already wait for it.
                        let asked = self.sessions.iter().any(|o| {
                            matches!(o.phase, Phase::AwaitCredential { .. }) && o.user == user
                        });
                        let started = if asked {
                            Ok(())
                        } else {
                            let neighbours = overlay.delegation_neighbours();
                            match overlay.delegator.as_mut() {
                                Some(del) => del.request(now, &user, &neighbours).map(|_| ()),
                                None => Ok(()),
                            }
                        };
                        let s = &mut self.sessions[i];
                        match started {
                            Ok(()) => {
                                self.counters.credential_waits += 1;
                                log::info!(
                                    "client: no credential for {user}: asking the neighbours"
                                );
                                s.phase = Phase::AwaitCredential {
                                    hello,
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
            (P::Ready, ClientRequest::Auth(_)) | (P::Hello | P::Proof, _) => {
                self.counters.auth_failures += 1;
                s.error(
                    ClientErrorCode::Auth,
                    "authenticate first (Hello, then Proof)",
                );
                s.phase = Phase::Closing;
            }
            (P::Ready, ClientRequest::PutChunk { data }) => match agent.store_input(now, &data) {
                Ok(id) => s.reply(&ClientReply::ChunkStored { id }),
                Err(ChunkError::Full) => {
                    self.counters.errors += 1;
                    s.error(ClientErrorCode::Busy, "chunk store full; try again later")
                }
                Err(e) => {
                    self.counters.errors += 1;
                    s.error(
                        ClientErrorCode::OutOfBounds,
                        &alloc::format!("chunk refused: {e:?}"),
                    )
                }
            },
            (P::Ready, ClientRequest::Submit(req)) => {
                let user = if s.user.is_empty() {
                    "anonymous"
                } else {
                    s.user.as_str()
                };
                match agent.submit_stored(now, &mut overlay.node, user, &req) {
                    Ok(job) => {
                        log::info!(
                            "client: job {job} ({} tasks of {}) submitted by {user}",
                            req.tasks.len(),
                            req.app
                        );
                        s.pending = Some(Pending::Submit {
                            job,
                            deadline_us: now_us + SUBMIT_DEADLINE_US,
                        });
                    }
                    Err(e) => {
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
                }
            }
            (P::Ready, ClientRequest::Records { keys }) => {
                let keys = keys
                    .into_iter()
                    .map(|k| match overlay.node.get(now, k) {
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
                agent.fetch_chunk(now, &mut overlay.node, id);
            }
            (P::Ready, ClientRequest::Cancel { job, tasks }) => {
                let n = agent.cancel(now, &mut overlay.node, &tasks);
                log::info!("client: cancel of {n} task(s) of job {job}");
                s.reply(&ClientReply::Cancelled {
                    job,
                    tasks: n.min(usize::from(u16::MAX)) as u16,
                });
            }
            (P::Ready, ClientRequest::Ping) => {
                s.reply(&ClientReply::Pong {
                    node,
                    joined: overlay.node.is_joined(),
                    apps: agent_app_names(agent),
                    slots: agent.slots(),
                    running: agent.running().min(255) as u8,
                });
            }
            (P::Closing | P::Credential, _) => {}
        }
    }

    /// Streams queued replies into the sockets; closes sessions that are done.
    pub fn flush(&mut self, now_us: u64, stack: &mut Stack) {
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
                self.wake_now |= !matches!(s.phase, Phase::Closing | Phase::AwaitCredential { .. });
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

    pub fn next_deadline_us(&self, now_us: u64) -> Option<u64> {
        let wake = self.wake_now.then_some(now_us);
        self.sessions
            .iter()
            .filter(|s| s.active)
            .map(|s| match (&s.pending, &s.phase) {
                (Some(p), _) => p.deadline_us(),
                (None, Phase::AwaitCredential { deadline_us, .. }) => *deadline_us,
                (None, Phase::AwaitHello | Phase::AwaitProof(_)) => {
                    s.since_us + guard::HELLO_DEADLINE_US + 1
                }
                (None, _) => s.last_activity_us + IDLE_US + 1,
            })
            .chain(wake)
            .min()
    }

    /// Whether a session waits for the overlay or the agent.
    pub fn has_pending(&self) -> bool {
        self.sessions.iter().any(|s| s.pending.is_some())
    }

    pub fn status_text(&self) -> String {
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

fn agent_app_names(agent: &JobAgent) -> Vec<String> {
    let _ = agent;
    crate::jobs::linked_apps()
        .names()
        .map(String::from)
        .collect()
}

fn auth_error_text(e: UserAuthError) -> &'static str {
    match e {
        UserAuthError::UnknownUser => "unknown user",
        UserAuthError::NotAllowed => "user not allowed on this node",
        UserAuthError::NeedCredential => "this node does not hold the user's credential",
        UserAuthError::BadProof => "proof does not verify",
        UserAuthError::Unexpected => "unexpected authentication message",
    }
}
