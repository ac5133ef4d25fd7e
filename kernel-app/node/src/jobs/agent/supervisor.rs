//! The supervisor of the tasks this node is root for: the periodic tick, capacity adverts,
//! the supervision scan and takeover, placement and leases, the completion registry.

use super::*;

impl JobAgent {
    // ---- the tick ----

    pub(super) fn tick(&mut self, now: Instant, ov: &mut impl Overlay) {
        self.me = ov.contact();
        self.next_tick = now.plus_ms(self.cfg.scan_ms.min(self.cfg.retry_ms).max(1) / 2 + 1);
        if !ov.is_joined() {
            return;
        }
        if now >= self.next_advert {
            self.next_advert = now.plus_ms(self.cfg.advert_ms);
            self.advertise(ov);
        }
        if now >= self.next_scan {
            self.next_scan = now.plus_ms(self.cfg.scan_ms);
            self.scan(now, ov);
        }
        if now >= self.next_repair {
            self.next_repair = now.plus_ms(self.cfg.repair_ms);
            self.repair(ov);
        }
        self.step_executions(now, ov);
        self.step_transfers(now, ov);
        self.drain_loopback(now, ov);
    }

    pub(super) fn advertise(&mut self, ov: &impl Overlay) {
        let free = self.cfg.slots.saturating_sub(self.executions.len() as u8);
        let msg = JobMessage::Capacity {
            apps: self.app_names.clone(),
            slots: self.cfg.slots,
            free,
        };
        for c in ov.neighbours().into_iter().take(64) {
            self.send(c, msg.clone());
        }
    }

    /// Supervision: take over tasks whose root this node became, drop those it no longer is,
    /// and move each supervised task along.
    pub(super) fn scan(&mut self, now: Instant, ov: &mut impl Overlay) {
        let keys = ov.record_keys_after(self.scan_cursor, SCAN_BATCH);
        self.scan_cursor = if keys.len() < SCAN_BATCH {
            None
        } else {
            keys.last().copied()
        };
        for key in keys {
            if self.supervised.contains_key(&key) || !ov.is_root(key) {
                continue;
            }
            self.take_over(now, ov, key);
        }
        let tasks: Vec<TaskId> = self.supervised.keys().copied().collect();
        for t in tasks {
            if !ov.is_root(t) {
                // The new root holds a copy (the overlay re-replicates) and takes over.
                self.supervised.remove(&t);
                continue;
            }
            if let Some(mut s) = self.supervised.remove(&t) {
                // A copy merged in from elsewhere may be further along (e.g. after a partition).
                if let Some(stored) = ov.record(t).and_then(TaskRecord::decode)
                    && stored.state.is_final()
                    && !s.rec.state.is_final()
                {
                    s.rec = stored;
                    s.version = ov.record_version(t).unwrap_or(s.version);
                    s.announce = None;
                }
                // Our copy differs from what we hold (a write of ours still unacknowledged, or
                // a newer record from elsewhere): write ours again; the compare-and-set on
                // `version` refuses it if the record moved on, and the conflict is resolved
                // in `supervision_write_lost`.
                if s.put_op.is_none() && ov.record(t) != s.rec.encode().as_deref() {
                    s.dirty = true;
                }
                self.supervise(now, ov, &mut s);
                self.supervised.insert(t, s);
            }
        }
    }

    pub(super) fn take_over(&mut self, now: Instant, ov: &mut impl Overlay, key: Key) -> bool {
        if self.supervised.len() >= MAX_SUPERVISED {
            self.counters.busy_drops += 1;
            return false;
        }
        let Some(rec) = ov.record(key).and_then(TaskRecord::decode) else {
            return false;
        };
        if rec.id() != key {
            return false;
        }
        let mut s = Supervision {
            rec,
            deadlines: Vec::new(),
            tried: Vec::new(),
            contributed: 0,
            next_contribute: now,
            dirty: false,
            put_op: None,
            version: ov.record_version(key).unwrap_or(0),
            announce: None,
        };
        let lease_ms = self.cfg.lease_ms;
        self.failed_peers
            .retain(|(_, at)| now.millis_since(*at) < lease_ms);
        // Leases held by nodes declared failed end now (as in `executor_failed`).
        let failed = &self.failed_peers;
        self.counters.releases_on_failure +=
            end_leases(&mut s, |e| failed.iter().any(|(id, _)| *id == e)) as u64;
        if let TaskState::Running { leases, .. } = &s.rec.state {
            for l in leases.clone() {
                s.deadlines
                    .push((l.executor.id, now.plus_ms(self.cfg.lease_ms)));
                self.send(
                    l.executor,
                    JobMessage::Adopt {
                        task: key,
                        attempt: l.attempt,
                    },
                );
            }
        }
        log::debug!("supervising task {key:?}");
        self.supervised.insert(key, s);
        true
    }

    pub(super) fn supervise(&mut self, now: Instant, ov: &mut impl Overlay, s: &mut Supervision) {
        // Leases that ran out.
        if let TaskState::Running { leases, results } = &mut s.rec.state {
            let before = leases.len();
            leases.retain(|l| {
                s.deadlines
                    .iter()
                    .find(|(id, _)| *id == l.executor.id)
                    .is_none_or(|(_, d)| *d > now)
            });
            let lost = before - leases.len();
            if lost > 0 {
                self.counters.leases_expired += lost as u64;
                s.rec.attempts = s.rec.attempts.saturating_add(lost as u8);
                s.dirty = true;
                if leases.is_empty() && results.is_empty() {
                    s.rec.state = TaskState::Pending;
                }
            }
            let live: Vec<NodeId> = match &s.rec.state {
                TaskState::Running { leases, .. } => leases.iter().map(|l| l.executor.id).collect(),
                _ => Vec::new(),
            };
            s.deadlines.retain(|(id, _)| live.contains(id));
        }
        if !s.rec.state.is_final() && s.rec.attempts >= self.cfg.max_attempts {
            self.finish(s, TaskState::Failed(TaskFailure::AttemptsExhausted));
        }
        // Placement.
        if s.rec.inputs_ready() && !s.rec.state.is_final() {
            let have = match &s.rec.state {
                TaskState::Running { leases, results } => leases.len() + results.len(),
                _ => 0,
            };
            for _ in have..s.rec.exec_copies as usize {
                if !self.place(now, ov, s) {
                    break;
                }
            }
        }
        // A registered map task feeds the reduce tasks' roots until each acknowledges.
        if let (TaskKind::Map { reducers }, TaskState::Done { outputs, .. }) =
            (s.rec.spec.kind, &s.rec.state)
            && now >= s.next_contribute
        {
            // Contributions are repeated now and then even once acknowledged: a reduce record
            // written on both sides of a partition keeps only one side's inputs.
            let all = (1u16 << reducers) - 1;
            if s.contributed & all == all {
                s.contributed = 0;
                s.next_contribute = now.plus_ms(self.cfg.retry_ms * 20);
            } else {
                s.next_contribute = now.plus_ms(self.cfg.retry_ms);
            }
            let maps = s.rec.maps;
            for p in 0..reducers {
                if s.contributed & (1 << p) != 0 {
                    continue;
                }
                let Some(&chunk) = outputs.get(p as usize) else {
                    continue;
                };
                let msg = JobMessage::Contribute {
                    job: s.rec.job,
                    user: s.rec.user.clone(),
                    app: s.rec.spec.app.clone(),
                    partition: p,
                    maps,
                    map: s.rec.index as u8,
                    chunk,
                    replicas: s.rec.replicas,
                };
                self.send_to_root(now, ov, task_id(s.rec.job, REDUCE_BASE + p as u16), msg);
            }
        }
        if s.dirty && s.put_op.is_none() {
            self.write(now, ov, s);
        }
    }

    /// The overlay declared `id` failed: every lease it holds on a task supervised here ends
    /// now, not when it runs out, and the task is placed again at once (elsewhere: its capacity
    /// advert is forgotten). Were `id` only suspected, its later renewals and reports are
    /// treated exactly like those after an expired lease (stale, revoked, or a late result the
    /// record still takes). `id` is remembered for a lease's time, so a task taken over
    /// meanwhile (its supervisor may have died too, often with its own task) drops its lease.
    pub(super) fn executor_failed(&mut self, now: Instant, ov: &mut impl Overlay, id: NodeId) {
        if id == self.me.id {
            return; // not something an overlay declares; a lease of ours is not ended by it
        }
        self.capacity.remove(&id);
        self.failed_peers.retain(|(f, _)| *f != id);
        if self.failed_peers.len() >= MAX_FAILED_PEERS {
            self.failed_peers.pop_front();
        }
        self.failed_peers.push_back((id, now));
        if !ov.is_joined() {
            return;
        }
        let held: Vec<TaskId> = self
            .supervised
            .iter()
            .filter(|(_, s)| match &s.rec.state {
                TaskState::Running { leases, .. } => leases.iter().any(|l| l.executor.id == id),
                _ => false,
            })
            .map(|(t, _)| *t)
            .collect();
        for t in held {
            let Some(mut s) = self.supervised.remove(&t) else {
                continue;
            };
            self.counters.releases_on_failure += end_leases(&mut s, |e| e == id) as u64;
            log::debug!("task {t:?}: executor {id:?} failed, re-leasing");
            // Attempts, placement and the record write as in a scan.
            self.supervise(now, ov, &mut s);
            self.supervised.insert(t, s);
        }
    }

    /// Leases the task to the nearest node with the app and a free slot (or, knowing none, to
    /// any neighbour allowed to delegate). Returns whether one was found.
    pub(super) fn place(
        &mut self,
        now: Instant,
        ov: &mut impl Overlay,
        s: &mut Supervision,
    ) -> bool {
        let task = s.rec.id();
        let busy: Vec<NodeId> = match &s.rec.state {
            TaskState::Running { leases, results } => leases
                .iter()
                .map(|l| l.executor.id)
                .chain(results.iter().map(|r| r.executor))
                .collect(),
            _ => Vec::new(),
        };
        let fresh = self.cfg.advert_ms * 4;
        let mask = self.app_mask_of(&s.rec.spec.app);
        let mut best: Option<(Contact, bool)> = None;
        let mut best_rank = (u8::MAX, u32::MAX, u128::MAX);
        let me = self.me;
        let my_free = self.cfg.slots.saturating_sub(self.executions.len() as u8);
        let me_entry = CapacityEntry {
            contact: me,
            apps_mask: if self.apps.has(&s.rec.spec.app) { 1 } else { 0 },
            free: my_free,
            heard: now,
        };
        for e in self.capacity.values().chain(core::iter::once(&me_entry)) {
            if e.free == 0
                || now.millis_since(e.heard) > fresh
                || busy.contains(&e.contact.id)
                || s.tried.contains(&e.contact.id)
            {
                continue;
            }
            let has = if e.contact.id == me.id {
                e.apps_mask != 0
            } else {
                mask.is_some_and(|m| e.apps_mask & m != 0)
            };
            if !has {
                continue;
            }
            let (same, rtt) = if e.contact.id == me.id {
                (0, 0)
            } else {
                ov.proximity(&e.contact)
            };
            let rank = (same, rtt, me.id.distance(e.contact.id));
            if rank < best_rank {
                best_rank = rank;
                best = Some((e.contact, false));
            }
        }
        if best.is_none() {
            // Nobody known has the app: a neighbour may know one and delegate.
            let pick: Vec<Contact> = ov
                .neighbours()
                .into_iter()
                .filter(|c| !busy.contains(&c.id) && !s.tried.contains(&c.id))
                .collect();
            if !pick.is_empty() {
                let i = self.rng.below(pick.len() as u64) as usize;
                best = Some((pick[i], true));
            }
        }
        let Some((to, may_delegate)) = best else {
            // Every candidate refused (all were busy at once, e.g. a small cluster): forget the
            // refusals so the next scan asks again instead of leaving the task pending forever.
            s.tried.clear();
            return false;
        };
        if let Some(e) = self.capacity.get_mut(&to.id) {
            e.free = e.free.saturating_sub(1);
        }
        let attempt = s.rec.attempts;
        match &mut s.rec.state {
            TaskState::Running { leases, .. } => leases.push(Lease {
                executor: to,
                attempt,
            }),
            st => {
                *st = TaskState::Running {
                    leases: alloc::vec![Lease {
                        executor: to,
                        attempt,
                    }],
                    results: Vec::new(),
                }
            }
        }
        s.deadlines.push((to.id, now.plus_ms(self.cfg.lease_ms)));
        s.dirty = true;
        let record = s.rec.clone();
        self.send(
            to,
            JobMessage::Dispatch {
                task,
                attempt,
                record,
                may_delegate,
            },
        );
        self.emit(JobEvent::Dispatched { task, to: to.id });
        true
    }

    /// The bit of `app` in adverts' masks as this node sees them (apps are matched by name).
    pub(super) fn app_mask_of(&self, app: &str) -> Option<u8> {
        self.app_index(app).map(|i| 1u8 << i)
    }

    pub(super) fn app_index(&self, app: &str) -> Option<usize> {
        self.known_apps.iter().position(|a| a == app)
    }

    /// Ends a task in `state`. The completion registry's event is announced once the final
    /// record is written (a majority of its replica set holds it), so a supervisor that crashes
    /// before that does not register a task its successor registers again.
    pub(super) fn finish(&mut self, s: &mut Supervision, state: TaskState) {
        let (job, task) = (s.rec.job, s.rec.id());
        s.announce = match &state {
            TaskState::Done {
                output_hash,
                verified,
                ..
            } => Some(JobEvent::TaskRegistered {
                job,
                task,
                output_hash: *output_hash,
                verified: *verified,
            }),
            TaskState::Disputed { hashes } => Some(JobEvent::TaskDisputed {
                job,
                task,
                hashes: hashes.clone(),
            }),
            TaskState::Failed(f) => Some(JobEvent::TaskFailed {
                job,
                task,
                failure: *f,
            }),
            _ => None,
        };
        s.rec.state = state;
        s.deadlines.clear();
        s.dirty = true;
    }

    pub(super) fn write(&mut self, now: Instant, ov: &mut impl Overlay, s: &mut Supervision) {
        let Some(value) = s.rec.encode() else {
            self.counters.records_unencodable += 1;
            s.dirty = false;
            return;
        };
        match ov.put_if(now, s.rec.id(), &value, s.version, s.rec.replicas) {
            Ok(op) => {
                s.dirty = false;
                s.put_op = Some(op);
                self.sup_ops.insert(op, s.rec.id());
                if let Some(e) = &s.announce {
                    self.announce_ops.insert(op, e.clone());
                }
            }
            Err(_) => self.counters.busy_drops += 1,
        }
    }

    /// A supervisor write was refused: `task`'s record is at version `current`, not ours.
    /// Our own earlier try may have landed (an unacknowledged attempt): then it is done. A
    /// newer final record (another supervisor's, registered there) is adopted. Otherwise ours
    /// is written again on top of `current`; and if our copy has not caught up with `current`
    /// the task is given up, to be taken over again from the copy re-replication brings.
    pub(super) fn supervision_write_lost(&mut self, ov: &impl Overlay, task: TaskId, current: u64) {
        let Some(mut s) = self.supervised.remove(&task) else {
            return;
        };
        s.put_op = None;
        self.counters.supervision_conflicts += 1;
        if ov.record_version(task) != Some(current) {
            log::debug!("task {task:?}: record at version {current}, our copy behind; dropped");
            return;
        }
        let ours = s.rec.encode();
        let stored = ov.record(task);
        s.version = current;
        if stored == ours.as_deref() {
            if let Some(e) = s.announce.take() {
                self.emit(e);
            }
        } else if let Some(rec) = stored.and_then(TaskRecord::decode)
            && rec.state.is_final()
        {
            s.rec = rec;
            s.announce = None;
            s.deadlines.clear();
        } else {
            s.dirty = true;
        }
        self.supervised.insert(task, s);
    }

    /// Runs `f` on the supervision of `task`, taking it over first if this node is its root
    /// and holds a copy; writes the record if `f` changed it.
    pub(super) fn with_supervision(
        &mut self,
        now: Instant,
        ov: &mut impl Overlay,
        task: TaskId,
        f: impl FnOnce(&mut Self, &mut Supervision),
    ) -> bool {
        let known = self.supervised.contains_key(&task)
            || (ov.is_root(task) && self.take_over(now, ov, task));
        if !known {
            return false;
        }
        let mut s = self.supervised.remove(&task).expect("present");
        f(self, &mut s);
        if s.dirty && s.put_op.is_none() {
            self.write(now, ov, &mut s);
        }
        self.supervised.insert(task, s);
        true
    }
}

/// Ends every lease of `s` held by an executor `dead` picks, as an expired lease ends (an
/// attempt spent each; back to pending if nothing is left). Returns how many ended.
fn end_leases(s: &mut Supervision, dead: impl Fn(NodeId) -> bool) -> usize {
    let TaskState::Running { leases, results } = &mut s.rec.state else {
        return 0;
    };
    let before = leases.len();
    leases.retain(|l| !dead(l.executor.id));
    let lost = before - leases.len();
    if lost > 0 {
        s.rec.attempts = s.rec.attempts.saturating_add(lost as u8);
        s.dirty = true;
        if leases.is_empty() && results.is_empty() {
            s.rec.state = TaskState::Pending;
        }
        s.deadlines.retain(|(id, _)| !dead(*id));
    }
    lost
}
