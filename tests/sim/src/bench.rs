//! The simulated overlay benchmark behind `unipeer bench overlay`: hops against log16 N, the
//! relative delay penalty of routes (proximity neighbour selection on a latency model), lookup
//! consistency without churn and under three churn regimes (exponential sessions, down to
//! Bamboo's hardest, a median session of 1.4 minutes), upkeep bytes per node, memory per node
//! (measured by a counting allocator, see [`crate::heap`]), and the simulator's own speed.
//!
//! The latency model is Pastry's for its proximity experiments: every node a point of its own
//! in a square, one-way latency a 200 µs floor plus the distance at 100 ms per side
//! ([`crate::network::Topology::plane`]).
//!
//! Consistent means what the overlay issue says: the lookup's answer is the ground-truth root
//! (the live node numerically closest to the key) at the instant the answer arrives.

use crate::{Sim, SimConfig};
use std::time::Instant as WallClock;
use unipeer_node::Instant;
use unipeer_node::id::Id;

/// Simulated seconds after each regime in which the last lookups finish.
const DRAIN_S: u64 = 20;

/// The latency model: a floor and the square's side, microseconds one way.
pub const PLANE_FLOOR_US: u64 = 200;
pub const PLANE_SIDE_US: u64 = 100_000;

/// Bamboo's hardest churn: exponential sessions with a median of 1.4 minutes.
pub const BAMBOO_MEDIAN_SESSION_S: f64 = 84.0;

/// One benchmark run's parameters.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub nodes: usize,
    pub seed: u64,
    /// Simulated seconds measured per regime.
    pub measure_s: u64,
    /// Lookups per simulated second, over the whole overlay.
    pub lookups_per_s: u64,
}

impl BenchConfig {
    pub fn new(nodes: usize) -> Self {
        BenchConfig {
            nodes,
            seed: 1,
            measure_s: 60,
            lookups_per_s: (nodes as u64 / 10).clamp(50, 500),
        }
    }
}

/// Lookup outcomes in one regime.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Consistency {
    pub issued: u64,
    pub answered: u64,
    pub consistent: u64,
    /// Answered by the node that was the true root when it answered (a root that died while
    /// its answer was in flight counts here, not in `consistent`).
    pub consistent_at_answer: u64,
    pub failed: u64,
    /// Lookups whose issuing node crashed before the answer (not counted in `issued`).
    pub orphaned: u64,
    /// Nodes that crashed (and were replaced by new ones) during the regime.
    pub churn_events: u64,
    /// Upkeep bytes sent per node per second during the regime.
    pub upkeep_bytes_per_node_s: f64,
}

impl Consistency {
    /// Consistent answers over lookups issued, in percent: a lookup that never answers is not
    /// consistent. `None` when none was issued (no figure, not 0 % nor 100 %).
    pub fn percent(&self) -> Option<f64> {
        (self.issued > 0).then(|| 100.0 * self.consistent as f64 / self.issued as f64)
    }

    /// [`Consistency::percent`] judged when the root answered.
    pub fn percent_at_answer(&self) -> Option<f64> {
        (self.issued > 0).then(|| 100.0 * self.consistent_at_answer as f64 / self.issued as f64)
    }
}

/// What one benchmark run measured.
#[derive(Clone, Debug, PartialEq)]
pub struct BenchResult {
    pub nodes: usize,
    pub log16_n: f64,
    pub mean_hops: f64,
    pub p99_hops: u32,
    pub no_churn: Consistency,
    /// Exponential sessions, median 3 hours.
    pub churn_3h: Consistency,
    /// Exponential sessions, median 10 minutes.
    pub churn_10min: Consistency,
    /// Exponential sessions, median 1.4 minutes (Bamboo's hardest regime).
    pub churn_bamboo: Consistency,
    /// Relative delay penalty of the lookups answered without churn: mean, median, p90, and
    /// how many lookups it is over. NaN when none.
    pub rdp_mean: f64,
    pub rdp_p50: f64,
    pub rdp_p90: f64,
    pub rdp_samples: usize,
    /// Heap bytes a node holds, measured by the counting allocator (what dropping each live
    /// node at the end of the run frees, averaged), plus the node's own struct. `None` when
    /// the binary did not install [`crate::heap::COUNTING`].
    pub memory_per_node_bytes: Option<usize>,
    /// Wall-clock seconds per simulated minute (whole overlay), without churn.
    pub wall_s_per_sim_minute: f64,
    /// CPU seconds of the simulating thread per simulated minute, without churn (the wall time
    /// less what other processes on the machine took); `None` where Linux's
    /// `/proc/thread-self/schedstat` is missing.
    pub cpu_s_per_sim_minute: Option<f64>,
    /// Simulator events (datagram deliveries, timers) per simulated second, without churn.
    pub events_per_sim_s: f64,
    /// Wall-clock seconds of the whole run (formation included).
    pub wall_s_total: f64,
    /// Simulated seconds it took the overlay to form.
    pub formation_s: f64,
}

/// Forms an overlay of `cfg.nodes` and measures it in three regimes.
pub fn run(cfg: &BenchConfig) -> BenchResult {
    let wall_start = WallClock::now();
    let mut sc = SimConfig::new(cfg.seed);
    sc.plane = Some((PLANE_FLOOR_US, PLANE_SIDE_US));
    let mut sim = Sim::new(sc);
    if std::env::var("SIM_BYTES").is_ok() {
        sim.bytes_by_kind = Some(Default::default());
    }
    let n = cfg.nodes;

    // Formation: one node every 5 ms, each through a random joined node.
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
    let formation_start = Instant::ZERO;
    while sim.live_count() < n && sim.now.millis_since(formation_start) < 600_000 {
        let t = sim.now.plus_ms(1000);
        sim.run_until(t);
    }
    let formation_s = sim.now.as_micros() as f64 / 1e6;
    // Warm up: let tables fill and repair settle.
    let t = sim.now.plus_ms(30_000);
    sim.run_until(t);

    let wall = WallClock::now();
    let cpu = thread_cpu_s();
    let events = sim.stats.events;
    sim.rdp = Some(Vec::new());
    let no_churn = measure(&mut sim, cfg, None);
    // The regime runs `measure_s` and then `DRAIN_S` for the last answers.
    let sim_minutes = (cfg.measure_s + DRAIN_S) as f64 / 60.0;
    let wall_s_per_sim_minute = wall.elapsed().as_secs_f64() / sim_minutes;
    let cpu_s_per_sim_minute = thread_cpu_s()
        .zip(cpu)
        .map(|(after, before)| (after - before) / sim_minutes);
    let events_per_sim_s = (sim.stats.events - events) as f64 / (sim_minutes * 60.0);
    let mut rdp = sim.rdp.take().unwrap_or_default();
    let hops = sim.take_hops();
    let churn_3h = measure(&mut sim, cfg, Some(3.0 * 3600.0));
    let churn_10min = measure(&mut sim, cfg, Some(600.0));
    let churn_bamboo = measure(&mut sim, cfg, Some(BAMBOO_MEDIAN_SESSION_S));
    let memory_per_node_bytes = measure_memory(&mut sim);

    rdp.sort_unstable_by(f32::total_cmp);
    let quantile = |q: f64| {
        rdp.get(((rdp.len() as f64 * q) as usize).min(rdp.len().saturating_sub(1)))
            .map_or(f64::NAN, |r| f64::from(*r))
    };
    let rdp_mean = if rdp.is_empty() {
        f64::NAN
    } else {
        rdp.iter().map(|r| f64::from(*r)).sum::<f64>() / rdp.len() as f64
    };

    let mut sorted = hops.clone();
    sorted.sort_unstable();
    // No lookup answered: no hop count (NaN fails every target), never 0 hops.
    let mean_hops = if hops.is_empty() {
        f64::NAN
    } else {
        hops.iter().map(|h| *h as f64).sum::<f64>() / hops.len() as f64
    };
    let p99_hops = sorted
        .get((sorted.len() * 99 / 100).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0);
    BenchResult {
        nodes: n,
        log16_n: (n as f64).log(16.0),
        mean_hops,
        p99_hops,
        no_churn,
        churn_3h,
        churn_10min,
        churn_bamboo,
        rdp_mean,
        rdp_p50: quantile(0.5),
        rdp_p90: quantile(0.9),
        rdp_samples: rdp.len(),
        memory_per_node_bytes,
        wall_s_per_sim_minute,
        cpu_s_per_sim_minute,
        events_per_sim_s,
        wall_s_total: wall_start.elapsed().as_secs_f64(),
        formation_s,
    }
}

/// Runs one regime for `cfg.measure_s` simulated seconds. With `median_session_s`, sessions
/// are exponential with that median: the population's departures are a Poisson process of
/// rate `N ln 2 / median`; each departed node (a crash, no goodbye) is replaced by a new node
/// with a new id joining through a random live node, so N stays constant.
fn measure(sim: &mut Sim, cfg: &BenchConfig, median_session_s: Option<f64>) -> Consistency {
    let before = sim.stats.clone();
    let bytes_before = sim.maintenance_bytes();
    let start = sim.now;
    let end = start.plus_ms(cfg.measure_s * 1000);
    let tick_ms = 10u64;
    let lookups_per_tick = cfg.lookups_per_s as f64 * tick_ms as f64 / 1000.0;
    let departure_rate_per_ms =
        median_session_s.map(|m| sim.live_count() as f64 * std::f64::consts::LN_2 / (m * 1000.0));
    let mut next_departure = departure_rate_per_ms.map(|r| start.plus_ms(exp_ms(sim, r)));
    let mut owed = 0.0;
    let mut issued = 0;
    let mut churn_events = 0;
    while sim.now < end {
        let t = sim.now.plus_ms(tick_ms);
        sim.run_until(t);
        while let (Some(at), Some(rate)) = (next_departure, departure_rate_per_ms)
            && at <= sim.now
        {
            if let Some(victim) = sim.random_live() {
                sim.crash(victim);
                let fresh = sim.add_node();
                let boot = sim.random_live().unwrap_or(0);
                sim.start(fresh, &[boot]);
                churn_events += 1;
            }
            next_departure = Some(at.plus_ms(exp_ms(sim, rate)));
        }
        owed += lookups_per_tick;
        while owed >= 1.0 {
            owed -= 1.0;
            if let Some(from) = sim.random_live() {
                let key = Id(sim.rng.next_u128());
                if sim.lookup(from, key).is_some() {
                    issued += 1;
                }
            }
        }
    }
    let bytes = sim.maintenance_bytes() - bytes_before;
    if let Some(t) = sim.bytes_by_kind.as_mut() {
        eprintln!("bytes by kind ({median_session_s:?}): {t:?}");
        t.clear();
    }
    // Let the last lookups finish (no new ones, no churn).
    let t = sim.now.plus_ms(DRAIN_S * 1000);
    sim.run_until(t);
    let s = &sim.stats;
    let orphaned = s.orphaned - before.orphaned;
    Consistency {
        issued: issued - orphaned,
        orphaned,
        answered: s.lookups_done - before.lookups_done,
        consistent: s.lookups_consistent - before.lookups_consistent,
        consistent_at_answer: s.lookups_consistent_at_answer - before.lookups_consistent_at_answer,
        failed: s.requests_failed - before.requests_failed,
        churn_events,
        upkeep_bytes_per_node_s: bytes as f64 / (cfg.nodes as f64 * cfg.measure_s as f64),
    }
}

/// Memory per node, measured: each live node is taken out of the simulation and dropped, and
/// the counting allocator says what the drop freed (the node's tables, leaf set, records,
/// queues, with their spare capacity). Ends the simulation's usefulness: run it last.
fn measure_memory(sim: &mut Sim) -> Option<usize> {
    let live = sim.live_slots();
    let mut freed = 0usize;
    for &slot in &live {
        let node = sim.slots[slot].node.take();
        freed += crate::heap::freed_by(|| drop(node))?;
    }
    Some(freed / live.len().max(1) + std::mem::size_of::<unipeer_node::Node>())
}

/// CPU seconds the calling thread has run, from Linux's scheduler statistics.
fn thread_cpu_s() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/thread-self/schedstat").ok()?;
    let ns: u64 = s.split_whitespace().next()?.parse().ok()?;
    Some(ns as f64 / 1e9)
}

/// An exponential interval in milliseconds for a rate per millisecond (at least 1 ms).
fn exp_ms(sim: &mut Sim, rate_per_ms: f64) -> u64 {
    let u = sim.rng.unit_f64();
    ((-(1.0 - u).ln() / rate_per_ms) as u64).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unanswered_lookups_count_against_consistency() {
        let c = Consistency {
            issued: 10,
            answered: 9,
            consistent: 9,
            ..Default::default()
        };
        assert_eq!(c.percent(), Some(90.0));
        assert_eq!(Consistency::default().percent(), None);
    }

    #[test]
    fn small_bench_meets_the_targets() {
        let mut cfg = BenchConfig::new(200);
        cfg.measure_s = 30;
        let r = run(&cfg);
        assert!(r.mean_hops <= r.log16_n, "{r:?}");
        assert_eq!(r.no_churn.consistent, r.no_churn.answered, "{r:?}");
        assert_eq!(r.no_churn.answered, r.no_churn.issued, "{r:?}");
        assert!(r.no_churn.upkeep_bytes_per_node_s <= 500.0, "{r:?}");
        assert!(r.churn_10min.churn_events > 0, "{r:?}");
        assert!(r.churn_10min.percent().unwrap() >= 99.0, "{r:?}");
        // Measured by the counting allocator this test binary installs: a node holds at least
        // its leaf set and routing table on the heap.
        let mem = r.memory_per_node_bytes.expect("memory measured");
        assert!(
            mem > std::mem::size_of::<unipeer_node::Node>() + 1024,
            "{r:?}"
        );
    }
}
