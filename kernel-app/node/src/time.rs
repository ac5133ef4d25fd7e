//! The core's own clock type: microseconds since an arbitrary epoch chosen by the driver
//! (the kernel's monotonic clock, or the simulator's virtual time).

use core::fmt;
use core::ops::Add;

/// A point in time, in microseconds. Never read from a clock here: always passed in.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Instant(u64);

impl Instant {
    pub const ZERO: Instant = Instant(0);

    pub const fn from_micros(us: u64) -> Self {
        Instant(us)
    }

    pub const fn from_millis(ms: u64) -> Self {
        Instant(ms.saturating_mul(1000))
    }

    pub const fn as_micros(self) -> u64 {
        self.0
    }

    pub const fn as_millis(self) -> u64 {
        self.0 / 1000
    }

    /// `self + ms` milliseconds, saturating.
    pub const fn plus_ms(self, ms: u64) -> Self {
        Instant(self.0.saturating_add(ms.saturating_mul(1000)))
    }

    /// `self + us` microseconds, saturating.
    pub const fn plus_us(self, us: u64) -> Self {
        Instant(self.0.saturating_add(us))
    }

    /// Microseconds from `earlier` to `self`, zero if `earlier` is later.
    pub const fn micros_since(self, earlier: Instant) -> u64 {
        self.0.saturating_sub(earlier.0)
    }

    /// Milliseconds from `earlier` to `self`, zero if `earlier` is later.
    pub const fn millis_since(self, earlier: Instant) -> u64 {
        self.micros_since(earlier) / 1000
    }
}

impl Add<u64> for Instant {
    type Output = Instant;
    /// Adds microseconds.
    fn add(self, us: u64) -> Instant {
        self.plus_us(us)
    }
}

impl fmt::Debug for Instant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:06}s", self.0 / 1_000_000, self.0 % 1_000_000)
    }
}
