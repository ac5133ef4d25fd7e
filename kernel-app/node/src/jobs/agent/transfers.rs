//! Transfers, retried until done: chunk uploads and fetches, task-record puts, chunk repair
//! (the Data Manager's `k` copies).

use super::*;

impl JobAgent {
    // ---- transfers: uploads, fetches, record puts ----

    pub(super) fn step_transfers(&mut self, now: Instant, ov: &mut impl Overlay) {
        let retry = self.cfg.retry_ms;
        let due: Vec<ChunkId> = self
            .uploads
            .iter()
            .filter(|(_, u)| now >= u.next_try)
            .map(|(k, _)| *k)
            .take(64)
            .collect();
        for id in due {
            let Some(data) = self.chunks.get(id).map(<[u8]>::to_vec) else {
                self.uploads.remove(&id);
                continue;
            };
            if let Some(u) = self.uploads.get_mut(&id) {
                u.next_try = now.plus_ms(retry);
            }
            let copies = self.chunks.copies(id);
            self.send_to_root(
                now,
                ov,
                id,
                JobMessage::ChunkPut {
                    id,
                    data,
                    replicate: true,
                    copies,
                },
            );
        }
        let due: Vec<ChunkId> = self
            .fetches
            .iter()
            .filter(|(_, f)| now >= f.next_try)
            .map(|(k, _)| *k)
            .take(64)
            .collect();
        for id in due {
            if let Some(f) = self.fetches.get_mut(&id) {
                f.next_try = now.plus_ms(retry);
            }
            // The nearest holder: when the chunk's key is near this node (it is in the replica
            // set), the nearest other member of the set; else the root, found by lookup.
            let rs = ov.replica_set(id, self.chunk_copies(id));
            let near = rs
                .iter()
                .filter(|c| c.id != self.me.id)
                .min_by_key(|c| ov.proximity(c))
                .copied();
            if let Some(c) = near.filter(|_| rs.iter().any(|c| c.id == self.me.id)) {
                self.send(c, JobMessage::ChunkWant { id });
                continue;
            }
            self.send_to_root(now, ov, id, JobMessage::ChunkWant { id });
        }
        let due: Vec<Key> = self
            .record_puts
            .iter()
            .filter(|(_, r)| r.op.is_none() && now >= r.next_try)
            .map(|(k, _)| *k)
            .take(64)
            .collect();
        for key in due {
            let r = self.record_puts.get(&key).expect("listed");
            let res = if r.checking {
                ov.get(now, key)
            } else {
                // Created only where absent: a late retry cannot overwrite what a supervisor
                // wrote since.
                ov.put_if(now, key, &r.value.clone(), 0, r.copies)
            };
            match res {
                Ok(op) => {
                    self.record_ops.insert(op, key);
                    if let Some(r) = self.record_puts.get_mut(&key) {
                        r.op = Some(op);
                    }
                }
                Err(_) => {
                    self.counters.busy_drops += 1;
                    if let Some(r) = self.record_puts.get_mut(&key) {
                        r.next_try = now.plus_ms(retry);
                    }
                }
            }
        }
    }

    pub(super) fn record_stored(&mut self, key: Key) {
        let Some(r) = self.record_puts.remove(&key) else {
            return;
        };
        if let Some(n) = self.jobs_in_submission.get_mut(&r.job) {
            *n -= 1;
            if *n == 0 {
                self.jobs_in_submission.remove(&r.job);
                self.emit(JobEvent::Submitted { job: r.job });
            }
        }
    }

    /// Chunk upkeep: a root offers its chunks to replica-set members not known to hold them;
    /// any other holder offers to the root (which pulls what it lacks).
    pub(super) fn repair(&mut self, ov: &mut impl Overlay) {
        let ids = self.chunks.ids_after(self.repair_cursor, REPAIR_BATCH);
        self.repair_cursor = ids.last().copied();
        for id in ids {
            let rs = ov.replica_set(id, self.chunk_copies(id));
            let copies = self.chunks.copies(id);
            let Some(h) = self.chunks.held_mut(id) else {
                continue;
            };
            // A member that restarted keeps its id but not its chunks, so confirmations only
            // last one pass: every pass offers again (offers are small).
            h.confirmed.clear();
            let targets: Vec<Contact> = if ov.is_root(id) {
                rs.iter()
                    .filter(|c| c.id != self.me.id && !h.confirmed.contains(&c.id))
                    .copied()
                    .collect()
            } else {
                rs.first()
                    .filter(|root| !h.confirmed.contains(&root.id))
                    .copied()
                    .into_iter()
                    .collect()
            };
            for c in targets {
                self.send(c, JobMessage::ChunkOffer { id, copies });
            }
        }
    }
}
