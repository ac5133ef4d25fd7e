//! The service directory in simulation: completeness, nearest answers, load spread against
//! the single-root baseline, freshness, through churn and a partition (see
//! `unipeer_sim::directory`). Seeds replay with `SIM_SEED`.

use unipeer_sim::directory::{DirReport, DirSimConfig, run};
use unipeer_sim::harness;

const REPLAY: &str = "cargo test -p unipeer-sim --test directory";

fn check(
    seed: u64,
    r: &DirReport,
    nearest_min: f64,
    load_max: f64,
    extra_hops: f64,
) -> Result<(), String> {
    let fail = |what: String| Err(harness::failure(seed, &what, REPLAY));
    if r.unique_total == 0 || r.unique_found != r.unique_total {
        return fail(format!(
            "unique providers found {}/{} (every live provider must be found)",
            r.unique_found, r.unique_total
        ));
    }
    let nearest = r.nearest_percent().unwrap_or(0.0);
    if nearest < nearest_min {
        return fail(format!(
            "nearest answers {nearest:.1} % < {nearest_min} % ({}/{})",
            r.nearest_hits, r.nearest_total
        ));
    }
    if r.lookups_answered * 100 < r.lookups_issued * 95 {
        return fail(format!(
            "answered {}/{} lookups",
            r.lookups_answered, r.lookups_issued
        ));
    }
    let (dh, ph) = (DirReport::mean(&r.hops), DirReport::mean(&r.plain_hops));
    if dh.is_nan() || ph.is_nan() || dh > ph + extra_hops {
        return fail(format!("discover hops {dh:.2} > plain lookup hops {ph:.2}"));
    }
    for (name, load, base) in [
        ("records", r.records, r.baseline_records),
        ("lookups", r.lookups_load, r.baseline_lookups),
    ] {
        let rel = load.ratio() / base.ratio();
        if rel.is_nan() || rel > load_max {
            return fail(format!(
                "{name} max/mean {:.1} is {rel:.3} of the single-root {:.1} (> {load_max})",
                load.ratio(),
                base.ratio()
            ));
        }
    }
    for (i, f) in r.freshness_ms.iter().enumerate() {
        match f {
            Some(ms) if *ms <= r.ttl_ms + 1_500 => {}
            _ => {
                return fail(format!(
                    "crashed provider {i} still advertised after {f:?} ms (TTL {} ms)",
                    r.ttl_ms
                ));
            }
        }
    }
    if r.answers_after_crash == 0 || r.stale_answers > 0 {
        return fail(format!(
            "{} of {} answers after the TTL named a crashed provider",
            r.stale_answers, r.answers_after_crash
        ));
    }
    Ok(())
}

#[test]
fn directory_finds_nearest_spreads_load_and_forgets_the_dead() {
    for seed in harness::seeds(1..3) {
        let mut cfg = DirSimConfig::new(1000, seed);
        cfg.lookups = 400;
        let r = run(&cfg);
        check(seed, &r, 85.0, 0.25, 0.0).unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn directory_survives_churn_and_a_partition() {
    for seed in harness::seeds(10..12) {
        let mut cfg = DirSimConfig::new(1000, seed);
        cfg.lookups = 400;
        cfg.measure_s = 60;
        cfg.churn_fraction = 0.1;
        cfg.partition_s = 15;
        let r = run(&cfg);
        // Under churn and a partition the routing tables are in repair: looser bounds on
        // nearness, load and hops (the steady test holds the targets).
        check(seed, &r, 85.0, 0.4, 0.5).unwrap_or_else(|e| panic!("{e}"));
    }
}
