//! The executor: fetching a task's inputs, handing out work, storing outputs, reporting and
//! renewing the lease.

use super::*;

impl JobAgent {
    // ---- executor ----

    /// Moves an execution along as far as it goes without waiting.
    pub(super) fn advance(&mut self, now: Instant, ov: &mut impl Overlay, task: TaskId) {
        let Some(e) = self.executions.get_mut(&task) else {
            return;
        };
        match &e.phase {
            Phase::Fetching => {
                let missing: Vec<ChunkId> = e
                    .rec
                    .inputs
                    .iter()
                    .flatten()
                    .copied()
                    .filter(|c| !self.chunks.contains(*c))
                    .collect();
                if missing.is_empty() {
                    let inputs: Vec<Vec<u8>> = e
                        .rec
                        .inputs
                        .iter()
                        .flatten()
                        .filter_map(|c| self.chunks.get(*c).map(<[u8]>::to_vec))
                        .collect();
                    let id = self.next_work_id;
                    self.next_work_id += 1;
                    e.phase = Phase::Queued(id);
                    self.counters.works_started += 1;
                    self.work.push_back(Work {
                        id,
                        task,
                        spec: e.rec.spec.clone(),
                        inputs,
                    });
                } else {
                    for c in missing {
                        self.fetches.entry(c).or_insert(Fetch {
                            next_try: now,
                            for_client: false,
                        });
                    }
                }
            }
            Phase::Storing { outputs } if outputs.iter().all(|o| !self.uploads.contains_key(o)) => {
                e.phase = Phase::Reporting {
                    outputs: outputs.clone(),
                };
                e.next_report = now;
            }
            _ => {}
        }
        let _ = ov;
    }

    pub(super) fn step_executions(&mut self, now: Instant, ov: &mut impl Overlay) {
        let tasks: Vec<TaskId> = self.executions.keys().copied().collect();
        for task in tasks {
            self.advance(now, ov, task);
            let Some(e) = self.executions.get_mut(&task) else {
                continue;
            };
            let (to, attempt) = (e.supervisor, e.attempt);
            let mut out = Vec::new();
            if now >= e.next_renew {
                e.next_renew = now.plus_ms(self.cfg.renew_ms);
                out.push(JobMessage::Renew { task, attempt });
            }
            let reporting = matches!(
                e.phase,
                Phase::Reporting { .. } | Phase::ReportingFailure(_)
            );
            if reporting && now >= e.next_report {
                e.next_report = now.plus_ms(self.cfg.retry_ms);
                match &e.phase {
                    Phase::Reporting { outputs } => out.push(JobMessage::Complete {
                        task,
                        attempt,
                        outputs: outputs.clone(),
                        output_hash: output_hash(outputs),
                    }),
                    Phase::ReportingFailure(error) => out.push(JobMessage::TaskFailed {
                        task,
                        attempt,
                        error: *error,
                    }),
                    _ => {}
                }
            }
            let abandon = reporting && now.millis_since(e.heard) > self.cfg.abandon_ms;
            for m in out {
                self.send(to, m);
            }
            if abandon {
                log::debug!("abandoning task {task:?}: no supervisor answers");
                self.end_execution(&*ov, task);
            }
        }
    }

    /// An execution is over (reported, revoked or abandoned): its fetched inputs go too when
    /// their job named its copies and this node is not one of them.
    pub(super) fn end_execution(&mut self, ov: &impl Overlay, task: TaskId) {
        let Some(e) = self.executions.remove(&task) else {
            return;
        };
        for id in e.rec.inputs.iter().flatten() {
            let still_needed = self.fetches.contains_key(id)
                || self.uploads.contains_key(id)
                || self
                    .executions
                    .values()
                    .any(|x| x.rec.inputs.contains(&Some(*id)));
            if self.chunks.copies(*id) != 0 && !still_needed && !self.in_chunk_set(ov, *id) {
                self.chunks.remove(*id);
            }
        }
    }

    pub(super) fn chunk_arrived(&mut self, now: Instant, ov: &mut impl Overlay, id: ChunkId) {
        if let Some(f) = self.fetches.remove(&id)
            && f.for_client
            && let Some(d) = self.chunks.get(id)
        {
            let data = d.to_vec();
            self.emit(JobEvent::ChunkFetched { id, data });
        }
        let waiting: Vec<TaskId> = self
            .executions
            .iter()
            .filter(|(_, e)| e.phase == Phase::Fetching && e.rec.inputs.contains(&Some(id)))
            .map(|(t, _)| *t)
            .collect();
        for t in waiting {
            self.advance(now, ov, t);
        }
    }
}
