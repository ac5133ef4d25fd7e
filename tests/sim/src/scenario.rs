//! The seeded fault scenario (VOPR style): form an overlay, run a workload through loss,
//! duplication, reordering, a partition, crashes, graceful leaves and restarts, then heal and
//! demand convergence within a stated bound.
//!
//! Phases and bounds:
//! 1. formation: N nodes join over `N x 20 ms`; all must have joined within 30 s after that,
//!    and every leaf set must equal the ground truth within `FORMATION_BOUND_MS`.
//! 2. faults for `FAULT_PHASE_MS`: lookups, puts and gets throughout; loss up to 3 %,
//!    duplication up to 2 %, reordering up to 10 %; one partition of 5-20 s; a crash or leave
//!    every ~20 s (never `k` within the repair bound), each restarted (same id, empty state)
//!    after 2-20 s.
//! 3. liveness: heal; within `LIVENESS_BOUND_MS` every leaf set equals the ground truth; then
//!    every lookup ends at the live node numerically closest to its key, every acknowledged
//!    record has `k` live copies and its root returns it.

use crate::{Outcome, Sim, SimConfig};
use unipeer_node::Instant;
use unipeer_node::id::{Id, Key};
use unipeer_node::node::{OpId, RequestKind};
use unipeer_node::rng::Rng;

/// Formation bound: all leaf sets exact this long after the last node joined.
pub const FORMATION_BOUND_MS: u64 = 30_000;
/// Length of the fault phase.
pub const FAULT_PHASE_MS: u64 = 60_000;
/// Liveness bound: all leaf sets exact this long after the network heals.
pub const LIVENESS_BOUND_MS: u64 = 60_000;

/// What a passing run measured.
#[derive(Clone, Debug)]
pub struct ScenarioReport {
    pub seed: u64,
    pub nodes: usize,
    pub formation_ms: u64,
    pub converge_ms: u64,
    pub lookups_checked: usize,
    pub records_checked: usize,
    pub events: u64,
    pub stats: crate::SimStats,
}

/// The node count a seed runs with (64..=256), so a replay needs only the seed.
pub fn nodes_for_seed(seed: u64) -> usize {
    64 + Rng::from_u64(seed ^ 0x5eed).below(193) as usize
}

pub use crate::harness::replay_seed;

fn step_until(sim: &mut Sim, until: Instant) {
    sim.run_until(until);
}

fn fail(sim: &Sim, what: String) -> String {
    let mut s = crate::harness::failure(
        sim.cfg.seed,
        &format!("(N={}) {what}", sim.slots.len()),
        "cargo test -p unipeer-sim --test seeds replay -- --nocapture",
    );
    for v in &sim.violations {
        s.push_str("\n  violation: ");
        s.push_str(v);
    }
    s
}

/// Waits (checking once per simulated second) until `ok`, at most `bound_ms`; returns the time
/// it took.
fn wait_for(sim: &mut Sim, bound_ms: u64, mut ok: impl FnMut(&Sim) -> bool) -> Option<u64> {
    let start = sim.now;
    loop {
        if ok(sim) {
            return Some(sim.now.millis_since(start));
        }
        if sim.now.millis_since(start) >= bound_ms {
            return None;
        }
        let t = sim.now.plus_ms(1000);
        step_until(sim, t);
    }
}

fn random_key(sim: &mut Sim) -> Key {
    Id(sim.rng.next_u128())
}

/// Starts `slot` through two random live bootstrap nodes.
fn start_via_live(sim: &mut Sim, slot: usize) {
    let mut boot = Vec::new();
    for _ in 0..2 {
        if let Some(b) = sim.random_live()
            && b != slot
        {
            boot.push(b);
        }
    }
    sim.start(slot, &boot);
}

/// Runs the scenario for `seed` with `nodes` nodes.
pub fn run(seed: u64, nodes: usize) -> Result<ScenarioReport, String> {
    let mut cfg = SimConfig::new(seed);
    let mut pre = Rng::from_u64(seed ^ 0x00c0_ffee);
    cfg.servers = 2 + pre.below(7) as usize;
    let mut sim = Sim::new(cfg);
    let k = sim.cfg.replicas;

    // 1. Formation.
    for _ in 0..nodes {
        sim.add_node();
    }
    sim.start(0, &[]);
    let window_ms = nodes as u64 * 20;
    let mut starts: Vec<(u64, usize)> = (1..nodes)
        .map(|i| (sim.rng.below(window_ms * 1000), i))
        .collect();
    starts.sort();
    for (at, slot) in starts {
        step_until(&mut sim, Instant::from_micros(at));
        start_via_live(&mut sim, slot);
    }
    if wait_for(&mut sim, 30_000, |s| s.live_count() == nodes).is_none() {
        return Err(fail(
            &sim,
            format!("only {} of {nodes} joined", sim.live_count()),
        ));
    }
    let Some(formation_ms) = wait_for(&mut sim, FORMATION_BOUND_MS, |s| {
        s.check_leaf_sets().is_ok()
    }) else {
        let why = sim.check_leaf_sets().unwrap_err();
        return Err(fail(&sim, format!("formation did not converge: {why}")));
    };
    if !sim.violations.is_empty() {
        return Err(fail(&sim, "safety violated during formation".into()));
    }

    // 2. Faults.
    let phase_start = sim.now;
    sim.faults.loss = sim.rng.unit_f64() * 0.03;
    sim.faults.duplicate = sim.rng.unit_f64() * 0.02;
    sim.faults.reorder = sim.rng.unit_f64() * 0.10;
    let part_at = 5_000 + sim.rng.below(30_000);
    let part_len = 5_000 + sim.rng.below(15_000);
    let mut crash_at: Vec<u64> = (0..3)
        .map(|i| 10_000 + i * 20_000 + sim.rng.below(3_000))
        .collect();
    let mut restarts: Vec<(u64, usize)> = Vec::new();
    let mut record_keys: Vec<Key> = Vec::new();
    let mut partitioned = false;
    let tick_ms = 100;
    let mut t_ms = 0;
    while t_ms < FAULT_PHASE_MS {
        t_ms += tick_ms;
        step_until(&mut sim, phase_start.plus_ms(t_ms));
        if !partitioned && t_ms >= part_at && t_ms < part_at + part_len {
            partitioned = true;
            let groups = partition_groups(&mut sim);
            sim.set_partition(Some(groups));
        } else if partitioned && t_ms >= part_at + part_len {
            partitioned = false;
            sim.set_partition(None);
        }
        if crash_at.first().is_some_and(|c| t_ms >= *c) {
            crash_at.remove(0);
            if let Some(victim) = sim.random_live() {
                if std::env::var("SIM_DEBUG").is_ok() {
                    eprintln!("t={:?} crash {:?}", sim.now, sim.slots[victim].id);
                }
                if sim.rng.chance(0.25) {
                    sim.leave(victim);
                } else {
                    sim.crash(victim);
                }
                let back = (t_ms + 2_000 + sim.rng.below(18_000)).min(FAULT_PHASE_MS - tick_ms);
                restarts.push((back, victim));
            }
        }
        while let Some(i) = restarts.iter().position(|(at, _)| t_ms >= *at) {
            let (_, slot) = restarts.swap_remove(i);
            start_via_live(&mut sim, slot);
        }
        // Workload: ~10 lookups/s, a put every 2 s, a get every second.
        if let Some(from) = sim.random_live() {
            let key = random_key(&mut sim);
            sim.lookup(from, key);
        }
        if t_ms % 2_000 == 0
            && let Some(from) = sim.random_live()
        {
            let key = random_key(&mut sim);
            let value = key.to_bytes()[..8].to_vec();
            sim.expect_record(key, &value);
            sim.put(from, key, &value);
            record_keys.push(key);
        }
        if t_ms % 1_000 == 0
            && !record_keys.is_empty()
            && let Some(from) = sim.random_live()
        {
            let key = record_keys[sim.rng.below(record_keys.len() as u64) as usize];
            sim.get(from, key);
        }
    }
    for (_, slot) in restarts {
        start_via_live(&mut sim, slot);
    }
    if !sim.violations.is_empty() {
        return Err(fail(&sim, "safety violated during the fault phase".into()));
    }

    // 3. Liveness.
    sim.set_partition(None);
    sim.faults.loss = 0.0;
    sim.faults.duplicate = 0.0;
    sim.faults.reorder = 0.0;
    let expected = sim.slots.len();
    let Some(converge_ms) = wait_for(&mut sim, LIVENESS_BOUND_MS, |s| {
        s.live_count() == expected && s.check_leaf_sets().is_ok()
    }) else {
        let why = sim
            .check_leaf_sets()
            .err()
            .unwrap_or_else(|| format!("{} of {expected} live", sim.live_count()));
        return Err(fail(
            &sim,
            format!("no convergence within {LIVENESS_BOUND_MS} ms: {why}"),
        ));
    };

    // Lookups from every node, and for every record, must reach the true root.
    let mut checks: Vec<(usize, OpId)> = Vec::new();
    for slot in sim.live_slots() {
        for _ in 0..2 {
            let key = random_key(&mut sim);
            if let Some(op) = sim.lookup(slot, key) {
                checks.push((slot, op));
            }
        }
    }
    // Records acknowledged during the faults: wait out the repair bound from the heal.
    let whole_for = sim.cfg.repair_bound_ms + sim.cfg.timing.record_refresh_ms;
    let until = sim.now.plus_ms(whole_for.saturating_sub(converge_ms));
    step_until(&mut sim, until);
    let mut records_checked = 0;
    let acked: Vec<(Key, Vec<u8>)> = sim
        .acked
        .iter()
        .filter(|(_, a)| a.acked_at != Instant::from_micros(u64::MAX))
        .map(|(k, a)| (*k, a.value.clone()))
        .collect();
    let mut gets = Vec::new();
    for (key, _) in &acked {
        let c = sim.copies(*key);
        if c < k {
            return Err(fail(
                &sim,
                format!("record {key:?} has {c} copies after healing"),
            ));
        }
        if let Some(from) = sim.random_live()
            && let Some(op) = sim.get(from, *key)
        {
            gets.push((from, op));
        }
        records_checked += 1;
    }
    let until = sim.now.plus_ms(10_000);
    step_until(&mut sim, until);
    for (slot, op) in checks.iter().chain(gets.iter()) {
        let t = &sim.ops[&(*slot, *op)];
        match &t.outcome {
            Outcome::Done {
                consistent: true,
                hops,
                ..
            } => {
                if t.kind == RequestKind::Get && *hops == 0 {
                    let holders: Vec<_> = sim
                        .slots
                        .iter()
                        .filter(|s| {
                            s.node
                                .as_ref()
                                .is_some_and(|n| n.records().get(t.key).is_some())
                        })
                        .map(|s| s.id)
                        .collect();
                    let root = sim.truth_root(t.key);
                    return Err(fail(
                        &sim,
                        format!(
                            "get of {:?} found nothing at its root {root:?}; held by {holders:?}",
                            t.key
                        ),
                    ));
                }
            }
            other => {
                let truth = sim.truth_root(t.key);
                return Err(fail(
                    &sim,
                    format!(
                        "after healing, {:?} of {:?} ended {other:?}; true root {truth:?}",
                        t.kind, t.key
                    ),
                ));
            }
        }
    }
    if !sim.violations.is_empty() {
        return Err(fail(&sim, "safety violated".into()));
    }
    Ok(ScenarioReport {
        seed,
        nodes,
        formation_ms,
        converge_ms,
        lookups_checked: checks.len(),
        records_checked,
        events: sim.stats.events,
        stats: sim.stats.clone(),
    })
}

/// A partition: random halves, one server cut off, or a small group cut off.
fn partition_groups(sim: &mut Sim) -> Vec<u8> {
    let n = sim.slots.len();
    match sim.rng.below(3) {
        0 => (0..n).map(|_| sim.rng.below(2) as u8).collect(),
        1 => {
            let server = sim.rng.below(sim.cfg.servers as u64) as usize;
            (0..n)
                .map(|i| u8::from(sim.slots[i].server == server))
                .collect()
        }
        _ => {
            let mut g = vec![0u8; n];
            for _ in 0..1 + sim.rng.below(5) {
                g[sim.rng.below(n as u64) as usize] = 1;
            }
            g
        }
    }
}
