//! The event loop: poll the stack and the set of services (`service::ServiceSet`), then sleep
//! in `hlt` until the NIC's interrupt or the one-shot timer armed for the earliest deadline.
//! No periodic tick. The services are built here in boot order and added to the set in the
//! order they are polled; a new service is one `set.add(..)` line.

use unipeer_node::launch::{GuestExit, LaunchConfig, READY_MARKER};

use alloc::boxed::Box;

use crate::arch::{self, apic, cpu};
use crate::client::ClientPort;
use crate::diag::Diag;
use crate::jobs::JobHost;
use crate::net::Stack;
use crate::net::virtio::Nic;
use crate::overlay::Overlay;
use crate::replication::ReplicationHost;
use crate::service::{NodeInfo, ServiceSet};
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
    let _ = facts.phases.push(("stack", cpu::rdtsc()));
    let diag = Diag::new(&mut stack, &config);
    facts.ready_tsc = cpu::rdtsc();
    let _ = facts.phases.push(("diag", facts.ready_tsc));
    // Ready: the NIC, the stack (echo) and the diagnostic ports are up. The ready line goes
    // out now; the overlay, the job host and the client port are built right after it, before
    // the first poll, so a frame that arrives meanwhile waits in the NIC's ring (issue 14:
    // entry → ready).
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
    let _ = facts.phases.push(("ready", cpu::rdtsc()));
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
    let _ = facts.phases.push(("overlay", cpu::rdtsc()));
    // The job host (agent, job channel) and the client port run wherever the overlay does.
    let jobs = overlay.as_mut().map(|o| {
        let host = JobHost::new(
            &config,
            &mut stack,
            o,
            facts.heap_bytes,
            &entropy,
            clock::now_us(),
        );
        let client = ClientPort::new(&mut stack, &config, o, &entropy);
        let repl = ReplicationHost::new(
            &config,
            &mut stack,
            o,
            facts.heap_bytes,
            &entropy,
            clock::now_us(),
        );
        (host, client, repl)
    });
    // Polled in this order (each pass's events are handed out after the polls).
    let mut set = ServiceSet::new();
    if let Some(o) = overlay {
        set.add(Box::new(o));
    }
    set.add(Box::new(diag));
    if let Some((host, client, repl)) = jobs {
        set.add(Box::new(host));
        set.add(Box::new(client));
        set.add(Box::new(repl));
    }
    let _ = facts.phases.push(("jobs", cpu::rdtsc()));
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
    log::info!(
        "boot phases (us from entry): {}",
        crate::diag::PhaseList(&facts)
    );
    set.log_summaries();
    if config.extra("exit_after_ready").is_some() {
        log::info!("exit_after_ready set: leaving");
        arch::exit(GuestExit::Success);
    }

    let info = NodeInfo {
        facts: &facts,
        config: &config,
    };
    let mut shutdown_at: Option<u64> = None;
    // Consecutive passes that did not sleep; a long run means a deadline that keeps being due
    // (e.g. a frame smoltcp cannot send yet), and then the loop naps instead of spinning.
    let mut busy_streak = 0u32;
    loop {
        let now = clock::now_us();
        stack.poll(now);
        set.poll(now, &mut stack, info);
        // Replies queued by the services go out in the same wake-up.
        stack.poll(now);

        if set.shutdown_requested() {
            let since = *shutdown_at.get_or_insert(now);
            if set.flushed(&stack) || now - since > SHUTDOWN_FLUSH_US {
                log::info!("shutting down");
                arch::exit(GuestExit::Success);
            }
        }

        // Sleep until the earliest deadline, unless work is already waiting.
        if stack.phy.nic.rx_pending() && busy_streak < BUSY_STREAK_MAX {
            set.counters.busy_polls += 1;
            busy_streak += 1;
            continue;
        }
        let now = clock::now_us();
        let mut delay = stack.poll_delay_us(now).unwrap_or(MAX_SLEEP_US);
        // Who set the deadline (counted per sleep, by name, for the report); 0 is the stack.
        let mut cause = 0;
        if let Some((at, by)) = set.next_deadline_us(now, &stack)
            && at.saturating_sub(now) < delay
        {
            delay = at.saturating_sub(now);
            cause = by;
        }
        if delay < MAX_SLEEP_US {
            set.counters.sleeps_until[cause].1 += 1;
        }
        if shutdown_at.is_some() {
            delay = delay.min(1_000);
        }
        if delay == 0 && busy_streak < BUSY_STREAK_MAX {
            set.counters.busy_polls += 1;
            busy_streak += 1;
            continue;
        }
        if busy_streak >= BUSY_STREAK_MAX {
            set.counters.busy_naps += 1;
        }
        busy_streak = 0;
        apic::arm_oneshot_us(delay.clamp(BUSY_NAP_US, MAX_SLEEP_US));
        cpu::wait_for_interrupt();
        set.counters.wakeups += 1;
    }
}
