//! The job agent: one node's part in fault-tolerant jobs, as an I/O-free state machine beside
//! the overlay peer. It plays four roles at once:
//!
//! - **supervisor** of every task whose root it is: reads its copy of the task record, picks an
//!   executor (the nearest node advertising the app and a free slot), leases the task to it,
//!   re-dispatches when a lease runs out, and keeps the **completion registry** entry (the
//!   record's final state) — idempotent, with output hashes compared when two executors ran it.
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
use crate::node::{Event, OpId};
use crate::rng::Rng;
use crate::time::Instant;
use crate::wire::Contact;
use alloc::boxed::Box;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::string::String;
use alloc::vec::Vec;

/// Most job messages waiting in `poll_transmit`.
pub const MAX_JOB_TRANSMITS: usize = 4096;
/// Most events waiting in `poll_event`.
pub const MAX_JOB_EVENTS: usize = 1024;
/// Most tasks one node supervises at once.
pub const MAX_SUPERVISED: usize = 1024;
/// Most capacity adverts remembered.
pub const MAX_CAPACITY_ENTRIES: usize = 128;
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
    pub stale_reports: u64,
    /// Completions arriving after registration whose hash differs from the registered one.
    pub late_disagreements: u64,
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
    supervised: BTreeMap<TaskId, Supervision>,
    executions: BTreeMap<TaskId, Execution>,
    routed: BTreeMap<OpId, (Key, JobMessage)>,
    uploads: BTreeMap<ChunkId, Upload>,
    fetches: BTreeMap<ChunkId, Fetch>,
    record_puts: BTreeMap<Key, RecordPut>,
    record_ops: BTreeMap<OpId, Key>,
    sup_ops: BTreeMap<OpId, TaskId>,
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
            supervised: BTreeMap::new(),
            executions: BTreeMap::new(),
            routed: BTreeMap::new(),
            uploads: BTreeMap::new(),
            fetches: BTreeMap::new(),
            record_puts: BTreeMap::new(),
            record_ops: BTreeMap::new(),
            sup_ops: BTreeMap::new(),
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

    // ---- commands ----

    /// Stores a job's inputs and task records (through this node); `Submitted` follows once
    /// every record is stored.
    pub fn submit(
        &mut self,
        now: Instant,
        ov: &mut impl Overlay,
        s: &Submission,
    ) -> Result<JobId, SubmitError> {
        if !ov.is_joined() {
            return Err(SubmitError::NotJoined);
        }
        let mut tasks = Vec::with_capacity(s.tasks.len());
        for (params, inputs) in &s.tasks {
            let mut ids = Vec::with_capacity(inputs.len());
            for d in inputs {
                ids.push(
                    self.store_input(now, d)
                        .map_err(|_| SubmitError::OutOfBounds)?,
                );
            }
            tasks.push((params.clone(), ids));
        }
        let req = SubmitRequest {
            name: s.name.clone(),
            app: s.app.clone(),
            nonce: s.nonce,
            tasks,
            reducers: s.reducers,
            exec_copies: s.exec_copies,
            only: None,
        };
        self.submit_stored(now, ov, &s.user, &req)
    }

    /// Keeps an input chunk here and uploads it to its root (which keeps `replicas` copies).
    pub fn store_input(&mut self, now: Instant, data: &[u8]) -> Result<ChunkId, ChunkError> {
        let id = Key::for_content(data);
        self.chunks.insert(id, data)?;
        self.uploads.insert(id, Upload { next_try: now });
        Ok(id)
    }

    /// Stores the task records of a job whose inputs were stored with [`Self::store_input`];
    /// `Submitted` follows once every record is stored. The same user, name and nonce name the
    /// same job: submitting it again rewrites only records that are not already stored.
    pub fn submit_stored(
        &mut self,
        now: Instant,
        ov: &mut impl Overlay,
        user: &str,
        s: &SubmitRequest,
    ) -> Result<JobId, SubmitError> {
        if !ov.is_joined() {
            return Err(SubmitError::NotJoined);
        }
        let n = s.tasks.len();
        let bounded = n > 0
            && n <= u16::from(u8::MAX) as usize + 1
            && user.len() <= MAX_USER
            && (1..=MAX_EXEC_COPIES).contains(&s.exec_copies)
            && (s.reducers as usize) <= MAX_PARTS
            && (s.reducers == 0 || n <= MAX_INPUTS);
        if !bounded {
            return Err(SubmitError::OutOfBounds);
        }
        if let Some((_, ids)) = s
            .tasks
            .iter()
            .find(|(_, ids)| ids.iter().any(|id| !self.chunks.contains(*id)))
        {
            let missing = ids.iter().find(|id| !self.chunks.contains(**id));
            log::debug!("submission refused: input {missing:?} not stored here");
            return Err(SubmitError::MissingInput);
        }
        if self.record_puts.len() + n + 1 > MAX_OUTSTANDING {
            return Err(SubmitError::Busy);
        }
        let job = job_id(user, &s.name, s.nonce);
        let kind = if s.reducers > 0 {
            TaskKind::Map {
                reducers: s.reducers,
            }
        } else {
            TaskKind::Single
        };
        let mut records = Vec::new();
        for (i, (params, ids)) in s.tasks.iter().enumerate() {
            let spec = TaskSpec {
                app: s.app.clone(),
                kind,
                params: params.clone(),
            };
            let mut rec = TaskRecord::new(job, i as u16, user, spec, ids.clone());
            rec.exec_copies = s.exec_copies;
            if s.reducers > 0 {
                rec.maps = n as u8;
            }
            let value = rec.encode().ok_or(SubmitError::OutOfBounds)?;
            if s.only.as_ref().is_none_or(|o| o.contains(&(i as u16))) {
                records.push((rec.id(), value));
            }
        }
        let jr = JobRecord {
            name: s.name.clone(),
            user: user.into(),
            app: s.app.clone(),
            tasks: n as u16,
            reducers: s.reducers,
            exec_copies: s.exec_copies,
        };
        records.push((job, jr.encode().ok_or(SubmitError::OutOfBounds)?));
        self.jobs_in_submission.insert(job, records.len());
        for (key, value) in records {
            self.record_puts.insert(
                key,
                RecordPut {
                    job,
                    value,
                    op: None,
                    checking: false,
                    next_try: now,
                },
            );
        }
        self.tick(now, ov);
        Ok(job)
    }

    /// Cancels a job's tasks: each task's root marks its record failed (`Cancelled`) unless it
    /// is already final, and revokes the executors' leases. Answers how many tasks were asked.
    pub fn cancel(&mut self, now: Instant, ov: &mut impl Overlay, tasks: &[TaskId]) -> usize {
        for &task in tasks {
            self.send_to_root(now, ov, task, JobMessage::Cancel { task });
        }
        self.tick(now, ov);
        tasks.len()
    }

    /// Fetches a chunk (outputs, for the AA); completes with `ChunkFetched`.
    pub fn fetch_chunk(&mut self, now: Instant, ov: &mut impl Overlay, id: ChunkId) {
        if let Some(d) = self.chunks.get(id) {
            let data = d.to_vec();
            self.emit(JobEvent::ChunkFetched { id, data });
            return;
        }
        self.fetches.insert(
            id,
            Fetch {
                next_try: now,
                for_client: true,
            },
        );
        self.tick(now, ov);
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
            Event::PutDone { op, .. } => {
                if let Some(key) = self.record_ops.remove(op) {
                    self.record_stored(key);
                    true
                } else if let Some(task) = self.sup_ops.remove(op) {
                    if let Some(s) = self.supervised.get_mut(&task) {
                        s.put_op = None;
                    }
                    true
                } else {
                    false
                }
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
            Event::RequestFailed { op, .. } => {
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
                        Ok(()) => {}
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

    // ---- the tick ----

    fn tick(&mut self, now: Instant, ov: &mut impl Overlay) {
        self.me = ov.contact();
        self.next_tick = now.plus_ms(self.cfg.scan_ms.min(self.cfg.retry_ms).max(1) / 2 + 1);
        if !ov.is_joined() {
            return;
        }
        if now >= self.next_advert {
            self.next_advert = now.plus_ms(self.cfg.advert_ms);
            self.advertise(ov);
        }
        if now >= self.next_scan {
            self.next_scan = now.plus_ms(self.cfg.scan_ms);
            self.scan(now, ov);
        }
        if now >= self.next_repair {
            self.next_repair = now.plus_ms(self.cfg.repair_ms);
            self.repair(ov);
        }
        self.step_executions(now, ov);
        self.step_transfers(now, ov);
        self.drain_loopback(now, ov);
    }

    fn advertise(&mut self, ov: &impl Overlay) {
        let free = self.cfg.slots.saturating_sub(self.executions.len() as u8);
        let msg = JobMessage::Capacity {
            apps: self.app_names.clone(),
            slots: self.cfg.slots,
            free,
        };
        for c in ov.neighbours().into_iter().take(64) {
            self.send(c, msg.clone());
        }
    }

    /// Supervision: take over tasks whose root this node became, drop those it no longer is,
    /// and move each supervised task along.
    fn scan(&mut self, now: Instant, ov: &mut impl Overlay) {
        let keys = ov.record_keys_after(self.scan_cursor, SCAN_BATCH);
        self.scan_cursor = if keys.len() < SCAN_BATCH {
            None
        } else {
            keys.last().copied()
        };
        for key in keys {
            if self.supervised.contains_key(&key) || !ov.is_root(key) {
                continue;
            }
            self.take_over(now, ov, key);
        }
        let tasks: Vec<TaskId> = self.supervised.keys().copied().collect();
        for t in tasks {
            if !ov.is_root(t) {
                // The new root holds a copy (the overlay re-replicates) and takes over.
                self.supervised.remove(&t);
                continue;
            }
            if let Some(mut s) = self.supervised.remove(&t) {
                // A copy merged in from elsewhere may be further along (e.g. after a partition).
                if let Some(stored) = ov.record(t).and_then(TaskRecord::decode)
                    && stored.state.is_final()
                    && !s.rec.state.is_final()
                {
                    s.rec = stored;
                }
                // A late retry of an older put (the overlay retries puts whose acknowledgement
                // was lost) may have overwritten the record: write it again.
                if s.put_op.is_none() && ov.record(t) != s.rec.encode().as_deref() {
                    s.dirty = true;
                }
                self.supervise(now, ov, &mut s);
                self.supervised.insert(t, s);
            }
        }
    }

    fn take_over(&mut self, now: Instant, ov: &mut impl Overlay, key: Key) -> bool {
        if self.supervised.len() >= MAX_SUPERVISED {
            self.counters.busy_drops += 1;
            return false;
        }
        let Some(rec) = ov.record(key).and_then(TaskRecord::decode) else {
            return false;
        };
        if rec.id() != key {
            return false;
        }
        let mut s = Supervision {
            rec,
            deadlines: Vec::new(),
            tried: Vec::new(),
            contributed: 0,
            next_contribute: now,
            dirty: false,
            put_op: None,
        };
        if let TaskState::Running { leases, .. } = &s.rec.state {
            for l in leases.clone() {
                s.deadlines
                    .push((l.executor.id, now.plus_ms(self.cfg.lease_ms)));
                self.send(
                    l.executor,
                    JobMessage::Adopt {
                        task: key,
                        attempt: l.attempt,
                    },
                );
            }
        }
        log::debug!("supervising task {key:?}");
        self.supervised.insert(key, s);
        true
    }

    fn supervise(&mut self, now: Instant, ov: &mut impl Overlay, s: &mut Supervision) {
        // Leases that ran out.
        if let TaskState::Running { leases, results } = &mut s.rec.state {
            let before = leases.len();
            leases.retain(|l| {
                s.deadlines
                    .iter()
                    .find(|(id, _)| *id == l.executor.id)
                    .is_none_or(|(_, d)| *d > now)
            });
            let lost = before - leases.len();
            if lost > 0 {
                self.counters.leases_expired += lost as u64;
                s.rec.attempts = s.rec.attempts.saturating_add(lost as u8);
                s.dirty = true;
                if leases.is_empty() && results.is_empty() {
                    s.rec.state = TaskState::Pending;
                }
            }
            let live: Vec<NodeId> = match &s.rec.state {
                TaskState::Running { leases, .. } => leases.iter().map(|l| l.executor.id).collect(),
                _ => Vec::new(),
            };
            s.deadlines.retain(|(id, _)| live.contains(id));
        }
        if !s.rec.state.is_final() && s.rec.attempts >= self.cfg.max_attempts {
            self.finish(s, TaskState::Failed(TaskFailure::AttemptsExhausted));
        }
        // Placement.
        if s.rec.inputs_ready() && !s.rec.state.is_final() {
            let have = match &s.rec.state {
                TaskState::Running { leases, results } => leases.len() + results.len(),
                _ => 0,
            };
            for _ in have..s.rec.exec_copies as usize {
                if !self.place(now, ov, s) {
                    break;
                }
            }
        }
        // A registered map task feeds the reduce tasks' roots until each acknowledges.
        if let (TaskKind::Map { reducers }, TaskState::Done { outputs, .. }) =
            (s.rec.spec.kind, &s.rec.state)
            && now >= s.next_contribute
        {
            // Contributions are repeated now and then even once acknowledged: a reduce record
            // written on both sides of a partition keeps only one side's inputs.
            let all = (1u16 << reducers) - 1;
            if s.contributed & all == all {
                s.contributed = 0;
                s.next_contribute = now.plus_ms(self.cfg.retry_ms * 20);
            } else {
                s.next_contribute = now.plus_ms(self.cfg.retry_ms);
            }
            let maps = s.rec.maps;
            for p in 0..reducers {
                if s.contributed & (1 << p) != 0 {
                    continue;
                }
                let Some(&chunk) = outputs.get(p as usize) else {
                    continue;
                };
                let msg = JobMessage::Contribute {
                    job: s.rec.job,
                    user: s.rec.user.clone(),
                    app: s.rec.spec.app.clone(),
                    partition: p,
                    maps,
                    map: s.rec.index as u8,
                    chunk,
                };
                self.send_to_root(now, ov, task_id(s.rec.job, REDUCE_BASE + p as u16), msg);
            }
        }
        if s.dirty && s.put_op.is_none() {
            self.write(now, ov, s);
        }
    }

    /// Leases the task to the nearest node with the app and a free slot (or, knowing none, to
    /// any neighbour allowed to delegate). Returns whether one was found.
    fn place(&mut self, now: Instant, ov: &mut impl Overlay, s: &mut Supervision) -> bool {
        let task = s.rec.id();
        let busy: Vec<NodeId> = match &s.rec.state {
            TaskState::Running { leases, results } => leases
                .iter()
                .map(|l| l.executor.id)
                .chain(results.iter().map(|r| r.executor))
                .collect(),
            _ => Vec::new(),
        };
        let fresh = self.cfg.advert_ms * 4;
        let mask = self.app_mask_of(&s.rec.spec.app);
        let mut best: Option<(Contact, bool)> = None;
        let mut best_rank = (u8::MAX, u32::MAX, u128::MAX);
        let me = self.me;
        let my_free = self.cfg.slots.saturating_sub(self.executions.len() as u8);
        let me_entry = CapacityEntry {
            contact: me,
            apps_mask: if self.apps.has(&s.rec.spec.app) { 1 } else { 0 },
            free: my_free,
            heard: now,
        };
        for e in self.capacity.values().chain(core::iter::once(&me_entry)) {
            if e.free == 0
                || now.millis_since(e.heard) > fresh
                || busy.contains(&e.contact.id)
                || s.tried.contains(&e.contact.id)
            {
                continue;
            }
            let has = if e.contact.id == me.id {
                e.apps_mask != 0
            } else {
                mask.is_some_and(|m| e.apps_mask & m != 0)
            };
            if !has {
                continue;
            }
            let (same, rtt) = if e.contact.id == me.id {
                (0, 0)
            } else {
                ov.proximity(&e.contact)
            };
            let rank = (same, rtt, me.id.distance(e.contact.id));
            if rank < best_rank {
                best_rank = rank;
                best = Some((e.contact, false));
            }
        }
        if best.is_none() {
            // Nobody known has the app: a neighbour may know one and delegate.
            let pick: Vec<Contact> = ov
                .neighbours()
                .into_iter()
                .filter(|c| !busy.contains(&c.id) && !s.tried.contains(&c.id))
                .collect();
            if !pick.is_empty() {
                let i = self.rng.below(pick.len() as u64) as usize;
                best = Some((pick[i], true));
            }
        }
        let Some((to, may_delegate)) = best else {
            // Every candidate refused (all were busy at once, e.g. a small cluster): forget the
            // refusals so the next scan asks again instead of leaving the task pending forever.
            s.tried.clear();
            return false;
        };
        if let Some(e) = self.capacity.get_mut(&to.id) {
            e.free = e.free.saturating_sub(1);
        }
        let attempt = s.rec.attempts;
        match &mut s.rec.state {
            TaskState::Running { leases, .. } => leases.push(Lease {
                executor: to,
                attempt,
            }),
            st => {
                *st = TaskState::Running {
                    leases: alloc::vec![Lease {
                        executor: to,
                        attempt,
                    }],
                    results: Vec::new(),
                }
            }
        }
        s.deadlines.push((to.id, now.plus_ms(self.cfg.lease_ms)));
        s.dirty = true;
        let record = s.rec.clone();
        self.send(
            to,
            JobMessage::Dispatch {
                task,
                attempt,
                record,
                may_delegate,
            },
        );
        self.emit(JobEvent::Dispatched { task, to: to.id });
        true
    }

    /// The bit of `app` in adverts' masks as this node sees them (apps are matched by name).
    fn app_mask_of(&self, app: &str) -> Option<u8> {
        self.app_index(app).map(|i| 1u8 << i)
    }

    fn app_index(&self, app: &str) -> Option<usize> {
        self.known_apps.iter().position(|a| a == app)
    }

    fn finish(&mut self, s: &mut Supervision, state: TaskState) {
        let (job, task) = (s.rec.job, s.rec.id());
        match &state {
            TaskState::Done {
                output_hash,
                verified,
                ..
            } => self.emit(JobEvent::TaskRegistered {
                job,
                task,
                output_hash: *output_hash,
                verified: *verified,
            }),
            TaskState::Disputed { hashes } => self.emit(JobEvent::TaskDisputed {
                job,
                task,
                hashes: hashes.clone(),
            }),
            TaskState::Failed(f) => self.emit(JobEvent::TaskFailed {
                job,
                task,
                failure: *f,
            }),
            _ => {}
        }
        s.rec.state = state;
        s.deadlines.clear();
        s.dirty = true;
    }

    fn write(&mut self, now: Instant, ov: &mut impl Overlay, s: &mut Supervision) {
        let Some(value) = s.rec.encode() else {
            self.counters.records_unencodable += 1;
            s.dirty = false;
            return;
        };
        match ov.put(now, s.rec.id(), &value) {
            Ok(op) => {
                s.dirty = false;
                s.put_op = Some(op);
                self.sup_ops.insert(op, s.rec.id());
            }
            Err(_) => self.counters.busy_drops += 1,
        }
    }

    /// Runs `f` on the supervision of `task`, taking it over first if this node is its root
    /// and holds a copy; writes the record if `f` changed it.
    fn with_supervision(
        &mut self,
        now: Instant,
        ov: &mut impl Overlay,
        task: TaskId,
        f: impl FnOnce(&mut Self, &mut Supervision),
    ) -> bool {
        let known = self.supervised.contains_key(&task)
            || (ov.is_root(task) && self.take_over(now, ov, task));
        if !known {
            return false;
        }
        let mut s = self.supervised.remove(&task).expect("present");
        f(self, &mut s);
        if s.dirty && s.put_op.is_none() {
            self.write(now, ov, &mut s);
        }
        self.supervised.insert(task, s);
        true
    }

    // ---- messages ----

    fn dispatch(&mut self, now: Instant, ov: &mut impl Overlay, from: Contact, msg: JobMessage) {
        match msg {
            JobMessage::Capacity { apps, slots, free } => {
                let mut mask = 0u8;
                for a in &apps {
                    if let Some(i) = self.learn_app(a) {
                        mask |= 1 << i;
                    }
                }
                if self.capacity.len() >= MAX_CAPACITY_ENTRIES
                    && !self.capacity.contains_key(&from.id)
                {
                    // Forget the stalest entry.
                    if let Some(old) = self
                        .capacity
                        .iter()
                        .min_by_key(|(_, e)| e.heard)
                        .map(|(k, _)| *k)
                    {
                        self.capacity.remove(&old);
                    }
                }
                self.capacity.insert(
                    from.id,
                    CapacityEntry {
                        contact: from,
                        apps_mask: mask,
                        free: free.min(slots),
                        heard: now,
                    },
                );
            }
            JobMessage::Dispatch {
                task,
                attempt,
                record,
                may_delegate,
            } => self.on_dispatch(now, ov, from, task, attempt, record, may_delegate),
            JobMessage::Delegate {
                token,
                signature,
                supervisor,
                record,
            } => {
                let task = record.id();
                let me = self.me.id;
                match self.guard.check(
                    self.auth.as_ref(),
                    &token,
                    &signature,
                    me,
                    record.job,
                    task,
                    now,
                ) {
                    Ok(()) if token.delegator == from.id => {
                        self.counters.delegations_accepted += 1;
                        self.on_dispatch(now, ov, supervisor, task, token.attempt, record, false);
                    }
                    _ => {
                        self.counters.delegations_refused += 1;
                        self.send(
                            supervisor,
                            JobMessage::DispatchReply {
                                task,
                                attempt: token.attempt,
                                reply: DispatchReply::Refused,
                            },
                        );
                    }
                }
            }
            JobMessage::DispatchReply {
                task,
                attempt,
                reply,
            } => {
                let lease_ms = self.cfg.lease_ms;
                self.with_supervision(now, ov, task, |me, s| {
                    let TaskState::Running { leases, results } = &mut s.rec.state else {
                        return;
                    };
                    let Some(i) = leases
                        .iter()
                        .position(|l| l.executor.id == from.id && l.attempt == attempt)
                    else {
                        me.counters.stale_reports += 1;
                        return;
                    };
                    match reply {
                        DispatchReply::Accepted => {
                            set_deadline(&mut s.deadlines, from.id, now.plus_ms(lease_ms));
                            s.tried.clear();
                        }
                        DispatchReply::Delegated { to } => {
                            leases[i].executor = to;
                            s.deadlines.retain(|(id, _)| *id != from.id);
                            s.deadlines.push((to.id, now.plus_ms(lease_ms)));
                            s.dirty = true;
                        }
                        DispatchReply::Busy | DispatchReply::NoApp | DispatchReply::Refused => {
                            leases.remove(i);
                            if leases.is_empty() && results.is_empty() {
                                s.rec.state = TaskState::Pending;
                            }
                            s.deadlines.retain(|(id, _)| *id != from.id);
                            if s.tried.len() < 16 {
                                s.tried.push(from.id);
                            }
                            if let Some(e) = me.capacity.get_mut(&from.id) {
                                e.free = 0;
                                if reply == DispatchReply::NoApp {
                                    e.apps_mask = 0;
                                }
                            }
                            s.dirty = true;
                        }
                    }
                });
            }
            JobMessage::Renew { task, attempt } => {
                let lease_ms = self.cfg.lease_ms;
                let mut reply = None;
                let known = self.with_supervision(now, ov, task, |me, s| match &s.rec.state {
                    TaskState::Running { leases, .. }
                        if leases
                            .iter()
                            .any(|l| l.executor.id == from.id && l.attempt == attempt) =>
                    {
                        set_deadline(&mut s.deadlines, from.id, now.plus_ms(lease_ms));
                    }
                    st if st.is_final() => reply = Some(JobMessage::CompleteAck { task, attempt }),
                    _ => {
                        me.counters.stale_reports += 1;
                        reply = Some(JobMessage::Revoke { task, attempt });
                    }
                });
                if let (true, Some(r)) = (known, reply) {
                    self.send(from, r);
                }
            }
            JobMessage::Cancel { task } => {
                self.with_supervision(now, ov, task, |me, s| {
                    if s.rec.state.is_final() {
                        return;
                    }
                    if let TaskState::Running { leases, .. } = &s.rec.state {
                        for l in leases.clone() {
                            me.send(
                                l.executor,
                                JobMessage::Revoke {
                                    task,
                                    attempt: l.attempt,
                                },
                            );
                        }
                    }
                    me.finish(s, TaskState::Failed(TaskFailure::Cancelled));
                });
            }
            JobMessage::Revoke { task, attempt } => {
                if self
                    .executions
                    .get(&task)
                    .is_some_and(|e| e.attempt == attempt)
                {
                    self.executions.remove(&task);
                }
            }
            JobMessage::Adopt { task, attempt } => {
                if let Some(e) = self.executions.get_mut(&task)
                    && e.attempt == attempt
                {
                    e.supervisor = from;
                    e.heard = now;
                    e.next_renew = now;
                    e.next_report = now;
                }
            }
            JobMessage::Complete {
                task,
                attempt,
                outputs,
                output_hash: hash,
            } => {
                if output_hash(&outputs) != hash {
                    self.counters.undecodable += 1;
                    return;
                }
                let known = self.with_supervision(now, ov, task, |me, s| {
                    me.on_complete(s, from.id, attempt, outputs, hash);
                });
                if known {
                    self.send(from, JobMessage::CompleteAck { task, attempt });
                }
            }
            JobMessage::TaskFailed {
                task,
                attempt,
                error,
            } => {
                let known = self.with_supervision(now, ov, task, |me, s| {
                    let holds = matches!(&s.rec.state, TaskState::Running { leases, .. }
                        if leases.iter().any(|l| l.executor.id == from.id && l.attempt == attempt));
                    if holds {
                        me.finish(s, TaskState::Failed(TaskFailure::App(error)));
                    } else if !s.rec.state.is_final() {
                        me.counters.stale_reports += 1;
                    }
                });
                if known {
                    self.send(from, JobMessage::CompleteAck { task, attempt });
                }
            }
            JobMessage::CompleteAck { task, attempt } => {
                if self
                    .executions
                    .get(&task)
                    .is_some_and(|e| e.attempt <= attempt)
                {
                    self.executions.remove(&task);
                }
            }
            JobMessage::Contribute {
                job,
                user,
                app,
                partition,
                maps,
                map,
                chunk,
            } => {
                if maps == 0
                    || map >= maps
                    || maps as usize > MAX_INPUTS
                    || partition as usize >= MAX_PARTS
                {
                    self.counters.undecodable += 1;
                    return;
                }
                let task = task_id(job, REDUCE_BASE + partition as u16);
                if !ov.is_root(task) {
                    return; // the sender retries with a fresh lookup
                }
                if !self.supervised.contains_key(&task) && !self.take_over(now, ov, task) {
                    // First map output for this partition: spawn the reduce task here.
                    let rec = reduce_record(job, &user, &app, partition, maps);
                    self.supervised.insert(
                        task,
                        Supervision {
                            rec,
                            deadlines: Vec::new(),
                            tried: Vec::new(),
                            contributed: 0,
                            next_contribute: now,
                            dirty: true,
                            put_op: None,
                        },
                    );
                    self.emit(JobEvent::ReduceSpawned { job, task });
                }
                self.with_supervision(now, ov, task, |me, s| {
                    match s.rec.inputs.get_mut(map as usize) {
                        Some(slot @ None) => {
                            *slot = Some(chunk);
                            s.dirty = true;
                        }
                        Some(Some(c)) if *c != chunk => me.counters.late_disagreements += 1,
                        _ => {}
                    }
                });
                self.send(
                    from,
                    JobMessage::ContributeAck {
                        job,
                        partition,
                        map,
                    },
                );
            }
            JobMessage::ContributeAck {
                job,
                partition,
                map,
            } => {
                let task = task_id(job, map as u16);
                if let Some(s) = self.supervised.get_mut(&task)
                    && (partition as usize) < MAX_PARTS
                {
                    s.contributed |= 1 << partition;
                }
            }
            JobMessage::ChunkPut {
                id,
                data,
                replicate,
            } => match self.chunks.insert(id, &data) {
                Ok(()) => {
                    if let Some(h) = self.chunks.held_mut(id)
                        && !h.confirmed.contains(&from.id)
                    {
                        h.confirmed.push(from.id);
                    }
                    self.send(from, JobMessage::ChunkStored { id });
                    if replicate && ov.is_root(id) {
                        for c in ov.replica_set(id, self.cfg.replicas) {
                            if c.id != self.me.id && c.id != from.id {
                                self.send(
                                    c,
                                    JobMessage::ChunkPut {
                                        id,
                                        data: data.clone(),
                                        replicate: false,
                                    },
                                );
                            }
                        }
                    }
                    self.chunk_arrived(now, ov, id);
                }
                Err(ChunkError::Full) => self.counters.chunks_refused += 1,
                Err(_) => self.counters.chunks_corrupt += 1,
            },
            JobMessage::ChunkStored { id } => {
                self.uploads.remove(&id);
                if let Some(h) = self.chunks.held_mut(id)
                    && !h.confirmed.contains(&from.id)
                    && h.confirmed.len() < 16
                {
                    h.confirmed.push(from.id);
                }
            }
            JobMessage::ChunkWant { id } => {
                let reply = match self.chunks.get(id) {
                    Some(d) => JobMessage::ChunkData {
                        id,
                        data: d.to_vec(),
                    },
                    None => JobMessage::ChunkMissing { id },
                };
                self.send(from, reply);
            }
            JobMessage::ChunkData { id, data } => {
                if !self.fetches.contains_key(&id) && self.chunks.contains(id) {
                    return;
                }
                match self.chunks.insert(id, &data) {
                    Ok(()) => self.chunk_arrived(now, ov, id),
                    Err(ChunkError::Full) => {
                        self.counters.chunks_refused += 1;
                        // Still hand a client's fetch its verified bytes.
                        if Key::for_content(&data) == id
                            && self.fetches.get(&id).is_some_and(|f| f.for_client)
                        {
                            self.fetches.remove(&id);
                            self.emit(JobEvent::ChunkFetched { id, data });
                        }
                    }
                    Err(_) => self.counters.chunks_corrupt += 1,
                }
            }
            JobMessage::ChunkMissing { .. } => {}
            JobMessage::ChunkOffer { id } => {
                if self.chunks.contains(id) {
                    self.send(from, JobMessage::ChunkStored { id });
                } else if ov
                    .replica_set(id, self.cfg.replicas)
                    .iter()
                    .any(|c| c.id == self.me.id)
                {
                    self.send(from, JobMessage::ChunkWant { id });
                }
            }
        }
    }

    fn on_complete(
        &mut self,
        s: &mut Supervision,
        from: NodeId,
        attempt: u8,
        outputs: Vec<ChunkId>,
        hash: Key,
    ) {
        if outputs.len() != s.rec.spec.kind.parts() {
            self.counters.stale_reports += 1;
            return;
        }
        match &mut s.rec.state {
            TaskState::Done { output_hash, .. } => {
                if *output_hash != hash {
                    self.counters.late_disagreements += 1;
                }
            }
            TaskState::Running { leases, results } => {
                // A completion counts even from an executor whose lease ran out meanwhile:
                // the task is deterministic and its outputs are stored.
                let _ = attempt;
                if results.iter().any(|r| r.executor == from) {
                    return;
                }
                leases.retain(|l| l.executor.id != from);
                s.deadlines.retain(|(id, _)| *id != from);
                results.push(ExecResult {
                    executor: from,
                    outputs,
                    output_hash: hash,
                });
                s.dirty = true;
                if results.len() >= s.rec.exec_copies as usize {
                    let first = &results[0];
                    let agree = results.iter().all(|r| r.output_hash == first.output_hash);
                    let state = if agree {
                        TaskState::Done {
                            outputs: first.outputs.clone(),
                            output_hash: first.output_hash,
                            verified: results.len() >= 2,
                        }
                    } else {
                        TaskState::Disputed {
                            hashes: results.iter().map(|r| r.output_hash).collect(),
                        }
                    };
                    self.finish(s, state);
                }
            }
            TaskState::Pending => {
                // Every lease ran out, yet a late executor finished: register it.
                s.rec.state = TaskState::Running {
                    leases: Vec::new(),
                    results: Vec::new(),
                };
                self.on_complete(s, from, attempt, outputs, hash);
            }
            TaskState::Disputed { .. } | TaskState::Failed(_) => {}
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn on_dispatch(
        &mut self,
        now: Instant,
        ov: &mut impl Overlay,
        supervisor: Contact,
        task: TaskId,
        attempt: u8,
        record: TaskRecord,
        may_delegate: bool,
    ) {
        let reply = |reply| JobMessage::DispatchReply {
            task,
            attempt,
            reply,
        };
        if record.id() != task || !record.inputs_ready() {
            self.counters.undecodable += 1;
            return;
        }
        if let Some(e) = self.executions.get_mut(&task) {
            // A repeated or newer dispatch of a task already here: keep working on it.
            e.attempt = e.attempt.max(attempt);
            e.supervisor = supervisor;
            e.heard = now;
            self.send(supervisor, reply(DispatchReply::Accepted));
            return;
        }
        if !self.apps.has(&record.spec.app) {
            let target = if may_delegate && self.cfg.delegation {
                self.capable(now, &record.spec.app)
            } else {
                None
            };
            let Some(to) = target else {
                self.send(supervisor, reply(DispatchReply::NoApp));
                return;
            };
            let token = DelegationToken {
                job: record.job,
                task,
                attempt,
                user: record.user.clone(),
                delegator: self.me.id,
                target: to.id,
                expires_us: now.plus_ms(self.cfg.delegation_ttl_ms).as_micros(),
                nonce: self.rng.next_u64(),
            };
            let signature = self.auth.sign(&token.signed_bytes());
            self.counters.delegations_sent += 1;
            self.send(
                to,
                JobMessage::Delegate {
                    token,
                    signature,
                    supervisor,
                    record,
                },
            );
            self.send(supervisor, reply(DispatchReply::Delegated { to }));
            return;
        }
        if self.executions.len() >= self.cfg.slots as usize {
            self.send(supervisor, reply(DispatchReply::Busy));
            return;
        }
        self.executions.insert(
            task,
            Execution {
                attempt,
                rec: record,
                supervisor,
                phase: Phase::Fetching,
                next_renew: now.plus_ms(self.cfg.renew_ms),
                next_report: now,
                heard: now,
            },
        );
        self.send(supervisor, reply(DispatchReply::Accepted));
        self.advance(now, ov, task);
    }

    /// The nearest node known to have `app` and a free slot.
    fn capable(&self, now: Instant, app: &str) -> Option<Contact> {
        let mask = self.app_mask_of(app)?;
        self.capacity
            .values()
            .filter(|e| {
                e.apps_mask & mask != 0
                    && e.free > 0
                    && now.millis_since(e.heard) <= self.cfg.advert_ms * 4
            })
            .min_by_key(|e| {
                (
                    e.contact.server != self.me.server,
                    self.me.id.distance(e.contact.id),
                )
            })
            .map(|e| e.contact)
    }

    // ---- executor ----

    /// Moves an execution along as far as it goes without waiting.
    fn advance(&mut self, now: Instant, ov: &mut impl Overlay, task: TaskId) {
        let Some(e) = self.executions.get_mut(&task) else {
            return;
        };
        match &e.phase {
            Phase::Fetching => {
                let missing: Vec<ChunkId> = e
                    .rec
                    .inputs
                    .iter()
                    .flatten()
                    .copied()
                    .filter(|c| !self.chunks.contains(*c))
                    .collect();
                if missing.is_empty() {
                    let inputs: Vec<Vec<u8>> = e
                        .rec
                        .inputs
                        .iter()
                        .flatten()
                        .filter_map(|c| self.chunks.get(*c).map(<[u8]>::to_vec))
                        .collect();
                    let id = self.next_work_id;
                    self.next_work_id += 1;
                    e.phase = Phase::Queued(id);
                    self.counters.works_started += 1;
                    self.work.push_back(Work {
                        id,
                        task,
                        spec: e.rec.spec.clone(),
                        inputs,
                    });
                } else {
                    for c in missing {
                        self.fetches.entry(c).or_insert(Fetch {
                            next_try: now,
                            for_client: false,
                        });
                    }
                }
            }
            Phase::Storing { outputs } if outputs.iter().all(|o| !self.uploads.contains_key(o)) => {
                e.phase = Phase::Reporting {
                    outputs: outputs.clone(),
                };
                e.next_report = now;
            }
            _ => {}
        }
        let _ = ov;
    }

    fn step_executions(&mut self, now: Instant, ov: &mut impl Overlay) {
        let tasks: Vec<TaskId> = self.executions.keys().copied().collect();
        for task in tasks {
            self.advance(now, ov, task);
            let Some(e) = self.executions.get_mut(&task) else {
                continue;
            };
            let (to, attempt) = (e.supervisor, e.attempt);
            let mut out = Vec::new();
            if now >= e.next_renew {
                e.next_renew = now.plus_ms(self.cfg.renew_ms);
                out.push(JobMessage::Renew { task, attempt });
            }
            let reporting = matches!(
                e.phase,
                Phase::Reporting { .. } | Phase::ReportingFailure(_)
            );
            if reporting && now >= e.next_report {
                e.next_report = now.plus_ms(self.cfg.retry_ms);
                match &e.phase {
                    Phase::Reporting { outputs } => out.push(JobMessage::Complete {
                        task,
                        attempt,
                        outputs: outputs.clone(),
                        output_hash: output_hash(outputs),
                    }),
                    Phase::ReportingFailure(error) => out.push(JobMessage::TaskFailed {
                        task,
                        attempt,
                        error: *error,
                    }),
                    _ => {}
                }
            }
            let abandon = reporting && now.millis_since(e.heard) > self.cfg.abandon_ms;
            for m in out {
                self.send(to, m);
            }
            if abandon {
                log::debug!("abandoning task {task:?}: no supervisor answers");
                self.executions.remove(&task);
            }
        }
    }

    fn chunk_arrived(&mut self, now: Instant, ov: &mut impl Overlay, id: ChunkId) {
        if let Some(f) = self.fetches.remove(&id)
            && f.for_client
            && let Some(d) = self.chunks.get(id)
        {
            let data = d.to_vec();
            self.emit(JobEvent::ChunkFetched { id, data });
        }
        let waiting: Vec<TaskId> = self
            .executions
            .iter()
            .filter(|(_, e)| e.phase == Phase::Fetching && e.rec.inputs.contains(&Some(id)))
            .map(|(t, _)| *t)
            .collect();
        for t in waiting {
            self.advance(now, ov, t);
        }
    }

    // ---- transfers: uploads, fetches, record puts ----

    fn step_transfers(&mut self, now: Instant, ov: &mut impl Overlay) {
        let retry = self.cfg.retry_ms;
        let due: Vec<ChunkId> = self
            .uploads
            .iter()
            .filter(|(_, u)| now >= u.next_try)
            .map(|(k, _)| *k)
            .take(64)
            .collect();
        for id in due {
            let Some(data) = self.chunks.get(id).map(<[u8]>::to_vec) else {
                self.uploads.remove(&id);
                continue;
            };
            if let Some(u) = self.uploads.get_mut(&id) {
                u.next_try = now.plus_ms(retry);
            }
            self.send_to_root(
                now,
                ov,
                id,
                JobMessage::ChunkPut {
                    id,
                    data,
                    replicate: true,
                },
            );
        }
        let due: Vec<ChunkId> = self
            .fetches
            .iter()
            .filter(|(_, f)| now >= f.next_try)
            .map(|(k, _)| *k)
            .take(64)
            .collect();
        for id in due {
            if let Some(f) = self.fetches.get_mut(&id) {
                f.next_try = now.plus_ms(retry);
            }
            // The nearest holder: when the chunk's key is near this node (it is in the replica
            // set), the nearest other member of the set; else the root, found by lookup.
            let rs = ov.replica_set(id, self.cfg.replicas);
            let near = rs
                .iter()
                .filter(|c| c.id != self.me.id)
                .min_by_key(|c| ov.proximity(c))
                .copied();
            if let Some(c) = near.filter(|_| rs.iter().any(|c| c.id == self.me.id)) {
                self.send(c, JobMessage::ChunkWant { id });
                continue;
            }
            self.send_to_root(now, ov, id, JobMessage::ChunkWant { id });
        }
        let due: Vec<Key> = self
            .record_puts
            .iter()
            .filter(|(_, r)| r.op.is_none() && now >= r.next_try)
            .map(|(k, _)| *k)
            .take(64)
            .collect();
        for key in due {
            let r = self.record_puts.get(&key).expect("listed");
            let res = if r.checking {
                ov.get(now, key)
            } else {
                ov.put(now, key, &r.value.clone())
            };
            match res {
                Ok(op) => {
                    self.record_ops.insert(op, key);
                    if let Some(r) = self.record_puts.get_mut(&key) {
                        r.op = Some(op);
                    }
                }
                Err(_) => {
                    self.counters.busy_drops += 1;
                    if let Some(r) = self.record_puts.get_mut(&key) {
                        r.next_try = now.plus_ms(retry);
                    }
                }
            }
        }
    }

    fn record_stored(&mut self, key: Key) {
        let Some(r) = self.record_puts.remove(&key) else {
            return;
        };
        if let Some(n) = self.jobs_in_submission.get_mut(&r.job) {
            *n -= 1;
            if *n == 0 {
                self.jobs_in_submission.remove(&r.job);
                self.emit(JobEvent::Submitted { job: r.job });
            }
        }
    }

    /// Chunk upkeep: a root offers its chunks to replica-set members not known to hold them;
    /// any other holder offers to the root (which pulls what it lacks).
    fn repair(&mut self, ov: &mut impl Overlay) {
        let ids = self.chunks.ids_after(self.repair_cursor, REPAIR_BATCH);
        self.repair_cursor = ids.last().copied();
        for id in ids {
            let rs = ov.replica_set(id, self.cfg.replicas);
            let Some(h) = self.chunks.held_mut(id) else {
                continue;
            };
            // A member that restarted keeps its id but not its chunks, so confirmations only
            // last one pass: every pass offers again (offers are small).
            h.confirmed.clear();
            let targets: Vec<Contact> = if ov.is_root(id) {
                rs.iter()
                    .filter(|c| c.id != self.me.id && !h.confirmed.contains(&c.id))
                    .copied()
                    .collect()
            } else {
                rs.first()
                    .filter(|root| !h.confirmed.contains(&root.id))
                    .copied()
                    .into_iter()
                    .collect()
            };
            for c in targets {
                self.send(c, JobMessage::ChunkOffer { id });
            }
        }
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
