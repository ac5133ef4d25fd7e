//! The overlay in real VMs: 8 nodes with L = 4 form one overlay; lookups of random keys from
//! every node reach the live node numerically closest to the key (computed here from the ids
//! the nodes report); after two VMs are killed and repair has run, lookups reach the new roots.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use unipeer::cluster::{self, LookupAnswer, NodeState, UpOptions, lookup_from};
use unipeer::net::UplinkStatus;
use unipeer::vm;
use unipeer_node::Id;
use unipeer_qemu_tests::{accel, exclusive, image, run_dir, unipeer_bin};

const NODES: usize = 8;
const KEYS: usize = 50;

fn scaled(d: Duration) -> Duration {
    d.mul_f64(vm::timeout_scale())
}

struct Cluster {
    dir: PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = cluster::down(&self.dir);
    }
}

/// Live nodes and their overlay ids, once every live node reports itself joined.
fn joined_ids(c: &Cluster, within: Duration) -> BTreeMap<String, Id> {
    let start = Instant::now();
    loop {
        let st = cluster::status(&c.dir, true).unwrap_or_else(|e| panic!("status: {e}"));
        let up: Vec<_> = st
            .nodes
            .iter()
            .filter(|n| n.state == NodeState::Up)
            .collect();
        let ids: BTreeMap<String, Id> = up
            .iter()
            .filter_map(|n| {
                let d = n.diag.as_ref()?;
                d.overlay_joined
                    .then(|| Some((n.name.clone(), Id::parse_hex(&d.overlay_id)?)))?
            })
            .collect();
        if ids.len() == up.len() {
            return ids;
        }
        assert!(
            start.elapsed() < within,
            "only {} of {} nodes joined: {:?}",
            ids.len(),
            up.len(),
            st.nodes
        );
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The live node numerically closest to `key` (ring distance; ties to the smaller id).
fn ground_truth(ids: &BTreeMap<String, Id>, key: Id) -> Id {
    *ids.values()
        .min_by_key(|id| (id.distance(key), id.0))
        .expect("some node is live")
}

/// A deterministic list of keys.
fn keys(seed: u64) -> Vec<Id> {
    let mut x = seed;
    (0..KEYS)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let hi = x;
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            Id((u128::from(hi) << 64) | u128::from(x))
        })
        .collect()
}

/// Looks every key up from every live node; returns the wrong answers and the hop counts.
fn lookups(
    c: &Cluster,
    ids: &BTreeMap<String, Id>,
    keys: &[Id],
) -> (Vec<String>, BTreeMap<usize, usize>) {
    let mut wrong = Vec::new();
    let mut hops = BTreeMap::new();
    for from in ids.keys() {
        for &key in keys {
            let expected = ground_truth(ids, key);
            match lookup_from(&c.dir, &key.to_string(), Some(from)) {
                Ok(LookupAnswer { root, hops: h, .. }) => {
                    *hops.entry(h).or_insert(0) += 1;
                    if root != expected.to_string() {
                        wrong.push(format!("{from}: {key} -> {root}, expected {expected}"));
                    }
                }
                Err(e) => wrong.push(format!("{from}: {key}: {e}")),
            }
        }
    }
    (wrong, hops)
}

#[test]
fn eight_vms_route_lookups_to_the_closest_live_node_through_failures() {
    let _guard = exclusive();
    let c = Cluster {
        dir: run_dir("overlay8"),
    };
    let mut opts = UpOptions::new(NODES, accel(), unipeer_bin().clone());
    opts.image = image().manifest.name.clone();
    opts.servers = 2;
    opts.leaf_set = Some(4);
    let report = cluster::up(&c.dir, &opts).unwrap_or_else(|e| panic!("up failed: {e}"));
    assert!(
        matches!(report.status.uplink, UplinkStatus::Up { .. }),
        "the overlay test needs the host uplink (root)"
    );

    let ids = joined_ids(&c, scaled(Duration::from_secs(60)));
    assert_eq!(ids.len(), NODES);
    let keys = keys(0x0ddb_a11c_e5ee_d001);
    // Joining nodes learn of each other over a few exchange periods: retry within a bound
    // until every lookup is right.
    let start = Instant::now();
    let (wrong, hops) = loop {
        let (wrong, hops) = lookups(&c, &ids, &keys);
        if wrong.is_empty() || start.elapsed() > scaled(Duration::from_secs(90)) {
            break (wrong, hops);
        }
    };
    assert!(
        wrong.is_empty(),
        "{} wrong lookups: {:#?}",
        wrong.len(),
        &wrong[..wrong.len().min(20)]
    );
    let total: usize = hops.values().sum();
    assert_eq!(total, NODES * KEYS);
    println!("hop histogram over {total} lookups: {hops:?}");

    // Kill two VMs; once repair has run, lookups reach the new roots.
    for victim in ["n3", "n6"] {
        cluster::kill(&c.dir, victim).unwrap_or_else(|e| panic!("kill {victim}: {e}"));
    }
    let live = joined_ids(&c, scaled(Duration::from_secs(30)));
    assert_eq!(live.len(), NODES - 2);
    assert!(!live.contains_key("n3") && !live.contains_key("n6"));
    let start = Instant::now();
    let (wrong, hops) = loop {
        let (wrong, hops) = lookups(&c, &live, &keys);
        if wrong.is_empty() || start.elapsed() > scaled(Duration::from_secs(120)) {
            break (wrong, hops);
        }
    };
    assert!(
        wrong.is_empty(),
        "after killing n3 and n6, {} wrong lookups (after {:.0} s): {:#?}",
        wrong.len(),
        start.elapsed().as_secs_f64(),
        &wrong[..wrong.len().min(20)]
    );
    println!(
        "after 2 kills: repaired within {:.1} s; hop histogram {hops:?}",
        start.elapsed().as_secs_f64()
    );
}
