//! The switch with fake VMs (plain UDP sockets sending handcrafted frames): forwarding,
//! counters and every fault, through the same control socket the CLI uses.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use unipeer::net::fake::{FakeVm, vm_mac};
use unipeer::net::{
    self, MacAddr, PortInfo, StartError, SwitchClient, SwitchConfig, SwitchHandle, UplinkConfig,
    UplinkStatus,
};

/// How long a test waits for a frame that must arrive.
const ARRIVE: Duration = Duration::from_secs(2);
/// How long a test listens to conclude a frame will not arrive.
const QUIET: Duration = Duration::from_millis(150);

struct Lab {
    switch: Option<SwitchHandle>,
    client: SwitchClient,
    dir: PathBuf,
}

impl Lab {
    fn new(test: &str, seed: u64) -> Self {
        let dir =
            std::env::temp_dir().join(format!("unipeer-switch-test-{}-{test}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut cfg = SwitchConfig::new(&dir);
        cfg.seed = seed;
        cfg.uplink = UplinkConfig {
            enabled: false,
            ..UplinkConfig::default()
        };
        let switch = net::start(cfg).expect("switch starts");
        let client = SwitchClient::connect(&dir).expect("client connects");
        Lab {
            switch: Some(switch),
            client,
            dir,
        }
    }

    fn vms(&mut self, names: &[&str]) -> Vec<FakeVm> {
        names
            .iter()
            .enumerate()
            .map(|(i, n)| {
                let port: PortInfo = self.client.add_port(n, None).expect("port added");
                FakeVm::attach(&port, vm_mac(i as u16 + 1)).expect("fake VM binds")
            })
            .collect()
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if let Some(s) = self.switch.take() {
            s.stop();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Every VM broadcasts a tagged frame; answers the set of (sender, receiver) pairs that
/// arrived.
fn reachability(vms: &[FakeVm], round: u8) -> BTreeSet<(usize, usize)> {
    for (i, vm) in vms.iter().enumerate() {
        vm.send_to(MacAddr::BROADCAST, &[b'R', round, i as u8])
            .unwrap();
    }
    let mut got = BTreeSet::new();
    let deadline = Instant::now() + QUIET;
    for (j, vm) in vms.iter().enumerate() {
        while let Some(f) = vm.recv_tagged(&[b'R', round], deadline) {
            got.insert((f[16] as usize, j));
        }
    }
    got
}

fn full_matrix(n: usize) -> BTreeSet<(usize, usize)> {
    (0..n)
        .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
        .collect()
}

#[test]
fn learns_floods_and_counts() {
    let mut lab = Lab::new("learn", 1);
    let v = lab.vms(&["a", "b", "c"]);
    // Unknown destination: flooded to b and c.
    v[0].send_to(v[1].mac, b"one").unwrap();
    assert!(v[1].recv_tagged(b"one", Instant::now() + ARRIVE).is_some());
    assert!(v[2].recv_tagged(b"one", Instant::now() + ARRIVE).is_some());
    // b answers a: a was learned, so only a gets it.
    v[1].send_to(v[0].mac, b"two").unwrap();
    let f = v[0].recv_tagged(b"two", Instant::now() + ARRIVE).unwrap();
    assert_eq!(FakeVm::source_of(&f), Some(v[1].mac));
    // Now b is known too: a -> b goes to b only.
    v[0].send_to(v[1].mac, b"three").unwrap();
    assert!(
        v[1].recv_tagged(b"three", Instant::now() + ARRIVE)
            .is_some()
    );
    assert!(
        v[2].recv_frame(Instant::now() + QUIET).is_none(),
        "c saw a unicast"
    );
    // A frame shorter than a header is counted as malformed.
    v[2].send_frame(&[1, 2, 3]).unwrap();

    let deadline = Instant::now() + ARRIVE;
    let st = loop {
        let st = lab.client.stats().unwrap();
        if st.port("c").unwrap().counters.dropped.malformed == 1 || Instant::now() > deadline {
            break st;
        }
    };
    let (a, b, c) = (
        st.port("a").unwrap().counters,
        st.port("b").unwrap().counters,
        st.port("c").unwrap().counters,
    );
    assert_eq!((a.rx_frames, a.tx_frames), (2, 1));
    assert_eq!((b.rx_frames, b.tx_frames), (1, 2));
    assert_eq!((c.rx_frames, c.tx_frames), (1, 1));
    assert_eq!(c.dropped.malformed, 1);
    assert_eq!(a.rx_bytes, 120, "two 60-byte frames");
    assert_eq!(st.mac_entries, 2);
    assert!(matches!(st.uplink, UplinkStatus::Off { .. }));
}

#[test]
fn cut_and_restore() {
    let mut lab = Lab::new("cut", 1);
    let v = lab.vms(&["a", "b", "c"]);
    assert_eq!(reachability(&v, 0), full_matrix(3));
    lab.client.cut("b").unwrap();
    let cut: BTreeSet<_> = [(0, 2), (2, 0)].into();
    assert_eq!(reachability(&v, 1), cut);
    let st = lab.client.stats().unwrap();
    assert!(!st.port("b").unwrap().link_up);
    // b's own broadcast (1) + a's and c's towards b (2).
    assert_eq!(st.port("b").unwrap().counters.dropped.link_down, 3);
    lab.client.restore("b").unwrap();
    assert_eq!(reachability(&v, 2), full_matrix(3));
    let err = lab.client.cut("zz").unwrap_err().to_string();
    assert!(err.contains("unknown port \"zz\""), "{err}");
    // The fault log (the dashboard's): one cut of b, started then healed; the refused cut of
    // zz is not a fault.
    let faults = lab.client.faults().unwrap();
    assert_eq!(faults.len(), 1, "{faults:?}");
    assert_eq!(
        (faults[0].kind.as_str(), faults[0].target.as_str()),
        ("cut", "b")
    );
    let healed = faults[0].healed_ms.expect("restored");
    assert!(healed >= faults[0].started_ms, "{faults:?}");
}

#[test]
fn partition_gives_the_exact_matrix_and_heal_restores_it() {
    let mut lab = Lab::new("partition", 1);
    let v = lab.vms(&["a", "b", "c", "d", "e"]);
    assert_eq!(reachability(&v, 0), full_matrix(5));
    lab.client
        .partition(&[vec!["a", "b"], vec!["c", "d"]])
        .unwrap();
    // e is in no group: it is alone in the rest group.
    let expected: BTreeSet<_> = [(0, 1), (1, 0), (2, 3), (3, 2)].into();
    assert_eq!(reachability(&v, 1), expected);
    let st = lab.client.stats().unwrap();
    assert_eq!(st.port("a").unwrap().partition_group, Some(0));
    assert_eq!(st.port("d").unwrap().partition_group, Some(1));
    assert_eq!(st.port("e").unwrap().partition_group, Some(2));
    let table = st.to_string();
    assert!(table.contains("partition: a,b | c,d | (rest)"), "{table}");
    let open = lab.client.faults().unwrap();
    assert_eq!(open.len(), 1, "{open:?}");
    assert_eq!(open[0].kind, "partition");
    assert_eq!(open[0].target, "a,b | c,d");
    assert_eq!(open[0].healed_ms, None);
    lab.client.heal().unwrap();
    assert_eq!(reachability(&v, 2), full_matrix(5));
    assert!(lab.client.stats().unwrap().partition.is_none());
    assert!(lab.client.faults().unwrap()[0].healed_ms.is_some());
}

/// Sends `n` unicast frames a -> b in paced batches; answers how many arrived.
fn send_counted(a: &FakeVm, b: &FakeVm, n: usize) -> usize {
    let mut got = 0;
    for batch in 0..n / 50 {
        for i in 0..50 {
            a.send_to(b.mac, &[b'L', batch as u8, i]).unwrap();
        }
        while b
            .recv_tagged(b"L", Instant::now() + Duration::from_millis(60))
            .is_some()
        {
            got += 1;
        }
    }
    got
}

fn loss_run(seed: u64) -> (usize, u64) {
    let mut lab = Lab::new(&format!("loss-{seed}"), seed);
    let v = lab.vms(&["a", "b"]);
    // Learn both MACs before the loss starts.
    v[1].send_to(v[0].mac, b"hi").unwrap();
    assert!(v[0].recv_tagged(b"hi", Instant::now() + ARRIVE).is_some());
    lab.client.loss(None, 0.1).unwrap();
    let mut got = send_counted(&v[0], &v[1], 2000);
    let mut st = lab.client.stats().unwrap();
    // A frame may still be on its way under load: collect stragglers, with a deadline.
    let deadline = Instant::now() + ARRIVE;
    while (got as u64) < st.port("b").unwrap().counters.tx_frames && Instant::now() < deadline {
        if v[1].recv_tagged(b"L", Instant::now() + QUIET).is_some() {
            got += 1;
        }
        st = lab.client.stats().unwrap();
    }
    let b = st.port("b").unwrap().counters;
    assert_eq!(st.global_loss, 0.1);
    // Every frame is accounted for: delivered (and received) or dropped for loss.
    assert_eq!(b.tx_frames as usize, got);
    assert_eq!(b.tx_frames + b.dropped.loss, 2000);
    lab.client.loss(None, 0.0).unwrap();
    assert_eq!(send_counted(&v[0], &v[1], 100), 100);
    (got, b.dropped.loss)
}

#[test]
fn loss_matches_the_fraction_and_replays_from_the_seed() {
    let (got, lost) = loss_run(7);
    // 2000 trials at p = 0.1: sd ~ 13.4; allow 4 sd.
    assert!((146..=254).contains(&lost), "lost {lost} of 2000");
    assert_eq!(loss_run(7), (got, lost), "same seed, same drops");
}

#[test]
fn per_port_loss_of_one_drops_everything_to_it() {
    let mut lab = Lab::new("loss-port", 3);
    let v = lab.vms(&["a", "b", "c"]);
    lab.client.loss(Some("b"), 1.0).unwrap();
    let expected: BTreeSet<_> = [(0, 2), (2, 0)].into();
    assert_eq!(reachability(&v, 0), expected);
}

/// One-way time a -> b of one tagged frame.
fn one_way(a: &FakeVm, b: &FakeVm, tag: u8) -> Duration {
    let t0 = Instant::now();
    a.send_to(b.mac, &[b'D', tag]).unwrap();
    b.recv_tagged(&[b'D', tag], t0 + Duration::from_secs(5))
        .expect("delayed frame arrives");
    t0.elapsed()
}

#[test]
fn delays_show_up_in_measured_latency() {
    let mut lab = Lab::new("delay", 1);
    let v = lab.vms(&["a", "b", "c"]);
    v[1].send_to(v[0].mac, b"learn").unwrap();
    assert!(
        v[0].recv_tagged(b"learn", Instant::now() + ARRIVE)
            .is_some()
    );
    let base = one_way(&v[0], &v[1], 0);
    assert!(base < Duration::from_millis(15), "baseline {base:?}");

    lab.client
        .delay_between(&["a"], &["b"], Duration::from_millis(20))
        .unwrap();
    let d = one_way(&v[0], &v[1], 1);
    assert!(
        d >= Duration::from_millis(20) && d < Duration::from_millis(220),
        "{d:?}"
    );
    let back = one_way(&v[1], &v[0], 2);
    assert!(
        back >= Duration::from_millis(20),
        "both directions: {back:?}"
    );

    // Servers add their delay; link delay adds too.
    lab.client
        .servers(
            &[("s1", vec!["a"]), ("s2", vec!["b", "c"])],
            Duration::from_millis(15),
        )
        .unwrap();
    lab.client.delay("b", Duration::from_millis(5)).unwrap();
    let d = one_way(&v[0], &v[1], 3);
    assert!(
        d >= Duration::from_millis(40) && d < Duration::from_millis(240),
        "{d:?}"
    );
    let st = lab.client.stats().unwrap();
    assert_eq!(st.server_delay_us, 15_000);
    assert_eq!(st.port("c").unwrap().info.server.as_deref(), Some("s2"));

    // Order is kept through the delay queue.
    for i in 0..20u8 {
        v[0].send_to(v[1].mac, &[b'O', i]).unwrap();
    }
    for i in 0..20u8 {
        let f = v[1]
            .recv_tagged(b"O", Instant::now() + ARRIVE)
            .expect("ordered frame");
        assert_eq!(f[15], i);
    }

    lab.client.clear_delays().unwrap();
    lab.client.servers::<&str>(&[], Duration::ZERO).unwrap();
    let d = one_way(&v[0], &v[1], 4);
    assert!(d < Duration::from_millis(15), "cleared: {d:?}");
}

#[test]
fn bad_control_input_is_refused_and_changes_nothing() {
    let mut lab = Lab::new("bad", 1);
    let _v = lab.vms(&["a", "b", "c"]);
    let c = &mut lab.client;
    let e = c.partition(&[vec!["a", "b"], vec!["b", "c"]]).unwrap_err();
    assert!(
        e.to_string().contains("\"b\" is in more than one group"),
        "{e}"
    );
    let e = c.partition(&[vec!["a"], vec!["nope"]]).unwrap_err();
    assert!(e.to_string().contains("unknown port \"nope\""), "{e}");
    for x in [1.5, -0.1] {
        let e = c.loss(None, x).unwrap_err();
        assert!(e.to_string().contains("outside 0..=1"), "{e}");
    }
    // JSON has no NaN: it travels as null and is refused as a bad request.
    assert!(c.loss(None, f64::NAN).is_err());
    assert!(c.loss(Some("ghost"), 0.5).is_err());
    assert!(c.delay("a", Duration::from_secs(3600)).is_err());
    assert!(
        c.delay_between(&["a"], &["a"], Duration::from_millis(1))
            .is_err()
    );
    assert!(c.add_port("a", None).is_err(), "duplicate name");
    assert!(c.add_port("host", None).is_err(), "reserved name");
    assert!(c.add_port("bad name", None).is_err());
    assert!(c.remove_port("ghost").is_err());
    let r = c.send_raw_line("this is not json\n").unwrap();
    assert!(!r.ok && r.error.unwrap().starts_with("bad request"));
    let r = c.send_raw_line("{\"op\":\"explode\"}\n").unwrap();
    assert!(!r.ok);
    let r = c
        .send_raw_line("{\"op\":\"cut\",\"port\":\"a\",\"extra\":1}\n")
        .unwrap();
    assert!(!r.ok, "unknown fields are refused");
    // Nothing changed.
    let st = c.stats().unwrap();
    assert!(st.partition.is_none());
    assert_eq!(st.global_loss, 0.0);
    assert!(
        st.ports
            .iter()
            .all(|p| p.link_up && p.loss == 0.0 && p.delay_us == 0)
    );
    assert_eq!(st.ports.len(), 3);
}

#[test]
fn one_switch_per_run_dir_and_shutdown_cleans_up() {
    let dir = std::env::temp_dir().join(format!("unipeer-switch-test-{}-life", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // A stale socket (its switch died) is removed, not trusted.
    drop(std::os::unix::net::UnixListener::bind(dir.join(net::SOCKET_NAME)).unwrap());
    let mut cfg = SwitchConfig::new(&dir);
    cfg.uplink.enabled = false;
    let first = net::start(cfg.clone()).expect("starts over a stale socket");
    assert!(matches!(
        net::start(cfg),
        Err(StartError::AlreadyRunning(_))
    ));
    let mut c = SwitchClient::connect(&dir).unwrap();
    let p = c.add_port("n0", None).unwrap();
    let arg = p.qemu_netdev_arg("net0").unwrap();
    assert_eq!(
        arg,
        format!(
            "dgram,id=net0,local.type=inet,local.host=127.0.0.1,local.port={},remote.type=inet,remote.host=127.0.0.1,remote.port={}",
            p.vm_addr.unwrap().port(),
            p.switch_addr.unwrap().port()
        )
    );
    assert_eq!(c.ports().unwrap(), vec![p]);
    c.shutdown().unwrap();
    first.wait();
    assert!(!dir.join(net::SOCKET_NAME).exists());
    assert!(matches!(
        SwitchClient::connect(&dir),
        Err(net::ControlError::NotRunning { .. })
    ));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn forwarding_bench_measures_rate_and_rtt() {
    let r = net::measure_forwarding(&net::ForwardingBench {
        rtt_samples: 300,
        frames: 5_000,
        window: 16,
        frame_len: 128,
        time_limit: Duration::from_secs(20),
    })
    .unwrap();
    assert_eq!(r.rtt_samples, 300);
    assert!(r.rtt_p50_us > 0.0 && r.rtt_p50_us < 5_000.0, "{r:?}");
    assert!(r.frames_forwarded >= 2 * 5_000 - 2 * 16, "{r:?}");
    assert!(r.frames_per_s > 1_000.0, "{r:?}");
    println!("{r:?}");
}

#[test]
fn removed_port_is_gone_and_frames_delayed_to_a_cut_port_are_dropped() {
    let mut lab = Lab::new("remove", 1);
    let v = lab.vms(&["a", "b", "c"]);
    lab.client.remove_port("c").unwrap();
    let expected: BTreeSet<_> = [(0, 1), (1, 0)].into();
    assert_eq!(reachability(&v[..2], 0), expected);
    assert!(v[2].recv_frame(Instant::now() + QUIET).is_none());
    assert!(lab.client.stats().unwrap().port("c").is_none());
    // The name is free again.
    let c2 = FakeVm::attach(&lab.client.add_port("c", None).unwrap(), vm_mac(9)).unwrap();
    v[0].send_to(MacAddr::BROADCAST, b"again").unwrap();
    assert!(c2.recv_tagged(b"again", Instant::now() + ARRIVE).is_some());

    lab.client.delay("b", Duration::from_millis(100)).unwrap();
    v[0].send_to(MacAddr::BROADCAST, b"late").unwrap();
    // Wait until the frame sits in the delay queue, then cut b before its deadline.
    let deadline = Instant::now() + ARRIVE;
    while lab.client.stats().unwrap().queued_frames == 0 && Instant::now() < deadline {}
    lab.client.cut("b").unwrap();
    assert!(
        v[1].recv_tagged(b"late", Instant::now() + Duration::from_millis(300))
            .is_none()
    );
    let st = lab.client.stats().unwrap();
    assert_eq!(st.queued_frames, 0);
    assert_eq!(st.port("b").unwrap().counters.dropped.link_down, 1);
}

/// The full-size figures for the closing note: `cargo test --release -p unipeer --test
/// switch_faults switch_bench_full -- --ignored --nocapture`.
#[test]
#[ignore = "a benchmark, run by hand"]
fn switch_bench_full() {
    let r = net::measure_forwarding(&net::ForwardingBench::default()).unwrap();
    println!("{r:#?}");
    assert_eq!(r.lost, 0);
}
