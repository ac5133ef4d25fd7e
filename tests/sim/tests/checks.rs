//! The simulator's own checks must be able to fail: ground truth against brute force, and a
//! stale leaf set is caught.

use unipeer_node::Instant;
use unipeer_node::id::Id;
use unipeer_sim::{Outcome, Sim, SimConfig};

fn formed(seed: u64, n: usize) -> Sim {
    let mut sim = Sim::new(SimConfig::new(seed));
    for _ in 0..n {
        sim.add_node();
    }
    sim.start(0, &[]);
    for i in 1..n {
        let t = sim.now.plus_ms(50);
        sim.run_until(t);
        sim.start(i, &[0]);
    }
    let t = sim.now.plus_ms(20_000);
    sim.run_until(t);
    assert_eq!(sim.live_count(), n);
    sim
}

#[test]
fn truth_root_matches_brute_force() {
    let sim = formed(11, 40);
    let ids: Vec<Id> = sim.slots.iter().map(|s| s.id).collect();
    let mut rng = unipeer_node::rng::Rng::from_u64(1);
    for _ in 0..2000 {
        let key = Id(rng.next_u128());
        let brute = ids
            .iter()
            .copied()
            .min_by_key(|id| (key.distance(*id), *id))
            .unwrap();
        assert_eq!(sim.truth_root(key), Some(brute));
    }
}

#[test]
fn leaf_check_catches_a_stale_leaf_set_and_repair_fixes_it() {
    let mut sim = formed(12, 48);
    sim.check_leaf_sets().expect("formed overlay is exact");
    sim.crash(5);
    // Neighbours still list the crashed node: the check must say so.
    let err = sim.check_leaf_sets().unwrap_err();
    assert!(err.contains("extra"), "{err}");
    // Failure detection (leaf_fail_ms = 8 s) and repair put it right.
    let t = sim.now.plus_ms(15_000);
    sim.run_until(t);
    sim.check_leaf_sets().expect("repaired");
    assert!(sim.violations.is_empty(), "{:?}", sim.violations);
}

#[test]
fn lookups_from_every_node_reach_the_root_and_use_few_hops() {
    let mut sim = formed(13, 200);
    let mut ops = Vec::new();
    for slot in sim.live_slots() {
        let key = Id(sim.rng.next_u128());
        ops.push((slot, sim.lookup(slot, key).unwrap()));
    }
    let t = sim.now.plus_ms(5_000);
    sim.run_until(t);
    let mut total_hops = 0;
    for (slot, op) in &ops {
        match sim.ops[&(*slot, *op)].outcome {
            Outcome::Done {
                consistent: true,
                hops,
                ..
            } => total_hops += hops,
            ref o => panic!("lookup ended {o:?}"),
        }
    }
    let mean = total_hops as f64 / ops.len() as f64;
    // log16(200) = 1.9; Pastry's expectation is below it.
    assert!(mean <= (200f64).log(16.0), "mean hops {mean}");
    assert!(sim.violations.is_empty(), "{:?}", sim.violations);
    // Routing tables carry lookups: more than the leaf set's 16 entries are in use.
    let filled: usize = sim
        .live_slots()
        .iter()
        .map(|s| sim.node(*s).unwrap().routing_table().filled())
        .sum();
    assert!(filled / sim.live_count() > 16, "tables too empty: {filled}");
    let _ = Instant::ZERO;
}

#[test]
fn put_then_get_from_elsewhere_and_survive_k_minus_1_crashes() {
    let mut sim = formed(14, 64);
    let key = Id::for_name(b"service/web");
    sim.expect_record(key, b"10.0.0.7:80");
    let op = sim.put(3, key, b"10.0.0.7:80").unwrap();
    let t = sim.now.plus_ms(3_000);
    sim.run_until(t);
    assert!(matches!(
        sim.ops[&(3, op)].outcome,
        Outcome::Done {
            consistent: true,
            ..
        }
    ));
    assert_eq!(sim.copies(key), 3);
    // Crash the root and one replica at once (k - 1 = 2 failures).
    let mut holders: Vec<usize> = sim
        .live_slots()
        .into_iter()
        .filter(|s| sim.node(*s).unwrap().records().get(key).is_some())
        .collect();
    holders.truncate(2);
    for h in holders {
        sim.crash(h);
    }
    assert_eq!(sim.copies(key), 1);
    let t = sim.now.plus_ms(30_000);
    sim.run_until(t);
    assert_eq!(sim.copies(key), 3);
    let from = sim.live_slots()[7];
    let op = sim.get(from, key).unwrap();
    let t = sim.now.plus_ms(3_000);
    sim.run_until(t);
    assert!(matches!(
        sim.ops[&(from, op)].outcome,
        Outcome::Done {
            consistent: true,
            hops: 1,
            ..
        }
    ));
    assert!(sim.violations.is_empty(), "{:?}", sim.violations);
}
