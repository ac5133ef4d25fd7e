//! One job message from a peer, handled: capacity, dispatch and delegation, leases,
//! completions, reduce contributions, chunk traffic.

use super::*;

impl JobAgent {
    // ---- messages ----

    pub(super) fn dispatch(
        &mut self,
        now: Instant,
        ov: &mut impl Overlay,
        from: Contact,
        msg: JobMessage,
    ) {
        // Heard from: not failed after all (or back), so its leases are kept on takeover.
        self.failed_peers.retain(|(id, _)| *id != from.id);
        match msg {
            JobMessage::Capacity { apps, slots, free } => {
                let mut mask = 0u8;
                for a in &apps {
                    if let Some(i) = self.learn_app(a) {
                        mask |= 1 << i;
                    }
                }
                if self.capacity.len() >= MAX_CAPACITY_ENTRIES
                    && !self.capacity.contains_key(&from.id)
                {
                    // Forget the stalest entry.
                    if let Some(old) = self
                        .capacity
                        .iter()
                        .min_by_key(|(_, e)| e.heard)
                        .map(|(k, _)| *k)
                    {
                        self.capacity.remove(&old);
                    }
                }
                self.capacity.insert(
                    from.id,
                    CapacityEntry {
                        contact: from,
                        apps_mask: mask,
                        free: free.min(slots),
                        heard: now,
                    },
                );
            }
            JobMessage::Dispatch {
                task,
                attempt,
                record,
                may_delegate,
            } => self.on_dispatch(now, ov, from, task, attempt, record, may_delegate),
            JobMessage::Delegate {
                token,
                signature,
                supervisor,
                record,
            } => {
                let task = record.id();
                let me = self.me.id;
                match self.guard.check(
                    self.auth.as_ref(),
                    &token,
                    &signature,
                    me,
                    record.job,
                    task,
                    now,
                ) {
                    Ok(()) if token.delegator == from.id => {
                        self.counters.delegations_accepted += 1;
                        self.on_dispatch(now, ov, supervisor, task, token.attempt, record, false);
                    }
                    _ => {
                        self.counters.delegations_refused += 1;
                        self.send(
                            supervisor,
                            JobMessage::DispatchReply {
                                task,
                                attempt: token.attempt,
                                reply: DispatchReply::Refused,
                            },
                        );
                    }
                }
            }
            JobMessage::DispatchReply {
                task,
                attempt,
                reply,
            } => {
                let lease_ms = self.cfg.lease_ms;
                self.with_supervision(now, ov, task, |me, s| {
                    let TaskState::Running { leases, results } = &mut s.rec.state else {
                        return;
                    };
                    let Some(i) = leases
                        .iter()
                        .position(|l| l.executor.id == from.id && l.attempt == attempt)
                    else {
                        me.counters.stale_reports += 1;
                        return;
                    };
                    match reply {
                        DispatchReply::Accepted => {
                            set_deadline(&mut s.deadlines, from.id, now.plus_ms(lease_ms));
                            s.tried.clear();
                        }
                        DispatchReply::Delegated { to } => {
                            leases[i].executor = to;
                            s.deadlines.retain(|(id, _)| *id != from.id);
                            s.deadlines.push((to.id, now.plus_ms(lease_ms)));
                            s.dirty = true;
                        }
                        DispatchReply::Busy | DispatchReply::NoApp | DispatchReply::Refused => {
                            leases.remove(i);
                            if leases.is_empty() && results.is_empty() {
                                s.rec.state = TaskState::Pending;
                            }
                            s.deadlines.retain(|(id, _)| *id != from.id);
                            if s.tried.len() < 16 {
                                s.tried.push(from.id);
                            }
                            if let Some(e) = me.capacity.get_mut(&from.id) {
                                e.free = 0;
                                if reply == DispatchReply::NoApp {
                                    e.apps_mask = 0;
                                }
                            }
                            s.dirty = true;
                        }
                    }
                });
            }
            JobMessage::Renew { task, attempt } => {
                let lease_ms = self.cfg.lease_ms;
                let mut reply = None;
                let known = self.with_supervision(now, ov, task, |me, s| match &s.rec.state {
                    TaskState::Running { leases, .. }
                        if leases
                            .iter()
                            .any(|l| l.executor.id == from.id && l.attempt == attempt) =>
                    {
                        set_deadline(&mut s.deadlines, from.id, now.plus_ms(lease_ms));
                    }
                    st if st.is_final() => reply = Some(JobMessage::CompleteAck { task, attempt }),
                    _ => {
                        me.counters.stale_reports += 1;
                        reply = Some(JobMessage::Revoke { task, attempt });
                    }
                });
                if let (true, Some(r)) = (known, reply) {
                    self.send(from, r);
                }
            }
            JobMessage::Cancel { task } => {
                self.with_supervision(now, ov, task, |me, s| {
                    if s.rec.state.is_final() {
                        return;
                    }
                    if let TaskState::Running { leases, .. } = &s.rec.state {
                        for l in leases.clone() {
                            me.send(
                                l.executor,
                                JobMessage::Revoke {
                                    task,
                                    attempt: l.attempt,
                                },
                            );
                        }
                    }
                    me.finish(s, TaskState::Failed(TaskFailure::Cancelled));
                });
            }
            JobMessage::Revoke { task, attempt } => {
                if self
                    .executions
                    .get(&task)
                    .is_some_and(|e| e.attempt == attempt)
                {
                    self.end_execution(&*ov, task);
                }
            }
            JobMessage::Adopt { task, attempt } => {
                if let Some(e) = self.executions.get_mut(&task)
                    && e.attempt == attempt
                {
                    e.supervisor = from;
                    e.heard = now;
                    e.next_renew = now;
                    e.next_report = now;
                }
            }
            JobMessage::Complete {
                task,
                attempt,
                outputs,
                output_hash: hash,
            } => {
                if output_hash(&outputs) != hash {
                    self.counters.undecodable += 1;
                    return;
                }
                let known = self.with_supervision(now, ov, task, |me, s| {
                    me.on_complete(s, from.id, attempt, outputs, hash);
                });
                if known {
                    self.send(from, JobMessage::CompleteAck { task, attempt });
                }
            }
            JobMessage::TaskFailed {
                task,
                attempt,
                error,
            } => {
                let known = self.with_supervision(now, ov, task, |me, s| {
                    let holds = matches!(&s.rec.state, TaskState::Running { leases, .. }
                        if leases.iter().any(|l| l.executor.id == from.id && l.attempt == attempt));
                    if holds {
                        me.finish(s, TaskState::Failed(TaskFailure::App(error)));
                    } else if !s.rec.state.is_final() {
                        me.counters.stale_reports += 1;
                    }
                });
                if known {
                    self.send(from, JobMessage::CompleteAck { task, attempt });
                }
            }
            JobMessage::CompleteAck { task, attempt } => {
                if self
                    .executions
                    .get(&task)
                    .is_some_and(|e| e.attempt <= attempt)
                {
                    self.end_execution(&*ov, task);
                }
            }
            JobMessage::Contribute {
                job,
                user,
                app,
                partition,
                maps,
                map,
                chunk,
                replicas,
            } => {
                if maps == 0
                    || map >= maps
                    || maps as usize > MAX_INPUTS
                    || partition as usize >= MAX_PARTS
                {
                    self.counters.undecodable += 1;
                    return;
                }
                let task = task_id(job, REDUCE_BASE + partition as u16);
                if !ov.is_root(task) {
                    return; // the sender retries with a fresh lookup
                }
                if !self.supervised.contains_key(&task) && !self.take_over(now, ov, task) {
                    // First map output for this partition: spawn the reduce task here.
                    let rec = reduce_record(job, &user, &app, partition, maps, replicas);
                    self.supervised.insert(
                        task,
                        Supervision {
                            rec,
                            deadlines: Vec::new(),
                            tried: Vec::new(),
                            contributed: 0,
                            next_contribute: now,
                            dirty: true,
                            put_op: None,
                            version: 0,
                            announce: None,
                        },
                    );
                    self.emit(JobEvent::ReduceSpawned { job, task });
                }
                self.with_supervision(now, ov, task, |me, s| {
                    match s.rec.inputs.get_mut(map as usize) {
                        Some(slot @ None) => {
                            *slot = Some(chunk);
                            s.dirty = true;
                        }
                        Some(Some(c)) if *c != chunk => me.counters.late_disagreements += 1,
                        _ => {}
                    }
                });
                self.send(
                    from,
                    JobMessage::ContributeAck {
                        job,
                        partition,
                        map,
                    },
                );
            }
            JobMessage::ContributeAck {
                job,
                partition,
                map,
            } => {
                let task = task_id(job, map as u16);
                if let Some(s) = self.supervised.get_mut(&task)
                    && (partition as usize) < MAX_PARTS
                {
                    s.contributed |= 1 << partition;
                }
            }
            JobMessage::ChunkPut {
                id,
                data,
                replicate,
                copies,
            } => match self.chunks.insert(id, &data) {
                Ok(()) => {
                    self.chunks.set_copies(id, copies);
                    if let Some(h) = self.chunks.held_mut(id)
                        && !h.confirmed.contains(&from.id)
                    {
                        h.confirmed.push(from.id);
                    }
                    self.send(from, JobMessage::ChunkStored { id });
                    if replicate && ov.is_root(id) {
                        let copies = self.chunks.copies(id);
                        for c in ov.replica_set(id, self.chunk_copies(id)) {
                            if c.id != self.me.id && c.id != from.id {
                                self.send(
                                    c,
                                    JobMessage::ChunkPut {
                                        id,
                                        data: data.clone(),
                                        replicate: false,
                                        copies,
                                    },
                                );
                            }
                        }
                    }
                    self.chunk_arrived(now, ov, id);
                }
                Err(ChunkError::Full) => self.counters.chunks_refused += 1,
                Err(_) => self.counters.chunks_corrupt += 1,
            },
            JobMessage::ChunkStored { id } => {
                if self.uploads.remove(&id).is_some()
                    && self.chunks.copies(id) != 0
                    && !self.in_chunk_set(ov, id)
                    && !self.fetches.contains_key(&id)
                {
                    // A job that names its replication gets exactly that many copies: the
                    // uploader's own goes once the root holds the chunk.
                    self.chunks.remove(id);
                    return;
                }
                if let Some(h) = self.chunks.held_mut(id)
                    && !h.confirmed.contains(&from.id)
                    && h.confirmed.len() < 16
                {
                    h.confirmed.push(from.id);
                }
            }
            JobMessage::ChunkWant { id } => {
                let reply = match self.chunks.get(id) {
                    Some(d) => JobMessage::ChunkData {
                        id,
                        data: d.to_vec(),
                        copies: self.chunks.copies(id),
                    },
                    None => JobMessage::ChunkMissing { id },
                };
                self.send(from, reply);
            }
            JobMessage::ChunkData { id, data, copies } => {
                if !self.fetches.contains_key(&id) && self.chunks.contains(id) {
                    return;
                }
                match self.chunks.insert(id, &data) {
                    Ok(()) => {
                        self.chunks.set_copies(id, copies);
                        self.chunk_arrived(now, ov, id)
                    }
                    Err(ChunkError::Full) => {
                        self.counters.chunks_refused += 1;
                        // Still hand a client's fetch its verified bytes.
                        if Key::for_content(&data) == id
                            && self.fetches.get(&id).is_some_and(|f| f.for_client)
                        {
                            self.fetches.remove(&id);
                            self.emit(JobEvent::ChunkFetched { id, data });
                        }
                    }
                    Err(_) => self.counters.chunks_corrupt += 1,
                }
            }
            JobMessage::ChunkMissing { .. } => {}
            JobMessage::ChunkOffer { id, copies } => {
                if self.chunks.contains(id) {
                    self.chunks.set_copies(id, copies);
                    self.send(from, JobMessage::ChunkStored { id });
                } else if ov
                    .replica_set(id, self.copies_or_cluster(copies))
                    .iter()
                    .any(|c| c.id == self.me.id)
                {
                    self.send(from, JobMessage::ChunkWant { id });
                }
            }
        }
    }

    pub(super) fn on_complete(
        &mut self,
        s: &mut Supervision,
        from: NodeId,
        attempt: u8,
        outputs: Vec<ChunkId>,
        hash: Key,
    ) {
        if outputs.len() != s.rec.spec.kind.parts() {
            self.counters.stale_reports += 1;
            return;
        }
        match &mut s.rec.state {
            TaskState::Done { output_hash, .. } => {
                if *output_hash != hash {
                    self.counters.late_disagreements += 1;
                }
            }
            TaskState::Running { leases, results } => {
                // A completion counts even from an executor whose lease ran out meanwhile:
                // the task is deterministic and its outputs are stored.
                let _ = attempt;
                if results.iter().any(|r| r.executor == from) {
                    return;
                }
                leases.retain(|l| l.executor.id != from);
                s.deadlines.retain(|(id, _)| *id != from);
                results.push(ExecResult {
                    executor: from,
                    outputs,
                    output_hash: hash,
                });
                s.dirty = true;
                if results.len() >= s.rec.exec_copies as usize {
                    let first = &results[0];
                    let agree = results.iter().all(|r| r.output_hash == first.output_hash);
                    let state = if agree {
                        TaskState::Done {
                            outputs: first.outputs.clone(),
                            output_hash: first.output_hash,
                            verified: results.len() >= 2,
                        }
                    } else {
                        TaskState::Disputed {
                            hashes: results.iter().map(|r| r.output_hash).collect(),
                        }
                    };
                    self.finish(s, state);
                }
            }
            TaskState::Pending => {
                // Every lease ran out, yet a late executor finished: register it.
                s.rec.state = TaskState::Running {
                    leases: Vec::new(),
                    results: Vec::new(),
                };
                self.on_complete(s, from, attempt, outputs, hash);
            }
            TaskState::Disputed { .. } | TaskState::Failed(_) => {}
        }
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) fn on_dispatch(
        &mut self,
        now: Instant,
        ov: &mut impl Overlay,
        supervisor: Contact,
        task: TaskId,
        attempt: u8,
        record: TaskRecord,
        may_delegate: bool,
    ) {
        let reply = |reply| JobMessage::DispatchReply {
            task,
            attempt,
            reply,
        };
        if record.id() != task || !record.inputs_ready() {
            self.counters.undecodable += 1;
            return;
        }
        if let Some(e) = self.executions.get_mut(&task) {
            // A repeated or newer dispatch of a task already here: keep working on it.
            e.attempt = e.attempt.max(attempt);
            e.supervisor = supervisor;
            e.heard = now;
            self.send(supervisor, reply(DispatchReply::Accepted));
            return;
        }
        if !self.apps.has(&record.spec.app) {
            let target = if may_delegate && self.cfg.delegation {
                self.capable(now, &record.spec.app)
            } else {
                None
            };
            let Some(to) = target else {
                self.send(supervisor, reply(DispatchReply::NoApp));
                return;
            };
            let token = DelegationToken {
                job: record.job,
                task,
                attempt,
                user: record.user.clone(),
                delegator: self.me.id,
                target: to.id,
                expires_us: now.plus_ms(self.cfg.delegation_ttl_ms).as_micros(),
                nonce: self.rng.next_u64(),
            };
            let signature = self.auth.sign(&token.signed_bytes());
            self.counters.delegations_sent += 1;
            self.send(
                to,
                JobMessage::Delegate {
                    token,
                    signature,
                    supervisor,
                    record,
                },
            );
            self.send(supervisor, reply(DispatchReply::Delegated { to }));
            return;
        }
        if self.executions.len() >= self.cfg.slots as usize {
            self.send(supervisor, reply(DispatchReply::Busy));
            return;
        }
        self.executions.insert(
            task,
            Execution {
                attempt,
                rec: record,
                supervisor,
                phase: Phase::Fetching,
                next_renew: now.plus_ms(self.cfg.renew_ms),
                next_report: now,
                heard: now,
            },
        );
        self.send(supervisor, reply(DispatchReply::Accepted));
        self.advance(now, ov, task);
    }

    /// The nearest node known to have `app` and a free slot.
    pub(super) fn capable(&self, now: Instant, app: &str) -> Option<Contact> {
        let mask = self.app_mask_of(app)?;
        self.capacity
            .values()
            .filter(|e| {
                e.apps_mask & mask != 0
                    && e.free > 0
                    && now.millis_since(e.heard) <= self.cfg.advert_ms * 4
            })
            .min_by_key(|e| {
                (
                    e.contact.server != self.me.server,
                    self.me.id.distance(e.contact.id),
                )
            })
            .map(|e| e.contact)
    }
}
