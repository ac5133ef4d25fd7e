//! The event loop: poll the stack and the services, then sleep in `hlt` until the NIC's
//! interrupt or the one-shot timer armed for the earliest deadline. No periodic tick.

use unipeer_node::launch::{GuestExit, LaunchConfig, READY_MARKER};

use crate::arch::{self, apic, cpu};
use crate::diag::{Diag, NodeInfo};
use crate::jobs::JobHost;
use crate::net::Stack;
use crate::net::virtio::Nic;
use crate::overlay::Overlay;
use crate::{BootFacts, clock, console};

/// Longest sleep without a deadline: the timer is re-armed after it (the counter's range is
/// about a minute at the rates seen).
const MAX_SLEEP_US: u64 = 30_000_000;
/// Passes in a row without sleeping before the loop naps for `BUSY_NAP_US`.
const BUSY_STREAK_MAX: u32 = 256;
/// Shortest sleep: also the nap that ends a busy streak.
const BUSY_NAP_US: u64 = 50;
/// Bound on waiting for replies to flush before a requested shutdown.
const SHUTDOWN_FLUSH_US: u64 = 200_000;

pub fn run(config: LaunchConfig, cmdline: &str, mut facts: BootFacts) -> ! {
    let nic = match Nic::bring_up(cmdline) {
        Ok(nic) => nic,
        Err(e) => {
            log::error!("boot: no network device: {e:?}");
            arch::exit(GuestExit::NoNetwork);
        }
    };
    facts.transport = nic.kind;
    let _ = facts.phases.push(("nic", cpu::rdtsc()));
    let mut stack = Stack::new(&config, nic, clock::now_us());
    let mut diag = Diag::new(&mut stack, &config);
    let entropy = cpu::hardware_entropy();
    // `overlay=0` in the launch config leaves the overlay off (VM density measurements).
    let mut overlay = if config.extra("overlay") == Some(&[0]) {
        None
    } else {
        match Overlay::new(&config, &mut stack, clock::now_us(), &entropy) {
            Ok(o) => Some(o),
            Err(e) => {
                log::error!("boot: overlay: {e}");
                arch::exit(GuestExit::BadConfig);
            }
        }
    };
    let _ = facts.phases.push(("services", cpu::rdtsc()));
    // The job host (agent, job channel, client port) runs wherever the overlay does.
    let mut jobs = overlay.as_mut().map(|o| {
        JobHost::new(
            &config,
            &mut stack,
            o,
            facts.heap_bytes,
            &entropy,
            clock::now_us(),
        )
    });
    facts.ready_tsc = cpu::rdtsc();
    let _ = facts.phases.push(("jobs", facts.ready_tsc));
    let entry_to_ready_us = clock::tsc_delta_us(facts.ready_tsc.wrapping_sub(clock::boot_tsc()));
    let ip = config.net.ipv4;
    console::println(format_args!(
        "{READY_MARKER} name={} ip={}.{}.{}.{} diag_udp={} diag_tcp={} echo={} entry_to_ready_us={}",
        config.node_name,
        ip[0],
        ip[1],
        ip[2],
        ip[3],
        config.net.diag_udp_port,
        config.net.diag_tcp_port,
        config.net.echo_port,
        entry_to_ready_us
    ));
    // Details go out after the ready line: the serial port is slow under emulation.
    log::info!(
        "booted {} on {}: tsc {} kHz ({:?}, PIT check {} kHz), apic {} ticks/ms, {}, ram {} KiB, heap {} KiB, nic {} mac {:02x?}",
        config.node_name,
        config.server_id,
        facts.calibration.tsc_khz,
        facts.calibration.source,
        facts.calibration.checked_khz,
        facts.apic_ticks_per_ms,
        facts.simd,
        facts.ram_bytes / 1024,
        facts.heap_bytes / 1024,
        facts.transport,
        stack.phy.nic.mac,
    );
    if let Some(j) = jobs.as_ref() {
        j.log_summary();
    }
    if config.extra("exit_after_ready").is_some() {
        log::info!("exit_after_ready set: leaving");
        arch::exit(GuestExit::Success);
    }

    let mut shutdown_at: Option<u64> = None;
    // Consecutive passes that did not sleep; a long run means a deadline that keeps being due
    // (e.g. a frame smoltcp cannot send yet), and then the loop naps instead of spinning.
    let mut busy_streak = 0u32;
    loop {
        let now = clock::now_us();
        stack.poll(now);
        if let Some(o) = overlay.as_mut() {
            o.service(now, &mut stack, jobs.as_mut());
        }
        diag.service(
            now,
            &mut stack,
            overlay.as_mut(),
            jobs.as_mut(),
            NodeInfo {
                facts: &facts,
                config: &config,
            },
        );
        // After the diagnostic commands, so what they start (a job) goes out in this pass.
        if let (Some(j), Some(o)) = (jobs.as_mut(), overlay.as_mut()) {
            j.service(now, &mut stack, o);
        }
        // Replies queued by the services go out in the same wake-up.
        stack.poll(now);

        if diag.shutdown_requested {
            let since = *shutdown_at.get_or_insert(now);
            if diag.flushed(&stack) || now - since > SHUTDOWN_FLUSH_US {
                log::info!("shutting down");
                arch::exit(GuestExit::Success);
            }
        }

        // Sleep until the earliest deadline, unless work is already waiting.
        if stack.phy.nic.rx_pending() && busy_streak < BUSY_STREAK_MAX {
            diag.counters.busy_polls += 1;
            busy_streak += 1;
            continue;
        }
        let now = clock::now_us();
        let mut delay = stack.poll_delay_us(now).unwrap_or(MAX_SLEEP_US);
        // Which service set the deadline (counted per sleep, for the report).
        let mut cause = 0;
        let overlay_at = overlay.as_ref().and_then(Overlay::next_deadline_us);
        let jobs_at = jobs.as_ref().and_then(|j| j.next_deadline_us(now));
        for (i, at) in [diag.next_deadline_us(&stack), overlay_at, jobs_at]
            .into_iter()
            .enumerate()
        {
            if let Some(at) = at
                && at.saturating_sub(now) < delay
            {
                delay = at.saturating_sub(now);
                cause = i + 1;
            }
        }
        if delay < MAX_SLEEP_US {
            diag.counters.sleeps_until[cause] += 1;
        }
        if shutdown_at.is_some() {
            delay = delay.min(1_000);
        }
        if delay == 0 && busy_streak < BUSY_STREAK_MAX {
            diag.counters.busy_polls += 1;
            busy_streak += 1;
            continue;
        }
        if busy_streak >= BUSY_STREAK_MAX {
            diag.counters.busy_naps += 1;
        }
        busy_streak = 0;
        apic::arm_oneshot_us(delay.clamp(BUSY_NAP_US, MAX_SLEEP_US));
        cpu::wait_for_interrupt();
        diag.counters.wakeups += 1;
    }
}
