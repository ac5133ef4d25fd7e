//! Replicated `kv` instances in real VMs, driven the way a user drives them: 6 VMs on 3
//! servers (`unipeer up -n 6 --servers 3`), `unipeer app create` a sync and an async instance
//! (through the library calls the CLI makes), and the real `redis-cli` (Debian's redis-tools)
//! inside the cluster's network namespace:
//!
//! 1. placement: master and slaves on three distinct servers; SET through every node, GET of
//!    every key through every node;
//! 2. a writer through random nodes while the master's VM is SIGKILLed: a slave serves within
//!    a bound, and every write of the sync instance that the client saw acknowledged reads
//!    back; the killed VM restarts and rejoins as a slave;
//! 3. the (new) master's server is partitioned away: the majority side elects a master, the
//!    old one stops accepting writes (fenced); after the heal it rejoins as a slave with the
//!    master's state;
//! 4. RESP garbage, a malformed frame, an oversized frame and a half-open connection at every
//!    node's port: errors and counters, the node keeps serving, no data lost;
//! 5. user `nobody` (uid 65534) can neither create nor delete an instance;
//! 6. 10 % loss and 100 ms between servers: the slaves still converge.
//!
//! One cluster serves every phase (one test: the phases build on each other's faults).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use unipeer::cluster::apps::{self, AppStatus, CreateOptions};
use unipeer::cluster::{self, NodeState, UpOptions};
use unipeer::net::UplinkStatus;
use unipeer::vm;
use unipeer_qemu_tests::{accel, exclusive, image, run_dir, unipeer_bin};

const NODES: usize = 6;
const SYNC: &str = "sync1";
const ASYNC: &str = "async1";
const SYNC_PORT: u16 = 6379;
const ASYNC_PORT: u16 = 6380;
const NOBODY: &[&str] = &["--reuid=65534", "--regid=65534", "--clear-groups", "--"];

fn scaled(d: Duration) -> Duration {
    d.mul_f64(vm::timeout_scale())
}

struct Env {
    dir: PathBuf,
    netns: String,
    /// Node name -> (IPv4, server).
    nodes: BTreeMap<String, (String, String)>,
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = cluster::down(&self.dir);
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
}

impl Env {
    fn up() -> Env {
        let dir = run_dir("replication");
        let mut opts = UpOptions::new(NODES, accel(), unipeer_bin().clone());
        opts.image = image().manifest.name.clone();
        opts.servers = 3;
        let report = cluster::up(&dir, &opts).unwrap_or_else(|e| panic!("up -n 6: {e}"));
        assert!(
            matches!(report.status.uplink, UplinkStatus::Up { .. }),
            "this test needs the host uplink (root): {:?}",
            report.status.uplink
        );
        let netns = report.status.netns.clone().expect("a network namespace");
        let nodes = report
            .status
            .nodes
            .iter()
            .map(|n| (n.name.clone(), (n.ipv4.to_string(), n.server.clone())))
            .collect();
        Env { dir, netns, nodes }
    }

    fn ip(&self, node: &str) -> &str {
        &self.nodes[node].0
    }

    fn server(&self, node: &str) -> &str {
        &self.nodes[node].1
    }

    fn names(&self) -> Vec<String> {
        self.nodes.keys().cloned().collect()
    }

    /// `redis-cli -h NODE -p PORT ARGS...` inside the namespace; its stdout, trimmed.
    fn redis(&self, node: &str, port: u16, args: &[&str]) -> String {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.netns, "timeout", "10", "redis-cli"])
            .args(["-h", self.ip(node), "-p", &port.to_string()])
            .args(args)
            .stdin(Stdio::null())
            .output()
            .expect("redis-cli (apt-get install redis-tools; scripts/setup.sh does it)");
        let mut s = String::from_utf8_lossy(&out.stdout).trim().to_string();
        if s.is_empty() && !out.status.success() {
            s = format!(
                "<no reply: {}>",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        s
    }

    fn status_at(&self, node: &str, app: &str) -> Option<AppStatus> {
        apps::status_at(&self.dir, node, app).ok()
    }

    /// A node's diagnostic report as key=value.
    fn stats(&self, node: &str) -> BTreeMap<String, u64> {
        let text = cluster::node_command(&self.dir, node, "stats")
            .unwrap_or_else(|e| panic!("stats of {node}: {e}"));
        text.split_whitespace()
            .filter_map(|w| w.split_once('='))
            .filter_map(|(k, v)| Some((k.to_string(), v.parse().ok()?)))
            .collect()
    }

    /// Waits until `node` reports `app`'s master accepting writes with every slave online and
    /// caught up; returns that status.
    fn settled(&self, app: &str, within: Duration) -> AppStatus {
        self.serving(app, within, true)
    }

    /// Waits until `app`'s master accepts writes (and, with `all_slaves`, every slave is
    /// online and caught up).
    fn serving(&self, app: &str, within: Duration, all_slaves: bool) -> AppStatus {
        let start = Instant::now();
        let mut last = None;
        while start.elapsed() < within {
            if let Ok(s) = apps::status_of(&self.dir, None, app) {
                let ok = s.role_there == "master"
                    && s.accepting_writes
                    && !s.slaves.is_empty()
                    && (!all_slaves || s.slaves.iter().all(|x| x.online && x.lag_ops == 0));
                if ok {
                    return s;
                }
                last = Some(s);
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        panic!("{app} did not settle within {within:?}: {last:#?}");
    }

    fn serial_tail(&self, node: &str) -> String {
        let text = cluster::serial_log(&self.dir, node)
            .ok()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

/// Runs `f` on a thread inside the cluster's namespace (plain sockets reach the nodes there).
fn in_netns<T: Send + 'static>(netns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let ns = std::fs::File::open(Path::new("/run/netns").join(netns))
        .unwrap_or_else(|e| panic!("namespace {netns}: {e}"));
    std::thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("join the namespace");
        f()
    })
    .join()
    .expect("namespace thread")
}

/// What one connection got back: the bytes, and whether the node closed it.
fn exchange(ip: &str, port: u16, send: &[u8], wait: Duration) -> (Vec<u8>, bool) {
    let Ok(mut s) = TcpStream::connect((ip, port)) else {
        return (Vec::new(), false);
    };
    s.set_read_timeout(Some(wait)).unwrap();
    s.set_write_timeout(Some(wait)).unwrap();
    let _ = s.write_all(send);
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    let start = Instant::now();
    loop {
        match s.read(&mut buf) {
            Ok(0) => return (got, true),
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return (got, true),
            Err(_) => return (got, false),
        }
        if start.elapsed() > wait {
            return (got, false);
        }
    }
}

/// One acknowledged (or not) write of the writer.
struct Write1 {
    key: String,
    value: String,
    started: Instant,
    ended: Instant,
    ok: bool,
}

/// Writes `PREFIX:i = i` through random nodes (not `avoid`) to both instances until `stop`.
fn writer(env: &Env, avoid: &str, prefix: &str, stop: &AtomicBool) -> Vec<(u16, Write1)> {
    let nodes: Vec<String> = env.names().into_iter().filter(|n| n != avoid).collect();
    let mut out = Vec::new();
    let mut i = 0u64;
    while !stop.load(Ordering::Relaxed) && i < 5000 {
        i += 1;
        let node = &nodes[(i as usize * 7 + 3) % nodes.len()];
        for port in [SYNC_PORT, ASYNC_PORT] {
            let key = format!("{prefix}:{i}");
            let value = format!("v{i}");
            let started = Instant::now();
            let r = env.redis(node, port, &["SET", &key, &value]);
            out.push((
                port,
                Write1 {
                    key,
                    value,
                    started,
                    ended: Instant::now(),
                    ok: r == "OK",
                },
            ));
        }
    }
    out
}

#[test]
fn replicated_kv_through_every_node_survives_kills_partitions_and_bad_clients() {
    if !is_root() {
        eprintln!("skipped: needs root (network namespaces)");
        return;
    }
    let _one = exclusive();
    let env = Env::up();
    let names = env.names();
    let settle = scaled(Duration::from_secs(60));

    // --- 1. create, placement, every node serves ---
    // Placement picks among the nodes n1 knows: wait until it knows all three servers.
    let start = Instant::now();
    loop {
        let reply = cluster::node_command(&env.dir, "n1", "apps").unwrap_or_default();
        if reply.contains("servers=3") {
            break;
        }
        assert!(
            start.elapsed() < settle,
            "n1 never knew the cluster: {reply}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    for (name, mode, port) in [(SYNC, "sync", SYNC_PORT), (ASYNC, "async", ASYNC_PORT)] {
        let o = CreateOptions {
            name: name.into(),
            service: "kv".into(),
            replicas: 2,
            mode: mode.into(),
            port,
        };
        // The overlay may still be settling: retry a refused create a few times.
        let start = Instant::now();
        loop {
            match apps::create(&env.dir, Some("n1"), &o) {
                Ok(line) => {
                    assert!(line.starts_with("created"), "{line}");
                    break;
                }
                Err(e) if start.elapsed() < settle => {
                    eprintln!("create {name}: {e}; retrying");
                    std::thread::sleep(Duration::from_secs(1));
                }
                Err(e) => panic!("create {name}: {e}"),
            }
        }
    }
    let list = apps::list(&env.dir, Some("n4")).unwrap();
    for name in [SYNC, ASYNC] {
        let s = env.settled(name, settle);
        assert_eq!(s.master.as_deref(), Some("n1"), "{s:#?}");
        let mut servers: Vec<&str> = s
            .slaves
            .iter()
            .map(|x| env.server(x.node.as_deref().expect("a slave is a node")))
            .collect();
        servers.push(env.server("n1"));
        servers.sort();
        servers.dedup();
        assert_eq!(servers.len(), 3, "master and 2 slaves on 3 servers: {s:#?}");
        assert_eq!(s.mode, if name == SYNC { "sync" } else { "async" });
    }
    // The registry reaches every node within its poll.
    let start = Instant::now();
    while apps::list(&env.dir, Some("n6")).map_or(0, |l| l.len()) < 2 {
        assert!(start.elapsed() < settle, "n6 never listed both: {list:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
    for port in [SYNC_PORT, ASYNC_PORT] {
        for n in &names {
            let start = Instant::now();
            loop {
                let r = env.redis(n, port, &["SET", &format!("k:{n}"), &format!("v:{n}")]);
                if r == "OK" {
                    break;
                }
                assert!(
                    start.elapsed() < settle,
                    "SET through {n}:{port}: {r}\n{}",
                    env.serial_tail(n)
                );
                std::thread::sleep(Duration::from_millis(300));
            }
        }
        for reader in &names {
            for n in &names {
                let r = env.redis(reader, port, &["GET", &format!("k:{n}")]);
                assert_eq!(r, format!("v:{n}"), "GET k:{n} through {reader}:{port}");
            }
        }
    }
    eprintln!("phase 1: both instances served through all 6 nodes");

    // --- 2. SIGKILL of the master's VM under a writer ---
    let stop = Arc::new(AtomicBool::new(false));
    let (kill_at, writes) = std::thread::scope(|sc| {
        let w = sc.spawn(|| writer(&env, "n1", "w", &stop));
        // Some acknowledged writes first.
        std::thread::sleep(scaled(Duration::from_secs(3)));
        cluster::kill(&env.dir, "n1").unwrap();
        let kill_at = Instant::now();
        let st = cluster::status(&env.dir, false).unwrap();
        assert_ne!(
            st.node("n1").map(|n| n.state),
            Some(NodeState::Up),
            "n1 was killed"
        );
        std::thread::sleep(scaled(Duration::from_secs(12)));
        stop.store(true, Ordering::Relaxed);
        (kill_at, w.join().unwrap())
    });
    let before = writes
        .iter()
        .filter(|(_, w)| w.ok && w.ended < kill_at)
        .count();
    assert!(before >= 2, "acknowledged writes before the kill: {before}");
    let mut failover = BTreeMap::new();
    for port in [SYNC_PORT, ASYNC_PORT] {
        let first_ok = writes
            .iter()
            .filter(|(p, w)| *p == port && w.ok && w.started > kill_at)
            .map(|(_, w)| w.ended.duration_since(kill_at))
            .min();
        // Promotion takes the lease's promise plus an election (about 1.5 s); a write started
        // meanwhile may wait out the relay's and the no-master timeouts (up to 5 s) before the
        // client sees its answer, and TCG on a shared machine stretches all of it.
        let bound = scaled(Duration::from_secs(20));
        let Some(t) = first_ok else {
            panic!("no write acknowledged on port {port} after the kill");
        };
        assert!(
            t < bound,
            "port {port}: first write after the kill at {t:?} > {bound:?}"
        );
        failover.insert(port, t);
    }
    // The killed master stays in the record as an offline slave until it comes back.
    let s = env.serving(SYNC, settle, false);
    assert_ne!(s.master.as_deref(), Some("n1"));
    assert!(s.epoch >= 2, "{s:#?}");
    // Every acknowledged sync write reads back (through another node than the master).
    let reader = names
        .iter()
        .find(|n| Some(n.as_str()) != s.master.as_deref() && *n != "n1")
        .unwrap();
    let mut acked_sync = 0;
    for (_, w) in writes.iter().filter(|(p, w)| *p == SYNC_PORT && w.ok) {
        acked_sync += 1;
        let r = env.redis(reader, SYNC_PORT, &["GET", &w.key]);
        assert_eq!(r, w.value, "acknowledged sync write {} lost", w.key);
    }
    let mut async_missing = 0;
    let mut acked_async = 0;
    for (_, w) in writes.iter().filter(|(p, w)| *p == ASYNC_PORT && w.ok) {
        acked_async += 1;
        if env.redis(reader, ASYNC_PORT, &["GET", &w.key]) != w.value {
            async_missing += 1;
        }
    }
    let a = apps::status_of(&env.dir, None, ASYNC).unwrap();
    eprintln!(
        "phase 2: failover (kill -> first acknowledged write) sync {:?}, async {:?}; sync: {acked_sync} acknowledged, all read back; async: {acked_async} acknowledged, {async_missing} missing, lost_writes reported {}",
        failover[&SYNC_PORT], failover[&ASYNC_PORT], a.lost_writes
    );
    // The killed VM comes back and rejoins as a slave.
    cluster::restart(&env.dir, "n1").unwrap();
    let start = Instant::now();
    loop {
        let st = env.status_at("n1", SYNC);
        if st
            .as_ref()
            .is_some_and(|x| x.role_there == "slave" && x.epoch == s.epoch)
        {
            break;
        }
        assert!(start.elapsed() < settle, "n1 did not rejoin: {st:#?}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let s = env.settled(SYNC, settle);

    // --- 3. partition the master's server away, then heal ---
    let old = s.master.clone().unwrap();
    let old_server = env.server(&old).to_string();
    let cut: Vec<String> = names
        .iter()
        .filter(|n| env.server(n) == old_server)
        .cloned()
        .collect();
    let majority: Vec<String> = names.iter().filter(|n| !cut.contains(n)).cloned().collect();
    let mut sw = cluster::switch(&env.dir).unwrap();
    sw.partition(std::slice::from_ref(&cut)).unwrap();
    let stats = sw.stats().unwrap();
    assert!(stats.partition.is_some(), "the partition is in force");
    let part_at = Instant::now();
    let mut i = 0;
    let new_master = loop {
        i += 1;
        let n = &majority[i % majority.len()];
        let r = env.redis(n, SYNC_PORT, &["SET", "p:key", &format!("p{i}")]);
        if r == "OK" {
            let st = apps::status_at(&env.dir, n, SYNC).unwrap();
            if st.epoch > s.epoch
                && let Some(m) = st.master.clone()
                && m != old
            {
                break m;
            }
        }
        assert!(
            part_at.elapsed() < scaled(Duration::from_secs(30)),
            "the majority side never got a new master: {r}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let promoted_in = part_at.elapsed();
    // The old master is fenced: it does not accept writes (the host still reaches it).
    let start = Instant::now();
    loop {
        let st = env.status_at(&old, SYNC).unwrap();
        if !st.accepting_writes {
            break;
        }
        assert!(
            start.elapsed() < scaled(Duration::from_secs(5)),
            "{old} still accepts writes beside {new_master}: {st:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let r = env.redis(&old, SYNC_PORT, &["SET", "p:fenced", "x"]);
    assert_ne!(r, "OK", "a write through the fenced side was acknowledged");
    sw.heal().unwrap();
    let start = Instant::now();
    loop {
        let st = env.status_at(&old, SYNC);
        let m = env.status_at(&new_master, SYNC);
        if let (Some(st), Some(m)) = (&st, &m)
            && st.role_there == "slave"
            && st.epoch == m.epoch
            && st.state_hash.is_some()
            && st.state_hash == m.state_hash
        {
            break;
        }
        assert!(
            start.elapsed() < settle,
            "{old} did not rejoin {new_master} as a slave: {st:#?} {m:#?}"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert_eq!(env.redis(&old, SYNC_PORT, &["GET", "p:fenced"]), "");
    eprintln!(
        "phase 3: {old} partitioned away; {new_master} accepted writes {promoted_in:?} after the cut; {old} fenced, rejoined as a slave after the heal"
    );

    // --- 4. bad clients at every node's port ---
    let base: BTreeMap<String, BTreeMap<String, u64>> =
        names.iter().map(|n| (n.clone(), env.stats(n))).collect();
    let targets: Vec<String> = names.iter().map(|n| env.ip(n).to_string()).collect();
    let half_open_wait = scaled(Duration::from_secs(25));
    let results = in_netns(&env.netns, move || {
        let threads: Vec<_> = targets
            .into_iter()
            .map(|ip| {
                std::thread::spawn(move || {
                    let garbage = exchange(
                        &ip,
                        SYNC_PORT,
                        b"\x00\xffgarbage\r\n*1\r\n$4\r\nPING\r\n",
                        Duration::from_secs(3),
                    );
                    let malformed = exchange(&ip, SYNC_PORT, b"*x\r\n", Duration::from_secs(20));
                    let mut big = b"*1\r\n$600000\r\n".to_vec();
                    big.extend(std::iter::repeat_n(b'x', 600_000));
                    let oversized = exchange(&ip, SYNC_PORT, &big, Duration::from_secs(30));
                    let start = Instant::now();
                    let half = exchange(&ip, SYNC_PORT, b"*2\r\n$3\r\nGET", half_open_wait);
                    (ip, garbage, malformed, oversized, half, start.elapsed())
                })
            })
            .collect();
        threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect::<Vec<_>>()
    });
    for (ip, garbage, malformed, oversized, half, half_took) in &results {
        let text = |b: &Vec<u8>| String::from_utf8_lossy(b).into_owned();
        assert!(
            text(&garbage.0).starts_with("-ERR") && text(&garbage.0).ends_with("+PONG\r\n"),
            "{ip}: garbage then PING: {:?}",
            text(&garbage.0)
        );
        assert!(
            text(&malformed.0).starts_with("-ERR Protocol error") && malformed.1,
            "{ip}: malformed frame: {malformed:?}"
        );
        assert!(
            text(&oversized.0).starts_with("-ERR Protocol error") && oversized.1,
            "{ip}: oversized frame: {:?}",
            text(&oversized.0)
        );
        assert!(
            half.1 && half.0.is_empty(),
            "{ip}: the half-open connection was not closed within {half_open_wait:?} ({half_took:?})"
        );
    }
    for n in &names {
        let now = env.stats(n);
        let d = |k: &str| now.get(k).copied().unwrap_or(0) - base[n].get(k).copied().unwrap_or(0);
        assert!(
            d("repl_malformed_frames") >= 1,
            "{n}: malformed not counted"
        );
        assert!(
            d("repl_over_limit_frames") >= 1,
            "{n}: oversized not counted"
        );
        assert!(
            d("repl_half_open_closed") >= 1,
            "{n}: half-open not counted"
        );
        for m in &names {
            assert_eq!(
                env.redis(n, SYNC_PORT, &["GET", &format!("k:{m}")]),
                format!("v:{m}"),
                "{n} after the bad clients"
            );
        }
    }
    eprintln!(
        "phase 4: garbage, malformed, oversized and half-open clients: answered, counted, closed; data intact"
    );

    // --- 5. another local user cannot create or delete instances ---
    if Path::new("/usr/bin/setpriv").exists() {
        let run = env.dir.to_string_lossy().into_owned();
        let out = Command::new("setpriv")
            .args(NOBODY)
            .arg(unipeer_bin())
            .args(["--run-dir", &run, "app", "create", "evil", "--port", "7777"])
            .output()
            .unwrap();
        assert!(!out.status.success(), "nobody's app create succeeded");
        let out = Command::new("setpriv")
            .args(NOBODY)
            .arg(unipeer_bin())
            .args(["--run-dir", &run, "app", "delete", SYNC])
            .output()
            .unwrap();
        assert!(!out.status.success(), "nobody's app delete succeeded");
        // Straight at a node's diagnostic port from inside the namespace: no operator key.
        for line in ["app-create evil kv 1 async 7777\n", "app-delete sync1\n"] {
            let out = Command::new("ip")
                .args(["netns", "exec", &env.netns, "setpriv"])
                .args(NOBODY)
                .args(["timeout", "10", "nc", "-N", env.ip("n2"), "7002"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .spawn()
                .and_then(|mut c| {
                    c.stdin.take().unwrap().write_all(line.as_bytes())?;
                    c.wait_with_output()
                })
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                text.contains("authentication required"),
                "{line:?} as nobody: {text:?}"
            );
        }
        let list = apps::list(&env.dir, Some("n2")).unwrap();
        assert_eq!(list.len(), 2, "{list:?}");
        assert!(list.iter().all(|a| a.name != "evil"));
        eprintln!("phase 5: nobody could neither create nor delete");
    }

    // --- 6. 10 % loss and 100 ms between servers: the slaves converge ---
    sw.loss(None, 0.1).unwrap();
    let r = sw
        .request(&unipeer::net::Request::ServerDelay { delay_us: 100_000 })
        .unwrap();
    assert!(r.ok, "{:?}", r.error);
    let stats = sw.stats().unwrap();
    assert!(stats.global_loss > 0.09 && stats.server_delay_us == 100_000);
    let writes_at = Instant::now();
    let mut acked = 0;
    let mut acked_keys = Vec::new();
    for i in 0..30 {
        // A relayed write may time out under loss (the client gets an error): a few tries.
        for t in 0..3 {
            let n = &names[(i + t) % names.len()];
            if env.redis(n, ASYNC_PORT, &["SET", &format!("l:{i}"), &format!("{i}")]) == "OK" {
                acked += 1;
                acked_keys.push(i);
                break;
            }
        }
    }
    assert!(
        acked >= 10,
        "only {acked}/30 writes acknowledged under loss"
    );
    let start = Instant::now();
    let converged = loop {
        if let Ok(m) = apps::status_of(&env.dir, None, ASYNC)
            && m.role_there == "master"
            && !m.slaves.is_empty()
            && m.slaves.iter().all(|x| x.lag_ops == 0)
        {
            let hashes: Vec<Option<String>> = m
                .slaves
                .iter()
                .filter_map(|x| x.node.as_deref())
                .map(|n| env.status_at(n, ASYNC).and_then(|s| s.state_hash))
                .collect();
            if hashes.iter().all(|h| h.is_some() && *h == m.state_hash) {
                break start.elapsed();
            }
        }
        assert!(
            start.elapsed() < settle,
            "the async instance's slaves did not converge under loss and delay"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    sw.reset().unwrap();
    // Right after the faults end the master may be renewing its lease (`READONLY ... retry`):
    // a transient error is retried, a wrong value is not.
    let answer = |key: &str| {
        let start = Instant::now();
        loop {
            let r = env.redis("n2", ASYNC_PORT, &["GET", key]);
            let transient = ["READONLY", "TRYAGAIN", "ERR", "<no reply"]
                .iter()
                .any(|p| r.starts_with(p));
            if !transient || start.elapsed() > settle {
                return r;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    };
    for i in &acked_keys {
        assert_eq!(
            answer(&format!("l:{i}")),
            format!("{i}"),
            "acknowledged write l:{i} after the faults"
        );
    }
    eprintln!(
        "phase 6: {acked}/30 writes acknowledged under 10% loss + 100 ms between servers; slaves converged {converged:?} after the last write ({:?} in all)",
        writes_at.elapsed()
    );
}
