//! DHT records held here: re-replication to the replica set, handoff of records this node is
//! no longer a replica for, and writes (put, compare-and-set) decided and acknowledged by a
//! majority of the key's replica set.

use super::*;

impl<S: Sealer> Node<S> {
    // ---- internals: records ----

    pub(super) fn records_changed(&mut self, now: Instant) {
        if !self.store.is_empty() {
            // Batch the changes of the next moments into one pass.
            self.timers.record_pass = self.timers.record_pass.min(now.plus_ms(100));
        }
    }

    /// One bounded step of re-replication: push each record to the replica-set members that
    /// have not confirmed it; drop records this node no longer needs to hold.
    pub(super) fn record_pass(&mut self, now: Instant) {
        let keys = self.store.keys_after(self.record_cursor, RECORD_BATCH);
        for key in &keys {
            self.replicate_key(now, *key);
        }
        if keys.len() < RECORD_BATCH {
            self.record_cursor = None;
            self.timers.record_pass = now.plus_ms(self.jitter(self.timing.record_refresh_ms));
        } else {
            self.record_cursor = keys.last().copied();
            self.timers.record_pass = now.plus_ms(1);
        }
    }

    /// How long a root works on one write: less than the origin's attempt, so a `NoQuorum`
    /// answer reaches the origin before it retries.
    fn write_timeout_ms(&self) -> u64 {
        (self.timing.request_timeout_ms * 3 / 4).max(1)
    }

    /// The copies a record keeps: its writer's choice clamped to what the leaf set can
    /// place (`L/2 + 1`), or this node's `k`.
    pub(super) fn copies_of(&self, copies: u8) -> usize {
        match copies {
            0 => self.replicas,
            c => (c as usize).min(self.leaf.capacity() / 2 + 1),
        }
    }

    /// Copies that make a majority of a replica set of `k` (2 of 3).
    pub(super) fn majority(k: usize) -> usize {
        k / 2 + 1
    }

    /// The `k` nodes closest to `key` among this node, its leaf set and the nodes it saw fail
    /// within `quorum_memory_ms`. Counting the failed (or unreachable) ones keeps a partition side that holds
    /// fewer than a majority of the key's real replicas from making a majority of its own.
    pub(super) fn quorum_set(&self, now: Instant, key: Key, k: usize) -> Vec<Contact> {
        let mut all: Vec<Contact> = Vec::with_capacity(self.leaf.len() + self.graveyard.len() + 1);
        all.push(self.me);
        let memory_ms = self.timing.quorum_memory_ms;
        let remembered = self
            .graveyard
            .iter()
            .filter(|(_, failed)| now.millis_since(*failed) < memory_ms)
            .map(|(c, _)| c);
        for c in self.leaf.contacts().chain(remembered) {
            if !all.iter().any(|x| x.id == c.id) {
                all.push(*c);
            }
        }
        all.sort_by_key(|c| (key.distance(c.id), c.id));
        all.truncate(k);
        all
    }

    /// A put or compare-and-set arrived at this root: run it now, or after the write of the
    /// same key already running.
    pub(super) fn begin_write(
        &mut self,
        now: Instant,
        key: Key,
        nonce: u64,
        origin: Contact,
        value: Vec<u8>,
        opts: WriteOptions,
    ) {
        if self.writes.iter().any(|w| w.key == key && w.nonce == nonce) {
            return; // a duplicate of a write in progress
        }
        if self.writes.len() >= MAX_PENDING {
            self.counters.writes_without_quorum += 1;
            let error = PutError::NoQuorum;
            self.answer(origin, Message::PutRefused { nonce, key, error });
            return;
        }
        let busy = self.writes.iter().any(|w| w.key == key);
        self.writes.push(RootWrite {
            key,
            nonce,
            origin,
            value,
            opts,
            round: self.rng.next_u64(),
            quorum_set: Vec::new(),
            phase: WritePhase::Queued,
            expires: now.plus_ms(self.write_timeout_ms()),
        });
        if !busy {
            let i = self.writes.len() - 1;
            self.query_versions(now, i);
        }
    }

    /// Phase one: ask the key's replica set which versions they hold.
    fn query_versions(&mut self, now: Instant, i: usize) {
        let key = self.writes[i].key;
        let set = self.quorum_set(now, key, self.copies_of(self.writes[i].opts.copies));
        let mut held = Vec::new();
        if set.iter().any(|c| c.id == self.me.id) {
            held.push((self.me.id, self.store.get(key).map_or(0, |r| r.version)));
        }
        let round = self.writes[i].round;
        let expires = now.plus_ms(self.write_timeout_ms());
        let w = &mut self.writes[i];
        w.quorum_set = set.iter().map(|c| c.id).collect();
        w.phase = WritePhase::Querying { held };
        w.expires = expires;
        let me = self.me.id;
        for c in set.iter().filter(|c| c.id != me) {
            self.send(c.addr, Message::VersionQuery { key, round });
        }
        self.decide_version(now, key, round);
    }

    /// A replica-set member answered phase one.
    pub(super) fn version_held(
        &mut self,
        now: Instant,
        from: NodeId,
        key: Key,
        round: u64,
        version: u64,
    ) {
        let Some(w) = self
            .writes
            .iter_mut()
            .find(|w| w.key == key && w.round == round)
        else {
            return; // late, or a forged round
        };
        if !w.quorum_set.contains(&from) {
            return;
        }
        if let WritePhase::Querying { held } = &mut w.phase
            && !held.iter().any(|(id, _)| *id == from)
        {
            held.push((from, version));
        }
        self.decide_version(now, key, round);
    }

    /// With a majority's versions: refuse a compare-and-set that expects another one, or store
    /// the next version here and send it to the replica set (phase two).
    fn decide_version(&mut self, now: Instant, key: Key, round: u64) {
        let Some(i) = self
            .writes
            .iter()
            .position(|w| w.key == key && w.round == round)
        else {
            return;
        };
        let majority = Self::majority(self.copies_of(self.writes[i].opts.copies));
        let WritePhase::Querying { held } = &self.writes[i].phase else {
            return;
        };
        if held.len() < majority {
            return;
        }
        let current = held.iter().map(|(_, v)| *v).max().unwrap_or(0);
        if let Some(expected) = self.writes[i].opts.expected
            && expected != current
        {
            self.counters.writes_mismatched += 1;
            self.finish_write(
                now,
                i,
                Message::PutRefused {
                    nonce: self.writes[i].nonce,
                    key,
                    error: PutError::VersionMismatch { current },
                },
            );
            return;
        }
        let mine = self.store.get(key).map_or(0, |r| r.version);
        let version = current.max(mine) + 1;
        let value = core::mem::take(&mut self.writes[i].value);
        let copies = self.writes[i].opts.copies;
        if self.store.accept(key, version, &value, copies).is_err() {
            self.counters.records_refused += 1;
            self.finish_write(
                now,
                i,
                Message::PutRefused {
                    nonce: self.writes[i].nonce,
                    key,
                    error: PutError::StoreFull,
                },
            );
            return;
        }
        self.store.confirm(key, version, self.me.id);
        self.writes[i].phase = WritePhase::Storing { version };
        self.replicate_key(now, key);
        self.check_write_acks(now, key);
    }

    /// Acknowledges the write of `key` once a majority of its replica set holds its version
    /// (or a newer one).
    pub(super) fn check_write_acks(&mut self, now: Instant, key: Key) {
        let Some(rec) = self.store.get(key) else {
            return;
        };
        let Some(i) = self.writes.iter().position(|w| {
            w.key == key
                && matches!(w.phase, WritePhase::Storing { version } if version <= rec.version)
        }) else {
            return;
        };
        let w = &self.writes[i];
        let majority = Self::majority(self.copies_of(w.opts.copies));
        let held = rec
            .confirmed
            .iter()
            .filter(|id| w.quorum_set.contains(id))
            .count();
        if held < majority {
            return;
        }
        let WritePhase::Storing { version } = w.phase else {
            return;
        };
        let ack = Message::PutAck {
            nonce: w.nonce,
            key,
            version,
        };
        self.finish_write(now, i, ack);
    }

    /// Ends write `i` with `reply` to its origin and starts the next write of its key.
    fn finish_write(&mut self, now: Instant, i: usize, reply: Message) {
        let w = self.writes.remove(i);
        self.answer(w.origin, reply);
        if let Some(next) = self
            .writes
            .iter()
            .position(|x| x.key == w.key && x.phase == WritePhase::Queued)
        {
            self.query_versions(now, next);
        }
    }

    /// Writes past their deadline end with `NoQuorum` (the origin may retry).
    pub(super) fn expire_writes(&mut self, now: Instant) {
        while let Some(i) = self.writes.iter().position(|w| w.expires <= now) {
            self.counters.writes_without_quorum += 1;
            let w = &self.writes[i];
            let refusal = Message::PutRefused {
                nonce: w.nonce,
                key: w.key,
                error: PutError::NoQuorum,
            };
            self.finish_write(now, i, refusal);
        }
    }

    pub(super) fn replicate_key(&mut self, now: Instant, key: Key) {
        if !self.leaf.covers(key) {
            // Not ours to place: hand it to the root, which answers `HandoffAck`.
            let Some(rec) = self.store.get(key) else {
                return;
            };
            let body = RoutedBody::Handoff {
                version: rec.version,
                value: rec.value.clone(),
                copies: rec.copies,
            };
            let r = Routed {
                nonce: self.rng.next_u64(),
                key,
                origin: self.me,
                path: vec![self.me.id],
                body,
            };
            self.route(now, r);
            return;
        }
        let Some(copies) = self.store.get(key).map(|r| r.copies) else {
            return;
        };
        let set = self.leaf.replica_set(key, self.copies_of(copies));
        let me = self.me.id;
        let Some(rec) = self.store.get_mut(key) else {
            return;
        };
        rec.confirmed.retain(|h| set.contains(h));
        let missing: Vec<NodeId> = set
            .iter()
            .copied()
            .filter(|id| *id != me && !rec.confirmed.contains(id))
            .collect();
        if !set.contains(&me) && missing.is_empty() {
            // Handed off: every replica-set member has confirmed a copy.
            self.store.remove(key);
            return;
        }
        let (version, value) = (rec.version, rec.value.clone());
        for id in missing {
            if let Some(m) = self.leaf.members().iter().find(|m| m.contact.id == id) {
                let addr = m.contact.addr;
                self.send(
                    addr,
                    Message::Store {
                        key,
                        version,
                        value: value.clone(),
                        copies,
                    },
                );
            }
        }
    }
}
