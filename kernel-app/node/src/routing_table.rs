//! Pastry's routing table: row `r` holds nodes sharing exactly `r` leading digits with the
//! node, column `c` the one whose next digit is `c`. Of several candidates for a slot the
//! nearest wins (the Registrar's proximity): same physical server first, then lowest RTT.
//!
//! Rows are allocated only up to the deepest one in use (about log16 N), so a node in a
//! 10,000-node overlay holds a few kilobytes, not 32 x 16 slots.

use crate::id::{DIGITS, Id, RADIX, ServerTag};
use crate::wire::Contact;
use alloc::vec::Vec;

/// One routing-table slot's occupant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TableEntry {
    pub contact: Contact,
    pub rtt_us: Option<u32>,
}

/// How near a candidate is, smaller is nearer: same server beats any RTT; unmeasured is last.
pub fn proximity_rank(own_server: ServerTag, contact: &Contact, rtt_us: Option<u32>) -> (u8, u32) {
    let same = if contact.server == own_server { 0 } else { 1 };
    (same, rtt_us.unwrap_or(u32::MAX))
}

/// The outcome of offering a candidate to a slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offer {
    /// The candidate took an empty slot or displaced a farther node.
    Taken,
    /// The slot holds a node at least as near, or the candidate is the node itself.
    Refused,
    /// The slot's occupant may be farther but the candidate's RTT is unknown: probe it first.
    NeedsRtt,
}

#[derive(Clone, Debug)]
pub struct RoutingTable {
    own: Id,
    own_server: ServerTag,
    rows: Vec<[Option<TableEntry>; RADIX]>,
}

impl RoutingTable {
    pub fn new(own: Id, own_server: ServerTag) -> Self {
        RoutingTable {
            own,
            own_server,
            rows: Vec::new(),
        }
    }

    /// The slot `id` belongs in, or `None` for the node's own id.
    pub fn slot_of(&self, id: Id) -> Option<(usize, usize)> {
        let row = self.own.shared_prefix_len(id);
        (row < DIGITS).then(|| (row, id.digit(row)))
    }

    pub fn get(&self, row: usize, col: usize) -> Option<&TableEntry> {
        self.rows.get(row).and_then(|r| r[col].as_ref())
    }

    /// Offers a live candidate for its slot.
    pub fn offer(&mut self, contact: Contact, rtt_us: Option<u32>) -> Offer {
        let Some((row, col)) = self.slot_of(contact.id) else {
            return Offer::Refused;
        };
        while self.rows.len() <= row {
            self.rows.push([None; RADIX]);
        }
        let own_server = self.own_server;
        let slot = &mut self.rows[row][col];
        match slot {
            None => {
                *slot = Some(TableEntry { contact, rtt_us });
                Offer::Taken
            }
            Some(cur) if cur.contact.id == contact.id => {
                cur.contact = contact;
                if rtt_us.is_some() {
                    cur.rtt_us = rtt_us;
                }
                Offer::Refused
            }
            Some(cur) => {
                let new = proximity_rank(own_server, &contact, rtt_us);
                let old = proximity_rank(own_server, &cur.contact, cur.rtt_us);
                if new < old {
                    *slot = Some(TableEntry { contact, rtt_us });
                    Offer::Taken
                } else if rtt_us.is_none() && new.0 == old.0 && new.0 == 1 {
                    Offer::NeedsRtt
                } else {
                    Offer::Refused
                }
            }
        }
    }

    /// Records a measured RTT for an occupant.
    pub fn set_rtt(&mut self, id: Id, rtt_us: u32) {
        if let Some((r, c)) = self.slot_of(id)
            && let Some(Some(e)) = self.rows.get_mut(r).map(|row| &mut row[c])
            && e.contact.id == id
        {
            e.rtt_us = Some(rtt_us);
        }
    }

    pub fn remove(&mut self, id: Id) -> bool {
        if let Some((r, c)) = self.slot_of(id)
            && let Some(row) = self.rows.get_mut(r)
            && row[c].is_some_and(|e| e.contact.id == id)
        {
            row[c] = None;
            while self
                .rows
                .last()
                .is_some_and(|row| row.iter().all(Option::is_none))
            {
                self.rows.pop();
            }
            return true;
        }
        false
    }

    pub fn contains(&self, id: Id) -> bool {
        self.slot_of(id)
            .and_then(|(r, c)| self.get(r, c))
            .is_some_and(|e| e.contact.id == id)
    }

    /// The Pastry next hop for `key`: the entry sharing one more digit with it.
    pub fn next_hop(&self, key: Id) -> Option<&TableEntry> {
        let (r, c) = self.slot_of(key)?;
        self.get(r, c)
    }

    /// Occupants of one row.
    pub fn row(&self, row: usize) -> Vec<Contact> {
        self.rows
            .get(row)
            .map(|r| r.iter().flatten().map(|e| e.contact).collect())
            .unwrap_or_default()
    }

    /// Rows allocated (deepest row in use + 1).
    pub fn rows(&self) -> usize {
        self.rows.len()
    }

    /// Occupied slots.
    pub fn filled(&self) -> usize {
        self.rows.iter().flatten().flatten().count()
    }

    pub fn entries(&self) -> impl Iterator<Item = &TableEntry> + '_ {
        self.rows.iter().flatten().flatten()
    }

    /// Heap bytes held (for the memory-per-node figure).
    pub fn heap_bytes(&self) -> usize {
        self.rows.capacity() * core::mem::size_of::<[Option<TableEntry>; RADIX]>()
    }
}

/// Pastry's neighbourhood set: the M nodes nearest by proximity (not by id) the node has met.
/// The Registrar's view of "who is close to me"; it also widens routing's rare-case choices.
#[derive(Clone, Debug)]
pub struct NeighbourhoodSet {
    own: Id,
    own_server: ServerTag,
    cap: usize,
    members: Vec<TableEntry>,
}

impl NeighbourhoodSet {
    pub fn new(own: Id, own_server: ServerTag, cap: usize) -> Self {
        NeighbourhoodSet {
            own,
            own_server,
            cap,
            members: Vec::with_capacity(cap + 1),
        }
    }

    /// Offers a node with its proximity; keeps the `cap` nearest.
    pub fn offer(&mut self, contact: Contact, rtt_us: Option<u32>) {
        if contact.id == self.own || (rtt_us.is_none() && contact.server != self.own_server) {
            return;
        }
        if let Some(e) = self.members.iter_mut().find(|e| e.contact.id == contact.id) {
            if rtt_us.is_some() {
                e.rtt_us = rtt_us;
            }
        } else {
            self.members.push(TableEntry { contact, rtt_us });
        }
        let s = self.own_server;
        self.members
            .sort_by_key(|e| (proximity_rank(s, &e.contact, e.rtt_us), e.contact.id));
        self.members.truncate(self.cap);
    }

    pub fn remove(&mut self, id: Id) {
        self.members.retain(|e| e.contact.id != id);
    }

    pub fn members(&self) -> &[TableEntry] {
        &self.members
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launch::PeerAddr;

    fn c(id: u128, server: u32) -> Contact {
        Contact {
            id: Id(id),
            addr: PeerAddr {
                ipv4: [10, 0, 0, 2],
                port: 1,
            },
            server: ServerTag(server),
        }
    }

    #[test]
    fn slots_and_proximity() {
        let own = Id(0xabc0 << 112);
        let mut t = RoutingTable::new(own, ServerTag(1));
        let far = c(0x1000 << 112, 2);
        assert_eq!(t.offer(far, Some(5000)), Offer::Taken);
        assert_eq!(t.slot_of(far.id), Some((0, 1)));
        // Same digit, unknown RTT, other server: probe first.
        assert_eq!(t.offer(c(0x1100 << 112, 3), None), Offer::NeedsRtt);
        // Same server wins without measuring.
        let near = c(0x1200 << 112, 1);
        assert_eq!(t.offer(near, None), Offer::Taken);
        assert_eq!(t.next_hop(Id(0x1fff << 112)).unwrap().contact, near);
        // Deeper row.
        let deep = c(0xab10 << 112, 2);
        t.offer(deep, None);
        assert_eq!(t.slot_of(deep.id), Some((2, 1)));
        assert_eq!(t.rows(), 3);
        assert_eq!(t.filled(), 2);
        assert!(t.remove(deep.id));
        assert_eq!(t.rows(), 1);
        assert_eq!(t.offer(c(own.0, 1), None), Offer::Refused);
    }

    #[test]
    fn neighbourhood_keeps_nearest() {
        let mut n = NeighbourhoodSet::new(Id(0), ServerTag(1), 2);
        n.offer(c(1, 2), Some(900));
        n.offer(c(2, 2), Some(100));
        n.offer(c(3, 1), None);
        n.offer(c(4, 2), None);
        let ids: alloc::vec::Vec<u128> = n.members().iter().map(|e| e.contact.id.0).collect();
        assert_eq!(ids, alloc::vec![3, 2]);
    }
}
