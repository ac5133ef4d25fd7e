//! The interface a replicated service implements. The node core knows no service: the kernel
//! (and the simulator) link the services they want and hand them in as a [`ServiceSet`], the
//! way tasks use [`crate::jobs::app::AppSet`].
//!
//! A request is a list of byte-string arguments, the first naming the command (Redis's shape,
//! which also fits memcached-style text protocols). The service owns the wire format of its
//! clients (a [`RequestDecoder`] turns bytes into requests) and of its replies (opaque bytes).
//! Applying a request on the master gives a reply and, for a write, a *change record*: applying
//! the same change records in the same order on a fresh state gives the same state (same
//! [`ServiceState::state_hash`]), which is what the replication stream relies on.

use alloc::boxed::Box;
use alloc::vec::Vec;
use core::fmt;

use crate::NodeId;

/// Longest service name.
pub const MAX_SERVICE_NAME: usize = 24;
/// Most services one node offers.
pub const MAX_SERVICES: usize = 8;

/// One client request: its arguments, the first being the command name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Request {
    pub args: Vec<Vec<u8>>,
}

impl Request {
    pub fn new(args: Vec<Vec<u8>>) -> Self {
        Request { args }
    }

    /// Bytes the arguments take (the relay's and the queues' bound is on this).
    pub fn byte_len(&self) -> usize {
        self.args.iter().map(|a| a.len() + 4).sum()
    }
}

/// Why a decoder closed a connection: the frame broke the protocol, or a limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FatalFrame {
    /// A frame that does not parse.
    Malformed,
    /// A frame over a limit (bulk length, argument count, inline length).
    OverLimit,
}

/// What a decoder found in the bytes received so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decoded {
    /// A complete request.
    Request(Request),
    /// A protocol error: send `reply`, then close the connection (counted by the caller).
    Fatal { reply: Vec<u8>, why: FatalFrame },
}

/// Turns one client connection's bytes into requests, incrementally (pipelining: many
/// requests may arrive in one read, one request across many). Holds at most its limits.
pub trait RequestDecoder: Send {
    /// Appends bytes read from the connection.
    fn feed(&mut self, bytes: &[u8]);
    /// The next complete request or fatal error; `None` when more bytes are needed. After a
    /// `Fatal` the decoder yields nothing more.
    fn next_request(&mut self) -> Option<Decoded>;
    /// Bytes buffered and not yet decoded.
    fn buffered(&self) -> usize;
}

/// Where a request must be answered, decided before it is applied.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestClass {
    /// Needs no instance state (PING, ECHO, COMMAND, CLIENT ...): answered where the client is.
    Connection,
    /// Reads the state: answered by the master (read-your-writes through any node).
    Read,
    /// Changes the state: only the master, with a valid lease, applies it.
    Write,
    /// Wait until `replicas` slaves acknowledged the master's log as of now, at most
    /// `timeout_ms` (0: the agent's bound); answered by the replication agent.
    WaitReplicas { replicas: u32, timeout_ms: u64 },
    /// Refused before dispatch (unknown command, wrong arity, bad argument): the reply is
    /// ready and the connection stays open.
    Rejected(Vec<u8>),
}

/// A reply for the client, and whether to close the connection after it (QUIT).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub bytes: Vec<u8>,
    pub close: bool,
}

/// What applying a request on the master gave.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Applied {
    pub reply: Vec<u8>,
    /// The change record to replicate, if the state changed.
    pub change: Option<Vec<u8>>,
}

/// A node's role for an instance, as reported to the service (INFO's `replication` section).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    Master,
    Slave,
    /// Neither: this node only relays.
    Relay,
}

/// One slave as its master sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SlaveView {
    pub node: NodeId,
    /// Last sequence number the slave acknowledged.
    pub acked_seq: u64,
    /// Operations the slave is behind.
    pub lag_ops: u64,
    /// Milliseconds since the oldest operation it lacks was applied on the master.
    pub lag_ms: u64,
    /// Whether the slave's lease acknowledgement is current.
    pub online: bool,
}

/// The replication agent's view of an instance, handed to [`ServiceState::apply`] so a
/// service can report it (Redis's `INFO replication`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicationView {
    pub role: Role,
    pub epoch: u64,
    pub master: Option<NodeId>,
    /// This node's last sequence number in the change log.
    pub seq: u64,
    pub slaves: Vec<SlaveView>,
    /// Acknowledged writes this node dropped when it rejoined as a slave (its unreplicated
    /// suffix after a failover).
    pub lost_writes: u64,
}

impl ReplicationView {
    /// The view of a state that is not replicated (tests, a fresh instance).
    pub fn standalone() -> Self {
        ReplicationView {
            role: Role::Master,
            epoch: 0,
            master: None,
            seq: 0,
            slaves: Vec::new(),
            lost_writes: 0,
        }
    }
}

/// Errors the agent answers with, encoded by the service in its own protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentError {
    /// The master cannot renew its lease: it refuses requests so no two masters serve.
    Fenced,
    /// No master is known or reachable right now; retry.
    NoMaster,
    /// The master changed while the request was in flight: it may or may not have been
    /// applied (its reply was lost).
    MasterChanged,
    /// Sync mode: the slaves did not acknowledge the write within the bound. The write is on
    /// the master and may still replicate; it was not acknowledged.
    NotReplicated,
    /// Memory or queue bounds of the agent (not the service's own `maxmemory`).
    Busy,
    /// The instance's service is not linked into this node.
    UnknownService,
}

impl fmt::Display for AgentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            AgentError::Fenced => "the master lost its lease and does not serve",
            AgentError::NoMaster => "no master is reachable for this instance",
            AgentError::MasterChanged => {
                "the master changed while the request was in flight; it may have been applied"
            }
            AgentError::NotReplicated => "the slaves did not acknowledge the write in time",
            AgentError::Busy => "too many requests in flight",
            AgentError::UnknownService => "the instance's service is not on this node",
        })
    }
}

impl core::error::Error for AgentError {}

/// A reply the agent composes in the service's protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AgentReply {
    /// WAIT's answer: how many slaves acknowledged.
    Replicas(u32),
    Error(AgentError),
}

/// A change record or snapshot chunk that does not decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BadRecord;

impl fmt::Display for BadRecord {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("change record or snapshot chunk does not decode")
    }
}

impl core::error::Error for BadRecord {}

/// One bounded piece of a snapshot and where the next starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SnapshotChunk {
    pub bytes: Vec<u8>,
    /// The cursor for the next chunk; `None` when this was the last.
    pub next: Option<Vec<u8>>,
}

/// Limits an instance's state keeps.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceLimits {
    /// Past this, writes that grow the state are refused (the service's own error); what is
    /// stored is kept. Slaves apply change records whatever their size, to stay identical.
    pub max_memory_bytes: usize,
}

impl Default for ServiceLimits {
    fn default() -> Self {
        ServiceLimits {
            max_memory_bytes: 16 * 1024 * 1024,
        }
    }
}

/// One instance's state on a master or slave.
pub trait ServiceState: Send {
    /// Applies a [`RequestClass::Read`] or [`RequestClass::Write`] request at the master.
    /// `now_ms` is the master's time (expiry is decided here and replicated as absolute
    /// times). Deterministic; never panics on any request.
    fn apply(&mut self, now_ms: u64, request: &Request, view: &ReplicationView) -> Applied;
    /// Applies a change record made by a master's [`Self::apply`] (on a slave).
    fn apply_change(&mut self, change: &[u8]) -> Result<(), BadRecord>;
    /// A change record removing what expired by `now_ms`, at most `max` items (master only;
    /// slaves get the removal through the log, so their state stays identical).
    fn expire_due(&mut self, now_ms: u64, max: usize) -> Option<Vec<u8>>;
    /// The snapshot chunk starting at `cursor` (`None`: the start), at most about
    /// `max_bytes` (at least one item).
    fn snapshot_chunk(&self, cursor: Option<&[u8]>, max_bytes: usize) -> SnapshotChunk;
    /// Empties the state before a restore.
    fn clear(&mut self);
    /// Adds one snapshot chunk's items.
    fn restore_chunk(&mut self, chunk: &[u8]) -> Result<(), BadRecord>;
    /// A hash of the whole state: equal states, equal hashes.
    fn state_hash(&self) -> [u8; 32];
    /// Bytes the state holds (an estimate the service keeps up to date).
    fn memory_used(&self) -> usize;
}

/// A replicated service: named, with its client protocol, stateless answers and a state
/// factory.
pub trait ReplicatedService: Sync {
    /// The name placement records refer to (at most [`MAX_SERVICE_NAME`] bytes).
    fn name(&self) -> &'static str;
    /// A decoder for one new client connection.
    fn decoder(&self) -> Box<dyn RequestDecoder>;
    /// Where `request` must be answered; refusals (arity, unknown command) are decided here,
    /// before any dispatch, so every node gives the same errors.
    fn classify(&self, request: &Request) -> RequestClass;
    /// Answers a [`RequestClass::Connection`] request without state.
    fn answer_connection(&self, request: &Request) -> Reply;
    /// Encodes an agent reply in the service's protocol.
    fn agent_reply(&self, reply: AgentReply) -> Vec<u8>;
    /// A fresh, empty state.
    fn new_state(&self, limits: ServiceLimits) -> Box<dyn ServiceState>;
    /// The keys a change record touches, at most `max` (for reporting dropped writes).
    fn change_keys(&self, change: &[u8], max: usize) -> Vec<Vec<u8>>;
}

/// The services linked into this node, handed in by the kernel or the simulator.
#[derive(Clone, Default)]
pub struct ServiceSet {
    services: Vec<&'static dyn ReplicatedService>,
}

impl fmt::Debug for ServiceSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.services.iter().map(|s| s.name()))
            .finish()
    }
}

impl ServiceSet {
    /// The set of `services`; names too long, duplicates and services beyond
    /// [`MAX_SERVICES`] are left out.
    pub fn new(services: &[&'static dyn ReplicatedService]) -> Self {
        let mut set = ServiceSet {
            services: Vec::new(),
        };
        for s in services {
            let n = s.name();
            if n.is_empty()
                || n.len() > MAX_SERVICE_NAME
                || set.get(n).is_some()
                || set.services.len() >= MAX_SERVICES
            {
                continue;
            }
            set.services.push(*s);
        }
        set
    }

    /// The service called `name`.
    pub fn get(&self, name: &str) -> Option<&'static dyn ReplicatedService> {
        self.services.iter().copied().find(|s| s.name() == name)
    }

    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.services.iter().map(|s| s.name())
    }

    pub fn is_empty(&self) -> bool {
        self.services.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Named(&'static str);
    impl ReplicatedService for Named {
        fn name(&self) -> &'static str {
            self.0
        }
        fn decoder(&self) -> Box<dyn RequestDecoder> {
            unreachable!("not decoded in this test")
        }
        fn classify(&self, _: &Request) -> RequestClass {
            RequestClass::Read
        }
        fn answer_connection(&self, _: &Request) -> Reply {
            Reply {
                bytes: Vec::new(),
                close: false,
            }
        }
        fn agent_reply(&self, _: AgentReply) -> Vec<u8> {
            Vec::new()
        }
        fn new_state(&self, _: ServiceLimits) -> Box<dyn ServiceState> {
            unreachable!("no state in this test")
        }
        fn change_keys(&self, _: &[u8], _: usize) -> Vec<Vec<u8>> {
            Vec::new()
        }
    }

    static A: Named = Named("kv");
    static B: Named = Named("kv");
    static LONG: Named = Named("a-service-name-longer-than-24");
    static EMPTY: Named = Named("");

    #[test]
    fn set_keeps_named_distinct_bounded_services() {
        let set = ServiceSet::new(&[&A, &B, &LONG, &EMPTY]);
        assert_eq!(set.names().collect::<Vec<_>>(), ["kv"]);
        assert!(set.get("kv").is_some() && set.get("nope").is_none());
        assert!(ServiceSet::new(&[]).is_empty());
    }
}
