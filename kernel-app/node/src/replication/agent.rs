//! The replication agent: one node's side of every replicated instance, I/O-free.
//!
//! Inputs: [`ReplicationAgent::handle_message`] (a peer's replication message),
//! [`ReplicationAgent::handle_timeout`], [`ReplicationAgent::handle_store_result`] (the
//! placement store's answer), client connections ([`ReplicationAgent::open_connection`],
//! [`ReplicationAgent::handle_client_bytes`]) and instance creation. Outputs: `poll_transmit`,
//! `poll_store_op`, `poll_event` (client replies, closes, role changes), `poll_timeout`.
//!
//! # Safety of mastership (fencing)
//!
//! A master serves (reads and writes) only while it holds a *lease*: acknowledgements of its
//! heartbeats from enough slaves that, with itself, they make a [`lease_quorum`]. A slave's
//! acknowledgement is valid at the master until `sent + lease_ms` on the master's clock,
//! counted from when the master *sent* the heartbeat. A slave that acknowledged a heartbeat
//! it received at `t` (its clock) promises not to vote for another master until
//! `t + promise_ms`, where `promise_ms = lease_ms * (1 + 2ρ) / (1 - ρ) + 1` and ρ is the clock
//! drift bound ([`AgentConfig::max_drift_ppm`]): with rates within ρ of real time, the
//! slave's wait is longer in real time than the master's lease. A candidate needs votes from a
//! [`promotion_quorum`] (which intersects every lease quorum) and a compare-and-set of the
//! placement record to epoch + 1, so every epoch has one master and a new master can only be
//! elected after the old one's lease has run out. A voter also stops acknowledging the older
//! epoch's heartbeats. A node that restarts (its memory gone) waits `promise_ms` before voting
//! and does not vote or stand until it has synced with a master (its empty log must not
//! outvote a copy of an acknowledged write).
//!
//! # Durability
//!
//! Votes go only to candidates whose log is at least as new (last entry's epoch, then sequence)
//! as the voter's. Sync mode acknowledges a write once a [`sync_quorum`] holds it, which every
//! promotion quorum intersects: the winner holds every acknowledged write. Async mode answers
//! at once; a master's suffix that no slave got is dropped when it rejoins, and the dropped
//! ranges are counted in a ledger the masters pass on ([`InstanceStatus::lost_writes`]).

use alloc::boxed::Box;
use alloc::collections::{BTreeMap, BTreeSet, VecDeque};
use alloc::vec::Vec;

use super::log::{ChangeLog, Position};
use super::placement::{
    PlacementRecord, StoreOp, StoreOpId, StoreResult, lease_quorum, promotion_quorum, sync_quorum,
};
use super::service::{
    AgentError, AgentReply, Decoded, FatalFrame, ReplicatedService, ReplicationView, Request,
    RequestClass, RequestDecoder, Role, ServiceLimits, ServiceSet, ServiceState, SlaveView,
};
use super::wire::{self, Envelope, LostRange, Msg, Outgoing};
use crate::rng::Rng;
use crate::{Instant, Key, NodeId};

/// A client connection, named by the driver.
pub type ConnId = u64;

/// Timing and bounds of the agent.
#[derive(Clone, Debug)]
pub struct AgentConfig {
    pub me: NodeId,
    /// How long a slave's heartbeat acknowledgement keeps the master serving.
    pub lease_ms: u64,
    /// How often the master sends heartbeats (renews its lease).
    pub heartbeat_ms: u64,
    /// Bound on clock rate error between any two nodes, parts per million.
    pub max_drift_ppm: u64,
    /// Sync mode: how long a write waits for the slaves before it fails.
    pub sync_timeout_ms: u64,
    /// How long a relayed batch waits for the master before reads re-dial and writes fail.
    pub relay_timeout_ms: u64,
    /// How long a request waits for a master to be known.
    pub no_master_timeout_ms: u64,
    /// A placement store op without an answer by then counts as unavailable.
    pub store_timeout_ms: u64,
    /// WAIT's longest wait (WAIT 0 means this).
    pub wait_max_ms: u64,
    /// Backlog bounds (partial resync window).
    pub backlog_entries: usize,
    pub backlog_bytes: usize,
    /// Entries in flight to one slave beyond its acknowledgement.
    pub window_entries: u64,
    pub batch_bytes: usize,
    pub snapshot_chunk_bytes: usize,
    /// Requests queued on one connection before the agent stops reading it.
    pub max_queued_per_conn: usize,
    pub max_conns: usize,
    /// Relays remembered for duplicate suppression.
    pub relay_cache: usize,
    pub limits: ServiceLimits,
    /// Seed of the agent's jitter (election backoff) and relay ids.
    pub seed: u64,
}

impl AgentConfig {
    pub fn new(me: NodeId, seed: u64) -> Self {
        AgentConfig {
            me,
            lease_ms: 1000,
            heartbeat_ms: 100,
            max_drift_ppm: 10_000,
            sync_timeout_ms: 2000,
            relay_timeout_ms: 1500,
            no_master_timeout_ms: 5000,
            wait_max_ms: 10_000,
            store_timeout_ms: 3000,
            backlog_entries: 10_000,
            backlog_bytes: 4 * 1024 * 1024,
            window_entries: 512,
            batch_bytes: 256 * 1024,
            snapshot_chunk_bytes: 64 * 1024,
            max_queued_per_conn: 256,
            max_conns: 1024,
            relay_cache: 1024,
            limits: ServiceLimits::default(),
            seed,
        }
    }

    /// How long a slave will not vote after acknowledging a heartbeat (see the module doc).
    pub fn promise_ms(&self) -> u64 {
        let rho = self.max_drift_ppm.min(100_000);
        self.lease_ms * (1_000_000 + 2 * rho) / (1_000_000 - rho) + 1
    }

    /// How long a slave hears nothing from its master before it stands for election.
    pub fn promotion_delay_ms(&self) -> u64 {
        self.promise_ms() + 2 * self.heartbeat_ms
    }

    /// How long a node that (re)started neither renews leases nor votes: any vote it may have
    /// given before it lost its memory belongs to a candidacy that has ended by then, and the
    /// record it reads from the store afterwards names that candidacy's epoch if it won.
    pub fn quarantine_ms(&self) -> u64 {
        self.promise_ms() + self.election_ms() + self.store_timeout_ms
    }

    /// How long a candidacy lasts before it is abandoned.
    pub fn election_ms(&self) -> u64 {
        self.lease_ms
    }

    fn tick_ms(&self) -> u64 {
        (self.heartbeat_ms / 2).max(1)
    }
}

/// What the agent tells its driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// Bytes for a client connection, in order.
    Reply { conn: ConnId, bytes: Vec<u8> },
    /// Close the connection after the replies already given.
    Close { conn: ConnId },
    /// This node's role for an instance changed.
    RoleChanged { app: Key, role: Role, epoch: u64 },
}

/// Counters, for `app status` and the checks.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    pub bad_messages: u64,
    pub malformed_frames: u64,
    pub over_limit_frames: u64,
    pub refused_conns: u64,
    pub relays_sent: u64,
    pub relay_redials: u64,
    pub relay_errors: u64,
    pub duplicate_relays: u64,
    pub fenced_refusals: u64,
    pub sync_timeouts: u64,
    pub no_master_errors: u64,
    pub elections: u64,
    pub promotions: u64,
    pub step_downs: u64,
    pub snapshots_sent: u64,
    pub snapshots_installed: u64,
    pub store_ops: u64,
}

/// Most key names kept for dropped writes.
pub const MAX_DROPPED_KEYS: usize = 32;

/// An instance as this node sees it (`app status`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InstanceStatus {
    pub record: Option<PlacementRecord>,
    pub view: ReplicationView,
    /// Whether this node would apply a write now.
    pub accepting_writes: bool,
    /// Writes lost in past failovers, from the ledger masters pass on.
    pub lost_writes: u64,
    /// Entries this node dropped from its own log when it rejoined, and some of their keys.
    pub dropped_here: u64,
    pub dropped_keys: Vec<Vec<u8>>,
    pub state_hash: Option<[u8; 32]>,
    pub memory_used: usize,
    /// This member's log is one it did not lose (synced since it started): it may vote.
    pub trusted: bool,
}

/// One client reply slot, kept in request order.
enum Slot {
    Ready {
        bytes: Vec<u8>,
        close: bool,
    },
    /// Not yet executed or relayed.
    Queued {
        request: Request,
        class: RequestClass,
        since: Instant,
    },
    /// In the batch relayed to the master.
    Relayed {
        request: Request,
        write: bool,
    },
    /// At the master: a sync write waiting for the quorum, or WAIT.
    Waiting(Waiter),
}

struct Waiter {
    target_seq: u64,
    deadline: Instant,
    kind: WaitKind,
}

enum WaitKind {
    SyncWrite { reply: Vec<u8> },
    Wait { replicas: u32 },
}

struct Conn {
    app: Key,
    service: &'static dyn ReplicatedService,
    decoder: Box<dyn RequestDecoder>,
    slots: VecDeque<Slot>,
    /// No more requests are read (a fatal frame or QUIT).
    closing: bool,
    relay: Option<RelayInFlight>,
}

struct RelayInFlight {
    relay_id: u64,
    to: NodeId,
    epoch: u64,
    first_sent: Instant,
    last_sent: Instant,
    /// Times sent; after a retry, a denial may come from a restarted master that forgot
    /// applying an earlier copy.
    sends: u32,
    requests: Vec<Vec<Vec<u8>>>,
}

/// A relayed batch at the master, answered when every slot is ready.
struct RemoteBatch {
    from: NodeId,
    relay_id: u64,
    slots: Vec<Slot>,
}

/// A slave's progress as its master sees it.
#[derive(Clone, Debug)]
struct Progress {
    node: NodeId,
    /// Synced in this epoch: its log is a prefix of ours, entries flow.
    synced: bool,
    acked: u64,
    next: u64,
    lease_until: Option<Instant>,
    last_progress: Instant,
}

struct MasterSide {
    slaves: Vec<Progress>,
    next_heartbeat: Instant,
    lease_lost_at: Option<Instant>,
    snapshot: Option<Snapshot>,
    remote: Vec<RemoteBatch>,
    next_expire: Instant,
}

/// Relays this node applied as master, by origin and id, with their replies once done: a
/// repeated relay is answered from here, never applied twice. Kept across role changes.
#[derive(Default)]
struct RelayCache {
    map: BTreeMap<(NodeId, u64), Option<Vec<Vec<u8>>>>,
    order: VecDeque<(NodeId, u64)>,
}

impl RelayCache {
    fn insert(&mut self, key: (NodeId, u64), limit: usize) {
        self.map.insert(key, None);
        self.order.push_back(key);
        while self.order.len() > limit {
            if let Some(k) = self.order.pop_front() {
                self.map.remove(&k);
            }
        }
    }

    fn complete(&mut self, key: (NodeId, u64), replies: &[Vec<u8>]) {
        if let Some(e) = self.map.get_mut(&key) {
            *e = Some(replies.to_vec());
        }
    }
}

struct Snapshot {
    at_seq: u64,
    at_epoch: u64,
    history: Vec<(u64, u64)>,
    chunks: Vec<Vec<u8>>,
}

struct Fetch {
    at_seq: u64,
    at_epoch: u64,
    common: u64,
    history: Vec<(u64, u64)>,
    total: u32,
    got: Vec<Vec<u8>>,
    last_asked: Instant,
}

struct SlaveSide {
    synced: bool,
    last_heard: Option<Instant>,
    last_sync_ask: Option<Instant>,
    fetch: Option<Fetch>,
    /// Random extra wait before standing, so slaves rarely stand at once.
    jitter_ms: u64,
    /// Stand again at this time (after a split vote), unless a master is heard first.
    stand_at: Option<Instant>,
    /// When the log last advanced (or a sync began): a synced slave that stops advancing
    /// while the master's log is ahead asks to sync again (a lost snapshot offer).
    last_progress: Instant,
}

struct CandidateSide {
    new_epoch: u64,
    votes: BTreeSet<NodeId>,
    deadline: Instant,
    cas_in_flight: bool,
    cas_tries: u32,
    /// A voter's log is newer: yield to it rather than stand again soon.
    outranked: bool,
}

enum MemberRole {
    Master(MasterSide),
    Slave(SlaveSide),
    Candidate(CandidateSide),
}

/// This node's copy of an instance it is a member of.
struct Member {
    state: Box<dyn ServiceState>,
    log: ChangeLog,
    role: MemberRole,
    voted_epoch: u64,
    /// Not before this may the node vote or stand (its latest heartbeat promise).
    promise_until: Instant,
    /// The log is one this node did not lose: it synced since it started, or the instance
    /// never had a master.
    trusted: bool,
    /// Not trusted yet: becomes trusted once the log reaches this (the master's end when
    /// the partial sync began).
    trust_at: Option<u64>,
    dropped_here: u64,
    dropped_keys: Vec<Vec<u8>>,
}

struct Instance {
    record: Option<PlacementRecord>,
    member: Option<Member>,
    lost: Vec<LostRange>,
    fetching_record: Option<StoreOpId>,
    record_stale_since: Option<Instant>,
    /// The master named by the record denied it: relays wait until this or a newer record.
    relay_backoff_until: Option<Instant>,
    last_fetch_at: Option<Instant>,
    relays: RelayCache,
    /// This node has been master of the instance since it started.
    served: bool,
    /// The record was read from the store after this node's quarantine: it knows every
    /// epoch it may have voted for before a restart, and may renew leases and vote.
    fresh: bool,
}

enum PendingOp {
    Fetch { app: Key },
    Cas { app: Key, new_epoch: u64 },
    Create { app: Key },
}

/// Why an instance could not be created.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CreateError {
    /// The record breaks its bounds.
    Unbounded,
    /// The service is not linked into this node.
    UnknownService,
}

impl core::fmt::Display for CreateError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            CreateError::Unbounded => "placement record breaks its bounds",
            CreateError::UnknownService => "no such replicated service on this node",
        })
    }
}

impl core::error::Error for CreateError {}

/// Why a client connection was not opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpenError {
    UnknownService,
    TooManyConnections,
}

impl core::fmt::Display for OpenError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            OpenError::UnknownService => "no such replicated service on this node",
            OpenError::TooManyConnections => "too many client connections",
        })
    }
}

impl core::error::Error for OpenError {}

/// One node's replication agent.
pub struct ReplicationAgent {
    cfg: AgentConfig,
    services: ServiceSet,
    rng: Rng,
    started: Instant,
    instances: BTreeMap<Key, Instance>,
    conns: BTreeMap<ConnId, Conn>,
    transmit: VecDeque<Outgoing>,
    store_ops: VecDeque<(StoreOpId, StoreOp)>,
    pending_ops: BTreeMap<StoreOpId, (PendingOp, Instant)>,
    /// The latest time seen (store ops are stamped with it).
    last_now: Instant,
    next_op: StoreOpId,
    next_relay: u64,
    events: VecDeque<Event>,
    next_tick: Instant,
    counters: Counters,
}

/// Most instances one node tracks.
pub const MAX_INSTANCES: usize = 64;

impl Member {
    fn new(
        service: &dyn ReplicatedService,
        cfg: &AgentConfig,
        now: Instant,
        started: Instant,
        trusted: bool,
    ) -> Self {
        Member {
            state: service.new_state(cfg.limits),
            log: ChangeLog::new(cfg.backlog_entries, cfg.backlog_bytes),
            role: MemberRole::Slave(SlaveSide::new(now, 0)),
            voted_epoch: 0,
            // A node that restarts may have acknowledged heartbeats it no longer remembers.
            promise_until: started.plus_ms(cfg.promise_ms()),
            trusted,
            trust_at: None,
            dropped_here: 0,
            dropped_keys: Vec::new(),
        }
    }

    fn is_master(&self) -> bool {
        matches!(self.role, MemberRole::Master(_))
    }
}

impl SlaveSide {
    fn new(now: Instant, jitter_ms: u64) -> Self {
        SlaveSide {
            synced: false,
            last_heard: Some(now),
            last_sync_ask: None,
            fetch: None,
            jitter_ms,
            stand_at: None,
            last_progress: now,
        }
    }
}

impl MasterSide {
    fn new(record: &PlacementRecord, now: Instant) -> Self {
        MasterSide {
            slaves: record
                .slaves
                .iter()
                .map(|&node| Progress {
                    node,
                    synced: false,
                    acked: 0,
                    next: 1,
                    lease_until: None,
                    last_progress: now,
                })
                .collect(),
            next_heartbeat: now,
            lease_lost_at: None,
            snapshot: None,
            remote: Vec::new(),
            next_expire: now,
        }
    }

    fn lease_valid(&self, now: Instant) -> bool {
        let n = self.slaves.len() + 1;
        let live = self
            .slaves
            .iter()
            .filter(|p| p.lease_until.is_some_and(|t| t > now))
            .count();
        live + 1 >= lease_quorum(n)
    }

    /// Slaves in sync whose log holds `seq`.
    fn holding(&self, seq: u64) -> usize {
        self.slaves
            .iter()
            .filter(|p| p.synced && p.acked >= seq)
            .count()
    }
}

fn add_lost(ledger: &mut Vec<LostRange>, r: LostRange) {
    if r.first > r.last || ledger.contains(&r) {
        return;
    }
    // Overlaps within one epoch merge, so a range reported twice is counted once.
    let mut merged = r;
    ledger.retain(|x| {
        let overlap =
            x.epoch == merged.epoch && x.first <= merged.last + 1 && merged.first <= x.last + 1;
        if overlap {
            merged.first = merged.first.min(x.first);
            merged.last = merged.last.max(x.last);
        }
        !overlap
    });
    ledger.push(merged);
    ledger.sort();
    while ledger.len() > wire::MAX_LOST_RANGES {
        // Keep the count: fold the two oldest ranges' sizes into one (their epochs differ).
        let a = ledger.remove(0);
        let b = &mut ledger[0];
        let size = a.last - a.first + 1;
        b.first = b.first.saturating_sub(size);
    }
}

fn lost_count(ledger: &[LostRange]) -> u64 {
    ledger.iter().map(|r| r.last - r.first + 1).sum()
}

impl ReplicationAgent {
    pub fn new(cfg: AgentConfig, services: ServiceSet, now: Instant) -> Self {
        let mut rng = Rng::from_u64(cfg.seed);
        // Relay ids start at a random point so a restarted node does not reuse ids a master
        // still remembers.
        let next_relay = rng.next_u64() >> 1;
        ReplicationAgent {
            next_tick: now,
            cfg,
            services,
            rng,
            started: now,
            instances: BTreeMap::new(),
            conns: BTreeMap::new(),
            transmit: VecDeque::new(),
            store_ops: VecDeque::new(),
            pending_ops: BTreeMap::new(),
            last_now: now,
            next_op: 1,
            next_relay,
            events: VecDeque::new(),
            counters: Counters::default(),
        }
    }

    pub fn config(&self) -> &AgentConfig {
        &self.cfg
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    pub fn poll_transmit(&mut self) -> Option<Outgoing> {
        self.transmit.pop_front()
    }

    pub fn poll_store_op(&mut self) -> Option<(StoreOpId, StoreOp)> {
        self.store_ops.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        // Nothing to tick for (no instance, connection or store operation): an idle node
        // sleeps instead of waking every half heartbeat. Anything new makes a deadline again
        // (possibly already past, so it runs at once).
        if self.instances.is_empty() && self.conns.is_empty() && self.pending_ops.is_empty() {
            return None;
        }
        Some(self.next_tick)
    }

    fn send(&mut self, to: NodeId, app: Key, msg: Msg) {
        if to == self.cfg.me {
            return;
        }
        self.transmit.push_back(Outgoing {
            to,
            bytes: wire::encode(&Envelope { app, msg }),
        });
    }

    fn store_op(&mut self, op: StoreOp, pending: PendingOp) -> StoreOpId {
        let id = self.next_op;
        self.next_op += 1;
        self.counters.store_ops += 1;
        self.pending_ops.insert(id, (pending, self.last_now));
        self.store_ops.push_back((id, op));
        id
    }

    fn instance_entry(&mut self, app: Key) -> Option<Instance> {
        if let Some(i) = self.instances.remove(&app) {
            return Some(i);
        }
        if self.instances.len() >= MAX_INSTANCES {
            return None;
        }
        Some(Instance {
            record: None,
            member: None,
            lost: Vec::new(),
            fetching_record: None,
            record_stale_since: None,
            relay_backoff_until: None,
            last_fetch_at: None,
            relays: RelayCache::default(),
            served: false,
            fresh: false,
        })
    }

    /// Creates an instance: stores its record (epoch 0, version 1) if none exists; its
    /// preferred master then stands for epoch 1 like any later master.
    pub fn create_instance(&mut self, record: PlacementRecord) -> Result<StoreOpId, CreateError> {
        let mut record = record;
        record.epoch = 0;
        record.version = 1;
        record.check().map_err(|_| CreateError::Unbounded)?;
        if self.services.get(&record.service).is_none() {
            return Err(CreateError::UnknownService);
        }
        let app = record.app();
        Ok(self.store_op(
            StoreOp::CompareAndSet {
                app,
                expected_version: 0,
                record,
            },
            PendingOp::Create { app },
        ))
    }

    /// Looks the instance's record up (a node that will serve its port calls this).
    pub fn watch(&mut self, now: Instant, app: Key) {
        self.last_now = self.last_now.max(now);
        if let Some(mut inst) = self.instance_entry(app) {
            self.fetch_record(now, app, &mut inst);
            self.instances.insert(app, inst);
        }
    }

    fn fetch_record(&mut self, now: Instant, app: Key, inst: &mut Instance) {
        inst.record_stale_since.get_or_insert(now);
        // One fetch at a time, at most one per heartbeat interval (a store that fails fast
        // is not asked in a loop).
        let due = inst
            .last_fetch_at
            .is_none_or(|t| now.millis_since(t) >= self.cfg.heartbeat_ms);
        if inst.fetching_record.is_none() && due {
            inst.last_fetch_at = Some(now);
            inst.fetching_record =
                Some(self.store_op(StoreOp::Get { app }, PendingOp::Fetch { app }));
        }
    }

    /// Answers a store op.
    pub fn handle_store_result(&mut self, now: Instant, op: StoreOpId, result: StoreResult) {
        self.last_now = self.last_now.max(now);
        let Some((pending, issued)) = self.pending_ops.remove(&op) else {
            return;
        };
        let after_quarantine = issued >= self.started.plus_ms(self.cfg.quarantine_ms());
        match pending {
            PendingOp::Fetch { app } => {
                let Some(mut inst) = self.instance_entry(app) else {
                    return;
                };
                inst.fetching_record = None;
                if !matches!(result, StoreResult::Unavailable) {
                    inst.record_stale_since = None;
                    inst.fresh |= after_quarantine;
                }
                if let StoreResult::Record(Some(r)) | StoreResult::Conflict(Some(r)) = result {
                    self.adopt_record(now, app, &mut inst, r);
                }
                self.instances.insert(app, inst);
                self.after_record_change(now, app);
            }
            PendingOp::Create { app } => {
                if let StoreResult::Record(Some(r)) = result {
                    for m in r.members().collect::<Vec<_>>() {
                        self.send(m, app, Msg::Placement { record: r.clone() });
                    }
                    if let Some(mut inst) = self.instance_entry(app) {
                        self.adopt_record(now, app, &mut inst, r);
                        self.instances.insert(app, inst);
                    }
                    self.after_record_change(now, app);
                }
            }
            PendingOp::Cas { app, new_epoch } => {
                let Some(mut inst) = self.instances.remove(&app) else {
                    return;
                };
                self.cas_result(now, app, &mut inst, new_epoch, result);
                self.instances.insert(app, inst);
                self.after_record_change(now, app);
            }
        }
    }

    fn cas_result(
        &mut self,
        now: Instant,
        app: Key,
        inst: &mut Instance,
        new_epoch: u64,
        result: StoreResult,
    ) {
        let me = self.cfg.me;
        match result {
            StoreResult::Record(Some(r)) if r.master == me && r.epoch == new_epoch => {
                let is_candidate = matches!(
                    inst.member.as_ref().map(|m| &m.role),
                    Some(MemberRole::Candidate(c)) if c.new_epoch == new_epoch
                );
                inst.record = Some(r.clone());
                if is_candidate {
                    self.become_master(now, app, inst);
                }
            }
            StoreResult::Record(Some(r)) | StoreResult::Conflict(Some(r)) => {
                let retry = r.epoch < new_epoch;
                self.adopt_record(now, app, inst, r);
                if let Some(m) = inst.member.as_mut()
                    && let MemberRole::Candidate(c) = &mut m.role
                {
                    c.cas_in_flight = false;
                    c.cas_tries += 1;
                    if !retry || c.cas_tries >= 3 {
                        c.deadline = now;
                    }
                }
            }
            StoreResult::Unavailable | StoreResult::Record(None) | StoreResult::Conflict(None) => {
                if let Some(MemberRole::Candidate(c)) = inst.member.as_mut().map(|m| &mut m.role) {
                    c.cas_in_flight = false;
                }
            }
        }
    }

    fn become_master(&mut self, now: Instant, app: Key, inst: &mut Instance) {
        let Some(r) = inst.record.clone() else { return };
        let Some(m) = inst.member.as_mut() else {
            return;
        };
        m.log.begin_epoch(r.epoch);
        m.voted_epoch = m.voted_epoch.max(r.epoch);
        m.role = MemberRole::Master(MasterSide::new(&r, now));
        inst.served = true;
        self.counters.promotions += 1;
        self.events.push_back(Event::RoleChanged {
            app,
            role: Role::Master,
            epoch: r.epoch,
        });
        log::debug!("replication {app:?}: master of epoch {}", r.epoch);
        self.master_tick(now, app, inst);
    }

    /// Adopts `r` if it is newer than the record held; adjusts this node's role.
    fn adopt_record(&mut self, now: Instant, app: Key, inst: &mut Instance, r: PlacementRecord) {
        if r.check().is_err() || r.app() != app {
            self.counters.bad_messages += 1;
            return;
        }
        let newer = inst
            .record
            .as_ref()
            .is_none_or(|c| (r.epoch, r.version) > (c.epoch, c.version));
        if !newer {
            return;
        }
        let me = self.cfg.me;
        inst.record = Some(r.clone());
        inst.record_stale_since = None;
        inst.relay_backoff_until = None;
        if !r.is_member(me) {
            if inst.member.take().is_some() {
                self.fail_waiters(app, AgentError::MasterChanged);
            }
            return;
        }
        let Some(service) = self.services.get(&r.service) else {
            return;
        };
        let _ = service;
        if inst.member.is_none() {
            inst.member = Some(Member::new(
                service,
                &self.cfg,
                now,
                self.started,
                r.epoch == 0,
            ));
        }
        let jitter = self.rng.below(self.cfg.heartbeat_ms * 3 + 1);
        let m = inst.member.as_mut().expect("member set above");
        let step_down = match &m.role {
            MemberRole::Master(_) => r.master != me,
            MemberRole::Candidate(c) => r.epoch >= c.new_epoch,
            MemberRole::Slave(_) => false,
        };
        match &mut m.role {
            MemberRole::Slave(s) => {
                // A new epoch: sync with its master from scratch.
                s.synced = false;
                s.fetch = None;
                s.last_sync_ask = None;
                s.last_heard = Some(now);
                s.stand_at = None;
            }
            _ if step_down => {
                let was_master = m.is_master();
                if was_master {
                    self.step_down(now, app, inst, false);
                } else {
                    m.role = MemberRole::Slave(SlaveSide::new(now, jitter));
                }
            }
            _ => {}
        }
    }

    /// The master stops serving: waiting replies fail (they may still be applied), relayed
    /// batches are answered, and the node becomes a slave. `stand_now`: stand for election at
    /// once (a slave voted past our epoch: our log is likely the newest).
    fn step_down(&mut self, now: Instant, app: Key, inst: &mut Instance, stand_now: bool) {
        let Some(record) = inst.record.clone() else {
            return;
        };
        let service = self.services.get(&record.service);
        let jitter = self.rng.below(self.cfg.heartbeat_ms * 3 + 1);
        let Some(m) = inst.member.as_mut() else {
            return;
        };
        let mut side = SlaveSide::new(now, jitter);
        if stand_now {
            side.last_heard = None;
            side.jitter_ms = 0;
        }
        let old = core::mem::replace(&mut m.role, MemberRole::Slave(side));
        let MemberRole::Master(ms) = old else { return };
        self.counters.step_downs += 1;
        self.fail_waiters(app, AgentError::MasterChanged);
        if let Some(service) = service {
            for mut b in ms.remote {
                for slot in b.slots.iter_mut() {
                    if !matches!(slot, Slot::Ready { .. }) {
                        *slot = Slot::Ready {
                            bytes: service
                                .agent_reply(AgentReply::Error(AgentError::MasterChanged)),
                            close: false,
                        };
                    }
                }
                self.finish_remote(app, &mut inst.relays, b);
            }
        }
        self.events.push_back(Event::RoleChanged {
            app,
            role: Role::Slave,
            epoch: record.epoch,
        });
        log::debug!(
            "replication {app:?}: master of epoch {} stood down",
            record.epoch
        );
    }

    /// After a record changed: relays in flight to an older epoch's master re-dial or fail.
    fn after_record_change(&mut self, now: Instant, app: Key) {
        let epoch = self
            .instances
            .get(&app)
            .and_then(|i| i.record.as_ref())
            .map_or(0, |r| r.epoch);
        let ids: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.app == app && c.relay.as_ref().is_some_and(|r| r.epoch < epoch))
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Some(c) = self.conns.get_mut(&id) {
                Self::abandon_relay(c, &mut self.counters, true, now);
            }
        }
        let ids: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(_, c)| c.app == app)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            self.pump_conn(now, id);
        }
    }

    /// Ends a connection's relay: reads go back to the queue (they re-dial); writes fail
    /// with [`AgentError::MasterChanged`] if the master may have applied them
    /// (`maybe_applied`), else they re-dial too.
    fn abandon_relay(c: &mut Conn, counters: &mut Counters, maybe_applied: bool, now: Instant) {
        let Some(r) = c.relay.take() else {
            return;
        };
        log::trace!(
            "replication: relay {} to {:?} abandoned, maybe applied {maybe_applied}",
            r.relay_id,
            r.to
        );
        for slot in c.slots.iter_mut() {
            if let Slot::Relayed { request, write } = slot {
                if *write && maybe_applied {
                    counters.relay_errors += 1;
                    *slot = Slot::Ready {
                        bytes: c
                            .service
                            .agent_reply(AgentReply::Error(AgentError::MasterChanged)),
                        close: false,
                    };
                } else {
                    counters.relay_redials += 1;
                    let request = core::mem::take(request);
                    let class = c.service.classify(&request);
                    *slot = Slot::Queued {
                        request,
                        class,
                        since: now,
                    };
                }
            }
        }
    }

    /// Every waiting reply of `app` (sync writes, WAIT), local and relayed, gets `err`.
    fn fail_waiters(&mut self, app: Key, err: AgentError) {
        for c in self.conns.values_mut().filter(|c| c.app == app) {
            for slot in c.slots.iter_mut() {
                if matches!(slot, Slot::Waiting(_)) {
                    *slot = Slot::Ready {
                        bytes: c.service.agent_reply(AgentReply::Error(err)),
                        close: false,
                    };
                }
            }
        }
    }
}

// The master's side: heartbeats, lease, the stream to slaves, requests.
impl ReplicationAgent {
    fn view(&self, inst: &Instance, now: Instant) -> ReplicationView {
        let (epoch, master) = inst
            .record
            .as_ref()
            .map_or((0, None), |r| (r.epoch, (r.epoch > 0).then_some(r.master)));
        let Some(m) = inst.member.as_ref() else {
            return ReplicationView {
                role: Role::Relay,
                epoch,
                master,
                seq: 0,
                slaves: Vec::new(),
                lost_writes: lost_count(&inst.lost),
            };
        };
        let mut slaves = Vec::new();
        let role = match &m.role {
            MemberRole::Master(ms) => {
                for p in &ms.slaves {
                    let lag_ops = m.log.last_seq().saturating_sub(p.acked);
                    let lag_ms = if lag_ops == 0 {
                        0
                    } else {
                        m.log
                            .appended_at(p.acked + 1)
                            .map_or(u64::MAX, |t| now.millis_since(t))
                    };
                    slaves.push(SlaveView {
                        node: p.node,
                        acked_seq: p.acked,
                        lag_ops,
                        lag_ms,
                        online: p.synced && p.lease_until.is_some_and(|t| t > now),
                    });
                }
                Role::Master
            }
            _ => Role::Slave,
        };
        ReplicationView {
            role,
            epoch,
            master,
            seq: m.log.last_seq(),
            slaves,
            lost_writes: lost_count(&inst.lost),
        }
    }

    fn master_tick(&mut self, now: Instant, app: Key, inst: &mut Instance) {
        let Some(record) = inst.record.clone() else {
            return;
        };
        let cfg = self.cfg.clone();
        let lost = inst.lost.clone();
        let Some(m) = inst.member.as_mut() else {
            return;
        };
        let MemberRole::Master(ms) = &mut m.role else {
            return;
        };
        let mut out: Vec<(NodeId, Msg)> = Vec::new();
        if now >= ms.next_heartbeat {
            ms.next_heartbeat = now.plus_ms(cfg.heartbeat_ms);
            for p in &ms.slaves {
                out.push((
                    p.node,
                    Msg::Heartbeat {
                        record: record.clone(),
                        sent_at_us: now.as_micros(),
                        last_seq: m.log.last_seq(),
                        lost: lost.clone(),
                    },
                ));
            }
        }
        let valid = ms.lease_valid(now);
        if valid {
            ms.lease_lost_at = None;
        } else {
            let since = *ms.lease_lost_at.get_or_insert(now);
            if now.millis_since(since) >= cfg.promise_ms() {
                // Fenced for a whole promise period: stand down so this node can vote (its log
                // may be the newest) and let a reachable quorum elect.
                for (to, msg) in out {
                    self.send(to, app, msg);
                }
                self.step_down(now, app, inst, false);
                return;
            }
        }
        // Go back to the last acknowledgement when a slave stopped acknowledging.
        for p in ms.slaves.iter_mut() {
            if p.synced
                && p.next > p.acked + 1
                && now.millis_since(p.last_progress) >= 2 * cfg.heartbeat_ms
            {
                p.next = p.acked + 1;
                p.last_progress = now;
            }
        }
        // Expiry is decided here and travels as a change record.
        if valid && now >= ms.next_expire {
            ms.next_expire = now.plus_ms(100);
            if let Some(change) = m.state.expire_due(now.as_millis(), 64) {
                m.log.append(record.epoch, change, now);
            }
        }
        // The stream: entries to every synced slave, within the window.
        let mut behind: Vec<(NodeId, u64)> = Vec::new();
        for p in ms.slaves.iter_mut() {
            if !p.synced {
                continue;
            }
            while p.next <= m.log.last_seq() && p.next - p.acked - 1 < cfg.window_entries {
                match m
                    .log
                    .entries_after(p.next - 1, wire::MAX_BATCH_ENTRIES, cfg.batch_bytes)
                {
                    Some(entries) if !entries.is_empty() => {
                        let prev_seq = p.next - 1;
                        p.next += entries.len() as u64;
                        out.push((
                            p.node,
                            Msg::Entries {
                                epoch: record.epoch,
                                prev_seq,
                                entries,
                            },
                        ));
                    }
                    Some(_) => break,
                    None => {
                        p.synced = false;
                        behind.push((p.node, p.acked));
                        break;
                    }
                }
            }
        }
        for (node, acked) in behind {
            if let Some(msg) = Self::offer_snapshot(&cfg, m, record.epoch, acked) {
                self.counters.snapshots_sent += 1;
                out.push((node, msg));
            }
        }
        for (to, msg) in out {
            self.send(to, app, msg);
        }
    }

    /// A snapshot offer for a slave whose log matches this one up to `common`.
    fn offer_snapshot(cfg: &AgentConfig, m: &mut Member, epoch: u64, common: u64) -> Option<Msg> {
        let MemberRole::Master(ms) = &mut m.role else {
            return None;
        };
        let usable = ms
            .snapshot
            .as_ref()
            .is_some_and(|s| s.at_seq + 1 >= m.log.first_held());
        if !usable {
            let mut chunks = Vec::new();
            let mut cursor: Option<Vec<u8>> = None;
            loop {
                let c = m
                    .state
                    .snapshot_chunk(cursor.as_deref(), cfg.snapshot_chunk_bytes);
                if !c.bytes.is_empty() {
                    chunks.push(c.bytes);
                }
                if chunks.len() as u32 >= wire::MAX_CHUNKS {
                    return None;
                }
                match c.next {
                    Some(n) => cursor = Some(n),
                    None => break,
                }
            }
            ms.snapshot = Some(Snapshot {
                at_seq: m.log.last_seq(),
                at_epoch: m.log.last_epoch(),
                history: m.log.history().to_vec(),
                chunks,
            });
        }
        let s = ms.snapshot.as_ref()?;
        Some(Msg::SyncSnapshot {
            epoch,
            at_seq: s.at_seq,
            at_epoch: s.at_epoch,
            chunks: s.chunks.len() as u32,
            end_of_common: common.min(s.at_seq),
            history: s.history.clone(),
        })
    }

    /// Runs one request at the master; `None` if it must wait (fenced, briefly).
    fn execute(
        &mut self,
        now: Instant,
        inst: &mut Instance,
        service: &'static dyn ReplicatedService,
        request: &Request,
        class: &RequestClass,
        since: Instant,
    ) -> Option<Slot> {
        let ready = |bytes: Vec<u8>| Slot::Ready {
            bytes,
            close: false,
        };
        match class {
            RequestClass::Connection => {
                let r = service.answer_connection(request);
                return Some(Slot::Ready {
                    bytes: r.bytes,
                    close: r.close,
                });
            }
            RequestClass::Rejected(e) => return Some(ready(e.clone())),
            _ => {}
        }
        let view = self.view(inst, now);
        let record = inst.record.as_ref()?;
        let (epoch, mode) = (record.epoch, record.mode);
        let n = record.group();
        let m = inst.member.as_mut()?;
        let MemberRole::Master(ms) = &m.role else {
            return None;
        };
        if !ms.lease_valid(now) {
            if now.millis_since(since) < self.cfg.lease_ms {
                return None;
            }
            self.counters.fenced_refusals += 1;
            return Some(ready(
                service.agent_reply(AgentReply::Error(AgentError::Fenced)),
            ));
        }
        match class {
            RequestClass::WaitReplicas {
                replicas,
                timeout_ms,
            } => {
                let t = if *timeout_ms == 0 {
                    self.cfg.wait_max_ms
                } else {
                    (*timeout_ms).min(self.cfg.wait_max_ms)
                };
                Some(Slot::Waiting(Waiter {
                    target_seq: m.log.last_seq(),
                    deadline: now.plus_ms(t),
                    kind: WaitKind::Wait {
                        replicas: *replicas,
                    },
                }))
            }
            _ => {
                let applied = m.state.apply(now.as_millis(), request, &view);
                let Some(change) = applied.change else {
                    return Some(ready(applied.reply));
                };
                let seq = m.log.append(epoch, change, now);
                if mode == super::placement::Mode::Sync && sync_quorum(n) > 1 {
                    Some(Slot::Waiting(Waiter {
                        target_seq: seq,
                        deadline: now.plus_ms(self.cfg.sync_timeout_ms),
                        kind: WaitKind::SyncWrite {
                            reply: applied.reply,
                        },
                    }))
                } else {
                    Some(ready(applied.reply))
                }
            }
        }
    }

    /// A waiting slot's reply once its condition holds or its deadline passed.
    fn settle(
        counters: &mut Counters,
        service: &dyn ReplicatedService,
        ms: Option<&MasterSide>,
        n: usize,
        w: &Waiter,
        now: Instant,
    ) -> Option<Vec<u8>> {
        let holding = ms.map_or(0, |ms| ms.holding(w.target_seq));
        match &w.kind {
            WaitKind::SyncWrite { reply } => {
                if holding + 1 >= sync_quorum(n) {
                    Some(reply.clone())
                } else if now >= w.deadline {
                    counters.sync_timeouts += 1;
                    Some(service.agent_reply(AgentReply::Error(AgentError::NotReplicated)))
                } else {
                    None
                }
            }
            WaitKind::Wait { replicas } => (holding as u32 >= *replicas || now >= w.deadline)
                .then(|| service.agent_reply(AgentReply::Replicas(holding as u32))),
        }
    }

    fn finish_remote(&mut self, app: Key, cache: &mut RelayCache, b: RemoteBatch) {
        let replies: Vec<Vec<u8>> = b
            .slots
            .into_iter()
            .map(|s| match s {
                Slot::Ready { bytes, .. } => bytes,
                _ => Vec::new(),
            })
            .collect();
        cache.complete((b.from, b.relay_id), &replies);
        self.send(
            b.from,
            app,
            Msg::RelayReply {
                relay_id: b.relay_id,
                replies,
            },
        );
    }

    /// Settles the relayed batches at a master; sends the finished ones.
    fn settle_remote(&mut self, now: Instant, app: Key, inst: &mut Instance) {
        let Some(record) = inst.record.as_ref() else {
            return;
        };
        let n = record.group();
        let Some(service) = self.services.get(&record.service) else {
            return;
        };
        let Some(m) = inst.member.as_mut() else {
            return;
        };
        let MemberRole::Master(ms) = &mut m.role else {
            return;
        };
        let mut remote = core::mem::take(&mut ms.remote);
        for b in remote.iter_mut() {
            for slot in b.slots.iter_mut() {
                if let Slot::Waiting(w) = slot
                    && let Some(bytes) =
                        Self::settle(&mut self.counters, service, Some(ms), n, w, now)
                {
                    *slot = Slot::Ready {
                        bytes,
                        close: false,
                    };
                }
            }
        }
        let (done, waiting): (Vec<_>, Vec<_>) = remote
            .into_iter()
            .partition(|b| b.slots.iter().all(|s| matches!(s, Slot::Ready { .. })));
        ms.remote = waiting;
        let mut replies = Vec::new();
        for b in done {
            let r: Vec<Vec<u8>> = b
                .slots
                .into_iter()
                .map(|s| match s {
                    Slot::Ready { bytes, .. } => bytes,
                    _ => Vec::new(),
                })
                .collect();
            replies.push((b.from, b.relay_id, r));
        }
        for (to, relay_id, replies) in replies {
            inst.relays.complete((to, relay_id), &replies);
            self.send(to, app, Msg::RelayReply { relay_id, replies });
        }
    }

    fn handle_relay(
        &mut self,
        now: Instant,
        app: Key,
        from: NodeId,
        relay_id: u64,
        requests: Vec<Vec<Vec<u8>>>,
    ) {
        let Some(mut inst) = self.instances.remove(&app) else {
            self.send(
                from,
                app,
                Msg::NotMaster {
                    relay_id,
                    record: None,
                    maybe_applied: false,
                },
            );
            return;
        };
        // Repeats (the network duplicates, the relay retries) are answered from the cache,
        // whatever this node's role is now.
        if let Some(c) = inst.relays.map.get(&(from, relay_id)).cloned() {
            self.counters.duplicate_relays += 1;
            let is_master = inst.member.as_ref().is_some_and(|m| m.is_master());
            let record = inst.record.clone();
            self.instances.insert(app, inst);
            match c {
                Some(replies) => self.send(from, app, Msg::RelayReply { relay_id, replies }),
                None if !is_master => self.send(
                    from,
                    app,
                    Msg::NotMaster {
                        relay_id,
                        record,
                        maybe_applied: true,
                    },
                ),
                None => {}
            }
            return;
        }
        let is_master = inst.member.as_ref().is_some_and(|m| m.is_master());
        let service = inst
            .record
            .as_ref()
            .and_then(|r| self.services.get(&r.service));
        let (true, Some(service)) = (is_master, service) else {
            let record = inst.record.clone();
            // A node that was master since it started may have applied an earlier copy that
            // its cache no longer holds.
            let maybe_applied = inst.served;
            self.instances.insert(app, inst);
            self.send(
                from,
                app,
                Msg::NotMaster {
                    relay_id,
                    record,
                    maybe_applied,
                },
            );
            return;
        };
        inst.relays.insert((from, relay_id), self.cfg.relay_cache);
        log::trace!(
            "replication {app:?}: applying relay {relay_id} from {from:?}: {:?}",
            requests
                .iter()
                .map(|r| r
                    .iter()
                    .map(|a| alloc::string::String::from_utf8_lossy(a).into_owned())
                    .collect::<Vec<_>>())
                .collect::<Vec<_>>()
        );
        let mut slots = Vec::with_capacity(requests.len());
        for args in requests {
            let request = Request::new(args);
            let class = service.classify(&request);
            // A relayed request never waits for a fence here: the relay's own timeout
            // covers it, so fenced means an error now.
            let slot = self
                .execute(now, &mut inst, service, &request, &class, Instant::ZERO)
                .unwrap_or(Slot::Ready {
                    bytes: service.agent_reply(AgentReply::Error(AgentError::Fenced)),
                    close: false,
                });
            slots.push(slot);
        }
        if let Some(MemberRole::Master(ms)) = inst.member.as_mut().map(|m| &mut m.role) {
            ms.remote.push(RemoteBatch {
                from,
                relay_id,
                slots,
            });
        }
        self.settle_remote(now, app, &mut inst);
        self.master_tick(now, app, &mut inst);
        self.instances.insert(app, inst);
    }
}

// The protocol handler: client connections at any node.
impl ReplicationAgent {
    /// A client connected to instance `app`'s port; `service` is the record's service.
    pub fn open_connection(
        &mut self,
        now: Instant,
        conn: ConnId,
        app: Key,
        service: &str,
    ) -> Result<(), OpenError> {
        let service = self
            .services
            .get(service)
            .ok_or(OpenError::UnknownService)?;
        if self.conns.len() >= self.cfg.max_conns && !self.conns.contains_key(&conn) {
            self.counters.refused_conns += 1;
            return Err(OpenError::TooManyConnections);
        }
        self.conns.insert(
            conn,
            Conn {
                app,
                service,
                decoder: service.decoder(),
                slots: VecDeque::new(),
                closing: false,
                relay: None,
            },
        );
        let known = self.instances.get(&app).is_some_and(|i| i.record.is_some());
        if !known {
            self.watch(now, app);
        }
        Ok(())
    }

    /// The client went away: its pending replies are dropped (relayed writes still apply).
    pub fn close_connection(&mut self, conn: ConnId) {
        self.conns.remove(&conn);
    }

    /// Whether the driver should read more from `conn` (backpressure on pipelined clients).
    pub fn wants_bytes(&self, conn: ConnId) -> bool {
        self.conns.get(&conn).is_some_and(|c| {
            !c.closing
                && c.slots.len() < self.cfg.max_queued_per_conn
                && c.decoder.buffered() <= 4 * 1024 * 1024
        })
    }

    /// Bytes of an unfinished request the connection's decoder holds (a driver closes a
    /// connection whose partial frame stalls).
    pub fn buffered(&self, conn: ConnId) -> usize {
        self.conns.get(&conn).map_or(0, |c| c.decoder.buffered())
    }

    /// Whether the connection has replies still to come (requests queued, relayed or
    /// waiting): a quiet client then is not idle.
    pub fn has_pending(&self, conn: ConnId) -> bool {
        self.conns.get(&conn).is_some_and(|c| !c.slots.is_empty())
    }

    /// Bytes from a client.
    pub fn handle_client_bytes(&mut self, now: Instant, conn: ConnId, bytes: &[u8]) {
        self.last_now = self.last_now.max(now);
        let Some(c) = self.conns.get_mut(&conn) else {
            return;
        };
        if c.closing {
            return;
        }
        c.decoder.feed(bytes);
        self.pump_conn(now, conn);
    }

    fn pump_conn(&mut self, now: Instant, id: ConnId) {
        let Some(mut c) = self.conns.remove(&id) else {
            return;
        };
        // Decode what fits in the queue.
        while !c.closing && c.slots.len() < self.cfg.max_queued_per_conn {
            match c.decoder.next_request() {
                None => break,
                Some(Decoded::Fatal { reply, why }) => {
                    match why {
                        FatalFrame::Malformed => self.counters.malformed_frames += 1,
                        FatalFrame::OverLimit => self.counters.over_limit_frames += 1,
                    }
                    c.slots.push_back(Slot::Ready {
                        bytes: reply,
                        close: true,
                    });
                    c.closing = true;
                }
                Some(Decoded::Request(request)) => {
                    let class = c.service.classify(&request);
                    let slot = match class {
                        RequestClass::Connection => {
                            let r = c.service.answer_connection(&request);
                            if r.close {
                                c.closing = true;
                            }
                            Slot::Ready {
                                bytes: r.bytes,
                                close: r.close,
                            }
                        }
                        RequestClass::Rejected(e) => Slot::Ready {
                            bytes: e,
                            close: false,
                        },
                        class => Slot::Queued {
                            request,
                            class,
                            since: now,
                        },
                    };
                    c.slots.push_back(slot);
                }
            }
        }
        let app = c.app;
        let mut inst = self.instances.remove(&app);
        if c.relay.is_none() {
            self.dispatch(now, &mut c, inst.as_mut());
        }
        // Sync writes and WAITs at the master.
        if let Some(inst) = inst.as_ref() {
            let n = inst.record.as_ref().map_or(1, |r| r.group());
            let ms = match inst.member.as_ref().map(|m| &m.role) {
                Some(MemberRole::Master(ms)) => Some(ms),
                _ => None,
            };
            for slot in c.slots.iter_mut() {
                if let Slot::Waiting(w) = slot
                    && let Some(bytes) = Self::settle(&mut self.counters, c.service, ms, n, w, now)
                {
                    *slot = Slot::Ready {
                        bytes,
                        close: false,
                    };
                }
            }
        }
        if let Some(mut i) = inst {
            if i.member.as_ref().is_some_and(|m| m.is_master()) {
                self.master_tick(now, app, &mut i);
            }
            self.instances.insert(app, i);
        }
        // Replies leave in request order.
        let mut closed = false;
        while let Some(Slot::Ready { .. }) = c.slots.front() {
            if let Some(Slot::Ready { bytes, close }) = c.slots.pop_front() {
                self.events.push_back(Event::Reply { conn: id, bytes });
                if close {
                    self.events.push_back(Event::Close { conn: id });
                    closed = true;
                    break;
                }
            }
        }
        if !closed {
            self.conns.insert(id, c);
        }
    }

    /// Executes (at the master) or relays the queued requests of a connection, in order.
    fn dispatch(&mut self, now: Instant, c: &mut Conn, mut inst: Option<&mut Instance>) {
        let me = self.cfg.me;
        let is_master = inst
            .as_ref()
            .and_then(|i| i.member.as_ref())
            .is_some_and(|m| m.is_master());
        let master = inst
            .as_ref()
            .filter(|i| {
                i.record_stale_since.is_none() && i.relay_backoff_until.is_none_or(|t| now >= t)
            })
            .and_then(|i| i.record.as_ref())
            .filter(|r| r.epoch > 0 && r.master != me)
            .map(|r| (r.master, r.epoch));
        let mut i = 0;
        while i < c.slots.len() {
            let (request, class, since) = match &c.slots[i] {
                Slot::Queued {
                    request,
                    class,
                    since,
                } => (request.clone(), class.clone(), *since),
                _ => {
                    i += 1;
                    continue;
                }
            };
            if is_master {
                let inst = inst.as_deref_mut().expect("master has an instance");
                match self.execute(now, inst, c.service, &request, &class, since) {
                    Some(slot) => {
                        c.slots[i] = slot;
                        i += 1;
                        continue;
                    }
                    None => return,
                }
            }
            if let Some((to, epoch)) = master {
                // Relay this request and the queued ones after it, as one batch.
                let mut requests = Vec::new();
                let mut j = i;
                while j < c.slots.len() && requests.len() < wire::MAX_RELAY_REQUESTS {
                    match &mut c.slots[j] {
                        Slot::Queued { request, class, .. } => {
                            let write = matches!(class, RequestClass::Write);
                            let request = core::mem::take(request);
                            requests.push(request.args.clone());
                            c.slots[j] = Slot::Relayed { request, write };
                        }
                        Slot::Ready { .. } => {}
                        _ => break,
                    }
                    j += 1;
                }
                let relay_id = self.next_relay;
                self.next_relay += 1;
                self.counters.relays_sent += 1;
                self.send(
                    to,
                    c.app,
                    Msg::Relay {
                        epoch,
                        relay_id,
                        requests: requests.clone(),
                    },
                );
                c.relay = Some(RelayInFlight {
                    relay_id,
                    to,
                    epoch,
                    first_sent: now,
                    last_sent: now,
                    sends: 1,
                    requests,
                });
                return;
            }
            // No master known: wait for one, up to a bound.
            if now.millis_since(since) >= self.cfg.no_master_timeout_ms {
                self.counters.no_master_errors += 1;
                c.slots[i] = Slot::Ready {
                    bytes: c
                        .service
                        .agent_reply(AgentReply::Error(AgentError::NoMaster)),
                    close: false,
                };
                i += 1;
                continue;
            }
            if let Some(inst) = inst.as_deref_mut() {
                let app = c.app;
                self.fetch_record(now, app, inst);
            }
            return;
        }
    }

    fn handle_relay_reply(
        &mut self,
        now: Instant,
        from: NodeId,
        relay_id: u64,
        replies: Vec<Vec<u8>>,
    ) {
        let Some((&id, _)) = self.conns.iter().find(|(_, c)| {
            c.relay
                .as_ref()
                .is_some_and(|r| r.relay_id == relay_id && r.to == from)
        }) else {
            return;
        };
        let c = self.conns.get_mut(&id).expect("found above");
        let relayed = c
            .slots
            .iter()
            .filter(|s| matches!(s, Slot::Relayed { .. }))
            .count();
        if relayed != replies.len() {
            self.counters.bad_messages += 1;
            return;
        }
        let mut replies = replies.into_iter();
        for slot in c.slots.iter_mut() {
            if matches!(slot, Slot::Relayed { .. }) {
                *slot = Slot::Ready {
                    bytes: replies.next().unwrap_or_default(),
                    close: false,
                };
            }
        }
        c.relay = None;
        self.pump_conn(now, id);
    }

    fn handle_not_master(
        &mut self,
        now: Instant,
        app: Key,
        from: NodeId,
        relay_id: u64,
        record: Option<PlacementRecord>,
        maybe_applied: bool,
    ) {
        let Some((&id, _)) = self.conns.iter().find(|(_, c)| {
            c.relay
                .as_ref()
                .is_some_and(|r| r.relay_id == relay_id && r.to == from)
        }) else {
            return;
        };
        if let Some(c) = self.conns.get_mut(&id) {
            // Nothing applied: everything re-dials; else writes fail as maybe applied.
            let retried = c.relay.as_ref().is_some_and(|r| r.sends > 1);
            Self::abandon_relay(c, &mut self.counters, maybe_applied || retried, now);
        }
        if let Some(mut inst) = self.instance_entry(app) {
            let before = inst.record.as_ref().map(|r| (r.epoch, r.version));
            if let Some(r) = record {
                self.adopt_record(now, app, &mut inst, r);
            }
            if inst.record.as_ref().map(|r| (r.epoch, r.version)) == before {
                // The master we knew denies it and knows no newer record: ask the store, and
                // hold requests a while (an election is likely under way).
                inst.relay_backoff_until = Some(now.plus_ms(self.cfg.heartbeat_ms));
                self.fetch_record(now, app, &mut inst);
            }
            self.instances.insert(app, inst);
        }
        self.after_record_change(now, app);
    }

    fn relay_tick(&mut self, now: Instant) {
        let retry_ms = (self.cfg.relay_timeout_ms / 4).max(1);
        let ids: Vec<ConnId> = self.conns.keys().copied().collect();
        for id in ids {
            let Some(c) = self.conns.get_mut(&id) else {
                continue;
            };
            let app = c.app;
            let mut resend = None;
            let mut gave_up = false;
            if let Some(r) = c.relay.as_mut() {
                if now.millis_since(r.first_sent) >= self.cfg.relay_timeout_ms {
                    gave_up = true;
                } else if now.millis_since(r.last_sent) >= retry_ms {
                    r.last_sent = now;
                    r.sends += 1;
                    resend = Some((r.to, r.epoch, r.relay_id, r.requests.clone()));
                }
            }
            if gave_up {
                Self::abandon_relay(c, &mut self.counters, true, now);
                if let Some(mut inst) = self.instance_entry(app) {
                    self.fetch_record(now, app, &mut inst);
                    self.instances.insert(app, inst);
                }
            }
            if let Some((to, epoch, relay_id, requests)) = resend {
                self.send(
                    to,
                    app,
                    Msg::Relay {
                        epoch,
                        relay_id,
                        requests,
                    },
                );
            }
            self.pump_conn(now, id);
        }
    }
}

// Messages, the slave's side, elections, time.
impl ReplicationAgent {
    /// A replication message from `from` (authenticated by the channel it came on).
    pub fn handle_message(&mut self, now: Instant, from: NodeId, bytes: &[u8]) {
        self.last_now = self.last_now.max(now);
        let env = match wire::decode(bytes) {
            Ok(e) => e,
            Err(e) => {
                self.counters.bad_messages += 1;
                log::debug!("replication: dropped a message from {from:?}: {e}");
                return;
            }
        };
        let app = env.app;
        match env.msg {
            Msg::Relay {
                relay_id, requests, ..
            } => self.handle_relay(now, app, from, relay_id, requests),
            Msg::RelayReply { relay_id, replies } => {
                self.handle_relay_reply(now, from, relay_id, replies)
            }
            Msg::NotMaster {
                relay_id,
                record,
                maybe_applied,
            } => self.handle_not_master(now, app, from, relay_id, record, maybe_applied),
            msg => {
                let Some(mut inst) = self.instance_entry(app) else {
                    self.counters.bad_messages += 1;
                    return;
                };
                let before = inst.record.as_ref().map(|r| (r.epoch, r.version));
                self.handle_member_message(now, app, from, &mut inst, msg);
                let changed = inst.record.as_ref().map(|r| (r.epoch, r.version)) != before;
                let keep = inst.record.is_some() || inst.fetching_record.is_some();
                if keep {
                    self.instances.insert(app, inst);
                }
                if changed {
                    self.after_record_change(now, app);
                }
            }
        }
    }

    fn stale_reply(&mut self, app: Key, to: NodeId, inst: &Instance) {
        let voted = inst.member.as_ref().map_or(0, |m| m.voted_epoch);
        self.send(
            to,
            app,
            Msg::Stale {
                epoch: inst.record.as_ref().map_or(0, |r| r.epoch),
                voted,
                record: inst.record.clone(),
            },
        );
    }

    fn handle_member_message(
        &mut self,
        now: Instant,
        app: Key,
        from: NodeId,
        inst: &mut Instance,
        msg: Msg,
    ) {
        let my_epoch = inst.record.as_ref().map_or(0, |r| r.epoch);
        match msg {
            Msg::Placement { record } => self.adopt_record(now, app, inst, record),
            Msg::Stale { record, voted, .. } => {
                if let Some(r) = record {
                    self.adopt_record(now, app, inst, r);
                }
                let my_epoch = inst.record.as_ref().map_or(0, |r| r.epoch);
                if voted > my_epoch && inst.member.as_ref().is_some_and(|m| m.is_master()) {
                    // A member voted past our epoch and will not renew our lease again: stand
                    // down and stand above that epoch (our log is likely the newest).
                    if let Some(m) = inst.member.as_mut() {
                        m.voted_epoch = m.voted_epoch.max(voted);
                    }
                    self.step_down(now, app, inst, true);
                }
            }
            Msg::Heartbeat {
                record,
                sent_at_us,
                last_seq: master_seq,
                lost,
            } => {
                let voted = inst.member.as_ref().map_or(0, |m| m.voted_epoch);
                if record.epoch < my_epoch || record.epoch < voted || record.master != from {
                    self.stale_reply(app, from, inst);
                    return;
                }
                self.adopt_record(now, app, inst, record.clone());
                if inst.record.as_ref().map(|r| r.epoch) != Some(record.epoch) {
                    return;
                }
                for r in lost.into_iter().take(wire::MAX_LOST_RANGES) {
                    add_lost(&mut inst.lost, r);
                }
                let promise = self.cfg.promise_ms();
                let hb = self.cfg.heartbeat_ms;
                let fresh = inst.fresh;
                let Some(m) = inst.member.as_mut() else {
                    return;
                };
                let MemberRole::Slave(s) = &mut m.role else {
                    return;
                };
                s.last_heard = Some(now);
                s.stand_at = None;
                if s.synced
                    && master_seq > m.log.last_seq()
                    && now.millis_since(s.last_progress) >= 4 * hb
                {
                    s.synced = false;
                    s.last_sync_ask = None;
                }
                if fresh {
                    m.promise_until = m.promise_until.max(now.plus_ms(promise));
                }
                log::trace!(
                    "replication {app:?}: acking heartbeat of {from:?} epoch {} at {now:?}, voted {}",
                    record.epoch,
                    m.voted_epoch
                );
                let mut out = Vec::new();
                if fresh {
                    out.push(Msg::HeartbeatAck {
                        epoch: record.epoch,
                        sent_at_us,
                        acked_seq: m.log.last_seq(),
                    });
                }
                match &mut s.fetch {
                    Some(f) if now.millis_since(f.last_asked) >= 2 * hb => {
                        f.last_asked = now;
                        out.push(Msg::SnapshotFetch {
                            epoch: record.epoch,
                            at_seq: f.at_seq,
                            index: f.got.len() as u32,
                        });
                    }
                    None if !s.synced
                        && s.last_sync_ask
                            .is_none_or(|t| now.millis_since(t) >= 2 * hb) =>
                    {
                        s.last_sync_ask = Some(now);
                        out.push(Msg::SyncRequest {
                            epoch: record.epoch,
                            last_seq: m.log.last_seq(),
                            last_epoch: m.log.last_epoch(),
                            lost: inst.lost.clone(),
                        });
                    }
                    _ => {}
                }
                for msg in out {
                    self.send(from, app, msg);
                }
            }
            Msg::HeartbeatAck {
                epoch, sent_at_us, ..
            } => {
                let lease = self.cfg.lease_ms;
                if epoch != my_epoch || sent_at_us > now.as_micros() {
                    return;
                }
                if let Some(MemberRole::Master(ms)) = inst.member.as_mut().map(|m| &mut m.role)
                    && let Some(p) = ms.slaves.iter_mut().find(|p| p.node == from)
                {
                    let until = Instant::from_micros(sent_at_us).plus_ms(lease);
                    log::trace!(
                        "replication {app:?}: lease ack from {from:?} in epoch {epoch}, until {until:?} (now {now:?})"
                    );
                    p.lease_until = Some(p.lease_until.map_or(until, |t| t.max(until)));
                }
                self.master_tick(now, app, inst);
            }
            Msg::SyncRequest {
                epoch,
                last_seq,
                last_epoch,
                lost,
            } => {
                if epoch < my_epoch {
                    self.stale_reply(app, from, inst);
                    return;
                }
                if epoch == my_epoch && inst.member.as_ref().is_some_and(|m| m.is_master()) {
                    for r in lost.into_iter().take(wire::MAX_LOST_RANGES) {
                        add_lost(&mut inst.lost, r);
                    }
                }
                if epoch < my_epoch {
                    return;
                }
                let cfg = self.cfg.clone();
                let Some(m) = inst.member.as_mut() else {
                    return;
                };
                let history = m.log.history().to_vec();
                let master_seq = m.log.last_seq();
                let position = m.log.position_of(last_seq, last_epoch);
                let MemberRole::Master(ms) = &mut m.role else {
                    return;
                };
                if epoch != my_epoch {
                    return;
                }
                let Some(p) = ms.slaves.iter_mut().find(|p| p.node == from) else {
                    return;
                };
                log::trace!(
                    "replication {app:?}: sync request from {from:?} at ({last_seq}, {last_epoch}): {position:?}"
                );
                let reply = match position {
                    Position::Resume { from_seq } => {
                        p.synced = true;
                        p.acked = from_seq - 1;
                        p.next = from_seq;
                        p.last_progress = now;
                        Some(Msg::SyncPartial {
                            epoch,
                            from_seq,
                            history,
                            master_seq,
                        })
                    }
                    Position::Snapshot { common } => {
                        p.synced = false;
                        if last_seq > common {
                            add_lost(
                                &mut inst.lost,
                                LostRange {
                                    epoch: last_epoch,
                                    first: common + 1,
                                    last: last_seq,
                                },
                            );
                        }
                        let m = inst.member.as_mut().expect("member");
                        let offer = Self::offer_snapshot(&cfg, m, epoch, common);
                        if offer.is_some() {
                            self.counters.snapshots_sent += 1;
                        }
                        offer
                    }
                };
                if let Some(msg) = reply {
                    self.send(from, app, msg);
                }
                self.master_tick(now, app, inst);
            }
            Msg::SyncPartial {
                epoch,
                from_seq,
                history,
                master_seq,
            } => {
                let Some(m) = inst.member.as_mut() else {
                    return;
                };
                let MemberRole::Slave(s) = &mut m.role else {
                    return;
                };
                if epoch != my_epoch
                    || epoch < m.voted_epoch
                    || from_seq != m.log.last_seq() + 1
                    || s.fetch.is_some()
                {
                    return;
                }
                s.synced = true;
                s.last_progress = now;
                if !m.trusted {
                    // Whole again only once it holds what the master held at this point.
                    if m.log.last_seq() >= master_seq {
                        m.trusted = true;
                    } else {
                        m.trust_at = Some(master_seq);
                    }
                }
                m.log.adopt_history(&history);
                let acked_seq = m.log.last_seq();
                self.send(from, app, Msg::Ack { epoch, acked_seq });
            }
            Msg::SyncSnapshot {
                epoch,
                at_seq,
                at_epoch,
                chunks,
                end_of_common,
                history,
            } => {
                let Some(m) = inst.member.as_mut() else {
                    return;
                };
                let MemberRole::Slave(s) = &mut m.role else {
                    return;
                };
                if epoch != my_epoch || s.fetch.as_ref().is_some_and(|f| f.at_seq == at_seq) {
                    return;
                }
                s.synced = false;
                s.fetch = Some(Fetch {
                    at_seq,
                    at_epoch,
                    common: end_of_common,
                    history,
                    total: chunks,
                    got: Vec::new(),
                    last_asked: now,
                });
                if chunks == 0 {
                    self.install_snapshot(now, app, from, inst);
                } else {
                    self.send(
                        from,
                        app,
                        Msg::SnapshotFetch {
                            epoch,
                            at_seq,
                            index: 0,
                        },
                    );
                }
            }
            Msg::SnapshotFetch {
                epoch,
                at_seq,
                index,
            } => {
                let Some(m) = inst.member.as_ref() else {
                    return;
                };
                let MemberRole::Master(ms) = &m.role else {
                    return;
                };
                let Some(snap) = ms
                    .snapshot
                    .as_ref()
                    .filter(|s| s.at_seq == at_seq && epoch == my_epoch)
                else {
                    return;
                };
                if let Some(bytes) = snap.chunks.get(index as usize) {
                    let bytes = bytes.clone();
                    self.send(
                        from,
                        app,
                        Msg::SnapshotPart {
                            epoch,
                            at_seq,
                            index,
                            bytes,
                        },
                    );
                }
            }
            Msg::SnapshotPart {
                epoch,
                at_seq,
                index,
                bytes,
            } => {
                let Some(m) = inst.member.as_mut() else {
                    return;
                };
                let MemberRole::Slave(s) = &mut m.role else {
                    return;
                };
                let Some(f) = s.fetch.as_mut() else { return };
                if epoch != my_epoch || f.at_seq != at_seq || index as usize != f.got.len() {
                    return;
                }
                f.got.push(bytes);
                f.last_asked = now;
                if f.got.len() as u32 >= f.total {
                    self.install_snapshot(now, app, from, inst);
                } else {
                    let index = f.got.len() as u32;
                    self.send(
                        from,
                        app,
                        Msg::SnapshotFetch {
                            epoch,
                            at_seq,
                            index,
                        },
                    );
                }
            }
            Msg::Entries {
                epoch,
                prev_seq: _,
                entries,
            } => {
                // After voting for a newer epoch, nothing of an older master is acknowledged:
                // its writes must not count as held by this node.
                let voted = inst.member.as_ref().map_or(0, |m| m.voted_epoch);
                if epoch < my_epoch || epoch < voted {
                    self.stale_reply(app, from, inst);
                    return;
                }
                let Some(record) = inst.record.as_ref() else {
                    return;
                };
                if epoch != my_epoch || record.master != from {
                    return;
                }
                let Some(m) = inst.member.as_mut() else {
                    return;
                };
                let MemberRole::Slave(s) = &mut m.role else {
                    return;
                };
                if !s.synced {
                    return;
                }
                s.last_heard = Some(now);
                s.stand_at = None;
                let before = m.log.last_seq();
                for e in entries {
                    if e.seq <= m.log.last_seq() {
                        continue;
                    }
                    if e.seq != m.log.last_seq() + 1 {
                        break;
                    }
                    if m.state.apply_change(&e.change).is_err() {
                        // A record this service cannot apply: resync from a snapshot.
                        self.counters.bad_messages += 1;
                        s.synced = false;
                        s.last_sync_ask = None;
                        m.state.clear();
                        m.log.reset(0, 0, &[]);
                        m.trusted = false;
                        m.trust_at = None;
                        break;
                    }
                    m.log.accept(e, now);
                }
                if m.log.last_seq() > before {
                    s.last_progress = now;
                }
                if m.trust_at.is_some_and(|t| m.log.last_seq() >= t) {
                    m.trusted = true;
                    m.trust_at = None;
                }
                let acked_seq = m.log.last_seq();
                self.send(from, app, Msg::Ack { epoch, acked_seq });
            }
            Msg::Ack { epoch, acked_seq } => {
                if epoch != my_epoch {
                    return;
                }
                let Some(m) = inst.member.as_mut() else {
                    return;
                };
                let last = m.log.last_seq();
                let MemberRole::Master(ms) = &mut m.role else {
                    return;
                };
                if let Some(p) = ms.slaves.iter_mut().find(|p| p.node == from && p.synced) {
                    if acked_seq > p.acked && acked_seq <= last {
                        p.acked = acked_seq;
                        p.last_progress = now;
                    }
                    p.next = p.next.max(p.acked + 1);
                }
                self.settle_remote(now, app, inst);
                self.master_tick(now, app, inst);
                self.settle_local(now, app, inst);
            }
            Msg::VoteRequest {
                new_epoch,
                last_epoch,
                last_seq,
            } => {
                let started_ok = inst.fresh;
                let is_member = inst.record.as_ref().is_some_and(|r| r.is_member(from));
                let mut granted = false;
                let mut voted = 0;
                let mut newer_log = false;
                if let Some(m) = inst.member.as_mut() {
                    granted = is_member
                        && started_ok
                        && m.trusted
                        && !m.is_master()
                        && new_epoch > m.voted_epoch
                        && new_epoch > my_epoch
                        && now >= m.promise_until
                        && (last_epoch, last_seq) >= (m.log.last_epoch(), m.log.last_seq());
                    log::trace!(
                        "replication {app:?}: vote for {from:?} in {new_epoch}: {granted} (member {is_member}, started {started_ok}, trusted {}, master {}, voted {}, epoch {my_epoch}, promise {}, logs {:?} vs {:?})",
                        m.trusted,
                        m.is_master(),
                        m.voted_epoch,
                        now >= m.promise_until,
                        (last_epoch, last_seq),
                        (m.log.last_epoch(), m.log.last_seq())
                    );
                    if granted {
                        m.voted_epoch = new_epoch;
                        if let MemberRole::Candidate(_) = m.role {
                            m.role = MemberRole::Slave(SlaveSide::new(now, 0));
                        }
                        if let MemberRole::Slave(s) = &mut m.role {
                            // Give the candidate its election before standing ourselves.
                            s.last_heard = Some(now);
                            s.stand_at = None;
                        }
                    }
                    voted = m.voted_epoch;
                    newer_log = (last_epoch, last_seq) < (m.log.last_epoch(), m.log.last_seq());
                }
                self.send(
                    from,
                    app,
                    Msg::VoteReply {
                        new_epoch,
                        granted,
                        voted,
                        newer_log,
                    },
                );
            }
            Msg::VoteReply {
                new_epoch,
                granted,
                voted,
                newer_log,
            } => {
                let Some(record) = inst.record.clone() else {
                    return;
                };
                let Some(m) = inst.member.as_mut() else {
                    return;
                };
                if !granted && record.is_member(from) {
                    // Stand above the epochs others already voted in next time.
                    m.voted_epoch = m.voted_epoch.max(voted);
                }
                let MemberRole::Candidate(c) = &mut m.role else {
                    return;
                };
                if c.new_epoch != new_epoch || !record.is_member(from) {
                    return;
                }
                if !granted {
                    c.outranked |= newer_log;
                    return;
                }
                c.votes.insert(from);
                self.maybe_cas(app, inst);
            }
            Msg::Relay { .. } | Msg::RelayReply { .. } | Msg::NotMaster { .. } => {}
        }
    }

    /// Sync writes and WAITs of local connections at the master.
    fn settle_local(&mut self, now: Instant, app: Key, inst: &Instance) {
        let n = inst.record.as_ref().map_or(1, |r| r.group());
        let ms = match inst.member.as_ref().map(|m| &m.role) {
            Some(MemberRole::Master(ms)) => ms,
            _ => return,
        };
        let mut ready = Vec::new();
        for (id, c) in self.conns.iter_mut().filter(|(_, c)| c.app == app) {
            let mut any = false;
            for slot in c.slots.iter_mut() {
                if let Slot::Waiting(w) = slot
                    && let Some(bytes) =
                        Self::settle(&mut self.counters, c.service, Some(ms), n, w, now)
                {
                    *slot = Slot::Ready {
                        bytes,
                        close: false,
                    };
                    any = true;
                }
            }
            if any {
                ready.push(*id);
            }
        }
        for id in ready {
            // The instance is out of the map here; flushing replies needs no instance.
            self.flush_conn(id);
        }
    }

    fn flush_conn(&mut self, id: ConnId) {
        let Some(c) = self.conns.get_mut(&id) else {
            return;
        };
        let mut closed = false;
        while let Some(Slot::Ready { .. }) = c.slots.front() {
            if let Some(Slot::Ready { bytes, close }) = c.slots.pop_front() {
                self.events.push_back(Event::Reply { conn: id, bytes });
                if close {
                    self.events.push_back(Event::Close { conn: id });
                    closed = true;
                    break;
                }
            }
        }
        if closed {
            self.conns.remove(&id);
        }
    }

    fn install_snapshot(&mut self, now: Instant, app: Key, from: NodeId, inst: &mut Instance) {
        let Some(service) = inst
            .record
            .as_ref()
            .and_then(|r| self.services.get(&r.service))
        else {
            return;
        };
        let epoch = inst.record.as_ref().map_or(0, |r| r.epoch);
        let Some(m) = inst.member.as_mut() else {
            return;
        };
        let MemberRole::Slave(s) = &mut m.role else {
            return;
        };
        let Some(f) = s.fetch.take() else { return };
        // Entries past the common prefix were never the new log's: drop them, counted (in
        // this node's ledger too, so the count survives the master that saw it).
        if m.log.last_seq() > f.common {
            add_lost(
                &mut inst.lost,
                LostRange {
                    epoch: m.log.last_epoch(),
                    first: f.common + 1,
                    last: m.log.last_seq(),
                },
            );
            m.dropped_here += m.log.last_seq() - f.common;
            for e in m.log.held_after(f.common) {
                for k in service.change_keys(&e.change, MAX_DROPPED_KEYS) {
                    if m.dropped_keys.len() < MAX_DROPPED_KEYS && !m.dropped_keys.contains(&k) {
                        m.dropped_keys.push(k);
                    }
                }
            }
            log::debug!(
                "replication {app:?}: dropped {} unreplicated entries on rejoining",
                m.log.last_seq() - f.common
            );
        }
        m.state.clear();
        let mut ok = true;
        for c in &f.got {
            if m.state.restore_chunk(c).is_err() {
                ok = false;
                break;
            }
        }
        if !ok {
            self.counters.bad_messages += 1;
            m.state.clear();
            m.log.reset(0, 0, &[]);
            m.trusted = false;
            s.last_sync_ask = None;
            return;
        }
        m.log.reset(f.at_seq, f.at_epoch, &f.history);
        self.counters.snapshots_installed += 1;
        s.last_sync_ask = Some(now);
        self.send(
            from,
            app,
            Msg::SyncRequest {
                epoch,
                last_seq: f.at_seq,
                last_epoch: f.at_epoch,
                lost: inst.lost.clone(),
            },
        );
    }

    fn stand(&mut self, now: Instant, app: Key, inst: &mut Instance) {
        let Some(record) = inst.record.clone() else {
            return;
        };
        let me = self.cfg.me;
        let deadline = now.plus_ms(self.cfg.election_ms());
        let Some(m) = inst.member.as_mut() else {
            return;
        };
        let new_epoch = m.voted_epoch.max(record.epoch) + 1;
        m.voted_epoch = new_epoch;
        let mut votes = BTreeSet::new();
        votes.insert(me);
        m.role = MemberRole::Candidate(CandidateSide {
            new_epoch,
            votes,
            deadline,
            cas_in_flight: false,
            cas_tries: 0,
            outranked: false,
        });
        self.counters.elections += 1;
        let (last_epoch, last_seq) = (m.log.last_epoch(), m.log.last_seq());
        for to in record.members().filter(|&n| n != me).collect::<Vec<_>>() {
            self.send(
                to,
                app,
                Msg::VoteRequest {
                    new_epoch,
                    last_epoch,
                    last_seq,
                },
            );
        }
        log::debug!("replication {app:?}: standing for epoch {new_epoch}");
        self.maybe_cas(app, inst);
    }

    fn maybe_cas(&mut self, app: Key, inst: &mut Instance) {
        let Some(record) = inst.record.clone() else {
            return;
        };
        let me = self.cfg.me;
        let Some(m) = inst.member.as_mut() else {
            return;
        };
        let MemberRole::Candidate(c) = &mut m.role else {
            return;
        };
        if c.cas_in_flight || c.votes.len() < promotion_quorum(record.group()) {
            return;
        }
        c.cas_in_flight = true;
        let new_epoch = c.new_epoch;
        self.store_op(
            StoreOp::CompareAndSet {
                app,
                expected_version: record.version,
                record: record.promoted(me, new_epoch),
            },
            PendingOp::Cas { app, new_epoch },
        );
    }

    fn member_tick(&mut self, now: Instant, app: Key, inst: &mut Instance) {
        if !inst.fresh
            && now >= self.started.plus_ms(self.cfg.quarantine_ms())
            && inst.fetching_record.is_none()
        {
            inst.fetching_record =
                Some(self.store_op(StoreOp::Get { app }, PendingOp::Fetch { app }));
        }
        let fresh = inst.fresh;
        let Some(record) = inst.record.clone() else {
            return;
        };
        let me = self.cfg.me;
        let delay = self.cfg.promotion_delay_ms();
        let hb = self.cfg.heartbeat_ms;
        let Some(m) = inst.member.as_mut() else {
            return;
        };
        match &mut m.role {
            MemberRole::Master(_) => {
                self.master_tick(now, app, inst);
                self.settle_remote(now, app, inst);
                self.settle_local(now, app, inst);
            }
            MemberRole::Candidate(c) => {
                if now >= c.deadline {
                    // Outranked: wait a whole promotion delay for the newer log to win.
                    // Else stand again after a short random wait (split votes end).
                    let jitter = self.rng.below(hb * 3 + 1);
                    let mut side = SlaveSide::new(now, jitter);
                    if !c.outranked {
                        side.last_heard = None;
                        side.jitter_ms = 0;
                        side.stand_at = Some(now.plus_ms(jitter));
                    }
                    m.role = MemberRole::Slave(side);
                } else if !c.cas_in_flight {
                    self.maybe_cas(app, inst);
                }
            }
            MemberRole::Slave(s) => {
                let first = record.epoch == 0 && record.master == me;
                let silent = match (s.last_heard, s.stand_at) {
                    (_, Some(at)) => now >= at,
                    (None, None) => true,
                    (Some(t), None) => now.millis_since(t) >= delay + s.jitter_ms,
                };
                // At creation the preferred master stands first; the others only if it stays
                // silent a promotion delay past everyone's quarantine.
                let unborn_wait = record.epoch == 0
                    && !first
                    && now < self.started.plus_ms(self.cfg.quarantine_ms() + delay);
                let may_stand = fresh
                    && m.trusted
                    && now >= m.promise_until
                    && (first || silent)
                    && !unborn_wait;
                if may_stand {
                    self.stand(now, app, inst);
                } else if let Some(f) = s.fetch.as_mut()
                    && now.millis_since(f.last_asked) >= 4 * hb
                {
                    // The snapshot stalled (the master may have dropped it): ask again.
                    s.fetch = None;
                    s.last_sync_ask = None;
                }
            }
        }
    }

    /// Time passes.
    pub fn handle_timeout(&mut self, now: Instant) {
        if now < self.next_tick {
            return;
        }
        self.next_tick = now.plus_ms(self.cfg.tick_ms());
        self.last_now = now;
        let timeout = self.cfg.store_timeout_ms;
        let expired: Vec<StoreOpId> = self
            .pending_ops
            .iter()
            .filter(|(_, (_, at))| now.millis_since(*at) >= timeout)
            .map(|(id, _)| *id)
            .collect();
        for op in expired {
            self.handle_store_result(now, op, StoreResult::Unavailable);
        }
        let apps: Vec<Key> = self.instances.keys().copied().collect();
        for app in apps {
            let Some(mut inst) = self.instances.remove(&app) else {
                continue;
            };
            self.member_tick(now, app, &mut inst);
            self.instances.insert(app, inst);
        }
        self.relay_tick(now);
    }

    /// What this node knows of an instance.
    pub fn status(&self, app: Key, now: Instant) -> Option<InstanceStatus> {
        let inst = self.instances.get(&app)?;
        let m = inst.member.as_ref();
        Some(InstanceStatus {
            record: inst.record.clone(),
            view: self.view(inst, now),
            accepting_writes: self.is_accepting_writes(app, now),
            lost_writes: lost_count(&inst.lost),
            dropped_here: m.map_or(0, |m| m.dropped_here),
            dropped_keys: m.map_or_else(Vec::new, |m| m.dropped_keys.clone()),
            state_hash: m.map(|m| m.state.state_hash()),
            memory_used: m.map_or(0, |m| m.state.memory_used()),
            trusted: m.is_some_and(|m| m.trusted),
        })
    }

    /// Whether this node is a master that would apply a write now (holds its lease).
    pub fn is_accepting_writes(&self, app: Key, now: Instant) -> bool {
        matches!(
            self.instances.get(&app).and_then(|i| i.member.as_ref()).map(|m| &m.role),
            Some(MemberRole::Master(ms)) if ms.lease_valid(now)
        )
    }

    /// Until when (this node's clock) its lease lets it serve without further acks, if it
    /// is a master holding one.
    pub fn lease_until(&self, app: Key) -> Option<Instant> {
        let m = self.instances.get(&app)?.member.as_ref()?;
        let MemberRole::Master(ms) = &m.role else {
            return None;
        };
        let n = ms.slaves.len() + 1;
        let need = lease_quorum(n) - 1;
        if need == 0 {
            return Some(Instant::from_micros(u64::MAX));
        }
        let mut until: Vec<Instant> = ms.slaves.iter().filter_map(|p| p.lease_until).collect();
        until.sort_unstable_by(|a, b| b.cmp(a));
        until.get(need - 1).copied()
    }

    /// Whether this node is a member whose log survived (it synced since it started).
    pub fn is_trusted_member(&self, app: Key) -> bool {
        self.instances
            .get(&app)
            .and_then(|i| i.member.as_ref())
            .is_some_and(|m| m.trusted)
    }

    /// The newest epoch this node knows for `app` (0: none).
    pub fn epoch(&self, app: Key) -> u64 {
        self.instances
            .get(&app)
            .and_then(|i| i.record.as_ref())
            .map_or(0, |r| r.epoch)
    }

    /// This node's last log sequence and its epoch for `app`, if a member.
    pub fn log_end(&self, app: Key) -> Option<(u64, u64)> {
        let m = self.instances.get(&app)?.member.as_ref()?;
        Some((m.log.last_seq(), m.log.last_epoch()))
    }
}

#[cfg(test)]
#[path = "agent_tests.rs"]
mod tests;
