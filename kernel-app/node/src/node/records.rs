//! DHT records held here: re-replication to the replica set, handoff of records this node is
//! no longer a replica for, and put acknowledgement once `k` copies exist.

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

    /// Acknowledges the puts of `key` whose version now has `k` confirmed copies.
    pub(super) fn check_put_acks(&mut self, key: Key) {
        let Some(rec) = self.store.get(key) else {
            return;
        };
        if rec.confirmed.len() < self.replicas {
            return;
        }
        let held = rec.version;
        let mut i = 0;
        while i < self.put_acks.len() {
            let p = &self.put_acks[i];
            if p.key == key && p.version <= held {
                let p = self.put_acks.swap_remove(i);
                let ack = Message::PutAck {
                    nonce: p.nonce,
                    key,
                    version: p.version,
                };
                self.answer(p.origin, ack);
            } else {
                i += 1;
            }
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
        let set = self.leaf.replica_set(key, self.replicas);
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
                    },
                );
            }
        }
    }
}
