//! Writes decided by a majority of a key's replica set: in a partition at most one side
//! changes a record (never two values acknowledged at one version), and the side holding a
//! majority of the key's replicas (k = 3: two of three) can. Also the cost of the first phase
//! in messages per put.

use std::collections::BTreeMap;
use unipeer_node::id::{Id, Key};
use unipeer_node::node::{OpId, PutError};
use unipeer_sim::harness::seeds;
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
    assert_eq!(sim.live_count(), n, "seed {seed}: not all joined");
    sim
}

/// The key's real replica set: the k slots whose ids are closest to it.
fn replica_slots(sim: &Sim, key: Key) -> Vec<usize> {
    let mut slots: Vec<usize> = (0..sim.slots.len()).collect();
    slots.sort_by_key(|s| (key.distance(sim.slots[*s].id), sim.slots[*s].id));
    slots.truncate(sim.cfg.replicas);
    slots
}

fn done(sim: &Sim, slot: usize, op: OpId) -> bool {
    matches!(sim.ops[&(slot, op)].outcome, Outcome::Done { .. })
}

/// Per side: (compare-and-sets acknowledged, issued).
type SideCounts = [(usize, usize); 2];

/// Four nodes split `left | right` (slot groups); every key written once before, then each
/// side compare-and-sets every key from version 1 with its own value. Returns acks per side.
fn split_and_write(seed: u64, left: usize) -> Result<SideCounts, String> {
    let n = 4;
    let mut sim = formed(seed, n);
    let keys: Vec<Key> = (0..16).map(|_| Id(sim.rng.next_u128())).collect();
    for (i, key) in keys.iter().enumerate() {
        sim.put(i % n, *key, b"v1").ok_or("put refused")?;
    }
    let t = sim.now.plus_ms(10_000);
    sim.run_until(t);
    for key in &keys {
        if !sim.installed.contains_key(&(*key, 1)) {
            return Err(format!(
                "seed {seed}: first write of {key:?} not acknowledged"
            ));
        }
    }
    // Which slot is on which side: a seeded shuffle.
    let mut order: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = sim.rng.below(i as u64 + 1) as usize;
        order.swap(i, j);
    }
    let mut groups = vec![0u8; n];
    for s in &order[left..] {
        groups[*s] = 1;
    }
    sim.set_partition(Some(groups.clone()));
    // Let each side notice the other is gone.
    let t = sim.now.plus_ms(10_000);
    sim.run_until(t);
    let mut ops: Vec<(Key, usize, OpId, u8)> = Vec::new();
    for key in &keys {
        for side in 0..2u8 {
            let from = order
                .iter()
                .copied()
                .filter(|s| groups[*s] == side)
                .nth(key.0 as usize % if side == 0 { left } else { n - left })
                .expect("a side has a node");
            let value = format!("side-{side}");
            let op = sim
                .put_if(from, *key, value.as_bytes(), 1)
                .ok_or("put_if refused")?;
            ops.push((*key, from, op, side));
        }
    }
    let t = sim.now.plus_ms(30_000);
    sim.run_until(t);
    let mut counts: SideCounts = [(0, 0); 2];
    for (key, from, op, side) in &ops {
        let side = *side as usize;
        counts[side].1 += 1;
        let ok = done(&sim, *from, *op);
        counts[side].0 += usize::from(ok);
        let replicas_here = replica_slots(&sim, *key)
            .iter()
            .filter(|s| groups[**s] as usize == side)
            .count();
        let majority = sim.cfg.replicas / 2 + 1;
        if replicas_here >= majority && !ok {
            return Err(format!(
                "seed {seed} {left}|{}: side {side} holds {replicas_here} replicas of {key:?} \
                 but its compare-and-set failed: {:?}",
                n - left,
                sim.put_errors.get(&(*from, *op))
            ));
        }
        if replicas_here < majority && ok {
            return Err(format!(
                "seed {seed} {left}|{}: side {side} holds {replicas_here} replicas of {key:?} \
                 and still wrote it",
                n - left
            ));
        }
        if !ok && sim.ops[&(*from, *op)].outcome != Outcome::Failed {
            return Err(format!("seed {seed}: a minority write never ended"));
        }
    }
    // Heal: every node converges on the majority side's value, at version 2.
    sim.set_partition(None);
    let t = sim.now.plus_ms(40_000);
    sim.run_until(t);
    let mut gets = Vec::new();
    for key in &keys {
        let from = sim.rng.below(n as u64) as usize;
        gets.push((*key, from, sim.get(from, *key).ok_or("get refused")?));
    }
    let t = sim.now.plus_ms(10_000);
    sim.run_until(t);
    for (key, from, op) in gets {
        let want = sim.installed.get(&(key, 2)).cloned();
        let got = sim.values_got.get(&(from, op)).cloned().flatten();
        if want.is_none() || got != want {
            return Err(format!(
                "seed {seed}: after healing {key:?} reads {:?}, acknowledged {:?}",
                got.map(|v| String::from_utf8_lossy(&v).into_owned()),
                want.map(|v| String::from_utf8_lossy(&v).into_owned())
            ));
        }
    }
    if !sim.violations.is_empty() {
        return Err(format!("seed {seed}: {:?}", sim.violations));
    }
    Ok(counts)
}

#[test]
fn partition_2_2_only_the_side_with_two_replicas_writes() {
    let mut total: SideCounts = [(0, 0); 2];
    for seed in seeds(1..6) {
        let c = split_and_write(seed, 2).unwrap_or_else(|e| panic!("{e}"));
        eprintln!("2|2 seed {seed}: acknowledged per side {:?}", c);
        for s in 0..2 {
            total[s].0 += c[s].0;
            total[s].1 += c[s].1;
        }
    }
    // Every key has its majority on exactly one side of a 2|2 split.
    assert_eq!(total[0].0 + total[1].0, total[0].1);
}

#[test]
fn partition_3_1_the_side_of_three_writes_the_lone_node_cannot() {
    for seed in seeds(11..16) {
        let c = split_and_write(seed, 3).unwrap_or_else(|e| panic!("{e}"));
        eprintln!("3|1 seed {seed}: acknowledged per side {:?}", c);
        assert_eq!(c[0].0, c[0].1, "the side of three writes every key");
        assert_eq!(c[1].0, 0, "the lone node writes none");
    }
}

#[test]
fn compare_and_set_refuses_a_stale_expected_version() {
    let mut sim = formed(21, 12);
    let key = Id::for_name(b"placement/kv");
    let op1 = sim.put_if(2, key, b"a", 0).unwrap();
    let t = sim.now.plus_ms(5_000);
    sim.run_until(t);
    assert!(done(&sim, 2, op1));
    // Two writers both believe version 1: exactly one wins, the other learns the current one.
    let x = sim.put_if(5, key, b"from-5", 1).unwrap();
    let y = sim.put_if(9, key, b"from-9", 1).unwrap();
    let t = sim.now.plus_ms(10_000);
    sim.run_until(t);
    let won = [done(&sim, 5, x), done(&sim, 9, y)];
    assert_eq!(won.iter().filter(|w| **w).count(), 1, "{won:?}");
    let lost = if won[0] { (9, y) } else { (5, x) };
    assert_eq!(
        sim.put_errors.get(&lost),
        Some(&PutError::VersionMismatch { current: 2 })
    );
    // Creating where a record exists is refused the same way.
    let z = sim.put_if(3, key, b"again", 0).unwrap();
    let t = sim.now.plus_ms(5_000);
    sim.run_until(t);
    assert_eq!(
        sim.put_errors.get(&(3, z)),
        Some(&PutError::VersionMismatch { current: 2 })
    );
    assert!(sim.violations.is_empty(), "{:?}", sim.violations);
}

/// Messages per put, clean network, 24 nodes: the first phase costs 2 (k - 1) datagrams.
#[test]
fn messages_per_put() {
    let mut sim = formed(31, 24);
    sim.bytes_by_kind = Some(BTreeMap::new());
    let puts = 200;
    let mut ops = Vec::new();
    for i in 0..puts {
        let key = Id(sim.rng.next_u128());
        let from = i % 24;
        ops.push((from, sim.put(from, key, b"value").unwrap()));
        let t = sim.now.plus_ms(50);
        sim.run_until(t);
    }
    let t = sim.now.plus_ms(10_000);
    sim.run_until(t);
    let acked = ops.iter().filter(|(s, op)| done(&sim, *s, *op)).count();
    assert_eq!(acked, puts, "every put acknowledged on a clean network");
    let by = &sim.datagrams_by_kind;
    let per = |k: &str| by.get(k).copied().unwrap_or(0) as f64 / puts as f64;
    let phase_one = per("VersionQuery") + per("VersionHeld");
    let store = per("Store") + per("StoreAck");
    let routed = per("Routed/Put") + per("RouteAck") + per("PutAck");
    eprintln!(
        "per put: first phase {phase_one:.2}, store {store:.2}, routing+answer {routed:.2} datagrams"
    );
    assert!(phase_one > 0.0, "no first phase measured");
    assert!(phase_one <= 2.0 * (sim.cfg.replicas as f64 - 1.0) + 0.01);
}

/// Two of a key's three replicas crash for good: writes wait (no majority) while the failed
/// nodes still count, then the replicas that are left decide (`quorum_memory_ms`).
#[test]
fn writes_resume_once_crashed_replicas_stop_counting() {
    let mut sim = formed(41, 12);
    let key = Id::for_name(b"jobs/task-7");
    let writer = replica_slots(&sim, key)
        .last()
        .copied()
        .expect("three replicas");
    let op = sim.put_if(writer, key, b"v1", 0).unwrap();
    let t = sim.now.plus_ms(5_000);
    sim.run_until(t);
    assert!(done(&sim, writer, op));
    let crashed: Vec<usize> = replica_slots(&sim, key)
        .into_iter()
        .filter(|s| *s != writer)
        .collect();
    for s in &crashed {
        sim.crash(*s);
    }
    let t = sim.now.plus_ms(15_000);
    sim.run_until(t);
    let early = sim.put_if(writer, key, b"v2-early", 1).unwrap();
    let t = sim.now.plus_ms(20_000);
    sim.run_until(t);
    assert_eq!(
        sim.put_errors.get(&(writer, early)),
        Some(&PutError::NoQuorum),
        "a write while 2 of 3 replicas count as failed"
    );
    let memory_ms = sim.cfg.timing.quorum_memory_ms;
    let t = sim.now.plus_ms(memory_ms);
    sim.run_until(t);
    let late = sim.put_if(writer, key, b"v2", 1).unwrap();
    let t = sim.now.plus_ms(10_000);
    sim.run_until(t);
    assert!(
        done(&sim, writer, late),
        "{:?}",
        sim.put_errors.get(&(writer, late))
    );
    assert!(sim.violations.is_empty(), "{:?}", sim.violations);
}
