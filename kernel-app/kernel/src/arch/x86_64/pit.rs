//! The 8254 PIT, used only to calibrate the TSC at boot, then stopped; and the 8259 PICs,
//! remapped out of the exception range and masked.

use super::cpu::rdtsc;
use super::port::{inb, outb};

/// PIT input clock in Hz.
pub const PIT_HZ: u64 = 1_193_182;

const CH0: u16 = 0x40;
const CMD: u16 = 0x43;

fn read_count() -> u16 {
    outb(CMD, 0x00); // latch channel 0
    let lo = inb(CH0);
    let hi = inb(CH0);
    u16::from_le_bytes([lo, hi])
}

/// Counts TSC cycles over `pit_ticks` PIT ticks (at most 60,000, about 50 ms). Returns
/// `(tsc_cycles, pit_ticks_elapsed)`, or `None` if the PIT does not count (absent or stuck).
pub fn measure_tsc(pit_ticks: u64) -> Option<(u64, u64)> {
    let pit_ticks = pit_ticks.min(60_000);
    // Mode 2 (rate generator), lobyte/hibyte, full 16-bit period.
    outb(CMD, 0x34);
    outb(CH0, 0xff);
    outb(CH0, 0xff);
    // Wait for the counter to move so we start on a tick edge (bounded).
    let first = read_count();
    let mut start = first;
    let mut spins = 0u32;
    while start == first {
        start = read_count();
        spins += 1;
        if spins > 1_000_000 {
            return None;
        }
    }
    let tsc0 = rdtsc();
    let mut elapsed: u64 = 0;
    let mut last = start;
    spins = 0;
    while elapsed < pit_ticks {
        let now = read_count();
        // The counter counts down and reloads at 0xffff; wrapping subtraction handles that.
        elapsed += u64::from(last.wrapping_sub(now));
        last = now;
        spins += 1;
        if spins > 50_000_000 {
            return None;
        }
    }
    let tsc1 = rdtsc();
    Some((tsc1.wrapping_sub(tsc0), elapsed))
}

/// Stops channel 0 (one-shot mode with count 1 fires once and stays idle), so a periodic PIT
/// does not cost host CPU.
pub fn stop() {
    outb(CMD, 0x30);
    outb(CH0, 1);
    outb(CH0, 0);
}

/// Remaps the 8259 PICs to vectors 0x28..0x38 and masks every line (the IOAPIC is used).
pub fn disable_8259() {
    outb(0x20, 0x11);
    outb(0xa0, 0x11);
    outb(0x21, 0x28);
    outb(0xa1, 0x30);
    outb(0x21, 0x04);
    outb(0xa1, 0x02);
    outb(0x21, 0x01);
    outb(0xa1, 0x01);
    outb(0x21, 0xff);
    outb(0xa1, 0xff);
}
