//! One shape for a kernel service, and the set the event loop drives.
//!
//! The kernel is a set of services (the overlay peer, diagnostics, the job host, the client
//! port; next the replication agent, its protocol handler and the directory) driven the way
//! smoltcp's `Interface::poll` drives a `SocketSet`: the loop owns the network stack, the clock
//! and the [`EventBus`]; a service owns its sockets and its state, and never holds or imports
//! another service.
//!
//! # How a service plugs in
//!
//! - **Sockets.** Its constructor takes `&mut Stack` and adds the sockets it needs
//!   (`stack.sockets.add(..)`), keeping their handles; the loop polls the stack before and after
//!   the services, so what a service writes into its sockets goes out in the same wake-up.
//! - **What it receives.** Each pass, [`Service::poll`] gets a [`Context`]: the loop's time
//!   (`now_us`), the stack, what never changes after boot (`node`: launch config, boot facts),
//!   the loop's counters, an [`Outbox`] and [`Peers`], a view of the other services. Events for
//!   it arrive in [`Service::handle`]; [`Service::flush`] moves what it queued into its sockets
//!   (called after the polls and after each round of events, until the bus is quiet).
//! - **Asking the overlay.** `cx.peers.overlay()` gives [`OverlayAccess`], a narrow interface:
//!   DHT reads and requests (`lookup`/`put`/`get`, the node core's `jobs::Overlay`; the
//!   operation id comes back at once and the answer later as [`ServiceEvent::Overlay`]), the
//!   trust layer's stream keys ([`StreamKeys`], to seal a TCP stream to a peer) and the
//!   credential delegator. Not the overlay service itself: it cannot be polled, flushed or
//!   reconfigured from outside.
//! - **Telling another service.** `cx.outbox.post(event)` queues a typed [`ServiceEvent`] on the
//!   bus; the loop offers it to every other service in set order until one claims it (returns
//!   `None` from `handle`), and last to the sender, which so handles what nobody claimed (e.g. a
//!   diagnostic command no service answers). `cx.outbox.send_to(name, event)` addresses one
//!   service (replies). The bus is bounded ([`BUS_CAPACITY`]); an event that does not fit is
//!   dropped and counted (`bus_dropped` in the report), as is one nobody claims
//!   (`bus_unclaimed`).
//! - **Time.** [`Service::next_deadline_us`] is the earliest kernel time it wants a pass; the
//!   loop sleeps until the earliest over the set and counts, by service name, whose deadline
//!   ended each sleep (`sleeps_until_<name>`).
//! - **Report.** [`Service::report`] appends its `key=value` lines to the diagnostic report
//!   (sections in set order).
//!
//! Adding a service (say the replication agent) is a type implementing [`Service`] and one
//! `set.add(..)` line in `event_loop::run`; the events it exchanges with others are new
//! variants of [`ServiceEvent`].

use alloc::boxed::Box;
use alloc::collections::VecDeque;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::RefCell;

use smoltcp::iface::SocketHandle;
use unipeer_node::auth::{CredentialDelegator, IdentityKey, SessionLayer};
use unipeer_node::diag_command::{self, Access, DiagCommand};
use unipeer_node::jobs::agent::SubmitError;
use unipeer_node::jobs::chunk::{ChunkError, ChunkId};
use unipeer_node::jobs::client::SubmitRequest;
use unipeer_node::jobs::delegation::PeerKeys;
use unipeer_node::jobs::record::{JobId, TaskId};
use unipeer_node::jobs::{self, JobEvent};
use unipeer_node::launch::{LaunchConfig, PeerAddr};
use unipeer_node::node::RequestError;
use unipeer_node::wire::Contact;
use unipeer_node::{Instant, Key, NodeId, OpId};

use crate::BootFacts;
use crate::net::Stack;

/// Events queued at once; more are dropped and counted.
pub const BUS_CAPACITY: usize = 1024;
/// Rounds of "flush every service, hand out the events" per pass: handling an event may queue
/// output that makes more events (the job agent answering an overlay event with a put).
const SETTLE_ROUNDS: usize = 8;
/// Events handed out per round (bounded work; the rest wait for the next round or pass).
const DISPATCH_MAX: usize = 4 * BUS_CAPACITY;
/// Services in one set.
pub const MAX_SERVICES: usize = 16;

/// A TCP session of the service that asked (a diagnostic connection), named by its socket.
pub type SessionId = SocketHandle;

/// What a kernel service is to the event loop.
pub trait Service {
    /// Short name: the report's `sleeps_until_<name>` and the address of replies.
    fn name(&self) -> &'static str;
    /// Reads its sockets, runs its due timers and a bounded amount of work.
    fn poll(&mut self, cx: &mut Context<'_>);
    /// An event from `from`: `None` claims it, `Some` hands it on to the next service.
    fn handle(
        &mut self,
        cx: &mut Context<'_>,
        from: &'static str,
        event: ServiceEvent,
    ) -> Option<ServiceEvent> {
        let _ = (cx, from);
        Some(event)
    }
    /// Moves queued output into sockets (and queued notices onto the bus).
    fn flush(&mut self, cx: &mut Context<'_>) {
        let _ = cx;
    }
    /// Earliest kernel time (µs) it needs a pass; `None`: only when input arrives.
    fn next_deadline_us(&self, now_us: u64, stack: &Stack) -> Option<u64>;
    /// Its `key=value` lines for the diagnostic report.
    fn report(&self, out: &mut String) {
        let _ = out;
    }
    /// Outsiders' use of the node through this service (see [`Demand`]).
    fn demand(&self) -> Demand {
        Demand::default()
    }
    /// The overlay's narrow interface, from the one service that is the overlay peer.
    fn as_overlay(&mut self) -> Option<&mut dyn OverlayAccess> {
        None
    }
    /// One line for the log after the ready line (the serial port is slow under emulation).
    fn log_summary(&self) {}
    /// Whether its replies have left (checked before a requested shutdown).
    fn flushed(&self, stack: &Stack) -> bool {
        let _ = stack;
        true
    }
}

/// Outsiders' use of the node (requests served, requests waiting): the job agent keeps its
/// own pace while the node is used (`jobs::QUIET_AFTER_US`).
#[derive(Default, Clone, Copy)]
pub struct Demand {
    pub requests: u64,
    pub waiting: bool,
}

/// What services tell each other, through the loop's bus.
pub enum ServiceEvent {
    /// The overlay node's event: an answer to a request (claimed by whoever holds its
    /// operation id), a joined or failed peer (the overlay logs it).
    Overlay(unipeer_node::Event),
    /// The job agent's event (the client port claims its sessions' answers; the job host logs
    /// the rest).
    Job(JobEvent),
    /// A diagnostic command for whichever service answers it: parsed and access-checked by
    /// diag (`unipeer_node::diag_command`) before it goes on the bus. `operator`: the session
    /// authenticated as the operator; a service refuses an operator-only command without it
    /// (diag never routes one, this is the second lock).
    Command {
        session: SessionId,
        command: RoutedCommand,
        operator: bool,
    },
    /// Text for a diagnostic session (an answer to `Command`, now or later).
    CommandReply {
        session: SessionId,
        text: String,
        /// Counted as a bad request.
        failed: bool,
    },
    /// A client-port session asks the job host.
    JobRequest { session: usize, request: JobRequest },
    /// The job host's answer to `JobRequest`.
    JobReply { session: usize, reply: JobReply },
}

/// A diagnostic command another service answers, as diag parsed it (ranges and arity
/// checked by `unipeer_node::diag_command::parse`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RoutedCommand {
    /// `overlay`, `leafset`, `lookup`, `get`, `put`, `revoke`: the line's words (the overlay's).
    Overlay(Vec<String>),
    /// `jobs tasks` (the job host's).
    JobsTasks,
    /// `job-primes START END TASKS` (the job host's; test images only).
    JobPrimes { start: u64, end: u64, tasks: u32 },
    /// `job-sha256 TASKS` (the job host's; test images only).
    JobSha256 { tasks: u32 },
    /// `apps`, `app-status`, `app-create`, `app-delete` (the replication service's).
    App(AppCommand),
}

/// A replicated-instance command, as diag parsed it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AppCommand {
    List,
    Status {
        name: String,
    },
    Create {
        name: String,
        service: String,
        replicas: u8,
        sync: bool,
        port: u16,
    },
    Delete {
        name: String,
    },
}

/// The reply to an operator command from a session that has not authenticated.
pub const UNAUTHORIZED_REPLY: &str = "error: authentication required (auth? then auth MAC)\n";

impl RoutedCommand {
    /// The parsed command as it goes on the bus; `None`: diag answers it itself.
    pub fn from_parsed(cmd: &DiagCommand<'_>) -> Option<RoutedCommand> {
        Some(match cmd {
            DiagCommand::Overlay { words } => {
                RoutedCommand::Overlay(words.iter().map(|w| String::from(*w)).collect())
            }
            DiagCommand::JobsTasks => RoutedCommand::JobsTasks,
            DiagCommand::JobPrimes { start, end, tasks } => RoutedCommand::JobPrimes {
                start: *start,
                end: *end,
                tasks: *tasks,
            },
            DiagCommand::JobSha256 { tasks } => RoutedCommand::JobSha256 { tasks: *tasks },
            DiagCommand::Apps => RoutedCommand::App(AppCommand::List),
            DiagCommand::AppStatus { name } => RoutedCommand::App(AppCommand::Status {
                name: String::from(*name),
            }),
            DiagCommand::AppDelete { name } => RoutedCommand::App(AppCommand::Delete {
                name: String::from(*name),
            }),
            DiagCommand::AppCreate {
                name,
                service,
                replicas,
                sync,
                port,
            } => RoutedCommand::App(AppCommand::Create {
                name: String::from(*name),
                service: String::from(*service),
                replicas: *replicas,
                sync: *sync,
                port: *port,
            }),
            _ => return None,
        })
    }

    /// Its name in the command table.
    pub fn name(&self) -> &str {
        match self {
            RoutedCommand::Overlay(words) => words.first().map_or("overlay", String::as_str),
            RoutedCommand::JobsTasks => "jobs",
            RoutedCommand::JobPrimes { .. } => "job-primes",
            RoutedCommand::JobSha256 { .. } => "job-sha256",
            RoutedCommand::App(AppCommand::List) => "apps",
            RoutedCommand::App(AppCommand::Status { .. }) => "app-status",
            RoutedCommand::App(AppCommand::Create { .. }) => "app-create",
            RoutedCommand::App(AppCommand::Delete { .. }) => "app-delete",
        }
    }

    /// Whether a session may run it: open commands always, the rest after `auth`.
    pub fn allowed(&self, operator: bool) -> bool {
        command_allowed(self.name(), operator)
    }
}

/// Whether a session may run the command `name`: open ones (by the command table) always, the
/// rest (and a name not in the table) only after `auth`.
pub fn command_allowed(name: &str, operator: bool) -> bool {
    operator
        || diag_command::COMMANDS
            .iter()
            .find(|c| c.name == name)
            .is_some_and(|c| c.access == Access::Open)
}

/// What the client port asks of the job host.
pub enum JobRequest {
    StoreInput(Vec<u8>),
    Submit {
        user: String,
        request: SubmitRequest,
    },
    /// Completes with `JobEvent::ChunkFetched` (no reply).
    Fetch(ChunkId),
    Cancel {
        job: JobId,
        tasks: Vec<TaskId>,
    },
    Capacity,
}

/// The job host's answers.
pub enum JobReply {
    Stored(Result<ChunkId, ChunkError>),
    Submitted {
        result: Result<JobId, SubmitError>,
        tasks: usize,
        app: String,
    },
    Cancelled {
        job: JobId,
        asked: usize,
    },
    Capacity {
        apps: Vec<String>,
        slots: u8,
        running: usize,
    },
}

/// Where an event goes.
#[derive(Clone, Copy)]
enum To {
    /// Every other service in set order until claimed, then the sender.
    Any,
    Service(&'static str),
}

struct Envelope {
    from: &'static str,
    to: To,
    event: ServiceEvent,
}

/// Counters of the bus.
#[derive(Default, Clone, Copy)]
pub struct BusCounters {
    pub posted: u64,
    /// Refused because the bus was full.
    pub dropped: u64,
    /// Offered to every addressee, claimed by none.
    pub unclaimed: u64,
}

/// The one place events between services go through: bounded, owned by the loop.
#[derive(Default)]
pub struct EventBus {
    queue: VecDeque<Envelope>,
    pub counters: BusCounters,
}

impl EventBus {
    fn push(&mut self, e: Envelope) {
        if self.queue.len() >= BUS_CAPACITY {
            self.counters.dropped += 1;
            return;
        }
        self.counters.posted += 1;
        self.queue.push_back(e);
    }
}

/// A service's way onto the bus.
pub struct Outbox<'a> {
    bus: &'a mut EventBus,
    from: &'static str,
}

impl Outbox<'_> {
    /// Offers `event` to the other services in set order (then back to the sender).
    pub fn post(&mut self, event: ServiceEvent) {
        let from = self.from;
        self.bus.push(Envelope {
            from,
            to: To::Any,
            event,
        });
    }

    /// Sends `event` to the service named `to` only (a reply).
    /// Answers a diagnostic session's command: a [`ServiceEvent::CommandReply`] to the service
    /// that routed it.
    pub fn reply(&mut self, to: &'static str, session: SessionId, text: String, failed: bool) {
        self.send_to(
            to,
            ServiceEvent::CommandReply {
                session,
                text,
                failed,
            },
        );
    }

    pub fn send_to(&mut self, to: &'static str, event: ServiceEvent) {
        let from = self.from;
        self.bus.push(Envelope {
            from,
            to: To::Service(to),
            event,
        });
    }

    pub fn counters(&self) -> BusCounters {
        self.bus.counters
    }
}

/// The other services, as a service may see them: the overlay's narrow interface, their
/// report lines and their demand; nothing else.
pub struct Peers<'a> {
    before: &'a mut [Box<dyn Service>],
    after: &'a mut [Box<dyn Service>],
}

impl Peers<'_> {
    /// The overlay peer's narrow interface; `None` when the overlay is off.
    pub fn overlay(&mut self) -> Option<&mut dyn OverlayAccess> {
        self.before
            .iter_mut()
            .chain(self.after.iter_mut())
            .find_map(|s| s.as_overlay())
    }

    fn iter(&self) -> impl Iterator<Item = &Box<dyn Service>> {
        self.before.iter().chain(self.after.iter())
    }

    /// Whether a service of that name runs.
    pub fn has(&self, name: &str) -> bool {
        self.iter().any(|s| s.name() == name)
    }

    /// Appends the named service's report lines; false if it does not run.
    pub fn report_of(&self, name: &str, out: &mut String) -> bool {
        match self.iter().find(|s| s.name() == name) {
            Some(s) => {
                s.report(out);
                true
            }
            None => false,
        }
    }

    /// Every other service's report lines, in set order.
    pub fn report_all(&self, out: &mut String) {
        for s in self.iter() {
            s.report(out);
        }
    }

    /// The other services' demand, summed.
    pub fn demand(&self) -> Demand {
        self.iter().fold(Demand::default(), |a, s| {
            let d = s.demand();
            Demand {
                requests: a.requests + d.requests,
                waiting: a.waiting || d.waiting,
            }
        })
    }
}

/// What never changes after boot, for the report.
#[derive(Clone, Copy)]
pub struct NodeInfo<'a> {
    pub facts: &'a BootFacts,
    pub config: &'a LaunchConfig,
}

/// Counters of the event loop itself.
pub struct LoopCounters {
    pub wakeups: u64,
    /// Loop passes that found work waiting or a deadline already due, and so did not sleep.
    pub busy_polls: u64,
    /// Busy streaks cut short by a nap (should stay near 0).
    pub busy_naps: u64,
    /// Sleeps with a deadline, by who set it: the stack, then each service by name.
    pub sleeps_until: Vec<(&'static str, u64)>,
}

/// Causes the report always names (also when the overlay is off), in this order.
const REPORTED_CAUSES: [&str; 4] = ["stack", "diag", "overlay", "jobs"];

/// What a service gets for a poll, an event or a flush.
pub struct Context<'a> {
    pub now_us: u64,
    pub stack: &'a mut Stack,
    pub outbox: Outbox<'a>,
    pub peers: Peers<'a>,
    pub node: NodeInfo<'a>,
    pub loop_counters: &'a LoopCounters,
    shutdown: &'a mut bool,
}

impl Context<'_> {
    /// Asks the loop to stop the VM once every service's replies have left.
    pub fn request_shutdown(&mut self) {
        *self.shutdown = true;
    }
}

/// The services in the order they are polled, the bus between them, the loop's counters.
pub struct ServiceSet {
    services: Vec<Box<dyn Service>>,
    bus: EventBus,
    pub counters: LoopCounters,
    shutdown: bool,
}

/// What a pass shares with every service's context.
struct Pass<'s, 'a> {
    now_us: u64,
    stack: &'s mut Stack,
    node: NodeInfo<'a>,
}

fn with_context<R>(
    services: &mut [Box<dyn Service>],
    i: usize,
    bus: &mut EventBus,
    counters: &LoopCounters,
    shutdown: &mut bool,
    pass: &mut Pass<'_, '_>,
    f: impl FnOnce(&mut dyn Service, &mut Context<'_>) -> R,
) -> R {
    let (before, rest) = services.split_at_mut(i);
    let (me, after) = rest.split_first_mut().expect("service index in range");
    let mut cx = Context {
        now_us: pass.now_us,
        stack: pass.stack,
        outbox: Outbox {
            bus,
            from: me.name(),
        },
        peers: Peers { before, after },
        node: pass.node,
        loop_counters: counters,
        shutdown,
    };
    f(me.as_mut(), &mut cx)
}

impl Default for ServiceSet {
    fn default() -> Self {
        Self::new()
    }
}

impl ServiceSet {
    pub fn new() -> ServiceSet {
        ServiceSet {
            services: Vec::new(),
            bus: EventBus::default(),
            counters: LoopCounters {
                wakeups: 0,
                busy_polls: 0,
                busy_naps: 0,
                sleeps_until: REPORTED_CAUSES.iter().map(|&n| (n, 0)).collect(),
            },
            shutdown: false,
        }
    }

    /// Adds a service; services are polled, and see each other's report lines, in this order.
    pub fn add(&mut self, service: Box<dyn Service>) {
        let name = service.name();
        assert!(
            !self.services.iter().any(|s| s.name() == name),
            "two services named {name}"
        );
        assert!(
            self.services.len() < MAX_SERVICES,
            "more than {MAX_SERVICES} services"
        );
        if !self.counters.sleeps_until.iter().any(|(n, _)| *n == name) {
            self.counters.sleeps_until.push((name, 0));
        }
        self.services.push(service);
    }

    /// One pass: polls every service in order, then settles (flushes and hands out events).
    pub fn poll(&mut self, now_us: u64, stack: &mut Stack, node: NodeInfo<'_>) {
        let mut pass = Pass {
            now_us,
            stack,
            node,
        };
        for i in 0..self.services.len() {
            with_context(
                &mut self.services,
                i,
                &mut self.bus,
                &self.counters,
                &mut self.shutdown,
                &mut pass,
                |s, cx| s.poll(cx),
            );
        }
        self.settle(&mut pass);
    }

    /// Flushes every service, last first (so what later services queued in the overlay goes
    /// out with the overlay's flush in the same round), and hands out the events, until the
    /// bus is quiet or `SETTLE_ROUNDS` have run.
    fn settle(&mut self, pass: &mut Pass<'_, '_>) {
        for _ in 0..SETTLE_ROUNDS {
            for i in (0..self.services.len()).rev() {
                with_context(
                    &mut self.services,
                    i,
                    &mut self.bus,
                    &self.counters,
                    &mut self.shutdown,
                    pass,
                    |s, cx| s.flush(cx),
                );
            }
            if self.bus.queue.is_empty() {
                return;
            }
            self.dispatch(pass);
        }
        // Rounds spent: what the last events queued still goes out (their own events wait on
        // the bus, and the loop passes again at once).
        for i in (0..self.services.len()).rev() {
            with_context(
                &mut self.services,
                i,
                &mut self.bus,
                &self.counters,
                &mut self.shutdown,
                pass,
                |s, cx| s.flush(cx),
            );
        }
    }

    /// Hands each queued event to its addressees until one claims it.
    fn dispatch(&mut self, pass: &mut Pass<'_, '_>) {
        for _ in 0..DISPATCH_MAX {
            let Some(Envelope { from, to, event }) = self.bus.queue.pop_front() else {
                return;
            };
            let position = |name: &str| self.services.iter().position(|s| s.name() == name);
            let mut order = heapless::Vec::<usize, MAX_SERVICES>::new();
            match to {
                To::Service(name) => order.extend(position(name)),
                To::Any => {
                    let sender = position(from);
                    order.extend((0..self.services.len()).filter(|&i| Some(i) != sender));
                    order.extend(sender);
                }
            }
            let mut event = Some(event);
            for i in order {
                let Some(e) = event.take() else {
                    break;
                };
                event = with_context(
                    &mut self.services,
                    i,
                    &mut self.bus,
                    &self.counters,
                    &mut self.shutdown,
                    pass,
                    |s, cx| s.handle(cx, from, e),
                );
            }
            if event.is_some() {
                self.bus.counters.unclaimed += 1;
            }
        }
    }

    /// The earliest deadline over the set (or now, when events wait), and the index in
    /// `counters.sleeps_until` of who set it.
    pub fn next_deadline_us(&self, now_us: u64, stack: &Stack) -> Option<(u64, usize)> {
        if !self.bus.queue.is_empty() {
            return Some((now_us, 0));
        }
        let mut best: Option<(u64, usize)> = None;
        for s in &self.services {
            let Some(at) = s.next_deadline_us(now_us, stack) else {
                continue;
            };
            if best.is_none_or(|(b, _)| at < b) {
                let cause = self
                    .counters
                    .sleeps_until
                    .iter()
                    .position(|(n, _)| *n == s.name())
                    .unwrap_or(0);
                best = Some((at, cause));
            }
        }
        best
    }

    /// Whether a service asked to stop the VM.
    pub fn shutdown_requested(&self) -> bool {
        self.shutdown
    }

    /// Whether every service's replies have left.
    pub fn flushed(&self, stack: &Stack) -> bool {
        self.services.iter().all(|s| s.flushed(stack))
    }

    pub fn log_summaries(&self) {
        for s in &self.services {
            s.log_summary();
        }
    }
}

/// The overlay as other services may use it: a narrow interface, not the overlay service.
pub trait OverlayAccess {
    /// DHT reads and requests, as the job agent sees the overlay (answers come back as
    /// [`ServiceEvent::Overlay`]).
    fn dht(&mut self) -> &mut dyn jobs::Overlay;
    /// The DHT and the trust layer's stream keys at once (the job channel reads a message for
    /// the agent while it keys a stream with a session); no keys without trust material.
    fn dht_and_keys(&mut self) -> (&mut dyn jobs::Overlay, Option<&mut dyn StreamKeys>);
    /// Whether peers and users authenticate (the launch config carries trust material).
    fn trusted(&self) -> bool;
    fn node_id(&self) -> NodeId;
    /// The signed user list, the credentials held here and their delegation.
    fn delegator(&mut self) -> Option<&mut CredentialDelegator>;
    /// Whom to ask for a credential (leaf set and nearest neighbours, sessions first).
    fn delegation_neighbours(&self) -> Vec<PeerAddr>;
    /// The node's identity key for signing delegation tokens; given once.
    fn take_token_identity(&mut self) -> Option<IdentityKey>;
    /// Public keys of the peers with verified sessions (kept current by the overlay).
    fn peer_keys(&self) -> Rc<RefCell<PeerKeys>>;
}

/// The trust layer as a service keying a sealed stream to a peer sees it (the job channel
/// today): the connection secret, the acceptor's candidates, and asking for a session.
pub trait StreamKeys {
    /// The session's stream secret with `peer` (`None`: no session); a connection's secret
    /// follows from it and both ends' nonces (`connection_secret`).
    fn stream_secret(&self, peer: PeerAddr) -> Option<[u8; 32]>;
    /// The connection secrets a connecting `peer` may have keyed its stream with (its nonce
    /// and ours), newest session first.
    fn stream_secret_candidates_for(
        &self,
        peer: PeerAddr,
        connector_nonce: &[u8; 16],
        acceptor_nonce: &[u8; 16],
    ) -> Vec<[u8; 32]>;
    /// Starts a handshake with `peer` unless a session exists or one is under way.
    fn ensure_session(&mut self, now: Instant, peer: PeerAddr);
}

impl StreamKeys for SessionLayer {
    fn stream_secret(&self, peer: PeerAddr) -> Option<[u8; 32]> {
        SessionLayer::stream_secret(self, peer)
    }
    fn stream_secret_candidates_for(
        &self,
        peer: PeerAddr,
        connector_nonce: &[u8; 16],
        acceptor_nonce: &[u8; 16],
    ) -> Vec<[u8; 32]> {
        SessionLayer::stream_secret_candidates_for(self, peer, connector_nonce, acceptor_nonce)
    }
    fn ensure_session(&mut self, now: Instant, peer: PeerAddr) {
        SessionLayer::ensure_session(self, now, peer)
    }
}

/// The node core's `jobs::Overlay` over a `&mut dyn` one, for the agent's generic calls.
pub struct Dht<'a>(pub &'a mut dyn jobs::Overlay);

impl jobs::Overlay for Dht<'_> {
    fn contact(&self) -> Contact {
        self.0.contact()
    }
    fn is_joined(&self) -> bool {
        self.0.is_joined()
    }
    fn is_root(&self, key: Key) -> bool {
        self.0.is_root(key)
    }
    fn replica_set(&self, key: Key, k: usize) -> Vec<Contact> {
        self.0.replica_set(key, k)
    }
    fn neighbours(&self) -> Vec<Contact> {
        self.0.neighbours()
    }
    fn proximity(&self, c: &Contact) -> (u8, u32) {
        self.0.proximity(c)
    }
    fn record(&self, key: Key) -> Option<&[u8]> {
        self.0.record(key)
    }
    fn record_keys_after(&self, after: Option<Key>, n: usize) -> Vec<Key> {
        self.0.record_keys_after(after, n)
    }
    fn lookup(&mut self, now: Instant, key: Key) -> Result<OpId, RequestError> {
        self.0.lookup(now, key)
    }
    fn put(&mut self, now: Instant, key: Key, value: &[u8]) -> Result<OpId, RequestError> {
        self.0.put(now, key, value)
    }
    fn put_if(
        &mut self,
        now: Instant,
        key: Key,
        value: &[u8],
        expected: u64,
        copies: u8,
    ) -> Result<OpId, RequestError> {
        self.0.put_if(now, key, value, expected, copies)
    }
    fn record_version(&self, key: Key) -> Option<u64> {
        self.0.record_version(key)
    }
    fn get(&mut self, now: Instant, key: Key) -> Result<OpId, RequestError> {
        self.0.get(now, key)
    }
}
