//! The Data Manager's per-node store: content-addressed chunks (id = SHA-256 of the bytes, as a
//! ring key), verified on arrival, bounded in count and bytes.

use super::app::MAX_CHUNK_LEN;
use crate::id::{Key, NodeId};
use alloc::collections::BTreeMap;
use alloc::vec::Vec;

/// A chunk's id: [`Key::for_content`] of its bytes (SHA-256, first 128 bits).
pub type ChunkId = Key;

/// Why a chunk was not stored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkError {
    /// The bytes do not hash to the id.
    Corrupt,
    /// Longer than [`MAX_CHUNK_LEN`].
    TooLarge,
    /// The store is at its count or byte bound.
    Full,
}

/// One held chunk and what the node knows of its copies.
#[derive(Clone, Debug)]
pub struct HeldChunk {
    pub data: Vec<u8>,
    /// Replica-set members known to hold it (pushed by the root, or offered to it).
    pub confirmed: Vec<NodeId>,
    /// Copies it keeps: its job's replication (0: the cluster's).
    pub copies: u8,
}

/// Bounded chunk store.
#[derive(Clone, Debug)]
pub struct ChunkStore {
    chunks: BTreeMap<ChunkId, HeldChunk>,
    bytes: usize,
    max_chunks: usize,
    max_bytes: usize,
}

impl ChunkStore {
    pub fn new(max_chunks: usize, max_bytes: usize) -> Self {
        ChunkStore {
            chunks: BTreeMap::new(),
            bytes: 0,
            max_chunks,
            max_bytes,
        }
    }

    /// Verifies and stores `data` under `id`; storing a held chunk again is a no-op.
    pub fn insert(&mut self, id: ChunkId, data: &[u8]) -> Result<(), ChunkError> {
        if data.len() > MAX_CHUNK_LEN {
            return Err(ChunkError::TooLarge);
        }
        if Key::for_content(data) != id {
            return Err(ChunkError::Corrupt);
        }
        if self.chunks.contains_key(&id) {
            return Ok(());
        }
        if self.chunks.len() >= self.max_chunks || self.bytes + data.len() > self.max_bytes {
            return Err(ChunkError::Full);
        }
        self.bytes += data.len();
        self.chunks.insert(
            id,
            HeldChunk {
                data: data.to_vec(),
                confirmed: Vec::new(),
                copies: 0,
            },
        );
        Ok(())
    }

    pub fn get(&self, id: ChunkId) -> Option<&[u8]> {
        self.chunks.get(&id).map(|c| c.data.as_slice())
    }

    pub fn contains(&self, id: ChunkId) -> bool {
        self.chunks.contains_key(&id)
    }

    /// Copies `id` keeps (0: the cluster's).
    pub fn copies(&self, id: ChunkId) -> u8 {
        self.chunks.get(&id).map_or(0, |c| c.copies)
    }

    /// Records the copies a job asks of `id` (0 leaves what is known).
    pub fn set_copies(&mut self, id: ChunkId, copies: u8) {
        if let Some(c) = self.chunks.get_mut(&id)
            && copies != 0
        {
            c.copies = copies;
        }
    }

    pub fn remove(&mut self, id: ChunkId) -> bool {
        match self.chunks.remove(&id) {
            Some(c) => {
                self.bytes -= c.data.len();
                true
            }
            None => false,
        }
    }

    pub fn held_mut(&mut self, id: ChunkId) -> Option<&mut HeldChunk> {
        self.chunks.get_mut(&id)
    }

    pub fn len(&self) -> usize {
        self.chunks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.chunks.is_empty()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Up to `n` ids after `after` (wrapping to the start), for bounded maintenance passes.
    pub fn ids_after(&self, after: Option<ChunkId>, n: usize) -> Vec<ChunkId> {
        use core::ops::Bound;
        let start = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut out: Vec<ChunkId> = self
            .chunks
            .range((start, Bound::Unbounded))
            .take(n)
            .map(|(k, _)| *k)
            .collect();
        if out.len() < n && after.is_some() {
            for k in self.chunks.keys().take(n - out.len()) {
                if out.contains(k) {
                    break;
                }
                out.push(*k);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verifies_and_bounds() {
        let mut s = ChunkStore::new(2, 10);
        let a = b"hello";
        let id = Key::for_content(a);
        assert_eq!(
            s.insert(Key::for_content(b"x"), a),
            Err(ChunkError::Corrupt)
        );
        s.insert(id, a).unwrap();
        s.insert(id, a).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s.get(id), Some(&a[..]));
        assert_eq!(
            s.insert(Key::for_content(b"123456"), b"123456"),
            Err(ChunkError::Full),
            "byte bound"
        );
        s.insert(Key::for_content(b"1"), b"1").unwrap();
        assert_eq!(
            s.insert(Key::for_content(b"2"), b"2"),
            Err(ChunkError::Full)
        );
        assert_eq!(s.ids_after(None, 5).len(), 2);
        assert_eq!(s.ids_after(Some(id), 5).len(), 2, "wraps");
        let big = alloc::vec![0u8; MAX_CHUNK_LEN + 1];
        assert_eq!(
            s.insert(Key::for_content(&big), &big),
            Err(ChunkError::TooLarge)
        );
    }
}
