//! Local-cluster tests against real VMs: reachability between VMs (a node's `probe`) and from
//! the host, partitions, delay between servers, loss, cut links, killed VMs, bad input and
//! stale run directories. Each test brings up its own small cluster (in its own network
//! namespace when root) through the same library calls the CLI makes, and takes it down again.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use unipeer::cluster::{self, ClusterError, ClusterStatus, NodeState, UpOptions, VmProbe};
use unipeer::net::UplinkStatus;
use unipeer::vm;
use unipeer_qemu_tests::{accel, exclusive, image, run_dir, unipeer_bin};

fn scaled(d: Duration) -> Duration {
    d.mul_f64(vm::timeout_scale())
}

/// A cluster that is taken down when the test ends, pass or fail.
struct Cluster {
    dir: PathBuf,
}

impl Cluster {
    fn up(test: &str, nodes: usize, servers: usize, server_delay: Duration) -> Cluster {
        let dir = run_dir(test);
        let mut opts = UpOptions::new(nodes, accel(), unipeer_bin().clone());
        opts.image = image().manifest.name.clone();
        opts.servers = servers;
        opts.server_delay = server_delay;
        let cluster = Cluster { dir };
        let report = cluster::up(&cluster.dir, &opts)
            .unwrap_or_else(|e| panic!("up -n {nodes} failed: {e}"));
        assert_eq!(report.status.nodes.len(), nodes);
        if matches!(report.status.uplink, UplinkStatus::Up { .. }) {
            for n in &report.status.nodes {
                assert_eq!(n.answering, Some(true), "{} does not answer: {n:?}", n.name);
            }
        } else {
            panic!(
                "these tests need the host uplink (root): {:?}",
                report.status.uplink
            );
        }
        cluster
    }

    fn dir(&self) -> &Path {
        &self.dir
    }

    fn status(&self) -> ClusterStatus {
        cluster::status(&self.dir, true).unwrap_or_else(|e| panic!("status: {e}"))
    }

    fn probe(&self, from: &str, to: &str, count: u32) -> VmProbe {
        cluster::vm_probe(&self.dir, from, to, count)
            .unwrap_or_else(|e| panic!("{from} probing {to}: {e}"))
    }

    /// Probes until `to` is reached or `within` passes (a node that was cut off may need a
    /// moment to resolve its neighbour again).
    fn reached_within(&self, from: &str, to: &str, within: Duration) -> bool {
        let start = Instant::now();
        for _ in 0..50 {
            if self.probe(from, to, 3).reached() {
                return true;
            }
            if start.elapsed() > within {
                return false;
            }
        }
        false
    }

    fn serial(&self, node: &str) -> String {
        cluster::serial_log(&self.dir, node)
            .ok()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = cluster::down(&self.dir);
    }
}

const NAMES: [&str; 4] = ["n1", "n2", "n3", "n4"];

fn pairs() -> impl Iterator<Item = (&'static str, &'static str)> {
    NAMES
        .iter()
        .flat_map(|a| NAMES.iter().filter(move |b| *b != a).map(move |b| (*a, *b)))
}

#[test]
fn four_vms_reach_each_other_and_the_host_reaches_all() {
    let _g = exclusive();
    let c = Cluster::up("cluster-reach", 4, 1, Duration::ZERO);
    for (a, b) in pairs() {
        let p = c.probe(a, b, 5);
        assert!(
            p.reached(),
            "{a} -> {b}: {p:?}\n{a} serial:\n{}",
            c.serial(a)
        );
        assert_eq!(p.name.as_deref(), Some(b), "{a} asked {b}'s name");
        assert_eq!(p.ip, cluster::node_ip(b[1..].parse().unwrap()));
        assert!(p.rtt_us_p50 > 0 && p.rtt_us_p50 < 50_000, "{p:?}");
    }
    for n in NAMES {
        let r = cluster::host_probe(c.dir(), n).unwrap_or_else(|e| panic!("host -> {n}: {e}"));
        assert_eq!(r.get("name").map(String::as_str), Some(n));
        let ip = cluster::node_ip(n[1..].parse().unwrap()).to_string();
        assert_eq!(r.get("ip"), Some(&ip));
    }
    let echo = cluster::host_echo(c.dir(), "n1", 50).unwrap();
    assert_eq!(echo.received, 50, "{echo:?}");
}

#[test]
fn partition_gives_the_expected_matrix_and_heal_restores_it() {
    let _g = exclusive();
    let c = Cluster::up("cluster-partition", 4, 1, Duration::ZERO);
    // Every node learns every neighbour first.
    for (a, b) in pairs() {
        assert!(
            c.probe(a, b, 1).reached(),
            "{a} -> {b} before the partition"
        );
    }
    let mut sw = cluster::switch(c.dir()).unwrap();
    sw.partition(&[vec!["n1", "n2"], vec!["n3", "n4"]]).unwrap();
    let group = |n: &str| u8::from(n == "n3" || n == "n4");
    for (a, b) in pairs() {
        let expected = group(a) == group(b);
        let got = if expected {
            c.reached_within(a, b, scaled(Duration::from_secs(5)))
        } else {
            c.probe(a, b, 2).reached()
        };
        assert_eq!(got, expected, "{a} -> {b} under {{n1,n2}}|{{n3,n4}}");
    }
    // The host uplink is in no group: it still reaches everyone.
    for n in NAMES {
        assert!(cluster::host_probe(c.dir(), n).is_ok(), "host -> {n}");
    }
    let stats = sw.stats().unwrap();
    assert!(stats.port("n1").unwrap().counters.dropped.partition > 0);
    sw.heal().unwrap();
    for (a, b) in pairs() {
        assert!(
            c.reached_within(a, b, scaled(Duration::from_secs(5))),
            "{a} -> {b} after heal"
        );
    }
}

#[test]
fn delay_between_servers_shows_in_the_round_trip() {
    let _g = exclusive();
    // s1 = {n1, n2}, s2 = {n3, n4}, 20 ms one way between them.
    let c = Cluster::up("cluster-delay", 4, 2, Duration::from_millis(20));
    let st = c.status();
    assert_eq!(st.server_delay_us, 20_000);
    assert_eq!(st.node("n2").unwrap().server, "s1");
    assert_eq!(st.node("n3").unwrap().server, "s2");
    let near = c.probe("n1", "n2", 20);
    let far = c.probe("n1", "n3", 20);
    assert!(near.reached() && far.reached(), "{near:?} {far:?}");
    // 20 ms each way; the switch's timer is millisecond-grained and may add a little.
    assert!(
        (40_000..70_000).contains(&far.rtt_us_p50),
        "n1 -> n3 across servers: {far:?}"
    );
    assert!(near.rtt_us_p50 < 10_000, "n1 -> n2 on one server: {near:?}");
    // Removing the delay brings the far RTT back down.
    let mut sw = cluster::switch(c.dir()).unwrap();
    sw.request(&unipeer::net::Request::ServerDelay { delay_us: 0 })
        .unwrap();
    let after = c.probe("n1", "n3", 20);
    assert!(after.rtt_us_p50 < 10_000, "{after:?}");
}

#[test]
fn loss_shows_in_a_probe_series() {
    let _g = exclusive();
    let c = Cluster::up("cluster-loss", 2, 1, Duration::ZERO);
    let clean = c.probe("n1", "n2", 60);
    assert_eq!(clean.received, 60, "{clean:?}");
    let mut sw = cluster::switch(c.dir()).unwrap();
    sw.loss(Some("n2"), 0.1).unwrap();
    // 10% on n2's link, both ways: each round trip survives with 0.9^2 = 81%.
    let lossy = c.probe("n1", "n2", 60);
    assert!(lossy.name.is_some(), "{lossy:?}");
    assert_eq!(lossy.sent, 60);
    assert!(
        (36..=58).contains(&lossy.received),
        "expected about 49 of 60 answers: {lossy:?}"
    );
    // A drop counts on the port the frame was leaving through: n2 for requests, n1 for answers.
    let stats = sw.stats().unwrap();
    let dropped: u64 = stats.ports.iter().map(|p| p.counters.dropped.loss).sum();
    assert!(
        dropped >= u64::from(60 - lossy.received),
        "{dropped} frames dropped, {lossy:?}"
    );
    sw.loss(Some("n2"), 0.0).unwrap();
    assert_eq!(c.probe("n1", "n2", 30).received, 30);
}

#[test]
fn cut_link_makes_one_vm_unreachable_and_restore_brings_it_back() {
    let _g = exclusive();
    let c = Cluster::up("cluster-cut", 3, 1, Duration::ZERO);
    assert!(c.probe("n1", "n2", 2).reached());
    let mut sw = cluster::switch(c.dir()).unwrap();
    sw.cut("n2").unwrap();
    let p = c.probe("n1", "n2", 2);
    assert!(!p.reached() && p.error.is_some(), "{p:?}");
    assert!(cluster::host_probe(c.dir(), "n2").is_err());
    assert!(c.probe("n1", "n3", 2).reached(), "n3 is not cut");
    let st = c.status();
    let n2 = st.node("n2").unwrap();
    assert!(!n2.link_up && n2.state == NodeState::Up && n2.answering == Some(false));
    sw.restore("n2").unwrap();
    assert!(c.reached_within("n1", "n2", scaled(Duration::from_secs(5))));
    assert!(cluster::host_probe(c.dir(), "n2").is_ok());
    assert!(c.status().node("n2").unwrap().link_up);
}

fn wait_state(c: &Cluster, node: &str, want: NodeState, within: Duration) -> Duration {
    let start = Instant::now();
    loop {
        let st = cluster::status(c.dir(), false).unwrap();
        if st.node(node).unwrap().state == want {
            return start.elapsed();
        }
        assert!(
            start.elapsed() < within,
            "{node} not {want} within {within:?}: {:?}",
            st.node(node)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn vm_kill_shows_in_status_within_a_bound_and_restart_brings_it_back() {
    let _g = exclusive();
    let c = Cluster::up("cluster-kill", 3, 1, Duration::ZERO);
    let before = c.status();
    let pid2 = before.node("n2").unwrap().qemu_pid.unwrap();
    let pid3 = before.node("n3").unwrap().qemu_pid.unwrap();
    cluster::kill(c.dir(), "n2").unwrap();
    wait_state(&c, "n2", NodeState::Down, Duration::from_secs(2));
    let st = c.status();
    let n2 = st.node("n2").unwrap();
    assert_eq!((n2.qemu_pid, n2.answering), (None, None));
    assert!(
        !Path::new(&format!("/proc/{pid2}")).exists() || {
            let s = std::fs::read_to_string(format!("/proc/{pid2}/stat")).unwrap_or_default();
            s.contains(") Z")
        }
    );
    assert!(!c.probe("n1", "n2", 1).reached());
    // Killed from outside the cluster tools: reported as exited.
    std::process::Command::new("kill")
        .args(["-KILL", &pid3.to_string()])
        .status()
        .unwrap();
    wait_state(&c, "n3", NodeState::Exited, Duration::from_secs(3));
    let st = c.status();
    assert!(
        st.node("n3")
            .unwrap()
            .exit
            .as_deref()
            .unwrap()
            .contains("signal 9"),
        "{:?}",
        st.node("n3")
    );
    assert_eq!(st.node("n1").unwrap().state, NodeState::Up);
    cluster::restart(c.dir(), "n2").unwrap();
    let st = c.status();
    let n2 = st.node("n2").unwrap();
    assert_eq!(
        (n2.state, n2.answering, n2.restarts),
        (NodeState::Up, Some(true), 1)
    );
    assert_ne!(n2.qemu_pid, Some(pid2));
    assert!(c.reached_within("n1", "n2", scaled(Duration::from_secs(5))));
}

#[test]
fn bad_input_is_refused_and_leaves_the_cluster_untouched() {
    let _g = exclusive();
    let c = Cluster::up("cluster-bad", 4, 1, Duration::ZERO);
    let before = c.status();
    let rejected = |r: Result<(), ClusterError>, what: &str, needle: &str| match r {
        Err(e) => assert!(e.to_string().contains(needle), "{what}: {e}"),
        Ok(()) => panic!("{what} was accepted"),
    };
    rejected(
        cluster::kill(c.dir(), "n9"),
        "kill n9",
        "unknown node \"n9\"",
    );
    rejected(
        cluster::restart(c.dir(), "nope").map(drop),
        "restart nope",
        "unknown node",
    );
    rejected(
        cluster::vm_probe(c.dir(), "n1", "n9", 1).map(drop),
        "probe n9",
        "unknown node",
    );
    rejected(
        cluster::host_probe(c.dir(), "x").map(drop),
        "host probe x",
        "unknown node",
    );
    let mut sw = cluster::switch(c.dir()).unwrap();
    let e = sw.cut("n9").unwrap_err().to_string();
    assert!(e.contains("unknown port \"n9\""), "{e}");
    let e = sw
        .partition(&[vec!["n1", "n2"], vec!["n2", "n3"]])
        .unwrap_err()
        .to_string();
    assert!(e.contains("n2") && e.contains("more than one group"), "{e}");
    let e = sw.partition(&[vec!["n1", "n7"]]).unwrap_err().to_string();
    assert!(e.contains("n7"), "{e}");
    // A second `up` over the running cluster.
    let mut opts = UpOptions::new(2, accel(), unipeer_bin().clone());
    opts.image = image().manifest.name.clone();
    match cluster::up(c.dir(), &opts) {
        Err(ClusterError::AlreadyRunning { nodes, .. }) => assert_eq!(nodes, 4),
        other => panic!("second up: {other:?}"),
    }
    // Bad sizes are refused before anything is touched.
    opts.nodes = 0;
    assert!(matches!(
        cluster::up(c.dir(), &opts),
        Err(ClusterError::BadInput(_))
    ));
    opts.nodes = 2;
    opts.servers = 3;
    assert!(matches!(
        cluster::up(c.dir(), &opts),
        Err(ClusterError::BadInput(_))
    ));
    // Untouched: same VMs, all up and answering, no fault in force.
    let after = c.status();
    for (b, a) in before.nodes.iter().zip(&after.nodes) {
        assert_eq!((&b.name, b.qemu_pid), (&a.name, a.qemu_pid));
        assert_eq!(
            (a.state, a.answering, a.link_up),
            (NodeState::Up, Some(true), true)
        );
    }
    let stats = sw.stats().unwrap();
    assert!(stats.partition.is_none() && stats.global_loss == 0.0);
    for (a, b) in pairs() {
        assert!(c.probe(a, b, 1).reached(), "{a} -> {b}");
    }
}

#[test]
fn stale_run_dir_is_detected_and_cleaned() {
    let _g = exclusive();
    let c = Cluster::up("cluster-stale", 2, 1, Duration::ZERO);
    let st = c.status();
    let pids: Vec<u32> = st.nodes.iter().filter_map(|n| n.qemu_pid).collect();
    let netns = st.netns.clone();
    std::process::Command::new("kill")
        .args(["-KILL", &st.daemon_pid.to_string()])
        .status()
        .unwrap();
    // The daemon's VMs die with it (parent-death signal); give the kernel a bounded moment.
    let start = Instant::now();
    while pids
        .iter()
        .any(|p| Path::new(&format!("/proc/{p}/cmdline")).exists())
        && start.elapsed() < Duration::from_secs(5)
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let e = cluster::status(c.dir(), false).unwrap_err().to_string();
    assert!(e.contains("cleaned stale"), "{e}");
    assert!(!c.dir().exists(), "the stale run dir is removed");
    if let Some(ns) = netns {
        assert!(!cluster::netns::exists(&ns), "namespace {ns} deleted");
    }
    for p in pids {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        assert!(
            stat.is_empty() || stat.contains(") Z"),
            "QEMU {p} still alive"
        );
    }
    assert!(matches!(
        cluster::status(c.dir(), false),
        Err(ClusterError::NotRunning(_))
    ));
    // And the directory is usable again.
    drop(c);
    let again = Cluster::up("cluster-stale", 2, 1, Duration::ZERO);
    assert!(again.probe("n1", "n2", 2).reached());
}
