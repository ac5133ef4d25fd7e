//! `unipeer bench apps`: the replicated `kv` service (RESP2) against what a user would pick
//! instead, Redis 7 in a Linux microVM, both driven by Debian's `redis-benchmark` from the
//! host over the same path: the host's uplink into the cluster's switch, the same QEMU,
//! accelerator and machine type (the Linux guest is a port of the cluster's switch, launched
//! by its daemon like a node, booted like `bench boot --baseline-linux`'s guest with Redis in
//! its initramfs).
//!
//! Rows, each with a verdict computed from what this invocation measured:
//! - SET and GET, without and with `-P 16`: Redis in Linux (the baseline), ours straight to
//!   the master (≥ 1.0× Redis's requests/s at no worse p99), and ours through the protocol
//!   handler of a node on another server (≥ 0.8× straight to the master);
//! - replication lag p50/p99 from `app status --json` under a write load, at 0 / 10 % loss on
//!   the slaves' links × 0 / 100 ms between servers (the switch's fault injection, what
//!   `unipeer net loss|delay` sets); the target is convergence after the load stops;
//! - failover: SIGKILL of the master's VM → the first write acknowledged through a node on
//!   another server, p50/max over the kills (≤ 2 s), and acknowledged writes read back
//!   afterwards (sync: 0 lost; async: every loss counted by the service itself). Redis
//!   Sentinel's default `down-after-milliseconds` (30 s) is printed as the anchor.
//!
//! The service side goes through the `unipeer app ...` CLI (`--json`), as a user would. When
//! an instance cannot be created (no replication service in the image or the CLI), its rows
//! print "no samples" with the reason, and the run fails after the table.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::bench::boot::Stats;
use crate::bench::linux_baseline::{self, FAIL_MARKER, REDIS_READY, RedisImage};
use crate::bench::redis_benchmark::{self, Load, Outcome};
use crate::bench::{Unmeasured, Verdict, cell};
use crate::cluster::{self, ClusterStatus, GuestPlan, NodeState, UpOptions};
use crate::hostinfo::{self, AccelChoice};

/// The Linux guest's name and address: in the segment, past every node's (`NODES_MAX`).
pub const LINUX_GUEST: &str = "linux-redis";
pub const LINUX_GUEST_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 9, 1);
/// Redis's port in the guest, and the instances' ports in the cluster.
pub const REDIS_PORT: u16 = 6379;
const ASYNC_PORT: u16 = 6379;
const SYNC_PORT: u16 = 6380;
/// Redis Sentinel's default `down-after-milliseconds`: the anchor of the failover row.
pub const SENTINEL_DOWN_AFTER_MS: u64 = 30_000;
/// Targets.
const HANDLER_TARGET: f64 = 0.8;
const VS_REDIS_TARGET: f64 = 1.0;
const FAILOVER_TARGET_S: f64 = 2.0;
/// A slave's reported lag above a day is a broken figure (seen: 2^64 ms), not a lag.
const LAG_MS_PLAUSIBLE: f64 = 86_400_000.0;

#[derive(clap::Args, Clone, Debug)]
pub struct AppsBenchArgs {
    /// VMs in the cluster.
    #[arg(long, default_value_t = 6)]
    pub vms: usize,
    /// Servers the VMs are split over (the master and its slaves sit on distinct ones).
    #[arg(long, default_value_t = 3)]
    pub servers: usize,
    #[arg(long, default_value = "default")]
    pub image: String,
    #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
    pub accel: AccelChoice,
    /// Guest RAM of each node, MiB.
    #[arg(long, default_value_t = 64)]
    pub memory: u32,
    /// Guest RAM of the Linux guest, MiB (what `bench boot --baseline-linux` gives it).
    #[arg(long, default_value_t = linux_baseline::DEFAULT_LINUX_MEMORY_MIB)]
    pub linux_memory: u32,
    /// Requests per redis-benchmark test (`-n`).
    #[arg(long, default_value_t = 20_000)]
    pub requests: u64,
    /// redis-benchmark connections (`-c`), to both targets alike. Every connection comes from
    /// the host's uplink address, and a node answers a burst of at most 4 connections from one
    /// source today (its spare listeners; seen: `-c 5` and more leave redis-benchmark 7.0
    /// waiting forever, so its default `-c 50` hangs against a node).
    #[arg(long, default_value_t = 4)]
    pub clients: u32,
    /// Master kills for the failover rows (at least 5 for a verdict).
    #[arg(long, default_value_t = 5)]
    pub kills: usize,
    /// Seconds of write load per replication-lag condition.
    #[arg(long, default_value_t = 10)]
    pub lag_secs: u64,
    /// Run directory of the bench's own cluster.
    #[arg(long)]
    pub bench_dir: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

/// The four redis-benchmark loads.
const LOADS: [(&str, u32); 4] = [("SET", 1), ("GET", 1), ("SET", 16), ("GET", 16)];

fn load_name(test: &str, pipeline: u32) -> String {
    if pipeline > 1 {
        format!("{test} -P {pipeline}")
    } else {
        test.to_string()
    }
}

/// One target's figures for one load.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Throughput {
    pub rps: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p99_ms: Option<f64>,
    pub error: Option<String>,
}

impl Throughput {
    fn from(outcome: &Outcome, test: &str) -> Throughput {
        let s = outcome.get(test);
        Throughput {
            rps: s.map(|s| s.rps),
            p50_ms: s.map(|s| s.p50_ms),
            p99_ms: s.map(|s| s.p99_ms),
            error: if s.is_none() {
                Some(outcome.error.clone().unwrap_or_else(|| "no line".into()))
            } else {
                None
            },
        }
    }

    fn missing(why: &str) -> Throughput {
        Throughput {
            error: Some(why.to_string()),
            ..Throughput::default()
        }
    }
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct LoadRow {
    pub load: String,
    pub redis_linux: Throughput,
    pub master: Throughput,
    pub handler: Throughput,
    /// ours straight to the master / Redis in Linux, requests/s.
    pub vs_redis: Option<f64>,
    pub vs_redis_verdict: Verdict,
    /// through the handler / straight to the master, requests/s.
    pub handler_ratio: Option<f64>,
    pub handler_verdict: Verdict,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct LagRow {
    pub loss: f64,
    pub delay_ms: u64,
    pub lag_ms: Option<Stats>,
    pub lag_ops: Option<Stats>,
    /// From the end of the write load until every slave reported lag 0, seconds.
    pub converged_s: Option<f64>,
    /// Writes the master applied during the load (its sequence number's advance).
    pub writes: Option<u64>,
    /// Lag figures the service reported that cannot be true (over a day: a wrapped clock
    /// difference), left out of the statistics and counted here.
    pub implausible_lag_ms: usize,
    pub verdict: Verdict,
    pub error: Option<String>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct FailoverRow {
    pub mode: String,
    pub kills: usize,
    /// Per kill: SIGKILL → first write acknowledged through a node on another server.
    pub failover_s: Option<Stats>,
    pub acked: usize,
    /// Acknowledged writes that did not read back afterwards.
    pub lost: usize,
    /// Writes the service itself reported lost (`app status`), summed over the kills.
    pub reported_lost: Option<u64>,
    pub failover_verdict: Verdict,
    pub lost_verdict: Verdict,
    pub error: Option<String>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct AppsBenchResult {
    pub accel: String,
    pub accel_reason: String,
    pub vms: usize,
    pub servers: usize,
    pub node_memory_mib: u32,
    pub linux_memory_mib: u32,
    pub linux_kernel: String,
    pub linux_ready_ms: f64,
    pub redis: RedisImage,
    pub requests: u64,
    pub clients: u32,
    pub loads: Vec<LoadRow>,
    pub lag: Vec<LagRow>,
    pub failover: Vec<FailoverRow>,
    pub sentinel_down_after_ms: u64,
    /// Why the service's rows have no samples, if they have none.
    pub service_error: Option<String>,
}

/// An instance as `app status NAME --json` describes it (read leniently: the fields the
/// bench needs, by the names the CLI documents).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct InstanceView {
    pub master: Option<String>,
    pub epoch: Option<u64>,
    /// Per slave: (node, lag in operations, lag in ms).
    pub slaves: Vec<(String, Option<u64>, Option<f64>)>,
    pub writes_lost: Option<u64>,
    /// The master's sequence number (writes applied): a load that did not move it wrote
    /// nothing.
    pub seq: Option<u64>,
}

/// A node named by a string or by an object's `node`/`name` field.
fn node_of(v: &serde_json::Value) -> Option<String> {
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(m) => ["node", "name"]
            .iter()
            .find_map(|k| m.get(*k).and_then(|n| n.as_str()).map(str::to_string)),
        _ => None,
    }
}

fn num<'a>(v: &'a serde_json::Value, keys: &[&str]) -> Option<&'a serde_json::Value> {
    keys.iter().find_map(|k| v.get(*k)).filter(|x| !x.is_null())
}

impl InstanceView {
    pub fn parse(v: &serde_json::Value) -> InstanceView {
        // `app status --json` may wrap the instance (`{"instance": {...}}`) or be it.
        let v = v.get("instance").unwrap_or(v);
        let slaves = v
            .get("slaves")
            .and_then(|s| s.as_array())
            .map(|a| {
                a.iter()
                    .filter_map(|s| {
                        Some((
                            node_of(s)?,
                            num(s, &["lag_ops", "lag_operations"]).and_then(|x| x.as_u64()),
                            num(s, &["lag_ms"]).and_then(|x| x.as_f64()),
                        ))
                    })
                    .collect()
            })
            .unwrap_or_default();
        InstanceView {
            master: v.get("master").and_then(node_of),
            epoch: num(v, &["epoch"]).and_then(|x| x.as_u64()),
            slaves,
            seq: num(v, &["seq"]).and_then(|x| x.as_u64()),
            writes_lost: num(v, &["writes_lost", "lost_writes"]).and_then(|x| {
                x.as_u64().or_else(|| {
                    x.as_array()
                        .map(|a| a.iter().filter_map(|e| num(e, &["count"])?.as_u64()).sum())
                })
            }),
        }
    }
}

/// The `unipeer app ...` CLI of the bench's cluster.
struct AppCli {
    exe: PathBuf,
    run_dir: PathBuf,
}

impl AppCli {
    fn run(&self, args: &[&str], timeout: Duration) -> Result<String> {
        let scratch = self.run_dir.join("bench-apps-cli.out");
        let err_path = self.run_dir.join("bench-apps-cli.err");
        let out = std::fs::File::create(&scratch)?;
        let err = std::fs::File::create(&err_path)?;
        let mut child = Command::new(&self.exe)
            .arg("--run-dir")
            .arg(&self.run_dir)
            .arg("app")
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(err))
            .spawn()
            .context("running unipeer app")?;
        let started = Instant::now();
        let status = loop {
            if let Some(s) = child.try_wait()? {
                break s;
            }
            if started.elapsed() > timeout {
                let _ = child.kill();
                let _ = child.wait();
                bail!(
                    "`unipeer app {}` did not finish within {timeout:?}",
                    args.join(" ")
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let stdout = std::fs::read_to_string(&scratch).unwrap_or_default();
        if !status.success() {
            let stderr = std::fs::read_to_string(&err_path).unwrap_or_default();
            let why = stderr
                .lines()
                .map(str::trim)
                .find(|l| l.starts_with("error") || l.starts_with("Error"))
                .or_else(|| stderr.lines().map(str::trim).find(|l| !l.is_empty()))
                .unwrap_or("no message")
                .to_string();
            bail!("`unipeer app {}` failed ({status}): {why}", args.join(" "));
        }
        Ok(stdout)
    }

    fn create(&self, name: &str, mode: &str, port: u16) -> Result<()> {
        let port = port.to_string();
        self.run(
            &[
                "create",
                name,
                "--service",
                "kv",
                "--replicas",
                "2",
                "--mode",
                mode,
                "--port",
                &port,
                "--json",
            ],
            Duration::from_secs(120),
        )
        .map(drop)
    }

    fn status(&self, name: &str) -> Result<InstanceView> {
        let text = self.run(&["status", name, "--json"], Duration::from_secs(30))?;
        let v: serde_json::Value = serde_json::from_str(text.trim())
            .with_context(|| format!("`app status {name} --json` is not JSON: {text:?}"))?;
        Ok(InstanceView::parse(&v))
    }
}

/// A minimal RESP2 client over any byte stream (the daemon's relay into the namespace): one
/// command at a time, replies bounded.
pub mod resp {
    use std::io::{self, BufRead, Write};

    /// Longest reply line or bulk string read.
    const REPLY_MAX: usize = 1 << 20;

    #[derive(Clone, Debug, PartialEq, Eq)]
    pub enum Reply {
        Simple(String),
        Error(String),
        Int(i64),
        Bulk(Option<Vec<u8>>),
        /// An array's element count (elements are skipped: the bench sends no command
        /// answering one).
        Array(i64),
    }

    pub fn encode(args: &[&[u8]]) -> Vec<u8> {
        let mut out = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            out.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            out.extend_from_slice(a);
            out.extend_from_slice(b"\r\n");
        }
        out
    }

    fn bad(why: String) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, why)
    }

    fn line<R: BufRead>(r: &mut R) -> io::Result<String> {
        let mut buf = Vec::new();
        let n = io::Read::take(&mut *r, REPLY_MAX as u64).read_until(b'\n', &mut buf)?;
        if n == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        if !buf.ends_with(b"\r\n") {
            return Err(bad("a reply line without CRLF".into()));
        }
        buf.truncate(buf.len() - 2);
        String::from_utf8(buf).map_err(|_| bad("a reply line that is not UTF-8".into()))
    }

    pub fn read<R: BufRead>(r: &mut R) -> io::Result<Reply> {
        let l = line(r)?;
        let (kind, rest) = l.split_at(l.len().min(1));
        let int = |s: &str| {
            s.parse::<i64>()
                .map_err(|_| bad(format!("bad integer {s:?}")))
        };
        Ok(match kind {
            "+" => Reply::Simple(rest.to_string()),
            "-" => Reply::Error(rest.to_string()),
            ":" => Reply::Int(int(rest)?),
            "*" => Reply::Array(int(rest)?),
            "$" => {
                let n = int(rest)?;
                if n < 0 {
                    Reply::Bulk(None)
                } else if n as usize > REPLY_MAX {
                    return Err(bad(format!("a bulk of {n} bytes")));
                } else {
                    let mut buf = vec![0u8; n as usize + 2];
                    r.read_exact(&mut buf)?;
                    if !buf.ends_with(b"\r\n") {
                        return Err(bad("a bulk string without CRLF".into()));
                    }
                    buf.truncate(n as usize);
                    Reply::Bulk(Some(buf))
                }
            }
            _ => return Err(bad(format!("unknown reply {l:?}"))),
        })
    }

    pub fn call<S: BufRead + Write>(s: &mut S, args: &[&[u8]]) -> io::Result<Reply> {
        s.write_all(&encode(args))?;
        s.flush()?;
        read(s)
    }
}

/// A buffered stream that is also writable (the relay's Unix socket).
struct Conn {
    reader: BufReader<std::os::unix::net::UnixStream>,
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.reader.read(buf)
    }
}

impl BufRead for Conn {
    fn fill_buf(&mut self) -> std::io::Result<&[u8]> {
        self.reader.fill_buf()
    }
    fn consume(&mut self, n: usize) {
        self.reader.consume(n)
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.reader.get_mut().write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.reader.get_mut().flush()
    }
}

fn connect(run_dir: &Path, node: &str, port: u16) -> Result<Conn> {
    let s = cluster::relay(run_dir, node, port)?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    Ok(Conn {
        reader: BufReader::new(s),
    })
}

fn ip_of(status: &ClusterStatus, node: &str) -> Option<(Ipv4Addr, String)> {
    status
        .nodes
        .iter()
        .find(|n| n.name == node)
        .map(|n| (n.ipv4, n.server.clone()))
}

/// A running node on another server than `master`'s (and not one of `avoid`).
fn other_server_node(status: &ClusterStatus, master: &str, avoid: &[String]) -> Option<String> {
    let (_, server) = ip_of(status, master)?;
    status
        .nodes
        .iter()
        .filter(|n| n.state == NodeState::Up && n.server != server && n.name != master)
        .min_by_key(|n| avoid.contains(&n.name))
        .map(|n| n.name.clone())
}

/// The ratio of two measured figures, if both were measured.
fn ratio(a: Option<f64>, b: Option<f64>) -> Option<f64> {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    }
}

/// "Ours ≥ 1.0× Redis's requests/s at no worse p99": both must hold.
fn vs_redis_verdict(ours: &Throughput, redis: &Throughput) -> (Option<f64>, Verdict) {
    let r = ratio(ours.rps, redis.rps);
    let v = match (r, ours.p99_ms, redis.p99_ms) {
        (Some(r), Some(a), Some(b)) => Verdict::of(Some(r), |x| x >= VS_REDIS_TARGET && a <= b),
        _ => Verdict::NoSamples,
    };
    (r, v)
}

fn scratch(run_dir: &Path, what: &str) -> PathBuf {
    run_dir.join("bench-apps").join(what)
}

pub fn run(args: &AppsBenchArgs) -> Result<()> {
    let accel = hostinfo::choose_accel(args.accel);
    let run_dir = args
        .bench_dir
        .clone()
        .unwrap_or_else(|| crate::image::repo_root().join("run").join("bench-apps"));
    // Everything that can fail before the cluster: the kernel, the init, Redis and its
    // libraries, redis-benchmark.
    let kernel = linux_baseline::fetch_kernel()?;
    let (initramfs, redis) =
        linux_baseline::build_redis_initramfs(&kernel, LINUX_GUEST_IP, cluster::SEGMENT_PREFIX)?;
    Command::new(redis_benchmark::PROGRAM)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .context("redis-benchmark is missing: install redis-tools (scripts/setup.sh does)")?;
    let _ = cluster::down(&run_dir);
    let exe = std::env::current_exe().context("locating the unipeer binary")?;
    let mut opts = UpOptions::new(args.vms, accel.accel, exe.clone());
    opts.image = args.image.clone();
    opts.memory_mib = args.memory;
    opts.servers = args.servers;
    opts.ca_store = Some(run_dir.join("authority"));
    let outcome = (|| -> Result<AppsBenchResult> {
        cluster::up(&run_dir, &opts)?;
        cluster::wait_answering(&run_dir, Duration::from_secs(60))?;
        let info = cluster::hello(&run_dir)?;
        let netns = info
            .netns
            .clone()
            .ok_or_else(|| anyhow!("bench apps needs root: the cluster has no namespace"))?;
        // The daemon reads it; it holds no secret, but is owner-only like the rest.
        let initrd = run_dir.join("linux-redis.initrd");
        crate::owner_only::replace_file(&initrd, &initramfs)?;
        let mut append = String::from("console=ttyS0 quiet panic=-1 tsc=reliable");
        let hint = hostinfo::tsc_khz_hint();
        if hint > 0 {
            append.push_str(&format!(" tsc_early_khz={hint}"));
        }
        let guest = cluster::guest(
            &run_dir,
            GuestPlan {
                name: LINUX_GUEST.into(),
                server: "s1".into(),
                ipv4: LINUX_GUEST_IP,
                kernel: kernel.vmlinuz.clone(),
                initrd: initrd.clone(),
                append,
                memory_mib: args.linux_memory,
                microvm_flags: linux_baseline::linux_machine_flags(crate::qemu::Machine::Microvm),
                ready_line: REDIS_READY.into(),
                fail_line: Some(FAIL_MARKER.into()),
                ready_timeout_ms: (crate::vm::ready_timeout(accel.accel).mul_f64(6.0)
                    + Duration::from_secs(30))
                .as_millis() as u64,
            },
        )?;
        eprintln!(
            "bench apps: Redis {} in Linux {} up in {:.1} s at {LINUX_GUEST_IP}",
            redis.redis_version,
            kernel.release,
            guest.ready_ms / 1000.0
        );
        let load = |test: &str, pipeline: u32| Load {
            tests: vec![test.to_ascii_lowercase()],
            requests: args.requests * u64::from(pipeline.min(4)),
            clients: args.clients,
            pipeline,
            data_bytes: 3,
            // Generous for a loaded TCG host (≥ 200 requests/s), short enough that a run
            // redis-benchmark hangs in costs a minute, not the evening.
            timeout: Duration::from_secs(30 + args.requests * u64::from(pipeline.min(4)) / 200),
        };
        let bench = |host: Ipv4Addr, port: u16, test: &str, pipeline: u32, what: &str| {
            redis_benchmark::run(
                Some(&netns),
                host,
                port,
                &load(test, pipeline),
                &scratch(&run_dir, what),
            )
        };
        // The instances: async (throughput, lag, failover) and sync (failover, writes lost).
        let cli = AppCli {
            exe: exe.clone(),
            run_dir: run_dir.clone(),
        };
        let service = cli
            .create("bench-async", "async", ASYNC_PORT)
            .and_then(|_| cli.create("bench-sync", "sync", SYNC_PORT))
            .and_then(|_| wait_placed(&cli, "bench-async", 2))
            .and_then(|_| wait_placed(&cli, "bench-sync", 2));
        let service_error = service.as_ref().err().map(|e| format!("{e:#}"));
        if let Some(e) = &service_error {
            eprintln!("bench apps: the service's rows will have no samples: {e}");
        }
        let mut loads = Vec::new();
        for (test, pipeline) in LOADS {
            let name = load_name(test, pipeline);
            let tag = name.replace(' ', "");
            let redis_linux = Throughput::from(
                &bench(
                    LINUX_GUEST_IP,
                    REDIS_PORT,
                    test,
                    pipeline,
                    &format!("linux-{tag}"),
                ),
                test,
            );
            let (master, handler) = match &service_error {
                Some(e) => (Throughput::missing(e), Throughput::missing(e)),
                None => measure_ours(&run_dir, &cli, &bench, test, pipeline, &tag),
            };
            let (vs_redis, vs_redis_verdict) = vs_redis_verdict(&master, &redis_linux);
            let handler_ratio = ratio(handler.rps, master.rps);
            let handler_verdict = Verdict::of(handler_ratio, |x| x >= HANDLER_TARGET);
            loads.push(LoadRow {
                load: name,
                redis_linux,
                master,
                handler,
                vs_redis,
                vs_redis_verdict,
                handler_ratio,
                handler_verdict,
            });
        }
        let lag = [(0.0, 0), (0.1, 0), (0.0, 100), (0.1, 100)]
            .into_iter()
            .map(|(loss, delay_ms)| match &service_error {
                Some(e) => LagRow {
                    loss,
                    delay_ms,
                    lag_ms: None,
                    lag_ops: None,
                    converged_s: None,
                    writes: None,
                    implausible_lag_ms: 0,
                    verdict: Verdict::NoSamples,
                    error: Some(e.clone()),
                },
                None => measure_lag(&run_dir, &cli, &netns, args, loss, delay_ms),
            })
            .collect();
        let failover = ["sync", "async"]
            .into_iter()
            .map(|mode| match &service_error {
                Some(e) => FailoverRow {
                    mode: mode.into(),
                    kills: 0,
                    failover_s: None,
                    acked: 0,
                    lost: 0,
                    reported_lost: None,
                    failover_verdict: Verdict::NoSamples,
                    lost_verdict: Verdict::NoSamples,
                    error: Some(e.clone()),
                },
                None => measure_failover(&run_dir, &cli, mode, args.kills),
            })
            .collect();
        Ok(AppsBenchResult {
            accel: accel.accel.to_string(),
            accel_reason: accel.reason.clone(),
            vms: args.vms,
            servers: args.servers,
            node_memory_mib: args.memory,
            linux_memory_mib: args.linux_memory,
            linux_kernel: kernel.release.clone(),
            linux_ready_ms: guest.ready_ms,
            redis: redis.clone(),
            requests: args.requests,
            clients: args.clients,
            loads,
            lag,
            failover,
            sentinel_down_after_ms: SENTINEL_DOWN_AFTER_MS,
            service_error,
        })
    })();
    let _ = cluster::down(&run_dir);
    let result = outcome?;
    let unmeasured = report(&result, args.json)?;
    unmeasured.check()
}

/// Waits (bounded) until `app status` names a master and `slaves` slaves.
fn wait_placed(cli: &AppCli, name: &str, slaves: usize) -> Result<InstanceView> {
    let started = Instant::now();
    let deadline = Duration::from_secs(60).mul_f64(crate::vm::timeout_scale());
    let mut last = Err(anyhow!("no status yet"));
    while started.elapsed() < deadline {
        last = cli.status(name);
        if let Ok(v) = &last
            && v.master.is_some()
            && v.slaves.len() >= slaves
        {
            return last;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    match last {
        Ok(v) => bail!(
            "{name}: not placed within {deadline:?} (master {:?}, {} slaves)",
            v.master,
            v.slaves.len()
        ),
        Err(e) => Err(e.context(format!("{name}: no status within {deadline:?}"))),
    }
}

/// redis-benchmark straight to the async instance's master and through a node on another
/// server.
fn measure_ours(
    run_dir: &Path,
    cli: &AppCli,
    bench: &dyn Fn(Ipv4Addr, u16, &str, u32, &str) -> Outcome,
    test: &str,
    pipeline: u32,
    tag: &str,
) -> (Throughput, Throughput) {
    let placed = (|| -> Result<(Ipv4Addr, Ipv4Addr)> {
        let view = cli.status("bench-async")?;
        let status = cluster::status(run_dir, false)?;
        let master = view.master.clone().ok_or_else(|| anyhow!("no master"))?;
        let (mip, _) = ip_of(&status, &master).ok_or_else(|| anyhow!("unknown node {master}"))?;
        let slaves: Vec<String> = view.slaves.iter().map(|s| s.0.clone()).collect();
        let via = other_server_node(&status, &master, &slaves)
            .ok_or_else(|| anyhow!("no running node on another server than {master}'s"))?;
        let (vip, _) = ip_of(&status, &via).ok_or_else(|| anyhow!("unknown node {via}"))?;
        Ok((mip, vip))
    })();
    match placed {
        Err(e) => {
            let e = format!("{e:#}");
            (Throughput::missing(&e), Throughput::missing(&e))
        }
        Ok((mip, vip)) => (
            Throughput::from(
                &bench(mip, ASYNC_PORT, test, pipeline, &format!("master-{tag}")),
                test,
            ),
            Throughput::from(
                &bench(vip, ASYNC_PORT, test, pipeline, &format!("handler-{tag}")),
                test,
            ),
        ),
    }
}

/// Replication lag of the async instance under a SET load straight to its master, with
/// `loss` on the slaves' links and `delay_ms` one way between servers.
fn measure_lag(
    run_dir: &Path,
    cli: &AppCli,
    netns: &str,
    args: &AppsBenchArgs,
    loss: f64,
    delay_ms: u64,
) -> LagRow {
    let mut row = LagRow {
        loss,
        delay_ms,
        lag_ms: None,
        lag_ops: None,
        converged_s: None,
        writes: None,
        implausible_lag_ms: 0,
        verdict: Verdict::NoSamples,
        error: None,
    };
    let measured = (|| -> Result<()> {
        let view = cli.status("bench-async")?;
        let seq_before = view.seq;
        let status = cluster::status(run_dir, false)?;
        let master = view.master.clone().ok_or_else(|| anyhow!("no master"))?;
        let (mip, _) = ip_of(&status, &master).ok_or_else(|| anyhow!("unknown node {master}"))?;
        let mut sw = cluster::switch(run_dir)?;
        sw.reset()?;
        for (slave, _, _) in &view.slaves {
            sw.loss(Some(slave), loss)?;
        }
        let r = sw.request(&crate::net::Request::ServerDelay {
            delay_us: delay_ms * 1000,
        })?;
        if !r.ok {
            bail!("server delay: {}", r.error.unwrap_or_default());
        }
        // The load: redis-benchmark SETs for about `lag_secs` (bounded by its timeout).
        let writer_load = Load {
            tests: vec!["set".into()],
            requests: 1_000_000,
            clients: args.clients,
            pipeline: 1,
            data_bytes: 16,
            timeout: Duration::from_secs(args.lag_secs),
        };
        let scratch = scratch(
            run_dir,
            &format!("lag-{}-{delay_ms}", (loss * 100.0) as u32),
        );
        let ns = netns.to_string();
        let writer = std::thread::spawn(move || {
            redis_benchmark::run(Some(&ns), mip, ASYNC_PORT, &writer_load, &scratch)
        });
        let mut ms = Vec::new();
        let mut ops = Vec::new();
        while !writer.is_finished() {
            if let Ok(v) = cli.status("bench-async") {
                for (_, o, m) in v.slaves {
                    match m {
                        Some(m) if m > LAG_MS_PLAUSIBLE => row.implausible_lag_ms += 1,
                        Some(m) => ms.push(m),
                        None => {}
                    }
                    ops.extend(o.map(|o| o as f64));
                }
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        let _ = writer.join();
        let seq_after = cli.status("bench-async").ok().and_then(|v| v.seq);
        row.writes = match (seq_before, seq_after) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a)),
            _ => None,
        };
        if row.writes.unwrap_or(0) == 0 {
            // Lag figures of an idle master say nothing about replication under load.
            bail!(
                "the write load moved the master's sequence {seq_before:?} → {seq_after:?}: nothing was measured"
            );
        }
        let stopped = Instant::now();
        let bound = Duration::from_secs(30).mul_f64(crate::vm::timeout_scale());
        while stopped.elapsed() < bound {
            if let Ok(v) = cli.status("bench-async")
                && !v.slaves.is_empty()
                && v.slaves.iter().all(|(_, o, _)| *o == Some(0))
            {
                row.converged_s = Some(stopped.elapsed().as_secs_f64());
                break;
            }
            std::thread::sleep(Duration::from_millis(250));
        }
        row.lag_ms = Stats::of(ms);
        row.lag_ops = Stats::of(ops);
        Ok(())
    })();
    if let Ok(mut sw) = cluster::switch(run_dir) {
        let _ = sw.reset();
        let _ = sw.request(&crate::net::Request::ServerDelay { delay_us: 0 });
    }
    if let Err(e) = measured {
        row.error = Some(format!("{e:#}"));
        row.lag_ms = None;
        row.lag_ops = None;
    }
    // Lag figures are the row's samples; the target is convergence after the load.
    row.verdict = match (&row.lag_ms, row.converged_s) {
        (None, _) => Verdict::NoSamples,
        (Some(_), Some(_)) => Verdict::Met,
        (Some(_), None) => Verdict::Missed,
    };
    row
}

/// `kills` rounds: a writer through a node on another server than the master's, the
/// master's VM SIGKILLed, the time to the first acknowledged write after it; the old master
/// restarted (it rejoins as a slave) before the next round. Afterwards every acknowledged
/// write is read back.
fn measure_failover(run_dir: &Path, cli: &AppCli, mode: &str, kills: usize) -> FailoverRow {
    let name = format!("bench-{mode}");
    let port = if mode == "sync" {
        SYNC_PORT
    } else {
        ASYNC_PORT
    };
    let mut row = FailoverRow {
        mode: mode.into(),
        kills: 0,
        failover_s: None,
        acked: 0,
        lost: 0,
        reported_lost: None,
        failover_verdict: Verdict::NoSamples,
        lost_verdict: Verdict::NoSamples,
        error: None,
    };
    let mut times = Vec::new();
    let mut acked: BTreeMap<String, String> = BTreeMap::new();
    let mut via_last = None;
    let lost_before = cli.status(&name).ok().and_then(|v| v.writes_lost);
    let measured = (|| -> Result<()> {
        for round in 0..kills {
            let view = wait_placed(cli, &name, 2)?;
            let status = cluster::status(run_dir, false)?;
            let master = view.master.clone().ok_or_else(|| anyhow!("no master"))?;
            let slaves: Vec<String> = view.slaves.iter().map(|s| s.0.clone()).collect();
            let via = other_server_node(&status, &master, &slaves)
                .ok_or_else(|| anyhow!("no node on another server than {master}'s"))?;
            via_last = Some(via.clone());
            let mut conn = connect(run_dir, &via, port)?;
            // Warm: one acknowledged write before the kill (retried, bounded: an earlier
            // fault may have left the instance between masters).
            let key = format!("fo:{mode}:{round}:warm");
            let warm_started = Instant::now();
            loop {
                match resp::call(&mut conn, &[b"SET", key.as_bytes(), b"0"]) {
                    Ok(resp::Reply::Simple(s)) if s == "OK" => {
                        acked.insert(key, "0".into());
                        break;
                    }
                    r if warm_started.elapsed() > Duration::from_secs(20) => {
                        bail!("SET through {via} before the kill answered {r:?} for 20 s")
                    }
                    Ok(_) => std::thread::sleep(Duration::from_millis(200)),
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(200));
                        conn = connect(run_dir, &via, port)?;
                    }
                }
            }
            cluster::kill(run_dir, &master)?;
            let killed = Instant::now();
            let bound = Duration::from_secs(60).mul_f64(crate::vm::timeout_scale());
            let mut first = None;
            let mut i = 0u64;
            while killed.elapsed() < bound {
                i += 1;
                let key = format!("fo:{mode}:{round}:{i}");
                let value = i.to_string();
                let ok = match resp::call(&mut conn, &[b"SET", key.as_bytes(), value.as_bytes()]) {
                    Ok(resp::Reply::Simple(s)) => s == "OK",
                    Ok(_) => {
                        // An error reply (no master yet): retry soon, not in a tight loop.
                        std::thread::sleep(Duration::from_millis(10));
                        false
                    }
                    Err(_) => {
                        // The relay or the connection broke: dial again through the same node.
                        std::thread::sleep(Duration::from_millis(20));
                        if let Ok(c) = connect(run_dir, &via, port) {
                            conn = c;
                        }
                        false
                    }
                };
                if ok {
                    acked.insert(key, value);
                    if first.is_none() {
                        first = Some(killed.elapsed());
                    } else if first.is_some_and(|f| killed.elapsed() > f + Duration::from_secs(1)) {
                        break;
                    }
                }
            }
            let first = first.ok_or_else(|| {
                anyhow!("round {round}: no write acknowledged within {bound:?} of killing {master}")
            })?;
            times.push(first.as_secs_f64());
            row.kills += 1;
            cluster::restart(run_dir, &master)?;
        }
        Ok(())
    })();
    if let Err(e) = measured {
        row.error = Some(format!("{e:#}"));
    }
    row.failover_s = Stats::of(times);
    // Read back every acknowledged write through the last node used.
    let read_back = (|| -> Result<usize> {
        let via = via_last.clone().ok_or_else(|| anyhow!("no round ran"))?;
        wait_placed(cli, &name, 2)?;
        let mut conn = connect(run_dir, &via, port)?;
        let mut lost = 0;
        for (k, v) in &acked {
            match resp::call(&mut conn, &[b"GET", k.as_bytes()])? {
                resp::Reply::Bulk(Some(b)) if b == v.as_bytes() => {}
                _ => lost += 1,
            }
        }
        Ok(lost)
    })();
    row.acked = acked.len();
    let lost = match read_back {
        Ok(n) => Some(n),
        Err(e) => {
            let e = format!("read-back: {e:#}");
            row.error = Some(match row.error.take() {
                Some(x) => format!("{x}; {e}"),
                None => e,
            });
            None
        }
    };
    row.lost = lost.unwrap_or(0);
    row.reported_lost = cli
        .status(&name)
        .ok()
        .and_then(|v| v.writes_lost)
        .map(|n| n.saturating_sub(lost_before.unwrap_or(0)));
    row.failover_verdict = if row.kills < kills || kills < 5 {
        // Fewer than the asked (or than 5) kills measured: no verdict from a short series.
        match row.failover_s {
            Some(_) => Verdict::Missed,
            None => Verdict::NoSamples,
        }
    } else {
        Verdict::of(row.failover_s.map(|s| s.max), |x| x <= FAILOVER_TARGET_S)
    };
    row.lost_verdict = match (lost, mode) {
        (None, _) => Verdict::NoSamples,
        _ if row.acked == 0 => Verdict::NoSamples,
        (Some(n), "sync") => Verdict::of(Some(n as f64), |x| x == 0.0),
        // Async: every loss the client saw must be counted by the service itself.
        (Some(n), _) => Verdict::of(row.reported_lost.map(|r| r as f64), |r| r >= n as f64),
    };
    row
}

fn tp_cell(t: &Throughput) -> String {
    match (t.rps, t.p50_ms, t.p99_ms) {
        (Some(r), Some(p50), Some(p99)) => {
            format!("{r:.0} req/s, p50 {p50:.2} ms, p99 {p99:.2} ms")
        }
        _ => "no samples".into(),
    }
}

fn report(r: &AppsBenchResult, json: bool) -> Result<Unmeasured> {
    let mut unmeasured = Unmeasured::default();
    if json {
        println!("{}", serde_json::to_string_pretty(r)?);
    } else {
        println!(
            "bench apps: kv (RESP2), 2 slaves, {} VMs on {} servers (microvm, {}, {} MiB each); \
             baseline Redis {} in Linux {} ({} MiB, same QEMU, accelerator and switch, up in {:.1} s); \
             redis-benchmark -n {} -c {} from the host's uplink",
            r.vms,
            r.servers,
            r.accel,
            r.node_memory_mib,
            r.redis.redis_version,
            r.linux_kernel,
            r.linux_memory_mib,
            r.linux_ready_ms / 1000.0,
            r.requests,
            r.clients
        );
        if let Some(e) = &r.service_error {
            println!("the service's rows have no samples: {e}");
        }
        println!("| figure | measured | ratio | target | verdict |");
        println!("|---|---|---|---|---|");
    }
    for l in &r.loads {
        let row = format!("{}: Redis in a Linux VM", l.load);
        if !json {
            println!(
                "| {row} | {} | 1.00 (baseline) | | |",
                tp_cell(&l.redis_linux)
            );
        }
        let row = format!("{}: ours, straight to the master", l.load);
        unmeasured.note(&row, l.vs_redis_verdict);
        if !json {
            println!(
                "| {row} | {} | {} | ≥ {VS_REDIS_TARGET:.1}× req/s, p99 ≤ Redis's | {} |",
                tp_cell(&l.master),
                cell(l.vs_redis, |x| format!("{x:.2}× Redis")),
                l.vs_redis_verdict
            );
        }
        let row = format!("{}: ours, through a node on another server", l.load);
        unmeasured.note(&row, l.handler_verdict);
        if !json {
            println!(
                "| {row} | {} | {} | ≥ {HANDLER_TARGET:.1}× straight | {} |",
                tp_cell(&l.handler),
                cell(l.handler_ratio, |x| format!("{x:.2}× master")),
                l.handler_verdict
            );
        }
        if l.redis_linux.rps.is_none() {
            unmeasured
                .0
                .push(format!("{}: Redis in a Linux VM (the baseline)", l.load));
        }
    }
    for g in &r.lag {
        let row = format!(
            "replication lag, {:.0} % loss on the slaves' links, {} ms between servers",
            g.loss * 100.0,
            g.delay_ms
        );
        unmeasured.note(&row, g.verdict);
        if !json {
            println!(
                "| {row} | {} | | converged after the load | {} |",
                match (&g.lag_ms, &g.lag_ops) {
                    (Some(m), o) =>
                        format!(
                            "p50 {:.0} ms, p99 {:.0} ms over {} writes{}{}",
                            m.p50,
                            m.p99,
                            g.writes.unwrap_or(0),
                            o.as_ref()
                                .map(|o| format!(" ({:.0}/{:.0} ops)", o.p50, o.p99))
                                .unwrap_or_default(),
                            g.converged_s
                                .map(|c| format!("; converged {c:.1} s after"))
                                .unwrap_or_else(|| "; never converged".into())
                        ) + &if g.implausible_lag_ms > 0 {
                            format!(
                                "; {} reported lags over a day left out",
                                g.implausible_lag_ms
                            )
                        } else {
                            String::new()
                        },
                    (None, _) => "no samples".into(),
                },
                g.verdict
            );
        }
    }
    for f in &r.failover {
        let row = format!(
            "failover ({}): master SIGKILL → first write through another server's node",
            f.mode
        );
        unmeasured.note(&row, f.failover_verdict);
        if !json {
            println!(
                "| {row} | {} | {} | max ≤ {FAILOVER_TARGET_S:.0} s over ≥ 5 kills | {} |",
                cell(f.failover_s.as_ref().map(|s| s.p50), |p50| format!(
                    "p50 {p50:.2} s, max {:.2} s over {} kills",
                    f.failover_s.as_ref().map_or(0.0, |s| s.max),
                    f.kills
                )),
                cell(f.failover_s.as_ref().map(|s| s.p50), |p50| format!(
                    "p50 {:.3}× Sentinel's 30 s detection",
                    p50 * 1000.0 / SENTINEL_DOWN_AFTER_MS as f64
                )),
                f.failover_verdict
            );
        }
        let row = format!("acknowledged writes lost ({})", f.mode);
        unmeasured.note(&row, f.lost_verdict);
        if !json {
            let target = if f.mode == "sync" {
                "0"
            } else {
                "every loss counted by the service"
            };
            println!(
                "| {row} | {} | | {target} | {} |",
                if f.lost_verdict == Verdict::NoSamples {
                    "no samples".to_string()
                } else {
                    format!(
                        "{} of {} read back missing; service reports {}",
                        f.lost,
                        f.acked,
                        f.reported_lost
                            .map_or_else(|| "nothing".to_string(), |n| n.to_string())
                    )
                },
                f.lost_verdict
            );
        }
    }
    if !json {
        println!(
            "| anchor: Redis Sentinel's default down-after-milliseconds | {:.0} s before a failover even starts | | | |",
            r.sentinel_down_after_ms as f64 / 1000.0
        );
        for l in &r.loads {
            for (what, t) in [("master", &l.master), ("handler", &l.handler)] {
                if let Some(e) = &t.error
                    && r.service_error.is_none()
                {
                    println!("note: {} {what}: {e}", l.load);
                }
            }
            if let Some(e) = &l.redis_linux.error {
                println!("note: {} Redis in Linux: {e}", l.load);
            }
        }
        for g in r.lag.iter().filter(|_| r.service_error.is_none()) {
            if let Some(e) = &g.error {
                println!("note: lag {:.0} %/{} ms: {e}", g.loss * 100.0, g.delay_ms);
            }
        }
        for f in r.failover.iter().filter(|_| r.service_error.is_none()) {
            if let Some(e) = &f.error {
                println!("note: failover {}: {e}", f.mode);
            }
        }
    }
    Ok(unmeasured)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_an_instance_status_leniently() {
        let v: serde_json::Value = serde_json::from_str(
            r#"{"name":"kv1","master":{"node":"n2","server":"s1"},"epoch":3,"mode":"async",
                "slaves":[{"node":"n4","lag_ops":12,"lag_ms":40.5},{"name":"n6","lag_ops":0,"lag_ms":null}],
                "writes_lost":[{"epoch":2,"count":3,"keys":["a"]},{"epoch":3,"count":1}]}"#,
        )
        .unwrap();
        let i = InstanceView::parse(&v);
        assert_eq!(i.master.as_deref(), Some("n2"));
        assert_eq!(i.epoch, Some(3));
        assert_eq!(
            i.slaves,
            vec![
                ("n4".to_string(), Some(12), Some(40.5)),
                ("n6".to_string(), Some(0), None)
            ]
        );
        assert_eq!(i.writes_lost, Some(4));
        let w: serde_json::Value =
            serde_json::from_str(r#"{"instance":{"master":"n1","slaves":["n2"],"writes_lost":0}}"#)
                .unwrap();
        let i = InstanceView::parse(&w);
        assert_eq!(i.master.as_deref(), Some("n1"));
        assert_eq!(i.slaves, vec![("n2".to_string(), None, None)]);
        assert_eq!(i.writes_lost, Some(0));
        assert_eq!(
            InstanceView::parse(&serde_json::json!({})),
            InstanceView::default()
        );
        // The shape `unipeer app status NAME --json` prints (cluster::apps::AppStatus).
        let a: serde_json::Value = serde_json::from_str(
            r#"{"name":"bench-sync","service":"kv","port":6380,"mode":"sync","epoch":2,
                "master_id":"ab12","master_ip":"10.77.0.13","master":"n3","reported_by":"n3",
                "role_there":"master","accepting_writes":true,"seq":41,"members":["cd","ef"],
                "slaves":[{"id":"cd","ip":"10.77.0.15","node":"n5","acked_seq":40,"lag_ops":1,
                           "lag_ms":12,"online":true},
                          {"id":"ef","ip":"10.77.9.9","node":null,"acked_seq":0,"lag_ops":41,
                           "lag_ms":900,"online":false}],
                "lost_writes":7,"dropped_here":0,"dropped_keys":[],"state_hash":null,
                "memory_used":100}"#,
        )
        .unwrap();
        let i = InstanceView::parse(&a);
        assert_eq!(i.master.as_deref(), Some("n3"));
        assert_eq!(i.epoch, Some(2));
        assert_eq!(i.slaves, vec![("n5".to_string(), Some(1), Some(12.0))]);
        assert_eq!(i.writes_lost, Some(7));
        assert_eq!(i.seq, Some(41));
    }

    #[test]
    fn resp_replies_parse_and_bound() {
        let mut r =
            std::io::Cursor::new(b"+OK\r\n-ERR no\r\n:42\r\n$3\r\nabc\r\n$-1\r\n*2\r\n".to_vec());
        assert_eq!(
            resp::read(&mut r).unwrap(),
            resp::Reply::Simple("OK".into())
        );
        assert_eq!(
            resp::read(&mut r).unwrap(),
            resp::Reply::Error("ERR no".into())
        );
        assert_eq!(resp::read(&mut r).unwrap(), resp::Reply::Int(42));
        assert_eq!(
            resp::read(&mut r).unwrap(),
            resp::Reply::Bulk(Some(b"abc".to_vec()))
        );
        assert_eq!(resp::read(&mut r).unwrap(), resp::Reply::Bulk(None));
        assert_eq!(resp::read(&mut r).unwrap(), resp::Reply::Array(2));
        assert!(resp::read(&mut r).is_err(), "end of stream");
        for bad in [
            &b"?x\r\n"[..],
            b"+OK\n",
            b":x\r\n",
            b"$99999999\r\n",
            b"$3\r\nabcd\r\n",
        ] {
            let mut r = std::io::Cursor::new(bad.to_vec());
            assert!(resp::read(&mut r).is_err(), "{bad:?}");
        }
        assert_eq!(
            resp::encode(&[b"SET", b"k", b"v1"]),
            b"*3\r\n$3\r\nSET\r\n$1\r\nk\r\n$2\r\nv1\r\n"
        );
    }

    #[test]
    fn verdicts_need_both_rate_and_p99() {
        let t = |rps: f64, p99: f64| Throughput {
            rps: Some(rps),
            p50_ms: Some(p99 / 2.0),
            p99_ms: Some(p99),
            error: None,
        };
        let redis = t(10_000.0, 2.0);
        assert_eq!(vs_redis_verdict(&t(12_000.0, 1.5), &redis).1, Verdict::Met);
        assert_eq!(
            vs_redis_verdict(&t(12_000.0, 2.5), &redis).1,
            Verdict::Missed,
            "faster but a worse p99"
        );
        assert_eq!(
            vs_redis_verdict(&t(9_000.0, 1.0), &redis).1,
            Verdict::Missed
        );
        let (r, v) = vs_redis_verdict(&Throughput::missing("no service"), &redis);
        assert_eq!((r, v), (None, Verdict::NoSamples));
        assert_eq!(
            vs_redis_verdict(&t(1.0, 1.0), &Throughput::missing("down")).1,
            Verdict::NoSamples
        );
        assert_eq!(ratio(Some(8.0), Some(10.0)), Some(0.8));
        assert_eq!(ratio(Some(8.0), None), None);
    }
}
