//! Boot tests: the image boots under QEMU, answers its diagnostic service over the network,
//! sleeps when idle, survives garbage, and leaves QEMU with the defined exit codes.

use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use unipeer::diag::{self, Report};
use unipeer::qemu::{Machine, NetAttach};
use unipeer::vm::{self, ReadyVm};
use unipeer_node::launch::GuestExit;
use unipeer_qemu_tests::{counter, exclusive, image, options};

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

fn udp_report(vm: &ReadyVm) -> Report {
    diag::query_udp(vm.ports.diag_udp_addr(), scaled(PROBE))
        .unwrap_or_else(|e| panic!("UDP probe failed: {e}{}", context(vm)))
}

fn shutdown_cleanly(mut vm: ReadyVm) {
    let key = vm.operator_key();
    let reply = diag::tcp_command(
        vm.ports.diag_tcp_addr(),
        key.as_ref(),
        "shutdown",
        scaled(PROBE),
    )
    .unwrap_or_else(|e| panic!("shutdown command failed: {e}{}", context(&vm)));
    assert!(reply.contains("shutting down"), "reply {reply:?}");
    let status = vm
        .vm
        .wait_exit(scaled(Duration::from_secs(10)))
        .unwrap_or_else(|e| panic!("VM did not exit after shutdown: {e}"));
    assert_eq!(
        status.code(),
        Some(GuestExit::Success.qemu_status()),
        "QEMU exit status{}",
        context(&vm)
    );
}

/// The full boot check on one machine type.
fn boot_probe_idle_shutdown(test: &str, machine: Machine, cpu: Option<&str>) {
    let _guard = exclusive();
    let mut opts = options(test, machine);
    opts.cpu = cpu.map(str::to_string);
    let vm = vm::launch_ready(image(), &opts).unwrap_or_else(|e| panic!("boot failed: {e}"));
    assert!(vm.ready_line.contains("name=") && vm.ready_line.contains("ip=10.0.2.15"));
    assert!(
        vm.guest_entry_to_ready_us().is_some_and(|us| us > 0),
        "{}",
        vm.ready_line
    );

    // The report over UDP and over TCP.
    let r1 = udp_report(&vm);
    assert_eq!(r1.get("name"), Some(test));
    assert_eq!(r1.get("ip"), Some("10.0.2.15"));
    let expected_nic = match machine {
        Machine::Microvm => "virtio-mmio",
        Machine::Q35 => "virtio-pci",
    };
    assert_eq!(r1.get("nic"), Some(expected_nic));
    assert!(counter(&r1, "uptime_us") > 0);
    assert!(counter(&r1, "boot_entry_to_ready_us") > 0);
    assert!(
        counter(&r1, "tsc_khz") > 100_000,
        "tsc_khz {:?}",
        r1.get("tsc_khz")
    );
    assert!(
        counter(&r1, "heap_in_use") > 0
            && counter(&r1, "heap_high_water") >= counter(&r1, "heap_in_use")
    );
    assert!(counter(&r1, "heap_size") > counter(&r1, "heap_high_water"));
    assert!(counter(&r1, "rx_frames") > 0 && counter(&r1, "tx_frames") > 0);
    if cpu == Some("max") {
        assert_ne!(r1.get("simd"), Some("sse"), "-cpu max offers AVX/XSAVE");
    }
    let t = diag::query_tcp(vm.ports.diag_tcp_addr(), scaled(PROBE))
        .unwrap_or_else(|e| panic!("TCP probe failed: {e}{}", context(&vm)));
    assert_eq!(t.get("name"), Some(test));

    // The NIC interrupt counter rises with probes: 20 sequential request/answer pairs, paced
    // so the guest goes idle in between. A request that lands while the guest is still busy
    // is picked up by the loop without an interrupt (counted in busy_polls).
    let before = udp_report(&vm);
    for _ in 0..20 {
        udp_report(&vm);
        std::thread::sleep(Duration::from_millis(3));
    }
    let after = udp_report(&vm);
    let nic_irqs = counter(&after, "irq_nic") - counter(&before, "irq_nic");
    let busy = counter(&after, "busy_polls") - counter(&before, "busy_polls");
    assert!(
        nic_irqs >= 5 && nic_irqs + busy >= 21,
        "NIC interrupts rose by {nic_irqs} (busy polls {busy}) over 21 probes\nbefore: {:?}\nafter: {:?}{}",
        before.fields,
        after.fields,
        context(&vm)
    );
    assert!(counter(&after, "udp_requests") >= counter(&before, "udp_requests") + 21);

    // A 2 s idle window sees only a handful of timer interrupts: the guest sleeps in `hlt`
    // with no periodic tick. (The window is the measurement itself, not a wait for an event.)
    let idle0 = udp_report(&vm);
    std::thread::sleep(Duration::from_secs(2));
    let idle1 = udp_report(&vm);
    let timer_irqs = counter(&idle1, "irq_timer") - counter(&idle0, "irq_timer");
    let wakeups = counter(&idle1, "wakeups") - counter(&idle0, "wakeups");
    assert!(
        timer_irqs <= 10,
        "{timer_irqs} timer interrupts while idle for 2 s (the overlay's periodic work wakes a \
         lone node a few times a second; a tick would be hundreds)"
    );
    assert!(wakeups <= 20, "{wakeups} wake-ups while idle for 2 s");

    shutdown_cleanly(vm);
}

#[test]
fn microvm_boots_answers_idles_and_exits() {
    boot_probe_idle_shutdown("boot-microvm", Machine::Microvm, None);
}

#[test]
fn q35_boots_answers_idles_and_exits() {
    boot_probe_idle_shutdown("boot-q35", Machine::Q35, None);
}

#[test]
fn cpu_max_boots_with_simd_detection() {
    // `-cpu max` exposes AVX/SHA extensions that crates detect at run time.
    boot_probe_idle_shutdown("boot-cpumax", Machine::Microvm, Some("max"));
}

#[test]
fn malformed_configs_fail_cleanly() {
    let _guard = exclusive();
    let opts = options("bad-config", Machine::Microvm);
    let (spec, _, _) = vm::user_net_spec(image(), &opts).expect("spec");
    let good = spec.config_blob.clone();
    let mut bad_magic = good.clone();
    bad_magic[0] ^= 0xff;
    let mut bad_body = good.clone();
    let last = bad_body.len() - 1;
    bad_body[last] ^= 0x55;
    let cases: [(&str, Vec<u8>, &str); 4] = [
        ("magic", bad_magic, "bad magic"),
        ("checksum", bad_body, "checksum"),
        ("truncated", good[..good.len() / 2].to_vec(), "declares"),
        ("tiny", vec![1, 2, 3], "shorter than"),
    ];
    for (name, blob, message) in cases {
        let mut s = spec.clone();
        s.name = format!("bad-{name}");
        s.config_blob = blob;
        let mut running = s.spawn().expect("spawn");
        let status = running
            .wait_exit(scaled(Duration::from_secs(30)))
            .unwrap_or_else(|e| panic!("{name}: VM did not exit: {e}"));
        assert_eq!(
            status.code(),
            Some(GuestExit::BadConfig.qemu_status()),
            "{name}: {}",
            running.serial()
        );
        let serial = running.serial();
        assert!(
            serial.contains("launch config") && serial.contains(message),
            "{name}: serial log lacks a clear error: {serial}"
        );
    }
}

#[test]
fn tcp_serves_many_clients_with_idle_timeout() {
    let _guard = exclusive();
    let mut opts = options("tcp-many", Machine::Microvm);
    opts.extra
        .push(("diag_idle_ms".to_string(), 1500u32.to_le_bytes().to_vec()));
    let vm = vm::launch_ready(image(), &opts).unwrap_or_else(|e| panic!("boot failed: {e}"));
    // Ten silent clients at once: each gets its greeting report.
    let mut silent = Vec::new();
    for i in 0..10 {
        let mut s = TcpStream::connect_timeout(&vm.ports.diag_tcp_addr(), scaled(PROBE))
            .unwrap_or_else(|e| panic!("client {i}: {e}"));
        s.set_read_timeout(Some(scaled(PROBE))).unwrap();
        let mut got = Vec::new();
        let mut buf = [0u8; 2048];
        let deadline = Instant::now() + scaled(PROBE);
        while !got.ends_with(b"\nend\n") && Instant::now() < deadline {
            let n = s.read(&mut buf).unwrap_or(0);
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
        }
        assert!(
            got.ends_with(b"\nend\n"),
            "client {i} got no report{}",
            context(&vm)
        );
        silent.push(s);
    }
    // With all of them silent and still connected, a probe is still served.
    let r = diag::query_tcp(vm.ports.diag_tcp_addr(), scaled(PROBE))
        .unwrap_or_else(|e| panic!("probe with 10 silent clients: {e}{}", context(&vm)));
    assert!(counter(&r, "tcp_sessions") >= 11);
    // The silent ones are disconnected after the idle timeout: each read ends (EOF or reset).
    for (i, s) in silent.iter_mut().enumerate() {
        let mut buf = [0u8; 64];
        let ended = match s.read(&mut buf) {
            Ok(0) | Err(_) => true,
            Ok(_) => matches!(s.read(&mut buf), Ok(0) | Err(_)),
        };
        assert!(ended, "silent client {i} was not disconnected");
    }
    let r = udp_report(&vm);
    assert!(
        counter(&r, "tcp_idle_closed") >= 10,
        "idle closes: {:?}",
        r.get("tcp_idle_closed")
    );
    shutdown_cleanly(vm);
}

/// A small deterministic generator for garbage.
struct Garbage(u64);

impl Garbage {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn bytes(&mut self, max: usize) -> Vec<u8> {
        let len = (self.next() as usize) % (max + 1);
        (0..len).map(|_| self.next() as u8).collect()
    }
}

#[test]
fn garbage_datagrams_and_streams_leave_the_node_answering() {
    let _guard = exclusive();
    let opts = options("garbage", Machine::Microvm);
    let vm = vm::launch_ready(image(), &opts).unwrap_or_else(|e| panic!("boot failed: {e}"));
    let mut g = Garbage(0x5eed_1234_abcd_ef01);
    let socket = UdpSocket::bind("127.0.0.1:0").unwrap();
    let targets = [
        vm.ports.diag_udp_addr(),
        vm.ports.echo_addr(),
        vm.ports.overlay_addr(),
    ];
    let start = Instant::now();
    for i in 0..10_000 {
        let payload = g.bytes(1400);
        let _ = socket.send_to(&payload, targets[i % 3]);
        // Pace a little so the host's user-net queue is not the thing under test.
        if i % 200 == 199 {
            let _ = diag::query_udp(vm.ports.diag_udp_addr(), scaled(PROBE));
        }
        assert!(
            start.elapsed() < scaled(Duration::from_secs(120)),
            "garbage phase too slow"
        );
    }
    // Garbage TCP streams: random bytes, overlong lines, binary, abrupt closes.
    for i in 0..30 {
        let Ok(mut s) = TcpStream::connect_timeout(&vm.ports.diag_tcp_addr(), scaled(PROBE)) else {
            panic!("garbage client {i} could not connect{}", context(&vm));
        };
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let mut junk = g.bytes(4000);
        if i % 3 == 0 {
            junk.extend(std::iter::repeat_n(b'x', 1000));
            junk.push(b'\n');
        }
        let _ = s.write_all(&junk);
        let mut buf = [0u8; 4096];
        let _ = s.read(&mut buf);
    }
    let r = udp_report(&vm);
    assert!(counter(&r, "bad_requests") > 0, "garbage was not counted");
    assert!(counter(&r, "echo_packets") > 0);
    assert!(
        counter(&r, "overlay_undecodable") > 0,
        "garbage at the overlay port was not counted"
    );
    assert_eq!(r.get("overlay_joined"), Some("true"));
    let t = diag::query_tcp(vm.ports.diag_tcp_addr(), scaled(PROBE))
        .unwrap_or_else(|e| panic!("TCP probe after garbage: {e}{}", context(&vm)));
    assert_eq!(t.get("name"), Some("garbage"));
    shutdown_cleanly(vm);
}

#[test]
fn launcher_pins_machine_flags() {
    let opts = options("args", Machine::Microvm);
    let (spec, _, _) = vm::user_net_spec(image(), &opts).expect("spec");
    let args = spec.qemu_args().join(" ");
    assert!(
        args.contains("microvm,acpi=off,pic=off,pit=on,rtc=off"),
        "{args}"
    );
    assert!(
        args.contains("isa-debug-exit,iobase=0xf4,iosize=0x04"),
        "{args}"
    );
    assert!(matches!(spec.net, NetAttach::User { .. }));
    let mut q35 = spec.clone();
    q35.machine = Machine::Q35;
    let args = q35.qemu_args().join(" ");
    assert!(
        args.contains("qboot.rom") && args.contains("romfile=,"),
        "{args}"
    );
}
