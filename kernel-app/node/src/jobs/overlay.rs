//! What the job agent needs from the overlay peer, as a trait: the real [`Node`] implements it,
//! unit tests may fake it. Records go through the overlay's put/get (root + `k - 1` copies);
//! the agent reads its own copies to supervise the tasks whose root it is, and writes them by
//! compare-and-set on their version, so a late retry of an older write cannot overwrite a
//! newer record.

use crate::id::Key;
use crate::node::{Node, OpId, RequestError, WriteOptions};
use crate::routing_table::proximity_rank;
use crate::time::Instant;
use crate::wire::{Contact, Sealer};
use alloc::vec::Vec;

pub trait Overlay {
    /// This node as others reach it.
    fn contact(&self) -> Contact;
    fn is_joined(&self) -> bool;
    /// Whether this node is `key`'s root as far as its leaf set knows.
    fn is_root(&self, key: Key) -> bool;
    /// The `k` nodes (this one included) closest to `key` among the leaf set, nearest first.
    fn replica_set(&self, key: Key, k: usize) -> Vec<Contact>;
    /// Leaf-set and routing-table members (capacity adverts go to them).
    fn neighbours(&self) -> Vec<Contact>;
    /// Proximity rank of a contact, smaller is nearer (same server, then measured RTT).
    fn proximity(&self, c: &Contact) -> (u8, u32);
    /// This node's copy of `key`'s record.
    fn record(&self, key: Key) -> Option<&[u8]>;
    /// Up to `n` keys of held records after `after` (bounded scans; fewer: the end).
    fn record_keys_after(&self, after: Option<Key>, n: usize) -> Vec<Key>;
    fn lookup(&mut self, now: Instant, key: Key) -> Result<OpId, RequestError>;
    fn put(&mut self, now: Instant, key: Key, value: &[u8]) -> Result<OpId, RequestError>;
    /// Compare-and-set: `value` becomes the next version only while the record is at
    /// `expected` (0: absent); a majority of the replica set decides.
    /// (`copies`: the record's copies, a job's replication; 0: the cluster's `k`.)
    fn put_if(
        &mut self,
        now: Instant,
        key: Key,
        value: &[u8],
        expected: u64,
        copies: u8,
    ) -> Result<OpId, RequestError>;
    /// The version of this node's copy of `key`'s record.
    fn record_version(&self, key: Key) -> Option<u64>;
    fn get(&mut self, now: Instant, key: Key) -> Result<OpId, RequestError>;
}

impl<S: Sealer> Overlay for Node<S> {
    fn contact(&self) -> Contact {
        Node::contact(self)
    }

    fn is_joined(&self) -> bool {
        Node::is_joined(self)
    }

    fn is_root(&self, key: Key) -> bool {
        let leaf = self.leaf_set();
        Node::is_joined(self) && leaf.covers(key) && leaf.closest(key, |_| false).is_none()
    }

    fn replica_set(&self, key: Key, k: usize) -> Vec<Contact> {
        let me = Node::contact(self);
        let leaf = self.leaf_set();
        leaf.replica_set(key, k)
            .into_iter()
            .filter_map(|id| {
                if id == me.id {
                    Some(me)
                } else {
                    leaf.contacts().find(|c| c.id == id).copied()
                }
            })
            .collect()
    }

    fn neighbours(&self) -> Vec<Contact> {
        let mut out: Vec<Contact> = self.leaf_set().contacts().copied().collect();
        for e in self.routing_table().entries() {
            if !out.iter().any(|c| c.id == e.contact.id) {
                out.push(e.contact);
            }
        }
        out
    }

    fn proximity(&self, c: &Contact) -> (u8, u32) {
        let rtt = self
            .routing_table()
            .entries()
            .find(|e| e.contact.id == c.id)
            .and_then(|e| e.rtt_us);
        proximity_rank(Node::contact(self).server, c, rtt)
    }

    fn record(&self, key: Key) -> Option<&[u8]> {
        self.records().get(key).map(|r| r.value.as_slice())
    }

    fn record_keys_after(&self, after: Option<Key>, n: usize) -> Vec<Key> {
        self.records().keys_after(after, n)
    }

    fn lookup(&mut self, now: Instant, key: Key) -> Result<OpId, RequestError> {
        Node::lookup(self, now, key)
    }

    fn put(&mut self, now: Instant, key: Key, value: &[u8]) -> Result<OpId, RequestError> {
        Node::put(self, now, key, value)
    }

    fn put_if(
        &mut self,
        now: Instant,
        key: Key,
        value: &[u8],
        expected: u64,
        copies: u8,
    ) -> Result<OpId, RequestError> {
        let opts = WriteOptions {
            expected: Some(expected),
            copies,
        };
        Node::put_with(self, now, key, value, opts)
    }

    fn record_version(&self, key: Key) -> Option<u64> {
        self.records().get(key).map(|r| r.version)
    }

    fn get(&mut self, now: Instant, key: Key) -> Result<OpId, RequestError> {
        Node::get(self, now, key)
    }
}
