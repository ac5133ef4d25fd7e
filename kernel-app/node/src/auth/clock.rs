//! Wall-clock time for expiry checks: the host's Unix time at launch (from the launch config)
//! plus the monotonic time elapsed since, so a node never reads a real-time clock.

use crate::time::Instant;

/// Maps the core's monotonic [`Instant`] to Unix milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WallClock {
    /// Unix milliseconds at `origin`.
    pub launch_unix_ms: u64,
    /// The monotonic instant that corresponds to `launch_unix_ms` (usually the boot instant).
    pub origin: Instant,
}

impl WallClock {
    pub const fn new(launch_unix_ms: u64, origin: Instant) -> Self {
        WallClock {
            launch_unix_ms,
            origin,
        }
    }

    /// Unix milliseconds at `now`.
    pub fn unix_ms(&self, now: Instant) -> u64 {
        self.launch_unix_ms
            .saturating_add(now.millis_since(self.origin))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advances_with_monotonic_time() {
        let c = WallClock::new(1_000_000, Instant::from_millis(50));
        assert_eq!(c.unix_ms(Instant::from_millis(50)), 1_000_000);
        assert_eq!(c.unix_ms(Instant::from_millis(1_050)), 1_001_000);
        // Earlier than the origin never goes back in time.
        assert_eq!(c.unix_ms(Instant::ZERO), 1_000_000);
    }
}
