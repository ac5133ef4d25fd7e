//! Deterministic simulation of many unipeer nodes in one process (the overlay issue).
//!
//! The simulator drives the very `unipeer_node::Node` the kernel runs: virtual time, a network
//! of physical servers with per-pair latency, loss, duplication, reordering, partitions, crash
//! and restart. One seeded RNG decides everything, so a failing seed replays exactly
//! (`SIM_SEED=<seed>`). Safety properties are checked as events happen (see [`Sim`]); the
//! [`scenario`] module adds the liveness phase; [`bench`] measures hops, consistency and upkeep.

pub mod bench;
pub mod directory;
pub mod harness;
pub mod heap;
pub mod network;
pub mod ranked;
pub mod scenario;

// The crate's own tests measure memory like the bench binary does.
#[cfg(test)]
#[global_allocator]
static HEAP: &heap::CountingAlloc = &heap::COUNTING;

use harness::{Clock, Incarnation, Simulation};
use network::{Faults, Topology};
use ranked::RankedIds;
use std::collections::{BTreeMap, HashMap};
use unipeer_node::directory::{DirectoryConfig, Provider};
use unipeer_node::id::{Id, Key, NodeId, ServerTag, placeholder_public_key};
use unipeer_node::node::{Event, Node, NodeConfig, OpId, PutError, RequestKind, Timing};
use unipeer_node::rng::Rng;
use unipeer_node::wire::MAX_PATH;
use unipeer_node::{Instant, PeerAddr};

/// Simulation parameters.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub seed: u64,
    pub servers: usize,
    /// One-way latency inside a server.
    pub near_us: u64,
    /// Range of one-way latency between two servers.
    pub far_us: (u64, u64),
    pub leaf_set_len: usize,
    pub replicas: usize,
    pub timing: Timing,
    /// A record must have its `k` copies once the network has been whole, with no crash or
    /// leave, this long.
    pub repair_bound_ms: u64,
    /// The service directory's settings (R, M, TTL) every node starts with.
    pub directory: DirectoryConfig,
    /// `Some((floor_us, side_us))`: instead of `servers` with `near_us`/`far_us`, every node
    /// is a point of its own in a square ([`Topology::plane`]); the model of proximity routing
    /// experiments, where the relative delay penalty is measured.
    pub plane: Option<(u64, u64)>,
}

impl SimConfig {
    pub fn new(seed: u64) -> Self {
        SimConfig {
            seed,
            servers: 8,
            near_us: 100,
            far_us: (5_000, 50_000),
            leaf_set_len: 16,
            replicas: 3,
            timing: Timing::default(),
            repair_bound_ms: 30_000,
            directory: DirectoryConfig::default(),
            plane: None,
        }
    }
}

/// One node slot: a node's identity and address, up or down.
pub struct Slot {
    pub node: Option<Node>,
    pub id: NodeId,
    pub addr: PeerAddr,
    pub server: usize,
    public_key: [u8; 32],
    timer: Incarnation,
    /// When the node last joined (for diagnostics).
    pub joined_at: Option<Instant>,
}

/// What the overlay simulator's agenda carries.
pub enum Ev {
    Deliver {
        to: usize,
        from: PeerAddr,
        bytes: Vec<u8>,
    },
    Timer {
        slot: usize,
        incarnation: u32,
    },
}

/// What happened to one tracked request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Pending,
    /// Answered; `consistent`: the root was the ground-truth root when the answer arrived.
    Done {
        root: NodeId,
        hops: usize,
        consistent: bool,
    },
    Failed,
}

/// A request the simulator issued and follows.
#[derive(Clone, Debug)]
pub struct TrackedOp {
    pub key: Key,
    pub kind: RequestKind,
    pub issued: Instant,
    pub outcome: Outcome,
}

/// A discover's answer as the simulator saw it.
#[derive(Clone, Debug)]
pub struct DiscoverAnswer {
    pub providers: Vec<Provider>,
    pub level: u8,
    pub hops: u8,
    pub answers: u8,
    pub at: Instant,
}

/// A record the overlay acknowledged.
#[derive(Clone, Debug)]
pub struct AckedRecord {
    pub value: Vec<u8>,
    pub acked_at: Instant,
}

/// Running totals.
#[derive(Clone, Debug, Default)]
pub struct SimStats {
    pub events: u64,
    pub datagrams_sent: u64,
    pub datagrams_lost: u64,
    pub lookups_done: u64,
    pub lookups_consistent: u64,
    /// Lookups whose root was the ground-truth root when it answered (it may have died before
    /// the answer arrived, which `lookups_consistent` counts against it).
    pub lookups_consistent_at_answer: u64,
    pub requests_failed: u64,
    /// Requests still pending when the node that issued them crashed or left: no answer can
    /// reach a client that is gone, so they count neither for nor against consistency.
    pub orphaned: u64,
    pub joins: u64,
    pub crashes: u64,
    /// Maintenance bytes of nodes that are gone (live nodes keep theirs in their counters).
    pub retired_maintenance_bytes: u64,
}

/// N nodes, one network, one RNG, virtual time.
///
/// Safety checks run as events happen and append to `violations`:
/// - every answered request's path is loop-free and within the hop limit;
/// - a node that serves as a key's root knows no live node closer to the key in its leaf set;
/// - a get never returns a value other than the one put;
/// - every acknowledged record has `k` live copies once the network has been whole and no node
///   has crashed or left (and the
///   record acknowledged) for longer than the repair bound, while at least `k` nodes live
///   (checked once per simulated second by `run_until`).
pub struct Sim {
    pub cfg: SimConfig,
    pub now: Instant,
    pub rng: Rng,
    pub topology: Topology,
    pub faults: Faults,
    pub slots: Vec<Slot>,
    /// Each slot's server, apart from the slots themselves: `transmit` needs only this, and a
    /// slot (with its node inline) is a cache miss of its own at 100,000 nodes.
    server_of: Vec<u32>,
    clock: Clock<Ev>,
    /// Ground truth: joined nodes that are up, by id.
    live: BTreeMap<NodeId, usize>,
    /// The same ids, for a uniform pick without walking `live`.
    live_ranked: RankedIds,
    /// Since when the network has had no partition and no node has crashed or left.
    stable_since: Instant,
    last_record_check: Instant,
    pub ops: HashMap<(usize, OpId), TrackedOp>,
    /// Tracked requests still pending, per slot.
    pending: HashMap<usize, u64>,
    /// Lookups delivered at a root, until their answer arrives: whether that root was the
    /// ground-truth root when it answered.
    answered_as_root: HashMap<(NodeId, Key), bool>,
    pub acked: BTreeMap<Key, AckedRecord>,
    pub violations: Vec<String>,
    pub stats: SimStats,
    /// Hop counts of answered lookups since the last `take_hops`.
    pub hops: Vec<u32>,
    /// When set, the relative delay penalty of each answered lookup whose path is all live:
    /// the sum of the base one-way latencies along its hops over the base latency from its
    /// origin to its root (lookups answered by their origin, 0 hops, have none).
    pub rdp: Option<Vec<f32>>,
    /// When set, bytes sent per message kind (a diagnostic; costs a decode per datagram).
    pub bytes_by_kind: Option<BTreeMap<String, u64>>,
    /// Counted with `bytes_by_kind`: datagrams sent per message kind.
    pub datagrams_by_kind: BTreeMap<String, u64>,
    /// `SIM_DEBUG` was set: print diagnostics.
    debug: bool,
    /// Values of the puts issued, until they end.
    written: HashMap<(usize, OpId), Vec<u8>>,
    /// Every acknowledged write: (key, version) -> value. Two different values acknowledged at
    /// one version of a key is a safety violation.
    pub installed: BTreeMap<(Key, u64), Vec<u8>>,
    /// What each get answered.
    pub values_got: HashMap<(usize, OpId), Option<Vec<u8>>>,
    /// Why each failed put failed.
    pub put_errors: HashMap<(usize, OpId), PutError>,
    /// What each discover answered.
    pub discovered: HashMap<(usize, OpId), DiscoverAnswer>,
}

impl Sim {
    pub fn new(cfg: SimConfig) -> Self {
        let mut rng = Rng::from_u64(cfg.seed);
        let topology = match cfg.plane {
            Some((floor_us, side_us)) => Topology::plane(floor_us, side_us),
            None => Topology::random(&mut rng, cfg.servers, cfg.near_us, cfg.far_us),
        };
        Sim {
            clock: Clock::new(cfg.seed),
            cfg,
            now: Instant::ZERO,
            rng,
            topology,
            faults: Faults::default(),
            slots: Vec::new(),
            server_of: Vec::new(),
            live: BTreeMap::new(),
            live_ranked: RankedIds::default(),
            stable_since: Instant::ZERO,
            last_record_check: Instant::ZERO,
            ops: HashMap::new(),
            pending: HashMap::new(),
            answered_as_root: HashMap::new(),
            acked: BTreeMap::new(),
            violations: Vec::new(),
            stats: SimStats::default(),
            hops: Vec::new(),
            rdp: None,
            bytes_by_kind: None,
            datagrams_by_kind: BTreeMap::new(),
            written: HashMap::new(),
            debug: std::env::var("SIM_DEBUG").is_ok(),
            installed: BTreeMap::new(),
            put_errors: HashMap::new(),
            values_got: HashMap::new(),
            discovered: HashMap::new(),
        }
    }

    /// Adds a node slot (not started) on a random server; returns its index.
    pub fn add_node(&mut self) -> usize {
        let i = self.slots.len();
        assert!(
            i < 1 << 24,
            "the simulator addresses at most 2^24 node slots"
        );
        let server = if self.topology.is_plane() {
            self.topology.add_point(&mut self.rng)
        } else {
            self.rng.below(self.cfg.servers as u64) as usize
        };
        let public_key = placeholder_public_key(&format!("sim-{}-node-{i}", self.cfg.seed));
        let addr = PeerAddr {
            ipv4: [10, (i >> 16) as u8, (i >> 8) as u8, i as u8],
            port: 7000,
        };
        self.slots.push(Slot {
            node: None,
            id: Id::from_public_key(&public_key),
            addr,
            server,
            public_key,
            timer: Incarnation::default(),
            joined_at: None,
        });
        self.server_of.push(server as u32);
        i
    }

    /// Starts (or restarts, fresh) the node in `slot`, joining through `bootstrap` slots.
    pub fn start(&mut self, slot: usize, bootstrap: &[usize]) {
        let seed = self.rng.seed32();
        let s = &self.slots[slot];
        let mut cfg = NodeConfig::new(
            &s.public_key,
            s.addr,
            ServerTag::from_name(&format!("server-{}", s.server)),
            seed,
        );
        cfg.leaf_set_len = self.cfg.leaf_set_len;
        cfg.replicas = self.cfg.replicas;
        cfg.timing = self.cfg.timing;
        let mut node = Node::new(cfg, self.now).expect("simulator node config is valid");
        node.set_directory_config(self.cfg.directory);
        let addrs: Vec<PeerAddr> = bootstrap.iter().map(|b| self.slots[*b].addr).collect();
        node.join(self.now, &addrs);
        let s = &mut self.slots[slot];
        s.node = Some(node);
        s.timer.restart();
        self.after_io(slot);
    }

    /// Stops the node in `slot` without a word (its in-flight datagrams still arrive).
    pub fn crash(&mut self, slot: usize) {
        let s = &mut self.slots[slot];
        if let Some(node) = s.node.take() {
            self.stats.crashes += 1;
            self.stats.orphaned += self.pending.remove(&slot).unwrap_or(0);
            self.stable_since = self.now;
            self.stats.retired_maintenance_bytes += node.counters().maintenance_bytes_out;
            if self.live.remove(&s.id).is_some() {
                self.live_ranked.remove(s.id);
            }
            s.timer.crash();
        }
    }

    /// Leaves gracefully, then stops.
    pub fn leave(&mut self, slot: usize) {
        if let Some(n) = self.slots[slot].node.as_mut() {
            n.leave(self.now);
            self.after_io(slot);
        }
        self.crash(slot);
    }

    pub fn is_up(&self, slot: usize) -> bool {
        self.slots[slot].node.is_some()
    }

    pub fn node(&self, slot: usize) -> Option<&Node> {
        self.slots[slot].node.as_ref()
    }

    /// Slots of joined, running nodes (ground truth), in id order.
    pub fn live_slots(&self) -> Vec<usize> {
        self.live.values().copied().collect()
    }

    pub fn live_count(&self) -> usize {
        self.live.len()
    }

    pub fn is_live(&self, id: NodeId) -> bool {
        self.live.contains_key(&id)
    }

    /// A random joined, running node.
    pub fn random_live(&mut self) -> Option<usize> {
        if self.live.is_empty() {
            return None;
        }
        let n = self.rng.below(self.live.len() as u64) as usize;
        let id = self.live_ranked.nth(n)?;
        self.live.get(&id).copied()
    }

    /// Sets or clears a partition (group per slot).
    pub fn set_partition(&mut self, groups: Option<Vec<u8>>) {
        if groups.is_none() && self.faults.partition.is_some() {
            self.stable_since = self.now;
        }
        self.faults.partition = groups;
    }

    /// The live node numerically closest to `key` (ties to the smaller id).
    pub fn truth_root(&self, key: Key) -> Option<NodeId> {
        let up = self
            .live
            .range(key..)
            .next()
            .or_else(|| self.live.iter().next());
        let down = self
            .live
            .range(..key)
            .next_back()
            .or_else(|| self.live.iter().next_back());
        match (up, down) {
            (Some((a, _)), Some((b, _))) => Some(if key.is_closer(*a, *b) { *a } else { *b }),
            (Some((a, _)), None) | (None, Some((a, _))) => Some(*a),
            (None, None) => None,
        }
    }

    /// The leaf set `id` should have: the L/2 nearest live nodes on each side.
    pub fn truth_leaf_set(&self, id: NodeId) -> Vec<NodeId> {
        let half = self.cfg.leaf_set_len / 2;
        let ids: Vec<NodeId> = self.live.keys().copied().filter(|x| *x != id).collect();
        if ids.len() <= 2 * half {
            return ids;
        }
        let pos = ids.partition_point(|x| *x < id);
        let n = ids.len();
        let mut out: Vec<NodeId> = (0..half)
            .map(|i| ids[(pos + i) % n])
            .chain((1..=half).map(|i| ids[(pos + n - i) % n]))
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// `Ok` when every live node's leaf set equals the ground truth; else the first mismatch.
    pub fn check_leaf_sets(&self) -> Result<(), String> {
        for (&id, &slot) in &self.live {
            let node = self.slots[slot].node.as_ref().expect("live nodes are up");
            let mut have: Vec<NodeId> = node.leaf_set().contacts().map(|c| c.id).collect();
            have.sort();
            let want = self.truth_leaf_set(id);
            if have != want {
                let missing: Vec<_> = want.iter().filter(|x| !have.contains(x)).collect();
                let extra: Vec<_> = have.iter().filter(|x| !want.contains(x)).collect();
                return Err(format!(
                    "t={:?} node {:?} leaf set differs: missing {:?}, extra {:?}",
                    self.now, id, missing, extra
                ));
            }
        }
        Ok(())
    }

    /// Live nodes holding `key`.
    pub fn copies(&self, key: Key) -> usize {
        self.live
            .values()
            .filter(|s| {
                self.slots[**s]
                    .node
                    .as_ref()
                    .is_some_and(|n| n.records().get(key).is_some())
            })
            .count()
    }

    /// Sum of every node's upkeep bytes, gone ones included.
    pub fn maintenance_bytes(&self) -> u64 {
        self.stats.retired_maintenance_bytes
            + self
                .slots
                .iter()
                .filter_map(|s| s.node.as_ref())
                .map(|n| n.counters().maintenance_bytes_out)
                .sum::<u64>()
    }

    // ---- requests ----

    fn track(
        &mut self,
        slot: usize,
        key: Key,
        kind: RequestKind,
        op: Option<OpId>,
    ) -> Option<OpId> {
        let op = op?;
        *self.pending.entry(slot).or_default() += 1;
        self.ops.insert(
            (slot, op),
            TrackedOp {
                key,
                kind,
                issued: self.now,
                outcome: Outcome::Pending,
            },
        );
        self.after_io(slot);
        Some(op)
    }

    pub fn lookup(&mut self, slot: usize, key: Key) -> Option<OpId> {
        let now = self.now;
        let op = self.slots[slot].node.as_mut()?.lookup(now, key).ok();
        self.track(slot, key, RequestKind::Lookup, op)
    }

    pub fn put(&mut self, slot: usize, key: Key, value: &[u8]) -> Option<OpId> {
        let now = self.now;
        let op = self.slots[slot].node.as_mut()?.put(now, key, value).ok()?;
        self.written.insert((slot, op), value.to_vec());
        self.track(slot, key, RequestKind::Put, Some(op))
    }

    /// A compare-and-set through `slot`: `value` if `key` is at version `expected`.
    pub fn put_if(&mut self, slot: usize, key: Key, value: &[u8], expected: u64) -> Option<OpId> {
        let now = self.now;
        let node = self.slots[slot].node.as_mut()?;
        let op = node.put_if(now, key, value, expected).ok()?;
        self.written.insert((slot, op), value.to_vec());
        self.track(slot, key, RequestKind::Put, Some(op))
    }

    /// Runs `f` on the node in `slot` (if up) and handles what it sent and emitted.
    pub fn with_node<T>(
        &mut self,
        slot: usize,
        f: impl FnOnce(&mut Node, Instant) -> T,
    ) -> Option<T> {
        let now = self.now;
        let out = f(self.slots[slot].node.as_mut()?, now);
        self.after_io(slot);
        Some(out)
    }

    /// A discover through `slot`, tracked like the other requests.
    pub fn discover(
        &mut self,
        slot: usize,
        service: &str,
        requirement: unipeer_node::directory::Requirement,
        k: u8,
    ) -> Option<OpId> {
        let now = self.now;
        let op = self.slots[slot]
            .node
            .as_mut()?
            .discover(now, service, requirement, k)
            .ok();
        let key = unipeer_node::directory::service_id(service);
        self.track(slot, key, RequestKind::Discover, op)
    }

    pub fn get(&mut self, slot: usize, key: Key) -> Option<OpId> {
        let now = self.now;
        let op = self.slots[slot].node.as_mut()?.get(now, key).ok();
        self.track(slot, key, RequestKind::Get, op)
    }

    // ---- running ----

    fn schedule(&mut self, at: Instant, ev: Ev) {
        self.clock.schedule(at, ev);
    }

    /// Runs every event up to `until`, then sets the clock to it.
    pub fn run_until(&mut self, until: Instant) {
        harness::run_until(self, until);
    }

    /// Drains a node's transmits and events, and re-arms its timer.
    fn after_io(&mut self, slot: usize) {
        loop {
            let Some(node) = self.slots[slot].node.as_mut() else {
                return;
            };
            let Some(t) = node.poll_transmit() else { break };
            self.transmit(slot, t.dst, t.payload);
        }
        while let Some(e) = self.slots[slot].node.as_mut().and_then(|n| n.poll_event()) {
            self.observe(slot, e);
        }
        let s = &mut self.slots[slot];
        let Some(node) = s.node.as_ref() else { return };
        if let Some((at, incarnation)) = s.timer.arm(self.now, node.poll_timeout()) {
            self.schedule(at, Ev::Timer { slot, incarnation });
        }
    }

    /// The slot an address belongs to: `add_node` gives slot `i` the address `10.i.i.i:7000`
    /// (its 24 low bits), so no map is needed; `None` for any other address.
    fn slot_of_addr(&self, a: PeerAddr) -> Option<usize> {
        let [ten, hi, mid, lo] = a.ipv4;
        let i = (usize::from(hi) << 16) | (usize::from(mid) << 8) | usize::from(lo);
        (ten == 10 && a.port == 7000 && i < self.slots.len()).then_some(i)
    }

    fn transmit(&mut self, from: usize, dst: PeerAddr, mut bytes: Vec<u8>) {
        self.stats.datagrams_sent += 1;
        if let Some(tally) = self.bytes_by_kind.as_mut()
            && let Ok(p) = unipeer_node::wire::decode(&bytes)
        {
            let name = match &p.message {
                unipeer_node::wire::Message::Routed(r) => format!("Routed/{:?}", r.body)
                    .split([' ', '{', '('])
                    .next()
                    .unwrap_or("Routed")
                    .to_string(),
                m => format!("{m:?}")
                    .split([' ', '{', '('])
                    .next()
                    .unwrap_or("?")
                    .to_string(),
            };
            *tally.entry(name.clone()).or_default() += bytes.len() as u64;
            *self.datagrams_by_kind.entry(name).or_default() += 1;
        }
        let Some(to) = self.slot_of_addr(dst) else {
            self.stats.datagrams_lost += 1;
            return;
        };
        let fate = harness::fate(
            &mut self.rng,
            &self.topology,
            &self.faults,
            self.now,
            (from, self.server_of[from] as usize),
            (to, self.server_of[to] as usize),
            0,
        );
        if fate.is_lost() {
            self.stats.datagrams_lost += 1;
            return;
        }
        let src = self.slots[from].addr;
        let arrivals: Vec<Instant> = fate.arrivals().collect();
        for (c, at) in arrivals.iter().enumerate() {
            let payload = if c + 1 == arrivals.len() {
                std::mem::take(&mut bytes)
            } else {
                bytes.clone()
            };
            self.schedule(
                *at,
                Ev::Deliver {
                    to,
                    from: src,
                    bytes: payload,
                },
            );
        }
    }

    fn violation(&mut self, what: String) {
        if self.violations.len() < 32 {
            self.violations
                .push(format!("t={:?} seed={}: {what}", self.now, self.cfg.seed));
        }
    }

    fn observe(&mut self, slot: usize, e: Event) {
        let me = self.slots[slot].id;
        match e {
            Event::Joined => {
                self.stats.joins += 1;
                self.slots[slot].joined_at = Some(self.now);
                if self.live.insert(me, slot).is_none() {
                    self.live_ranked.insert(me);
                }
            }
            Event::Delivered { key, kind, .. } => {
                if kind == RequestKind::Lookup {
                    let was_root = self.truth_root(key) == Some(me);
                    self.answered_as_root.insert((me, key), was_root);
                }
                // Safety: the root knows no live node closer to the key in its leaf set.
                let node = self.slots[slot]
                    .node
                    .as_ref()
                    .expect("events come from live nodes");
                let closer = node
                    .leaf_set()
                    .contacts()
                    .filter(|c| !(kind == RequestKind::Join && c.id == key))
                    .find(|c| self.live.contains_key(&c.id) && key.is_closer(c.id, me))
                    .map(|c| c.id);
                if let Some(c) = closer {
                    self.violation(format!(
                        "{me:?} answered {kind:?} for {key:?} though its leaf set has live {c:?} closer"
                    ));
                }
            }
            Event::LookupDone {
                op,
                key,
                root,
                path,
            } => {
                let truth = self.truth_root(key);
                let consistent = truth == Some(root.id);
                if !consistent && self.debug {
                    self.explain_inconsistent(key, root.id, truth, &path);
                }
                self.check_path(&path, key);
                self.stats.lookups_done += 1;
                if consistent {
                    self.stats.lookups_consistent += 1;
                }
                let at_answer = self.answered_as_root.remove(&(root.id, key));
                if consistent || at_answer == Some(true) {
                    self.stats.lookups_consistent_at_answer += 1;
                }
                let hops = path.len().saturating_sub(1);
                self.hops.push(hops as u32);
                if self.rdp.is_some()
                    && let Some(r) = self.relative_delay_penalty(&path)
                    && let Some(v) = self.rdp.as_mut()
                {
                    v.push(r);
                }
                self.settle(
                    slot,
                    op,
                    Outcome::Done {
                        root: root.id,
                        hops,
                        consistent,
                    },
                );
            }
            Event::PutDone {
                op,
                key,
                root,
                version,
            } => {
                // Safety: one value per acknowledged version of a key.
                if let Some(value) = self.written.remove(&(slot, op)) {
                    match self.installed.get(&(key, version)) {
                        Some(v) if *v != value => self.violation(format!(
                            "two different values acknowledged at version {version} of {key:?}"
                        )),
                        Some(_) => {}
                        None => {
                            self.installed.insert((key, version), value);
                        }
                    }
                }
                let truth = self.truth_root(key);
                self.settle(
                    slot,
                    op,
                    Outcome::Done {
                        root: root.id,
                        hops: 0,
                        consistent: truth == Some(root.id),
                    },
                );
                if let Some(a) = self.acked.get_mut(&key) {
                    a.acked_at = self.now;
                }
            }
            Event::GetDone {
                op,
                key,
                root,
                value,
            } => {
                if let (Some(v), Some(a)) = (&value, self.acked.get(&key))
                    && *v != a.value
                {
                    self.violation(format!("get {key:?} returned a value never put"));
                }
                let truth = self.truth_root(key);
                self.values_got.insert((slot, op), value.clone());
                self.settle(
                    slot,
                    op,
                    Outcome::Done {
                        root: root.id,
                        hops: usize::from(value.is_some()),
                        consistent: truth == Some(root.id),
                    },
                );
            }
            Event::RequestFailed { op, .. } | Event::PutFailed { op, .. } => {
                if let Event::PutFailed { error, .. } = e {
                    self.written.remove(&(slot, op));
                    self.put_errors.insert((slot, op), error);
                }
                self.stats.requests_failed += 1;
                self.settle(slot, op, Outcome::Failed);
            }
            Event::PeerFailed { .. } => {}
            Event::Discovered {
                op,
                providers,
                level,
                hops,
                answers,
                ..
            } => {
                if let Some(t) = self.ops.get_mut(&(slot, op)) {
                    t.outcome = Outcome::Done {
                        root: providers.first().map_or(Id(0), |p| p.contact.id),
                        hops: usize::from(hops),
                        consistent: true,
                    };
                }
                self.discovered.insert(
                    (slot, op),
                    DiscoverAnswer {
                        providers,
                        level,
                        hops,
                        answers,
                        at: self.now,
                    },
                );
            }
        }
    }

    /// A route's base latency over its origin's base latency to its end; `None` for a path of
    /// no hop or through a node no longer live.
    fn relative_delay_penalty(&self, path: &[NodeId]) -> Option<f32> {
        if path.len() < 2 {
            return None;
        }
        let servers: Option<Vec<usize>> = path
            .iter()
            .map(|id| self.live.get(id).map(|s| self.server_of[*s] as usize))
            .collect();
        let servers = servers?;
        let route: u64 = servers
            .windows(2)
            .map(|w| self.topology.base_us(w[0], w[1]))
            .sum();
        let direct = self
            .topology
            .base_us(servers[0], *servers.last().expect("two or more"));
        (direct > 0).then(|| route as f32 / direct as f32)
    }

    /// Diagnostics (`SIM_DEBUG`): why a lookup ended at another node than the true root.
    fn explain_inconsistent(&self, key: Key, root: NodeId, truth: Option<NodeId>, path: &[NodeId]) {
        let age = |id: NodeId| {
            self.live
                .get(&id)
                .and_then(|s| self.slots[*s].joined_at)
                .map(|t| self.now.millis_since(t))
        };
        let knows = |who: NodeId, whom: Option<NodeId>| {
            let (Some(s), Some(w)) = (self.live.get(&who), whom) else {
                return false;
            };
            self.slots[*s]
                .node
                .as_ref()
                .is_some_and(|n| n.leaf_set().contacts().any(|c| c.id == w))
        };
        eprintln!(
            "t={:?} inconsistent {key:?}: root {root:?} (live {}, joined {:?} ms ago, knows truth {}) truth {truth:?} (joined {:?} ms ago, knows root {}) hops {}",
            self.now,
            self.live.contains_key(&root),
            age(root),
            knows(root, truth),
            truth.and_then(age),
            truth.is_some_and(|t| knows(t, Some(root))),
            path.len().saturating_sub(1)
        );
    }

    /// Records a tracked request's outcome.
    fn settle(&mut self, slot: usize, op: OpId, outcome: Outcome) {
        if let Some(t) = self.ops.get_mut(&(slot, op)) {
            if t.outcome == Outcome::Pending
                && let Some(p) = self.pending.get_mut(&slot)
            {
                *p = p.saturating_sub(1);
            }
            t.outcome = outcome;
        }
    }

    fn check_path(&mut self, path: &[NodeId], key: Key) {
        let mut seen = path.to_vec();
        seen.sort();
        seen.dedup();
        if seen.len() != path.len() || path.len() > MAX_PATH {
            self.violation(format!(
                "routing loop or overlong path for {key:?}: {path:?}"
            ));
        }
    }

    /// Every acknowledged record keeps `k` live copies once the network has been whole for
    /// the repair bound.
    fn check_records(&mut self) {
        let bound = self.cfg.repair_bound_ms;
        let k = self.cfg.replicas;
        if self.faults.partition.is_some()
            || self.now.millis_since(self.stable_since) < bound
            || self.live.len() < k
        {
            return;
        }
        let due: Vec<Key> = self
            .acked
            .iter()
            .filter(|(_, a)| self.now.millis_since(a.acked_at) >= bound)
            .map(|(k, _)| *k)
            .collect();
        for key in due {
            let c = self.copies(key);
            if c < k {
                let holders: Vec<NodeId> = self
                    .slots
                    .iter()
                    .filter(|s| {
                        s.node
                            .as_ref()
                            .is_some_and(|n| n.records().get(key).is_some())
                    })
                    .map(|s| s.id)
                    .collect();
                let mut near: Vec<NodeId> = self.live.keys().copied().collect();
                near.sort_by_key(|id| (key.distance(*id), *id));
                near.truncate(k);
                self.violation(format!(
                    "record {key:?} has {c} live copies, fewer than {k}: held by {holders:?}, replica set {near:?}"
                ));
            }
        }
    }

    /// Registers a record the test expects to survive (its value, for get checks).
    pub fn expect_record(&mut self, key: Key, value: &[u8]) {
        self.acked.insert(
            key,
            AckedRecord {
                value: value.to_vec(),
                acked_at: Instant::from_micros(u64::MAX),
            },
        );
    }

    /// Debug aid: prints who holds the record whose key starts with `prefix` (hex).
    fn trace_key(&self, prefix: &str) {
        for key in self.acked.keys() {
            if !format!("{key}").starts_with(prefix) {
                continue;
            }
            let holders: Vec<String> = self
                .slots
                .iter()
                .filter_map(|s| {
                    let n = s.node.as_ref()?;
                    let r = n.records().get(*key)?;
                    Some(format!(
                        "{:?}(v{} c{:?} live={})",
                        s.id,
                        r.version,
                        r.confirmed,
                        self.live.contains_key(&s.id)
                    ))
                })
                .collect();
            eprintln!("t={:?} {key:?}: {}", self.now, holders.join(" "));
        }
    }

    /// Takes the hop counts gathered so far.
    pub fn take_hops(&mut self) -> Vec<u32> {
        std::mem::take(&mut self.hops)
    }
}

impl Simulation for Sim {
    type Event = Ev;

    fn clock(&mut self) -> &mut Clock<Ev> {
        &mut self.clock
    }

    fn set_now(&mut self, now: Instant) {
        self.now = self.now.max(now);
    }

    fn step(&mut self, ev: Ev) {
        self.stats.events += 1;
        let now = self.now;
        match ev {
            Ev::Deliver { to, from, bytes } => {
                if let Some(n) = self.slots[to].node.as_mut() {
                    n.handle_datagram(now, from, &bytes);
                    self.after_io(to);
                }
            }
            Ev::Timer { slot, incarnation } => {
                let sl = &mut self.slots[slot];
                if !sl.timer.fire(incarnation, now) {
                    return; // superseded
                }
                if let Some(n) = sl.node.as_mut() {
                    n.handle_timeout(now);
                    self.after_io(slot);
                }
            }
        }
    }

    /// Once per simulated second: every acknowledged record keeps its copies.
    fn after_step(&mut self) {
        if self.now.millis_since(self.last_record_check) >= 1000 {
            self.last_record_check = self.now;
            if let Ok(k) = std::env::var("SIM_TRACE_KEY") {
                self.trace_key(&k);
            }
            self.check_records();
        }
    }
}
