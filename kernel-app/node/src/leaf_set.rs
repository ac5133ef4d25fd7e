//! Pastry's leaf set: the L/2 nodes nearest clockwise and the L/2 nearest counter-clockwise.
//! It decides the last routing hop and where a key's replicas live, so it is kept exact:
//! every member is watched for liveness by the node (see `node.rs`).

use crate::id::Id;
use crate::time::Instant;
use crate::wire::Contact;
use alloc::vec::Vec;

/// A leaf-set member and what the node knows of its liveness.
#[derive(Clone, Debug)]
pub struct LeafMember {
    pub contact: Contact,
    /// Last time any packet arrived from it (or it was added).
    pub last_heard: Instant,
    /// Forwarded messages it failed to acknowledge in a row.
    pub missed_acks: u8,
    pub rtt_us: Option<u32>,
}

/// The leaf set of one node. Members are unique; with fewer than L other nodes known, it holds
/// all of them (a node may then be on both sides).
#[derive(Clone, Debug)]
pub struct LeafSet {
    own: Id,
    half: usize,
    members: Vec<LeafMember>,
}

impl LeafSet {
    /// A leaf set of `len` members (`len` even, at least 2).
    pub fn new(own: Id, len: usize) -> Self {
        assert!(
            len >= 2 && len.is_multiple_of(2),
            "leaf set length must be even and >= 2"
        );
        LeafSet {
            own,
            half: len / 2,
            members: Vec::with_capacity(len + 1),
        }
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Configured capacity L.
    pub fn capacity(&self) -> usize {
        self.half * 2
    }

    pub fn members(&self) -> &[LeafMember] {
        &self.members
    }

    pub fn members_mut(&mut self) -> &mut [LeafMember] {
        &mut self.members
    }

    pub fn contains(&self, id: Id) -> bool {
        self.members.iter().any(|m| m.contact.id == id)
    }

    pub fn get_mut(&mut self, id: Id) -> Option<&mut LeafMember> {
        self.members.iter_mut().find(|m| m.contact.id == id)
    }

    pub fn contacts(&self) -> impl Iterator<Item = &Contact> + '_ {
        self.members.iter().map(|m| &m.contact)
    }

    /// Members sorted nearest-first clockwise (successors), at most L/2.
    pub fn successors(&self) -> Vec<Contact> {
        self.side(|own, id| own.cw_distance(id))
    }

    /// Members sorted nearest-first counter-clockwise (predecessors), at most L/2.
    pub fn predecessors(&self) -> Vec<Contact> {
        self.side(|own, id| id.cw_distance(own))
    }

    fn side(&self, dist: impl Fn(Id, Id) -> u128) -> Vec<Contact> {
        let mut v: Vec<Contact> = self.members.iter().map(|m| m.contact).collect();
        v.sort_by_key(|c| dist(self.own, c.id));
        v.truncate(self.half);
        v
    }

    /// Whether `id` would be a member if offered now.
    pub fn would_admit(&self, id: Id) -> bool {
        if id == self.own || self.contains(id) {
            return false;
        }
        let cw = self.own.cw_distance(id);
        let ccw = id.cw_distance(self.own);
        let closer_cw = self
            .members
            .iter()
            .filter(|m| self.own.cw_distance(m.contact.id) < cw)
            .count();
        let closer_ccw = self
            .members
            .iter()
            .filter(|m| m.contact.id.cw_distance(self.own) < ccw)
            .count();
        closer_cw < self.half || closer_ccw < self.half
    }

    /// Offers a node, last heard of at `heard`; returns whether it became a member, and pushes
    /// the members it displaced into `evicted` (they are alive, just no longer the nearest).
    pub fn insert(&mut self, contact: Contact, heard: Instant, evicted: &mut Vec<Contact>) -> bool {
        if !self.would_admit(contact.id) {
            return false;
        }
        self.members.push(LeafMember {
            contact,
            last_heard: heard,
            missed_acks: 0,
            rtt_us: None,
        });
        let keep_cw = self.successors();
        let keep_ccw = self.predecessors();
        let mut i = 0;
        while i < self.members.len() {
            let id = self.members[i].contact.id;
            if keep_cw.iter().any(|c| c.id == id) || keep_ccw.iter().any(|c| c.id == id) {
                i += 1;
            } else {
                evicted.push(self.members.swap_remove(i).contact);
            }
        }
        true
    }

    pub fn remove(&mut self, id: Id) -> Option<LeafMember> {
        let i = self.members.iter().position(|m| m.contact.id == id)?;
        Some(self.members.swap_remove(i))
    }

    /// Whether `key` lies within the span the leaf set covers, so its root is among the members
    /// or the node itself. With a side not full, the node knows every node: all keys are covered.
    pub fn covers(&self, key: Id) -> bool {
        let succ = self.successors();
        let pred = self.predecessors();
        if succ.len() < self.half || pred.len() < self.half {
            return true;
        }
        let (Some(far_cw), Some(far_ccw)) = (succ.last(), pred.last()) else {
            return true;
        };
        self.own.cw_distance(key) <= self.own.cw_distance(far_cw.id)
            || key.cw_distance(self.own) <= far_ccw.id.cw_distance(self.own)
    }

    /// The member (or the node itself, as `None`) closest to `key`, skipping `skip`.
    pub fn closest(&self, key: Id, skip: impl Fn(Id) -> bool) -> Option<Contact> {
        let mut best: Option<Contact> = None;
        let mut best_id = self.own;
        for m in &self.members {
            if skip(m.contact.id) {
                continue;
            }
            if key.is_closer(m.contact.id, best_id) {
                best_id = m.contact.id;
                best = Some(m.contact);
            }
        }
        best
    }

    /// The `k` ids among the members and the node itself closest to `key`, nearest first: the
    /// replica set of `key` as this node sees it.
    pub fn replica_set(&self, key: Id, k: usize) -> Vec<Id> {
        let mut ids: Vec<Id> = self.members.iter().map(|m| m.contact.id).collect();
        ids.push(self.own);
        ids.sort_by_key(|id| (key.distance(*id), *id));
        ids.truncate(k);
        ids
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::ServerTag;
    use crate::launch::PeerAddr;
    use alloc::vec;

    fn c(id: u128) -> Contact {
        Contact {
            id: Id(id),
            addr: PeerAddr {
                ipv4: [10, 0, 0, 1],
                port: id as u16,
            },
            server: ServerTag(0),
        }
    }

    #[test]
    fn keeps_nearest_on_each_side() {
        let own = Id(1000);
        let mut ls = LeafSet::new(own, 4);
        let mut ev = vec![];
        for id in [1010u128, 1020, 1030, 990, 980, 970, 5000] {
            ls.insert(c(id), Instant::ZERO, &mut ev);
        }
        let mut ids: Vec<u128> = ls.members().iter().map(|m| m.contact.id.0).collect();
        ids.sort();
        assert_eq!(ids, vec![980, 990, 1010, 1020]);
        // 1030 was admitted while the ring looked small, then displaced; 970 never fit.
        assert!(ev.iter().any(|c| c.id.0 == 1030));
        assert!(!ev.iter().any(|c| c.id.0 == 970));
        assert!(ls.covers(Id(1015)));
        assert!(ls.covers(Id(985)));
        assert!(!ls.covers(Id(1025)));
        assert!(!ls.covers(Id(975)));
        assert_eq!(ls.closest(Id(1012), |_| false).unwrap().id.0, 1010);
        assert_eq!(ls.closest(Id(1001), |_| false), None);
        assert_eq!(
            ls.replica_set(Id(1004), 3),
            vec![Id(1000), Id(1010), Id(990)]
        );
        assert!(!ls.would_admit(Id(1030)));
        assert!(ls.would_admit(Id(1005)));
    }

    #[test]
    fn small_ring_covers_everything_and_wraps() {
        let own = Id(5);
        let mut ls = LeafSet::new(own, 16);
        let mut ev = vec![];
        ls.insert(c(u128::MAX - 5), Instant::ZERO, &mut ev);
        ls.insert(c(100), Instant::ZERO, &mut ev);
        assert!(ev.is_empty());
        assert!(ls.covers(Id(1 << 100)));
        assert_eq!(
            ls.closest(Id(u128::MAX), |_| false).unwrap().id.0,
            u128::MAX - 5
        );
        assert!(ls.remove(Id(100)).is_some());
        assert_eq!(ls.len(), 1);
    }
}
