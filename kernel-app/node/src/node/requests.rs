//! This node's own requests (lookup, put, get): started, retried, completed.

use super::*;

impl<S: Sealer> Node<S> {
    // ---- internals: own requests ----

    pub(super) fn start_request(
        &mut self,
        now: Instant,
        key: Key,
        kind: PendingKind,
    ) -> Result<OpId, RequestError> {
        if self.phase != Phase::Joined {
            return Err(RequestError::NotJoined);
        }
        if self.pending.len() >= MAX_PENDING {
            return Err(RequestError::Busy);
        }
        let op = OpId(self.next_op);
        self.next_op += 1;
        let nonce = self.rng.next_u64();
        self.pending.push(Pending {
            op,
            nonce,
            key,
            kind,
            deadline: now.plus_ms(self.timing.request_timeout_ms),
            attempts_left: self.timing.request_attempts - 1,
        });
        self.launch(now, self.pending.len() - 1);
        Ok(op)
    }

    pub(super) fn launch(&mut self, now: Instant, i: usize) {
        let p = &self.pending[i];
        let body = match &p.kind {
            PendingKind::Lookup => RoutedBody::Lookup,
            PendingKind::Put { value, opts, .. } => RoutedBody::Put {
                value: value.clone(),
                expected: opts.expected,
                copies: opts.copies,
            },
            PendingKind::Get => RoutedBody::Get,
        };
        let r = Routed {
            nonce: p.nonce,
            key: p.key,
            origin: self.me,
            path: vec![self.me.id],
            body,
        };
        self.route(now, r);
    }

    pub(super) fn expire_pending(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.pending.len() {
            if self.pending[i].deadline > now {
                i += 1;
                continue;
            }
            if self.pending[i].attempts_left == 0 || self.phase != Phase::Joined {
                let p = self.pending.swap_remove(i);
                let (op, key) = (p.op, p.key);
                let event = match p.kind {
                    PendingKind::Lookup => Event::RequestFailed {
                        op,
                        key,
                        kind: RequestKind::Lookup,
                    },
                    PendingKind::Put { last_error, .. } => Event::PutFailed {
                        op,
                        key,
                        error: last_error.unwrap_or(PutError::Timeout),
                    },
                    PendingKind::Get => Event::RequestFailed {
                        op,
                        key,
                        kind: RequestKind::Get,
                    },
                };
                self.emit(event);
                continue;
            }
            let nonce = self.rng.next_u64();
            let p = &mut self.pending[i];
            p.attempts_left -= 1;
            p.nonce = nonce;
            p.deadline = now.plus_ms(self.timing.request_timeout_ms);
            self.launch(now, i);
            i += 1;
        }
    }

    pub(super) fn complete(&mut self, nonce: u64, key: Key, root: Contact, reply: Reply) {
        let Some(i) = self
            .pending
            .iter()
            .position(|p| p.nonce == nonce && p.key == key)
        else {
            return; // a late or duplicate answer
        };
        if let (PendingKind::Put { last_error, .. }, Reply::PutRefused(e @ PutError::NoQuorum)) =
            (&mut self.pending[i].kind, &reply)
        {
            // No majority this time: the retry at the deadline may find one.
            *last_error = Some(*e);
            return;
        }
        let p = self.pending.swap_remove(i);
        let event = match (p.kind, reply) {
            (PendingKind::Lookup, Reply::Lookup(path)) => Event::LookupDone {
                op: p.op,
                key,
                root,
                path,
            },
            (PendingKind::Put { .. }, Reply::PutRefused(error)) => Event::PutFailed {
                op: p.op,
                key,
                error,
            },
            (PendingKind::Put { .. }, Reply::Put(version)) => Event::PutDone {
                op: p.op,
                key,
                root,
                version,
            },
            (PendingKind::Get, Reply::Get(value)) => Event::GetDone {
                op: p.op,
                key,
                root,
                value,
            },
            (kind, _) => {
                // An answer of the wrong kind: keep waiting.
                self.counters.ignored += 1;
                self.pending.push(Pending { kind, ..p });
                return;
            }
        };
        self.emit(event);
    }
}

pub(super) enum Reply {
    Lookup(Vec<NodeId>),
    Put(u64),
    PutRefused(PutError),
    Get(Option<Vec<u8>>),
}
