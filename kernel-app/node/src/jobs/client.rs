//! The Application Agent's protocol with a node: the **client port** (TCP, [`CLIENT_PORT`]).
//!
//! Frames ([`crate::auth::stream`]) carry postcard messages. The agent authenticates first:
//! `Auth(Hello)` → `Auth(Challenge)` → `Auth(Proof)` on the user's pre-shared key
//! ([`crate::auth::user_auth`]); every frame after the Proof, both ways, is sealed with the
//! session key (context [`CLIENT_STREAM_CONTEXT`]), starting with the node's `Ready`. A node
//! launched without trust material answers the Hello with `Ready { authenticated: false }` and
//! the stream stays in the clear (single development VMs only; `unipeer up` always certifies).
//!
//! Then requests and replies alternate, one reply per request:
//!
//! | request | reply |
//! |---|---|
//! | `PutChunk { data }` (inputs, up to [`MAX_CHUNK_LEN`]) | `ChunkStored { id }` |
//! | `Submit(..)` (inputs already put) | `Submitted { job }` once every record is stored |
//! | `Records { keys }` (job and task records: DHT gets) | `Records(answers)` |
//! | `Fetch { id }` (outputs) | `Chunk { id, data }` or `Error` |
//! | `Cancel { job, tasks }` (its task ids) | `Cancelled { job, tasks }` (how many asked) |
//! | `Ping` | `Pong { .. }` |
//!
//! A request the node cannot serve gets `Error { code, text }`; an undecodable or unsealed frame
//! closes the connection (and is counted).

use super::app::{MAX_APP_NAME, MAX_CHUNK_LEN, MAX_INPUTS, MAX_PARAMS, MAX_PARTS};
use super::chunk::ChunkId;
use super::record::{JobId, MAX_USER};
use crate::auth::user_auth::UserAuthMessage;
use crate::id::{Key, NodeId};
use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

/// The node's client port.
pub const CLIENT_PORT: u16 = 7003;
/// Version byte at the head of every client message.
pub const CLIENT_WIRE_VERSION: u8 = 1;
/// HKDF context of the sealed client stream.
pub const CLIENT_STREAM_CONTEXT: &[u8] = b"unipeer client stream v1";
/// Longest frame body either way: a full chunk, its framing and the seal.
pub const MAX_CLIENT_FRAME: usize = MAX_CHUNK_LEN + 1024;
/// Most keys in one `Records` request.
pub const MAX_RECORD_KEYS: usize = 64;
/// Most tasks in one submission (task indices are `u16`, reduce tasks live above 0xff00).
pub const MAX_SUBMIT_TASKS: usize = 256;
/// Longest job name.
pub const MAX_JOB_NAME: usize = 64;

/// A job whose inputs were put with `PutChunk`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SubmitRequest {
    pub name: String,
    pub app: String,
    /// Makes resubmissions distinct jobs; the same nonce names the same job.
    pub nonce: u64,
    /// Per task: parameters and input chunk ids.
    pub tasks: Vec<(Vec<u8>, Vec<ChunkId>)>,
    /// 0: single tasks; else map tasks feeding this many in-overlay reduce tasks.
    pub reducers: u8,
    /// Executors per task (2: outputs compared).
    pub exec_copies: u8,
    /// Copies of the job's task records and chunks (the manifest's `replication`); 0: the
    /// cluster's.
    pub replication: u8,
    /// `None`: store every task record. `Some(indices)`: only these tasks' records (and the
    /// job record): a resumed submission fills in what the overlay lacks without resetting
    /// tasks that ran.
    pub only: Option<Vec<u16>>,
}

impl SubmitRequest {
    pub fn is_bounded(&self) -> bool {
        self.name.len() <= MAX_JOB_NAME
            && self.app.len() <= MAX_APP_NAME
            && !self.tasks.is_empty()
            && self.tasks.len() <= MAX_SUBMIT_TASKS
            && self
                .tasks
                .iter()
                .all(|(p, i)| p.len() <= MAX_PARAMS && i.len() <= MAX_INPUTS)
            && self
                .only
                .as_ref()
                .is_none_or(|o| o.len() <= MAX_SUBMIT_TASKS)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientRequest {
    Auth(UserAuthMessage),
    PutChunk { data: Vec<u8> },
    Submit(SubmitRequest),
    Records { keys: Vec<Key> },
    Fetch { id: ChunkId },
    Cancel { job: JobId, tasks: Vec<Key> },
    Ping,
}

/// One record's answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecordAnswer {
    Value(Vec<u8>),
    /// The key's root holds nothing.
    Absent,
    /// The get failed (no root reached in time); ask again.
    Failed,
}

/// Why a request was not served.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientErrorCode {
    /// Authentication failed or was skipped.
    Auth,
    /// The node has not joined the overlay yet.
    NotJoined,
    /// A bound of the request was broken.
    OutOfBounds,
    /// The node is busy; try again.
    Busy,
    /// The application is unknown to the overlay's nodes' adverts seen here (maybe later).
    NotFound,
    /// A chunk did not arrive in time.
    Timeout,
    /// Refused for another reason (text says which).
    Refused,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClientReply {
    Auth(UserAuthMessage),
    /// Authentication done (or not needed); from here requests are served.
    Ready {
        node: NodeId,
        authenticated: bool,
    },
    ChunkStored {
        id: ChunkId,
    },
    Submitted {
        job: JobId,
    },
    Records(Vec<(Key, RecordAnswer)>),
    Chunk {
        id: ChunkId,
        data: Vec<u8>,
    },
    Cancelled {
        job: JobId,
        tasks: u16,
    },
    Pong {
        node: NodeId,
        joined: bool,
        apps: Vec<String>,
        slots: u8,
        running: u8,
    },
    Error {
        code: ClientErrorCode,
        text: String,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Envelope<T> {
    version: u8,
    body: T,
}

/// Why a client message did not decode.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClientDecodeError {
    Malformed,
    Version(u8),
    OutOfBounds,
}

impl core::fmt::Display for ClientDecodeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            ClientDecodeError::Malformed => write!(f, "malformed client message"),
            ClientDecodeError::Version(v) => {
                write!(
                    f,
                    "client message version {v}, expected {CLIENT_WIRE_VERSION}"
                )
            }
            ClientDecodeError::OutOfBounds => write!(f, "client message breaks a bound"),
        }
    }
}

fn encode<T: Serialize>(body: &T) -> Vec<u8> {
    postcard::to_allocvec(&Envelope {
        version: CLIENT_WIRE_VERSION,
        body,
    })
    .unwrap_or_default()
}

fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, ClientDecodeError> {
    if let Some(&v) = bytes.first()
        && v != CLIENT_WIRE_VERSION
    {
        return Err(ClientDecodeError::Version(v));
    }
    match postcard::take_from_bytes::<Envelope<T>>(bytes) {
        Ok((e, [])) => Ok(e.body),
        _ => Err(ClientDecodeError::Malformed),
    }
}

impl ClientRequest {
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, ClientDecodeError> {
        if bytes.len() > MAX_CLIENT_FRAME {
            return Err(ClientDecodeError::OutOfBounds);
        }
        let r: ClientRequest = decode(bytes)?;
        let ok = match &r {
            ClientRequest::Auth(UserAuthMessage::Hello { user, .. }) => user.len() <= MAX_USER,
            ClientRequest::PutChunk { data } => data.len() <= MAX_CHUNK_LEN,
            ClientRequest::Submit(s) => s.is_bounded(),
            ClientRequest::Records { keys } => keys.len() <= MAX_RECORD_KEYS,
            ClientRequest::Cancel { tasks, .. } => tasks.len() <= MAX_SUBMIT_TASKS + MAX_PARTS,
            _ => true,
        };
        if ok {
            Ok(r)
        } else {
            Err(ClientDecodeError::OutOfBounds)
        }
    }
}

impl ClientReply {
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, ClientDecodeError> {
        if bytes.len() > MAX_CLIENT_FRAME {
            return Err(ClientDecodeError::OutOfBounds);
        }
        decode(bytes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn requests_and_replies_round_trip() {
        let reqs = [
            ClientRequest::Ping,
            ClientRequest::PutChunk { data: vec![1; 100] },
            ClientRequest::Records {
                keys: vec![Key::for_name(b"a"); 3],
            },
            ClientRequest::Submit(SubmitRequest {
                name: "wc".into(),
                app: "wordcount".into(),
                nonce: 9,
                tasks: vec![(vec![], vec![Key::for_name(b"c")])],
                reducers: 2,
                exec_copies: 1,
                replication: 0,
                only: None,
            }),
        ];
        for r in reqs {
            assert_eq!(ClientRequest::decode(&r.encode()), Ok(r));
        }
        let rep = ClientReply::Records(vec![
            (Key::for_name(b"x"), RecordAnswer::Absent),
            (Key::for_name(b"y"), RecordAnswer::Value(vec![3])),
        ]);
        assert_eq!(ClientReply::decode(&rep.encode()), Ok(rep));
    }

    #[test]
    fn bad_messages_are_refused_not_panicked_on() {
        assert_eq!(
            ClientRequest::decode(&[9, 0]),
            Err(ClientDecodeError::Version(9))
        );
        assert_eq!(
            ClientRequest::decode(&[]),
            Err(ClientDecodeError::Malformed)
        );
        let mut trailing = ClientRequest::Ping.encode();
        trailing.push(0);
        assert_eq!(
            ClientRequest::decode(&trailing),
            Err(ClientDecodeError::Malformed)
        );
        let big = ClientRequest::PutChunk {
            data: vec![0; MAX_CHUNK_LEN + 1],
        };
        assert_eq!(
            ClientRequest::decode(&big.encode()),
            Err(ClientDecodeError::OutOfBounds)
        );
        let many = ClientRequest::Records {
            keys: vec![Key::for_name(b"k"); MAX_RECORD_KEYS + 1],
        };
        assert_eq!(
            ClientRequest::decode(&many.encode()),
            Err(ClientDecodeError::OutOfBounds)
        );
        // Every prefix of a valid message is refused cleanly.
        let full = ClientRequest::Submit(SubmitRequest {
            name: "n".into(),
            app: "primes".into(),
            nonce: 1,
            tasks: vec![(vec![1, 2], vec![])],
            reducers: 0,
            exec_copies: 2,
            replication: 2,
            only: Some(vec![0]),
        })
        .encode();
        for n in 0..full.len() {
            assert!(ClientRequest::decode(&full[..n]).is_err());
        }
    }
}
