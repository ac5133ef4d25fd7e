//! The trust layer in real VMs: nodes certified by the cluster's authority (through their
//! server's front-end intermediate) form a sealed overlay; a VM whose certificate comes from
//! another authority cannot join it.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use unipeer::cluster::{self, NodeState, UpOptions};
use unipeer::net::UplinkStatus;
use unipeer::vm;
use unipeer_qemu_tests::{accel, exclusive, field as num, image, run_dir, unipeer_bin};

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

fn report(c: &Cluster, node: &str) -> BTreeMap<String, String> {
    cluster::host_probe(&c.dir, node).unwrap_or_else(|e| panic!("probe {node}: {e}"))
}

/// Polls until `check` holds or `within` passes; returns whether it held.
fn eventually(within: Duration, mut check: impl FnMut() -> bool) -> bool {
    let start = Instant::now();
    for _ in 0..1000 {
        if check() {
            return true;
        }
        if start.elapsed() > within {
            return false;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    false
}

#[test]
fn certified_nodes_form_a_sealed_overlay_and_a_foreign_one_cannot_join() {
    let _guard = exclusive();
    let c = Cluster {
        dir: run_dir("trust"),
    };
    let mut opts = UpOptions::new(3, accel(), unipeer_bin().clone());
    opts.image = image().manifest.name.clone();
    opts.servers = 2;
    opts.ca_store = Some(c.dir.join("authority"));
    let report0 = cluster::up(&c.dir, &opts).unwrap_or_else(|e| panic!("up failed: {e}"));
    assert!(
        matches!(report0.status.uplink, UplinkStatus::Up { .. }),
        "needs the host uplink (root)"
    );
    let legit = ["n1", "n2", "n3"];

    // Every node runs sealed sessions and joins.
    let joined = eventually(scaled(Duration::from_secs(60)), || {
        legit.iter().all(|n| {
            let r = report(&c, n);
            r.get("trust").map(String::as_str) == Some("on")
                && r.get("overlay_joined").map(String::as_str) == Some("true")
                && num(&r, "leaf_set") == 2
                && num(&r, "trust_established") > 0
        })
    });
    assert!(
        joined,
        "certified nodes did not form a sealed overlay: {:#?}",
        legit.iter().map(|n| report(&c, n)).collect::<Vec<_>>()
    );
    let lookup = cluster::lookup_from(&c.dir, "some-key", Some("n2"))
        .unwrap_or_else(|e| panic!("lookup over sealed sessions: {e}"));
    assert!(!lookup.root.is_empty());

    // A node certified by another authority.
    let other =
        cluster::ensure_authority(&c.dir.join("other-authority")).expect("second authority");
    cluster::grow_with(&c.dir, 1, Some(other)).unwrap_or_else(|e| panic!("grow: {e}"));
    let st = cluster::status(&c.dir, true).expect("status");
    let rogue = st.nodes.iter().find(|n| n.name == "n4").expect("n4 listed");
    assert_eq!(rogue.state, NodeState::Up);
    let rogue_id = rogue
        .diag
        .as_ref()
        .map(|d| d.overlay_id.clone())
        .expect("n4 answers its diagnostic port");

    // The handshakes fail on a certificate from the wrong authority, counted where the chain
    // is checked (n4 meets the others' chains first and stops there).
    let refused = eventually(scaled(Duration::from_secs(30)), || {
        ["n1", "n2", "n3", "n4"]
            .iter()
            .map(|n| num(&report(&c, n), "trust_cert_wrong_authority"))
            .sum::<u64>()
            > 0
    });
    assert!(
        refused,
        "no node counted n4's foreign certificate: {:#?}\nn4: {:#?}",
        legit.iter().map(|n| report(&c, n)).collect::<Vec<_>>(),
        report(&c, "n4")
    );
    // It never gets into anyone's leaf set, nor anyone into its own; lookups never end at it.
    for n in legit {
        let leafs = cluster::node_command(&c.dir, n, "leafset").expect("leafset");
        assert!(!leafs.contains(&rogue_id), "{n} admitted n4: {leafs}");
        let r = report(&c, n);
        assert_eq!(num(&r, "leaf_set"), 2, "{n}: {r:?}");
    }
    let r4 = report(&c, "n4");
    assert_eq!(num(&r4, "leaf_set"), 0, "n4 got peers: {r4:?}");
    assert_eq!(
        num(&r4, "trust_established"),
        0,
        "n4 established a session: {r4:?}"
    );
    let a = cluster::lookup_from(&c.dir, &rogue_id, Some("n1")).expect("lookup of n4's id");
    assert_ne!(a.root, rogue_id, "a lookup ended at the foreign node");
}

#[test]
fn a_node_survives_a_flood_of_forged_replayed_and_tampered_datagrams_accepting_none() {
    let _guard = exclusive();
    let c = Cluster {
        dir: run_dir("flood"),
    };
    let mut opts = UpOptions::new(1, accel(), unipeer_bin().clone());
    opts.image = image().manifest.name.clone();
    opts.ca_store = Some(c.dir.join("authority"));
    let up = cluster::up(&c.dir, &opts).unwrap_or_else(|e| panic!("up failed: {e}"));
    assert!(
        matches!(up.status.uplink, UplinkStatus::Up { .. }),
        "needs the host uplink (root)"
    );
    let before = report(&c, "n1");
    assert_eq!(num(&before, "trust_delivered"), 0, "{before:?}");

    let legit = 20;
    let f = cluster::flood(&c.dir, "n1", legit, 100_000).unwrap_or_else(|e| panic!("flood: {e}"));
    println!("flood: {f:?}");
    assert_eq!(f.legit_sent, legit);
    assert_eq!(
        f.garbage + f.forged_handshakes + f.replayed + f.tampered + f.truncated,
        100_000
    );
    assert!(
        !f.foreign_established,
        "a peer of another authority got a session"
    );
    assert!(f.after_established, "no fresh session after the flood");
    // Connection-slot exhaustion from one source other than the host: it holds at most its
    // share of each port, the operator still authenticates meanwhile, and the silent
    // connections lose their slots at the hello deadline (3 s).
    let slots = f
        .slots
        .as_ref()
        .expect("the slot flood ran (host uplink up)");
    assert!(
        slots.diag_held >= 1 && slots.diag_held <= 3 && slots.diag_refused >= 9,
        "{slots:?}"
    );
    assert!(slots.client_held <= 1 && slots.job_held <= 2, "{slots:?}");
    assert!(
        slots.operator_ok,
        "the operator could not authenticate: {slots:?}"
    );
    assert!(slots.freed_ms < 10_000, "{slots:?}");

    // Exactly the authentic datagrams were delivered: the legitimate ones and the one the
    // fresh session sent afterwards; none of the hostile ones.
    let expected = legit + 1;
    let delivered = |r: &BTreeMap<String, String>| num(r, "trust_delivered");
    eventually(scaled(Duration::from_secs(10)), || {
        delivered(&report(&c, "n1")) >= expected
    });
    let after = report(&c, "n1");
    assert_eq!(delivered(&after), expected, "{after:#?}");
    assert!(num(&after, "trust_rejected") > 1000, "{after:#?}");
    assert!(num(&after, "trust_replayed") > 0, "{after:#?}");
    assert!(num(&after, "trust_tampered") > 0, "{after:#?}");
    assert!(num(&after, "trust_malformed") > 0, "{after:#?}");
    // Still serving: its diagnostic port answered above; the overlay answers too.
    let a = cluster::lookup_from(&c.dir, "after-the-storm", Some("n1"))
        .unwrap_or_else(|e| panic!("lookup after the flood: {e}"));
    assert_eq!(a.hops, 0);
}

#[test]
fn a_revoked_node_is_cut_off_by_the_running_nodes() {
    let _guard = exclusive();
    let c = Cluster {
        dir: run_dir("revoke"),
    };
    let store = c.dir.join("authority");
    let mut opts = UpOptions::new(4, accel(), unipeer_bin().clone());
    opts.image = image().manifest.name.clone();
    opts.ca_store = Some(store.clone());
    let up = cluster::up(&c.dir, &opts).unwrap_or_else(|e| panic!("up failed: {e}"));
    assert!(
        matches!(up.status.uplink, UplinkStatus::Up { .. }),
        "needs the host uplink (root)"
    );
    let nodes = ["n1", "n2", "n3", "n4"];
    let formed = eventually(scaled(Duration::from_secs(60)), || {
        nodes.iter().all(|n| num(&report(&c, n), "leaf_set") == 3)
    });
    assert!(formed, "the 4 nodes did not all see each other");
    let r3 = report(&c, "n3");
    let serial = num(&r3, "trust_serial");
    let id3 = r3.get("overlay_id").cloned().expect("n3's id");
    assert!(serial > 0, "{r3:?}");

    // The authority revokes n3's certificate; the list goes to n1 only.
    unipeer::ca::AuthorityStore::open(&store)
        .and_then(|mut s| s.revoke(serial))
        .unwrap_or_else(|e| panic!("revoke: {e:#}"));
    let answer = cluster::publish_revocations(&c.dir, &store, Some("n1"))
        .unwrap_or_else(|e| panic!("publish: {e}"));
    assert!(answer.contains("version=2"), "{answer}");

    // Within the bound (the list spreads at once; leaf sets drop n3 once its sessions are gone
    // and its new handshakes fail), every other node holds the list and has cut n3 off.
    let bound = scaled(Duration::from_secs(40));
    let start = Instant::now();
    let cut = eventually(bound, || {
        ["n1", "n2", "n4"].iter().all(|n| {
            let r = report(&c, n);
            num(&r, "trust_revocation_version") == 2 && num(&r, "leaf_set") == 2
        })
    });
    assert!(
        cut,
        "n3 not cut off within {bound:?}: {:#?}",
        ["n1", "n2", "n4"].map(|n| report(&c, n))
    );
    for n in ["n1", "n2", "n4"] {
        let leafs = cluster::node_command(&c.dir, n, "leafset").expect("leafset");
        assert!(!leafs.contains(&id3), "{n} still lists n3: {leafs}");
    }
    println!(
        "n3 cut off by every running node within {:.1} s",
        start.elapsed().as_secs_f64()
    );
}

/// Authenticates as `cred` at `node`'s client port (through the daemon's relay).
fn client_auth(
    c: &Cluster,
    node: &str,
    cred: &unipeer_node::auth::UserCredential,
) -> Result<unipeer::job::client::JobClient<std::os::unix::net::UnixStream>, String> {
    let stream = cluster::relay(&c.dir, node, unipeer_node::jobs::client::CLIENT_PORT)
        .map_err(|e| format!("relay to {node}: {e}"))?;
    stream
        .set_read_timeout(Some(scaled(Duration::from_secs(30))))
        .expect("timeout");
    unipeer::job::client::JobClient::connect(stream, cred).map_err(|e| e.to_string())
}

#[test]
fn a_node_without_a_users_credential_obtains_it_from_a_neighbour_the_list_allows() {
    let _guard = exclusive();
    let c = Cluster {
        dir: run_dir("trust-delegation"),
    };
    let store_path = cluster::ensure_authority(&c.dir.join("authority")).expect("authority store");
    // Users must exist before `up`: each VM's launch material snapshots the list.
    let (alice, bob) = {
        use unipeer_node::auth::Allowance;
        let mut store = unipeer::ca::AuthorityStore::open(&store_path).expect("open store");
        store
            .add_user("alice", vec![Allowance::AnyPeer])
            .expect("add alice");
        store
            .add_user("bob", vec![Allowance::Server("s1".into())])
            .expect("add bob");
        let cred = |u: &str| unipeer_node::auth::UserCredential {
            user: u.into(),
            psk: store.user_psk(u).expect("psk"),
        };
        (cred("alice"), cred("bob"))
    };
    let mut opts = UpOptions::new(3, accel(), unipeer_bin().clone());
    opts.image = image().manifest.name.clone();
    // plan(1, 3, 2): n1 and n2 on s1, n3 on s2.
    opts.servers = 2;
    opts.ca_store = Some(store_path);
    // Only n1 holds the users' credentials.
    opts.credential_holders = Some(1);
    cluster::up(&c.dir, &opts).unwrap_or_else(|e| panic!("up failed: {e}"));
    let st = cluster::status(&c.dir, false).expect("status");
    let server_of = |n: &str| {
        st.nodes
            .iter()
            .find(|x| x.name == n)
            .map(|x| x.server.clone())
            .unwrap_or_default()
    };
    assert_eq!(
        (server_of("n1"), server_of("n2"), server_of("n3")),
        ("s1".into(), "s1".into(), "s2".into())
    );
    let nodes = ["n1", "n2", "n3"];
    let joined = eventually(scaled(Duration::from_secs(60)), || {
        nodes.iter().all(|n| {
            let r = report(&c, n);
            r.get("overlay_joined").map(String::as_str) == Some("true") && num(&r, "leaf_set") == 2
        })
    });
    assert!(
        joined,
        "no overlay: {:#?}",
        nodes.iter().map(|n| report(&c, n)).collect::<Vec<_>>()
    );
    assert_eq!(
        num(&report(&c, "n1"), "deleg_credentials"),
        3,
        "n1 holds all"
    );
    assert_eq!(num(&report(&c, "n2"), "deleg_credentials"), 0);
    assert_eq!(num(&report(&c, "n3"), "deleg_credentials"), 0);

    // Someone who knows alice's name but not her key, at n2 (no credential): n2 relays the
    // handshake, n1 proves on its behalf, and nothing is delegated without alice's proof.
    let impostor = unipeer_node::auth::UserCredential {
        user: "alice".into(),
        psk: [0x5a; 32],
    };
    let Err(e) = client_auth(&c, "n2", &impostor) else {
        panic!("n2 accepted a wrong key for alice");
    };
    assert!(e.contains("authentication failed"), "unexpected error {e}");
    let r2 = report(&c, "n2");
    assert_eq!(
        num(&r2, "deleg_credentials"),
        0,
        "a Hello moved a key: {r2:#?}"
    );
    assert_eq!(num(&r2, "deleg_obtained"), 0, "{r2:#?}");
    let r1 = report(&c, "n1");
    assert_eq!(num(&r1, "deleg_proved"), 1, "{r1:#?}");
    assert_eq!(num(&r1, "deleg_granted"), 0, "{r1:#?}");

    // alice at n2, which holds no credential: it obtains hers from a neighbour once her proof
    // verifies there.
    let mut cl = client_auth(&c, "n2", &alice)
        .unwrap_or_else(|e| panic!("alice at n2: {e}\n{:#?}", report(&c, "n2")));
    assert!(cl.authenticated);
    let pong = cl.ping().expect("ping after a delegated authentication");
    assert!(pong.joined);
    drop(cl);
    let r2 = report(&c, "n2");
    assert_eq!(num(&r2, "client_credential_waits"), 2, "{r2:#?}");
    assert_eq!(num(&r2, "client_credential_obtained"), 1, "{r2:#?}");
    assert_eq!(num(&r2, "deleg_obtained"), 1, "{r2:#?}");
    assert_eq!(num(&r2, "deleg_credentials"), 1, "{r2:#?}");
    assert_eq!(num(&report(&c, "n1"), "deleg_granted"), 1);
    // Once held, the next authentication needs no delegation.
    client_auth(&c, "n2", &alice).expect("alice at n2 again");
    assert_eq!(num(&report(&c, "n2"), "client_credential_waits"), 2);

    // alice on the other server (AnyPeer) as well.
    let mut cl = client_auth(&c, "n3", &alice)
        .unwrap_or_else(|e| panic!("alice at n3: {e}\n{:#?}", report(&c, "n3")));
    cl.ping().expect("ping at n3");
    drop(cl);
    assert_eq!(num(&report(&c, "n3"), "deleg_obtained"), 1);

    // bob may be served on s1 only: n3 refuses him outright, and asks nobody for his key.
    let Err(e) = client_auth(&c, "n3", &bob) else {
        panic!("bob must be refused at n3");
    };
    assert!(e.contains("not allowed"), "unclear refusal: {e}");
    let r3 = report(&c, "n3");
    assert_eq!(
        num(&r3, "deleg_credentials"),
        1,
        "n3 got bob's key: {r3:#?}"
    );
    assert_eq!(num(&r3, "client_credential_waits"), 1, "{r3:#?}");
    assert!(num(&r3, "client_auth_failures") >= 1, "{r3:#?}");
    // ... while n2 (on s1) may obtain it.
    client_auth(&c, "n2", &bob).unwrap_or_else(|e| panic!("bob at n2: {e}"));
    assert_eq!(num(&report(&c, "n2"), "deleg_obtained"), 2);

    // alice with a wrong key: refused at a holder and at a node that obtained her key.
    let wrong = unipeer_node::auth::UserCredential {
        user: "alice".into(),
        psk: [0x5a; 32],
    };
    for n in ["n1", "n2"] {
        let Err(e) = client_auth(&c, n, &wrong) else {
            panic!("{n}: a wrong key must be refused");
        };
        assert!(
            e.contains("authentication failed"),
            "{n}: unexpected error {e}"
        );
    }
    // No neighbour was ever asked by a peer the list does not allow.
    for n in nodes {
        let r = report(&c, n);
        assert_eq!(num(&r, "deleg_refused_not_allowed"), 0, "{n}: {r:#?}");
        assert_eq!(num(&r, "deleg_grant_not_allowed"), 0, "{n}: {r:#?}");
    }
}
