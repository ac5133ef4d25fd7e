//! The plumbing of `unipeer bench apps` against real VMs: the Linux + Redis baseline guest
//! (Debian's kernel and the host's redis-server in an initramfs) boots as a port of a
//! cluster's switch, launched by the cluster daemon on the nodes' QEMU and accelerator, and
//! answers `redis-cli` and the bench's `redis-benchmark` driver from the cluster's namespace
//! (the path the bench measures). Bad guest requests are refused; a stopped guest no longer
//! answers.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use unipeer::bench::apps::{LINUX_GUEST, LINUX_GUEST_IP, REDIS_PORT};
use unipeer::bench::linux_baseline::{self, FAIL_MARKER, REDIS_READY};
use unipeer::bench::redis_benchmark::{self, Load};
use unipeer::cluster::{self, GuestPlan, UpOptions, netns};
use unipeer::net::UplinkStatus;
use unipeer::vm;
use unipeer_qemu_tests::{accel, exclusive, image, run_dir, unipeer_bin};

/// Taken down when the test ends, pass or fail.
struct Cluster {
    dir: PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let _ = cluster::down(&self.dir);
    }
}

/// Runs `redis-cli ARGS` inside the namespace, killed after `timeout`; its stdout, or why not.
fn redis_cli(ns: &str, args: &[&str], timeout: Duration) -> Result<String, String> {
    let out = std::env::temp_dir().join(format!("apps-baseline-cli-{}.out", std::process::id()));
    let file = std::fs::File::create(&out).map_err(|e| e.to_string())?;
    let mut child = netns::command(Some(ns), Path::new("redis-cli"))
        .args([
            "-h",
            &LINUX_GUEST_IP.to_string(),
            "-p",
            &REDIS_PORT.to_string(),
        ])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::from(file))
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("redis-cli: {e}"))?;
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().map_err(|e| e.to_string())? {
            break s;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("redis-cli {args:?}: no answer within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let text = std::fs::read_to_string(&out).unwrap_or_default();
    let _ = std::fs::remove_file(&out);
    if !status.success() {
        return Err(format!("redis-cli {args:?} exited with {status}: {text}"));
    }
    Ok(text.trim().to_string())
}

#[test]
fn linux_redis_guest_boots_on_the_cluster_switch_and_answers_redis_clients() {
    let _g = exclusive();
    // Before any VM: the kernel (apt-get download, cached), the init, Redis and its libraries.
    let kernel = linux_baseline::fetch_kernel().expect("the Debian kernel for the baseline");
    let (initramfs, redis) =
        linux_baseline::build_redis_initramfs(&kernel, LINUX_GUEST_IP, cluster::SEGMENT_PREFIX)
            .expect("the Redis initramfs");
    assert!(redis.redis_version.starts_with("7."), "{redis:?}");
    assert!(
        redis
            .libraries
            .iter()
            .any(|l| l.to_string_lossy().contains("ld-linux")),
        "the dynamic loader is packed: {redis:?}"
    );

    let c = Cluster {
        dir: run_dir("apps-linux-redis"),
    };
    let mut opts = UpOptions::new(1, accel(), unipeer_bin().clone());
    opts.image = image().manifest.name.clone();
    opts.overlay = false;
    let report = cluster::up(&c.dir, &opts).unwrap_or_else(|e| panic!("up: {e}"));
    assert!(
        matches!(report.status.uplink, UplinkStatus::Up { .. }),
        "this test needs the host uplink (root): {:?}",
        report.status.uplink
    );
    let ns = cluster::hello(&c.dir)
        .expect("hello")
        .netns
        .expect("a namespace");
    let initrd = c.dir.join("linux-redis.initrd");
    unipeer::owner_only::replace_file(&initrd, &initramfs).unwrap();
    let deadline = vm::ready_timeout(accel()).mul_f64(6.0) + Duration::from_secs(30);
    let plan = GuestPlan {
        name: LINUX_GUEST.into(),
        server: "s1".into(),
        ipv4: LINUX_GUEST_IP,
        kernel: kernel.vmlinuz.clone(),
        initrd: initrd.clone(),
        append: "console=ttyS0 quiet panic=-1 tsc=reliable".into(),
        memory_mib: linux_baseline::DEFAULT_LINUX_MEMORY_MIB,
        microvm_flags: linux_baseline::linux_machine_flags(unipeer::qemu::Machine::Microvm),
        ready_line: REDIS_READY.into(),
        fail_line: Some(FAIL_MARKER.into()),
        ready_timeout_ms: deadline.as_millis() as u64,
    };

    // Refused before any QEMU starts: a node's address, silly memory.
    let mut clash = plan.clone();
    clash.ipv4 = cluster::node_ip(1);
    let e = cluster::guest(&c.dir, clash).expect_err("a node's address");
    assert!(e.to_string().contains("node"), "{e}");
    let mut tiny = plan.clone();
    tiny.name = "tiny".into();
    tiny.ipv4 = Ipv4Addr::new(10, 77, 9, 2);
    tiny.memory_mib = 1;
    let e = cluster::guest(&c.dir, tiny).expect_err("1 MiB");
    assert!(e.to_string().contains("memory"), "{e}");

    let serial = c.dir.join("vms").join(format!("{LINUX_GUEST}.serial.log"));
    let guest = cluster::guest(&c.dir, plan.clone()).unwrap_or_else(|e| {
        panic!(
            "the Linux guest did not come up: {e}\nserial:\n{}",
            std::fs::read_to_string(&serial).unwrap_or_default()
        )
    });
    assert!(guest.ready_ms > 0.0, "{guest:?}");
    let text = std::fs::read_to_string(&guest.serial_log).unwrap();
    assert!(
        text.contains(linux_baseline::REDIS_MARKER),
        "the init execs Redis:\n{text}"
    );
    let e = cluster::guest(&c.dir, plan.clone()).expect_err("a second guest of that name");
    assert!(e.to_string().contains("already"), "{e}");

    let t = Duration::from_secs(20);
    assert_eq!(redis_cli(&ns, &["PING"], t).unwrap(), "PONG");
    assert_eq!(redis_cli(&ns, &["SET", "bench", "apps"], t).unwrap(), "OK");
    assert_eq!(redis_cli(&ns, &["GET", "bench"], t).unwrap(), "apps");

    // The bench's driver end to end, on a small load.
    let load = Load {
        tests: vec!["set".into(), "get".into()],
        requests: 500,
        clients: 5,
        pipeline: 4,
        data_bytes: 3,
        timeout: Duration::from_secs(60),
    };
    let out = redis_benchmark::run(
        Some(&ns),
        LINUX_GUEST_IP,
        REDIS_PORT,
        &load,
        &c.dir.join("bench"),
    );
    for test in ["SET", "GET"] {
        let s = out
            .get(test)
            .unwrap_or_else(|| panic!("no {test} figures: {:?}", out.error));
        assert!(s.rps > 0.0 && s.p50_ms <= s.p99_ms, "{s:?}");
    }
    assert_eq!(out.error, None);
    assert_eq!(
        redis_cli(&ns, &["DBSIZE"], t).unwrap(),
        "2",
        "redis-benchmark's key:__rand_int__ and ours"
    );

    // Stopped: its port is gone and nothing answers at its address.
    cluster::guest_stop(&c.dir, LINUX_GUEST).expect("guest stop");
    assert!(redis_cli(&ns, &["PING"], Duration::from_secs(10)).is_err());
    let e = cluster::guest_stop(&c.dir, LINUX_GUEST).expect_err("stopped twice");
    assert!(e.to_string().contains("no guest"), "{e}");
}
