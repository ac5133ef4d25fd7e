//! Replication agent messages, node to node: postcard with a version byte in front; every
//! length bounded on decode; a message that breaks a bound or does not decode is dropped and
//! counted by the agent.
//!
//! In the kernel they travel on the sealed node-to-node TCP channel; nothing here relies on
//! that channel being reliable or ordered: losses are retried, duplicates and reordering
//! are harmless (sequence numbers, relay ids, epochs).

use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

use super::placement::PlacementRecord;
use crate::{Key, NodeId};

/// The first byte of every message.
pub const WIRE_VERSION: u8 = 1;
/// Largest message.
pub const MAX_MESSAGE_BYTES: usize = 8 * 1024 * 1024;
/// Most log entries in one batch.
pub const MAX_BATCH_ENTRIES: usize = 256;
/// Largest change record.
pub const MAX_CHANGE_BYTES: usize = 3 * 1024 * 1024;
/// Most requests in one relayed batch.
pub const MAX_RELAY_REQUESTS: usize = 64;
/// Most arguments in one relayed request.
pub const MAX_ARGS: usize = 1024;
/// Most epochs of log history carried.
pub const MAX_HISTORY: usize = 32;
/// Most lost-write ranges carried.
pub const MAX_LOST_RANGES: usize = 64;
/// Largest snapshot chunk.
pub const MAX_CHUNK_BYTES: usize = 1024 * 1024;
/// Most chunks in one snapshot.
pub const MAX_CHUNKS: u32 = 64 * 1024;

/// One change in the ordered log.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub seq: u64,
    /// The epoch of the master that wrote it.
    pub epoch: u64,
    pub change: Vec<u8>,
}

/// Writes lost in a failover: sequence numbers `first..=last` written in `epoch` that the
/// surviving log does not hold.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, PartialOrd, Ord)]
pub struct LostRange {
    pub epoch: u64,
    pub first: u64,
    pub last: u64,
}

/// A message about one instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub app: Key,
    pub msg: Msg,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Msg {
    /// Master → members: I am the master of `record.epoch`; renew my lease. `sent_at_us` is
    /// the master's clock, echoed so the lease runs from the send.
    Heartbeat {
        record: PlacementRecord,
        sent_at_us: u64,
        last_seq: u64,
        lost: Vec<LostRange>,
    },
    /// Member → master: lease renewed (`sent_at_us` echoed), and how far the log is.
    HeartbeatAck {
        epoch: u64,
        sent_at_us: u64,
        acked_seq: u64,
    },
    /// Answer to a message of an older epoch: the sender is behind (`epoch`: the newest
    /// record known; `voted`: the newest epoch voted for).
    Stale {
        epoch: u64,
        voted: u64,
        record: Option<PlacementRecord>,
    },
    /// Slave → master of `epoch`: where my log ends, and the lost-write ranges I know (so
    /// the ledger survives a master that failed before passing it on).
    SyncRequest {
        epoch: u64,
        last_seq: u64,
        last_epoch: u64,
        lost: Vec<LostRange>,
    },
    /// Master → slave: your log is a prefix of mine; entries after it follow.
    /// `master_seq`: the master's log end now; a slave that lost its memory is whole again
    /// (may vote) once it holds that much.
    SyncPartial {
        epoch: u64,
        from_seq: u64,
        history: Vec<(u64, u64)>,
        master_seq: u64,
    },
    /// Master → slave: fetch this snapshot; your log ends at `end_of_common` in my history
    /// (entries after it in yours were never mine: drop them).
    SyncSnapshot {
        epoch: u64,
        at_seq: u64,
        at_epoch: u64,
        chunks: u32,
        end_of_common: u64,
        history: Vec<(u64, u64)>,
    },
    SnapshotFetch {
        epoch: u64,
        at_seq: u64,
        index: u32,
    },
    SnapshotPart {
        epoch: u64,
        at_seq: u64,
        index: u32,
        bytes: Vec<u8>,
    },
    /// Master → slave: entries following `prev_seq`.
    Entries {
        epoch: u64,
        prev_seq: u64,
        entries: Vec<Entry>,
    },
    /// Slave → master: my log holds every entry up to `acked_seq`.
    Ack {
        epoch: u64,
        acked_seq: u64,
    },
    /// Candidate → members: vote for me as master of `new_epoch`.
    VoteRequest {
        new_epoch: u64,
        last_epoch: u64,
        last_seq: u64,
    },
    /// `voted`: the newest epoch the voter voted for, so a refused candidate stands higher.
    /// `newer_log`: refused because the voter's log is newer (the candidate should yield).
    VoteReply {
        new_epoch: u64,
        granted: bool,
        voted: u64,
        newer_log: bool,
    },
    /// Any node → master: requests of one client connection, in order.
    Relay {
        epoch: u64,
        relay_id: u64,
        requests: Vec<Vec<Vec<u8>>>,
    },
    /// Master → relaying node: the replies, in order.
    RelayReply {
        relay_id: u64,
        replies: Vec<Vec<u8>>,
    },
    /// Not the master; the newest record known. `maybe_applied`: this node may have
    /// applied the relay as an earlier master (its writes must not be re-sent elsewhere).
    NotMaster {
        relay_id: u64,
        record: Option<PlacementRecord>,
        maybe_applied: bool,
    },
    /// A record to adopt if newer (creation, promotion).
    Placement {
        record: PlacementRecord,
    },
}

/// Why a message was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    WrongVersion,
    Malformed,
    Unbounded,
}

impl core::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            DecodeError::WrongVersion => "replication message of another version",
            DecodeError::Malformed => "replication message does not decode",
            DecodeError::Unbounded => "replication message breaks a bound",
        })
    }
}

impl core::error::Error for DecodeError {}

pub fn encode(env: &Envelope) -> Vec<u8> {
    let mut out = alloc::vec![WIRE_VERSION];
    if let Ok(b) = postcard::to_allocvec(env) {
        out.extend(b);
    }
    out
}

fn bounded(env: &Envelope) -> bool {
    let rec_ok = |r: &PlacementRecord| r.check().is_ok();
    match &env.msg {
        Msg::Heartbeat { record, lost, .. } => rec_ok(record) && lost.len() <= MAX_LOST_RANGES,
        Msg::Stale { record, .. } | Msg::NotMaster { record, .. } => {
            record.as_ref().is_none_or(rec_ok)
        }
        Msg::Placement { record } => rec_ok(record),
        Msg::SyncPartial { history, .. } => history.len() <= MAX_HISTORY,
        Msg::SyncRequest { lost, .. } => lost.len() <= MAX_LOST_RANGES,
        Msg::SyncSnapshot {
            history, chunks, ..
        } => history.len() <= MAX_HISTORY && *chunks <= MAX_CHUNKS,
        Msg::SnapshotPart { bytes, .. } => bytes.len() <= MAX_CHUNK_BYTES,
        Msg::Entries {
            entries, prev_seq, ..
        } => {
            entries.len() <= MAX_BATCH_ENTRIES
                && entries.iter().all(|e| e.change.len() <= MAX_CHANGE_BYTES)
                && entries
                    .iter()
                    .enumerate()
                    .all(|(i, e)| e.seq == prev_seq + 1 + i as u64)
        }
        Msg::Relay { requests, .. } => {
            !requests.is_empty()
                && requests.len() <= MAX_RELAY_REQUESTS
                && requests
                    .iter()
                    .all(|r| !r.is_empty() && r.len() <= MAX_ARGS)
        }
        Msg::RelayReply { replies, .. } => replies.len() <= MAX_RELAY_REQUESTS,
        _ => true,
    }
}

pub fn decode(bytes: &[u8]) -> Result<Envelope, DecodeError> {
    if bytes.len() > MAX_MESSAGE_BYTES {
        return Err(DecodeError::Unbounded);
    }
    match bytes.split_first() {
        Some((&WIRE_VERSION, rest)) => {
            let env: Envelope = postcard::from_bytes(rest).map_err(|_| DecodeError::Malformed)?;
            if bounded(&env) {
                Ok(env)
            } else {
                Err(DecodeError::Unbounded)
            }
        }
        Some(_) => Err(DecodeError::WrongVersion),
        None => Err(DecodeError::Malformed),
    }
}

/// The node a message goes to, with its bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outgoing {
    pub to: NodeId,
    pub bytes: Vec<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Id;
    use crate::rng::Rng;
    use alloc::vec;

    #[test]
    fn round_trip_and_bounds() {
        let env = Envelope {
            app: Id(5),
            msg: Msg::Entries {
                epoch: 2,
                prev_seq: 7,
                entries: vec![
                    Entry {
                        seq: 8,
                        epoch: 2,
                        change: vec![1, 2],
                    },
                    Entry {
                        seq: 9,
                        epoch: 2,
                        change: vec![],
                    },
                ],
            },
        };
        assert_eq!(decode(&encode(&env)), Ok(env));
        let gap = Envelope {
            app: Id(5),
            msg: Msg::Entries {
                epoch: 2,
                prev_seq: 7,
                entries: vec![Entry {
                    seq: 9,
                    epoch: 2,
                    change: vec![],
                }],
            },
        };
        assert_eq!(decode(&encode(&gap)), Err(DecodeError::Unbounded));
        let mut b = encode(&gap);
        b[0] = 9;
        assert_eq!(decode(&b), Err(DecodeError::WrongVersion));
        assert_eq!(decode(&[]), Err(DecodeError::Malformed));
    }

    #[test]
    fn garbage_never_panics() {
        let mut rng = Rng::from_u64(1);
        let mut ok = 0;
        for _ in 0..20_000 {
            let n = rng.below(64) as usize;
            let mut b: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
            if !b.is_empty() {
                b[0] = WIRE_VERSION;
            }
            ok += decode(&b).is_ok() as u32;
        }
        assert!(ok < 20_000);
    }
}
