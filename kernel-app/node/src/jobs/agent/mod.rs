//! The job agent: one node's part in fault-tolerant jobs, as an I/O-free state machine beside
//! the overlay peer. It plays four roles at once:
//!
//! - **supervisor** of every task whose root it is: reads its copy of the task record, picks an
//!   executor (the nearest node advertising the app and a free slot), leases the task to it,
//!   re-dispatches when a lease runs out or the overlay declares the executor failed, and
//!   keeps the **completion registry** entry (the record's final state) — idempotent, with
//!   output hashes compared when two executors ran it.
//!   A map task's supervisor feeds its outputs to the reduce tasks' roots, which **spawn** the
//!   reduce tasks as map outputs register.
//! - **executor**: accepts at most `slots` tasks, fetches inputs, hands [`Work`] to the driver,
//!   stores outputs, reports; renews its lease meanwhile. Handed a task for an app it lacks, it
//!   delegates it with a signed token.
//! - **Data Manager**: a bounded chunk store; chunks verified on arrival, `k` copies kept by
//!   the chunk's root, missing ones fetched.
//! - **submitter** for the Application Agent: stores inputs and task records.
//!
//! Drive it like the overlay: `handle_message`, `handle_overlay_event`, `handle_timeout`,
//! `handle_work_done` in; `poll_transmit`, `poll_event`, `poll_work`, `poll_timeout` out.

use super::app::{AppSet, MAX_INPUTS, MAX_PARTS, TaskError, TaskKind, TaskOutput, TaskSpec};
use super::chunk::{ChunkError, ChunkId, ChunkStore};
use super::client::SubmitRequest;
use super::delegation::{DelegationGuard, DelegationToken, TokenAuthority};
use super::overlay::Overlay;
use super::record::{
    ExecResult, JobId, JobRecord, Lease, MAX_EXEC_COPIES, MAX_USER, REDUCE_BASE, TaskFailure,
    TaskId, TaskRecord, TaskState, job_id, output_hash, reduce_record, task_id,
};
use super::wire::{self, DispatchReply, JOB_WIRE_VERSION, JobMessage, JobPacket};
use crate::id::{Key, NodeId};
use crate::launch::PeerAddr;
use crate::node::{Event, OpId, PutError};
use crate::rng::Rng;
use crate::time::Instant;
use crate::wire::Contact;
use alloc::boxed::Box;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::string::String;
use alloc::vec::Vec;

mod executor;
mod messages;
mod submitter;
mod supervisor;
mod transfers;

/// Most job messages waiting in `poll_transmit`.
pub const MAX_JOB_TRANSMITS: usize = 4096;
/// Most events waiting in `poll_event`.
pub const MAX_JOB_EVENTS: usize = 1024;
/// Most tasks one node supervises at once.
pub const MAX_SUPERVISED: usize = 1024;
/// Most capacity adverts remembered.
pub const MAX_CAPACITY_ENTRIES: usize = 128;
/// Most failed nodes remembered for takeovers.
const MAX_FAILED_PEERS: usize = 64;
/// Most records looked at per supervision scan.
const SCAN_BATCH: usize = 128;
/// Most chunks looked at per repair pass.
const REPAIR_BATCH: usize = 32;
/// Most messages handled from the local loopback per call.
const LOOPBACK_BATCH: usize = 512;
/// Most lookups, fetches, uploads and record puts in flight.
const MAX_OUTSTANDING: usize = 512;

/// Job timing and bounds; `Default` suits TCG guests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JobConfig {
    /// Tasks this node runs at once.
    pub slots: u8,
    /// Copies of each chunk (the records' copies are the overlay's `k`).
    pub replicas: usize,
    /// A lease lasts this long past the executor's last renewal.
    pub lease_ms: u64,
    /// An executor renews this often.
    pub renew_ms: u64,
    /// Capacity adverts go out this often; entries older than 4 periods are ignored.
    pub advert_ms: u64,
    /// The supervisor looks at its tasks this often.
    pub scan_ms: u64,
    /// Lookups, fetches, uploads, reports and record puts are retried this often.
    pub retry_ms: u64,
    /// Chunk copies are checked this often.
    pub repair_ms: u64,
    /// Executors lost before a task is failed for good.
    pub max_attempts: u8,
    /// A delegation token lives this long.
    pub delegation_ttl_ms: u64,
    /// Whether this node delegates tasks for applications it lacks (off without trust
    /// material: the stand-in token authority would accept anyone's tokens).
    pub delegation: bool,
    /// An executor that has reported and hears nothing from any supervisor this long gives the
    /// slot back.
    pub abandon_ms: u64,
    pub max_chunks: usize,
    pub max_chunk_bytes: usize,
}

impl Default for JobConfig {
    fn default() -> Self {
        JobConfig {
            slots: 2,
            replicas: 3,
            lease_ms: 6_000,
            renew_ms: 1_500,
            advert_ms: 2_000,
            scan_ms: 500,
            retry_ms: 1_000,
            repair_ms: 3_000,
            max_attempts: 8,
            delegation_ttl_ms: 10_000,
            delegation: true,
            abandon_ms: 60_000,
            max_chunks: 4096,
            max_chunk_bytes: 64 << 20,
        }
    }
}

/// A job message to send on the job channel of the peer whose overlay address is `dst`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobTransmit {
    pub dst: PeerAddr,
    pub payload: Vec<u8>,
}

/// A task for the driver to run with its [`AppSet`] (then `handle_work_done`).
#[derive(Clone, Debug)]
pub struct Work {
    pub id: u64,
    pub task: TaskId,
    pub spec: TaskSpec,
    pub inputs: Vec<Vec<u8>>,
}

/// What the driver (kernel log, simulator checks, the AA) may want to know.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JobEvent {
    /// The completion registry registered a task (once per supervisor: see the sim's checks).
    TaskRegistered {
        job: JobId,
        task: TaskId,
        output_hash: Key,
        verified: bool,
    },
    /// Two executors disagreed: reported, not registered.
    TaskDisputed {
        job: JobId,
        task: TaskId,
        hashes: Vec<Key>,
    },
    TaskFailed {
        job: JobId,
        task: TaskId,
        failure: TaskFailure,
    },
    /// A reduce task was created at its root by a registering map output.
    ReduceSpawned { job: JobId, task: TaskId },
    /// A task was leased to an executor.
    Dispatched { task: TaskId, to: NodeId },
    /// Every input and task record of a submitted job is stored.
    Submitted { job: JobId },
    /// A chunk asked for with `fetch_chunk` arrived (verified).
    ChunkFetched { id: ChunkId, data: Vec<u8> },
}

/// Why a submission was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SubmitError {
    NotJoined,
    /// A bound of the task, input or record encoding is broken.
    OutOfBounds,
    /// Too many operations already in flight.
    Busy,
    /// A task names an input chunk this node does not hold (put it first).
    MissingInput,
}

impl core::fmt::Display for SubmitError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            SubmitError::NotJoined => write!(f, "node has not joined the overlay"),
            SubmitError::OutOfBounds => write!(f, "job breaks a task, input or record bound"),
            SubmitError::Busy => write!(f, "too many job operations in flight"),
            SubmitError::MissingInput => write!(f, "a task's input chunk was not put first"),
        }
    }
}

impl core::error::Error for SubmitError {}

/// A job as the Application Agent hands it to a node.
#[derive(Clone, Debug)]
pub struct Submission {
    pub name: String,
    pub user: String,
    pub app: String,
    /// Makes resubmissions distinct jobs.
    pub nonce: u64,
    /// Per task: parameters and input chunks.
    pub tasks: Vec<(Vec<u8>, Vec<Vec<u8>>)>,
    /// 0: single tasks; else map tasks feeding this many in-overlay reduce tasks.
    pub reducers: u8,
    /// Executors per task (2: outputs compared).
    pub exec_copies: u8,
    /// Copies of the job's task records and chunks (the manifest's `replication`); 0: the
    /// cluster's. Clamped by the overlay to what its leaf set can place.
    pub replication: u8,
}

/// Drops and oddities, counted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JobCounters {
    pub undecodable: u64,
    pub bad_version: u64,
    pub chunks_corrupt: u64,
    pub chunks_refused: u64,
    pub delegations_sent: u64,
    pub delegations_accepted: u64,
    pub delegations_refused: u64,
    pub leases_expired: u64,
    /// Leases ended because the overlay declared their executor failed (the task re-leased at
    /// once instead of when the lease ran out).
    pub releases_on_failure: u64,
    pub stale_reports: u64,
    /// Completions arriving after registration whose hash differs from the registered one.
    pub late_disagreements: u64,
    /// Supervisor writes refused because the record had moved on (another supervisor's, after
    /// a partition or a change of root).
    pub supervision_conflicts: u64,
    pub records_unencodable: u64,
    pub transmit_drops: u64,
    pub event_drops: u64,
    pub busy_drops: u64,
    pub works_started: u64,
}

#[derive(Clone, Copy, Debug)]
struct CapacityEntry {
    contact: Contact,
    apps_mask: u8,
    free: u8,
    heard: Instant,
}

#[derive(Clone, Debug)]
struct Supervision {
    rec: TaskRecord,
    deadlines: Vec<(NodeId, Instant)>,
    /// Refused this task since its last acceptance.
    tried: Vec<NodeId>,
    /// Map tasks: partitions whose reduce root acknowledged our output.
    contributed: u16,
    next_contribute: Instant,
    dirty: bool,
    put_op: Option<OpId>,
    /// The record's version this supervision last wrote or read (its writes are
    /// compare-and-sets on it).
    version: u64,
    /// The registry event to announce once the final record is written.
    announce: Option<JobEvent>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Phase {
    Fetching,
    Queued(u64),
    Storing { outputs: Vec<ChunkId> },
    Reporting { outputs: Vec<ChunkId> },
    ReportingFailure(TaskError),
}

#[derive(Clone, Debug)]
struct Execution {
    attempt: u8,
    rec: TaskRecord,
    supervisor: Contact,
    phase: Phase,
    next_renew: Instant,
    next_report: Instant,
    heard: Instant,
}

#[derive(Clone, Debug)]
struct Upload {
    next_try: Instant,
}

#[derive(Clone, Debug)]
struct Fetch {
    next_try: Instant,
    for_client: bool,
}

#[derive(Clone, Debug)]
struct RecordPut {
    job: JobId,
    value: Vec<u8>,
    copies: u8,
    op: Option<OpId>,
    /// A failed put is checked with a get before it is repeated (it may have landed).
    checking: bool,
    next_try: Instant,
}

/// One node's job agent.
pub struct JobAgent {
    cfg: JobConfig,
    apps: AppSet,
    app_names: Vec<String>,
    /// App names heard in adverts; an advert's mask bit `i` is `known_apps[i]`.
    known_apps: Vec<String>,
    auth: Box<dyn TokenAuthority>,
    guard: DelegationGuard,
    rng: Rng,
    me: Contact,
    chunks: ChunkStore,
    capacity: BTreeMap<NodeId, CapacityEntry>,
    /// Nodes the overlay declared failed lately, and when: a task taken over later (e.g. from
    /// a supervisor that died with its executor) does not keep a lease held by one of them.
    failed_peers: VecDeque<(NodeId, Instant)>,
    supervised: BTreeMap<TaskId, Supervision>,
    executions: BTreeMap<TaskId, Execution>,
    routed: BTreeMap<OpId, (Key, JobMessage)>,
    uploads: BTreeMap<ChunkId, Upload>,
    fetches: BTreeMap<ChunkId, Fetch>,
    record_puts: BTreeMap<Key, RecordPut>,
    record_ops: BTreeMap<OpId, Key>,
    sup_ops: BTreeMap<OpId, TaskId>,
    /// Writes of final records and the registry event each announces when acknowledged.
    announce_ops: BTreeMap<OpId, JobEvent>,
    jobs_in_submission: BTreeMap<JobId, usize>,
    transmits: VecDeque<JobTransmit>,
    events: VecDeque<JobEvent>,
    work: VecDeque<Work>,
    loopback: VecDeque<JobMessage>,
    next_work_id: u64,
    next_tick: Instant,
    next_advert: Instant,
    next_scan: Instant,
    next_repair: Instant,
    scan_cursor: Option<Key>,
    repair_cursor: Option<ChunkId>,
    counters: JobCounters,
}

impl JobAgent {
    /// An agent for the node reached at `me`, running `apps`, signing delegations with `auth`.
    pub fn new(
        cfg: JobConfig,
        apps: AppSet,
        auth: Box<dyn TokenAuthority>,
        me: Contact,
        rng_seed: [u8; 32],
        now: Instant,
    ) -> Self {
        let app_names = apps.names().map(String::from).collect();
        JobAgent {
            cfg,
            apps,
            app_names,
            known_apps: Vec::new(),
            auth,
            guard: DelegationGuard::default(),
            rng: Rng::from_seed(rng_seed),
            me,
            chunks: ChunkStore::new(cfg.max_chunks, cfg.max_chunk_bytes),
            capacity: BTreeMap::new(),
            failed_peers: VecDeque::new(),
            supervised: BTreeMap::new(),
            executions: BTreeMap::new(),
            routed: BTreeMap::new(),
            uploads: BTreeMap::new(),
            fetches: BTreeMap::new(),
            record_puts: BTreeMap::new(),
            record_ops: BTreeMap::new(),
            sup_ops: BTreeMap::new(),
            announce_ops: BTreeMap::new(),
            jobs_in_submission: BTreeMap::new(),
            transmits: VecDeque::new(),
            events: VecDeque::new(),
            work: VecDeque::new(),
            loopback: VecDeque::new(),
            next_work_id: 1,
            next_tick: now,
            next_advert: now,
            next_scan: now,
            next_repair: now.plus_ms(cfg.repair_ms),
            scan_cursor: None,
            repair_cursor: None,
            counters: JobCounters::default(),
        }
    }

    // ---- inspection ----

    pub fn counters(&self) -> &JobCounters {
        &self.counters
    }

    pub fn chunks(&self) -> &ChunkStore {
        &self.chunks
    }

    /// Tasks accepted and not yet finished here (never more than `slots`).
    pub fn running(&self) -> usize {
        self.executions.len()
    }

    pub fn slots(&self) -> u8 {
        self.cfg.slots
    }

    /// This node's view of a task it supervises (with the executors it tried in vain).
    pub fn supervision(&self, task: TaskId) -> Option<(&TaskRecord, &[NodeId])> {
        self.supervised
            .get(&task)
            .map(|s| (&s.rec, s.tried.as_slice()))
    }

    /// Distinct nodes whose capacity adverts this node holds (stale ones included: an entry
    /// older than four advert periods is not dispatched to).
    pub fn adverts_heard(&self) -> usize {
        self.capacity.len()
    }

    /// Tasks this node supervises now.
    pub fn supervising(&self) -> usize {
        self.supervised.len()
    }

    // ---- outputs ----

    pub fn poll_transmit(&mut self) -> Option<JobTransmit> {
        self.transmits.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<JobEvent> {
        self.events.pop_front()
    }

    /// The next task to run; the driver runs it and calls `handle_work_done`.
    pub fn poll_work(&mut self) -> Option<Work> {
        self.work.pop_front()
    }

    /// When `handle_timeout` must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        Some(self.next_tick)
    }

    // ---- inputs ----

    /// Handles one job message. Anything malformed is dropped and counted.
    pub fn handle_message(&mut self, now: Instant, ov: &mut impl Overlay, bytes: &[u8]) {
        self.me = ov.contact();
        let p = match wire::decode(bytes) {
            Ok(p) => p,
            Err(wire::JobDecodeError::Version(_)) => {
                self.counters.bad_version += 1;
                return;
            }
            Err(_) => {
                self.counters.undecodable += 1;
                return;
            }
        };
        if p.sender.id == self.me.id || !ov.is_joined() {
            return;
        }
        self.dispatch(now, ov, p.sender, p.message);
        self.drain_loopback(now, ov);
    }

    /// Takes the overlay's answers to this agent's requests; returns whether it was one.
    pub fn handle_overlay_event(&mut self, now: Instant, ov: &mut impl Overlay, e: &Event) -> bool {
        self.me = ov.contact();
        let used = match e {
            Event::LookupDone { op, root, .. } => match self.routed.remove(op) {
                Some((_, msg)) => {
                    self.send(*root, msg);
                    true
                }
                None => false,
            },
            Event::PutDone { op, version, .. } => {
                if let Some(key) = self.record_ops.remove(op) {
                    self.record_stored(key);
                    true
                } else if let Some(task) = self.sup_ops.remove(op) {
                    if let Some(s) = self.supervised.get_mut(&task) {
                        s.put_op = None;
                        s.version = *version;
                    }
                    if let Some(e) = self.announce_ops.remove(op) {
                        if let Some(s) = self.supervised.get_mut(&task) {
                            s.announce = None;
                        }
                        self.emit(e);
                    }
                    true
                } else {
                    false
                }
            }
            Event::PutFailed {
                op,
                error: PutError::VersionMismatch { current },
                ..
            } if self.record_ops.contains_key(op) || self.sup_ops.contains_key(op) => {
                if let Some(key) = self.record_ops.remove(op) {
                    // Task records are created only where absent: one exists, so ours is stored
                    // (a retry of ours that landed) or the job was submitted before.
                    self.record_stored(key);
                } else if let Some(task) = self.sup_ops.remove(op) {
                    self.announce_ops.remove(op);
                    self.supervision_write_lost(ov, task, *current);
                }
                true
            }
            Event::GetDone { op, value, .. } => match self.record_ops.remove(op) {
                Some(key) => {
                    if value.is_some() {
                        self.record_stored(key);
                    } else if let Some(r) = self.record_puts.get_mut(&key) {
                        r.checking = false;
                        r.op = None;
                        r.next_try = now;
                    }
                    true
                }
                None => false,
            },
            Event::RequestFailed { op, .. } | Event::PutFailed { op, .. } => {
                self.announce_ops.remove(op);
                if self.routed.remove(op).is_some() {
                    true
                } else if let Some(key) = self.record_ops.remove(op) {
                    if let Some(r) = self.record_puts.get_mut(&key) {
                        // A put may have landed without its acknowledgement: check first.
                        r.checking = !r.checking;
                        r.op = None;
                        r.next_try = now.plus_ms(self.cfg.retry_ms);
                    }
                    true
                } else if let Some(task) = self.sup_ops.remove(op) {
                    if let Some(s) = self.supervised.get_mut(&task) {
                        s.put_op = None;
                        s.dirty = true;
                    }
                    true
                } else {
                    false
                }
            }
            Event::PeerFailed { id } => {
                self.executor_failed(now, ov, *id);
                // Not claimed: the overlay's own service logs it too.
                false
            }
            _ => false,
        };
        self.drain_loopback(now, ov);
        used
    }

    /// Runs every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant, ov: &mut impl Overlay) {
        if now < self.next_tick {
            return;
        }
        self.tick(now, ov);
    }

    /// The driver ran work `id`.
    pub fn handle_work_done(
        &mut self,
        now: Instant,
        ov: &mut impl Overlay,
        id: u64,
        result: Result<TaskOutput, TaskError>,
    ) {
        self.me = ov.contact();
        let Some((&task, _)) = self
            .executions
            .iter()
            .find(|(_, e)| e.phase == Phase::Queued(id))
        else {
            return; // revoked meanwhile
        };
        let e = self.executions.get_mut(&task).expect("found above");
        match result {
            Ok(out) if out.parts.len() == e.rec.spec.kind.parts() => {
                let mut outputs = Vec::new();
                for part in &out.parts {
                    let cid = Key::for_content(part);
                    outputs.push(cid);
                    match self.chunks.insert(cid, part) {
                        Ok(()) => self.chunks.set_copies(cid, e.rec.replicas),
                        Err(_) => self.counters.chunks_refused += 1,
                    }
                    self.uploads.insert(cid, Upload { next_try: now });
                }
                e.phase = Phase::Storing { outputs };
            }
            Ok(_) => e.phase = Phase::ReportingFailure(TaskError::OutputTooLarge),
            Err(err) => e.phase = Phase::ReportingFailure(err),
        }
        e.next_report = now;
        self.tick(now, ov);
    }

    // ---- plumbing ----

    /// Sends `msg` to `key`'s root: itself when it is the root, else after a lookup.
    fn send_to_root(&mut self, now: Instant, ov: &mut impl Overlay, key: Key, msg: JobMessage) {
        if ov.is_root(key) {
            if self.loopback.len() < MAX_JOB_TRANSMITS {
                self.loopback.push_back(msg);
            }
            return;
        }
        if self.routed.len() >= MAX_OUTSTANDING {
            self.counters.busy_drops += 1;
            return;
        }
        match ov.lookup(now, key) {
            Ok(op) => {
                self.routed.insert(op, (key, msg));
            }
            Err(_) => self.counters.busy_drops += 1,
        }
    }

    fn send(&mut self, to: Contact, msg: JobMessage) {
        if to.id == self.me.id {
            if self.loopback.len() < MAX_JOB_TRANSMITS {
                self.loopback.push_back(msg);
            }
            return;
        }
        if self.transmits.len() >= MAX_JOB_TRANSMITS {
            self.counters.transmit_drops += 1;
            return;
        }
        let packet = JobPacket {
            version: JOB_WIRE_VERSION,
            sender: self.me,
            message: msg,
        };
        match wire::encode(&packet) {
            Some(payload) => self.transmits.push_back(JobTransmit {
                dst: to.addr,
                payload,
            }),
            None => self.counters.transmit_drops += 1,
        }
    }

    fn drain_loopback(&mut self, now: Instant, ov: &mut impl Overlay) {
        for _ in 0..LOOPBACK_BATCH {
            let Some(msg) = self.loopback.pop_front() else {
                return;
            };
            let me = self.me;
            self.dispatch(now, ov, me, msg);
        }
    }

    /// Copies chunk `id` keeps: its job's replication, else the cluster's.
    fn chunk_copies(&self, id: ChunkId) -> usize {
        self.copies_or_cluster(self.chunks.copies(id))
    }

    fn copies_or_cluster(&self, copies: u8) -> usize {
        match copies {
            0 => self.cfg.replicas,
            c => usize::from(c),
        }
    }

    /// Whether this node is in chunk `id`'s replica set.
    fn in_chunk_set(&self, ov: &impl Overlay, id: ChunkId) -> bool {
        ov.replica_set(id, self.chunk_copies(id))
            .iter()
            .any(|c| c.id == self.me.id)
    }

    fn emit(&mut self, e: JobEvent) {
        if self.events.len() >= MAX_JOB_EVENTS {
            self.counters.event_drops += 1;
            return;
        }
        self.events.push_back(e);
    }

    /// The index of `app` in the names this node has heard of (bounded by [`MAX_APP_NAMES`]).
    fn learn_app(&mut self, app: &str) -> Option<usize> {
        if let Some(i) = self.app_index(app) {
            return Some(i);
        }
        if self.known_apps.len() >= MAX_APP_NAMES || app.len() > super::app::MAX_APP_NAME {
            return None;
        }
        self.known_apps.push(String::from(app));
        Some(self.known_apps.len() - 1)
    }
}

/// Distinct application names one node tracks in capacity adverts (bits of a `u8` mask).
pub const MAX_APP_NAMES: usize = 8;

fn set_deadline(deadlines: &mut Vec<(NodeId, Instant)>, id: NodeId, at: Instant) {
    match deadlines.iter_mut().find(|(n, _)| *n == id) {
        Some(d) => d.1 = at,
        None => deadlines.push((id, at)),
    }
}
