//! `unipeer bench boot`: over K boots, QEMU launch → ready (host clock) and guest entry →
//! network ready (guest TSC); image size; guest RAM and heap high-water; idle host CPU of a
//! running VM; host↔VM UDP echo round trips. Every figure names the accelerator and machine.

use std::fs;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::bench::linux_baseline;
use crate::diag;
use crate::hostinfo::{self, AccelChoice};
use crate::image;
use crate::qemu::Machine;
use crate::vm::{self, VmOptions};

#[derive(clap::Args, Clone, Debug)]
pub struct BootBenchArgs {
    /// Number of boots to time.
    #[arg(long, default_value_t = 10)]
    pub boots: usize,
    /// Image name under images/.
    #[arg(long, default_value = "default")]
    pub image: String,
    #[arg(long, value_enum, default_value_t = Machine::Microvm)]
    pub machine: Machine,
    #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
    pub accel: AccelChoice,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = vm::DEFAULT_MEMORY_MIB)]
    pub memory: u32,
    /// UDP echo probes for the round-trip figures.
    #[arg(long, default_value_t = 2000)]
    pub rtt_probes: usize,
    /// Seconds of idle to measure the VM's host CPU over.
    #[arg(long, default_value_t = 10)]
    pub idle_secs: u64,
    #[arg(long)]
    pub json: bool,
    /// Also boot a stock Debian kernel (fetched with apt-get download, cached) with a tiny
    /// static init on the same QEMU and accelerator, and print the ratios.
    #[arg(long)]
    pub baseline_linux: bool,
    /// Boots of the Linux baseline (seconds each under TCG).
    #[arg(long, default_value_t = linux_baseline::DEFAULT_LINUX_BOOTS)]
    pub linux_boots: usize,
    /// Guest RAM in MiB for the Linux baseline.
    #[arg(long, default_value_t = linux_baseline::DEFAULT_LINUX_MEMORY_MIB)]
    pub linux_memory: u32,
}

/// Summary statistics of a series, in the series' unit.
#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Stats {
    pub min: f64,
    pub p50: f64,
    pub p99: f64,
    pub max: f64,
    pub n: usize,
}

pub fn stats(mut v: Vec<f64>) -> Stats {
    if v.is_empty() {
        return Stats::default();
    }
    v.sort_by(f64::total_cmp);
    let at = |p: f64| v[(((v.len() - 1) as f64) * p).round() as usize];
    Stats {
        min: v[0],
        p50: at(0.5),
        p99: at(0.99),
        max: v[v.len() - 1],
        n: v.len(),
    }
}

/// CPU time of all of a process's threads in nanoseconds (scheduler statistics: finer than
/// the 10 ms ticks of /proc/PID/stat).
pub fn cpu_ns(pid: u32) -> Option<u64> {
    let mut total = 0u64;
    for task in fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let stat = fs::read_to_string(task.path().join("schedstat")).ok()?;
        total += stat.split_whitespace().next()?.parse::<u64>().ok()?;
    }
    Some(total)
}

/// Resident and proportional set size of a process in KiB.
pub fn memory_kib(pid: u32) -> (u64, u64) {
    let read = |file: &str, key: &str| -> u64 {
        fs::read_to_string(format!("/proc/{pid}/{file}"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with(key))
                    .and_then(|l| l.split_whitespace().nth(1))
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(0)
    };
    (read("status", "VmRSS:"), read("smaps_rollup", "Pss:"))
}

#[derive(Debug, serde::Serialize)]
pub struct BootBenchResult {
    pub accel: String,
    pub accel_reason: String,
    pub machine: String,
    pub image_bytes: u64,
    pub memory_mib: u32,
    pub launch_to_ready_ms: Stats,
    pub entry_to_ready_ms: Stats,
    pub heap_high_water_bytes: u64,
    pub heap_size_bytes: u64,
    pub rss_kib: u64,
    pub pss_kib: u64,
    pub idle_cpu_percent: f64,
    pub idle_secs: u64,
    pub idle_timer_irqs: u64,
    pub rtt_us: Stats,
    pub rtt_lost: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub linux_baseline: Option<LinuxComparison>,
}

/// The Linux baseline and our figures divided by its.
#[derive(Debug, serde::Serialize)]
pub struct LinuxComparison {
    pub linux: linux_baseline::LinuxBaselineResult,
    /// Our launch → ready p50 over Linux's launch → user space p50.
    pub launch_ratio_p50: f64,
    /// Our echo RTT p50 over Linux's (target <= 0.5).
    pub rtt_ratio_p50: f64,
    pub rtt_ratio_p99: f64,
}

pub fn measure(args: &BootBenchArgs) -> anyhow::Result<BootBenchResult> {
    let img = image::open(&args.image)?;
    let accel = hostinfo::choose_accel(args.accel);
    let run_dir = image::repo_root().join("run").join("bench-boot");
    let mut launch = Vec::new();
    let mut entry = Vec::new();
    for i in 0..args.boots {
        let mut opts = VmOptions::new(
            &format!("bench-{i}"),
            run_dir.clone(),
            args.machine,
            accel.accel,
        );
        opts.memory_mib = args.memory;
        opts.exit_after_ready = true;
        let mut ready = vm::launch_ready(&img, &opts).context("timed boot")?;
        launch.push(ready.launch_to_ready.as_secs_f64() * 1000.0);
        if let Some(us) = ready.guest_entry_to_ready_us() {
            entry.push(us as f64 / 1000.0);
        }
        ready.vm.wait_exit(Duration::from_secs(10))?;
    }

    // One VM that stays up: memory, idle CPU, round trips.
    let mut opts = VmOptions::new("bench-live", run_dir, args.machine, accel.accel);
    opts.memory_mib = args.memory;
    let mut live = vm::launch_ready(&img, &opts).context("live boot")?;
    let report = vm::wait_for_diag(&live.ports, Duration::from_secs(10))?;
    let pid = live.vm.pid().context("VM pid")?;

    let (rtts, lost) = diag::echo_rtts(
        live.ports.echo_addr(),
        args.rtt_probes,
        64,
        Duration::from_millis(500),
    )?;
    let rtt_us = stats(rtts.iter().map(|d| d.as_secs_f64() * 1e6).collect());

    // Idle: let the guest settle, then measure its CPU over the window.
    let before_report = diag::query_udp(live.ports.diag_udp_addr(), Duration::from_secs(5))?;
    let t0 = cpu_ns(pid).context("reading the VM's CPU time")?;
    let w0 = Instant::now();
    std::thread::sleep(Duration::from_secs(args.idle_secs));
    let t1 = cpu_ns(pid).context("reading the VM's CPU time")?;
    let idle_wall = w0.elapsed().as_secs_f64();
    let after_report = diag::query_udp(live.ports.diag_udp_addr(), Duration::from_secs(5))?;
    let idle_cpu_percent = t1.saturating_sub(t0) as f64 / 1e9 / idle_wall * 100.0;
    let (rss_kib, pss_kib) = memory_kib(pid);
    let final_report = diag::query_udp(live.ports.diag_udp_addr(), Duration::from_secs(5))?;
    let _ = diag::tcp_command(
        live.ports.diag_tcp_addr(),
        live.operator_key().as_ref(),
        "shutdown",
        Duration::from_secs(5),
    );
    let _ = live.vm.wait_exit(Duration::from_secs(10));

    Ok(BootBenchResult {
        accel: accel.accel.to_string(),
        accel_reason: accel.reason,
        machine: args.machine.to_string(),
        image_bytes: img.manifest.size_bytes,
        memory_mib: args.memory,
        launch_to_ready_ms: stats(launch),
        entry_to_ready_ms: stats(entry),
        heap_high_water_bytes: final_report
            .num("heap_high_water")
            .max(report.num("heap_high_water")),
        heap_size_bytes: report.num("heap_size"),
        rss_kib,
        pss_kib,
        idle_cpu_percent,
        idle_secs: args.idle_secs,
        idle_timer_irqs: after_report
            .num("irq_timer")
            .saturating_sub(before_report.num("irq_timer")),
        rtt_us,
        rtt_lost: lost,
        linux_baseline: None,
    })
}

fn verdict(ok: bool) -> &'static str {
    if ok { "met" } else { "MISSED" }
}

pub fn run(args: &BootBenchArgs) -> anyhow::Result<()> {
    let linux_prepared = if args.baseline_linux {
        Some(linux_baseline::prepare().context("preparing the Linux baseline")?)
    } else {
        None
    };
    let mut r = measure(args)?;
    if let Some(prepared) = linux_prepared {
        let linux = linux_baseline::measure(
            prepared,
            &linux_baseline::LinuxBaselineParams {
                machine: args.machine,
                accel: hostinfo::choose_accel(args.accel).accel,
                boots: args.linux_boots,
                memory_mib: args.linux_memory,
                rtt_probes: args.rtt_probes,
            },
        )
        .context("Linux baseline")?;
        let ratio = |ours: f64, theirs: f64| {
            if theirs > 0.0 {
                ours / theirs
            } else {
                f64::NAN
            }
        };
        r.linux_baseline = Some(LinuxComparison {
            launch_ratio_p50: ratio(r.launch_to_ready_ms.p50, linux.launch_to_user_ms.p50),
            rtt_ratio_p50: ratio(r.rtt_us.p50, linux.rtt_us.p50),
            rtt_ratio_p99: ratio(r.rtt_us.p99, linux.rtt_us.p99),
            linux,
        });
    }
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        return Ok(());
    }
    println!(
        "unipeer bench boot — {} on {} ({}), {} boots, image {}",
        r.machine, r.accel, r.accel_reason, args.boots, args.image
    );
    println!(
        "{:<38} {:>14} {:>14} {:>10} {:>8}",
        "metric", "p50", "p99/max", "target", ""
    );
    let row = |name: &str, p50: String, p99: String, target: &str, ok: Option<bool>| {
        println!(
            "{:<38} {:>14} {:>14} {:>10} {:>8}",
            name,
            p50,
            p99,
            target,
            ok.map(verdict).unwrap_or("")
        );
    };
    row(
        "QEMU launch -> ready (ms)",
        format!("{:.1}", r.launch_to_ready_ms.p50),
        format!("{:.1}", r.launch_to_ready_ms.max),
        "<= 60",
        Some(r.launch_to_ready_ms.p50 <= 60.0),
    );
    let entry_target = if r.accel == "tcg" { 5.0 } else { 1.0 };
    row(
        "guest entry -> network ready (ms)",
        format!("{:.2}", r.entry_to_ready_ms.p50),
        format!("{:.2}", r.entry_to_ready_ms.max),
        &format!("<= {entry_target}"),
        Some(r.entry_to_ready_ms.p50 <= entry_target),
    );
    row(
        "image size (KiB)",
        format!("{:.1}", r.image_bytes as f64 / 1024.0),
        String::new(),
        "<= 1024",
        Some(r.image_bytes <= 1024 * 1024),
    );
    row(
        "guest RAM given (MiB)",
        r.memory_mib.to_string(),
        String::new(),
        "16",
        Some(r.memory_mib <= 16),
    );
    row(
        "heap high-water (KiB)",
        format!("{:.1}", r.heap_high_water_bytes as f64 / 1024.0),
        format!("of {:.0}", r.heap_size_bytes as f64 / 1024.0),
        "",
        None,
    );
    row(
        "QEMU resident / proportional (MiB)",
        format!("{:.1}", r.rss_kib as f64 / 1024.0),
        format!("{:.1}", r.pss_kib as f64 / 1024.0),
        "",
        None,
    );
    row(
        &format!("idle host CPU over {} s (%)", r.idle_secs),
        format!("{:.3}", r.idle_cpu_percent),
        format!("{} timer irqs", r.idle_timer_irqs),
        "<= 0.1",
        Some(r.idle_cpu_percent <= 0.1),
    );
    row(
        &format!("host<->VM UDP echo RTT (us), {} lost", r.rtt_lost),
        format!("{:.0}", r.rtt_us.p50),
        format!("{:.0}", r.rtt_us.p99),
        "",
        None,
    );
    if let Some(c) = &r.linux_baseline {
        let l = &c.linux;
        println!(
            "Linux baseline — {} ({}) on {} ({}), {} MiB, {} boots; ours on {} ({})",
            l.package,
            l.kernel_release,
            l.machine,
            l.accel,
            l.memory_mib,
            l.boots,
            r.machine,
            r.accel
        );
        if let Some(note) = &l.machine_note {
            println!("  note: {note}");
        }
        row(
            &format!("Linux launch -> user space (ms) [{}]", l.machine),
            format!("{:.0}", l.launch_to_user_ms.p50),
            format!("{:.0}", l.launch_to_user_ms.max),
            "",
            None,
        );
        row(
            &format!("Linux launch -> echo listening (ms) [{}]", l.machine),
            format!("{:.0}", l.launch_to_echo_ms.p50),
            format!("{:.0}", l.launch_to_echo_ms.max),
            "",
            None,
        );
        row(
            "ours launch->ready / Linux launch->user",
            format!("{:.4}", c.launch_ratio_p50),
            format!("{:.4}", r.launch_to_ready_ms.max / l.launch_to_user_ms.max),
            "",
            None,
        );
        row(
            &format!("Linux UDP echo RTT (us), {} lost", l.rtt_lost),
            format!("{:.0}", l.rtt_us.p50),
            format!("{:.0}", l.rtt_us.p99),
            "",
            None,
        );
        row(
            "ours / Linux echo RTT (ratio)",
            format!("{:.2}", c.rtt_ratio_p50),
            format!("{:.2}", c.rtt_ratio_p99),
            "<= 0.5",
            Some(c.rtt_ratio_p50 <= 0.5),
        );
    }
    Ok(())
}
