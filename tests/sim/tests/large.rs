//! One run of the fault scenario at N = 1,000.

#[test]
fn scenario_at_1000_nodes() {
    let seed = unipeer_sim::scenario::replay_seed().unwrap_or(1000);
    let r = unipeer_sim::scenario::run(seed, 1000).unwrap_or_else(|e| panic!("{e}"));
    eprintln!("{r:?}");
    assert_eq!(r.nodes, 1000);
}
