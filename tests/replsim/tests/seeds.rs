//! The replication simulator over many seeds (`SIM_SEED=N` replays one).

use unipeer_replsim::{SimConfig, run};
use unipeer_sim::harness;

/// `SIM_SEED` alone when set; else the first `SIM_SEEDS` (default 200).
fn seeds() -> Vec<u64> {
    let n = std::env::var("SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(200);
    harness::seeds(0..n)
}

#[test]
fn replication_survives_faults() {
    let mut failures = Vec::new();
    let mut totals = unipeer_replsim::Report::default();
    let seeds = seeds();
    let mut idle = 0usize;
    for &seed in &seeds {
        match run(SimConfig::for_seed(seed)) {
            Ok(r) => {
                // A fault schedule may deny service for a whole run; many may not.
                idle += (r.acked_writes == 0) as usize;
                totals.acked_writes += r.acked_writes;
                totals.lost_by_checker += r.lost_by_checker;
                totals.lost_by_system += r.lost_by_system;
                totals.promotions += r.promotions;
                totals.faults += r.faults;
                totals.converged_after_ms = totals.converged_after_ms.max(r.converged_after_ms);
                totals.steps += r.steps;
            }
            Err(e) => failures.push(harness::failure(
                seed,
                &e,
                "cargo test -p unipeer-replsim --test seeds",
            )),
        }
    }
    eprintln!(
        "{} seeds: {} acknowledged writes, {} promotions, {} faults, lost (checker/system, async) {}/{}, slowest convergence {} ms, {} steps",
        seeds.len(),
        totals.acked_writes,
        totals.promotions,
        totals.faults,
        totals.lost_by_checker,
        totals.lost_by_system,
        totals.converged_after_ms,
        totals.steps
    );
    assert!(totals.acked_writes > 0, "no write acknowledged in any seed");
    assert!(
        idle <= seeds.len() / 100,
        "{idle} of {} seeds acknowledged no write at all",
        seeds.len()
    );
    assert!(
        failures.is_empty(),
        "{} of {} seeds failed:\n{}",
        failures.len(),
        seeds.len(),
        failures.join("\n")
    );
}
