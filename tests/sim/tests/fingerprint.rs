//! A per-seed fingerprint of whole scenario runs (small N, a few seeds): event and datagram
//! counts, formation and healing times. Refactors that claim "behaviour unchanged" compare
//! this output before and after (`cargo test -p unipeer-sim --test fingerprint -- --nocapture`).

use unipeer_sim::scenario;

#[test]
fn scenario_fingerprints() {
    for seed in [3u64, 7, 11] {
        let r = scenario::run(seed, 40).unwrap_or_else(|e| panic!("{e}"));
        let s = &r.stats;
        eprintln!(
            "fingerprint seed {seed}: formed {} ms, healed {} ms, lookups {}, records {}, events {}, sent {}, lost {}, done {}/{}, failed {}, joins {}, crashes {}",
            r.formation_ms,
            r.converge_ms,
            r.lookups_checked,
            r.records_checked,
            r.events,
            s.datagrams_sent,
            s.datagrams_lost,
            s.lookups_consistent,
            s.lookups_done,
            s.requests_failed,
            s.joins,
            s.crashes
        );
        assert!(r.events > 0 && s.joins >= 40, "a run that did nothing");
    }
}
