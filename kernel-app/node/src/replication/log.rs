//! The ordered change log of one instance on one member: where it ends, the epoch history
//! (which epoch wrote which sequence numbers) and a bounded backlog of recent entries, from
//! which a slave that was cut off resumes (Redis's partial resync); a slave that fell behind
//! the backlog gets a snapshot instead.

use alloc::collections::VecDeque;
use alloc::vec::Vec;

use super::wire::{Entry, MAX_HISTORY};
use crate::Instant;

/// One retained entry and when this node appended it (lag in ms is measured from it).
#[derive(Clone, Debug)]
struct Held {
    entry: Entry,
    at: Instant,
}

/// Where a follower's log stands against this one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Position {
    /// A prefix of this log that the backlog can continue from `from_seq`.
    Resume { from_seq: u64 },
    /// A prefix of this log up to `common` (and diverged after it if its end is beyond), which
    /// the backlog cannot continue or the follower must drop entries: send a snapshot.
    Snapshot { common: u64 },
}

#[derive(Clone, Debug)]
pub struct ChangeLog {
    backlog: VecDeque<Held>,
    backlog_bytes: usize,
    max_entries: usize,
    max_bytes: usize,
    last_seq: u64,
    /// The epoch of the entry at `last_seq` (0 for an empty log).
    last_epoch: u64,
    /// `(epoch, first seq it wrote)`, ascending; at most [`MAX_HISTORY`].
    history: Vec<(u64, u64)>,
}

impl ChangeLog {
    pub fn new(max_entries: usize, max_bytes: usize) -> Self {
        ChangeLog {
            backlog: VecDeque::new(),
            backlog_bytes: 0,
            max_entries: max_entries.max(1),
            max_bytes,
            last_seq: 0,
            last_epoch: 0,
            history: Vec::new(),
        }
    }

    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    pub fn last_epoch(&self) -> u64 {
        self.last_epoch
    }

    pub fn history(&self) -> &[(u64, u64)] {
        &self.history
    }

    /// The first sequence number the backlog holds (`last_seq + 1` when empty).
    pub fn first_held(&self) -> u64 {
        self.backlog
            .front()
            .map_or(self.last_seq + 1, |h| h.entry.seq)
    }

    /// Starts writing as the master of `epoch` (after a promotion).
    pub fn begin_epoch(&mut self, epoch: u64) {
        let next = self.last_seq + 1;
        self.history
            .retain(|&(_, first)| first <= self.last_seq.max(1));
        if self.history.last().is_none_or(|&(e, _)| e < epoch) {
            self.history.push((epoch, next));
        }
        self.trim_history();
    }

    fn trim_history(&mut self) {
        while self.history.len() > MAX_HISTORY {
            self.history.remove(0);
        }
    }

    fn push(&mut self, entry: Entry, now: Instant) {
        self.last_seq = entry.seq;
        self.last_epoch = entry.epoch;
        self.backlog_bytes += entry.change.len();
        self.backlog.push_back(Held { entry, at: now });
        while self.backlog.len() > self.max_entries
            || (self.backlog_bytes > self.max_bytes && self.backlog.len() > 1)
        {
            if let Some(h) = self.backlog.pop_front() {
                self.backlog_bytes -= h.entry.change.len();
            }
        }
    }

    /// Appends a change written by this node as master of `epoch`; returns its sequence.
    pub fn append(&mut self, epoch: u64, change: Vec<u8>, now: Instant) -> u64 {
        let seq = self.last_seq + 1;
        self.push(Entry { seq, epoch, change }, now);
        seq
    }

    /// Appends an entry received from the master; it must follow the log's end.
    pub fn accept(&mut self, entry: Entry, now: Instant) -> bool {
        if entry.seq != self.last_seq + 1 {
            return false;
        }
        self.push(entry, now);
        true
    }

    /// Entries after `after`, at most `max_entries` and about `max_bytes`; `None` if the
    /// backlog no longer holds `after + 1`.
    pub fn entries_after(
        &self,
        after: u64,
        max_entries: usize,
        max_bytes: usize,
    ) -> Option<Vec<Entry>> {
        if after < self.first_held().saturating_sub(1) {
            return None;
        }
        let mut out = Vec::new();
        let mut bytes = 0;
        let skip = (after + 1).saturating_sub(self.first_held()) as usize;
        for h in self.backlog.iter().skip(skip) {
            if out.len() >= max_entries || (bytes > 0 && bytes + h.entry.change.len() > max_bytes) {
                break;
            }
            bytes += h.entry.change.len();
            out.push(h.entry.clone());
        }
        Some(out)
    }

    /// When the entry at `seq` was appended here, if held.
    pub fn appended_at(&self, seq: u64) -> Option<Instant> {
        let first = self.first_held();
        if seq < first {
            return None;
        }
        self.backlog.get((seq - first) as usize).map(|h| h.at)
    }

    /// Entries after `seq` that this log holds (a diverged suffix being dropped).
    pub fn held_after(&self, seq: u64) -> impl Iterator<Item = &Entry> {
        self.backlog
            .iter()
            .map(|h| &h.entry)
            .filter(move |e| e.seq > seq)
    }

    /// The last sequence number `epoch` wrote in this log's history, if known.
    fn end_of_epoch(&self, epoch: u64) -> Option<u64> {
        if epoch == 0 {
            return Some(0);
        }
        let i = self.history.iter().position(|&(e, _)| e == epoch)?;
        Some(match self.history.get(i + 1) {
            Some(&(_, next_first)) => next_first - 1,
            None => self.last_seq,
        })
        .map(|end| end.min(self.last_seq))
    }

    /// Where a follower whose log ends at `(last_seq, last_epoch)` stands.
    pub fn position_of(&self, last_seq: u64, last_epoch: u64) -> Position {
        match self.end_of_epoch(last_epoch) {
            Some(end) if last_seq <= end && last_seq + 1 >= self.first_held() => Position::Resume {
                from_seq: last_seq + 1,
            },
            Some(end) => Position::Snapshot {
                common: end.min(last_seq),
            },
            None => Position::Snapshot { common: 0 },
        }
    }

    /// After a snapshot taken at `(seq, epoch)` with `history`: the log ends there, empty.
    pub fn reset(&mut self, seq: u64, epoch: u64, history: &[(u64, u64)]) {
        self.backlog.clear();
        self.backlog_bytes = 0;
        self.last_seq = seq;
        self.last_epoch = epoch;
        self.history = history
            .iter()
            .copied()
            .filter(|&(_, f)| f <= seq.max(1))
            .collect();
        self.trim_history();
    }

    /// Adopts the master's history after a partial sync (this log is a prefix of its).
    pub fn adopt_history(&mut self, history: &[(u64, u64)]) {
        self.history = history.to_vec();
        self.trim_history();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn log_with(epochs: &[(u64, u64)]) -> ChangeLog {
        // epochs: (epoch, entries written)
        let mut l = ChangeLog::new(100, 1 << 20);
        for &(e, n) in epochs {
            l.begin_epoch(e);
            for _ in 0..n {
                l.append(e, vec![0; 4], Instant::ZERO);
            }
        }
        l
    }

    #[test]
    fn resume_divergence_and_backlog() {
        let m = log_with(&[(1, 5), (3, 4)]); // seqs 1-5 by epoch 1, 6-9 by epoch 3
        assert_eq!(m.history(), &[(1, 1), (3, 6)]);
        assert_eq!(m.position_of(0, 0), Position::Resume { from_seq: 1 });
        assert_eq!(m.position_of(5, 1), Position::Resume { from_seq: 6 });
        assert_eq!(m.position_of(8, 3), Position::Resume { from_seq: 9 });
        // An old master of epoch 1 that wrote 7 entries: 6 and 7 were never the new log's.
        assert_eq!(m.position_of(7, 1), Position::Snapshot { common: 5 });
        // An epoch this log never saw (a deposed candidate's, or older than the history).
        assert_eq!(m.position_of(6, 2), Position::Snapshot { common: 0 });
        let e = m.entries_after(5, 2, 1 << 20).unwrap();
        assert_eq!(
            e.iter().map(|e| (e.seq, e.epoch)).collect::<Vec<_>>(),
            vec![(6, 3), (7, 3)]
        );
        assert_eq!(m.entries_after(9, 10, 100).unwrap().len(), 0);

        let mut small = ChangeLog::new(3, 1 << 20);
        small.begin_epoch(1);
        for _ in 0..10 {
            small.append(1, vec![1], Instant::ZERO);
        }
        assert_eq!(small.first_held(), 8);
        assert!(small.entries_after(6, 10, 100).is_none());
        assert_eq!(small.entries_after(7, 10, 100).unwrap().len(), 3);
        assert_eq!(small.position_of(3, 1), Position::Snapshot { common: 3 });
    }

    #[test]
    fn promotion_trims_foreign_history() {
        // A slave that adopted a history whose later epoch it never received entries of.
        let mut s = log_with(&[(1, 3)]);
        s.adopt_history(&[(1, 1), (2, 4)]);
        s.begin_epoch(4);
        assert_eq!(s.history(), &[(1, 1), (4, 4)]);
        assert_eq!(s.position_of(3, 1), Position::Resume { from_seq: 4 });
    }
}
