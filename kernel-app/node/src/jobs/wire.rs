//! Job messages between node agents: carried on the job channel (TCP in the kernel, next to
//! the overlay's UDP port; see [`JOB_PORT_OFFSET`]), postcard-encoded with a version byte,
//! every length bounded. A message that does not decode is dropped and counted.

use super::app::{MAX_APP_NAME, MAX_APPS, MAX_CHUNK_LEN, MAX_PARTS, TaskError};
use super::chunk::ChunkId;
use super::delegation::{DelegationToken, MAX_SIGNATURE};
use super::record::{JobId, TaskId, TaskRecord};
use crate::id::Key;
use crate::wire::Contact;
use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

/// Version of the job channel's messages.
pub const JOB_WIRE_VERSION: u8 = 2;
/// The job channel listens on the overlay port plus this.
pub const JOB_PORT_OFFSET: u16 = 1;
/// Longest encoded job message (a full chunk plus headroom).
pub const MAX_JOB_MESSAGE: usize = MAX_CHUNK_LEN + 1024;

/// A job message and its sender.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobPacket {
    pub version: u8,
    pub sender: Contact,
    pub message: JobMessage,
}

/// What node agents say to each other about jobs.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobMessage {
    /// Capacity discovery: applications offered and free task slots.
    Capacity {
        apps: Vec<String>,
        slots: u8,
        free: u8,
    },
    /// Supervisor to executor: run this task under a lease.
    Dispatch {
        task: TaskId,
        attempt: u8,
        record: TaskRecord,
        /// The receiver may pass it on (with a token) if it lacks the app.
        may_delegate: bool,
    },
    /// A node that lacks the app passes the dispatch to one that has it.
    Delegate {
        token: DelegationToken,
        signature: Vec<u8>,
        /// The supervisor, to answer.
        supervisor: Contact,
        record: TaskRecord,
    },
    /// Executor (or delegator) to supervisor.
    DispatchReply {
        task: TaskId,
        attempt: u8,
        reply: DispatchReply,
    },
    /// Executor to supervisor: still running (renews the lease).
    Renew {
        task: TaskId,
        attempt: u8,
    },
    /// Supervisor to executor: your lease is gone; stop.
    Revoke {
        task: TaskId,
        attempt: u8,
    },
    /// A new supervisor to the executors in the record: report to me from now on.
    Adopt {
        task: TaskId,
        attempt: u8,
    },
    /// Executor to supervisor: outputs stored; register them.
    Complete {
        task: TaskId,
        attempt: u8,
        outputs: Vec<ChunkId>,
        output_hash: Key,
    },
    /// Executor to supervisor: the app failed (deterministically).
    TaskFailed {
        task: TaskId,
        attempt: u8,
        error: TaskError,
    },
    /// Supervisor to executor: registered (or already final); the slot is free.
    CompleteAck {
        task: TaskId,
        attempt: u8,
    },
    /// A map task's supervisor to a reduce task's root: map `map`'s part for `partition`.
    Contribute {
        job: JobId,
        user: String,
        app: String,
        partition: u8,
        maps: u8,
        map: u8,
        chunk: ChunkId,
        /// The job's replication (the reduce record keeps as many copies).
        replicas: u8,
    },
    ContributeAck {
        job: JobId,
        partition: u8,
        map: u8,
    },
    /// Store a chunk; the root copies it to its replica set when `replicate`.
    ChunkPut {
        id: ChunkId,
        data: Vec<u8>,
        replicate: bool,
        /// Copies the chunk keeps (its job's replication; 0: the cluster's).
        copies: u8,
    },
    ChunkStored {
        id: ChunkId,
    },
    /// Send me this chunk (or say you lack it).
    ChunkWant {
        id: ChunkId,
    },
    ChunkData {
        id: ChunkId,
        data: Vec<u8>,
        copies: u8,
    },
    ChunkMissing {
        id: ChunkId,
    },
    /// A holder tells the root (or the root a replica) it has a chunk; answered by
    /// `ChunkWant` when missing, `ChunkStored` when held.
    ChunkOffer {
        id: ChunkId,
        copies: u8,
    },
    /// To a task's root: the user cancelled the job (the record becomes `Failed(Cancelled)`).
    Cancel {
        task: TaskId,
    },
}

/// An executor's answer to a dispatch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DispatchReply {
    Accepted,
    /// No free slot.
    Busy,
    /// Lacks the app and cannot delegate.
    NoApp,
    /// Passed on to `to`, which will answer itself.
    Delegated {
        to: Contact,
    },
    /// A delegation token was refused.
    Refused,
}

/// Why a job message was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JobDecodeError {
    TooLong,
    Malformed,
    Version(u8),
    OutOfBounds,
}

impl JobMessage {
    fn is_bounded(&self) -> bool {
        match self {
            JobMessage::Capacity { apps, .. } => {
                apps.len() <= MAX_APPS && apps.iter().all(|a| a.len() <= MAX_APP_NAME)
            }
            JobMessage::Dispatch { record, .. } => record.is_bounded(),
            JobMessage::Delegate {
                signature, record, ..
            } => signature.len() <= MAX_SIGNATURE && record.is_bounded(),
            JobMessage::Complete { outputs, .. } => outputs.len() <= MAX_PARTS,
            JobMessage::Contribute { user, app, .. } => {
                user.len() <= super::record::MAX_USER && app.len() <= MAX_APP_NAME
            }
            JobMessage::ChunkPut { data, .. } | JobMessage::ChunkData { data, .. } => {
                data.len() <= MAX_CHUNK_LEN
            }
            _ => true,
        }
    }
}

pub fn encode(packet: &JobPacket) -> Option<Vec<u8>> {
    let v = postcard::to_allocvec(packet).ok()?;
    (v.len() <= MAX_JOB_MESSAGE).then_some(v)
}

pub fn decode(bytes: &[u8]) -> Result<JobPacket, JobDecodeError> {
    if bytes.len() > MAX_JOB_MESSAGE {
        return Err(JobDecodeError::TooLong);
    }
    if let Some(&v) = bytes.first()
        && v != JOB_WIRE_VERSION
    {
        return Err(JobDecodeError::Version(v));
    }
    let p: JobPacket = postcard::from_bytes(bytes).map_err(|_| JobDecodeError::Malformed)?;
    if !p.message.is_bounded() {
        return Err(JobDecodeError::OutOfBounds);
    }
    Ok(p)
}
