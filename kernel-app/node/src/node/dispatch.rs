//! One decoded overlay message from a peer, handled.

use super::*;

impl<S: Sealer> Node<S> {
    // ---- internals: messages ----

    /// Handles one decoded message; returns whether it answered the sender with our leaf set.
    pub(super) fn dispatch(
        &mut self,
        now: Instant,
        sender: Contact,
        sender_joined: bool,
        message: Message,
        gained: &mut Vec<(Contact, bool)>,
    ) -> bool {
        match message {
            Message::Ping { echo } => {
                if let Some(echo) = echo {
                    self.send(sender.addr, Message::Pong { echo });
                }
            }
            Message::Pong { echo } => {
                let rtt = now
                    .as_micros()
                    .checked_sub(echo)
                    .filter(|r| *r < 60_000_000);
                if let Some(rtt) = rtt {
                    let rtt = rtt as u32;
                    if let Some(m) = self.leaf.get_mut(sender.id) {
                        m.rtt_us = Some(rtt);
                    }
                    self.table.set_rtt(sender.id, rtt);
                    self.directory_pong(sender.id, rtt);
                    if sender_joined {
                        self.table.offer(sender, Some(rtt));
                        self.hood.offer(sender, Some(rtt));
                    }
                }
            }
            Message::LeafSet { kind, members } => {
                self.announce_answered(sender.id);
                if kind == LeafKind::Announce {
                    // It restarted (or is new): whatever we believed it stored is gone.
                    self.store.forget_holder(sender.id);
                    self.records_changed(now);
                }
                for c in members {
                    self.learn(now, c, false, gained);
                }
                if matches!(kind, LeafKind::Exchange | LeafKind::Announce)
                    && self.phase == Phase::Joined
                {
                    self.send_leaf_set(sender.addr, LeafKind::Push);
                    return true;
                }
            }
            Message::RowRequest { row } => {
                let entries = self.table.row(row as usize);
                self.send(sender.addr, Message::Row { row, entries });
            }
            Message::Row { entries, .. } => {
                for c in entries {
                    self.learn(now, c, false, gained);
                }
            }
            Message::Leave { members } => {
                self.fail_peer(now, sender.id);
                for c in members {
                    self.learn(now, c, false, gained);
                }
            }
            Message::Routed(r) => {
                self.send(sender.addr, Message::RouteAck { nonce: r.nonce });
                if self.phase != Phase::Joined {
                    self.counters.ignored += 1;
                } else {
                    self.route(now, r);
                }
            }
            Message::RouteAck { nonce } => {
                self.in_flight
                    .retain(|f| !(f.routed.nonce == nonce && f.next.id == sender.id));
            }
            Message::JoinReply { nonce, members } => {
                for c in members {
                    self.learn(now, c, false, gained);
                }
                if self.phase == Phase::Joining && nonce == self.join_nonce {
                    self.become_joined(now);
                    // The announce went to every member, gained ones included.
                    gained.clear();
                }
            }
            Message::LookupReply { nonce, key, path } => {
                self.complete(nonce, key, sender, Reply::Lookup(path));
            }
            Message::PutAck {
                nonce,
                key,
                version,
            } => {
                self.complete(nonce, key, sender, Reply::Put(version));
            }
            Message::GetReply {
                nonce, key, value, ..
            } => {
                self.complete(nonce, key, sender, Reply::Get(value));
            }
            Message::Store {
                key,
                version,
                value,
                copies,
            } => match self.store.accept(key, version, &value, copies) {
                Ok(_) => {
                    self.store.confirm(key, version, sender.id);
                    self.store.confirm(key, version, self.me.id);
                    self.send(sender.addr, Message::StoreAck { key, version });
                    self.records_changed(now);
                }
                Err(StoreError::Stale) => {
                    // Tell it what we hold instead, so it stops pushing the old one.
                    if let Some(r) = self.store.get(key) {
                        let version = r.version;
                        self.send(sender.addr, Message::StoreAck { key, version });
                    }
                }
                Err(StoreError::Full) => self.counters.records_refused += 1,
            },
            Message::StoreAck { key, version } => {
                self.store.confirm(key, version, sender.id);
                self.check_write_acks(now, key);
            }
            Message::PutRefused { nonce, key, error } => {
                self.complete(nonce, key, sender, Reply::PutRefused(error));
            }
            Message::VersionQuery { key, round } => {
                let version = self.store.get(key).map_or(0, |r| r.version);
                self.send(
                    sender.addr,
                    Message::VersionHeld {
                        key,
                        round,
                        version,
                    },
                );
            }
            Message::VersionHeld {
                key,
                round,
                version,
            } => self.version_held(now, sender.id, key, round, version),
            Message::DirectoryQuery {
                nonce,
                key,
                origin,
                requirement,
                k,
                level,
                extend,
                budget,
            } => {
                if self.phase == Phase::Joined {
                    let walk = directory::ArcWalk {
                        nonce,
                        key,
                        origin,
                        requirement,
                        k,
                        level,
                    };
                    self.directory_query(now, walk, extend, budget);
                }
            }
            reply @ Message::DirectoryReply { .. } => self.directory_reply(now, sender, reply),
            Message::HandoffAck { key, version } => {
                if !self.leaf.covers(key)
                    && self.store.get(key).is_some_and(|r| r.version <= version)
                {
                    self.store.remove(key);
                }
            }
        }
        false
    }
}
