//! The overlay bench at a few thousand nodes (CI-sized; `unipeer bench overlay --nodes
//! 100000` is the full-size run): exercises the simulator's fast paths (the agenda's wheel and
//! its overflow, address decoding, the ranked live set under churn) and the figures built on
//! them: hops, relative delay penalty, consistency in every churn regime, memory per node.

#[global_allocator]
static HEAP: &unipeer_sim::heap::CountingAlloc = &unipeer_sim::heap::COUNTING;

use unipeer_sim::bench::{BenchConfig, run};

#[test]
fn bench_at_3000_nodes() {
    let mut cfg = BenchConfig::new(3000);
    cfg.measure_s = 20;
    let r = run(&cfg);
    eprintln!("{r:#?}");
    assert!(r.mean_hops <= r.log16_n, "{r:?}");
    assert_eq!(r.no_churn.issued, r.no_churn.consistent, "{r:?}");
    // Every regime issued lookups and the churning ones replaced nodes.
    for c in [&r.churn_3h, &r.churn_10min, &r.churn_bamboo] {
        assert!(c.issued > 0 && c.answered > 0, "{r:?}");
        assert!(c.consistent <= c.consistent_at_answer, "{r:?}");
    }
    assert!(r.churn_10min.churn_events > 0, "{r:?}");
    assert!(
        r.churn_bamboo.churn_events > r.churn_10min.churn_events,
        "{r:?}"
    );
    assert!(r.churn_10min.percent().unwrap() >= 99.5, "{r:?}");
    assert!(r.churn_bamboo.percent_at_answer().unwrap() >= 99.0, "{r:?}");
    // The latency model obeys the triangle inequality: a route is never shorter than direct.
    assert!(r.rdp_samples > 1000, "{r:?}");
    assert!(r.rdp_p50 >= 1.0 && r.rdp_mean >= r.rdp_p50 * 0.5, "{r:?}");
    let mem = r.memory_per_node_bytes.expect("counted");
    assert!((2_000..64_000).contains(&mem), "{r:?}");
    assert!(r.events_per_sim_s > 3000.0 * 5.0, "{r:?}");
}
