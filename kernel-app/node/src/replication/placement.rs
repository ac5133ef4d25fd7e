//! The placement record of an instance and the port through which the agent reads and
//! changes it.
//!
//! The record lives in the DHT at the instance's AppId (SHA-256 of its name, [`app_id`]). It
//! changes only by compare-and-set on its version, so each epoch has one master: the agent
//! emits [`StoreOp`]s and the driver answers with [`StoreResult`]s. The kernel drives them with
//! the DHT's majority-acknowledged CAS; the simulator with its own store model. Nothing here
//! assumes the store is fast or reachable: an op may fail or take long.

use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};

use crate::{Id, Key, NodeId};

/// Longest instance name.
pub const MAX_INSTANCE_NAME: usize = 64;
/// Most slaves of one instance.
pub const MAX_SLAVES: usize = 6;
/// Largest encoded record.
pub const MAX_RECORD_BYTES: usize = 512;

/// The key of an instance's placement record: SHA-256 of its name.
pub fn app_id(name: &str) -> Key {
    Id::for_name(name.as_bytes())
}

/// How the master answers writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, Default)]
pub enum Mode {
    /// The reply does not wait for the slaves; lag is reported, and a failover may lose the
    /// writes in the lag window (counted).
    #[default]
    Async,
    /// The reply waits until a quorum of the group holds the write; after a bound the write
    /// fails with an error instead of being acknowledged.
    Sync,
}

/// Where an instance lives: its master for an epoch and its slaves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlacementRecord {
    pub name: String,
    /// The replicated service's name (`kv`).
    pub service: String,
    /// The master of `epoch`. At epoch 0 (just created) the preferred first master, which
    /// is elected to epoch 1 like any later master.
    pub master: NodeId,
    pub slaves: Vec<NodeId>,
    pub epoch: u64,
    pub mode: Mode,
    /// The TCP port clients use at every node.
    pub port: u16,
    /// Grows by one with every change; the CAS compares it.
    pub version: u64,
}

/// Why a record is refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RecordError {
    /// Name empty or too long, too many slaves, the master among its slaves, duplicates.
    Unbounded,
    /// The bytes do not decode.
    Malformed,
}

impl core::fmt::Display for RecordError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(match self {
            RecordError::Unbounded => "placement record breaks its bounds",
            RecordError::Malformed => "placement record does not decode",
        })
    }
}

impl core::error::Error for RecordError {}

impl PlacementRecord {
    pub fn app(&self) -> Key {
        app_id(&self.name)
    }

    /// Master and slaves.
    pub fn members(&self) -> impl Iterator<Item = NodeId> + '_ {
        core::iter::once(self.master).chain(self.slaves.iter().copied())
    }

    pub fn is_member(&self, n: NodeId) -> bool {
        self.members().any(|m| m == n)
    }

    /// Group size.
    pub fn group(&self) -> usize {
        1 + self.slaves.len()
    }

    pub fn check(&self) -> Result<(), RecordError> {
        let dup = self
            .slaves
            .iter()
            .enumerate()
            .any(|(i, s)| *s == self.master || self.slaves[..i].contains(s));
        if self.name.is_empty()
            || self.name.len() > MAX_INSTANCE_NAME
            || self.service.is_empty()
            || self.service.len() > super::service::MAX_SERVICE_NAME
            || self.slaves.len() > MAX_SLAVES
            || dup
        {
            return Err(RecordError::Unbounded);
        }
        Ok(())
    }

    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        if bytes.len() > MAX_RECORD_BYTES {
            return Err(RecordError::Unbounded);
        }
        let r: PlacementRecord = postcard::from_bytes(bytes).map_err(|_| RecordError::Malformed)?;
        r.check()?;
        Ok(r)
    }

    /// The record after `new_master` won epoch `epoch`: the old master joins the slaves.
    pub fn promoted(&self, new_master: NodeId, epoch: u64) -> PlacementRecord {
        let mut r = self.clone();
        r.slaves = self.members().filter(|m| *m != new_master).collect();
        r.master = new_master;
        r.epoch = epoch;
        r.version = self.version + 1;
        r
    }
}

/// Votes a candidate needs (counting its own) in a group of `n`: a majority.
pub fn promotion_quorum(n: usize) -> usize {
    n / 2 + 1
}

/// Members (the master included) whose lease acknowledgement keeps a master serving. With
/// [`promotion_quorum`] it adds up to more than `n`, so every promotion quorum holds a member
/// that the master's lease still binds.
pub fn lease_quorum(n: usize) -> usize {
    n - promotion_quorum(n) + 1
}

/// Members (the master included) that must hold a write before sync mode acknowledges it:
/// the lease quorum, so every promotion quorum holds a copy, and at least one slave.
pub fn sync_quorum(n: usize) -> usize {
    lease_quorum(n).max(n.min(2))
}

/// Correlates a store op with its result.
pub type StoreOpId = u64;

/// What the agent asks of the placement store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreOp {
    /// Read the record at `app`.
    Get { app: Key },
    /// Write `record` if the stored version is `expected_version` (0: no record yet).
    CompareAndSet {
        app: Key,
        expected_version: u64,
        record: PlacementRecord,
    },
}

/// The store's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum StoreResult {
    /// The record now stored (after a get, or a successful CAS).
    Record(Option<PlacementRecord>),
    /// The CAS lost: this is the record stored instead.
    Conflict(Option<PlacementRecord>),
    /// The store could not decide (no majority reachable, timeout).
    Unavailable,
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;

    #[test]
    fn quorums_intersect() {
        for n in 1..=7 {
            let (p, l, s) = (promotion_quorum(n), lease_quorum(n), sync_quorum(n));
            assert!(p + l > n && p + s > n, "n = {n}");
            assert!(p <= n && l <= n && s <= n && l >= 1);
        }
        assert_eq!(
            (promotion_quorum(3), lease_quorum(3), sync_quorum(3)),
            (2, 2, 2)
        );
        assert_eq!(
            (promotion_quorum(2), lease_quorum(2), sync_quorum(2)),
            (2, 1, 2)
        );
    }

    #[test]
    fn record_round_trip_bounds_and_promotion() {
        let r = PlacementRecord {
            name: "cache".to_string(),
            service: "kv".to_string(),
            master: Id(1),
            slaves: vec![Id(2), Id(3)],
            epoch: 4,
            mode: Mode::Sync,
            port: 6379,
            version: 9,
        };
        assert_eq!(PlacementRecord::decode(&r.encode()), Ok(r.clone()));
        let p = r.promoted(Id(3), 5);
        assert_eq!((p.master, p.epoch, p.version), (Id(3), 5, 10));
        assert_eq!(p.slaves, vec![Id(1), Id(2)]);
        let mut bad = r.clone();
        bad.slaves.push(Id(1));
        assert_eq!(
            PlacementRecord::decode(&bad.encode()),
            Err(RecordError::Unbounded)
        );
        assert_eq!(
            PlacementRecord::decode(&[0xff; 8]),
            Err(RecordError::Malformed)
        );
        assert_eq!(r.app(), app_id("cache"));
    }
}
