//! The local xAPIC: one-shot timer, EOI, spurious vector. No periodic tick: the event loop arms
//! the timer for its next deadline before halting.

use core::sync::atomic::{AtomicU64, Ordering};

use super::idt::{VECTOR_SPURIOUS, VECTOR_TIMER};

const BASE: usize = 0xfee0_0000;
const REG_TPR: usize = 0x80;
const REG_EOI: usize = 0xb0;
const REG_SVR: usize = 0xf0;
const REG_LVT_TIMER: usize = 0x320;
const REG_LVT_LINT0: usize = 0x350;
const REG_LVT_LINT1: usize = 0x360;
const REG_LVT_ERROR: usize = 0x370;
const REG_TIMER_INIT: usize = 0x380;
const REG_TIMER_CURRENT: usize = 0x390;
const REG_TIMER_DIVIDE: usize = 0x3e0;
const LVT_MASKED: u32 = 1 << 16;
const DIVIDE_BY_16: u32 = 0b0011;

/// Timer ticks per millisecond at divide-by-16, measured at boot.
static TICKS_PER_MS: AtomicU64 = AtomicU64::new(0);

fn write(reg: usize, value: u32) {
    // SAFETY: BASE is the xAPIC register page, identity-mapped uncached by the boot page tables;
    // `reg` is one of the register offsets above.
    unsafe { ((BASE + reg) as *mut u32).write_volatile(value) }
}

fn read(reg: usize) -> u32 {
    // SAFETY: as for `write`.
    unsafe { ((BASE + reg) as *const u32).read_volatile() }
}

/// Software-enables the local APIC with LINT0 masked, LINT1 as NMI, errors masked and the
/// timer masked in one-shot mode.
pub fn init() {
    write(REG_TPR, 0);
    write(REG_LVT_LINT0, LVT_MASKED);
    write(REG_LVT_LINT1, 0x400); // NMI delivery
    write(REG_LVT_ERROR, LVT_MASKED);
    write(REG_TIMER_DIVIDE, DIVIDE_BY_16);
    write(REG_LVT_TIMER, LVT_MASKED | VECTOR_TIMER as u32);
    write(REG_SVR, 0x100 | VECTOR_SPURIOUS as u32);
}

/// Measures the timer's rate against the (already calibrated) TSC over `window_tsc` cycles.
/// Returns ticks per millisecond.
pub fn calibrate(tsc_khz: u64, window_tsc: u64) -> u64 {
    write(REG_LVT_TIMER, LVT_MASKED | VECTOR_TIMER as u32);
    write(REG_TIMER_INIT, u32::MAX);
    let start = super::cpu::rdtsc();
    let c0 = read(REG_TIMER_CURRENT);
    while super::cpu::rdtsc().wrapping_sub(start) < window_tsc {}
    let c1 = read(REG_TIMER_CURRENT);
    let elapsed_tsc = super::cpu::rdtsc().wrapping_sub(start);
    write(REG_TIMER_INIT, 0);
    let ticks = u64::from(c0.wrapping_sub(c1));
    let per_ms = ticks * tsc_khz / elapsed_tsc.max(1);
    TICKS_PER_MS.store(per_ms.max(1), Ordering::Relaxed);
    per_ms
}

/// Arms the one-shot timer to fire after `delay_us` (clamped to the counter's range; a longer
/// wait simply wakes early and re-arms).
pub fn arm_oneshot_us(delay_us: u64) {
    let per_ms = TICKS_PER_MS.load(Ordering::Relaxed);
    let ticks = (delay_us.saturating_mul(per_ms) / 1000).clamp(1, u64::from(u32::MAX));
    write(REG_LVT_TIMER, VECTOR_TIMER as u32);
    write(REG_TIMER_INIT, ticks as u32);
}

/// Signals end of interrupt.
pub fn eoi() {
    write(REG_EOI, 0);
}
