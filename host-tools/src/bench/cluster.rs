//! `unipeer bench cluster`: VM<->VM UDP round trips through the switch (a node's `probe`), the
//! frames per second the switch forwards (fake VMs), the time to bring up N VMs, and density:
//! the cluster grows step by step until its VMs no longer all answer (and, with the overlay on,
//! all report themselves joined) or the maximum is reached, with host memory per VM
//! (proportional set size of each QEMU).
//!
//! The headline cluster is what a user runs: overlay on, certified and sealed. A second
//! density series with the overlay off (no upkeep traffic, no handshakes) is the floor: what
//! the VMs and the switch alone allow. Every row with a target prints a computed verdict.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::bench::boot::memory_kib;
use crate::bench::{Unmeasured, Verdict, cell};
use crate::cluster::{self, ClusterStatus, NodeState, UpOptions};
use crate::hostinfo::{self, AccelChoice};
use crate::net::{ForwardingBench, measure_forwarding};

#[derive(clap::Args, Debug)]
pub struct ClusterBenchArgs {
    #[arg(long, default_value = "default")]
    pub image: String,
    #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
    pub accel: AccelChoice,
    /// VMs brought up at once for the start-up figure.
    #[arg(long, default_value_t = 16)]
    pub nodes: usize,
    /// VM<->VM echo round trips (one node's `probe`, at most 1000 per call).
    #[arg(long, default_value_t = 1000)]
    pub rtt_probes: u32,
    /// Density with the overlay on and sealed (the headline): grow the cluster up to this many
    /// VMs (0: skip; the density row then has no samples and fails).
    #[arg(long, default_value_t = 500)]
    pub density_max: usize,
    /// Density: VMs added per step (steps 100, 200, ... by default).
    #[arg(long, default_value_t = 100)]
    pub density_step: usize,
    /// The floor: the same growth with the overlay off, up to this many VMs (0: skip).
    #[arg(long, default_value_t = 500)]
    pub floor_max: usize,
    /// TCG translation cache per VM in MiB.
    #[arg(long, default_value_t = 16)]
    pub tb_size: u32,
    /// Run directory of the bench's own cluster.
    #[arg(long)]
    pub bench_dir: Option<PathBuf>,
    #[arg(long)]
    pub json: bool,
}

/// One density step.
#[derive(Debug, serde::Serialize)]
pub struct DensityStep {
    pub vms: usize,
    pub answering: usize,
    /// Answering and reporting `overlay_joined` (with the overlay off: answering).
    pub joined: usize,
    /// From the step's growth until all answered (and joined), or the deadline.
    pub settle_s: f64,
    /// Time to add this step's VMs until all printed their ready line, seconds (the wait for
    /// their answers, up to 60 s, follows).
    pub grow_s: f64,
    pub pss_per_vm_mib: f64,
    pub rss_per_vm_mib: f64,
    /// Fall of the host's MemAvailable since before the cluster, per VM.
    pub host_mem_per_vm_mib: f64,
}

#[derive(Debug, serde::Serialize)]
pub struct ClusterBenchResult {
    pub accel: String,
    pub accel_reason: String,
    pub uplink: String,
    pub switch_fake_rtt_p50_us: f64,
    pub switch_fake_rtt_p99_us: f64,
    pub switch_frames_per_s: f64,
    pub up_nodes: usize,
    /// `up -n N` wall time: namespace, daemon, all ready, all answering.
    pub up_s: f64,
    /// First QEMU spawn to the last ready line.
    pub up_all_ready_s: f64,
    pub vm_rtt_samples: u32,
    pub vm_rtt_received: u32,
    pub vm_rtt_p50_us: u64,
    pub vm_rtt_p99_us: u64,
    pub vm_rtt_max_us: u64,
    pub host_rtt_sent: usize,
    pub host_rtt_received: usize,
    pub host_rtt_p50_us: f64,
    pub host_rtt_p99_us: f64,
    /// The headline: overlay on, sealed.
    pub density: Vec<DensityStep>,
    /// The most VMs seen all answering and joined with the overlay on and sealed; `None` when
    /// no step completed.
    pub density_max_joined: Option<usize>,
    /// The floor: overlay off.
    pub floor: Vec<DensityStep>,
    pub floor_max_answering: Option<usize>,
}

fn mem_available_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemAvailable:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn answering(st: &ClusterStatus) -> usize {
    st.nodes
        .iter()
        .filter(|n| n.state == NodeState::Up && n.answering == Some(true))
        .count()
}

fn joined(st: &ClusterStatus) -> usize {
    st.nodes
        .iter()
        .filter(|n| {
            n.state == NodeState::Up
                && n.answering == Some(true)
                && n.diag.as_ref().is_some_and(|d| d.overlay_joined)
        })
        .count()
}

pub fn run(args: &ClusterBenchArgs) -> anyhow::Result<ClusterBenchResult> {
    let accel = hostinfo::choose_accel(args.accel);
    let dir = args
        .bench_dir
        .clone()
        .unwrap_or_else(|| crate::image::repo_root().join("run").join("bench-cluster"));
    let say = |m: &str| {
        if !args.json {
            eprintln!("bench cluster: {m}");
        }
    };
    say(&format!("accelerator {} ({})", accel.accel, accel.reason));
    say("switch forwarding with fake VMs ...");
    let fwd = measure_forwarding(&ForwardingBench::default()).map_err(anyhow::Error::msg)?;

    // A stale bench cluster from an interrupted run goes first.
    let _ = cluster::down(&dir);
    let mem_before = mem_available_kib();
    let mut opts = UpOptions::new(args.nodes, accel.accel, std::env::current_exe()?);
    opts.image = args.image.clone();
    opts.tb_size_mib = args.tb_size;
    opts.log_level = "warn".into();
    // The headline cluster: overlay on, every node certified by the bench's own authority.
    opts.ca_store = Some(dir.join("authority"));
    opts.overlay = true;
    say(&format!("up -n {} (overlay on, sealed) ...", args.nodes));
    let t0 = Instant::now();
    let report = cluster::up(&dir, &opts)?;
    let up_s = t0.elapsed().as_secs_f64();
    let result = measure(args, &dir, &accel, fwd, report, up_s, mem_before);
    let _ = cluster::down(&dir);
    let mut result = result?;

    // The floor: the same growth with the overlay off (and so nothing to seal).
    if args.floor_max > 0 {
        let mem_before = mem_available_kib();
        opts.ca_store = None;
        opts.overlay = false;
        say(&format!("floor: up -n {} (overlay off) ...", args.nodes));
        let floor = (|| -> anyhow::Result<(usize, Vec<DensityStep>)> {
            cluster::up(&dir, &opts)?;
            let base = wait_all(&dir, args.nodes, false)?;
            Ok((
                base,
                density(args, &dir, args.floor_max, false, mem_before)?,
            ))
        })();
        let _ = cluster::down(&dir);
        let (base, floor) = floor?;
        result.floor_max_answering =
            best_step(&floor).or((base == args.nodes).then_some(args.nodes));
        result.floor = floor;
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        print_table(&result, args)?;
    }
    Ok(result)
}

/// Waits until all `vms` answer (and, with `overlay`, report themselves joined), within 60 s
/// and half a second per VM (scaled): joining takes longer than answering. Returns how many
/// did.
fn wait_all(dir: &Path, vms: usize, overlay: bool) -> anyhow::Result<usize> {
    let within = (Duration::from_secs(60) + Duration::from_millis(500) * vms as u32)
        .mul_f64(crate::vm::timeout_scale());
    let start = Instant::now();
    loop {
        let st = cluster::wait_answering(dir, within.saturating_sub(start.elapsed()))?;
        let done = if overlay { joined(&st) } else { answering(&st) };
        if done >= vms || start.elapsed() >= within {
            return Ok(done);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The largest step at which every VM answered (and joined).
fn best_step(steps: &[DensityStep]) -> Option<usize> {
    steps
        .iter()
        .filter(|d| d.joined == d.vms)
        .map(|d| d.vms)
        .max()
}

/// Grows the running cluster step by step up to `max` VMs; stops at the first step where not
/// every VM answers (and, with `overlay`, reports itself joined) within the step's deadline.
fn density(
    args: &ClusterBenchArgs,
    dir: &Path,
    max: usize,
    overlay: bool,
    mem_before: u64,
) -> anyhow::Result<Vec<DensityStep>> {
    let mut steps = Vec::new();
    let mut vms = cluster::status(dir, false)?.nodes.len();
    let step = args.density_step.max(1);
    while max > vms {
        let target = (((vms / step) + 1) * step).min(max);
        if !args.json {
            eprintln!(
                "bench cluster: density ({}): growing to {target} VMs ...",
                if overlay {
                    "overlay on, sealed"
                } else {
                    "overlay off"
                }
            );
        }
        let t = Instant::now();
        if let Err(e) = cluster::grow(dir, target - vms) {
            eprintln!("bench cluster: growing to {target} failed: {e}");
            break;
        }
        let grow_s = t.elapsed().as_secs_f64();
        vms = target;
        let settle = Instant::now();
        wait_all(dir, vms, overlay)?;
        let settle_s = settle.elapsed().as_secs_f64();
        let st = cluster::status(dir, true)?;
        let ok = answering(&st);
        let in_overlay = if overlay { joined(&st) } else { ok };
        let (mut rss, mut pss) = (0u64, 0u64);
        for n in &st.nodes {
            if let Some(pid) = n.qemu_pid {
                let (r, p) = memory_kib(pid);
                rss += r;
                pss += p;
            }
        }
        let per = |kib: u64| kib as f64 / 1024.0 / vms as f64;
        let step_result = DensityStep {
            vms,
            answering: ok,
            joined: in_overlay,
            settle_s,
            grow_s,
            pss_per_vm_mib: per(pss),
            rss_per_vm_mib: per(rss),
            host_mem_per_vm_mib: per(mem_before.saturating_sub(mem_available_kib())),
        };
        if !args.json {
            eprintln!(
                "bench cluster:   {ok} of {vms} answering, {in_overlay} joined, PSS {:.1} MiB/VM",
                step_result.pss_per_vm_mib
            );
        }
        let held = step_result.joined == vms;
        steps.push(step_result);
        if !held {
            break;
        }
    }
    Ok(steps)
}

fn measure(
    args: &ClusterBenchArgs,
    dir: &Path,
    accel: &hostinfo::AccelDecision,
    fwd: crate::net::ForwardingReport,
    report: cluster::UpReport,
    up_s: f64,
    mem_before: u64,
) -> anyhow::Result<ClusterBenchResult> {
    let last = cluster::node_name(args.nodes.max(2));
    let uplink = format!("{:?}", report.status.uplink);
    if answering(&report.status) != args.nodes {
        anyhow::bail!(
            "only {} of {} VMs answer after up",
            answering(&report.status),
            args.nodes
        );
    }
    if !args.json {
        eprintln!("bench cluster: VM<->VM round trips n1 -> {last} ...");
    }
    // One warm-up probe resolves ARP on both sides.
    let _ = cluster::vm_probe(dir, "n1", &last, 5)?;
    let p = cluster::vm_probe(dir, "n1", &last, args.rtt_probes.clamp(1, 1000))?;
    let host = cluster::host_echo(dir, "n1", 1000)?;
    // The first step is the `up` itself: it counts once every node has joined.
    let base_joined = wait_all(dir, args.nodes, true)?;
    let density = if args.density_max > 0 {
        density(args, dir, args.density_max, true, mem_before)?
    } else {
        Vec::new()
    };
    let density_max_joined = if args.density_max > 0 {
        best_step(&density).or((base_joined == args.nodes).then_some(args.nodes))
    } else {
        None
    };
    Ok(ClusterBenchResult {
        accel: accel.accel.to_string(),
        accel_reason: accel.reason.clone(),
        uplink,
        switch_fake_rtt_p50_us: fwd.rtt_p50_us,
        switch_fake_rtt_p99_us: fwd.rtt_p99_us,
        switch_frames_per_s: fwd.frames_per_s,
        up_nodes: args.nodes,
        up_s,
        up_all_ready_s: report.launch.all_ready_ms / 1000.0,
        vm_rtt_samples: p.sent,
        vm_rtt_received: p.received,
        vm_rtt_p50_us: p.rtt_us_p50,
        vm_rtt_p99_us: p.rtt_us_p99,
        vm_rtt_max_us: p.rtt_us_max,
        host_rtt_sent: host.sent,
        host_rtt_received: host.received,
        host_rtt_p50_us: host.p50_us,
        host_rtt_p99_us: host.p99_us,
        density,
        density_max_joined,
        floor: Vec::new(),
        floor_max_answering: None,
    })
}

fn print_table(r: &ClusterBenchResult, args: &ClusterBenchArgs) -> anyhow::Result<()> {
    println!(
        "unipeer bench cluster — accelerator {} ({}); headline cluster: overlay on, sealed; floor: overlay off",
        r.accel, r.accel_reason
    );
    println!(
        "{:<58} {:>16} {:>12} {:>20}",
        "figure", "value", "target", "verdict"
    );
    let mut unmeasured = Unmeasured::default();
    let mut row = |name: &str, value: String, target: &str, v: Option<Verdict>| {
        println!(
            "{name:<58} {value:>16} {target:>12} {:>20}",
            v.map(|v| v.to_string()).unwrap_or_default()
        );
        if let Some(v) = v {
            unmeasured.note(name, v);
        }
    };
    let answered = r.vm_rtt_received > 0;
    let vm = |v: u64| answered.then_some(v as f64);
    let us = |v: f64| format!("{v:.0} us");
    row(
        "VM<->VM UDP RTT p50 (through switch)",
        cell(vm(r.vm_rtt_p50_us), us),
        "<= 300 us",
        Some(Verdict::of(vm(r.vm_rtt_p50_us), |v| v <= 300.0)),
    );
    row(
        "VM<->VM UDP RTT p99",
        cell(vm(r.vm_rtt_p99_us), us),
        "<= 1000 us",
        Some(Verdict::of(vm(r.vm_rtt_p99_us), |v| v <= 1000.0)),
    );
    row(
        "VM<->VM UDP RTT max",
        cell(vm(r.vm_rtt_max_us), us),
        "",
        None,
    );
    row(
        "VM<->VM samples answered",
        format!("{}/{}", r.vm_rtt_received, r.vm_rtt_samples),
        "",
        None,
    );
    let host = |v: f64| (r.host_rtt_received > 0).then_some(v);
    row(
        &format!(
            "host->VM UDP RTT p50 (uplink), {}/{} answered",
            r.host_rtt_received, r.host_rtt_sent
        ),
        cell(host(r.host_rtt_p50_us), us),
        "answers",
        Some(Verdict::of(host(r.host_rtt_p50_us), |_| true)),
    );
    row(
        "host->VM UDP RTT p99",
        cell(host(r.host_rtt_p99_us), us),
        "",
        None,
    );
    row(
        "switch alone: frame RTT p50 / p99 (fake VMs)",
        format!(
            "{:.0}/{:.0} us",
            r.switch_fake_rtt_p50_us, r.switch_fake_rtt_p99_us
        ),
        "",
        None,
    );
    row(
        "switch forwarding",
        format!("{:.0} f/s", r.switch_frames_per_s),
        "",
        None,
    );
    row(
        &format!("up -n {} (all ready and answering)", r.up_nodes),
        format!("{:.2} s", r.up_s),
        "",
        None,
    );
    row(
        "  of which first spawn -> last ready line",
        format!("{:.2} s", r.up_all_ready_s),
        "",
        None,
    );
    for (overlay, steps) in [(true, &r.density), (false, &r.floor)] {
        for d in steps {
            if overlay {
                row(
                    &format!("density, sealed overlay, {} VMs: answering, joined", d.vms),
                    format!("{}/{}, {}/{}", d.answering, d.vms, d.joined, d.vms),
                    "",
                    None,
                );
            } else {
                row(
                    &format!("floor, overlay off, {} VMs: answering", d.vms),
                    format!("{}/{}", d.answering, d.vms),
                    "",
                    None,
                );
            }
            row(
                "  grow / settle time, PSS per VM",
                format!(
                    "{:.1}/{:.1} s, {:.1} MiB",
                    d.grow_s, d.settle_s, d.pss_per_vm_mib
                ),
                "",
                None,
            );
            row(
                "  RSS per VM / host MemAvailable drop per VM",
                format!("{:.1} / {:.1} MiB", d.rss_per_vm_mib, d.host_mem_per_vm_mib),
                "",
                None,
            );
        }
    }
    let headline = r.density_max_joined.map(|n| n as f64);
    row(
        &format!(
            "DENSITY, sealed overlay: most joined (tried {})",
            args.density_max
        ),
        cell(headline, |v| format!("{v:.0}")),
        ">= 500",
        Some(Verdict::of(headline, |v| v >= 500.0)),
    );
    row(
        &format!(
            "floor, overlay off: most answering (tried {})",
            args.floor_max
        ),
        cell(r.floor_max_answering.map(|n| n as f64), |v| {
            format!("{v:.0}")
        }),
        "",
        None,
    );
    unmeasured.check()
}
