//! Routing: the Pastry next hop, forwarding with hop acknowledgements and reroutes, and
//! delivery at the key's root.

use super::*;

impl<S: Sealer> Node<S> {
    // ---- internals: routing ----

    /// Routes `r` one hop on from this node (appending it to the path), or delivers it here.
    pub(super) fn route(&mut self, now: Instant, mut r: Routed) {
        if r.path.last() != Some(&self.me.id) {
            if r.path.contains(&self.me.id) {
                self.counters.loops_avoided += 1;
                return;
            }
            if r.path.len() >= MAX_PATH {
                self.counters.routing_drops += 1;
                return;
            }
            r.path.push(self.me.id);
        }
        if matches!(r.body, RoutedBody::Directory(_)) {
            // Examined at every directory node on the way, routed by prefix (directory.rs).
            self.directory_hop(now, r);
            return;
        }
        let key = r.key;
        // A joining node is never its own root, even if an old incarnation is still listed.
        let skip_key = matches!(r.body, RoutedBody::Join);
        let excluded = |id: Id| skip_key && id == key;
        let next = if self.leaf.covers(key) {
            match self.leaf.closest(key, excluded) {
                None => None,
                Some(c) if r.path.contains(&c.id) => {
                    self.counters.loops_avoided += 1;
                    return;
                }
                Some(c) => Some(c),
            }
        } else {
            self.next_by_prefix(key, &r.path, excluded)
        };
        match next {
            None => self.deliver(now, r),
            Some(c) => self.forward(now, r, c, 0),
        }
    }

    /// The Pastry hop when the leaf set does not cover `key`: of all known nodes, one sharing
    /// the longest prefix with the key, if longer than ours (the routing-table entry, chosen for
    /// proximity, wins ties; a longer prefix found elsewhere saves hops); else Pastry's rare
    /// case, a node with as long a prefix and numerically closer; else any node numerically
    /// closer. Never a node on the path.
    pub(super) fn next_by_prefix(
        &self,
        key: Key,
        path: &[Id],
        excluded: impl Fn(Id) -> bool,
    ) -> Option<Contact> {
        let usable = |id: Id| !path.contains(&id) && !excluded(id);
        let own_prefix = self.me.id.shared_prefix_len(key);
        let own_dist = key.distance(self.me.id);
        let table_hop = self
            .table
            .next_hop(key)
            .map(|e| e.contact.id)
            .filter(|id| usable(*id));
        let known = self
            .table
            .entries()
            .map(|e| e.contact)
            .chain(self.leaf.contacts().copied())
            .chain(self.hood.members().iter().map(|e| e.contact));
        // Rank: (prefix-progress class, prefix length, is the table hop, closeness).
        let mut best: Option<((u8, usize, bool, u128), Contact)> = None;
        for c in known {
            if !usable(c.id) {
                continue;
            }
            let prefix = c.id.shared_prefix_len(key);
            let dist = key.distance(c.id);
            let class = if prefix > own_prefix {
                2
            } else if dist < own_dist {
                u8::from(prefix >= own_prefix)
            } else {
                continue;
            };
            let rank = (
                class,
                if class == 2 { prefix } else { 0 },
                Some(c.id) == table_hop,
                u128::MAX - dist,
            );
            if best.is_none_or(|(b, _)| rank > b) {
                best = Some((rank, c));
            }
        }
        best.map(|(_, c)| c)
    }

    pub(super) fn hop_timeout_ms(&self, next: &Contact) -> u64 {
        let rtt = self
            .leaf
            .members()
            .iter()
            .find(|m| m.contact.id == next.id)
            .and_then(|m| m.rtt_us)
            .or_else(|| {
                self.table
                    .entries()
                    .find(|e| e.contact.id == next.id)
                    .and_then(|e| e.rtt_us)
            });
        match rtt {
            Some(us) => (3 * us as u64 / 1000 + 20)
                .clamp(self.timing.hop_timeout_min_ms, self.timing.hop_timeout_ms),
            None => self.timing.hop_timeout_ms,
        }
    }

    pub(super) fn forward(&mut self, now: Instant, r: Routed, next: Contact, reroutes: u8) {
        self.send(next.addr, Message::Routed(r.clone()));
        if self.in_flight.len() >= MAX_IN_FLIGHT {
            // Untracked: delivered without a reroute if the next hop is dead.
            return;
        }
        let deadline = now.plus_ms(self.hop_timeout_ms(&next));
        self.in_flight.push(InFlight {
            routed: r,
            next,
            deadline,
            reroutes,
        });
    }

    pub(super) fn expire_in_flight(&mut self, now: Instant) {
        let mut expired = Vec::new();
        let mut i = 0;
        while i < self.in_flight.len() {
            if self.in_flight[i].deadline <= now {
                expired.push(self.in_flight.swap_remove(i));
            } else {
                i += 1;
            }
        }
        for f in expired {
            self.counters.hop_timeouts += 1;
            self.next_hop_silent(now, f.next.id);
            if f.reroutes >= MAX_REROUTES || self.phase != Phase::Joined {
                self.counters.routing_drops += 1;
                continue;
            }
            // Reroute from here: the path already ends with this node.
            let key = f.routed.key;
            let skip_key = matches!(f.routed.body, RoutedBody::Join);
            let excluded = |id: Id| skip_key && id == key;
            let next = if self.leaf.covers(key) {
                self.leaf.closest(key, excluded)
            } else {
                self.next_by_prefix(key, &f.routed.path, excluded)
            };
            match next {
                Some(c) if f.routed.path.contains(&c.id) => self.counters.loops_avoided += 1,
                Some(c) => self.forward(now, f.routed, c, f.reroutes + 1),
                None => self.deliver(now, f.routed),
            }
        }
    }

    /// A next hop did not acknowledge: drop it from the routing table now; a leaf member gets
    /// a second chance (then is failed), since the leaf set must stay exact.
    pub(super) fn next_hop_silent(&mut self, now: Instant, id: NodeId) {
        if let Some(m) = self.leaf.get_mut(id) {
            m.missed_acks = m.missed_acks.saturating_add(1);
            if m.missed_acks >= MAX_MISSED_ACKS {
                self.fail_peer(now, id);
            } else {
                let addr = m.contact.addr;
                self.send(
                    addr,
                    Message::Ping {
                        echo: Some(now.as_micros()),
                    },
                );
            }
        } else if self.table.contains(id) || self.hood.members().iter().any(|e| e.contact.id == id)
        {
            self.fail_peer(now, id);
        }
    }

    /// This node is the root of `r.key`: serve the request and answer the origin.
    pub(super) fn deliver(&mut self, now: Instant, r: Routed) {
        if matches!(r.body, RoutedBody::Directory(_)) {
            // A reroute found no next hop: the directory decides (here, or by prefix on).
            self.directory_hop(now, r);
            return;
        }
        let kind = match r.body {
            RoutedBody::Lookup => RequestKind::Lookup,
            RoutedBody::Join => RequestKind::Join,
            RoutedBody::Put { .. } => RequestKind::Put,
            RoutedBody::Get => RequestKind::Get,
            RoutedBody::Handoff { .. } => RequestKind::Handoff,
            RoutedBody::Directory(_) => RequestKind::Discover,
        };
        self.emit(Event::Delivered {
            key: r.key,
            origin: r.origin.id,
            kind,
        });
        let origin = r.origin;
        let reply = match r.body {
            RoutedBody::Join => {
                self.send_rows_to_joiner(origin);
                let members: Vec<Contact> = self.leaf.contacts().copied().collect();
                Message::JoinReply {
                    nonce: r.nonce,
                    members,
                }
            }
            RoutedBody::Lookup => Message::LookupReply {
                nonce: r.nonce,
                key: r.key,
                path: r.path,
            },
            RoutedBody::Put {
                value,
                expected,
                copies,
            } => {
                // Two phases with the key's replica set (see `records.rs`); answered from there.
                let opts = WriteOptions { expected, copies };
                self.begin_write(now, r.key, r.nonce, origin, value, opts);
                return;
            }
            RoutedBody::Handoff {
                version,
                value,
                copies,
            } => {
                if self.store.accept(r.key, version, &value, copies) == Err(StoreError::Full) {
                    self.counters.records_refused += 1;
                    return;
                }
                self.store.confirm(r.key, version, self.me.id);
                if self.leaf.covers(r.key) {
                    // (Uncovered, this node is the root by the rare case: keep it, do not
                    // hand it off to itself again.)
                    self.replicate_key(now, r.key);
                }
                let Some(held) = self.store.get(r.key).map(|rec| rec.version) else {
                    return;
                };
                Message::HandoffAck {
                    key: r.key,
                    version: held,
                }
            }
            RoutedBody::Directory(_) => return,
            RoutedBody::Get => {
                let rec = self.store.get(r.key);
                Message::GetReply {
                    nonce: r.nonce,
                    key: r.key,
                    value: rec.map(|x| x.value.clone()),
                    version: rec.map_or(0, |x| x.version),
                }
            }
        };
        self.answer(origin, reply);
    }

    /// Sends a root's answer to the origin, or completes it here if this node is the origin.
    pub(super) fn answer(&mut self, origin: Contact, reply: Message) {
        if origin.id == self.me.id {
            let me = self.me;
            match reply {
                Message::LookupReply { nonce, key, path } => {
                    self.complete(nonce, key, me, Reply::Lookup(path))
                }
                Message::PutAck {
                    nonce,
                    key,
                    version,
                } => self.complete(nonce, key, me, Reply::Put(version)),
                Message::PutRefused { nonce, key, error } => {
                    self.complete(nonce, key, me, Reply::PutRefused(error))
                }
                Message::GetReply {
                    nonce, key, value, ..
                } => self.complete(nonce, key, me, Reply::Get(value)),
                _ => {}
            }
        } else {
            self.send(origin.addr, reply);
        }
    }

    /// Every node a join passes sends the joiner its rows up to the prefix they share.
    pub(super) fn send_rows_to_joiner(&mut self, joiner: Contact) {
        let shared = self.me.id.shared_prefix_len(joiner.id);
        let upto = shared.min(self.table.rows().saturating_sub(1));
        for row in 0..=upto {
            let entries = self.table.row(row);
            if !entries.is_empty() {
                self.send(
                    joiner.addr,
                    Message::Row {
                        row: row as u8,
                        entries,
                    },
                );
            }
        }
    }
}
