//! The service directory in simulation (the directory issue): every node advertises itself
//! under the `node` service; lookups from random nodes with random requirements are checked
//! against ground truth (the attributes the simulator gave, who is live, the topology).
//!
//! Measured: completeness (a provider with a unique application is found by anyone),
//! nearest answers (the first provider is as near as the nearest live matching one: same
//! server class, then latency), hops against a plain DHT lookup of the ServiceId from the same
//! nodes, directory load (records and lookups per node, max/mean) against storing everything
//! at the ServiceId's root, freshness (a crashed provider's advert gone from every directory
//! node), and stale answers (a provider dead for longer than the TTL named in an answer).

use crate::{Outcome, Sim, SimConfig};
use std::collections::{BTreeMap, HashMap};
use unipeer_node::Instant;
use unipeer_node::directory::{Attributes, DirectoryConfig, NODE_SERVICE, Requirement, service_id};
use unipeer_node::id::NodeId;
use unipeer_node::node::OpId;

/// One directory simulation's parameters.
#[derive(Clone, Debug)]
pub struct DirSimConfig {
    pub nodes: usize,
    pub seed: u64,
    pub directory: DirectoryConfig,
    /// Nearest-provider lookups issued (spread over `measure_s`).
    pub lookups: usize,
    /// Providers given a unique application (completeness probes), each looked up once.
    pub unique_providers: usize,
    /// Simulated seconds of measurement.
    pub measure_s: u64,
    /// Providers crashed for the freshness measurement.
    pub crashed_providers: usize,
    /// Churn during the measurement: this fraction of nodes crash and as many new ones join.
    pub churn_fraction: f64,
    /// A two-way partition for this many simulated seconds in the middle of the run.
    pub partition_s: u64,
}

impl DirSimConfig {
    pub fn new(nodes: usize, seed: u64) -> Self {
        DirSimConfig {
            nodes,
            seed,
            directory: DirectoryConfig::default(),
            lookups: 400,
            unique_providers: 20,
            measure_s: 40,
            crashed_providers: 20,
            churn_fraction: 0.0,
            partition_s: 0,
        }
    }
}

/// Max and mean of a per-node quantity over live nodes.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Load {
    pub max: f64,
    pub mean: f64,
}

impl Load {
    fn of(v: &[u64]) -> Load {
        if v.is_empty() {
            return Load::default();
        }
        Load {
            max: *v.iter().max().unwrap_or(&0) as f64,
            mean: v.iter().sum::<u64>() as f64 / v.len() as f64,
        }
    }

    /// max / mean (NaN when nothing was counted: no figure).
    pub fn ratio(&self) -> f64 {
        if self.mean > 0.0 {
            self.max / self.mean
        } else {
            f64::NAN
        }
    }
}

/// What a directory simulation measured.
#[derive(Clone, Debug, Default)]
pub struct DirReport {
    pub nodes: usize,
    pub lookups_issued: usize,
    pub lookups_answered: usize,
    /// Hops of the answered discovers, and of plain lookups of the ServiceId from the same
    /// askers.
    pub hops: Vec<u32>,
    pub plain_hops: Vec<u32>,
    /// Lookups whose first provider is as near as the nearest live matching one (of those
    /// with any live matching provider other than the asker).
    pub nearest_hits: usize,
    pub nearest_total: usize,
    /// Unique-application providers found (of those looked up while live).
    pub unique_found: usize,
    pub unique_total: usize,
    /// Directory records per node (at the end of measurement) and lookups examined per node.
    pub records: Load,
    pub lookups_load: Load,
    /// The single-root baseline from the same run: every live advert and every lookup at
    /// one node (max = the total, mean = total / live nodes).
    pub baseline_records: Load,
    pub baseline_lookups: Load,
    /// Per crashed provider: ms from its crash until no live directory node holds its advert
    /// (None: still held at the end).
    pub freshness_ms: Vec<Option<u64>>,
    pub ttl_ms: u64,
    /// Answers naming a provider dead for longer than the TTL.
    pub stale_answers: usize,
    /// Answers counted for `stale_answers` (after the crashes).
    pub answers_after_crash: usize,
    pub wall_s: f64,
}

impl DirReport {
    pub fn mean(v: &[u32]) -> f64 {
        if v.is_empty() {
            f64::NAN
        } else {
            v.iter().map(|x| *x as f64).sum::<f64>() / v.len() as f64
        }
    }

    pub fn nearest_percent(&self) -> Option<f64> {
        (self.nearest_total > 0)
            .then(|| 100.0 * self.nearest_hits as f64 / self.nearest_total as f64)
    }
}

/// The attributes the simulator gives node `i` (deterministic from the seed's RNG).
fn attributes(sim: &mut Sim, i: usize) -> Attributes {
    let apps: &[&str] = match i % 3 {
        0 => &["wordcount"],
        1 => &["sha256"],
        _ => &["wordcount", "sha256"],
    };
    Attributes {
        apps: apps.iter().map(|s| s.to_string()).collect(),
        slots: 4,
        free_slots: sim.rng.below(5) as u8,
        memory_mib: 64 * (1 + sim.rng.below(8) as u32),
        cores: 1 + sim.rng.below(4) as u8,
        instances: 0,
        load_pct: sim.rng.below(101) as u8,
    }
}

fn requirement_for(sim: &mut Sim) -> Requirement {
    let terms: &[&str] = match sim.rng.below(4) {
        0 => &["apps=wordcount"],
        1 => &["apps=sha256", "free_slots>=2"],
        2 => &["apps=wordcount,sha256", "memory>=256"],
        _ => &["free_slots>=3", "cores>=2"],
    };
    Requirement::parse(terms.iter().copied()).expect("simulator requirements parse")
}

/// Runs one directory simulation.
pub fn run(cfg: &DirSimConfig) -> DirReport {
    let wall = std::time::Instant::now();
    let mut sc = SimConfig::new(cfg.seed);
    sc.servers = (cfg.nodes / 50).clamp(4, 64);
    sc.directory = cfg.directory;
    let mut sim = Sim::new(sc);
    let n = cfg.nodes;
    for _ in 0..n {
        sim.add_node();
    }
    sim.start(0, &[]);
    for i in 1..n {
        let t = sim.now.plus_ms(5);
        sim.run_until(t);
        let boot = sim.random_live().unwrap_or(0);
        sim.start(i, &[boot]);
    }
    while sim.live_count() < n && sim.now.as_micros() < 600_000_000 {
        let t = sim.now.plus_ms(1000);
        sim.run_until(t);
    }
    let t = sim.now.plus_ms(20_000);
    sim.run_until(t);

    // Every node advertises; some get a unique application too.
    let mut attrs: HashMap<NodeId, Attributes> = HashMap::new();
    let mut unique: Vec<(usize, String)> = Vec::new();
    let live = sim.live_slots();
    for (j, &slot) in live.iter().enumerate() {
        let mut a = attributes(&mut sim, slot);
        if j % (live.len() / cfg.unique_providers.max(1)).max(1) == 0
            && unique.len() < cfg.unique_providers
        {
            let name = format!("u{}", unique.len());
            a.apps.push(name.clone());
            unique.push((slot, name));
        }
        attrs.insert(sim.slots[slot].id, a.clone());
        sim.with_node(slot, |node, now| node.advertise(now, NODE_SERVICE, a))
            .expect("live")
            .expect("advert within bounds");
    }
    // Adverts settle (one refresh round).
    let t = sim.now.plus_ms(u64::from(cfg.directory.ttl_ms) / 2);
    sim.run_until(t);

    let mut report = DirReport {
        nodes: n,
        ttl_ms: u64::from(cfg.directory.ttl_ms),
        ..DirReport::default()
    };
    let examined_before: HashMap<usize, u64> = sim
        .live_slots()
        .into_iter()
        .filter_map(|s| Some((s, sim.node(s)?.directory_counters().lookups_examined)))
        .collect();

    // Measurement: nearest lookups and unique-app lookups spread over measure_s, with the
    // requested churn and partition.
    let service = service_id(NODE_SERVICE);
    let start = sim.now;
    let end = start.plus_ms(cfg.measure_s * 1000);
    let total = cfg.lookups + unique.len();
    let mut nearest_ops: Vec<(usize, OpId, Requirement)> = Vec::new();
    let mut unique_ops: Vec<(usize, OpId, NodeId)> = Vec::new();
    let mut plain_ops: Vec<(usize, OpId)> = Vec::new();
    let churn_total = (cfg.churn_fraction * n as f64) as usize;
    let mut churned = 0;
    let partition_at = start.plus_ms(cfg.measure_s * 1000 / 3);
    let mut partitioned = false;
    let mut healed_at: Option<Instant> = None;
    let mut issued = 0;
    let tick_ms = 50;
    let ticks = (cfg.measure_s * 1000 / tick_ms).max(1) as usize;
    let mut tick = 0;
    while sim.now < end {
        let t = sim.now.plus_ms(tick_ms);
        sim.run_until(t);
        tick += 1;
        if cfg.partition_s > 0 && !partitioned && sim.now >= partition_at {
            let groups: Vec<u8> = (0..sim.slots.len()).map(|i| (i % 2) as u8).collect();
            sim.set_partition(Some(groups));
            partitioned = true;
        }
        if partitioned
            && healed_at.is_none()
            && sim.now >= partition_at.plus_ms(cfg.partition_s * 1000)
        {
            sim.set_partition(None);
            healed_at = Some(sim.now);
        }
        // Churn: crash a random non-unique live node, start a fresh one advertising too.
        let churn_due = churn_total * tick / ticks;
        while churned < churn_due {
            churned += 1;
            let Some(victim) = sim.random_live() else {
                break;
            };
            if unique.iter().any(|(s, _)| *s == victim) {
                continue;
            }
            sim.crash(victim);
            let fresh = sim.add_node();
            let boot = sim.random_live().unwrap_or(0);
            sim.start(fresh, &[boot]);
        }
        // Lookups: only once the network is whole (a partition hides half the providers).
        let in_partition =
            partitioned && healed_at.is_none_or(|h| sim.now.millis_since(h) < 10_000);
        let due = total * tick / ticks;
        while issued < due && !in_partition {
            issued += 1;
            let Some(from) = sim.random_live() else { break };
            if issued <= unique.len() {
                let (provider_slot, name) = unique[issued - 1].clone();
                if !sim.is_up(provider_slot) || from == provider_slot {
                    continue;
                }
                let req = Requirement::parse([format!("apps={name}").as_str()]).expect("parses");
                if let Some(op) = sim.discover(from, NODE_SERVICE, req, 1) {
                    unique_ops.push((from, op, sim.slots[provider_slot].id));
                }
            } else {
                let req = requirement_for(&mut sim);
                if let Some(op) = sim.discover(from, NODE_SERVICE, req.clone(), 2) {
                    nearest_ops.push((from, op, req));
                }
                if let Some(op) = sim.lookup(from, service) {
                    plain_ops.push((from, op));
                }
            }
        }
        // Fresh nodes advertise once joined.
        for slot in sim.live_slots() {
            let id = sim.slots[slot].id;
            if let std::collections::hash_map::Entry::Vacant(e) = attrs.entry(id) {
                let a = attributes(&mut sim, slot);
                e.insert(a.clone());
                sim.with_node(slot, |node, now| node.advertise(now, NODE_SERVICE, a));
            }
        }
    }
    let t = sim.now.plus_ms(6_000);
    sim.run_until(t);

    // Ground truth at the end of measurement (churned nodes are gone or fresh).
    let live: Vec<usize> = sim.live_slots();
    for (from, op, req) in &nearest_ops {
        let Some(ans) = sim.discovered.get(&(*from, *op)) else {
            continue;
        };
        report.lookups_answered += 1;
        report.hops.push(u32::from(ans.hops));
        let from_server = sim.slots[*from].server;
        let rank = |slot: usize| {
            let srv = sim.slots[slot].server;
            (srv != from_server, sim.topology.base_us(from_server, srv))
        };
        let best = live
            .iter()
            .filter(|s| **s != *from)
            .filter(|s| {
                let id = sim.slots[**s].id;
                attrs.get(&id).is_some_and(|a| {
                    req.matches(&unipeer_node::directory::Advert {
                        service,
                        provider: sim.node(**s).expect("live").contact(),
                        attrs: a.clone(),
                        ttl_ms: 1,
                        seq: 0,
                    })
                })
            })
            .map(|s| rank(*s))
            .min();
        let Some(best) = best else { continue };
        report.nearest_total += 1;
        let first = ans
            .providers
            .first()
            .and_then(|p| sim.slots.iter().position(|s| s.id == p.contact.id));
        if first.is_some_and(|f| rank(f) <= best) {
            report.nearest_hits += 1;
        }
    }
    report.lookups_issued = nearest_ops.len();
    for (from, op) in &plain_ops {
        if let Some(t) = sim.ops.get(&(*from, *op))
            && let Outcome::Done { hops, .. } = t.outcome
        {
            report.plain_hops.push(hops as u32);
        }
    }
    for (from, op, provider) in &unique_ops {
        report.unique_total += 1;
        if sim
            .discovered
            .get(&(*from, *op))
            .is_some_and(|a| a.providers.iter().any(|p| p.contact.id == *provider))
        {
            report.unique_found += 1;
        } else if std::env::var("DIR_DEBUG").is_ok() {
            let now = sim.now;
            let holders: Vec<(usize, usize)> = sim
                .live_slots()
                .into_iter()
                .filter(|s| {
                    sim.node(*s)
                        .is_some_and(|n| n.directory_store().holds(now, service, *provider))
                })
                .map(|s| (s, sim.slots[s].id.shared_prefix_len(service)))
                .collect();
            let ans = sim
                .discovered
                .get(&(*from, *op))
                .map(|a| (a.level, a.hops, a.answers));
            let arc: Vec<usize> = sim
                .live_slots()
                .into_iter()
                .filter(|s| sim.slots[*s].id.shared_prefix_len(service) >= 2)
                .collect();
            let short = arc
                .iter()
                .filter(|s| {
                    sim.node(**s)
                        .is_some_and(|n| n.leaf_set().len() < n.leaf_set().capacity())
                })
                .count();
            let (we, wa) = sim.live_slots().into_iter().fold((0, 0), |(a, b), s| {
                let c = sim.node(s).expect("live").directory_counters();
                (a + c.walks_extended, b + c.walk_extension_asked)
            });
            eprintln!(
                "arc size {} ({short} with short leaf sets); walks extended {we}, asked {wa}",
                arc.len()
            );
            eprintln!(
                "unique miss: holders (slot, level) {holders:?}, answer (level, hops, answers) {ans:?}, outcome {:?}",
                sim.ops.get(&(*from, *op)).map(|t| t.outcome.clone())
            );
        }
    }

    // Load: records held and lookups examined per live node.
    let mut records = Vec::new();
    let mut examined = Vec::new();
    let mut adverts_live = 0u64;
    for slot in sim.live_slots() {
        let node = sim.node(slot).expect("live");
        records.push(node.directory_store().len() as u64);
        let before = examined_before.get(&slot).copied().unwrap_or(0);
        examined.push(node.directory_counters().lookups_examined - before);
        adverts_live += 1;
    }
    if std::env::var("DIR_DEBUG").is_ok() {
        let mut v: Vec<(usize, u64, u64, usize)> = sim
            .live_slots()
            .into_iter()
            .map(|s| {
                let n = sim.node(s).expect("live");
                (
                    n.directory_store().len(),
                    n.directory_counters().lookups_examined,
                    n.directory_counters().lookups_answered,
                    n.contact().id.shared_prefix_len(service),
                )
            })
            .collect();
        let hub = sim
            .live_slots()
            .into_iter()
            .max_by_key(|s| sim.node(*s).expect("live").directory_store().len())
            .expect("nodes");
        let hn = sim.node(hub).expect("live");
        let mut servers = std::collections::BTreeMap::new();
        for a in hn.directory_store().adverts() {
            *servers
                .entry(a.provider.server.0 == hn.contact().server.0)
                .or_insert(0) += 1;
        }
        eprintln!(
            "hub same-server adverts: {servers:?}, leaf len {}",
            hn.leaf_set().len()
        );
        v.sort_by_key(|x| std::cmp::Reverse(x.0));
        eprintln!(
            "top records (records, examined, answered, level): {:?}",
            &v[..8]
        );
        v.sort_by_key(|x| std::cmp::Reverse(x.1));
        eprintln!("top lookups: {:?}", &v[..8]);
        let mut levels = std::collections::BTreeMap::new();
        for (f, op, _) in &nearest_ops {
            if let Some(a) = sim.discovered.get(&(*f, *op)) {
                *levels.entry((a.level, a.answers)).or_insert(0) += 1;
            }
        }
        eprintln!("answers by (level, answers): {levels:?}");
    }
    report.records = Load::of(&records);
    report.lookups_load = Load::of(&examined);
    let live_n = records.len().max(1) as f64;
    let lookups_total = (nearest_ops.len() + unique_ops.len()) as f64;
    report.baseline_records = Load {
        max: adverts_live as f64,
        mean: adverts_live as f64 / live_n,
    };
    report.baseline_lookups = Load {
        max: lookups_total,
        mean: lookups_total / live_n,
    };

    // Freshness: crash providers, watch their adverts vanish from every directory node, and
    // keep asking (answers must not name a provider dead for longer than the TTL).
    let mut victims: Vec<(usize, NodeId)> = Vec::new();
    for _ in 0..cfg.crashed_providers {
        if let Some(v) = sim.random_live()
            && !victims.iter().any(|(s, _)| *s == v)
        {
            victims.push((v, sim.slots[v].id));
            sim.crash(v);
        }
    }
    let crashed_at = sim.now;
    let mut gone: BTreeMap<NodeId, Option<u64>> =
        victims.iter().map(|(_, id)| (*id, None)).collect();
    let mut after_ops: Vec<(usize, OpId)> = Vec::new();
    let horizon = u64::from(cfg.directory.ttl_ms) * 2 + 5_000;
    while sim.now.millis_since(crashed_at) < horizon {
        let t = sim.now.plus_ms(250);
        sim.run_until(t);
        let now = sim.now;
        let elapsed = now.millis_since(crashed_at);
        for (id, g) in gone.iter_mut() {
            if g.is_some() {
                continue;
            }
            let held = sim.live_slots().into_iter().any(|s| {
                sim.node(s)
                    .is_some_and(|n| n.directory_store().holds(now, service, *id))
            });
            if !held {
                *g = Some(elapsed);
            }
        }
        if elapsed > u64::from(cfg.directory.ttl_ms) + 2_000
            && let Some(from) = sim.random_live()
            && let Some(op) = sim.discover(from, NODE_SERVICE, Requirement::default(), 8)
        {
            after_ops.push((from, op));
        }
    }
    let t = sim.now.plus_ms(6_000);
    sim.run_until(t);
    report.freshness_ms = gone.values().copied().collect();
    for (from, op) in &after_ops {
        if let Some(a) = sim.discovered.get(&(*from, *op)) {
            report.answers_after_crash += 1;
            if a.providers
                .iter()
                .any(|p| victims.iter().any(|(_, id)| *id == p.contact.id))
            {
                report.stale_answers += 1;
            }
        }
    }
    report.wall_s = wall.elapsed().as_secs_f64();
    report
}
