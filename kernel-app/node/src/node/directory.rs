//! The service directory's glue in the overlay peer: advertising (and refreshing) this node's
//! services, acting as a directory node for routed adverts and lookups, and this node's own
//! discovers (route, collect the arc's answers, probe RTTs, rank). See `crate::directory`.

use super::*;
use crate::directory::Advert;
use crate::directory::{
    AdvertError, Attributes, DirectoryConfig, DirectoryCounters, DirectoryStore, MAX_ANSWER,
    MAX_DISCOVERS, MAX_OWN_ADVERTS, MAX_SERVICE_NAME, Provider, Requirement, select_for,
    service_id,
};
use crate::wire::DirectoryBody;

/// Most providers an asker collects from one discover's answers before ranking.
const MAX_COLLECTED: usize = 4 * MAX_ANSWER;
/// Period of the expiry sweep over the directory's records.
const SWEEP_MS: u64 = 1_000;
/// Most nodes one arc walk asks.
const MAX_WALK: u8 = 96;

/// A lookup walking the arc of a level: what every asked node needs to answer the asker.
#[derive(Clone, Debug)]
pub(super) struct ArcWalk {
    pub(super) nonce: u64,
    pub(super) key: Key,
    pub(super) origin: Contact,
    pub(super) requirement: Requirement,
    pub(super) k: u8,
    pub(super) level: u8,
}

#[derive(Clone, Debug)]
struct OwnAdvert {
    service: Key,
    attrs: Attributes,
    next_send: Instant,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum DiscoverPhase {
    /// Routed; no answer yet.
    Routing,
    /// Some answers in; waiting for the rest of the arc's.
    Collecting,
    /// Measuring RTTs to the candidates.
    Probing,
}

#[derive(Clone, Debug)]
struct PendingDiscover {
    op: OpId,
    nonce: u64,
    service: Key,
    requirement: Requirement,
    k: u8,
    attempts_left: u8,
    phase: DiscoverPhase,
    deadline: Instant,
    /// Answers in so far; nodes the answering ones asked to answer too; whether the routed
    /// answer (the first directory node's) is in: done once every asked node answered.
    answers: u8,
    asked: u8,
    routed_seen: bool,
    level: u8,
    hops: u8,
    found: Vec<Advert>,
    /// RTT per entry of `found` (known, measured, or still unknown).
    rtt_us: Vec<Option<u32>>,
}

/// The directory's part of a node's state.
#[derive(Clone, Debug)]
pub(super) struct DirectoryState {
    config: DirectoryConfig,
    store: DirectoryStore,
    own: Vec<OwnAdvert>,
    discovers: Vec<PendingDiscover>,
    counters: DirectoryCounters,
    next_sweep: Instant,
    last_seq: u64,
}

impl DirectoryState {
    pub(super) fn new() -> Self {
        let config = DirectoryConfig::default();
        DirectoryState {
            config,
            store: DirectoryStore::new(config.max_records),
            own: Vec::new(),
            discovers: Vec::new(),
            counters: DirectoryCounters::default(),
            next_sweep: Instant::ZERO,
            last_seq: 0,
        }
    }

    pub(super) fn heap_bytes(&self) -> usize {
        self.store.len() * (core::mem::size_of::<Advert>() + 64)
            + self.discovers.capacity() * core::mem::size_of::<PendingDiscover>()
    }
}

impl<S: Sealer> Node<S> {
    // ---- directory: settings and state ----

    /// Sets R, M, the TTL and sizes (the cluster's settings; see `DirectoryConfig`).
    pub fn set_directory_config(&mut self, config: DirectoryConfig) {
        self.dir.config = config;
        self.dir.store.set_max(config.max_records);
    }

    pub fn directory_config(&self) -> DirectoryConfig {
        self.dir.config
    }

    /// The adverts this node keeps as a directory node.
    pub fn directory_store(&self) -> &DirectoryStore {
        &self.dir.store
    }

    pub fn directory_counters(&self) -> &DirectoryCounters {
        &self.dir.counters
    }

    // ---- directory: commands ----

    /// Advertises (or updates) this node as a provider of `service`; sent now if joined, and
    /// refreshed every third of the TTL while the node runs.
    pub fn advertise(
        &mut self,
        now: Instant,
        service: &str,
        attrs: Attributes,
    ) -> Result<(), AdvertError> {
        if service.is_empty() || service.len() > MAX_SERVICE_NAME || !attrs.within_bounds() {
            return Err(AdvertError::OverBound);
        }
        let id = service_id(service);
        match self.dir.own.iter_mut().find(|o| o.service == id) {
            Some(o) => {
                if o.attrs != attrs {
                    o.attrs = attrs;
                    o.next_send = now;
                }
            }
            None => {
                if self.dir.own.len() >= MAX_OWN_ADVERTS {
                    return Err(AdvertError::TooMany);
                }
                self.dir.own.push(OwnAdvert {
                    service: id,
                    attrs,
                    next_send: now,
                });
            }
        }
        self.refresh_adverts(now);
        Ok(())
    }

    /// Stops advertising `service` and withdraws the advert from the directory nodes on the
    /// route (the ones it no longer reaches drop it within the TTL).
    pub fn withdraw(&mut self, now: Instant, service: &str) {
        let id = service_id(service);
        let Some(i) = self.dir.own.iter().position(|o| o.service == id) else {
            return;
        };
        let o = self.dir.own.swap_remove(i);
        if self.phase == Phase::Joined {
            self.send_advert(now, o.service, o.attrs, 0);
        }
    }

    /// Looks up `k` providers of `service` meeting `requirement` (see the module doc);
    /// completes with `Event::Discovered` (ranked nearest first) or `RequestFailed`.
    pub fn discover(
        &mut self,
        now: Instant,
        service: &str,
        requirement: Requirement,
        k: u8,
    ) -> Result<OpId, RequestError> {
        if self.phase != Phase::Joined {
            return Err(RequestError::NotJoined);
        }
        if service.len() > MAX_SERVICE_NAME || !requirement.within_bounds() {
            return Err(RequestError::ValueTooLarge);
        }
        if self.dir.discovers.len() >= MAX_DISCOVERS {
            return Err(RequestError::Busy);
        }
        let op = OpId(self.next_op);
        self.next_op += 1;
        let nonce = self.rng.next_u64();
        let d = PendingDiscover {
            op,
            nonce,
            service: service_id(service),
            requirement,
            k: k.clamp(1, MAX_ANSWER as u8),
            attempts_left: self.timing.request_attempts.saturating_sub(1),
            phase: DiscoverPhase::Routing,
            deadline: now.plus_ms(self.timing.request_timeout_ms),
            answers: 0,
            asked: 0,
            routed_seen: false,
            level: 0,
            hops: 0,
            found: Vec::new(),
            rtt_us: Vec::new(),
        };
        self.dir.discovers.push(d);
        self.launch_discover(now, self.dir.discovers.len() - 1);
        Ok(op)
    }

    fn launch_discover(&mut self, now: Instant, i: usize) {
        let d = &self.dir.discovers[i];
        let r = Routed {
            nonce: d.nonce,
            key: d.service,
            origin: self.me,
            path: vec![self.me.id],
            body: RoutedBody::Directory(DirectoryBody::Discover {
                requirement: d.requirement.clone(),
                k: d.k,
            }),
        };
        self.route(now, r);
    }

    fn send_advert(&mut self, now: Instant, service: Key, attrs: Attributes, ttl_ms: u32) {
        let seq = now.as_micros().max(self.dir.last_seq + 1);
        self.dir.last_seq = seq;
        let advert = Advert {
            service,
            provider: self.me,
            attrs,
            ttl_ms,
            seq,
        };
        let r = Routed {
            nonce: self.rng.next_u64(),
            key: service,
            origin: self.me,
            path: vec![self.me.id],
            body: RoutedBody::Directory(DirectoryBody::Advertise(advert)),
        };
        self.route(now, r);
    }

    fn refresh_adverts(&mut self, now: Instant) {
        if self.phase != Phase::Joined {
            return;
        }
        let ttl = self.dir.config.ttl_ms;
        for i in 0..self.dir.own.len() {
            if self.dir.own[i].next_send > now {
                continue;
            }
            let every = self.jitter(u64::from(ttl / 3).max(1));
            self.dir.own[i].next_send = now.plus_ms(every);
            let (service, attrs) = (self.dir.own[i].service, self.dir.own[i].attrs.clone());
            self.send_advert(now, service, attrs, ttl);
        }
    }

    // ---- directory: timers ----

    /// The directory's earliest deadline.
    pub(super) fn directory_deadline(&self) -> Option<Instant> {
        let mut at: Option<Instant> = None;
        let mut take = |t: Instant| at = Some(at.map_or(t, |a| a.min(t)));
        if self.phase == Phase::Joined {
            for o in &self.dir.own {
                take(o.next_send);
            }
        }
        for d in &self.dir.discovers {
            take(d.deadline);
        }
        if !self.dir.store.is_empty() {
            take(self.dir.next_sweep);
        }
        at
    }

    pub(super) fn directory_tick(&mut self, now: Instant) {
        if now >= self.dir.next_sweep {
            self.dir.next_sweep = now.plus_ms(SWEEP_MS);
            let n = self.dir.store.expire(now);
            self.dir.counters.records_expired += n as u64;
        }
        self.refresh_adverts(now);
        let mut i = 0;
        while i < self.dir.discovers.len() {
            if self.dir.discovers[i].deadline > now {
                i += 1;
                continue;
            }
            match self.dir.discovers[i].phase {
                DiscoverPhase::Routing => {
                    if self.dir.discovers[i].attempts_left == 0 || self.phase != Phase::Joined {
                        let d = self.dir.discovers.swap_remove(i);
                        self.dir.counters.discovers_failed += 1;
                        self.emit(Event::RequestFailed {
                            op: d.op,
                            key: d.service,
                            kind: RequestKind::Discover,
                        });
                        continue;
                    }
                    let nonce = self.rng.next_u64();
                    let d = &mut self.dir.discovers[i];
                    d.attempts_left -= 1;
                    d.nonce = nonce;
                    d.deadline = now.plus_ms(self.timing.request_timeout_ms);
                    self.launch_discover(now, i);
                    i += 1;
                }
                DiscoverPhase::Collecting => {
                    if !self.start_probing(now, i) {
                        i += 1;
                    }
                }
                DiscoverPhase::Probing => self.finish_discover(i),
            }
        }
    }

    // ---- directory: acting as a directory node ----

    /// The next hop of a directory message: a known node sharing more digits with `key`,
    /// never one on the path. A node of this server first (the longer prefix, then a hash
    /// of key and candidate, so a server's nodes agree): the lower levels stay local. Else straight up: the longest
    /// prefix, ties broken by a hash of the pair (not by RTT or closeness to the key, which
    /// would make the nodes of every server pick the same hub).
    fn directory_next(&self, key: Key, path: &[Id]) -> Option<Contact> {
        let own = self.me.id.shared_prefix_len(key);
        let known = self
            .table
            .entries()
            .map(|e| e.contact)
            .chain(self.leaf.contacts().copied())
            .chain(self.hood.members().iter().map(|e| e.contact));
        let mut best: Option<((bool, u32, usize, u64), Contact)> = None;
        for c in known {
            let prefix = c.id.shared_prefix_len(key);
            if prefix <= own || path.contains(&c.id) {
                continue;
            }
            let rank = if c.server == self.me.server {
                // The nodes of one server agree on the one they know best for this key
                // (a hash of the key and the candidate), so that they meet there.
                (false, 0, usize::MAX - prefix, rendezvous(key, c.id))
            } else {
                (true, 0, usize::MAX - prefix, rendezvous(self.me.id, c.id))
            };
            if best.is_none_or(|(b, _)| rank < b) {
                best = Some((rank, c));
            }
        }
        best.map(|(_, c)| c)
    }

    /// At the top level, the arc member (of those this node sees) that serves `who` (a
    /// provider's advert, an asker's lookup): the winner of a rendezvous hash, so the top
    /// level's records and lookups spread over its arc instead of piling on the nodes that
    /// routes happen to reach. `None`: this node. Passed on once at most (a node already
    /// reached from another top-level node serves).
    fn top_owner(&self, key: Key, level: usize, who: NodeId, path: &[Id]) -> Option<Contact> {
        let w = level.min(usize::from(self.dir.config.max_level));
        let from_top = path
            .iter()
            .rev()
            .skip(1)
            .any(|id| id.shared_prefix_len(key) >= w);
        if from_top {
            return None;
        }
        let owner = self
            .leaf
            .contacts()
            .filter(|c| c.id.shared_prefix_len(key) >= w && !path.contains(&c.id))
            .copied()
            .max_by_key(|c| rendezvous(who, c.id))?;
        (rendezvous(who, owner.id) > rendezvous(who, self.me.id)).then_some(owner)
    }

    fn store_advert(&mut self, now: Instant, a: Advert) {
        match self.dir.store.upsert(now, a) {
            Ok(()) => self.dir.counters.adverts_stored += 1,
            Err(()) => self.dir.counters.records_refused += 1,
        }
    }

    /// A directory message at this node (its path already ends here): keep, answer or pass on.
    pub(super) fn directory_hop(&mut self, now: Instant, r: Routed) {
        let RoutedBody::Directory(body) = &r.body else {
            return;
        };
        let key = r.key;
        let cfg = self.dir.config;
        let level = self.me.id.shared_prefix_len(key);
        let next = self.directory_next(key, &r.path);
        // Adverts stop (and lookups end, walking the arc) at level M, or where no node
        // sharing more digits is known (the deepest level there is).
        let terminal = next.is_none() || level >= usize::from(cfg.max_level);
        // Below the top a directory node serves its own server (adverts of its providers,
        // lookups of its askers): that is where a near answer is; the rest climb.
        let is_directory =
            terminal || (level >= usize::from(cfg.min_level) && r.origin.server == self.me.server);
        match body {
            DirectoryBody::Advertise(a) => {
                if a.provider.id != r.origin.id || a.service != key {
                    // Only a provider advertises itself, under the key it routes to.
                    self.counters.ignored += 1;
                    return;
                }
                if terminal {
                    // The top level's adverts spread over its arc (see `top_owner`).
                    match self.top_owner(key, level, a.provider.id, &r.path) {
                        Some(owner) => self.forward(now, r, owner, 0),
                        None => self.store_advert(now, a.clone()),
                    }
                    return;
                }
                if is_directory {
                    self.store_advert(now, a.clone());
                }
            }
            DirectoryBody::Discover { requirement, k } => {
                if terminal && let Some(owner) = self.top_owner(key, level, r.origin.id, &r.path) {
                    // The top level's lookups spread over its arc like its adverts.
                    self.forward(now, r, owner, 0);
                    return;
                }
                if is_directory {
                    self.dir.counters.lookups_examined += 1;
                    let mut matches = self.dir.store.matching(now, key, requirement);
                    // The asker knows itself: answers name other providers.
                    matches.retain(|a| a.provider.id != r.origin.id);
                    let near = requirement.server.is_some()
                        || matches.iter().any(|a| a.provider.server == r.origin.server);
                    // Below the top, climb until a node holds k, one of them near the asker;
                    // at the top, walk the arc only for lack of k.
                    let enough = matches.len() >= usize::from(*k) && (near || terminal);
                    if enough || terminal {
                        let adverts = select_for(matches, r.origin.server);
                        let (requirement, k) = (requirement.clone(), *k);
                        let asked = if enough {
                            0
                        } else {
                            let walk = ArcWalk {
                                nonce: r.nonce,
                                key,
                                origin: r.origin,
                                requirement,
                                k,
                                level: level.min(usize::from(cfg.max_level)) as u8,
                            };
                            self.walk_arc(&walk, None, MAX_WALK)
                        };
                        let hops = (r.path.len() - 1) as u8;
                        self.directory_answer(
                            now,
                            r.origin,
                            Message::DirectoryReply {
                                nonce: r.nonce,
                                key,
                                routed: true,
                                level: level as u8,
                                hops,
                                asked,
                                adverts,
                            },
                        );
                        return;
                    }
                }
            }
        }
        match next {
            Some(c) => self.forward(now, r, c, 0),
            None => self.counters.routing_drops += 1,
        }
    }

    /// Asks the members of the walk's arc in this node's leaf set to answer the asker (both
    /// sides, or only the `extend` side when the walk was passed on), and passes the walk on
    /// past the leaf set's edge where the arc goes on; returns how many were asked.
    fn walk_arc(&mut self, walk: &ArcWalk, extend: Option<bool>, budget: u8) -> u8 {
        let level = usize::from(walk.level);
        let in_arc = |c: &Contact| c.id.shared_prefix_len(walk.key) >= level;
        let mut targets: Vec<(Contact, Option<bool>)> = Vec::new();
        if self.leaf.len() < self.leaf.capacity() {
            // The leaf set holds the whole ring.
            if extend.is_none() {
                targets.extend(
                    self.leaf
                        .contacts()
                        .filter(|c| in_arc(c))
                        .map(|c| (*c, None)),
                );
            }
        } else {
            for cw in [true, false] {
                if extend.is_some_and(|e| e != cw) {
                    continue;
                }
                let side = if cw {
                    self.leaf.successors()
                } else {
                    self.leaf.predecessors()
                };
                // The arc is contiguous and this node is in it.
                let run: Vec<Contact> = side.iter().copied().take_while(in_arc).collect();
                let open = run.len() == side.len();
                let last = run.len().saturating_sub(1);
                for (i, c) in run.into_iter().enumerate() {
                    targets.push((c, (open && i == last).then_some(cw)));
                }
            }
        }
        targets.truncate(usize::from(budget));
        let left = budget.saturating_sub(targets.len() as u8);
        for (c, ext) in &targets {
            self.send(
                c.addr,
                Message::DirectoryQuery {
                    nonce: walk.nonce,
                    key: walk.key,
                    origin: walk.origin,
                    requirement: walk.requirement.clone(),
                    k: walk.k,
                    level: walk.level,
                    extend: *ext,
                    budget: left,
                },
            );
        }
        targets.len() as u8
    }

    /// Asked by a walk of its arc: answer the asker directly, and walk on if asked to.
    pub(super) fn directory_query(
        &mut self,
        now: Instant,
        walk: ArcWalk,
        extend: Option<bool>,
        budget: u8,
    ) {
        self.dir.counters.lookups_examined += 1;
        let origin = walk.origin;
        let mut matches = self.dir.store.matching(now, walk.key, &walk.requirement);
        matches.retain(|a| a.provider.id != origin.id);
        let adverts = select_for(matches, origin.server);
        let level = self.me.id.shared_prefix_len(walk.key) as u8;
        let asked = if extend.is_some() && level >= walk.level {
            let asked = self.walk_arc(&walk, extend, budget);
            self.dir.counters.walks_extended += 1;
            self.dir.counters.walk_extension_asked += u64::from(asked);
            asked
        } else {
            0
        };
        self.directory_answer(
            now,
            origin,
            Message::DirectoryReply {
                nonce: walk.nonce,
                key: walk.key,
                routed: false,
                level,
                hops: 0,
                asked,
                adverts,
            },
        );
    }

    /// Sends an answer to the asker (trimmed to one datagram), or takes it here if it is us.
    fn directory_answer(&mut self, now: Instant, origin: Contact, mut reply: Message) {
        self.dir.counters.lookups_answered += 1;
        if origin.id == self.me.id {
            let me = self.me;
            self.directory_reply(now, me, reply);
            return;
        }
        let budget = MAX_DATAGRAM.saturating_sub(self.sealer.overhead());
        loop {
            let packet = Packet {
                header: self.header(),
                message: reply,
            };
            if wire::encode(&packet, budget).is_ok() {
                reply = packet.message;
                break;
            }
            reply = packet.message;
            let Message::DirectoryReply { adverts, .. } = &mut reply else {
                return;
            };
            if adverts.pop().is_none() {
                break;
            }
        }
        self.send(origin.addr, reply);
    }

    /// Drops the adverts of a provider the leaf set saw fail.
    pub(super) fn directory_peer_failed(&mut self, id: NodeId) {
        let n = self.dir.store.forget_provider(id);
        self.dir.counters.records_failed += n as u64;
    }

    // ---- directory: this node's discovers ----

    /// An answer to one of our discovers.
    pub(super) fn directory_reply(&mut self, now: Instant, _from: Contact, reply: Message) {
        let Message::DirectoryReply {
            nonce,
            key,
            routed,
            level,
            hops,
            asked,
            adverts,
        } = reply
        else {
            return;
        };
        let Some(i) = self
            .dir
            .discovers
            .iter()
            .position(|d| d.nonce == nonce && d.service == key)
        else {
            self.dir.counters.stray_answers += 1;
            return;
        };
        let collect_ms = self.dir.config.collect_ms;
        let d = &mut self.dir.discovers[i];
        if d.phase == DiscoverPhase::Probing {
            return; // late: ranking is under way
        }
        for a in adverts {
            if a.service != key || !d.requirement.matches(&a) {
                continue;
            }
            match d.found.iter().position(|f| f.provider.id == a.provider.id) {
                Some(j) if d.found[j].seq < a.seq => d.found[j] = a,
                Some(_) => {}
                None if d.found.len() < MAX_COLLECTED => d.found.push(a),
                None => {}
            }
        }
        d.answers = d.answers.saturating_add(1);
        d.asked = d.asked.saturating_add(asked);
        if routed {
            d.level = level;
            d.hops = hops;
            d.routed_seen = true;
        }
        if d.phase == DiscoverPhase::Routing {
            d.phase = DiscoverPhase::Collecting;
            d.deadline = now.plus_ms(collect_ms);
        }
        if d.routed_seen && d.answers > d.asked {
            self.start_probing(now, i);
        }
    }

    /// The RTT this node already knows to `id` (0 for itself).
    fn known_rtt(&self, id: NodeId) -> Option<u32> {
        if id == self.me.id {
            return Some(0);
        }
        self.leaf
            .members()
            .iter()
            .find(|m| m.contact.id == id)
            .and_then(|m| m.rtt_us)
            .or_else(|| {
                self.table
                    .entries()
                    .find(|e| e.contact.id == id)
                    .and_then(|e| e.rtt_us)
            })
            .or_else(|| {
                self.hood
                    .members()
                    .iter()
                    .find(|e| e.contact.id == id)
                    .and_then(|e| e.rtt_us)
            })
    }

    /// Probes the candidates whose RTT is unknown; returns whether the discover finished
    /// (nothing to probe) and left the list.
    fn start_probing(&mut self, now: Instant, i: usize) -> bool {
        let ids: Vec<NodeId> = self.dir.discovers[i]
            .found
            .iter()
            .map(|a| a.provider.id)
            .collect();
        let rtts: Vec<Option<u32>> = ids.iter().map(|id| self.known_rtt(*id)).collect();
        let addrs: Vec<PeerAddr> = self.dir.discovers[i]
            .found
            .iter()
            .zip(&rtts)
            .filter(|(_, r)| r.is_none())
            .map(|(a, _)| a.provider.addr)
            .collect();
        let collect_ms = self.dir.config.collect_ms;
        let d = &mut self.dir.discovers[i];
        d.rtt_us = rtts;
        if addrs.is_empty() {
            self.finish_discover(i);
            return true;
        }
        d.phase = DiscoverPhase::Probing;
        d.deadline = now.plus_ms(collect_ms);
        for addr in addrs {
            self.send(
                addr,
                Message::Ping {
                    echo: Some(now.as_micros()),
                },
            );
        }
        false
    }

    /// A pong: an RTT for any discover probing its sender.
    pub(super) fn directory_pong(&mut self, from: NodeId, rtt_us: u32) {
        let mut done = Vec::new();
        for (i, d) in self.dir.discovers.iter_mut().enumerate() {
            if d.phase != DiscoverPhase::Probing {
                continue;
            }
            if let Some(j) = d.found.iter().position(|a| a.provider.id == from) {
                d.rtt_us[j] = Some(rtt_us);
            }
            if d.rtt_us.iter().all(Option::is_some) {
                done.push(i);
            }
        }
        for i in done.into_iter().rev() {
            self.finish_discover(i);
        }
    }

    fn finish_discover(&mut self, i: usize) {
        let d = self.dir.discovers.swap_remove(i);
        let server = self.me.server;
        let mut providers: Vec<Provider> = d
            .found
            .into_iter()
            .enumerate()
            .map(|(j, a)| Provider {
                contact: a.provider,
                attrs: a.attrs,
                rtt_us: d.rtt_us.get(j).copied().flatten(),
            })
            .collect();
        providers.sort_by_key(|p| p.rank(server));
        providers.truncate(MAX_ANSWER);
        self.emit(Event::Discovered {
            op: d.op,
            service: d.service,
            providers,
            level: d.level,
            hops: d.hops,
            answers: d.answers,
        });
    }
}

/// Rendezvous weight of a directory node for a provider's top-level advert.
fn rendezvous(provider: NodeId, node: NodeId) -> u64 {
    let mut x = (provider.0 ^ node.0) as u64 ^ ((provider.0 ^ node.0) >> 64) as u64;
    // splitmix64's finaliser
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}
