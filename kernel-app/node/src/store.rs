//! DHT records held by one node: the ones it is a replica for, and the ones it still has to
//! hand off. Each record remembers which replica-set members confirmed a copy, so the node
//! re-replicates only what is missing when its leaf set changes.

use crate::id::Id;
use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::ops::Bound;

/// One stored record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub value: Vec<u8>,
    /// Grows with every put at the root; replicas keep the highest.
    pub version: u64,
    /// Nodes known to hold this version (acknowledged a `Store`, or sent it to us).
    pub confirmed: Vec<Id>,
    /// Copies the record keeps (its writer's choice; 0: the node's `k`).
    pub copies: u8,
}

/// Why a record was not stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreError {
    /// The store holds `max_records` already.
    Full,
    /// The offered version is older than the one held.
    Stale,
}

#[derive(Clone, Debug)]
pub struct RecordStore {
    records: BTreeMap<Id, Record>,
    max_records: usize,
}

impl RecordStore {
    pub fn new(max_records: usize) -> Self {
        RecordStore {
            records: BTreeMap::new(),
            max_records,
        }
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn get(&self, key: Id) -> Option<&Record> {
        self.records.get(&key)
    }

    pub fn get_mut(&mut self, key: Id) -> Option<&mut Record> {
        self.records.get_mut(&key)
    }

    /// Stores `value` at `version` (keeping `copies` copies) unless an equal or newer version
    /// is held. Returns whether anything changed.
    pub fn accept(
        &mut self,
        key: Id,
        version: u64,
        value: &[u8],
        copies: u8,
    ) -> Result<bool, StoreError> {
        let full = self.records.len() >= self.max_records;
        match self.records.get_mut(&key) {
            Some(r) if r.version > version => Err(StoreError::Stale),
            Some(r) if r.version == version => Ok(false),
            Some(r) => {
                r.version = version;
                r.copies = copies;
                r.value.clear();
                r.value.extend_from_slice(value);
                r.confirmed.clear();
                Ok(true)
            }
            None if full => Err(StoreError::Full),
            None => {
                self.records.insert(
                    key,
                    Record {
                        value: value.to_vec(),
                        version,
                        confirmed: Vec::new(),
                        copies,
                    },
                );
                Ok(true)
            }
        }
    }

    /// Notes that `holder` has `version` of `key`.
    pub fn confirm(&mut self, key: Id, version: u64, holder: Id) {
        if let Some(r) = self.records.get_mut(&key)
            && r.version == version
            && !r.confirmed.contains(&holder)
        {
            r.confirmed.push(holder);
        }
    }

    /// Forgets every confirmation by `holder` (it failed, or restarted empty).
    pub fn forget_holder(&mut self, holder: Id) {
        for r in self.records.values_mut() {
            r.confirmed.retain(|h| *h != holder);
        }
    }

    pub fn remove(&mut self, key: Id) -> Option<Record> {
        self.records.remove(&key)
    }

    /// Up to `n` keys after `after` (exclusive; from the start with `None`), for a bounded pass.
    pub fn keys_after(&self, after: Option<Id>, n: usize) -> Vec<Id> {
        let lower = match after {
            Some(k) => Bound::Excluded(k),
            None => Bound::Unbounded,
        };
        self.records
            .range((lower, Bound::Unbounded))
            .take(n)
            .map(|(k, _)| *k)
            .collect()
    }

    pub fn iter(&self) -> impl Iterator<Item = (&Id, &Record)> + '_ {
        self.records.iter()
    }

    /// Approximate heap bytes held.
    pub fn heap_bytes(&self) -> usize {
        self.records
            .values()
            .map(|r| 64 + r.value.capacity() + r.confirmed.capacity() * 16)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_and_bounds() {
        let mut s = RecordStore::new(2);
        assert_eq!(s.accept(Id(1), 1, b"a", 0), Ok(true));
        assert_eq!(s.accept(Id(1), 1, b"a", 0), Ok(false));
        s.confirm(Id(1), 1, Id(9));
        assert_eq!(s.get(Id(1)).unwrap().confirmed, alloc::vec![Id(9)]);
        assert_eq!(s.accept(Id(1), 2, b"b", 0), Ok(true));
        assert!(s.get(Id(1)).unwrap().confirmed.is_empty());
        assert_eq!(s.accept(Id(1), 1, b"old", 0), Err(StoreError::Stale));
        assert_eq!(s.accept(Id(2), 1, b"x", 0), Ok(true));
        assert_eq!(s.accept(Id(3), 1, b"x", 0), Err(StoreError::Full));
        assert_eq!(s.keys_after(Some(Id(1)), 5), alloc::vec![Id(2)]);
        assert_eq!(s.keys_after(None, 1), alloc::vec![Id(1)]);
    }
}
