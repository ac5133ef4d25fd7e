//! The unipeer node agent as a bare-metal unikernel.
//!
//! Boot: PVH entry (`arch::x86_64::boot`) → `kernel_main`: console, traps, interrupt
//! controllers, launch config, heap, clock, NIC, network stack, then the event loop, which
//! sleeps in `hlt` until the NIC or the one-shot timer wakes it.
#![no_std]
#![no_main]

extern crate alloc;

#[path = "arch/x86_64/mod.rs"]
mod arch;
mod client;
mod clock;
mod console;
mod diag;
mod event_loop;
mod heap;
mod jobs;
mod net;
mod overlay;
mod pvh;
mod replication;
mod service;

use unipeer_node::launch::{GuestExit, LaunchConfig};

use arch::{apic, cpu, idt, ioapic, pit};

/// Boot-time facts kept for the diagnostic report.
pub struct BootFacts {
    pub apic_ticks_per_ms: u64,
    pub simd: &'static str,
    pub heap_bytes: u64,
    pub ram_bytes: u64,
    pub transport: &'static str,
    /// TSC at the moment the network was ready.
    pub ready_tsc: u64,
    pub calibration: clock::Calibration,
    /// TSC at the end of each boot phase, for the report; those after `ready` ran after the
    /// ready line (services whose construction can wait for it).
    pub phases: heapless::Vec<(&'static str, u64), MAX_BOOT_PHASES>,
}

/// Boot phases recorded at most.
pub const MAX_BOOT_PHASES: usize = 16;

#[unsafe(no_mangle)]
extern "C" fn kernel_main(start_info: u32) -> ! {
    let mut phases = heapless::Vec::<(&'static str, u64), MAX_BOOT_PHASES>::new();
    console::init(log::LevelFilter::Info);
    idt::init();
    let simd = cpu::enable_simd();
    pit::disable_8259();
    ioapic::mask_all();
    apic::init();
    let _ = phases.push(("cpu", cpu::rdtsc()));

    let boot = match pvh::parse(start_info) {
        Ok(b) => b,
        Err(e) => {
            log::error!("boot: unreadable PVH start info: {e:?}");
            arch::exit(GuestExit::BadConfig);
        }
    };
    let Some(blob) = boot.config else {
        log::error!("boot: no launch config (expected as the first PVH module, -initrd)");
        arch::exit(GuestExit::BadConfig);
    };

    let _ = phases.push(("pvh", cpu::rdtsc()));
    let Some((heap_start, heap_end)) = boot.heap_range() else {
        log::error!("boot: no RAM for the heap");
        arch::exit(GuestExit::NoMemory);
    };
    // SAFETY: `heap_range` excludes the kernel image, the config module and the MMIO hole;
    // nothing else uses that RAM.
    unsafe { heap::init(heap_start as usize, (heap_end - heap_start) as usize) };

    let _ = phases.push(("heap", cpu::rdtsc()));
    let config = match LaunchConfig::decode(blob) {
        Ok(c) => c,
        Err(e) => {
            log::error!("boot: {e}");
            arch::exit(GuestExit::BadConfig);
        }
    };
    log::set_max_level(config.log_level.to_filter());
    let _ = phases.push(("config", cpu::rdtsc()));

    let calibration = match clock::calibrate(config.tsc_khz_hint) {
        Ok(c) => c,
        Err(e) => {
            log::error!("boot: cannot calibrate the TSC: {e:?}");
            arch::exit(GuestExit::NoClock);
        }
    };
    let _ = phases.push(("tsc", cpu::rdtsc()));
    // 0.2 ms of TSC to measure the APIC timer against (~12,500 ticks under TCG: 0.01%).
    let apic_ticks_per_ms = apic::calibrate(calibration.tsc_khz, calibration.tsc_khz / 5);
    let _ = phases.push(("apic", cpu::rdtsc()));
    let ram_bytes: u64 = boot.ram.iter().map(|(s, e)| e - s).sum();
    let facts = BootFacts {
        apic_ticks_per_ms,
        simd,
        heap_bytes: heap_end - heap_start,
        ram_bytes,
        transport: "",
        ready_tsc: 0,
        phases,
        calibration,
    };
    event_loop::run(config, boot.cmdline, facts)
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    cpu::cli();
    console::emergency(format_args!("\nPANIC: {info}\n"));
    arch::exit(GuestExit::Panic)
}
