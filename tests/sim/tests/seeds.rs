//! The seeded scenarios: >= 200 seeds with N in 64..=256, and `SIM_SEED` replay.

use unipeer_sim::scenario::{self, nodes_for_seed};

fn run_seeds(seeds: std::ops::Range<u64>) {
    if scenario::replay_seed().is_some() {
        return; // `replay` runs the one seed asked for
    }
    let mut failures = Vec::new();
    for seed in seeds {
        match scenario::run(seed, nodes_for_seed(seed)) {
            Ok(r) => eprintln!(
                "seed {seed}: N={} formed in {} ms, healed in {} ms, {} lookups, {} records, {} events",
                r.nodes,
                r.formation_ms,
                r.converge_ms,
                r.lookups_checked,
                r.records_checked,
                r.events
            ),
            Err(e) => {
                eprintln!("{e}");
                failures.push(e);
            }
        }
    }
    assert!(
        failures.is_empty(),
        "{} seeds failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn replay() {
    if let Some(seed) = scenario::replay_seed() {
        let r = scenario::run(seed, nodes_for_seed(seed)).unwrap_or_else(|e| panic!("{e}"));
        eprintln!("{r:?}");
    }
}

#[test]
fn seeds_000_049() {
    run_seeds(0..50);
}

#[test]
fn seeds_050_099() {
    run_seeds(50..100);
}

#[test]
fn seeds_100_149() {
    run_seeds(100..150);
}

#[test]
fn seeds_150_199() {
    run_seeds(150..200);
}
