//! The anti-replay sliding window over 64-bit sequence numbers (RFC 6479's idea, one 128-bit
//! word): a sequence number is fresh if newer than any seen, or within the window and unseen.

/// Sequence numbers older than the newest by this much are refused as reordered too far.
pub const REPLAY_WINDOW: u64 = 128;

/// Why a sequence number was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReplayError {
    /// Already received.
    Replayed,
    /// Older than the window.
    TooOld,
}

/// Received sequence numbers. Sequence numbers start at 1; 0 is never valid.
#[derive(Clone, Copy, Debug, Default)]
pub struct ReplayWindow {
    top: u64,
    /// Bit `i` set: `top - i` was received.
    seen: u128,
}

impl ReplayWindow {
    /// Whether `seq` may be accepted; does not record it (call [`Self::record`] once the
    /// datagram authenticated, so forgeries cannot move the window).
    pub fn check(&self, seq: u64) -> Result<(), ReplayError> {
        if seq == 0 {
            return Err(ReplayError::Replayed);
        }
        if seq > self.top {
            return Ok(());
        }
        let back = self.top - seq;
        if back >= REPLAY_WINDOW {
            return Err(ReplayError::TooOld);
        }
        if self.seen & (1u128 << back) != 0 {
            return Err(ReplayError::Replayed);
        }
        Ok(())
    }

    /// Records an accepted `seq` (after [`Self::check`] passed).
    pub fn record(&mut self, seq: u64) {
        if seq > self.top {
            let shift = seq - self.top;
            self.seen = if shift >= REPLAY_WINDOW {
                0
            } else {
                self.seen << shift
            };
            self.seen |= 1;
            self.top = seq;
        } else {
            self.seen |= 1u128 << (self.top - seq);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn window_accepts_fresh_and_refuses_replays_and_stale() {
        let mut w = ReplayWindow::default();
        assert_eq!(w.check(0), Err(ReplayError::Replayed));
        for s in [1, 3, 2, 10] {
            w.check(s).unwrap();
            w.record(s);
        }
        assert_eq!(w.check(3), Err(ReplayError::Replayed));
        assert_eq!(w.check(10), Err(ReplayError::Replayed));
        w.check(4).unwrap();
        w.record(200);
        assert_eq!(w.check(200 - REPLAY_WINDOW), Err(ReplayError::TooOld));
        w.check(200 - REPLAY_WINDOW + 1).unwrap();
        assert_eq!(w.check(10), Err(ReplayError::TooOld));
        w.record(1000);
        w.check(999).unwrap();
        assert_eq!(w.check(1000), Err(ReplayError::Replayed));
    }
}
