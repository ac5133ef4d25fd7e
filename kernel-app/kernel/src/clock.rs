//! The monotonic clock: the TSC at a calibrated frequency, counted from kernel entry.
//!
//! The host passes its measured TSC frequency in the launch config; the guest checks it against
//! a short PIT window and falls back to a full PIT calibration when they disagree (or there is
//! no hint). A frequency is never assumed.

use core::sync::atomic::{AtomicU64, Ordering};

use crate::arch::{boot, cpu, pit};

static TSC_KHZ: AtomicU64 = AtomicU64::new(0);

/// How the TSC frequency was settled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ClockSource {
    /// The host's hint, confirmed by a short PIT window.
    HintChecked,
    /// A full PIT calibration (no hint, or the hint disagreed).
    PitCalibrated,
}

/// Outcome of calibration, for the boot log and the diagnostic report.
#[derive(Clone, Copy, Debug)]
pub struct Calibration {
    pub tsc_khz: u64,
    pub source: ClockSource,
    /// Frequency the short check measured (kHz), 0 if none was taken.
    pub checked_khz: u64,
}

/// Why the clock could not be calibrated.
#[derive(Clone, Copy, Debug)]
pub enum ClockError {
    /// The PIT did not count.
    NoPit,
    /// Repeated calibrations disagreed or gave an implausible frequency.
    Unstable,
}

/// TSC value at kernel entry.
pub fn boot_tsc() -> u64 {
    // SAFETY: BOOT_TSC is written once by the entry code before Rust runs and only read after.
    unsafe { core::ptr::addr_of!(boot::BOOT_TSC).read_volatile() }
}

/// The calibrated TSC frequency in kHz (0 before calibration).
pub fn tsc_khz() -> u64 {
    TSC_KHZ.load(Ordering::Relaxed)
}

/// Converts a TSC delta to microseconds.
pub fn tsc_delta_us(delta: u64) -> u64 {
    let khz = tsc_khz();
    if khz == 0 {
        return 0;
    }
    (u128::from(delta) * 1000 / u128::from(khz)) as u64
}

/// Microseconds since kernel entry (0 before calibration).
pub fn now_us() -> u64 {
    tsc_delta_us(cpu::rdtsc().wrapping_sub(boot_tsc()))
}

fn measure_khz(pit_ticks: u64) -> Option<u64> {
    let (tsc, ticks) = pit::measure_tsc(pit_ticks)?;
    Some((u128::from(tsc) * u128::from(pit::PIT_HZ) / u128::from(ticks.max(1)) / 1000) as u64)
}

fn plausible(khz: u64) -> bool {
    (100_000..=20_000_000).contains(&khz)
}

/// Settles the TSC frequency. `hint_khz` 0 means no hint.
pub fn calibrate(hint_khz: u64) -> Result<Calibration, ClockError> {
    // A tiny warm-up pass: the first pass through the loop reads high under TCG.
    measure_khz(120).ok_or(ClockError::NoPit)?;
    let mut checked = 0;
    if hint_khz != 0 && plausible(hint_khz) {
        // 716 PIT ticks = 0.6 ms: one tick is 0.14% of it, the check accepts 1%. Preemption
        // of the VM does not skew it (the emulated PIT and the TSC both follow the host's
        // clock); a window that still disagrees falls back to the full calibration below.
        checked = measure_khz(716).ok_or(ClockError::NoPit)?;
        let diff = checked.abs_diff(hint_khz);
        if diff * 100 <= hint_khz {
            TSC_KHZ.store(hint_khz, Ordering::Relaxed);
            pit::stop();
            return Ok(Calibration {
                tsc_khz: hint_khz,
                source: ClockSource::HintChecked,
                checked_khz: checked,
            });
        }
    }
    for _attempt in 0..4 {
        // Three 10 ms passes; take the median and demand agreement within 0.5%.
        let mut passes = [0u64; 3];
        for p in passes.iter_mut() {
            *p = measure_khz(11_932).ok_or(ClockError::NoPit)?;
        }
        passes.sort_unstable();
        let median = passes[1];
        if plausible(median) && (passes[2] - passes[0]) * 200 <= median {
            TSC_KHZ.store(median, Ordering::Relaxed);
            pit::stop();
            return Ok(Calibration {
                tsc_khz: median,
                source: ClockSource::PitCalibrated,
                checked_khz: checked,
            });
        }
    }
    pit::stop();
    Err(ClockError::Unstable)
}
