//! The guest's surfaces against a local user who is not the operator (issue 10): operator
//! commands need the launch config's key, a bad number is an error rather than a crash, the
//! UDP ports neither amplify nor answer other nodes' service ports, one source cannot hold the
//! diagnostic port's slots, the report says where the node's randomness came from, job
//! delegation follows trust (off without trust material, on with it), and forged ARP packets or
//! IPv4 frames on the segment do not redirect a node's traffic for another node.
//!
//! A VM behind QEMU user networking sees every host connection from 10.0.2.2, normally its
//! gateway (the host uplink, exempt from the per-source rules). `stranger` launches one whose
//! gateway is 10.0.2.3 instead: the host then stands in for a source that is not the host.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use unipeer::cluster::{self, UpOptions};
use unipeer::diag::{self, OperatorKey, ProbeError};
use unipeer::qemu::Machine;
use unipeer::vm::{self, ReadyVm};
use unipeer_node::launch::{GuestExit, READY_MARKER};
use unipeer_qemu_tests::{accel, exclusive, field as num, image, options, run_dir, unipeer_bin};

const BROADCAST: [u8; 6] = [0xff; 6];

const PROBE: Duration = Duration::from_secs(10);

fn scaled(d: Duration) -> Duration {
    d.mul_f64(vm::timeout_scale())
}

fn context(vm: &ReadyVm) -> String {
    format!(
        "\nQEMU command: {}\nserial log:\n{}",
        vm.vm.command_line,
        vm.vm.serial()
    )
}

/// A VM whose launch config names 10.0.2.3 as its gateway, so the host (10.0.2.2) is an
/// ordinary source to it.
fn stranger(test: &str) -> ReadyVm {
    let opts = options(test, Machine::Microvm);
    let (mut spec, ports, mut config) = vm::user_net_spec(image(), &opts).expect("spec");
    config.net.gateway = Some([10, 0, 2, 3]);
    spec.config_blob = config.encode().expect("config encodes");
    let mut vm = spec.spawn().expect("spawn");
    let (ready_line, seen_at) = vm
        .wait_for_line(READY_MARKER, vm::ready_timeout(opts.accel))
        .unwrap_or_else(|e| panic!("boot failed: {e}\n{}", vm.serial()));
    let launch_to_ready = seen_at.duration_since(vm.launched_at);
    ReadyVm {
        vm,
        ports,
        config,
        ready_line,
        launch_to_ready,
    }
}

fn shutdown(mut vm: ReadyVm) {
    let reply = diag::tcp_command(
        vm.ports.diag_tcp_addr(),
        vm.operator_key().as_ref(),
        "shutdown",
        scaled(PROBE),
    )
    .unwrap_or_else(|e| panic!("shutdown: {e}{}", context(&vm)));
    assert!(reply.contains("shutting down"), "{reply:?}");
    let status = vm
        .vm
        .wait_exit(scaled(Duration::from_secs(10)))
        .expect("exit after shutdown");
    assert_eq!(status.code(), Some(GuestExit::Success.qemu_status()));
}

#[test]
fn operator_commands_need_the_key_and_bad_numbers_are_errors() {
    let _guard = exclusive();
    let vm = vm::launch_ready(image(), &options("operator", Machine::Microvm))
        .unwrap_or_else(|e| panic!("boot failed: {e}"));
    let addr = vm.ports.diag_tcp_addr();
    let key = vm.operator_key().expect("launched with an operator key");
    // Without authentication: refused, and the node keeps running.
    for cmd in [
        "shutdown",
        "put some-key value",
        "probe 10.0.2.2 1",
        "job-primes 0 10 1",
    ] {
        let reply = diag::tcp_command(addr, None, cmd, scaled(PROBE))
            .unwrap_or_else(|e| panic!("{cmd}: {e}{}", context(&vm)));
        assert!(
            reply.starts_with("error: authentication required"),
            "{cmd} without the key answered {reply:?}"
        );
    }
    // Open commands stay open.
    let pong = diag::tcp_command(addr, None, "ping", scaled(PROBE)).expect("ping");
    assert_eq!(pong, "pong\n");
    // Another key is refused.
    let wrong = OperatorKey::generate().unwrap();
    match diag::tcp_command(addr, Some(&wrong), "shutdown", scaled(PROBE)) {
        Err(ProbeError::AuthRefused(_)) => {}
        other => panic!("a wrong key gave {other:?}"),
    }
    // The overflowing line of finding 3, authenticated: an error, and the node still answers.
    let reply = diag::tcp_command(
        addr,
        Some(&key),
        "job-primes 0 18446744073709551615 256",
        scaled(PROBE),
    )
    .unwrap_or_else(|e| panic!("job-primes: {e}{}", context(&vm)));
    assert!(reply.starts_with("error:"), "{reply:?}");
    // (TCP: the whole report; UDP carries a compact one.)
    let r = diag::query_tcp(addr, scaled(PROBE))
        .unwrap_or_else(|e| panic!("no answer after job-primes: {e}{}", context(&vm)));
    assert!(r.num("diag_unauthorized") >= 4, "{:?}", r.fields);
    assert!(r.num("diag_auth_failed") >= 1 && r.num("diag_auth_ok") >= 1);
    // Without trust material the node does no job delegation, and says so.
    assert_eq!(r.get("jobs_delegation"), Some("off"), "{:?}", r.fields);
    // The seed came from the OS (and the CPU's instruction, when it has one).
    assert!(
        r.get("entropy").is_some_and(|e| e.starts_with("os-seed")),
        "entropy={:?}",
        r.get("entropy")
    );
    shutdown(vm);
}

/// Sends `request` from `socket` to `to` and collects every answer for `window`.
fn answers(socket: &UdpSocket, to: SocketAddr, request: &[u8], window: Duration) -> Vec<usize> {
    socket.send_to(request, to).expect("send");
    let mut got = Vec::new();
    let mut buf = [0u8; 2048];
    let end = Instant::now() + window;
    while Instant::now() < end {
        socket
            .set_read_timeout(Some(
                end.saturating_duration_since(Instant::now())
                    .max(Duration::from_millis(1)),
            ))
            .unwrap();
        match socket.recv_from(&mut buf) {
            Ok((n, _)) => got.push(n),
            Err(_) => break,
        }
    }
    got
}

#[test]
fn udp_ports_do_not_amplify_rate_limit_and_ignore_service_ports() {
    let _guard = exclusive();
    let vm = stranger("udp-guard");
    let diag_addr = vm.ports.diag_udp_addr();
    let echo_addr = vm.ports.echo_addr();
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    // Amplification: small and full-size requests, bytes out over bytes in.
    let (mut bytes_in, mut bytes_out) = (0usize, 0usize);
    for size in [1usize, 6, 64, 300, 1200] {
        let mut req = vec![b' '; size];
        req[..size.min(6)].copy_from_slice(&b"stats\n"[..size.min(6)]);
        let got = answers(&socket, diag_addr, &req, scaled(Duration::from_millis(400)));
        bytes_in += size;
        bytes_out += got.iter().sum::<usize>();
        assert!(
            got.iter().all(|&n| n <= size),
            "{size}-byte request answered with {got:?}"
        );
        if size >= 300 {
            assert!(
                !got.is_empty(),
                "a {size}-byte request got no answer{}",
                context(&vm)
            );
        }
    }
    let ratio = bytes_out as f64 / bytes_in as f64;
    println!("amplification: {bytes_out} bytes out / {bytes_in} bytes in = {ratio:.3}");
    assert!(ratio <= 1.0, "amplification ratio {ratio:.3}");
    // Rate limit: 60 full-size requests at once get at most the burst and a few refills.
    let mut req = vec![b' '; 1200];
    req[..6].copy_from_slice(b"stats\n");
    for _ in 0..60 {
        socket.send_to(&req, diag_addr).unwrap();
    }
    let got = answers(&socket, diag_addr, &req, scaled(Duration::from_millis(500)));
    println!("rate limit: 61 requests at once, {} answered", got.len());
    assert!(
        !got.is_empty() && got.len() <= 30,
        "{} of 61 answered",
        got.len()
    );
    // Reflection: datagrams from another node's echo and diagnostic ports are not answered,
    // so two nodes cannot bounce a spoofed datagram between them.
    let mut service_ports_tried = 0;
    for port in [7007u16, 7001, 7000] {
        let Ok(from_service) = UdpSocket::bind(("127.0.0.1", port)) else {
            println!("port {port} is taken on this host: skipped");
            continue;
        };
        service_ports_tried += 1;
        for to in [echo_addr, diag_addr] {
            let got = answers(&from_service, to, &req, scaled(Duration::from_millis(400)));
            assert!(
                got.is_empty(),
                "a datagram from port {port} to {to} was answered: {got:?}"
            );
        }
    }
    // The node counted each kind of datagram it left unanswered.
    let r = diag::query_tcp(vm.ports.diag_tcp_addr(), scaled(PROBE))
        .unwrap_or_else(|e| panic!("report: {e}{}", context(&vm)));
    println!(
        "udp_rate_limited={} udp_too_small={} udp_from_service_port={}",
        r.num("udp_rate_limited"),
        r.num("udp_too_small"),
        r.num("udp_from_service_port")
    );
    assert!(r.num("udp_rate_limited") >= 1 && r.num("udp_too_small") >= 1);
    assert!(r.num("udp_from_service_port") >= 2 * service_ports_tried);
    shutdown(vm);
}

#[test]
fn one_source_cannot_hold_the_diagnostic_slots() {
    let _guard = exclusive();
    let vm = stranger("slots");
    let addr = vm.ports.diag_tcp_addr();
    let key = vm.operator_key().unwrap();
    // Eight connections at once, silent. At no moment may more than the per-source share (3)
    // hold a greeted session; the node resets the others before greeting them (QEMU's user
    // network retries a reset connection, so one may be greeted later, once a slot is free).
    let conns: Vec<TcpStream> = (0..8)
        .map(|_| TcpStream::connect_timeout(&addr, scaled(PROBE)).expect("connect"))
        .collect();
    let mut greeted = Vec::new();
    let mut refused = 0;
    for mut s in conns {
        s.set_read_timeout(Some(scaled(Duration::from_millis(500))))
            .unwrap();
        let mut buf = [0u8; 4096];
        match s.read(&mut buf) {
            Ok(0) => refused += 1,
            Ok(_) => greeted.push(s),
            Err(_) => {}
        }
    }
    // Which greeted ones are open right now (no EOF or reset waiting)?
    let mut held = Vec::new();
    for s in greeted {
        s.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 4096];
        let open = loop {
            match (&s).read(&mut buf) {
                Ok(0) => break false,
                Ok(_) => continue,
                Err(e) => break e.kind() == std::io::ErrorKind::WouldBlock,
            }
        };
        s.set_nonblocking(false).unwrap();
        if open {
            held.push(s);
        }
    }
    println!("held {} slots at once, {refused} refused", held.len());
    assert!(
        !held.is_empty() && held.len() <= 3,
        "one source held {} slots at once{}",
        held.len(),
        context(&vm)
    );
    assert!(refused >= 1, "no connection was refused");
    // Unauthenticated and silent: the slots come back within the hello deadline.
    let start = Instant::now();
    for (i, s) in held.iter_mut().enumerate() {
        s.set_read_timeout(Some(scaled(Duration::from_secs(10))))
            .unwrap();
        let mut buf = [0u8; 4096];
        let ended = loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break true,
                Ok(_) => continue,
            }
        };
        assert!(ended, "held slot {i} was never freed");
    }
    let freed = start.elapsed();
    println!("silent unauthenticated slots freed after {freed:?}");
    assert!(freed < scaled(Duration::from_secs(8)), "{freed:?}");
    // A challenge left unanswered frees the slot too.
    let mut s = TcpStream::connect_timeout(&addr, scaled(PROBE)).unwrap();
    s.set_read_timeout(Some(scaled(Duration::from_secs(10))))
        .unwrap();
    let mut buf = [0u8; 4096];
    let _ = s.read(&mut buf);
    s.write_all(b"auth?\n").unwrap();
    let t = Instant::now();
    while !matches!(s.read(&mut buf), Ok(0) | Err(_)) {}
    assert!(t.elapsed() < scaled(Duration::from_secs(8)));
    // The operator still gets in.
    let reply = diag::tcp_command(addr, Some(&key), "ping", scaled(PROBE))
        .unwrap_or_else(|e| panic!("operator after the flood: {e}{}", context(&vm)));
    assert_eq!(reply, "pong\n");
    let report = diag::query_tcp(addr, scaled(PROBE)).expect("report");
    assert!(report.num("diag_source_capped") >= 1, "{:?}", report.fields);
    assert!(report.num("diag_auth_timeouts") >= 1, "{:?}", report.fields);
    shutdown(vm);
}

#[test]
fn a_node_with_trust_material_refuses_a_seed_not_from_the_os() {
    let _guard = exclusive();
    let opts = options("seed-mark", Machine::Microvm);
    let store_dir = opts.run_dir.join("authority");
    unipeer::cluster::ensure_authority(&store_dir).expect("authority store");
    let mut store = unipeer::ca::AuthorityStore::open(&store_dir).expect("open the store");
    store
        .add_peer("seed-mark", "local", 3_600_000)
        .expect("certify the node");
    let material = unipeer::ca::launch_material(&store, "seed-mark", &[]).expect("material");
    let (mut spec, _, mut config) = vm::user_net_spec(image(), &opts).expect("spec");
    config.node_key = material.node_key;
    config.certificate = material.certificate;
    config.extra.extend(material.extra);
    // With the mark the node boots (checked first, so the refusal below is the mark's doing).
    spec.config_blob = config.encode().expect("encodes");
    let mut good = spec.spawn().expect("spawn");
    good.wait_for_line(READY_MARKER, vm::ready_timeout(opts.accel))
        .unwrap_or_else(|e| panic!("the marked node did not boot: {e}\n{}", good.serial()));
    good.kill();
    // Without it: a clear error and the bad-config exit, before any key is derived.
    config
        .extra
        .retain(|(k, _)| k != unipeer_node::launch::SEED_SOURCE_EXTRA);
    spec.name = "seed-unmarked".into();
    spec.config_blob = config.encode().expect("encodes");
    let mut bad = spec.spawn().expect("spawn");
    let status = bad
        .wait_exit(scaled(Duration::from_secs(30)))
        .unwrap_or_else(|e| panic!("the unmarked node did not exit: {e}\n{}", bad.serial()));
    assert_eq!(
        status.code(),
        Some(GuestExit::BadConfig.qemu_status()),
        "{}",
        bad.serial()
    );
    assert!(bad.serial().contains("seed_source=os"), "{}", bad.serial());
}

/// The cluster of [`arp_learns_only_what_it_asked_for_and_delegation_follows_trust`], taken
/// down when the test ends, pass or fail.
struct Cluster {
    dir: std::path::PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = cluster::down(&self.dir);
    }
}

fn node_report(c: &Cluster, node: &str) -> std::collections::BTreeMap<String, String> {
    cluster::host_probe(&c.dir, node).unwrap_or_else(|e| panic!("report of {node}: {e}"))
}

fn mac(text: &str) -> [u8; 6] {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).expect("MAC byte"))
        .collect();
    bytes.try_into().expect("six MAC bytes")
}

/// A port of the test on the cluster's switch: its socket sends and receives whole Ethernet
/// frames. The switch listens on the namespace's loopback, so the socket is made by a thread
/// that joined the namespace (the socket stays in it).
fn segment_port(c: &Cluster, netns: &str, server: &str) -> UdpSocket {
    let mut switch = cluster::switch(&c.dir).unwrap_or_else(|e| panic!("switch: {e}"));
    let info = switch
        .add_port("forger", Some(server))
        .unwrap_or_else(|e| panic!("add a port: {e}"));
    let (vm_end, switch_end) = (info.vm_addr.unwrap(), info.switch_addr.unwrap());
    let ns = std::fs::File::open(std::path::Path::new("/run/netns").join(netns))
        .unwrap_or_else(|e| panic!("namespace {netns}: {e}"));
    std::thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("join the namespace");
        let socket = UdpSocket::bind(vm_end).expect("bind the port's VM end");
        socket.connect(switch_end).expect("connect to the switch");
        socket
    })
    .join()
    .expect("namespace thread")
}

fn eth(dst: [u8; 6], src: [u8; 6], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// An ARP packet (RFC 826) in an Ethernet frame.
fn arp(dst: [u8; 6], op: u16, sender: ([u8; 6], [u8; 4]), target: ([u8; 6], [u8; 4])) -> Vec<u8> {
    let mut p = vec![0, 1, 8, 0, 6, 4];
    p.extend_from_slice(&op.to_be_bytes());
    p.extend_from_slice(&sender.0);
    p.extend_from_slice(&sender.1);
    p.extend_from_slice(&target.0);
    p.extend_from_slice(&target.1);
    eth(dst, sender.0, 0x0806, &p)
}

fn ones_complement(data: &[u8]) -> u16 {
    let mut sum: u32 = data
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], *c.get(1).unwrap_or(&0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// A UDP datagram in an IPv4 packet in an Ethernet frame, checksums filled in.
fn udp(
    macs: ([u8; 6], [u8; 6]),
    src: ([u8; 4], u16),
    dst: ([u8; 4], u16),
    payload: &[u8],
) -> Vec<u8> {
    let udp_len = 8 + payload.len() as u16;
    let mut d = Vec::new();
    d.extend_from_slice(&src.1.to_be_bytes());
    d.extend_from_slice(&dst.1.to_be_bytes());
    d.extend_from_slice(&udp_len.to_be_bytes());
    d.extend_from_slice(&[0, 0]);
    d.extend_from_slice(payload);
    let mut pseudo = Vec::new();
    pseudo.extend_from_slice(&src.0);
    pseudo.extend_from_slice(&dst.0);
    pseudo.extend_from_slice(&[0, 17]);
    pseudo.extend_from_slice(&udp_len.to_be_bytes());
    pseudo.extend_from_slice(&d);
    d[6..8].copy_from_slice(&ones_complement(&pseudo).to_be_bytes());
    let mut ip = vec![0x45, 0];
    ip.extend_from_slice(&(20 + udp_len).to_be_bytes());
    ip.extend_from_slice(&[0, 1, 0x40, 0, 64, 17, 0, 0]);
    ip.extend_from_slice(&src.0);
    ip.extend_from_slice(&dst.0);
    let sum = ones_complement(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    ip.extend_from_slice(&d);
    eth(macs.0, macs.1, 0x0800, &ip)
}

/// Reads frames from `port` until one satisfies `wanted` or `within` passes; every frame
/// read goes into `seen`.
fn frame_until(
    port: &UdpSocket,
    within: Duration,
    seen: &mut Vec<Vec<u8>>,
    wanted: impl Fn(&[u8]) -> bool,
) -> bool {
    let end = Instant::now() + within;
    let mut buf = [0u8; 2048];
    for _ in 0..10_000 {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return false;
        }
        port.set_read_timeout(Some(left)).unwrap();
        let Ok(n) = port.recv(&mut buf) else {
            return false;
        };
        seen.push(buf[..n].to_vec());
        if wanted(&buf[..n]) {
            return true;
        }
    }
    false
}

/// An IPv4 frame to `dst_mac` carrying a UDP datagram from `src` to IP `dst_ip` port
/// `dst_port` (`None`: any port).
fn is_udp(f: &[u8], dst_mac: [u8; 6], src: [u8; 4], dst_ip: [u8; 4], port: Option<u16>) -> bool {
    f.len() >= 14 + 28
        && f[..6] == dst_mac
        && f[12..14] == [8, 0]
        && f[14 + 9] == 17
        && f[14 + 12..14 + 16] == src
        && f[14 + 16..14 + 20] == dst_ip
        && port.is_none_or(|p| f[14 + 22..14 + 24] == p.to_be_bytes())
}

#[test]
fn arp_learns_only_what_it_asked_for_and_delegation_follows_trust() {
    let _guard = exclusive();
    let c = Cluster {
        dir: run_dir("arp-trust"),
    };
    let mut opts = UpOptions::new(2, accel(), unipeer_bin().clone());
    opts.image = image().manifest.name.clone();
    opts.ca_store = Some(c.dir.join("authority"));
    let up = cluster::up(&c.dir, &opts).unwrap_or_else(|e| panic!("up failed: {e}"));
    let netns = up
        .status
        .netns
        .clone()
        .expect("this test needs the cluster's namespace (root)");
    let (n1, n2) = (
        up.status.node("n1").expect("n1").clone(),
        up.status.node("n2").expect("n2").clone(),
    );
    // With trust material the node delegates jobs (without, `jobs_delegation=off`: the
    // operator test above).
    for n in ["n1", "n2"] {
        let r = node_report(&c, n);
        assert_eq!(
            r.get("jobs_delegation").map(String::as_str),
            Some("on"),
            "{n}: {r:#?}"
        );
    }
    // n1 resolves n2 for real first: the forged frames below try to change a known mapping.
    let reached =
        (0..5).any(|_| cluster::vm_probe(&c.dir, "n1", "n2", 3).is_ok_and(|p| p.reached()));
    assert!(reached, "n1 does not reach n2 before the test");

    let port = segment_port(&c, &netns, &n1.server);
    let (n1_mac, n1_ip, n2_ip) = (mac(&n1.mac), n1.ipv4.octets(), n2.ipv4.octets());
    let echo = n1.ports.echo;
    let forger: [u8; 6] = [0x02, 0x00, 0x00, 0x77, 0x00, 0xfe];
    let newcomer_ip = [10, 77, 0, 250];
    let within = scaled(Duration::from_secs(10));
    let mut seen = Vec::new();
    // Control: a newcomer (an address n1 does not know) asking n1 for its address is learned
    // and answered, and n1's echo then reaches the newcomer's MAC on this port.
    port.send(&arp(BROADCAST, 1, (forger, newcomer_ip), ([0; 6], n1_ip)))
        .unwrap();
    let answered = frame_until(&port, within, &mut seen, |f| {
        f.len() >= 42
            && f[..6] == forger
            && f[12..14] == [8, 6]
            && f[20..22] == [0, 2]
            && f[28..32] == n1_ip
    });
    assert!(answered, "n1 did not answer a newcomer's ARP request");
    port.send(&udp(
        (n1_mac, forger),
        (newcomer_ip, 40_000),
        (n1_ip, echo),
        b"control one",
    ))
    .unwrap();
    assert!(
        frame_until(&port, within, &mut seen, |f| is_udp(
            f,
            forger,
            n1_ip,
            newcomer_ip,
            Some(40_000)
        )),
        "n1's echo to the newcomer never came"
    );
    let before = num(&node_report(&c, "n1"), "arp_refused");

    // Forgeries, all claiming n2's address for the forger's MAC: an unsolicited ARP reply to
    // n1 and a gratuitous ARP request (broadcast), then an IPv4 datagram to n1's echo port,
    // whose answer goes to wherever n1 then thinks n2 is (learned from any of the three, it
    // would be the forger's port).
    port.send(&arp(n1_mac, 2, (forger, n2_ip), (n1_mac, n1_ip)))
        .unwrap();
    port.send(&arp(BROADCAST, 1, (forger, n2_ip), ([0; 6], n2_ip)))
        .unwrap();
    port.send(&udp(
        (n1_mac, forger),
        (n2_ip, 40_001),
        (n1_ip, echo),
        b"forged from n2",
    ))
    .unwrap();
    // Then a second datagram from the newcomer: n1 answers in order, so once this answer is
    // here, an answer to the forgery sent to the forger's MAC would be here too.
    port.send(&udp(
        (n1_mac, forger),
        (newcomer_ip, 40_002),
        (n1_ip, echo),
        b"control two",
    ))
    .unwrap();
    assert!(
        frame_until(&port, within, &mut seen, |f| is_udp(
            f,
            forger,
            n1_ip,
            newcomer_ip,
            Some(40_002)
        )),
        "n1's second echo to the newcomer never came"
    );
    let redirected = seen
        .iter()
        .filter(|f| is_udp(f, forger, n1_ip, n2_ip, None))
        .count();
    assert_eq!(
        redirected, 0,
        "n1 sent traffic for n2 ({n2_ip:?}) to the forger's MAC"
    );
    let after = node_report(&c, "n1");
    println!(
        "arp_refused {before} -> {}, frames seen on the forger's port: {}",
        num(&after, "arp_refused"),
        seen.len()
    );
    assert!(
        num(&after, "arp_refused") >= before + 2,
        "the forged ARP packets were not refused: {before} -> {}",
        num(&after, "arp_refused")
    );
    // n1 still reaches the real n2.
    let p = cluster::vm_probe(&c.dir, "n1", "n2", 3).unwrap_or_else(|e| panic!("probe: {e}"));
    assert!(
        p.reached(),
        "n1 no longer reaches n2 after the forgeries: {p:?}"
    );
    let _ = cluster::switch(&c.dir).and_then(|mut s| Ok(s.remove_port("forger")?));
}
