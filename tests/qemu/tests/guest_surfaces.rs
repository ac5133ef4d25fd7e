//! The guest's surfaces against a local user who is not the operator (issue 10): operator
//! commands need the launch config's key, a bad number is an error rather than a crash, the
//! UDP ports neither amplify nor answer other nodes' service ports, one source cannot hold the
//! diagnostic port's slots, and the report says where the node's randomness came from.
//!
//! A VM behind QEMU user networking sees every host connection from 10.0.2.2, normally its
//! gateway (the host uplink, exempt from the per-source rules). `stranger` launches one whose
//! gateway is 10.0.2.3 instead: the host then stands in for a source that is not the host.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use unipeer::diag::{self, OperatorKey, ProbeError};
use unipeer::qemu::Machine;
use unipeer::vm::{self, ReadyVm};
use unipeer_node::launch::{GuestExit, READY_MARKER};
use unipeer_qemu_tests::{exclusive, image, options};

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
