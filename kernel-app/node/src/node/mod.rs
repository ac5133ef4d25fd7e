//! The overlay peer: a Pastry-style node and its DHT records as one I/O-free state machine.
//!
//! Driven like `quinn-proto`: feed it `handle_datagram` / `handle_timeout` and commands
//! (`join`, `lookup`, `put`, `get`, `leave`), then drain `poll_transmit`, `poll_event` and ask
//! `poll_timeout` when to call again. Time comes in as [`Instant`], randomness from the seed in
//! [`NodeConfig`]; every queue and table is bounded, every call does bounded work.
//!
//! Protocol in short (Pastry, with Bamboo's periodic repair):
//! - join: route a `Join` to one's own id through any bootstrap node; every node on the path
//!   sends its routing-table rows, the root sends its leaf set; then announce to the leaf set.
//! - routing: leaf set when it covers the key, else the routing-table entry sharing one more
//!   digit, else any known node numerically closer. Each hop acknowledges; a silent next hop
//!   is dropped from the tables and the message rerouted. Messages carry their path, and a
//!   node never forwards to a node already on it (no loops by construction).
//! - leaf set: one-way keepalives to every member; a member silent for `leaf_fail_ms` (or
//!   missing two hop acks) is removed and the far end of its side asked for repair; members
//!   gained are sent our leaf set (this is also how partitions zip back together, helped by
//!   probing recently failed nodes).
//! - records: put/get at the key's root; `k` copies on the root and its leaf-set neighbours;
//!   re-replicated whenever the leaf set changes. Every record has a version. A write (put or
//!   compare-and-set) runs in two phases at the root: ask the key's replica set for the
//!   versions they hold, and with a majority of answers pick the next version (or refuse a
//!   compare-and-set whose expected version is not the current one); then store and
//!   acknowledge once a majority holds it. The replica set counted is the `k` nodes closest
//!   to the key among the leaf set *and recently failed nodes*, so the side of a partition
//!   that holds fewer than a majority of a key's replicas cannot write it.

mod config;
mod directory;
mod dispatch;
mod membership;
mod records;
mod requests;
mod routing;
#[cfg(test)]
mod tests;

pub use crate::wire::PutError;
pub use config::{ConfigError, NodeConfig, Timing};
use requests::Reply;

use crate::id::{Id, Key, NodeId};
use crate::launch::PeerAddr;
use crate::leaf_set::LeafSet;
use crate::rng::Rng;
use crate::routing_table::{NeighbourhoodSet, Offer, RoutingTable};
use crate::store::{RecordStore, StoreError};
use crate::time::Instant;
use crate::wire::{
    self, Contact, Header, LeafKind, MAX_DATAGRAM, MAX_PATH, MAX_VALUE_LEN, Message, Packet,
    Plaintext, Routed, RoutedBody, Sealer, WIRE_VERSION,
};
use alloc::collections::VecDeque;
use alloc::vec::Vec;
use alloc::{format, vec};
use core::fmt;

/// Most datagrams waiting in `poll_transmit`; beyond it new ones are dropped and counted.
pub const MAX_TRANSMITS: usize = 2048;
/// Most events waiting in `poll_event`; beyond it new ones are dropped and counted.
pub const MAX_EVENTS: usize = 1024;
/// Most of this node's own requests in flight.
pub const MAX_PENDING: usize = 256;
/// Most forwarded messages awaiting a hop acknowledgement.
pub const MAX_IN_FLIGHT: usize = 256;
/// Most recently failed nodes remembered (and probed, to heal partitions).
pub const MAX_GRAVEYARD: usize = 64;
/// Records handled per record-maintenance step.
const RECORD_BATCH: usize = 64;
/// A leaf member missing this many hop acks in a row is treated as failed.
const MAX_MISSED_ACKS: u8 = 2;
/// Times one node reroutes one message after silent next hops.
const MAX_REROUTES: u8 = 3;

/// Why an own request was not started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestError {
    /// The node has not joined the overlay (or has left).
    NotJoined,
    /// `MAX_PENDING` requests are already in flight.
    Busy,
    /// The value is larger than `MAX_VALUE_LEN`.
    ValueTooLarge,
}

impl fmt::Display for RequestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequestError::NotJoined => write!(f, "node has not joined the overlay"),
            RequestError::Busy => write!(f, "too many requests in flight"),
            RequestError::ValueTooLarge => {
                write!(f, "value larger than {MAX_VALUE_LEN} bytes")
            }
        }
    }
}

impl core::error::Error for RequestError {}

/// How a put is made.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteOptions {
    /// Compare-and-set: only while the record is at this version (0: absent).
    pub expected: Option<u64>,
    /// Copies the record keeps; 0: the cluster's `k` (the node's config).
    pub copies: u8,
}

/// Handle of an own request, named in its completion event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct OpId(pub u64);

/// Which kind of request an event is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestKind {
    Lookup,
    Join,
    Put,
    Get,
    /// A stranded record handed to its root.
    Handoff,
    /// A service-directory lookup (`discover`).
    Discover,
}

/// A datagram to send.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Transmit {
    pub dst: PeerAddr,
    pub payload: Vec<u8>,
}

/// Something the driver (kernel, simulator, CLI) may want to know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// The node finished joining (or created a new overlay).
    Joined,
    /// A lookup reached its root; `path` runs from this node to the root (hops = len - 1).
    LookupDone {
        op: OpId,
        key: Key,
        root: Contact,
        path: Vec<NodeId>,
    },
    PutDone {
        op: OpId,
        key: Key,
        root: Contact,
        version: u64,
    },
    GetDone {
        op: OpId,
        key: Key,
        root: Contact,
        value: Option<Vec<u8>>,
    },
    /// A put or compare-and-set did not happen (see [`PutError`]).
    PutFailed { op: OpId, key: Key, error: PutError },
    /// A lookup or get got no answer after all attempts.
    RequestFailed {
        op: OpId,
        key: Key,
        kind: RequestKind,
    },
    /// This node acted as the root for `key` (logged at debug; checked by the simulator).
    Delivered {
        key: Key,
        origin: NodeId,
        kind: RequestKind,
    },
    /// A leaf-set member was declared failed.
    PeerFailed { id: NodeId },
    /// A discover ended: providers ranked nearest first (same server, then RTT); `level`
    /// and `hops`: where the lookup stopped; `answers`: directory nodes that answered.
    Discovered {
        op: OpId,
        service: Key,
        providers: Vec<crate::directory::Provider>,
        level: u8,
        hops: u8,
        answers: u8,
    },
}

/// Drops, failures and traffic, for `unipeer status` and the benchmark.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub datagrams_in: u64,
    pub bytes_in: u64,
    pub datagrams_out: u64,
    pub bytes_out: u64,
    /// Bytes sent for upkeep (keepalives, leaf and table repair, joins, replication).
    pub maintenance_bytes_out: u64,
    /// Inbound datagrams that did not decode (or broke a bound).
    pub undecodable: u64,
    /// Inbound datagrams of another wire version.
    pub bad_version: u64,
    /// Inbound datagrams the seal layer rejected.
    pub rejected: u64,
    /// Inbound datagrams ignored (claiming our own id, or while not running).
    pub ignored: u64,
    /// Authenticated datagrams whose header named another sender than the verified peer
    /// (see [`Node::handle_authenticated_datagram`]).
    pub sender_mismatch: u64,
    /// Outbound messages over a bound (a bug if ever non-zero).
    pub encode_failures: u64,
    pub transmit_drops: u64,
    pub event_drops: u64,
    /// Routed messages dropped: hop limit, reroutes exhausted, or no way forward.
    pub routing_drops: u64,
    /// Routed messages dropped because the only way on led back to a node on their path.
    pub loops_avoided: u64,
    pub hop_timeouts: u64,
    pub leaf_failures: u64,
    pub join_attempts: u64,
    pub records_refused: u64,
    /// Writes served as root that found no majority of the key's replica set in time.
    pub writes_without_quorum: u64,
    /// Compare-and-sets refused because the record was at another version.
    pub writes_mismatched: u64,
}

/// A summary for `unipeer status`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status {
    pub id: NodeId,
    pub joined: bool,
    pub leaf_set_len: usize,
    pub table_filled: usize,
    pub table_rows: usize,
    pub records: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Idle,
    Joining,
    Joined,
    Left,
}

#[derive(Clone, Debug)]
enum PendingKind {
    Lookup,
    Put {
        value: Vec<u8>,
        opts: WriteOptions,
        /// What the root said last (a retry may still succeed).
        last_error: Option<PutError>,
    },
    Get,
}

#[derive(Clone, Debug)]
struct Pending {
    op: OpId,
    nonce: u64,
    key: Key,
    kind: PendingKind,
    deadline: Instant,
    attempts_left: u8,
}

/// Where a write served as root stands.
#[derive(Clone, Debug, PartialEq, Eq)]
enum WritePhase {
    /// Behind another write of the same key (writes of one key run one at a time).
    Queued,
    /// Asking the replica set for their versions; the answers so far.
    Querying { held: Vec<(NodeId, u64)> },
    /// Stored here at `version`; acknowledged once a majority of the set confirms it.
    Storing { version: u64 },
}

/// A put or compare-and-set served as the key's root.
#[derive(Clone, Debug)]
struct RootWrite {
    key: Key,
    nonce: u64,
    origin: Contact,
    value: Vec<u8>,
    opts: WriteOptions,
    /// Names this write in `VersionQuery`/`VersionHeld`.
    round: u64,
    /// The key's replica set counted for the majority (recently failed nodes included).
    quorum_set: Vec<NodeId>,
    phase: WritePhase,
    expires: Instant,
}

#[derive(Clone, Debug)]
struct InFlight {
    routed: Routed,
    next: Contact,
    deadline: Instant,
    reroutes: u8,
}

#[derive(Clone, Copy, Debug)]
struct Timers {
    keepalive: Instant,
    leaf_exchange: Instant,
    table_refresh: Instant,
    record_pass: Instant,
    graveyard_probe: Instant,
    join: Option<Instant>,
    /// Until when a node that just joined waits for its nearest neighbours to answer its
    /// announce before it reports `Event::Joined` anyway.
    activation: Option<Instant>,
}

/// One overlay peer. `S` is the seal layer every datagram passes (identity until
/// authentication lands).
pub struct Node<S: Sealer = Plaintext> {
    me: Contact,
    replicas: usize,
    timing: Timing,
    phase: Phase,
    rng: Rng,
    sealer: S,
    leaf: LeafSet,
    table: RoutingTable,
    hood: NeighbourhoodSet,
    graveyard: Vec<(Contact, Instant)>,
    store: RecordStore,
    bootstrap: Vec<PeerAddr>,
    next_bootstrap: usize,
    join_nonce: u64,
    pending: Vec<Pending>,
    in_flight: Vec<InFlight>,
    writes: Vec<RootWrite>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    next_op: u64,
    timers: Timers,
    record_cursor: Option<Key>,
    last_proximity_probe: Option<Instant>,
    /// The nearest neighbours (one per side) whose answer to our announce `Event::Joined`
    /// waits for.
    awaiting_announce: Vec<NodeId>,
    counters: Counters,
    dir: directory::DirectoryState,
}

impl Node<Plaintext> {
    /// A node with the identity seal.
    pub fn new(config: NodeConfig, now: Instant) -> Result<Self, ConfigError> {
        Node::with_sealer(config, Plaintext, now)
    }
}

impl<S: Sealer> Node<S> {
    /// A node whose datagrams pass `sealer`.
    pub fn with_sealer(config: NodeConfig, sealer: S, now: Instant) -> Result<Self, ConfigError> {
        config.validate()?;
        let id = Id::from_public_key(&config.public_key);
        let me = Contact {
            id,
            addr: config.addr,
            server: config.server,
        };
        let mut rng = Rng::from_seed(config.rng_seed);
        let t = config.timing;
        // Spread periodic work so nodes started together do not beat in step.
        let mut phase = |period: u64| now.plus_us(rng.below(period.max(1) * 1000));
        let timers = Timers {
            keepalive: phase(t.keepalive_ms),
            leaf_exchange: phase(t.leaf_exchange_ms),
            table_refresh: phase(t.table_refresh_ms),
            record_pass: phase(t.record_refresh_ms),
            graveyard_probe: phase(t.graveyard_probe_ms),
            join: None,
            activation: None,
        };
        Ok(Node {
            me,
            replicas: config.replicas,
            timing: t,
            phase: Phase::Idle,
            rng,
            sealer,
            leaf: LeafSet::new(id, config.leaf_set_len),
            table: RoutingTable::new(id, config.server),
            hood: NeighbourhoodSet::new(id, config.server, config.neighbourhood_len),
            graveyard: Vec::new(),
            store: RecordStore::new(config.max_records),
            bootstrap: Vec::new(),
            next_bootstrap: 0,
            join_nonce: 0,
            pending: Vec::new(),
            in_flight: Vec::new(),
            writes: Vec::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            next_op: 1,
            timers,
            record_cursor: None,
            last_proximity_probe: None,
            awaiting_announce: Vec::new(),
            counters: Counters::default(),
            dir: directory::DirectoryState::new(),
        })
    }

    // ---- read-only status ----

    pub fn id(&self) -> NodeId {
        self.me.id
    }

    pub fn contact(&self) -> Contact {
        self.me
    }

    pub fn is_joined(&self) -> bool {
        self.phase == Phase::Joined
    }

    pub fn has_left(&self) -> bool {
        self.phase == Phase::Left
    }

    pub fn leaf_set(&self) -> &LeafSet {
        &self.leaf
    }

    pub fn routing_table(&self) -> &RoutingTable {
        &self.table
    }

    pub fn neighbourhood(&self) -> &NeighbourhoodSet {
        &self.hood
    }

    pub fn records(&self) -> &RecordStore {
        &self.store
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    pub fn status(&self) -> Status {
        Status {
            id: self.me.id,
            joined: self.is_joined(),
            leaf_set_len: self.leaf.len(),
            table_filled: self.table.filled(),
            table_rows: self.table.rows(),
            records: self.store.len(),
        }
    }

    /// Approximate heap bytes this node holds (tables, queues, records).
    pub fn heap_bytes(&self) -> usize {
        use core::mem::size_of;
        self.leaf.capacity() * size_of::<crate::leaf_set::LeafMember>()
            + self.table.heap_bytes()
            + core::mem::size_of_val(self.hood.members())
            + self.graveyard.capacity() * size_of::<(Contact, Instant)>()
            + self.store.heap_bytes()
            + self.bootstrap.capacity() * size_of::<PeerAddr>()
            + self.pending.capacity() * size_of::<Pending>()
            + self.writes.capacity() * size_of::<RootWrite>()
            + self
                .writes
                .iter()
                .map(|w| w.value.capacity())
                .sum::<usize>()
            + self.in_flight.capacity() * (size_of::<InFlight>() + MAX_PATH * 16)
            + self.transmits.capacity() * size_of::<Transmit>()
            + self
                .transmits
                .iter()
                .map(|t| t.payload.capacity())
                .sum::<usize>()
            + self.events.capacity() * size_of::<Event>()
            + self.dir.heap_bytes()
    }

    // ---- outputs ----

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When `handle_timeout` must be called next (`None`: not running).
    pub fn poll_timeout(&self) -> Option<Instant> {
        match self.phase {
            Phase::Idle | Phase::Left => return None,
            Phase::Joining | Phase::Joined => {}
        }
        let t = &self.timers;
        if self.phase == Phase::Joining {
            return t.join;
        }
        let mut at = t.keepalive;
        for x in [
            t.leaf_exchange,
            t.table_refresh,
            t.record_pass,
            t.graveyard_probe,
        ] {
            at = at.min(x);
        }
        for j in [t.join, t.activation].into_iter().flatten() {
            at = at.min(j);
        }
        for p in &self.pending {
            at = at.min(p.deadline);
        }
        for f in &self.in_flight {
            at = at.min(f.deadline);
        }
        for w in &self.writes {
            at = at.min(w.expires);
        }
        if let Some(d) = self.directory_deadline() {
            at = at.min(d);
        }
        Some(at)
    }

    // ---- commands ----

    /// Joins the overlay through any of `bootstrap` (tried in turn); with none, starts a new
    /// overlay alone. The bootstrap list is kept to rejoin if the node is ever cut off.
    pub fn join(&mut self, now: Instant, bootstrap: &[PeerAddr]) {
        if self.phase == Phase::Left {
            return;
        }
        self.bootstrap = bootstrap
            .iter()
            .copied()
            .filter(|a| *a != self.me.addr)
            .take(crate::launch::BOOTSTRAP_MAX)
            .collect();
        if self.bootstrap.is_empty() {
            self.become_joined(now);
            return;
        }
        self.phase = Phase::Joining;
        self.send_join(now);
    }

    /// Starts a lookup of `key`'s root; completes with `LookupDone` or `RequestFailed`.
    pub fn lookup(&mut self, now: Instant, key: Key) -> Result<OpId, RequestError> {
        self.start_request(now, key, PendingKind::Lookup)
    }

    /// Stores `value` under `key` at its root and `k - 1` neighbours, as the record's next
    /// version. `PutDone` comes once a majority of the key's replica set (2 of 3 for k = 3)
    /// holds it, so the side of a partition holding fewer of the key's replicas cannot
    /// acknowledge a put: it ends with `PutFailed` (`NoQuorum`, or `Timeout` when no root
    /// answered).
    pub fn put(&mut self, now: Instant, key: Key, value: &[u8]) -> Result<OpId, RequestError> {
        self.put_with(now, key, value, WriteOptions::default())
    }

    /// Compare-and-set: stores `value` as `key`'s next version only if the record is at
    /// `expected_version` now (0: no record yet), decided with a majority of the key's replica
    /// set. Ends with `PutDone` (the new version) or `PutFailed` (`VersionMismatch { current }`,
    /// `NoQuorum`, `Timeout`). A retried attempt whose first try landed unacknowledged reports
    /// `VersionMismatch` with its own version as `current`: read the record to tell.
    pub fn put_if(
        &mut self,
        now: Instant,
        key: Key,
        value: &[u8],
        expected_version: u64,
    ) -> Result<OpId, RequestError> {
        let opts = WriteOptions {
            expected: Some(expected_version),
            copies: 0,
        };
        self.put_with(now, key, value, opts)
    }

    /// A put with its options: compare-and-set or not, and the copies the record keeps
    /// (a job's replication; clamped to the leaf set's `L/2 + 1`).
    pub fn put_with(
        &mut self,
        now: Instant,
        key: Key,
        value: &[u8],
        opts: WriteOptions,
    ) -> Result<OpId, RequestError> {
        if value.len() > MAX_VALUE_LEN {
            return Err(RequestError::ValueTooLarge);
        }
        let kind = PendingKind::Put {
            value: value.to_vec(),
            opts,
            last_error: None,
        };
        self.start_request(now, key, kind)
    }

    /// Fetches `key`'s value from its root.
    pub fn get(&mut self, now: Instant, key: Key) -> Result<OpId, RequestError> {
        self.start_request(now, key, PendingKind::Get)
    }

    /// Leaves gracefully: tells the leaf set (handing it our leaf set for repair) and stops.
    /// Records are not handed over here: the other `k - 1` copies re-replicate them.
    pub fn leave(&mut self, _now: Instant) {
        if self.phase != Phase::Joined {
            self.phase = Phase::Left;
            return;
        }
        let members: Vec<Contact> = self.leaf.contacts().copied().collect();
        for c in &members {
            self.send(
                c.addr,
                Message::Leave {
                    members: members.clone(),
                },
            );
        }
        self.phase = Phase::Left;
        self.pending.clear();
        self.in_flight.clear();
    }

    // ---- inputs ----

    /// Handles one datagram from `from`. Anything malformed is dropped and counted.
    pub fn handle_datagram(&mut self, now: Instant, from: PeerAddr, bytes: &[u8]) {
        if let Some(packet) = self.receive(from, bytes) {
            self.process(now, from, packet);
        }
    }

    /// Like [`Self::handle_datagram`], for a datagram the trust layer delivered from a session
    /// whose peer proved it is `verified`: a packet whose header names another sender is
    /// dropped and counted in `sender_mismatch` (a peer may not speak for another node).
    pub fn handle_authenticated_datagram(
        &mut self,
        now: Instant,
        from: PeerAddr,
        verified: NodeId,
        bytes: &[u8],
    ) {
        let Some(packet) = self.receive(from, bytes) else {
            return;
        };
        if packet.header.sender != verified {
            self.counters.sender_mismatch += 1;
            return;
        }
        self.process(now, from, packet);
    }

    /// Counts an inbound datagram and decodes it, or counts why not.
    fn receive(&mut self, from: PeerAddr, bytes: &[u8]) -> Option<wire::Packet> {
        self.counters.datagrams_in += 1;
        self.counters.bytes_in += bytes.len() as u64;
        if matches!(self.phase, Phase::Idle | Phase::Left) {
            self.counters.ignored += 1;
            return None;
        }
        match self.sealer.open(from, bytes) {
            Err(_) => {
                self.counters.rejected += 1;
                None
            }
            Ok(plain) => match wire::decode(&plain) {
                Ok(p) => Some(p),
                Err(wire::DecodeError::Version(_)) => {
                    self.counters.bad_version += 1;
                    None
                }
                Err(_) => {
                    self.counters.undecodable += 1;
                    None
                }
            },
        }
    }

    fn process(&mut self, now: Instant, from: PeerAddr, packet: wire::Packet) {
        let h = packet.header;
        if h.sender == self.me.id {
            self.counters.ignored += 1;
            return;
        }
        let sender = Contact {
            id: h.sender,
            addr: from,
            server: h.server,
        };
        let mut gained = Vec::new();
        self.heard_from(now, sender, h.joined, &mut gained);
        let replied_to_sender = self.dispatch(now, sender, h.joined, packet.message, &mut gained);
        self.welcome(
            now,
            &gained,
            if replied_to_sender {
                Some(sender.id)
            } else {
                None
            },
        );
    }

    /// Runs every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if matches!(self.phase, Phase::Idle | Phase::Left) {
            return;
        }
        if let Some(j) = self.timers.join
            && now >= j
        {
            self.timers.join = None;
            if self.phase == Phase::Joining || self.leaf.is_empty() {
                self.send_join(now);
            }
        }
        if self.timers.activation.is_some_and(|a| now >= a) {
            self.activate();
        }
        self.expire_in_flight(now);
        self.expire_pending(now);
        self.expire_writes(now);
        if self.phase != Phase::Joined {
            return;
        }
        let t = self.timing;
        if now >= self.timers.keepalive {
            self.timers.keepalive = now.plus_ms(self.jitter(t.keepalive_ms));
            self.keepalive(now);
        }
        if now >= self.timers.leaf_exchange {
            self.timers.leaf_exchange = now.plus_ms(self.jitter(t.leaf_exchange_ms));
            if !self.leaf.is_empty() {
                let i = self.rng.below(self.leaf.len() as u64) as usize;
                let to = self.leaf.members()[i].contact;
                self.send_leaf_set(to.addr, LeafKind::Exchange);
            }
        }
        if now >= self.timers.table_refresh {
            self.timers.table_refresh = now.plus_ms(self.jitter(t.table_refresh_ms));
            self.refresh_table();
        }
        if now >= self.timers.graveyard_probe {
            self.timers.graveyard_probe = now.plus_ms(self.jitter(t.graveyard_probe_ms));
            self.probe_graveyard(now);
        }
        if now >= self.timers.record_pass {
            self.record_pass(now);
        }
        self.directory_tick(now);
    }

    // ---- internals: sending ----

    fn header(&self) -> Header {
        Header {
            version: WIRE_VERSION,
            sender: self.me.id,
            server: self.me.server,
            joined: self.phase == Phase::Joined,
        }
    }

    fn send(&mut self, dst: PeerAddr, message: Message) {
        let maintenance = message.is_maintenance();
        let packet = Packet {
            header: self.header(),
            message,
        };
        let budget = MAX_DATAGRAM.saturating_sub(self.sealer.overhead());
        let Ok(plain) = wire::encode(&packet, budget) else {
            self.counters.encode_failures += 1;
            return;
        };
        let Ok(payload) = self.sealer.seal(dst, plain) else {
            self.counters.encode_failures += 1;
            return;
        };
        if self.transmits.len() >= MAX_TRANSMITS {
            self.counters.transmit_drops += 1;
            return;
        }
        self.counters.datagrams_out += 1;
        self.counters.bytes_out += payload.len() as u64;
        if maintenance {
            self.counters.maintenance_bytes_out += payload.len() as u64;
        }
        self.transmits.push_back(Transmit { dst, payload });
    }

    fn emit(&mut self, e: Event) {
        if self.events.len() >= MAX_EVENTS {
            self.counters.event_drops += 1;
            return;
        }
        self.events.push_back(e);
    }

    fn send_leaf_set(&mut self, dst: PeerAddr, kind: LeafKind) {
        let members: Vec<Contact> = self.leaf.contacts().copied().collect();
        self.send(dst, Message::LeafSet { kind, members });
    }

    fn jitter(&mut self, period_ms: u64) -> u64 {
        // +-10 %, so periodic traffic does not synchronise.
        let spread = (period_ms / 5).max(1);
        period_ms - period_ms / 10 + self.rng.below(spread)
    }
}

impl<S: Sealer> fmt::Debug for Node<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Node")
            .field("id", &self.me.id)
            .field("phase", &self.phase)
            .field("leaf", &self.leaf.len())
            .field("table", &self.table.filled())
            .finish()
    }
}

/// Formats a path as short ids joined by arrows (what `unipeer lookup` prints).
pub fn format_path(path: &[NodeId]) -> alloc::string::String {
    let parts: Vec<alloc::string::String> = path.iter().map(|id| format!("{id:?}")).collect();
    parts.join(" -> ")
}
