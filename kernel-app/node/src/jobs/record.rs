//! Job and task records, stored in the DHT at their key's root with `k` copies (the overlay's
//! put/get). A task record is the task's whole durable state: spec, inputs, leases, the
//! completion registry entry. Only the key's root (the task's supervisor) writes it.

use super::app::{MAX_INPUTS, MAX_PARTS, TaskError, TaskKind, TaskSpec};
use super::chunk::ChunkId;
use crate::id::{Key, NodeId};
use crate::wire::{Contact, MAX_VALUE_LEN};
use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

/// A job's id: the key of its name, user and submission nonce.
pub type JobId = Key;
/// A task's id: the key its record lives at.
pub type TaskId = Key;

/// First bytes of every task record value (records of other kinds share the store).
const TASK_TAG: &[u8; 4] = b"UPT1";
const JOB_TAG: &[u8; 4] = b"UPJ1";
/// Most executors one task runs on at once (2: verification by output hash).
pub const MAX_EXEC_COPIES: u8 = 2;
/// Longest user name carried in records and delegation tokens.
pub const MAX_USER: usize = 24;
/// Index of reduce partition 0; map and single tasks have indices below it.
pub const REDUCE_BASE: u16 = 0xff00;

/// The key of a job.
pub fn job_id(user: &str, name: &str, nonce: u64) -> JobId {
    let mut b = Vec::new();
    b.extend_from_slice(b"job\0");
    b.extend_from_slice(user.as_bytes());
    b.push(0);
    b.extend_from_slice(name.as_bytes());
    b.push(0);
    b.extend_from_slice(&nonce.to_be_bytes());
    Key::for_name(&b)
}

/// The key of task `index` of `job` (reduce partition `p` has index `REDUCE_BASE + p`).
pub fn task_id(job: JobId, index: u16) -> TaskId {
    let mut b = [0u8; 22];
    b[..4].copy_from_slice(b"task");
    b[4..20].copy_from_slice(&job.to_bytes());
    b[20..].copy_from_slice(&index.to_be_bytes());
    Key::for_name(&b)
}

/// One executor's hold on a task.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    pub executor: Contact,
    /// The attempt this lease belongs to; stale reports of older attempts are ignored.
    pub attempt: u8,
}

/// What one executor produced.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecResult {
    pub executor: NodeId,
    pub outputs: Vec<ChunkId>,
    pub output_hash: Key,
}

/// Why a task ended without an output.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskFailure {
    /// The application returned an error (deterministic: not retried).
    App(TaskError),
    /// Executors were lost this many times; the task is not retried again.
    AttemptsExhausted,
    /// The user cancelled the job.
    Cancelled,
}

/// Where a task stands.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaskState {
    /// Waiting for inputs (a reduce task before every map output registered) or a slot.
    Pending,
    /// Leased to executors; `results` holds completions already registered for comparison.
    Running {
        leases: Vec<Lease>,
        results: Vec<ExecResult>,
    },
    /// Registered complete. `verified`: two executors agreed on the output hash.
    Done {
        outputs: Vec<ChunkId>,
        output_hash: Key,
        verified: bool,
    },
    /// Two executors produced different outputs: reported, not registered.
    Disputed {
        hashes: Vec<Key>,
    },
    Failed(TaskFailure),
}

impl TaskState {
    pub fn is_final(&self) -> bool {
        matches!(
            self,
            TaskState::Done { .. } | TaskState::Disputed { .. } | TaskState::Failed(_)
        )
    }
}

/// A task's durable record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    pub job: JobId,
    pub index: u16,
    pub user: String,
    pub spec: TaskSpec,
    /// Input chunks; `None` until known (a reduce task's inputs arrive as maps register).
    pub inputs: Vec<Option<ChunkId>>,
    /// Executors to run it on (2: outputs compared).
    pub exec_copies: u8,
    /// Map tasks in the job (a map task's supervisor tells the reduce roots); else 0.
    pub maps: u8,
    /// Executors lost so far.
    pub attempts: u8,
    /// Copies of this job's task records and chunks (the manifest's `replication`); 0: the
    /// cluster's.
    pub replicas: u8,
    pub state: TaskState,
}

impl TaskRecord {
    pub fn new(job: JobId, index: u16, user: &str, spec: TaskSpec, inputs: Vec<ChunkId>) -> Self {
        TaskRecord {
            job,
            index,
            user: String::from(user),
            spec,
            inputs: inputs.into_iter().map(Some).collect(),
            exec_copies: 1,
            maps: 0,
            attempts: 0,
            replicas: 0,
            state: TaskState::Pending,
        }
    }

    pub fn id(&self) -> TaskId {
        task_id(self.job, self.index)
    }

    /// Whether every input chunk is known.
    pub fn inputs_ready(&self) -> bool {
        self.inputs.iter().all(Option::is_some)
    }

    /// Whether the record keeps every bound (checked on decode too).
    pub fn is_bounded(&self) -> bool {
        self.spec.is_bounded()
            && self.user.len() <= MAX_USER
            && self.inputs.len() <= MAX_INPUTS
            && (1..=MAX_EXEC_COPIES).contains(&self.exec_copies)
            && match &self.state {
                TaskState::Running { leases, results } => {
                    leases.len() <= MAX_EXEC_COPIES as usize
                        && results.len() <= MAX_EXEC_COPIES as usize
                        && results.iter().all(|r| r.outputs.len() <= MAX_PARTS)
                }
                TaskState::Done { outputs, .. } => outputs.len() <= MAX_PARTS,
                TaskState::Disputed { hashes } => hashes.len() <= MAX_EXEC_COPIES as usize,
                _ => true,
            }
    }

    /// The record as a DHT value; `None` when it breaks a bound or exceeds `MAX_VALUE_LEN`.
    pub fn encode(&self) -> Option<Vec<u8>> {
        if !self.is_bounded() {
            return None;
        }
        let mut v = TASK_TAG.to_vec();
        v.extend_from_slice(&postcard::to_allocvec(self).ok()?);
        (v.len() <= MAX_VALUE_LEN).then_some(v)
    }

    /// A task record from a DHT value; `None` for other records or malformed bytes.
    pub fn decode(value: &[u8]) -> Option<Self> {
        let body = value.strip_prefix(TASK_TAG)?;
        let r: TaskRecord = postcard::from_bytes(body).ok()?;
        r.is_bounded().then_some(r)
    }
}

/// The output hash over a task's output parts: the key of their chunk ids in order.
pub fn output_hash(outputs: &[ChunkId]) -> Key {
    let mut b = Vec::with_capacity(outputs.len() * 16);
    for o in outputs {
        b.extend_from_slice(&o.to_bytes());
    }
    Key::for_content(&b)
}

/// A job's record at its id's root: enough for `submit --resume` to find every task.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobRecord {
    pub name: String,
    pub user: String,
    pub app: String,
    /// Map or single tasks (indices `0..tasks`).
    pub tasks: u16,
    /// Reduce partitions (indices `REDUCE_BASE..REDUCE_BASE + reducers`), spawned in the overlay.
    pub reducers: u8,
    pub exec_copies: u8,
}

impl JobRecord {
    pub fn encode(&self) -> Option<Vec<u8>> {
        let mut v = JOB_TAG.to_vec();
        v.extend_from_slice(&postcard::to_allocvec(self).ok()?);
        (v.len() <= MAX_VALUE_LEN).then_some(v)
    }

    pub fn decode(value: &[u8]) -> Option<Self> {
        postcard::from_bytes(value.strip_prefix(JOB_TAG)?).ok()
    }

    /// Every task id of the job, reduce partitions included.
    pub fn task_ids(&self, job: JobId) -> Vec<TaskId> {
        (0..self.tasks)
            .chain((0..self.reducers as u16).map(|p| REDUCE_BASE + p))
            .map(|i| task_id(job, i))
            .collect()
    }
}

/// The record of reduce partition `partition` of a job with `maps` map tasks, created at its
/// root when the first map output registers.
pub fn reduce_record(
    job: JobId,
    user: &str,
    app: &str,
    partition: u8,
    maps: u8,
    replicas: u8,
) -> TaskRecord {
    TaskRecord {
        job,
        index: REDUCE_BASE + partition as u16,
        user: String::from(user),
        spec: TaskSpec {
            app: String::from(app),
            kind: TaskKind::Reduce { partition, maps },
            params: Vec::new(),
        },
        inputs: alloc::vec![None; maps as usize],
        exec_copies: 1,
        maps: 0,
        attempts: 0,
        replicas,
        state: TaskState::Pending,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::{Id, ServerTag};
    use crate::launch::PeerAddr;
    use alloc::vec;

    #[test]
    fn records_round_trip_and_reject_junk() {
        let job = job_id("alice", "wc", 1);
        assert_ne!(job, job_id("alice", "wc", 2));
        assert_ne!(task_id(job, 0), task_id(job, 1));
        let spec = TaskSpec {
            app: "wordcount".into(),
            kind: TaskKind::Map { reducers: 4 },
            params: vec![],
        };
        let mut r = TaskRecord::new(job, 3, "alice", spec, vec![Id(7)]);
        let c = Contact {
            id: Id(1),
            addr: PeerAddr {
                ipv4: [10, 0, 0, 1],
                port: 7000,
            },
            server: ServerTag(3),
        };
        r.exec_copies = 2;
        r.state = TaskState::Running {
            leases: vec![Lease {
                executor: c,
                attempt: 1,
            }],
            results: vec![ExecResult {
                executor: Id(1),
                outputs: vec![Id(1), Id(2), Id(3), Id(4)],
                output_hash: output_hash(&[Id(1), Id(2), Id(3), Id(4)]),
            }],
        };
        let v = r.encode().unwrap();
        assert!(v.len() <= MAX_VALUE_LEN);
        assert_eq!(TaskRecord::decode(&v), Some(r.clone()));
        assert_eq!(r.id(), task_id(job, 3));
        assert!(TaskRecord::decode(&v[..v.len() - 1]).is_none());
        assert!(TaskRecord::decode(b"UPT1\xff\xff").is_none());
        assert!(TaskRecord::decode(b"other").is_none());
        r.exec_copies = 3;
        assert!(r.encode().is_none(), "bounds are checked on encode");

        let jr = JobRecord {
            name: "wc".into(),
            user: "alice".into(),
            app: "wordcount".into(),
            tasks: 3,
            reducers: 2,
            exec_copies: 1,
        };
        assert_eq!(JobRecord::decode(&jr.encode().unwrap()), Some(jr.clone()));
        let ids = jr.task_ids(job);
        assert_eq!(ids.len(), 5);
        assert_eq!(ids[4], task_id(job, REDUCE_BASE + 1));
        let red = reduce_record(job, "alice", "wordcount", 1, 3, 0);
        assert!(!red.inputs_ready());
        assert!(red.encode().is_some());
    }
}
