//! The submitter's side, for the Application Agent: storing inputs and task records,
//! cancelling, fetching outputs.

use super::*;

impl JobAgent {
    // ---- commands ----

    /// Stores a job's inputs and task records (through this node); `Submitted` follows once
    /// every record is stored.
    pub fn submit(
        &mut self,
        now: Instant,
        ov: &mut impl Overlay,
        s: &Submission,
    ) -> Result<JobId, SubmitError> {
        if !ov.is_joined() {
            return Err(SubmitError::NotJoined);
        }
        let mut tasks = Vec::with_capacity(s.tasks.len());
        for (params, inputs) in &s.tasks {
            let mut ids = Vec::with_capacity(inputs.len());
            for d in inputs {
                ids.push(
                    self.store_input(now, d)
                        .map_err(|_| SubmitError::OutOfBounds)?,
                );
            }
            tasks.push((params.clone(), ids));
        }
        let req = SubmitRequest {
            name: s.name.clone(),
            app: s.app.clone(),
            nonce: s.nonce,
            tasks,
            reducers: s.reducers,
            exec_copies: s.exec_copies,
            replication: s.replication,
            only: None,
        };
        self.submit_stored(now, ov, &s.user, &req)
    }

    /// Keeps an input chunk here and uploads it to its root (which keeps `replicas` copies).
    pub fn store_input(&mut self, now: Instant, data: &[u8]) -> Result<ChunkId, ChunkError> {
        let id = Key::for_content(data);
        self.chunks.insert(id, data)?;
        self.uploads.insert(id, Upload { next_try: now });
        Ok(id)
    }

    /// Stores the task records of a job whose inputs were stored with [`Self::store_input`];
    /// `Submitted` follows once every record is stored. The same user, name and nonce name the
    /// same job: submitting it again rewrites only records that are not already stored.
    pub fn submit_stored(
        &mut self,
        now: Instant,
        ov: &mut impl Overlay,
        user: &str,
        s: &SubmitRequest,
    ) -> Result<JobId, SubmitError> {
        if !ov.is_joined() {
            return Err(SubmitError::NotJoined);
        }
        let n = s.tasks.len();
        let bounded = n > 0
            && n <= u16::from(u8::MAX) as usize + 1
            && user.len() <= MAX_USER
            && (1..=MAX_EXEC_COPIES).contains(&s.exec_copies)
            && (s.reducers as usize) <= MAX_PARTS
            && (s.reducers == 0 || n <= MAX_INPUTS);
        if !bounded {
            return Err(SubmitError::OutOfBounds);
        }
        if let Some((_, ids)) = s
            .tasks
            .iter()
            .find(|(_, ids)| ids.iter().any(|id| !self.chunks.contains(*id)))
        {
            let missing = ids.iter().find(|id| !self.chunks.contains(**id));
            log::debug!("submission refused: input {missing:?} not stored here");
            return Err(SubmitError::MissingInput);
        }
        if self.record_puts.len() + n + 1 > MAX_OUTSTANDING {
            return Err(SubmitError::Busy);
        }
        let job = job_id(user, &s.name, s.nonce);
        if s.replication != 0 {
            // Inputs were stored (and maybe uploaded) before the job named its copies: tell
            // their roots again, with the job's count.
            for (_, ids) in &s.tasks {
                for id in ids {
                    self.chunks.set_copies(*id, s.replication);
                    self.uploads.insert(*id, Upload { next_try: now });
                }
            }
        }
        let kind = if s.reducers > 0 {
            TaskKind::Map {
                reducers: s.reducers,
            }
        } else {
            TaskKind::Single
        };
        let mut records = Vec::new();
        for (i, (params, ids)) in s.tasks.iter().enumerate() {
            let spec = TaskSpec {
                app: s.app.clone(),
                kind,
                params: params.clone(),
            };
            let mut rec = TaskRecord::new(job, i as u16, user, spec, ids.clone());
            rec.exec_copies = s.exec_copies;
            rec.replicas = s.replication;
            if s.reducers > 0 {
                rec.maps = n as u8;
            }
            let value = rec.encode().ok_or(SubmitError::OutOfBounds)?;
            if s.only.as_ref().is_none_or(|o| o.contains(&(i as u16))) {
                records.push((rec.id(), value));
            }
        }
        let jr = JobRecord {
            name: s.name.clone(),
            user: user.into(),
            app: s.app.clone(),
            tasks: n as u16,
            reducers: s.reducers,
            exec_copies: s.exec_copies,
        };
        records.push((job, jr.encode().ok_or(SubmitError::OutOfBounds)?));
        self.jobs_in_submission.insert(job, records.len());
        for (key, value) in records {
            self.record_puts.insert(
                key,
                RecordPut {
                    job,
                    value,
                    copies: s.replication,
                    op: None,
                    checking: false,
                    next_try: now,
                },
            );
        }
        self.tick(now, ov);
        Ok(job)
    }

    /// Cancels a job's tasks: each task's root marks its record failed (`Cancelled`) unless it
    /// is already final, and revokes the executors' leases. Answers how many tasks were asked.
    pub fn cancel(&mut self, now: Instant, ov: &mut impl Overlay, tasks: &[TaskId]) -> usize {
        for &task in tasks {
            self.send_to_root(now, ov, task, JobMessage::Cancel { task });
        }
        self.tick(now, ov);
        tasks.len()
    }

    /// Fetches a chunk (outputs, for the AA); completes with `ChunkFetched`.
    pub fn fetch_chunk(&mut self, now: Instant, ov: &mut impl Overlay, id: ChunkId) {
        if let Some(d) = self.chunks.get(id) {
            let data = d.to_vec();
            self.emit(JobEvent::ChunkFetched { id, data });
            return;
        }
        self.fetches.insert(
            id,
            Fetch {
                next_try: now,
                for_client: true,
            },
        );
        self.tick(now, ov);
    }
}
