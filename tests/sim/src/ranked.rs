//! Ids in order with the n-th one in `O(N / B)`: the simulator's uniform pick of a live node
//! (`Sim::random_live`) without walking a map of 100,000 nodes on every lookup it issues.

use unipeer_node::id::NodeId;

/// Most ids a block holds before it splits in two.
const BLOCK: usize = 1024;

/// A sorted set of ids kept in sorted blocks (each non-empty, at most `BLOCK`).
#[derive(Clone, Debug, Default)]
pub struct RankedIds {
    blocks: Vec<Vec<NodeId>>,
    len: usize,
}

impl RankedIds {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The block `id` belongs in (the first whose last id is not below it; else the last).
    fn block_of(&self, id: NodeId) -> usize {
        self.blocks
            .partition_point(|b| b.last().is_some_and(|l| *l < id))
            .min(self.blocks.len().saturating_sub(1))
    }

    /// Adds `id`; false when it was already there.
    pub fn insert(&mut self, id: NodeId) -> bool {
        if self.blocks.is_empty() {
            self.blocks.push(vec![id]);
            self.len = 1;
            return true;
        }
        let bi = self.block_of(id);
        let block = &mut self.blocks[bi];
        let Err(at) = block.binary_search(&id) else {
            return false;
        };
        block.insert(at, id);
        self.len += 1;
        if block.len() > BLOCK {
            let tail = block.split_off(block.len() / 2);
            self.blocks.insert(bi + 1, tail);
        }
        true
    }

    /// Removes `id`; false when it was not there.
    pub fn remove(&mut self, id: NodeId) -> bool {
        if self.blocks.is_empty() {
            return false;
        }
        let bi = self.block_of(id);
        let block = &mut self.blocks[bi];
        let Ok(at) = block.binary_search(&id) else {
            return false;
        };
        block.remove(at);
        self.len -= 1;
        if block.is_empty() {
            self.blocks.remove(bi);
        }
        true
    }

    /// The `n`-th smallest id (from 0).
    pub fn nth(&self, mut n: usize) -> Option<NodeId> {
        for b in &self.blocks {
            if n < b.len() {
                return Some(b[n]);
            }
            n -= b.len();
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;
    use unipeer_node::id::Id;
    use unipeer_node::rng::Rng;

    #[test]
    fn nth_matches_a_btree_through_inserts_and_removes() {
        let mut rng = Rng::from_u64(9);
        let mut r = RankedIds::default();
        let mut truth = BTreeSet::new();
        for step in 0..20_000u32 {
            let id = Id(rng.next_u128() % 5_000);
            if step % 3 == 2 {
                assert_eq!(r.remove(id), truth.remove(&id));
            } else {
                assert_eq!(r.insert(id), truth.insert(id));
            }
            assert_eq!(r.len(), truth.len());
            if step % 97 == 0 && !truth.is_empty() {
                let n = rng.below(truth.len() as u64) as usize;
                assert_eq!(r.nth(n), truth.iter().nth(n).copied());
            }
        }
        assert_eq!(r.nth(truth.len()), None);
        let all: Vec<NodeId> = (0..r.len()).filter_map(|i| r.nth(i)).collect();
        assert_eq!(all, truth.into_iter().collect::<Vec<_>>());
    }
}
