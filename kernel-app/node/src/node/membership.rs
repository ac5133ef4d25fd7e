//! Joining and keeping membership: the join exchange, leaf-set repair, keepalives and failure
//! detection, routing-table refresh, and probing recently failed nodes.

use super::*;

impl<S: Sealer> Node<S> {
    // ---- internals: membership ----

    pub(super) fn become_joined(&mut self, now: Instant) {
        self.phase = Phase::Joined;
        self.timers.join = None;
        self.timers.record_pass = self.timers.record_pass.min(now.plus_ms(200));
        // It routes from now on, but counts itself a member (`Event::Joined`) once its nearest
        // neighbour on each side has answered its announce (MSPastry's activation): until
        // then they still answer, as roots, for keys that are now ours. Bounded by a hop
        // timeout, so a lost answer only delays the event.
        self.awaiting_announce.clear();
        for c in [
            self.leaf.successors().first(),
            self.leaf.predecessors().first(),
        ]
        .into_iter()
        .flatten()
        {
            if !self.awaiting_announce.contains(&c.id) {
                self.awaiting_announce.push(c.id);
            }
        }
        if self.awaiting_announce.is_empty() {
            self.activate();
        } else {
            self.timers.activation = Some(now.plus_ms(self.timing.hop_timeout_ms));
        }
        log::debug!("{:?} joined, leaf set {}", self.me.id, self.leaf.len());
        let members: Vec<Contact> = self.leaf.contacts().copied().collect();
        for c in members {
            self.send_leaf_set(c.addr, LeafKind::Announce);
        }
    }

    /// A leaf-set message from `from`: if it is a neighbour our announce waits for, it knows
    /// us now.
    pub(super) fn announce_answered(&mut self, from: NodeId) {
        if self.timers.activation.is_none() {
            return;
        }
        self.awaiting_announce.retain(|id| *id != from);
        if self.awaiting_announce.is_empty() {
            self.activate();
        }
    }

    /// Reports `Event::Joined` (once per join).
    pub(super) fn activate(&mut self) {
        self.timers.activation = None;
        self.awaiting_announce.clear();
        self.emit(Event::Joined);
    }

    pub(super) fn send_join(&mut self, now: Instant) {
        if self.bootstrap.is_empty() {
            return;
        }
        let to = self.bootstrap[self.next_bootstrap % self.bootstrap.len()];
        self.next_bootstrap = self.next_bootstrap.wrapping_add(1);
        self.join_nonce = self.rng.next_u64();
        self.counters.join_attempts += 1;
        let routed = Routed {
            nonce: self.join_nonce,
            key: self.me.id,
            origin: self.me,
            path: vec![self.me.id],
            body: RoutedBody::Join,
        };
        self.send(to, Message::Routed(routed));
        self.timers.join = Some(now.plus_ms(self.jitter(self.timing.join_timeout_ms)));
    }

    /// Notes a packet from `sender`: it is alive. Joined senders are offered to the tables.
    pub(super) fn heard_from(
        &mut self,
        now: Instant,
        sender: Contact,
        joined: bool,
        gained: &mut Vec<(Contact, bool)>,
    ) {
        if let Some(m) = self.leaf.get_mut(sender.id) {
            m.last_heard = now;
            m.missed_acks = 0;
            m.contact.addr = sender.addr;
        }
        if joined {
            self.graveyard.retain(|(c, _)| c.id != sender.id);
            self.learn(now, sender, true, gained);
        }
    }

    /// Offers a node to leaf set, routing table and neighbourhood set. Hearsay (`direct ==
    /// false`) about a recently failed node is ignored, so the dead do not come back through
    /// peers that have not noticed yet.
    pub(super) fn learn(
        &mut self,
        now: Instant,
        c: Contact,
        direct: bool,
        gained: &mut Vec<(Contact, bool)>,
    ) {
        if c.id == self.me.id || self.phase == Phase::Left {
            return;
        }
        if !direct && self.graveyard.iter().any(|(g, _)| g.id == c.id) {
            return;
        }
        let mut evicted = Vec::new();
        let heard = if direct {
            now
        } else {
            let grace = self.timing.leaf_fail_ms - self.timing.hearsay_grace_ms;
            Instant::from_micros(now.as_micros().saturating_sub(grace * 1000))
        };
        if self.leaf.insert(c, heard, &mut evicted) {
            gained.push((c, direct));
            self.records_changed(now);
        }
        for e in evicted {
            self.table.offer(e, None);
        }
        let rtt = self
            .leaf
            .members()
            .iter()
            .find(|m| m.contact.id == c.id)
            .and_then(|m| m.rtt_us);
        if self.table.offer(c, rtt) == Offer::NeedsRtt && direct {
            self.maybe_probe_proximity(now, c);
        }
        if c.server == self.me.server {
            self.hood.offer(c, rtt);
        }
    }

    pub(super) fn maybe_probe_proximity(&mut self, now: Instant, c: Contact) {
        let due = self
            .last_proximity_probe
            .is_none_or(|t| now.millis_since(t) >= self.timing.proximity_probe_ms);
        if due {
            self.last_proximity_probe = Some(now);
            self.send(
                c.addr,
                Message::Ping {
                    echo: Some(now.as_micros()),
                },
            );
        }
    }

    /// Sends our leaf set to members we just gained (except `skip`, already answered).
    /// Members gained on hearsay get a probe instead: its answer proves them alive, and a node
    /// that gains us in turn pushes its own leaf set back.
    pub(super) fn welcome(
        &mut self,
        now: Instant,
        gained: &[(Contact, bool)],
        skip: Option<NodeId>,
    ) {
        for (c, direct) in gained {
            if Some(c.id) == skip || !self.leaf.contains(c.id) {
                continue;
            }
            if *direct {
                self.send_leaf_set(c.addr, LeafKind::Push);
            } else {
                self.send(
                    c.addr,
                    Message::Ping {
                        echo: Some(now.as_micros()),
                    },
                );
            }
        }
    }

    /// Removes a node believed dead from every table; repairs the leaf set from the far end of
    /// the side it was on.
    pub(super) fn fail_peer(&mut self, now: Instant, id: NodeId) {
        let was_leaf = self.leaf.remove(id);
        let in_table = self.table.contains(id);
        let contact = was_leaf.as_ref().map(|m| m.contact).or_else(|| {
            self.table
                .entries()
                .find(|e| e.contact.id == id)
                .map(|e| e.contact)
        });
        self.table.remove(id);
        self.hood.remove(id);
        self.store.forget_holder(id);
        if let Some(c) = contact {
            self.bury(now, c);
        }
        if let Some(m) = was_leaf {
            self.counters.leaf_failures += 1;
            self.emit(Event::PeerFailed { id });
            self.directory_peer_failed(id);
            log::debug!("{:?}: leaf member {:?} failed", self.me.id, id);
            self.records_changed(now);
            // Ask the far end of the side that lost a member for its leaf set: it knows the
            // nodes beyond. (Only members really on that side: a side short of members also
            // lists the far end of the other side, wrapping round.)
            let own = self.me.id;
            let on_cw_side = |id: Id| own.cw_distance(id) <= id.cw_distance(own);
            let cw = on_cw_side(m.contact.id);
            let side = if cw {
                self.leaf.successors()
            } else {
                self.leaf.predecessors()
            };
            if let Some(far) = side.iter().rev().find(|c| on_cw_side(c.id) == cw) {
                self.send_leaf_set(far.addr, LeafKind::Exchange);
            }
        } else if in_table {
            self.refresh_row_of(id);
        }
    }

    pub(super) fn bury(&mut self, now: Instant, c: Contact) {
        self.graveyard.retain(|(g, _)| g.id != c.id);
        if self.graveyard.len() >= MAX_GRAVEYARD {
            self.graveyard.remove(0);
        }
        self.graveyard.push((c, now));
    }

    /// Asks another entry of the row that lost `id` for its row (Pastry's table repair).
    pub(super) fn refresh_row_of(&mut self, id: NodeId) {
        let Some((row, _)) = self.table.slot_of(id) else {
            return;
        };
        let entries = self.table.row(row);
        if entries.is_empty() {
            return;
        }
        let pick = entries[self.rng.below(entries.len() as u64) as usize];
        self.send(pick.addr, Message::RowRequest { row: row as u8 });
    }

    pub(super) fn keepalive(&mut self, now: Instant) {
        let t = self.timing;
        let silent: Vec<NodeId> = self
            .leaf
            .members()
            .iter()
            .filter(|m| now.millis_since(m.last_heard) > t.leaf_fail_ms)
            .map(|m| m.contact.id)
            .collect();
        for id in silent {
            self.fail_peer(now, id);
        }
        let pings: Vec<(PeerAddr, bool)> = self
            .leaf
            .members()
            .iter()
            .map(|m| {
                let probe =
                    m.rtt_us.is_none() || now.millis_since(m.last_heard) > t.leaf_probe_after_ms;
                (m.contact.addr, probe)
            })
            .collect();
        for (addr, probe) in pings {
            let echo = probe.then_some(now.as_micros());
            self.send(addr, Message::Ping { echo });
        }
        if self.leaf.is_empty() && !self.bootstrap.is_empty() && self.timers.join.is_none() {
            // Cut off from everyone: rejoin through the bootstrap nodes.
            self.send_join(now);
        }
    }

    /// Table maintenance: ask a table entry of row r for its row r (it shares r digits with
    /// us, so its row fills ours). Every other time also ask a near neighbour for its row 0
    /// (the Registrar): those entries were chosen near it, hence near us.
    pub(super) fn refresh_table(&mut self) {
        let rows = self.table.rows();
        if rows == 0 {
            return;
        }
        let near = self.hood.members().len();
        if near > 0 && self.rng.below(2) == 0 {
            let pick = self.hood.members()[self.rng.below(near as u64) as usize].contact;
            self.send(pick.addr, Message::RowRequest { row: 0 });
        }
        let row = self.rng.below(rows as u64) as usize;
        let entries = self.table.row(row);
        if entries.is_empty() {
            return;
        }
        let pick = entries[self.rng.below(entries.len() as u64) as usize];
        self.send(pick.addr, Message::RowRequest { row: row as u8 });
    }

    pub(super) fn probe_graveyard(&mut self, now: Instant) {
        let keep_ms = self.timing.graveyard_ms;
        self.graveyard
            .retain(|(_, t)| now.millis_since(*t) < keep_ms);
        if self.graveyard.is_empty() {
            return;
        }
        let i = self.rng.below(self.graveyard.len() as u64) as usize;
        let addr = self.graveyard[i].0.addr;
        self.send(
            addr,
            Message::Ping {
                echo: Some(now.as_micros()),
            },
        );
    }
}
