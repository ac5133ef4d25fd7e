//! `unipeer bench boot`: over K boots, QEMU launch → ready (host clock) and guest entry →
//! network ready (guest TSC); image size; the guest's heap high-water (from its report) and the
//! smallest guest RAM that still boots (bisected on `-m`); idle host CPU of a running VM;
//! host↔VM UDP echo round trips. Every figure names the accelerator and machine; a series with
//! no samples prints "no samples" and fails the run.

use std::fs;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::bench::{Unmeasured, Verdict, cell, linux_baseline};
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
    /// Guest RAM in MiB of the timed boots and the live VM (the smallest RAM that boots is
    /// found by bisection below this).
    #[arg(long, default_value_t = vm::DEFAULT_MEMORY_MIB)]
    pub memory: u32,
    /// Boots spent bisecting the smallest guest RAM that boots (0: skip; the row then fails).
    #[arg(long, default_value_t = 6)]
    pub ram_probes: u32,
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
    /// Also draw launch -> ready and the echo RTT by percentile, ours beside Linux's (with
    /// `--baseline-linux`), into this SVG file.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<std::path::PathBuf>,
}

/// A series' summary as points `(percentile, value)`: min, p50, p99, max (none when empty).
fn by_percentile(s: Option<&Stats>) -> Vec<(f64, f64)> {
    s.filter(|s| s.n > 0)
        .map(|s| vec![(0.0, s.min), (50.0, s.p50), (99.0, s.p99), (100.0, s.max)])
        .unwrap_or_default()
}

/// The figures of `--plot`: boot time and echo RTT by percentile, ours and Linux's.
pub fn panels(r: &BootBenchResult) -> Vec<crate::bench::plot::Panel> {
    use crate::bench::plot::{Panel, Series};
    let linux = r.linux_baseline.as_ref().map(|c| &c.linux);
    let boot = Panel::new("Boot: QEMU launch to ready", "percentile", "ms")
        .with(Series::line(
            "unipeer launch -> ready",
            by_percentile(r.launch_to_ready_ms.as_ref()),
        ))
        .with(Series::line(
            "Linux launch -> user space",
            by_percentile(linux.map(|l| &l.launch_to_user_ms)),
        ));
    let rtt = Panel::new("UDP echo round trip", "percentile", "us")
        .with(Series::line(
            "unipeer echo RTT",
            by_percentile(r.rtt_us.as_ref()),
        ))
        .with(Series::line(
            "Linux echo RTT",
            by_percentile(linux.map(|l| &l.rtt_us)),
        ));
    vec![boot, rtt]
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

impl Stats {
    /// The statistics of a series; `None` for an empty one (never zeros).
    pub fn of(mut v: Vec<f64>) -> Option<Stats> {
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let at = |p: f64| v[(((v.len() - 1) as f64) * p).round() as usize];
        Some(Stats {
            min: v[0],
            p50: at(0.5),
            p99: at(0.99),
            max: v[v.len() - 1],
            n: v.len(),
        })
    }
}

/// [`Stats::of`], with zeros (`n == 0`) for an empty series: for figures printed with their `n`.
pub fn stats(v: Vec<f64>) -> Stats {
    Stats::of(v).unwrap_or_default()
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
    pub boots: usize,
    pub launch_to_ready_ms: Option<Stats>,
    /// QEMU's own floor on the same path: an empty PVH kernel that prints the ready marker at
    /// entry and exits ([`floor_kernel`]), launched the same way, interleaved with our boots.
    pub floor_launch_to_line_ms: Option<Stats>,
    /// Our launch → ready p50 over the floor's p50 (NaN when either series is empty).
    pub launch_over_floor: f64,
    /// Each boot phase's duration (ms, over the timed boots), in boot order; `after_ready`
    /// phases ran after the ready line.
    pub phases: Vec<PhaseStats>,
    /// Over the boots whose guest reported `boot_entry_to_ready_us`.
    pub entry_to_ready_ms: Option<Stats>,
    /// The smallest `-m` (MiB) found to boot and answer, and each probe `(MiB, booted)`.
    pub min_boot_memory_mib: Option<u32>,
    pub ram_probes: Vec<(u32, bool)>,
    pub heap_high_water_bytes: u64,
    pub heap_size_bytes: u64,
    pub rss_kib: u64,
    pub pss_kib: u64,
    pub idle_cpu_percent: f64,
    pub idle_secs: u64,
    pub idle_timer_irqs: u64,
    /// The event loop's wake-ups per second over the idle window (its `wakeups` counter).
    pub idle_wakeups_per_s: f64,
    /// Whose deadline ended the idle window's sleeps (`sleeps_until_<name>` deltas, nonzero).
    pub idle_wake_causes: Vec<(String, u64)>,
    pub rtt_us: Option<Stats>,
    pub rtt_sent: usize,
    pub rtt_lost: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub linux_baseline: Option<LinuxComparison>,
}

/// One boot phase over the timed boots.
#[derive(Debug, serde::Serialize)]
pub struct PhaseStats {
    pub name: String,
    pub ms: Stats,
    pub after_ready: bool,
}

/// The target for launch → ready over QEMU's floor (issue 14).
pub const FLOOR_RATIO_TARGET: f64 = 1.3;

/// An empty PVH kernel: an ELF64 whose one loadable segment (at 1 MiB) holds 32-bit code that
/// writes the ready marker and ` floor` to COM1 and exits QEMU through `isa-debug-exit`
/// (status 1), and a PT_NOTE with the Xen PVH entry (type 18, the address as a quad). Built by the
/// bench, so the floor needs nothing outside the repository.
pub fn floor_kernel() -> Vec<u8> {
    const BASE: u64 = 0x10_0000;
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let note_off = EHDR + 2 * PHDR;
    let code_off = note_off + 24;
    let entry = BASE + code_off as u64;
    let msg_addr = entry + 27;
    let mut code: Vec<u8> = vec![0x66, 0xba, 0xf8, 0x03]; // mov dx, 0x3f8
    code.push(0xbe); // mov esi, msg
    code.extend_from_slice(&(msg_addr as u32).to_le_bytes());
    code.extend_from_slice(&[
        0xac, // lodsb
        0x84, 0xc0, // test al, al
        0x74, 0x03, // jz done
        0xee, // out dx, al
        0xeb, 0xf8, // jmp lodsb
        0x66, 0xba, 0xf4, 0x00, // done: mov dx, 0xf4
        0x31, 0xc0, // xor eax, eax
        0xef, // out dx, eax  (isa-debug-exit: QEMU exits with status 1)
        0xf4, // hlt
        0xeb, 0xfd, // jmp hlt
    ]);
    debug_assert_eq!(code.len(), 27);
    code.extend_from_slice(format!("{} floor\n\0", unipeer_node::launch::READY_MARKER).as_bytes());
    let total = code_off + code.len();
    let mut f = Vec::with_capacity(total);
    // ELF header.
    f.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&entry.to_le_bytes());
    f.extend_from_slice(&(EHDR as u64).to_le_bytes()); // e_phoff
    f.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    f.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    f.extend_from_slice(&(EHDR as u16).to_le_bytes());
    f.extend_from_slice(&(PHDR as u16).to_le_bytes());
    f.extend_from_slice(&2u16.to_le_bytes()); // e_phnum
    f.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    f.extend_from_slice(&0u16.to_le_bytes());
    f.extend_from_slice(&0u16.to_le_bytes());
    let mut phdr = |kind: u32, flags: u32, off: u64, addr: u64, size: u64, align: u64| {
        f.extend_from_slice(&kind.to_le_bytes());
        f.extend_from_slice(&flags.to_le_bytes());
        f.extend_from_slice(&off.to_le_bytes());
        f.extend_from_slice(&addr.to_le_bytes());
        f.extend_from_slice(&addr.to_le_bytes());
        f.extend_from_slice(&size.to_le_bytes());
        f.extend_from_slice(&size.to_le_bytes());
        f.extend_from_slice(&align.to_le_bytes());
    };
    phdr(1, 5, 0, BASE, total as u64, 0x1000); // PT_LOAD, R+X, the whole file
    phdr(4, 4, note_off as u64, BASE + note_off as u64, 24, 4); // PT_NOTE
    // The PVH note: namesz 4, descsz 8, type 18 (XEN_ELFNOTE_PHYS32_ENTRY), "Xen\0", entry.
    f.extend_from_slice(&4u32.to_le_bytes());
    f.extend_from_slice(&8u32.to_le_bytes());
    f.extend_from_slice(&18u32.to_le_bytes());
    f.extend_from_slice(b"Xen\0");
    f.extend_from_slice(&entry.to_le_bytes());
    f.extend_from_slice(&code);
    f
}

/// Boots the empty PVH kernel once the way [`vm::launch_ready`] boots ours; launch → its line.
fn floor_boot(
    img: &image::Image,
    floor: &std::path::Path,
    opts: &VmOptions,
) -> anyhow::Result<Duration> {
    let fake = image::Image {
        dir: img.dir.clone(),
        kernel: floor.to_path_buf(),
        manifest: img.manifest.clone(),
    };
    let (spec, _ports, _config) = vm::user_net_spec(&fake, opts)?;
    let mut vm = spec.spawn()?;
    let (_, seen_at) = vm.wait_for_line(
        unipeer_node::launch::READY_MARKER,
        vm::ready_timeout(opts.accel),
    )?;
    let _ = vm.remove_config();
    let took = seen_at.duration_since(vm.launched_at);
    if vm.wait_exit(Duration::from_secs(10)).is_err() {
        vm.kill();
    }
    Ok(took)
}

/// `name:us,...` (microseconds from entry at the end of each phase, as the guest logs them
/// after its ready line) → each phase's duration in ms, and whether it ran after `ready`.
pub fn phase_durations(line: &str) -> Vec<(String, f64, bool)> {
    let Some(list) = line.split("boot phases (us from entry): ").nth(1) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    let (mut last, mut after) = (0u64, false);
    for item in list.trim().split(',') {
        let Some((name, us)) = item.split_once(':') else {
            continue;
        };
        let Ok(us) = us.trim().parse::<u64>() else {
            continue;
        };
        out.push((
            name.to_string(),
            us.saturating_sub(last) as f64 / 1000.0,
            after,
        ));
        if name == "ready" {
            after = true;
        }
        last = us;
    }
    out
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
    let mut floor = Vec::new();
    let mut phase_names: Vec<(String, bool)> = Vec::new();
    let mut phase_ms: Vec<Vec<f64>> = Vec::new();
    fs::create_dir_all(&run_dir).context("creating the bench's run directory")?;
    let floor_path = run_dir.join("floor-pvh.elf");
    fs::write(&floor_path, floor_kernel()).context("writing the empty PVH kernel")?;
    for i in 0..args.boots {
        // QEMU's floor first, then ours: interleaved, so load on the host hits both alike.
        let mut fopts = VmOptions::new(
            &format!("bench-floor-{i}"),
            run_dir.clone(),
            args.machine,
            accel.accel,
        );
        fopts.memory_mib = args.memory;
        if let Ok(d) = floor_boot(&img, &floor_path, &fopts) {
            floor.push(d.as_secs_f64() * 1000.0);
        }
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
        if let Some(line) = ready
            .vm
            .serial()
            .lines()
            .find(|l| l.contains("boot phases (us from entry): "))
        {
            for (name, ms, after) in phase_durations(line) {
                let k = match phase_names.iter().position(|(n, _)| *n == name) {
                    Some(k) => k,
                    None => {
                        phase_names.push((name, after));
                        phase_ms.push(Vec::new());
                        phase_names.len() - 1
                    }
                };
                phase_ms[k].push(ms);
            }
        }
    }
    let phases = phase_names
        .into_iter()
        .zip(phase_ms)
        .filter_map(|((name, after_ready), v)| {
            Stats::of(v).map(|ms| PhaseStats {
                name,
                ms,
                after_ready,
            })
        })
        .collect();
    let launch_stats = Stats::of(launch.clone());
    let floor_stats = Stats::of(floor);
    let launch_over_floor = match (launch_stats, floor_stats) {
        (Some(l), Some(f)) if f.p50 > 0.0 => l.p50 / f.p50,
        _ => f64::NAN,
    };
    let ram_probes = smallest_memory(&img, args, accel.accel, &run_dir);
    let min_boot_memory_mib = ram_probes
        .iter()
        .filter(|(_, booted)| *booted)
        .map(|(m, _)| *m)
        .min();

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
    let rtt_us = Stats::of(rtts.iter().map(|d| d.as_secs_f64() * 1e6).collect());

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
        boots: args.boots,
        launch_to_ready_ms: launch_stats,
        floor_launch_to_line_ms: floor_stats,
        launch_over_floor,
        phases,
        entry_to_ready_ms: Stats::of(entry),
        min_boot_memory_mib,
        ram_probes,
        heap_high_water_bytes: final_report
            .require("heap_high_water")?
            .max(report.require("heap_high_water")?),
        heap_size_bytes: report.require("heap_size")?,
        rss_kib,
        pss_kib,
        idle_cpu_percent,
        idle_secs: args.idle_secs,
        idle_wakeups_per_s: after_report
            .require("wakeups")?
            .saturating_sub(before_report.require("wakeups")?) as f64
            / idle_wall.max(1e-9),
        idle_wake_causes: {
            let mut v: Vec<(String, u64)> = after_report
                .fields
                .keys()
                .filter_map(|k| {
                    let name = k.strip_prefix("sleeps_until_")?;
                    let d = after_report.num(k).saturating_sub(before_report.num(k));
                    (d > 0).then(|| (name.to_string(), d))
                })
                .collect();
            v.sort_by_key(|c| std::cmp::Reverse(c.1));
            v
        },
        idle_timer_irqs: after_report
            .require("irq_timer")?
            .saturating_sub(before_report.require("irq_timer")?),
        rtt_us,
        rtt_sent: args.rtt_probes,
        rtt_lost: lost,
        linux_baseline: None,
    })
}

/// Whether a guest with `memory_mib` of RAM boots: it prints its ready line and its diagnostic
/// port answers (then it is shut down). A guest that fails (no memory, a panic) or hangs until
/// the launcher's deadline did not boot.
fn boots_with(
    img: &image::Image,
    memory_mib: u32,
    machine: Machine,
    accel: hostinfo::Accel,
    run_dir: &std::path::Path,
) -> bool {
    let mut opts = VmOptions::new(
        &format!("bench-ram-{memory_mib}"),
        run_dir.to_path_buf(),
        machine,
        accel,
    );
    opts.memory_mib = memory_mib;
    let Ok(mut live) = vm::launch_ready(img, &opts) else {
        return false;
    };
    let answered = diag::query_udp(live.ports.diag_udp_addr(), Duration::from_secs(5)).is_ok();
    let _ = diag::tcp_command(
        live.ports.diag_tcp_addr(),
        live.operator_key().as_ref(),
        "shutdown",
        Duration::from_secs(5),
    );
    if live.vm.wait_exit(Duration::from_secs(10)).is_err() {
        live.vm.kill();
    }
    answered
}

/// Bisects the smallest guest RAM (whole MiB, between 1 and `args.memory`) that boots, in at
/// most `args.ram_probes` boots. Returns every probe as `(MiB, booted)`.
fn smallest_memory(
    img: &image::Image,
    args: &BootBenchArgs,
    accel: hostinfo::Accel,
    run_dir: &std::path::Path,
) -> Vec<(u32, bool)> {
    bisect_smallest(args.memory, args.ram_probes, |m| {
        boots_with(img, m, args.machine, accel, run_dir)
    })
}

/// The bisection behind [`smallest_memory`]: `hi` is probed first (a run whose own setting does
/// not boot finds nothing), then the range `[1, hi]` is halved while probes remain.
fn bisect_smallest(hi: u32, probes: u32, mut boots: impl FnMut(u32) -> bool) -> Vec<(u32, bool)> {
    let mut out = Vec::new();
    if probes == 0 || hi == 0 {
        return out;
    }
    let ok = boots(hi);
    out.push((hi, ok));
    if !ok {
        return out;
    }
    // Invariant: `good` boots; everything below `bad + 1` is not known to boot.
    let (mut bad, mut good) = (0u32, hi);
    while good - bad > 1 && (out.len() as u32) < probes {
        let mid = bad + (good - bad) / 2;
        let ok = boots(mid);
        out.push((mid, ok));
        if ok {
            good = mid;
        } else {
            bad = mid;
        }
    }
    out
}

/// The guest RAM target (MiB): the smallest RAM that boots, and the heap's high-water.
pub const RAM_TARGET_MIB: u32 = 16;

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
        // A ratio needs both series: an empty one (theirs or ours) gives NaN, which no target
        // accepts.
        let ratio = |ours: Option<f64>, theirs: &Stats, f: fn(&Stats) -> f64| match ours {
            Some(o) if theirs.n > 0 && f(theirs) > 0.0 => o / f(theirs),
            _ => f64::NAN,
        };
        r.linux_baseline = Some(LinuxComparison {
            launch_ratio_p50: ratio(
                r.launch_to_ready_ms.map(|s| s.p50),
                &linux.launch_to_user_ms,
                |s| s.p50,
            ),
            rtt_ratio_p50: ratio(r.rtt_us.map(|s| s.p50), &linux.rtt_us, |s| s.p50),
            rtt_ratio_p99: ratio(r.rtt_us.map(|s| s.p99), &linux.rtt_us, |s| s.p99),
            linux,
        });
    }
    if let Some(path) = &args.plot {
        crate::bench::plot::write_svg(path, &panels(&r))?;
        eprintln!("bench boot: plot written to {}", path.display());
    }
    let mut unmeasured = Unmeasured::default();
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
        for (row, series) in [
            ("launch -> ready", r.launch_to_ready_ms.is_some()),
            ("entry -> ready", r.entry_to_ready_ms.is_some()),
            ("QEMU floor", r.floor_launch_to_line_ms.is_some()),
            ("smallest RAM that boots", r.min_boot_memory_mib.is_some()),
            ("echo RTT", r.rtt_us.is_some()),
        ] {
            unmeasured.note(row, Verdict::of(series.then_some(0.0), |_| true));
        }
        return unmeasured.check();
    }
    println!(
        "unipeer bench boot — {} on {} ({}), {} boots, image {}",
        r.machine, r.accel, r.accel_reason, args.boots, args.image
    );
    println!(
        "{:<40} {:>14} {:>18} {:>10} {:>20}",
        "metric", "p50", "p99/max", "target", "verdict"
    );
    let mut row = |name: &str, p50: String, p99: String, target: &str, v: Option<Verdict>| {
        println!(
            "{:<40} {:>14} {:>18} {:>10} {:>20}",
            name,
            p50,
            p99,
            target,
            v.map(|v| v.to_string()).unwrap_or_default()
        );
        if let Some(v) = v {
            unmeasured.note(name, v);
        }
    };
    let ms = |v: f64| format!("{v:.1}");
    let l = r.launch_to_ready_ms;
    row(
        "QEMU launch -> ready (ms)",
        cell(l.map(|s| s.p50), ms),
        cell(l.map(|s| s.max), ms),
        "<= 60",
        Some(Verdict::of(l.map(|s| s.p50), |v| v <= 60.0)),
    );
    let f = r.floor_launch_to_line_ms;
    row(
        "QEMU floor: empty PVH kernel launch -> line",
        cell(f.map(|s| s.p50), ms),
        cell(f.map(|s| s.max), ms),
        "",
        Some(Verdict::of(f.map(|s| s.p50), |_| true)),
    );
    row(
        "launch -> ready / QEMU floor (p50 ratio)",
        cell(Some(r.launch_over_floor).filter(|v| v.is_finite()), |v| {
            format!("{v:.2}")
        }),
        String::new(),
        &format!("<= {FLOOR_RATIO_TARGET}"),
        Some(Verdict::of(
            Some(r.launch_over_floor).filter(|v| v.is_finite()),
            |v| v <= FLOOR_RATIO_TARGET,
        )),
    );
    let entry_target = if r.accel == "tcg" { 5.0 } else { 1.0 };
    let e = r.entry_to_ready_ms;
    let ms2 = |v: f64| format!("{v:.2}");
    row(
        &format!(
            "guest entry -> network ready (ms), {}/{}",
            e.map_or(0, |s| s.n),
            r.boots
        ),
        cell(e.map(|s| s.p50), ms2),
        cell(e.map(|s| s.max), ms2),
        &format!("<= {entry_target}"),
        Some(Verdict::of(e.map(|s| s.p50), |v| v <= entry_target)),
    );
    for p in &r.phases {
        let label = format!(
            "  phase {}{} (ms)",
            p.name,
            if p.after_ready { ", after ready" } else { "" }
        );
        println!(
            "{:<40} {:>14} {:>18}",
            label,
            format!("{:.3}", p.ms.p50),
            format!("{:.3}", p.ms.max)
        );
    }
    row(
        "image size (KiB)",
        format!("{:.1}", r.image_bytes as f64 / 1024.0),
        String::new(),
        "<= 1024",
        Some(Verdict::of(Some(r.image_bytes as f64), |v| {
            v <= 1024.0 * 1024.0
        })),
    );
    let probes: Vec<String> = r
        .ram_probes
        .iter()
        .map(|(m, ok)| format!("{m}{}", if *ok { "+" } else { "-" }))
        .collect();
    row(
        "smallest guest RAM that boots (MiB)",
        cell(r.min_boot_memory_mib.map(f64::from), |v| format!("{v:.0}")),
        format!("probes {}", probes.join(" ")),
        &format!("<= {RAM_TARGET_MIB}"),
        Some(Verdict::of(r.min_boot_memory_mib.map(f64::from), |v| {
            v <= f64::from(RAM_TARGET_MIB)
        })),
    );
    row(
        "heap high-water (KiB)",
        format!("{:.1}", r.heap_high_water_bytes as f64 / 1024.0),
        format!(
            "of {:.0} ({} MiB)",
            r.heap_size_bytes as f64 / 1024.0,
            r.memory_mib
        ),
        &format!("<= {RAM_TARGET_MIB} MiB"),
        Some(Verdict::of(Some(r.heap_high_water_bytes as f64), |v| {
            v <= f64::from(RAM_TARGET_MIB) * 1024.0 * 1024.0
        })),
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
        Some(Verdict::of(Some(r.idle_cpu_percent), |v| v <= 0.1)),
    );
    let causes: Vec<String> = r
        .idle_wake_causes
        .iter()
        .map(|(n, c)| format!("{n}:{c}"))
        .collect();
    row(
        "idle wake-ups per second",
        format!("{:.2}", r.idle_wakeups_per_s),
        if causes.is_empty() {
            "no cause in the report".to_string()
        } else {
            causes.join(" ")
        },
        "",
        None,
    );
    let us = |v: f64| format!("{v:.0}");
    row(
        &format!(
            "host<->VM UDP echo RTT (us), {}/{} lost",
            r.rtt_lost, r.rtt_sent
        ),
        cell(r.rtt_us.map(|s| s.p50), us),
        cell(r.rtt_us.map(|s| s.p99), us),
        "answers",
        Some(Verdict::of(r.rtt_us.map(|s| s.p50), |_| true)),
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
        let some = |s: &Stats, v: f64| (s.n > 0).then_some(v);
        row(
            &format!("Linux launch -> user space (ms) [{}]", l.machine),
            cell(some(&l.launch_to_user_ms, l.launch_to_user_ms.p50), us),
            cell(some(&l.launch_to_user_ms, l.launch_to_user_ms.max), us),
            "",
            None,
        );
        row(
            &format!("Linux launch -> echo listening (ms) [{}]", l.machine),
            cell(some(&l.launch_to_echo_ms, l.launch_to_echo_ms.p50), us),
            cell(some(&l.launch_to_echo_ms, l.launch_to_echo_ms.max), us),
            "",
            None,
        );
        row(
            "ours launch->ready / Linux launch->user",
            format!("{:.4}", c.launch_ratio_p50),
            String::new(),
            "",
            None,
        );
        row(
            &format!("Linux UDP echo RTT (us), {} lost", l.rtt_lost),
            cell(some(&l.rtt_us, l.rtt_us.p50), us),
            cell(some(&l.rtt_us, l.rtt_us.p99), us),
            "",
            None,
        );
        row(
            "ours / Linux echo RTT (ratio)",
            format!("{:.2}", c.rtt_ratio_p50),
            format!("{:.2}", c.rtt_ratio_p99),
            "<= 0.5",
            Some(Verdict::of(Some(c.rtt_ratio_p50), |v| v <= 0.5)),
        );
    }
    unmeasured.check()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_floor_kernel_is_a_pvh_elf() {
        let k = floor_kernel();
        assert_eq!(&k[..4], b"\x7fELF");
        assert_eq!(k[4], 2, "ELF64");
        let entry = u64::from_le_bytes(k[24..32].try_into().unwrap());
        // The note after the two program headers: type 18, "Xen", the entry as a quad.
        let note = &k[176..200];
        assert_eq!(u32::from_le_bytes(note[8..12].try_into().unwrap()), 18);
        assert_eq!(&note[12..16], b"Xen\0");
        assert_eq!(u64::from_le_bytes(note[16..24].try_into().unwrap()), entry);
        // The code's message address points at the marker inside the loaded segment.
        let off = (entry - 0x10_0000) as usize;
        let msg = u32::from_le_bytes(k[off + 5..off + 9].try_into().unwrap()) as usize - 0x10_0000;
        assert!(k[msg..].starts_with(unipeer_node::launch::READY_MARKER.as_bytes()));
        assert_eq!(*k.last().unwrap(), 0);
    }

    #[test]
    fn phase_durations_are_differences_and_know_the_ready_line() {
        let p = phase_durations(
            "[info] boot phases (us from entry): cpu:100,tsc:900,diag:1500,ready:1600,overlay:4600",
        );
        let names: Vec<&str> = p.iter().map(|(n, _, _)| n.as_str()).collect();
        assert_eq!(names, ["cpu", "tsc", "diag", "ready", "overlay"]);
        assert_eq!(p[1].1, 0.8);
        assert!(!p[3].2 && p[4].2, "only what follows `ready` ran after it");
        assert_eq!(p[4].1, 3.0);
        assert!(phase_durations("no phases here").is_empty());
    }

    #[test]
    fn the_plot_draws_ours_and_marks_a_missing_linux_baseline() {
        let r = BootBenchResult {
            accel: "tcg".into(),
            accel_reason: String::new(),
            machine: "microvm".into(),
            image_bytes: 1,
            memory_mib: 16,
            boots: 3,
            launch_to_ready_ms: Stats::of(vec![40.0, 42.0, 55.0]),
            floor_launch_to_line_ms: None,
            launch_over_floor: f64::NAN,
            phases: Vec::new(),
            entry_to_ready_ms: None,
            min_boot_memory_mib: None,
            ram_probes: Vec::new(),
            heap_high_water_bytes: 0,
            heap_size_bytes: 0,
            rss_kib: 0,
            pss_kib: 0,
            idle_cpu_percent: 0.0,
            idle_secs: 1,
            idle_timer_irqs: 0,
            idle_wakeups_per_s: 0.0,
            idle_wake_causes: Vec::new(),
            rtt_us: Stats::of(vec![300.0, 350.0]),
            rtt_sent: 2,
            rtt_lost: 0,
            linux_baseline: None,
        };
        let svg = crate::bench::plot::render_svg(&panels(&r)).unwrap();
        let texts = crate::bench::plot::tests::svg_texts(&svg);
        for want in [
            "Boot: QEMU launch to ready",
            "unipeer launch -> ready",
            "Linux launch -> user space (no samples)",
            "unipeer echo RTT",
            "Linux echo RTT (no samples)",
        ] {
            assert!(texts.iter().any(|t| t == want), "{want} not in {texts:?}");
        }
        assert_eq!(
            crate::bench::plot::tests::svg_polylines(&svg, 4),
            2,
            "{svg}"
        );
    }

    #[test]
    fn an_empty_series_has_no_statistics() {
        assert!(Stats::of(Vec::new()).is_none());
        let s = Stats::of(vec![3.0, 1.0, 2.0]).unwrap();
        assert_eq!((s.min, s.p50, s.max, s.n), (1.0, 2.0, 3.0, 3));
    }

    #[test]
    fn bisection_finds_the_smallest_memory_that_boots_within_its_probes() {
        // Boots from 5 MiB up: 16, 8, 4, 6, 5 (then 4..5 is settled).
        let probes = bisect_smallest(16, 8, |m| m >= 5);
        assert_eq!(
            probes,
            vec![(16, true), (8, true), (4, false), (6, true), (5, true)]
        );
        // Bounded: two probes leave it at the best found so far.
        assert_eq!(
            bisect_smallest(16, 2, |m| m >= 5),
            vec![(16, true), (8, true)]
        );
        // The run's own setting does not boot: nothing found, nothing more tried.
        assert_eq!(bisect_smallest(16, 8, |_| false), vec![(16, false)]);
        assert!(bisect_smallest(16, 0, |_| true).is_empty());
    }
}
