//! The virtual clock's agenda (events in time order, ties in scheduling order, a livelock
//! bound). Stands in until the shared simulation harness lands on main; then the harness's
//! `Clock` replaces it.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use unipeer_node::Instant;

const MAX_STEPS_PER_INSTANT: u64 = 1_000_000;

struct Item<E> {
    at: Instant,
    seq: u64,
    ev: E,
}

impl<E> PartialEq for Item<E> {
    fn eq(&self, o: &Self) -> bool {
        (self.at, self.seq) == (o.at, o.seq)
    }
}
impl<E> Eq for Item<E> {}
impl<E> PartialOrd for Item<E> {
    fn partial_cmp(&self, o: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(o))
    }
}
impl<E> Ord for Item<E> {
    fn cmp(&self, o: &Self) -> std::cmp::Ordering {
        (self.at, self.seq).cmp(&(o.at, o.seq))
    }
}

pub struct Agenda<E> {
    seed: u64,
    heap: BinaryHeap<Reverse<Item<E>>>,
    seq: u64,
    last: Instant,
    same: u64,
}

impl<E> Agenda<E> {
    pub fn new(seed: u64) -> Self {
        Agenda {
            seed,
            heap: BinaryHeap::new(),
            seq: 0,
            last: Instant::ZERO,
            same: 0,
        }
    }

    pub fn schedule(&mut self, at: Instant, ev: E) {
        self.seq += 1;
        self.heap.push(Reverse(Item {
            at,
            seq: self.seq,
            ev,
        }));
    }

    pub fn pop_until(&mut self, until: Instant) -> Option<(Instant, E)> {
        if self.heap.peek()?.0.at > until {
            return None;
        }
        let Reverse(i) = self.heap.pop()?;
        self.same = if i.at == self.last { self.same + 1 } else { 0 };
        assert!(
            self.same < MAX_STEPS_PER_INSTANT,
            "seed {}: livelock at {:?}",
            self.seed,
            i.at
        );
        self.last = i.at;
        Some((i.at, i.ev))
    }
}
