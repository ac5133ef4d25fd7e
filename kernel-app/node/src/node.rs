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
//!   re-replicated whenever the leaf set changes.

use crate::id::{Id, Key, NodeId, ServerTag};
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

/// Timeouts and periods, in milliseconds. Defaults are generous for TCG guests (slow, jittery
/// timers) yet keep upkeep under 500 B/s per node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// Period of keepalives to leaf-set members.
    pub keepalive_ms: u64,
    /// Silence after which keepalives ask for an answer.
    pub leaf_probe_after_ms: u64,
    /// Silence after which a leaf-set member is declared failed.
    pub leaf_fail_ms: u64,
    /// A member added on hearsay (another node's leaf set or row) must be heard from within
    /// this long, so dead nodes passed around by peers that have not noticed yet drop out fast.
    pub hearsay_grace_ms: u64,
    /// Period of leaf-set exchange with one random member.
    pub leaf_exchange_ms: u64,
    /// Period of asking a routing-table entry for a row.
    pub table_refresh_ms: u64,
    /// Hop-ack timeout when the next hop's RTT is unknown (upper bound otherwise).
    pub hop_timeout_ms: u64,
    /// Lower bound of the RTT-derived hop-ack timeout.
    pub hop_timeout_min_ms: u64,
    /// Time an own request (lookup, put, get) waits for its answer before retrying.
    pub request_timeout_ms: u64,
    /// Attempts per own request.
    pub request_attempts: u8,
    /// Time a join attempt waits before trying the next bootstrap node.
    pub join_timeout_ms: u64,
    /// Period of the full record re-replication pass.
    pub record_refresh_ms: u64,
    /// How long failed nodes are remembered (and refused from third-party hearsay).
    pub graveyard_ms: u64,
    /// Period of probing one remembered failed node.
    pub graveyard_probe_ms: u64,
    /// Least time between two proximity (RTT) probes of routing-table candidates.
    pub proximity_probe_ms: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            keepalive_ms: 2_000,
            leaf_probe_after_ms: 5_000,
            leaf_fail_ms: 8_000,
            hearsay_grace_ms: 3_000,
            leaf_exchange_ms: 10_000,
            table_refresh_ms: 20_000,
            hop_timeout_ms: 1_000,
            hop_timeout_min_ms: 50,
            request_timeout_ms: 4_000,
            request_attempts: 4,
            join_timeout_ms: 4_000,
            record_refresh_ms: 10_000,
            graveyard_ms: 300_000,
            graveyard_probe_ms: 2_000,
            proximity_probe_ms: 1_000,
        }
    }
}

/// Everything a node is started with.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// The node's public key (a placeholder until authentication lands); the id is its hash.
    pub public_key: Vec<u8>,
    /// Where other nodes reach this one.
    pub addr: PeerAddr,
    /// Tag of the physical server this node runs on (`ServerTag::from_name(server_id)`).
    pub server: ServerTag,
    pub rng_seed: [u8; 32],
    /// L: leaf-set size, even, 2..=32.
    pub leaf_set_len: usize,
    /// k: copies of every record, 1..=leaf_set_len/2 + 1.
    pub replicas: usize,
    /// M: neighbourhood-set size.
    pub neighbourhood_len: usize,
    /// Most records this node holds.
    pub max_records: usize,
    pub timing: Timing,
}

impl NodeConfig {
    /// A config with the defaults (L = 16, k = 3, M = 8).
    pub fn new(public_key: &[u8], addr: PeerAddr, server: ServerTag, rng_seed: [u8; 32]) -> Self {
        NodeConfig {
            public_key: public_key.to_vec(),
            addr,
            server,
            rng_seed,
            leaf_set_len: 16,
            replicas: 3,
            neighbourhood_len: 8,
            max_records: 4096,
            timing: Timing::default(),
        }
    }

    /// Checks every range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.leaf_set_len < 2 || self.leaf_set_len > 32 || !self.leaf_set_len.is_multiple_of(2) {
            return Err(ConfigError::LeafSetLen(self.leaf_set_len));
        }
        if self.replicas == 0 || self.replicas > self.leaf_set_len / 2 + 1 {
            return Err(ConfigError::Replicas(self.replicas));
        }
        let t = &self.timing;
        if t.keepalive_ms == 0
            || t.leaf_fail_ms <= t.keepalive_ms
            || t.hearsay_grace_ms > t.leaf_fail_ms
            || t.hop_timeout_ms == 0
            || t.request_timeout_ms == 0
            || t.request_attempts == 0
            || t.join_timeout_ms == 0
        {
            return Err(ConfigError::Timing);
        }
        Ok(())
    }
}

/// Why a node config was refused. The `Display` text is the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigError {
    LeafSetLen(usize),
    Replicas(usize),
    Timing,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::LeafSetLen(n) => {
                write!(f, "leaf set length {n} must be even and in 2..=32")
            }
            ConfigError::Replicas(k) => {
                write!(f, "replica count {k} must be in 1..=leaf_set_len/2+1")
            }
            ConfigError::Timing => write!(
                f,
                "timeouts must be non-zero and leaf_fail_ms must exceed keepalive_ms"
            ),
        }
    }
}

impl core::error::Error for ConfigError {}

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
    /// A request got no answer after all attempts (or the root refused a put).
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
    Put(Vec<u8>),
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

/// A put served as root, acknowledged once `k` nodes hold it.
#[derive(Clone, Debug)]
struct PutAwaitingCopies {
    key: Key,
    version: u64,
    nonce: u64,
    origin: Contact,
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
    put_acks: Vec<PutAwaitingCopies>,
    transmits: VecDeque<Transmit>,
    events: VecDeque<Event>,
    next_op: u64,
    timers: Timers,
    record_cursor: Option<Key>,
    last_proximity_probe: Option<Instant>,
    counters: Counters,
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
            put_acks: Vec::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            next_op: 1,
            timers,
            record_cursor: None,
            last_proximity_probe: None,
            counters: Counters::default(),
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
            + self.put_acks.capacity() * size_of::<PutAwaitingCopies>()
            + self.in_flight.capacity() * (size_of::<InFlight>() + MAX_PATH * 16)
            + self.transmits.capacity() * size_of::<Transmit>()
            + self
                .transmits
                .iter()
                .map(|t| t.payload.capacity())
                .sum::<usize>()
            + self.events.capacity() * size_of::<Event>()
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
        if let Some(j) = t.join {
            at = at.min(j);
        }
        for p in &self.pending {
            at = at.min(p.deadline);
        }
        for f in &self.in_flight {
            at = at.min(f.deadline);
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

    /// Stores `value` under `key` at its root and `k - 1` neighbours. `PutDone` comes only once
    /// `k` nodes hold it, so an overlay smaller than `k` (or a partition side that small)
    /// cannot acknowledge a put: it fails with `RequestFailed` instead.
    pub fn put(&mut self, now: Instant, key: Key, value: &[u8]) -> Result<OpId, RequestError> {
        if value.len() > MAX_VALUE_LEN {
            return Err(RequestError::ValueTooLarge);
        }
        self.start_request(now, key, PendingKind::Put(value.to_vec()))
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
        self.expire_in_flight(now);
        self.expire_pending(now);
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

    // ---- internals: membership ----

    fn become_joined(&mut self, now: Instant) {
        self.phase = Phase::Joined;
        self.timers.join = None;
        self.timers.record_pass = self.timers.record_pass.min(now.plus_ms(200));
        self.emit(Event::Joined);
        log::debug!("{:?} joined, leaf set {}", self.me.id, self.leaf.len());
        let members: Vec<Contact> = self.leaf.contacts().copied().collect();
        for c in members {
            self.send_leaf_set(c.addr, LeafKind::Announce);
        }
    }

    fn send_join(&mut self, now: Instant) {
        if self.bootstrap.is_empty() {
            return;
        }
        let to = self.bootstrap[self.next_bootstrap % self.bootstrap.len()];
        self.next_bootstrap = self.next_bootstrap.wrapping_add(1);
        self.join_nonce = self.rng.next_u64();
        self.counters.join_attempts += 1;
        let routed = Routed {
            nonce: self.join_nonce,
            key: self.me.id,
            origin: self.me,
            path: vec![self.me.id],
            body: RoutedBody::Join,
        };
        self.send(to, Message::Routed(routed));
        self.timers.join = Some(now.plus_ms(self.jitter(self.timing.join_timeout_ms)));
    }

    /// Notes a packet from `sender`: it is alive. Joined senders are offered to the tables.
    fn heard_from(
        &mut self,
        now: Instant,
        sender: Contact,
        joined: bool,
        gained: &mut Vec<(Contact, bool)>,
    ) {
        if let Some(m) = self.leaf.get_mut(sender.id) {
            m.last_heard = now;
            m.missed_acks = 0;
            m.contact.addr = sender.addr;
        }
        if joined {
            self.graveyard.retain(|(c, _)| c.id != sender.id);
            self.learn(now, sender, true, gained);
        }
    }

    /// Offers a node to leaf set, routing table and neighbourhood set. Hearsay (`direct ==
    /// false`) about a recently failed node is ignored, so the dead do not come back through
    /// peers that have not noticed yet.
    fn learn(&mut self, now: Instant, c: Contact, direct: bool, gained: &mut Vec<(Contact, bool)>) {
        if c.id == self.me.id || self.phase == Phase::Left {
            return;
        }
        if !direct && self.graveyard.iter().any(|(g, _)| g.id == c.id) {
            return;
        }
        let mut evicted = Vec::new();
        let heard = if direct {
            now
        } else {
            let grace = self.timing.leaf_fail_ms - self.timing.hearsay_grace_ms;
            Instant::from_micros(now.as_micros().saturating_sub(grace * 1000))
        };
        if self.leaf.insert(c, heard, &mut evicted) {
            gained.push((c, direct));
            self.records_changed(now);
        }
        for e in evicted {
            self.table.offer(e, None);
        }
        let rtt = self
            .leaf
            .members()
            .iter()
            .find(|m| m.contact.id == c.id)
            .and_then(|m| m.rtt_us);
        if self.table.offer(c, rtt) == Offer::NeedsRtt && direct {
            self.maybe_probe_proximity(now, c);
        }
        if c.server == self.me.server {
            self.hood.offer(c, rtt);
        }
    }

    fn maybe_probe_proximity(&mut self, now: Instant, c: Contact) {
        let due = self
            .last_proximity_probe
            .is_none_or(|t| now.millis_since(t) >= self.timing.proximity_probe_ms);
        if due {
            self.last_proximity_probe = Some(now);
            self.send(
                c.addr,
                Message::Ping {
                    echo: Some(now.as_micros()),
                },
            );
        }
    }

    /// Sends our leaf set to members we just gained (except `skip`, already answered).
    /// Members gained on hearsay get a probe instead: its answer proves them alive, and a node
    /// that gains us in turn pushes its own leaf set back.
    fn welcome(&mut self, now: Instant, gained: &[(Contact, bool)], skip: Option<NodeId>) {
        for (c, direct) in gained {
            if Some(c.id) == skip || !self.leaf.contains(c.id) {
                continue;
            }
            if *direct {
                self.send_leaf_set(c.addr, LeafKind::Push);
            } else {
                self.send(
                    c.addr,
                    Message::Ping {
                        echo: Some(now.as_micros()),
                    },
                );
            }
        }
    }

    /// Removes a node believed dead from every table; repairs the leaf set from the far end of
    /// the side it was on.
    fn fail_peer(&mut self, now: Instant, id: NodeId) {
        let was_leaf = self.leaf.remove(id);
        let in_table = self.table.contains(id);
        let contact = was_leaf.as_ref().map(|m| m.contact).or_else(|| {
            self.table
                .entries()
                .find(|e| e.contact.id == id)
                .map(|e| e.contact)
        });
        self.table.remove(id);
        self.hood.remove(id);
        self.store.forget_holder(id);
        if let Some(c) = contact {
            self.bury(now, c);
        }
        if let Some(m) = was_leaf {
            self.counters.leaf_failures += 1;
            self.emit(Event::PeerFailed { id });
            log::debug!("{:?}: leaf member {:?} failed", self.me.id, id);
            self.records_changed(now);
            // Ask the far end of the side that lost a member for its leaf set: it knows the
            // nodes beyond. (Only members really on that side: a side short of members also
            // lists the far end of the other side, wrapping round.)
            let own = self.me.id;
            let on_cw_side = |id: Id| own.cw_distance(id) <= id.cw_distance(own);
            let cw = on_cw_side(m.contact.id);
            let side = if cw {
                self.leaf.successors()
            } else {
                self.leaf.predecessors()
            };
            if let Some(far) = side.iter().rev().find(|c| on_cw_side(c.id) == cw) {
                self.send_leaf_set(far.addr, LeafKind::Exchange);
            }
        } else if in_table {
            self.refresh_row_of(id);
        }
    }

    fn bury(&mut self, now: Instant, c: Contact) {
        self.graveyard.retain(|(g, _)| g.id != c.id);
        if self.graveyard.len() >= MAX_GRAVEYARD {
            self.graveyard.remove(0);
        }
        self.graveyard.push((c, now));
    }

    /// Asks another entry of the row that lost `id` for its row (Pastry's table repair).
    fn refresh_row_of(&mut self, id: NodeId) {
        let Some((row, _)) = self.table.slot_of(id) else {
            return;
        };
        let entries = self.table.row(row);
        if entries.is_empty() {
            return;
        }
        let pick = entries[self.rng.below(entries.len() as u64) as usize];
        self.send(pick.addr, Message::RowRequest { row: row as u8 });
    }

    fn keepalive(&mut self, now: Instant) {
        let t = self.timing;
        let silent: Vec<NodeId> = self
            .leaf
            .members()
            .iter()
            .filter(|m| now.millis_since(m.last_heard) > t.leaf_fail_ms)
            .map(|m| m.contact.id)
            .collect();
        for id in silent {
            self.fail_peer(now, id);
        }
        let pings: Vec<(PeerAddr, bool)> = self
            .leaf
            .members()
            .iter()
            .map(|m| {
                let probe =
                    m.rtt_us.is_none() || now.millis_since(m.last_heard) > t.leaf_probe_after_ms;
                (m.contact.addr, probe)
            })
            .collect();
        for (addr, probe) in pings {
            let echo = probe.then_some(now.as_micros());
            self.send(addr, Message::Ping { echo });
        }
        if self.leaf.is_empty() && !self.bootstrap.is_empty() && self.timers.join.is_none() {
            // Cut off from everyone: rejoin through the bootstrap nodes.
            self.send_join(now);
        }
    }

    /// Table maintenance: ask a table entry of row r for its row r (it shares r digits with
    /// us, so its row fills ours). Every other time also ask a near neighbour for its row 0
    /// (the Registrar): those entries were chosen near it, hence near us.
    fn refresh_table(&mut self) {
        let rows = self.table.rows();
        if rows == 0 {
            return;
        }
        let near = self.hood.members().len();
        if near > 0 && self.rng.below(2) == 0 {
            let pick = self.hood.members()[self.rng.below(near as u64) as usize].contact;
            self.send(pick.addr, Message::RowRequest { row: 0 });
        }
        let row = self.rng.below(rows as u64) as usize;
        let entries = self.table.row(row);
        if entries.is_empty() {
            return;
        }
        let pick = entries[self.rng.below(entries.len() as u64) as usize];
        self.send(pick.addr, Message::RowRequest { row: row as u8 });
    }

    fn probe_graveyard(&mut self, now: Instant) {
        let keep_ms = self.timing.graveyard_ms;
        self.graveyard
            .retain(|(_, t)| now.millis_since(*t) < keep_ms);
        if self.graveyard.is_empty() {
            return;
        }
        let i = self.rng.below(self.graveyard.len() as u64) as usize;
        let addr = self.graveyard[i].0.addr;
        self.send(
            addr,
            Message::Ping {
                echo: Some(now.as_micros()),
            },
        );
    }

    // ---- internals: messages ----

    /// Handles one decoded message; returns whether it answered the sender with our leaf set.
    fn dispatch(
        &mut self,
        now: Instant,
        sender: Contact,
        sender_joined: bool,
        message: Message,
        gained: &mut Vec<(Contact, bool)>,
    ) -> bool {
        match message {
            Message::Ping { echo } => {
                if let Some(echo) = echo {
                    self.send(sender.addr, Message::Pong { echo });
                }
            }
            Message::Pong { echo } => {
                let rtt = now
                    .as_micros()
                    .checked_sub(echo)
                    .filter(|r| *r < 60_000_000);
                if let Some(rtt) = rtt {
                    let rtt = rtt as u32;
                    if let Some(m) = self.leaf.get_mut(sender.id) {
                        m.rtt_us = Some(rtt);
                    }
                    self.table.set_rtt(sender.id, rtt);
                    if sender_joined {
                        self.table.offer(sender, Some(rtt));
                        self.hood.offer(sender, Some(rtt));
                    }
                }
            }
            Message::LeafSet { kind, members } => {
                if kind == LeafKind::Announce {
                    // It restarted (or is new): whatever we believed it stored is gone.
                    self.store.forget_holder(sender.id);
                    self.records_changed(now);
                }
                for c in members {
                    self.learn(now, c, false, gained);
                }
                if matches!(kind, LeafKind::Exchange | LeafKind::Announce)
                    && self.phase == Phase::Joined
                {
                    self.send_leaf_set(sender.addr, LeafKind::Push);
                    return true;
                }
            }
            Message::RowRequest { row } => {
                let entries = self.table.row(row as usize);
                self.send(sender.addr, Message::Row { row, entries });
            }
            Message::Row { entries, .. } => {
                for c in entries {
                    self.learn(now, c, false, gained);
                }
            }
            Message::Leave { members } => {
                self.fail_peer(now, sender.id);
                for c in members {
                    self.learn(now, c, false, gained);
                }
            }
            Message::Routed(r) => {
                self.send(sender.addr, Message::RouteAck { nonce: r.nonce });
                if self.phase != Phase::Joined {
                    self.counters.ignored += 1;
                } else {
                    self.route(now, r);
                }
            }
            Message::RouteAck { nonce } => {
                self.in_flight
                    .retain(|f| !(f.routed.nonce == nonce && f.next.id == sender.id));
            }
            Message::JoinReply { nonce, members } => {
                for c in members {
                    self.learn(now, c, false, gained);
                }
                if self.phase == Phase::Joining && nonce == self.join_nonce {
                    self.become_joined(now);
                    // The announce went to every member, gained ones included.
                    gained.clear();
                }
            }
            Message::LookupReply { nonce, key, path } => {
                self.complete(nonce, key, sender, Reply::Lookup(path));
            }
            Message::PutAck {
                nonce,
                key,
                version,
            } => {
                self.complete(nonce, key, sender, Reply::Put(version));
            }
            Message::GetReply {
                nonce, key, value, ..
            } => {
                self.complete(nonce, key, sender, Reply::Get(value));
            }
            Message::Store {
                key,
                version,
                value,
            } => match self.store.accept(key, version, &value) {
                Ok(_) => {
                    self.store.confirm(key, version, sender.id);
                    self.store.confirm(key, version, self.me.id);
                    self.send(sender.addr, Message::StoreAck { key, version });
                    self.records_changed(now);
                }
                Err(StoreError::Stale) => {
                    // Tell it what we hold instead, so it stops pushing the old one.
                    if let Some(r) = self.store.get(key) {
                        let version = r.version;
                        self.send(sender.addr, Message::StoreAck { key, version });
                    }
                }
                Err(StoreError::Full) => self.counters.records_refused += 1,
            },
            Message::StoreAck { key, version } => {
                self.store.confirm(key, version, sender.id);
                self.check_put_acks(key);
            }
            Message::HandoffAck { key, version } => {
                if !self.leaf.covers(key)
                    && self.store.get(key).is_some_and(|r| r.version <= version)
                {
                    self.store.remove(key);
                }
            }
        }
        false
    }

    // ---- internals: routing ----

    /// Routes `r` one hop on from this node (appending it to the path), or delivers it here.
    fn route(&mut self, now: Instant, mut r: Routed) {
        if r.path.last() != Some(&self.me.id) {
            if r.path.contains(&self.me.id) {
                self.counters.loops_avoided += 1;
                return;
            }
            if r.path.len() >= MAX_PATH {
                self.counters.routing_drops += 1;
                return;
            }
            r.path.push(self.me.id);
        }
        let key = r.key;
        // A joining node is never its own root, even if an old incarnation is still listed.
        let skip_key = matches!(r.body, RoutedBody::Join);
        let excluded = |id: Id| skip_key && id == key;
        let next = if self.leaf.covers(key) {
            match self.leaf.closest(key, excluded) {
                None => None,
                Some(c) if r.path.contains(&c.id) => {
                    self.counters.loops_avoided += 1;
                    return;
                }
                Some(c) => Some(c),
            }
        } else {
            self.next_by_prefix(key, &r.path, excluded)
        };
        match next {
            None => self.deliver(now, r),
            Some(c) => self.forward(now, r, c, 0),
        }
    }

    /// The Pastry hop when the leaf set does not cover `key`: of all known nodes, one sharing
    /// the longest prefix with the key, if longer than ours (the routing-table entry, chosen for
    /// proximity, wins ties; a longer prefix found elsewhere saves hops); else Pastry's rare
    /// case, a node with as long a prefix and numerically closer; else any node numerically
    /// closer. Never a node on the path.
    fn next_by_prefix(
        &self,
        key: Key,
        path: &[Id],
        excluded: impl Fn(Id) -> bool,
    ) -> Option<Contact> {
        let usable = |id: Id| !path.contains(&id) && !excluded(id);
        let own_prefix = self.me.id.shared_prefix_len(key);
        let own_dist = key.distance(self.me.id);
        let table_hop = self
            .table
            .next_hop(key)
            .map(|e| e.contact.id)
            .filter(|id| usable(*id));
        let known = self
            .table
            .entries()
            .map(|e| e.contact)
            .chain(self.leaf.contacts().copied())
            .chain(self.hood.members().iter().map(|e| e.contact));
        // Rank: (prefix-progress class, prefix length, is the table hop, closeness).
        let mut best: Option<((u8, usize, bool, u128), Contact)> = None;
        for c in known {
            if !usable(c.id) {
                continue;
            }
            let prefix = c.id.shared_prefix_len(key);
            let dist = key.distance(c.id);
            let class = if prefix > own_prefix {
                2
            } else if dist < own_dist {
                u8::from(prefix >= own_prefix)
            } else {
                continue;
            };
            let rank = (
                class,
                if class == 2 { prefix } else { 0 },
                Some(c.id) == table_hop,
                u128::MAX - dist,
            );
            if best.is_none_or(|(b, _)| rank > b) {
                best = Some((rank, c));
            }
        }
        best.map(|(_, c)| c)
    }

    fn hop_timeout_ms(&self, next: &Contact) -> u64 {
        let rtt = self
            .leaf
            .members()
            .iter()
            .find(|m| m.contact.id == next.id)
            .and_then(|m| m.rtt_us)
            .or_else(|| {
                self.table
                    .entries()
                    .find(|e| e.contact.id == next.id)
                    .and_then(|e| e.rtt_us)
            });
        match rtt {
            Some(us) => (3 * us as u64 / 1000 + 20)
                .clamp(self.timing.hop_timeout_min_ms, self.timing.hop_timeout_ms),
            None => self.timing.hop_timeout_ms,
        }
    }

    fn forward(&mut self, now: Instant, r: Routed, next: Contact, reroutes: u8) {
        self.send(next.addr, Message::Routed(r.clone()));
        if self.in_flight.len() >= MAX_IN_FLIGHT {
            // Untracked: delivered without a reroute if the next hop is dead.
            return;
        }
        let deadline = now.plus_ms(self.hop_timeout_ms(&next));
        self.in_flight.push(InFlight {
            routed: r,
            next,
            deadline,
            reroutes,
        });
    }

    fn expire_in_flight(&mut self, now: Instant) {
        let mut expired = Vec::new();
        let mut i = 0;
        while i < self.in_flight.len() {
            if self.in_flight[i].deadline <= now {
                expired.push(self.in_flight.swap_remove(i));
            } else {
                i += 1;
            }
        }
        for f in expired {
            self.counters.hop_timeouts += 1;
            self.next_hop_silent(now, f.next.id);
            if f.reroutes >= MAX_REROUTES || self.phase != Phase::Joined {
                self.counters.routing_drops += 1;
                continue;
            }
            // Reroute from here: the path already ends with this node.
            let key = f.routed.key;
            let skip_key = matches!(f.routed.body, RoutedBody::Join);
            let excluded = |id: Id| skip_key && id == key;
            let next = if self.leaf.covers(key) {
                self.leaf.closest(key, excluded)
            } else {
                self.next_by_prefix(key, &f.routed.path, excluded)
            };
            match next {
                Some(c) if f.routed.path.contains(&c.id) => self.counters.loops_avoided += 1,
                Some(c) => self.forward(now, f.routed, c, f.reroutes + 1),
                None => self.deliver(now, f.routed),
            }
        }
    }

    /// A next hop did not acknowledge: drop it from the routing table now; a leaf member gets
    /// a second chance (then is failed), since the leaf set must stay exact.
    fn next_hop_silent(&mut self, now: Instant, id: NodeId) {
        if let Some(m) = self.leaf.get_mut(id) {
            m.missed_acks = m.missed_acks.saturating_add(1);
            if m.missed_acks >= MAX_MISSED_ACKS {
                self.fail_peer(now, id);
            } else {
                let addr = m.contact.addr;
                self.send(
                    addr,
                    Message::Ping {
                        echo: Some(now.as_micros()),
                    },
                );
            }
        } else if self.table.contains(id) || self.hood.members().iter().any(|e| e.contact.id == id)
        {
            self.fail_peer(now, id);
        }
    }

    /// This node is the root of `r.key`: serve the request and answer the origin.
    fn deliver(&mut self, now: Instant, r: Routed) {
        let kind = match r.body {
            RoutedBody::Lookup => RequestKind::Lookup,
            RoutedBody::Join => RequestKind::Join,
            RoutedBody::Put { .. } => RequestKind::Put,
            RoutedBody::Get => RequestKind::Get,
            RoutedBody::Handoff { .. } => RequestKind::Handoff,
        };
        self.emit(Event::Delivered {
            key: r.key,
            origin: r.origin.id,
            kind,
        });
        let origin = r.origin;
        let reply = match r.body {
            RoutedBody::Join => {
                self.send_rows_to_joiner(origin);
                let members: Vec<Contact> = self.leaf.contacts().copied().collect();
                Message::JoinReply {
                    nonce: r.nonce,
                    members,
                }
            }
            RoutedBody::Lookup => Message::LookupReply {
                nonce: r.nonce,
                key: r.key,
                path: r.path,
            },
            RoutedBody::Put { value } => {
                let version = self.store.get(r.key).map_or(1, |rec| rec.version + 1);
                match self.store.accept(r.key, version, &value) {
                    Ok(_) => {
                        self.store.confirm(r.key, version, self.me.id);
                        // Acknowledged only once k nodes hold it (see `check_put_acks`).
                        self.put_acks.retain(|p| p.expires > now);
                        if self.put_acks.len() < MAX_PENDING {
                            self.put_acks.push(PutAwaitingCopies {
                                key: r.key,
                                version,
                                nonce: r.nonce,
                                origin,
                                expires: now.plus_ms(self.timing.request_timeout_ms),
                            });
                        }
                        self.replicate_key(now, r.key);
                        self.check_put_acks(r.key);
                        return;
                    }
                    Err(_) => {
                        self.counters.records_refused += 1;
                        Message::PutAck {
                            nonce: r.nonce,
                            key: r.key,
                            version: 0,
                        }
                    }
                }
            }
            RoutedBody::Handoff { version, value } => {
                if self.store.accept(r.key, version, &value) == Err(StoreError::Full) {
                    self.counters.records_refused += 1;
                    return;
                }
                self.store.confirm(r.key, version, self.me.id);
                if self.leaf.covers(r.key) {
                    // (Uncovered, this node is the root by the rare case: keep it, do not
                    // hand it off to itself again.)
                    self.replicate_key(now, r.key);
                }
                let Some(held) = self.store.get(r.key).map(|rec| rec.version) else {
                    return;
                };
                Message::HandoffAck {
                    key: r.key,
                    version: held,
                }
            }
            RoutedBody::Get => {
                let rec = self.store.get(r.key);
                Message::GetReply {
                    nonce: r.nonce,
                    key: r.key,
                    value: rec.map(|x| x.value.clone()),
                    version: rec.map_or(0, |x| x.version),
                }
            }
        };
        self.answer(origin, reply);
    }

    /// Sends a root's answer to the origin, or completes it here if this node is the origin.
    fn answer(&mut self, origin: Contact, reply: Message) {
        if origin.id == self.me.id {
            let me = self.me;
            match reply {
                Message::LookupReply { nonce, key, path } => {
                    self.complete(nonce, key, me, Reply::Lookup(path))
                }
                Message::PutAck {
                    nonce,
                    key,
                    version,
                } => self.complete(nonce, key, me, Reply::Put(version)),
                Message::GetReply {
                    nonce, key, value, ..
                } => self.complete(nonce, key, me, Reply::Get(value)),
                _ => {}
            }
        } else {
            self.send(origin.addr, reply);
        }
    }

    /// Every node a join passes sends the joiner its rows up to the prefix they share.
    fn send_rows_to_joiner(&mut self, joiner: Contact) {
        let shared = self.me.id.shared_prefix_len(joiner.id);
        let upto = shared.min(self.table.rows().saturating_sub(1));
        for row in 0..=upto {
            let entries = self.table.row(row);
            if !entries.is_empty() {
                self.send(
                    joiner.addr,
                    Message::Row {
                        row: row as u8,
                        entries,
                    },
                );
            }
        }
    }

    // ---- internals: own requests ----

    fn start_request(
        &mut self,
        now: Instant,
        key: Key,
        kind: PendingKind,
    ) -> Result<OpId, RequestError> {
        if self.phase != Phase::Joined {
            return Err(RequestError::NotJoined);
        }
        if self.pending.len() >= MAX_PENDING {
            return Err(RequestError::Busy);
        }
        let op = OpId(self.next_op);
        self.next_op += 1;
        let nonce = self.rng.next_u64();
        self.pending.push(Pending {
            op,
            nonce,
            key,
            kind,
            deadline: now.plus_ms(self.timing.request_timeout_ms),
            attempts_left: self.timing.request_attempts - 1,
        });
        self.launch(now, self.pending.len() - 1);
        Ok(op)
    }

    fn launch(&mut self, now: Instant, i: usize) {
        let p = &self.pending[i];
        let body = match &p.kind {
            PendingKind::Lookup => RoutedBody::Lookup,
            PendingKind::Put(v) => RoutedBody::Put { value: v.clone() },
            PendingKind::Get => RoutedBody::Get,
        };
        let r = Routed {
            nonce: p.nonce,
            key: p.key,
            origin: self.me,
            path: vec![self.me.id],
            body,
        };
        self.route(now, r);
    }

    fn expire_pending(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.pending.len() {
            if self.pending[i].deadline > now {
                i += 1;
                continue;
            }
            if self.pending[i].attempts_left == 0 || self.phase != Phase::Joined {
                let p = self.pending.swap_remove(i);
                let kind = match p.kind {
                    PendingKind::Lookup => RequestKind::Lookup,
                    PendingKind::Put(_) => RequestKind::Put,
                    PendingKind::Get => RequestKind::Get,
                };
                self.emit(Event::RequestFailed {
                    op: p.op,
                    key: p.key,
                    kind,
                });
                continue;
            }
            let nonce = self.rng.next_u64();
            let p = &mut self.pending[i];
            p.attempts_left -= 1;
            p.nonce = nonce;
            p.deadline = now.plus_ms(self.timing.request_timeout_ms);
            self.launch(now, i);
            i += 1;
        }
    }

    fn complete(&mut self, nonce: u64, key: Key, root: Contact, reply: Reply) {
        let Some(i) = self
            .pending
            .iter()
            .position(|p| p.nonce == nonce && p.key == key)
        else {
            return; // a late or duplicate answer
        };
        let p = self.pending.swap_remove(i);
        let event = match (p.kind, reply) {
            (PendingKind::Lookup, Reply::Lookup(path)) => Event::LookupDone {
                op: p.op,
                key,
                root,
                path,
            },
            (PendingKind::Put(_), Reply::Put(0)) => Event::RequestFailed {
                op: p.op,
                key,
                kind: RequestKind::Put,
            },
            (PendingKind::Put(_), Reply::Put(version)) => Event::PutDone {
                op: p.op,
                key,
                root,
                version,
            },
            (PendingKind::Get, Reply::Get(value)) => Event::GetDone {
                op: p.op,
                key,
                root,
                value,
            },
            (kind, _) => {
                // An answer of the wrong kind: keep waiting.
                self.counters.ignored += 1;
                self.pending.push(Pending { kind, ..p });
                return;
            }
        };
        self.emit(event);
    }

    // ---- internals: records ----

    fn records_changed(&mut self, now: Instant) {
        if !self.store.is_empty() {
            // Batch the changes of the next moments into one pass.
            self.timers.record_pass = self.timers.record_pass.min(now.plus_ms(100));
        }
    }

    /// One bounded step of re-replication: push each record to the replica-set members that
    /// have not confirmed it; drop records this node no longer needs to hold.
    fn record_pass(&mut self, now: Instant) {
        let keys = self.store.keys_after(self.record_cursor, RECORD_BATCH);
        for key in &keys {
            self.replicate_key(now, *key);
        }
        if keys.len() < RECORD_BATCH {
            self.record_cursor = None;
            self.timers.record_pass = now.plus_ms(self.jitter(self.timing.record_refresh_ms));
        } else {
            self.record_cursor = keys.last().copied();
            self.timers.record_pass = now.plus_ms(1);
        }
    }

    /// Acknowledges the puts of `key` whose version now has `k` confirmed copies.
    fn check_put_acks(&mut self, key: Key) {
        let Some(rec) = self.store.get(key) else {
            return;
        };
        if rec.confirmed.len() < self.replicas {
            return;
        }
        let held = rec.version;
        let mut i = 0;
        while i < self.put_acks.len() {
            let p = &self.put_acks[i];
            if p.key == key && p.version <= held {
                let p = self.put_acks.swap_remove(i);
                let ack = Message::PutAck {
                    nonce: p.nonce,
                    key,
                    version: p.version,
                };
                self.answer(p.origin, ack);
            } else {
                i += 1;
            }
        }
    }

    fn replicate_key(&mut self, now: Instant, key: Key) {
        if !self.leaf.covers(key) {
            // Not ours to place: hand it to the root, which answers `HandoffAck`.
            let Some(rec) = self.store.get(key) else {
                return;
            };
            let body = RoutedBody::Handoff {
                version: rec.version,
                value: rec.value.clone(),
            };
            let r = Routed {
                nonce: self.rng.next_u64(),
                key,
                origin: self.me,
                path: vec![self.me.id],
                body,
            };
            self.route(now, r);
            return;
        }
        let set = self.leaf.replica_set(key, self.replicas);
        let me = self.me.id;
        let Some(rec) = self.store.get_mut(key) else {
            return;
        };
        rec.confirmed.retain(|h| set.contains(h));
        let missing: Vec<NodeId> = set
            .iter()
            .copied()
            .filter(|id| *id != me && !rec.confirmed.contains(id))
            .collect();
        if !set.contains(&me) && missing.is_empty() {
            // Handed off: every replica-set member has confirmed a copy.
            self.store.remove(key);
            return;
        }
        let (version, value) = (rec.version, rec.value.clone());
        for id in missing {
            if let Some(m) = self.leaf.members().iter().find(|m| m.contact.id == id) {
                let addr = m.contact.addr;
                self.send(
                    addr,
                    Message::Store {
                        key,
                        version,
                        value: value.clone(),
                    },
                );
            }
        }
    }
}

enum Reply {
    Lookup(Vec<NodeId>),
    Put(u64),
    Get(Option<Vec<u8>>),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::placeholder_public_key;

    fn addr(i: u8) -> PeerAddr {
        PeerAddr {
            ipv4: [10, 0, 0, i],
            port: 7000,
        }
    }

    fn config(i: u8) -> NodeConfig {
        let key = placeholder_public_key(&format!("node-{i}"));
        NodeConfig::new(&key, addr(i), ServerTag(1), [i; 32])
    }

    fn events(n: &mut Node) -> Vec<Event> {
        core::iter::from_fn(|| n.poll_event()).collect()
    }

    /// Delivers every queued datagram between the nodes until quiet (a two-node `Pair`).
    fn exchange(nodes: &mut [Node], now: Instant) {
        for _ in 0..100 {
            let mut moved = false;
            for i in 0..nodes.len() {
                while let Some(t) = nodes[i].poll_transmit() {
                    moved = true;
                    let from = nodes[i].contact().addr;
                    if let Some(j) = nodes.iter().position(|n| n.contact().addr == t.dst) {
                        nodes[j].handle_datagram(now, from, &t.payload);
                    }
                }
            }
            if !moved {
                return;
            }
        }
        panic!("the nodes never went quiet");
    }

    #[test]
    fn config_is_validated() {
        let mut c = config(1);
        c.leaf_set_len = 5;
        assert_eq!(
            Node::new(c, Instant::ZERO).err(),
            Some(ConfigError::LeafSetLen(5))
        );
        let mut c = config(1);
        c.replicas = 10;
        assert_eq!(
            Node::new(c, Instant::ZERO).err(),
            Some(ConfigError::Replicas(10))
        );
        let mut c = config(1);
        c.timing.leaf_fail_ms = c.timing.keepalive_ms;
        assert_eq!(Node::new(c, Instant::ZERO).err(), Some(ConfigError::Timing));
    }

    #[test]
    fn requests_need_a_joined_node_and_small_values() {
        let mut n = Node::new(config(1), Instant::ZERO).unwrap();
        assert_eq!(n.poll_timeout(), None);
        assert_eq!(n.lookup(Instant::ZERO, Id(5)), Err(RequestError::NotJoined));
        n.join(Instant::ZERO, &[]);
        assert_eq!(events(&mut n), vec![Event::Joined]);
        let big = vec![0u8; MAX_VALUE_LEN + 1];
        assert_eq!(
            n.put(Instant::ZERO, Id(5), &big),
            Err(RequestError::ValueTooLarge)
        );
    }

    #[test]
    fn alone_a_node_is_every_key_root_but_cannot_ack_k_copies() {
        let mut n = Node::new(config(1), Instant::ZERO).unwrap();
        n.join(Instant::ZERO, &[]);
        events(&mut n);
        let op = n.lookup(Instant::ZERO, Id(77)).unwrap();
        let ev = events(&mut n);
        assert!(ev.contains(&Event::LookupDone {
            op,
            key: Id(77),
            root: n.contact(),
            path: vec![n.id()],
        }));
        // k = 3 copies cannot exist with one node: the put fails after its attempts.
        let op = n.put(Instant::ZERO, Id(9), b"v").unwrap();
        let mut now = Instant::ZERO;
        let mut failed = false;
        for _ in 0..40 {
            now = n.poll_timeout().unwrap().max(now);
            n.handle_timeout(now);
            failed |= events(&mut n).iter().any(|e| {
                matches!(e, Event::RequestFailed { op: o, kind: RequestKind::Put, .. } if *o == op)
            });
        }
        assert!(failed);
    }

    #[test]
    fn second_node_joins_through_the_first_and_both_know_each_other() {
        let mut a = {
            let mut c = config(1);
            c.replicas = 2;
            Node::new(c, Instant::ZERO).unwrap()
        };
        a.join(Instant::ZERO, &[]);
        let mut b = {
            let mut c = config(2);
            c.replicas = 2;
            Node::new(c, Instant::ZERO).unwrap()
        };
        b.join(Instant::ZERO, &[addr(1)]);
        let mut nodes = [a, b];
        exchange(&mut nodes, Instant::from_millis(1));
        let [a, b] = &mut nodes;
        assert!(b.is_joined());
        assert!(events(b).contains(&Event::Joined));
        assert!(a.leaf_set().contains(b.id()));
        assert!(b.leaf_set().contains(a.id()));
        // With k = 2, a put from b is acknowledged once both hold it.
        let key = Id::for_name(b"k");
        let op = b.put(Instant::from_millis(2), key, b"value").unwrap();
        exchange(&mut nodes, Instant::from_millis(3));
        let [a, b] = &mut nodes;
        assert!(
            events(b)
                .iter()
                .any(|e| matches!(e, Event::PutDone { op: o, .. } if *o == op))
        );
        assert!(a.records().get(key).is_some() && b.records().get(key).is_some());
        assert_eq!(a.counters().undecodable + b.counters().undecodable, 0);
    }

    /// Like `exchange`, through `handle_authenticated_datagram`; `verified` answers the
    /// NodeId the trust layer proved for a datagram from node `i` to node `j`.
    fn exchange_authenticated(
        nodes: &mut [Node],
        now: Instant,
        verified: impl Fn(usize, usize) -> NodeId,
    ) {
        for _ in 0..100 {
            let mut moved = false;
            for i in 0..nodes.len() {
                while let Some(t) = nodes[i].poll_transmit() {
                    moved = true;
                    let from = nodes[i].contact().addr;
                    if let Some(j) = nodes.iter().position(|n| n.contact().addr == t.dst) {
                        nodes[j].handle_authenticated_datagram(
                            now,
                            from,
                            verified(i, j),
                            &t.payload,
                        );
                    }
                }
            }
            if !moved {
                return;
            }
        }
        panic!("the nodes never went quiet");
    }

    fn joining_pair() -> [Node; 2] {
        let mut a = Node::new(config(1), Instant::ZERO).unwrap();
        a.join(Instant::ZERO, &[]);
        let mut b = Node::new(config(2), Instant::ZERO).unwrap();
        b.join(Instant::ZERO, &[addr(1)]);
        [a, b]
    }

    #[test]
    fn authenticated_datagrams_must_name_the_verified_sender() {
        // Genuine: each header names the node the session verified; the join goes through.
        let mut nodes = joining_pair();
        let ids = [nodes[0].id(), nodes[1].id()];
        exchange_authenticated(&mut nodes, Instant::from_millis(1), |i, _| ids[i]);
        let [a, b] = &mut nodes;
        assert!(b.is_joined());
        assert!(a.leaf_set().contains(b.id()));
        assert_eq!(
            a.counters().sender_mismatch + b.counters().sender_mismatch,
            0
        );

        // Forged: node 2's session verified another identity than its headers claim.
        let mut nodes = joining_pair();
        let impostor = Id::for_name(b"someone else");
        let a_id = nodes[0].id();
        exchange_authenticated(&mut nodes, Instant::from_millis(1), |i, _| {
            if i == 1 { impostor } else { a_id }
        });
        let [a, b] = &mut nodes;
        assert!(!b.is_joined());
        assert!(!a.leaf_set().contains(b.id()));
        assert!(a.counters().sender_mismatch >= 1);
        assert_eq!(
            a.counters().datagrams_in,
            a.counters().sender_mismatch,
            "every datagram from the impostor was dropped"
        );
        assert_eq!(b.counters().sender_mismatch, 0);
        // The clear-mode entry point does not check (the simulator and clear mode use it).
        let before = a.counters().sender_mismatch;
        let packet = Packet {
            header: Header {
                version: WIRE_VERSION,
                sender: b.id(),
                server: ServerTag(1),
                joined: true,
            },
            message: Message::Ping { echo: None },
        };
        let bytes = wire::encode(&packet, MAX_DATAGRAM).unwrap();
        a.handle_datagram(Instant::from_millis(2), addr(2), &bytes);
        assert_eq!(a.counters().sender_mismatch, before);
        assert_eq!(a.counters().undecodable + a.counters().rejected, 0);
    }
}
