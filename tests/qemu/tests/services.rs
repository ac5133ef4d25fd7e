//! The kernel's services and the bus between them (kernel-app/kernel/src/service.rs), seen
//! from the diagnostic port: commands another service answers keep the order they were sent
//! in, an answer is not lost when the client half-closes, what no service answers gets the
//! same replies as before the split (with the overlay off too), operator commands another
//! service answers are refused to a session that has not authenticated before they reach the
//! bus, and the report names the bus and every service's sleeps.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream};
use std::time::{Duration, Instant};

use unipeer::diag::{self, OperatorKey, Report};
use unipeer::qemu::Machine;
use unipeer::vm::{self, ReadyVm};
use unipeer_node::diag_command;
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

/// A report field as a number; a missing or non-numeric field fails the test.
fn field(r: &Report, key: &str) -> u64 {
    r.get(key)
        .unwrap_or_else(|| panic!("report has no {key}: {:?}", r.fields))
        .parse()
        .unwrap_or_else(|e| panic!("{key} is not a number: {e}"))
}

/// Connects, reads the greeting report, authenticates with `key` if given, sends `batch` in one
/// write (optionally half-closing), and reads until the text received ends with `until` (or the
/// connection ends).
fn exchange(
    vm: &ReadyVm,
    key: Option<&OperatorKey>,
    batch: &str,
    half_close: bool,
    until: &str,
) -> String {
    let mut s = TcpStream::connect_timeout(&vm.ports.diag_tcp_addr(), scaled(PROBE))
        .unwrap_or_else(|e| panic!("connect: {e}{}", context(vm)));
    s.set_read_timeout(Some(scaled(PROBE))).unwrap();
    let deadline = Instant::now() + scaled(PROBE);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !got.ends_with(b"\nend\n") && Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    assert!(
        got.ends_with(b"\nend\n"),
        "no greeting report{}",
        context(vm)
    );
    if let Some(key) = key {
        diag::authenticate(&mut s, key, scaled(PROBE))
            .unwrap_or_else(|e| panic!("auth: {e}{}", context(vm)));
    }
    s.write_all(batch.as_bytes()).unwrap();
    if half_close {
        s.shutdown(Shutdown::Write).unwrap();
    }
    let mut answer = Vec::new();
    while !answer.ends_with(until.as_bytes()) && Instant::now() < deadline {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&buf[..n]),
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

#[test]
fn routed_commands_keep_their_order_and_the_report_names_the_bus() {
    let _guard = exclusive();
    let opts = options("services-order", Machine::Microvm);
    let mut vm = vm::launch_ready(image(), &opts).unwrap_or_else(|e| panic!("boot failed: {e}"));
    let r0 = diag::query_tcp(vm.ports.diag_tcp_addr(), scaled(PROBE))
        .unwrap_or_else(|e| panic!("report: {e}{}", context(&vm)));
    assert_eq!(r0.get("jobs"), Some("on"), "{:?}", r0.fields);
    assert!(r0.get("overlay_id").is_some(), "{:?}", r0.fields);

    let key = vm.operator_key().expect("launched with an operator key");

    // `jobs tasks` goes to the job host, `leafset` to the overlay, `nosuch` is refused by the
    // parser; `ping` and `help` diag answers itself. One write, answers in command order. A
    // lone fresh node supervises no task and has an empty leaf set: each list is just `end`.
    // Open commands: no authentication.
    let help = diag_command::help_text(true);
    let got = exchange(
        &vm,
        None,
        "jobs tasks\nping\nnosuch\nleafset\nhelp\n",
        false,
        &help,
    );
    let want = format!("end\npong\nerror: unknown command (try help)\nend\n{help}");
    assert_eq!(got, want, "answers out of order{}", context(&vm));

    // Operator commands the overlay or the job host answers, from a session that has not
    // authenticated: refused by diag, in order, and none of them acts (the `put` stores
    // nothing, the job host submits nothing).
    let refused = "error: authentication required (auth? then auth MAC)\n";
    let got = exchange(
        &vm,
        None,
        "put secret-key v\nlookup k\nget k\nrevoke 00\njob-primes 0 10 2\njob-sha256 1\nping\n",
        false,
        "pong\n",
    );
    assert_eq!(
        got,
        format!("{}pong\n", refused.repeat(6)),
        "unauthenticated routed commands{}",
        context(&vm)
    );
    let r1 = diag::query_tcp(vm.ports.diag_tcp_addr(), scaled(PROBE))
        .unwrap_or_else(|e| panic!("report: {e}{}", context(&vm)));
    assert_eq!(
        field(&r1, "diag_unauthorized"),
        field(&r0, "diag_unauthorized") + 6,
        "{:?}",
        r1.fields
    );
    assert_eq!(
        field(&r1, "jobs_diag_submits"),
        field(&r0, "jobs_diag_submits")
    );
    // Authenticated, the same session may: `get` finds nothing under the refused `put`'s key.
    let got = exchange(&vm, Some(&key), "get secret-key\n", false, "\n");
    assert!(
        got.starts_with("get key=") && got.ends_with("value=none\n"),
        "the refused put stored something: {got:?}{}",
        context(&vm)
    );

    // A routed command followed by the end of the client's input still gets its answer.
    let got = exchange(&vm, None, "jobs tasks\n", true, "end\n");
    assert_eq!(got, "end\n", "answer lost at half-close{}", context(&vm));

    // `jobs` keeps the job host's and the client port's lines together, then `end`.
    let got = exchange(&vm, None, "jobs\n", false, "\nend\n");
    for key in [
        "jobs=on\n",
        "jobch_loopback=",
        "client_sessions=",
        "client_bad_frames=",
    ] {
        assert!(got.contains(key), "`jobs` lacks {key}: {got}");
    }

    let r = diag::query_tcp(vm.ports.diag_tcp_addr(), scaled(PROBE))
        .unwrap_or_else(|e| panic!("report: {e}{}", context(&vm)));
    // The routed commands above went over the bus, and nothing was lost on it.
    assert!(
        field(&r, "bus_posted") >= field(&r0, "bus_posted") + 4,
        "{:?}",
        r.fields
    );
    assert_eq!(field(&r, "bus_dropped"), 0);
    assert_eq!(field(&r, "bus_unclaimed"), 0);
    assert_eq!(
        field(&r, "bad_requests"),
        field(&r0, "bad_requests") + 1,
        "only `nosuch` is a bad request"
    );
    for cause in ["stack", "diag", "overlay", "jobs", "client"] {
        field(&r, &format!("sleeps_until_{cause}"));
    }
    let _ = diag::tcp_command(
        vm.ports.diag_tcp_addr(),
        Some(&key),
        "shutdown",
        scaled(PROBE),
    );
    vm.vm
        .wait_exit(scaled(Duration::from_secs(10)))
        .unwrap_or_else(|e| panic!("VM did not exit after shutdown: {e}"));
}

#[test]
fn with_the_overlay_off_unanswered_commands_say_so() {
    let _guard = exclusive();
    let mut opts = options("services-off", Machine::Microvm);
    opts.extra.push(("overlay".to_string(), vec![0]));
    let mut vm = vm::launch_ready(image(), &opts).unwrap_or_else(|e| panic!("boot failed: {e}"));
    let r0 = diag::query_tcp(vm.ports.diag_tcp_addr(), scaled(PROBE))
        .unwrap_or_else(|e| panic!("report: {e}{}", context(&vm)));
    assert_eq!(r0.get("overlay"), Some("off"), "{:?}", r0.fields);
    assert_eq!(r0.get("jobs"), Some("off"), "{:?}", r0.fields);
    // The report's sleep causes are the same as with the overlay on (client aside).
    for cause in ["stack", "diag", "overlay", "jobs"] {
        field(&r0, &format!("sleeps_until_{cause}"));
    }

    let key = vm.operator_key().expect("launched with an operator key");
    let got = exchange(
        &vm,
        Some(&key),
        "jobs tasks\nlookup k\njob-primes 1 2\njob-primes 1 100 2\njobs\nping\n",
        false,
        "pong\n",
    );
    let want = "jobs=off\nend\n\
                error: the overlay is off on this node\n\
                error: usage: job-primes START END TASKS\n\
                error: jobs are off on this node\n\
                jobs=off\nend\n\
                pong\n";
    assert_eq!(got, want, "{}", context(&vm));
    let r = diag::query_tcp(vm.ports.diag_tcp_addr(), scaled(PROBE))
        .unwrap_or_else(|e| panic!("report: {e}{}", context(&vm)));
    assert_eq!(field(&r, "bad_requests"), field(&r0, "bad_requests") + 3);
    assert_eq!(field(&r, "bus_dropped"), 0);
    let _ = diag::tcp_command(
        vm.ports.diag_tcp_addr(),
        Some(&key),
        "shutdown",
        scaled(PROBE),
    );
    vm.vm
        .wait_exit(scaled(Duration::from_secs(10)))
        .unwrap_or_else(|e| panic!("VM did not exit after shutdown: {e}"));
}
