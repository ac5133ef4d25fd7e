//! The faults injected into a cluster, as a bounded log of events with the time each started
//! and healed: the switch records the network's (cuts, partitions, loss, delays), the cluster
//! daemon the VMs' (kills). The dashboard shows them; nothing acts on them.

use std::collections::VecDeque;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Most events kept (the oldest go first).
pub const FAULT_EVENTS_MAX: usize = 256;

/// One fault: what, where, since when, healed when.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FaultEvent {
    /// `cut`, `partition`, `loss`, `delay` or `kill`.
    pub kind: String,
    /// A node, `a,b <-> c`, groups `n1,n2 | n3`, or `*` (every link).
    pub target: String,
    /// Amount (`10.0%`, `5.0 ms`), empty when none.
    #[serde(default)]
    pub detail: String,
    /// Milliseconds since the Unix epoch.
    pub started_ms: u64,
    #[serde(default)]
    pub healed_ms: Option<u64>,
}

/// The log.
#[derive(Clone, Debug, Default)]
pub struct FaultLog {
    events: VecDeque<FaultEvent>,
}

/// Now, milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl FaultLog {
    /// A fault starts (one still open of the same kind and target heals first: it changed).
    pub fn start(&mut self, kind: &str, target: &str, detail: String) {
        let now = now_ms();
        self.heal_where(now, |e| e.kind == kind && e.target == target);
        if self.events.len() >= FAULT_EVENTS_MAX {
            self.events.pop_front();
        }
        self.events.push_back(FaultEvent {
            kind: kind.into(),
            target: target.into(),
            detail,
            started_ms: now,
            healed_ms: None,
        });
    }

    /// The open faults of `kind` on `target` (any target when `None`) heal.
    pub fn heal(&mut self, kind: &str, target: Option<&str>) {
        self.heal_where(now_ms(), |e| {
            e.kind == kind && target.is_none_or(|t| e.target == t)
        });
    }

    /// Every open fault heals.
    pub fn heal_all(&mut self) {
        self.heal_where(now_ms(), |_| true);
    }

    fn heal_where(&mut self, now: u64, which: impl Fn(&FaultEvent) -> bool) {
        for e in self.events.iter_mut() {
            if e.healed_ms.is_none() && which(e) {
                e.healed_ms = Some(now);
            }
        }
    }

    pub fn events(&self) -> Vec<FaultEvent> {
        self.events.iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn faults_start_heal_and_stay_bounded() {
        let mut log = FaultLog::default();
        log.start("cut", "n1", String::new());
        log.start("loss", "*", "10.0%".into());
        log.start("loss", "*", "20.0%".into());
        let e = log.events();
        assert_eq!(e.len(), 3);
        assert!(
            e[1].healed_ms.is_some(),
            "a changed loss closes the old one"
        );
        log.heal("cut", Some("n2"));
        assert!(log.events()[0].healed_ms.is_none());
        log.heal("cut", Some("n1"));
        assert!(log.events()[0].healed_ms.is_some());
        log.heal_all();
        assert!(log.events().iter().all(|e| e.healed_ms.is_some()));
        for i in 0..FAULT_EVENTS_MAX + 10 {
            log.start("kill", &format!("n{i}"), String::new());
        }
        assert_eq!(log.events().len(), FAULT_EVENTS_MAX);
    }
}
