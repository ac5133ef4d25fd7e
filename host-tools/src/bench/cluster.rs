//! `unipeer bench cluster`: VM<->VM UDP round trips through the switch (a node's `probe`), the
//! frames per second the switch forwards (fake VMs), the time to bring up N VMs, and density:
//! the cluster grows step by step until every VM no longer answers or the maximum is reached,
//! with host memory per VM (proportional set size of each QEMU).

use std::path::PathBuf;
use std::time::Instant;

use crate::bench::boot::memory_kib;
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
    /// Density: grow the cluster up to this many VMs (0: skip density).
    #[arg(long, default_value_t = 500)]
    pub density_max: usize,
    /// Density: VMs added per step (steps 100, 200, ... by default).
    #[arg(long, default_value_t = 100)]
    pub density_step: usize,
    /// TCG translation cache per VM in MiB.
    #[arg(long, default_value_t = 16)]
    pub tb_size: u32,
    /// Run directory of the bench's own cluster.
    #[arg(long)]
    pub bench_dir: Option<PathBuf>,
    /// Certify the nodes and seal the overlay, as `unipeer up` does by default. Off by
    /// default here: the bench measures the VMs and the switch, and under TCG each sealed
    /// handshake costs the guest about 50 ms of CPU, which swamps a large cluster while its
    /// overlay forms (see `unipeer bench auth --vm`).
    #[arg(long)]
    pub trust: bool,
    /// Run the overlay in the VMs. Off by default here: the bench measures what a VM and the
    /// switch cost; with the overlay on, its upkeep (keepalives to 16 leaf-set members every
    /// 2 s per node, each a wake-up of a TCG guest) is what limits density on 2 cores.
    #[arg(long)]
    pub overlay: bool,
    #[arg(long)]
    pub json: bool,
}

/// One density step.
#[derive(Debug, serde::Serialize)]
pub struct DensityStep {
    pub vms: usize,
    pub answering: usize,
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
    /// Whether the nodes were certified and the overlay sealed.
    pub sealed: bool,
    /// Whether the VMs ran the overlay.
    pub overlay: bool,
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
    pub host_rtt_p50_us: f64,
    pub host_rtt_p99_us: f64,
    pub density: Vec<DensityStep>,
    /// The most VMs seen all up and answering.
    pub density_max_answering: usize,
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

pub fn run(args: &ClusterBenchArgs) -> anyhow::Result<ClusterBenchResult> {
    let accel = hostinfo::choose_accel(args.accel);
    let dir = args
        .bench_dir
        .clone()
        .unwrap_or_else(|| crate::image::repo_root().join("run").join("bench-cluster"));
    if !args.json {
        eprintln!(
            "bench cluster: accelerator {} ({})",
            accel.accel, accel.reason
        );
        eprintln!("bench cluster: switch forwarding with fake VMs ...");
    }
    let fwd = measure_forwarding(&ForwardingBench::default()).map_err(anyhow::Error::msg)?;

    // A stale bench cluster from an interrupted run goes first.
    let _ = cluster::down(&dir);
    let mem_before = mem_available_kib();
    let mut opts = UpOptions::new(args.nodes, accel.accel, std::env::current_exe()?);
    opts.image = args.image.clone();
    opts.tb_size_mib = args.tb_size;
    opts.log_level = "warn".into();
    if !args.trust {
        opts.ca_store = None;
    }
    opts.overlay = args.overlay;
    if !args.json {
        eprintln!("bench cluster: up -n {} ...", args.nodes);
    }
    let t0 = Instant::now();
    let report = cluster::up(&dir, &opts)?;
    let up_s = t0.elapsed().as_secs_f64();
    let result = measure(args, &dir, &accel, fwd, report, up_s, mem_before);
    let _ = cluster::down(&dir);
    let result = result?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&result)?);
    } else {
        print_table(&result);
    }
    Ok(result)
}

fn measure(
    args: &ClusterBenchArgs,
    dir: &std::path::Path,
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
    if !p.reached() {
        anyhow::bail!("n1 did not reach {last}: {p:?}");
    }
    let host = cluster::host_echo(dir, "n1", 1000)?;
    let mut density = Vec::new();
    let mut best = args.nodes;
    let mut vms = args.nodes;
    let step = args.density_step.max(1);
    while args.density_max > vms {
        let target = ((vms / step) + 1) * step;
        let target = target.min(args.density_max);
        if !args.json {
            eprintln!("bench cluster: density: growing to {target} VMs ...");
        }
        let t = Instant::now();
        if let Err(e) = cluster::grow(dir, target - vms) {
            eprintln!("bench cluster: growing to {target} failed: {e}");
            break;
        }
        let grow_s = t.elapsed().as_secs_f64();
        vms = target;
        let st = cluster::wait_answering(dir, std::time::Duration::from_secs(60))?;
        let ok = answering(&st);
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
            grow_s,
            pss_per_vm_mib: per(pss),
            rss_per_vm_mib: per(rss),
            host_mem_per_vm_mib: per(mem_before.saturating_sub(mem_available_kib())),
        };
        if !args.json {
            eprintln!(
                "bench cluster:   {} of {} answering, PSS {:.1} MiB/VM",
                ok, vms, step_result.pss_per_vm_mib
            );
        }
        density.push(step_result);
        if ok < vms {
            break;
        }
        best = vms;
    }
    Ok(ClusterBenchResult {
        sealed: args.trust,
        overlay: args.overlay,
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
        host_rtt_p50_us: host.p50_us,
        host_rtt_p99_us: host.p99_us,
        density,
        density_max_answering: best,
    })
}

fn print_table(r: &ClusterBenchResult) {
    println!(
        "unipeer bench cluster — accelerator {} ({}); overlay {}",
        r.accel,
        r.accel_reason,
        match (r.overlay, r.sealed) {
            (false, _) => "off (pass --overlay [--trust] to run it)",
            (true, true) => "on, sealed",
            (true, false) => "on, in the clear (pass --trust to seal it)",
        }
    );
    println!("{:<46} {:>14} {:>12}", "figure", "value", "target");
    let row = |name: &str, value: String, target: &str| {
        println!("{name:<46} {value:>14} {target:>12}");
    };
    row(
        "VM<->VM UDP RTT p50 (through switch)",
        format!("{} us", r.vm_rtt_p50_us),
        "<= 300 us",
    );
    row(
        "VM<->VM UDP RTT p99",
        format!("{} us", r.vm_rtt_p99_us),
        "<= 1000 us",
    );
    row("VM<->VM UDP RTT max", format!("{} us", r.vm_rtt_max_us), "");
    row(
        "VM<->VM samples answered",
        format!("{}/{}", r.vm_rtt_received, r.vm_rtt_samples),
        "",
    );
    row(
        "host->VM UDP RTT p50 (uplink)",
        format!("{:.0} us", r.host_rtt_p50_us),
        "",
    );
    row(
        "host->VM UDP RTT p99",
        format!("{:.0} us", r.host_rtt_p99_us),
        "",
    );
    row(
        "switch alone: frame RTT p50 / p99 (fake VMs)",
        format!(
            "{:.0}/{:.0} us",
            r.switch_fake_rtt_p50_us, r.switch_fake_rtt_p99_us
        ),
        "",
    );
    row(
        "switch forwarding",
        format!("{:.0} f/s", r.switch_frames_per_s),
        "",
    );
    row(
        &format!("up -n {} (all ready and answering)", r.up_nodes),
        format!("{:.2} s", r.up_s),
        "",
    );
    row(
        "  of which first spawn -> last ready line",
        format!("{:.2} s", r.up_all_ready_s),
        "",
    );
    for d in &r.density {
        row(
            &format!("density {} VMs: answering", d.vms),
            format!("{}/{}", d.answering, d.vms),
            "",
        );
        row(
            "  grow time / PSS per VM",
            format!("{:.1} s / {:.1} MiB", d.grow_s, d.pss_per_vm_mib),
            "",
        );
        row(
            "  RSS per VM / host MemAvailable drop per VM",
            format!("{:.1} / {:.1} MiB", d.rss_per_vm_mib, d.host_mem_per_vm_mib),
            "",
        );
    }
    row(
        "density: most VMs up and answering",
        r.density_max_answering.to_string(),
        ">= 500",
    );
}
