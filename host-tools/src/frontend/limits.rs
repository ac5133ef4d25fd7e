//! A front-end's resource limits: how much one deploy and the front-end as a whole may launch,
//! how many connections one source may hold, and how long a `CONNECT` relay may live.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::cluster::relay::PipeLimits;

/// Most connections one source address holds at once (of [`super::CONNECTIONS_MAX`]).
pub const CONNECTIONS_PER_SOURCE: usize = 16;
/// Most connections one source address holds that have not yet sent an authenticated head.
pub const PENDING_PER_SOURCE: usize = 8;

/// What a front-end may launch and relay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrontendLimits {
    /// VMs of this front-end's server at once (any state: a killed VM can be restarted).
    pub vms_max: usize,
    /// Their guest memory together, MiB.
    pub memory_mb_max: u64,
    /// One deploy's `count × memory_mb`, MiB.
    pub deploy_memory_mb_max: u64,
    /// A `CONNECT` relay ends after this long without a byte either way, and after `total`.
    pub relay: PipeLimits,
}

impl Default for FrontendLimits {
    fn default() -> Self {
        FrontendLimits {
            vms_max: 32,
            memory_mb_max: 4096,
            deploy_memory_mb_max: 2048,
            relay: PipeLimits {
                idle: Duration::from_secs(120),
                total: Duration::from_secs(3600),
            },
        }
    }
}

/// Why a deploy is refused by the limits.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DeployRefused {
    /// One deploy asks for more than the per-deploy memory (400).
    OverDeployMemory {
        count: usize,
        memory_mb: u32,
        limit_mb: u64,
    },
    /// The server would hold more VMs than allowed (429).
    TooManyVms {
        current: usize,
        count: usize,
        limit: usize,
    },
    /// The server's VMs would use more memory than allowed (429).
    OverMemory {
        used_mb: u64,
        want_mb: u64,
        limit_mb: u64,
    },
}

impl DeployRefused {
    /// The HTTP status it is answered with: a request that can never fit is 400, a full
    /// front-end 429.
    pub fn status(&self) -> u16 {
        match self {
            DeployRefused::OverDeployMemory { .. } => 400,
            DeployRefused::TooManyVms { .. } | DeployRefused::OverMemory { .. } => 429,
        }
    }
}

impl std::fmt::Display for DeployRefused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            DeployRefused::OverDeployMemory {
                count,
                memory_mb,
                limit_mb,
            } => write!(
                f,
                "a deploy of {count} × {memory_mb} MiB = {} MiB is over this front-end's limit \
                 of {limit_mb} MiB per deploy",
                *count as u64 * u64::from(*memory_mb)
            ),
            DeployRefused::TooManyVms {
                current,
                count,
                limit,
            } => write!(
                f,
                "this front-end's server holds {current} VM(s); {count} more would pass its \
                 limit of {limit}"
            ),
            DeployRefused::OverMemory {
                used_mb,
                want_mb,
                limit_mb,
            } => write!(
                f,
                "this front-end's VMs use {used_mb} MiB; {want_mb} MiB more would pass its \
                 limit of {limit_mb} MiB"
            ),
        }
    }
}

impl std::error::Error for DeployRefused {}

impl FrontendLimits {
    /// Whether `count` VMs of `memory_mb` each fit, next to this server's VMs that use
    /// `current_mb` each.
    pub fn admit_deploy(
        &self,
        count: usize,
        memory_mb: u32,
        current_mb: &[u32],
    ) -> Result<(), DeployRefused> {
        self.admit_request(count, memory_mb)?;
        let want_mb = count as u64 * u64::from(memory_mb);
        if current_mb.len() + count > self.vms_max {
            return Err(DeployRefused::TooManyVms {
                current: current_mb.len(),
                count,
                limit: self.vms_max,
            });
        }
        let used_mb: u64 = current_mb.iter().map(|m| u64::from(*m)).sum();
        if used_mb + want_mb > self.memory_mb_max {
            return Err(DeployRefused::OverMemory {
                used_mb,
                want_mb,
                limit_mb: self.memory_mb_max,
            });
        }
        Ok(())
    }

    /// Whether one deploy of `count` VMs of `memory_mb` each is within the per-deploy bound,
    /// whatever runs already.
    pub fn admit_request(&self, count: usize, memory_mb: u32) -> Result<(), DeployRefused> {
        if count as u64 * u64::from(memory_mb) > self.deploy_memory_mb_max {
            return Err(DeployRefused::OverDeployMemory {
                count,
                memory_mb,
                limit_mb: self.deploy_memory_mb_max,
            });
        }
        Ok(())
    }
}

/// Connections held per source address: open ones and those still before authentication.
#[derive(Debug, Default)]
pub struct SourceTable {
    counts: Mutex<HashMap<IpAddr, (usize, usize)>>,
}

/// One admitted connection; dropping it gives its slot back.
#[derive(Debug)]
pub struct SourceSlot {
    table: Arc<SourceTable>,
    ip: IpAddr,
    pending: bool,
}

impl SourceTable {
    /// Admits a connection from `ip` as pending, unless the source is at a cap.
    pub fn admit(table: &Arc<SourceTable>, ip: IpAddr) -> Result<SourceSlot, String> {
        let mut counts = table.counts.lock().unwrap_or_else(|p| p.into_inner());
        let entry = counts.entry(ip).or_default();
        if entry.0 >= CONNECTIONS_PER_SOURCE {
            return Err(format!(
                "{ip} holds {CONNECTIONS_PER_SOURCE} connections already"
            ));
        }
        if entry.1 >= PENDING_PER_SOURCE {
            return Err(format!(
                "{ip} has {PENDING_PER_SOURCE} connections that have not sent a request yet"
            ));
        }
        entry.0 += 1;
        entry.1 += 1;
        Ok(SourceSlot {
            table: table.clone(),
            ip,
            pending: true,
        })
    }

    /// (open, pending) connections of `ip`.
    pub fn of(&self, ip: IpAddr) -> (usize, usize) {
        let counts = self.counts.lock().unwrap_or_else(|p| p.into_inner());
        counts.get(&ip).copied().unwrap_or_default()
    }
}

impl SourceSlot {
    /// The connection sent an authenticated request: it no longer counts as pending.
    pub fn authenticated(&mut self) {
        if self.pending {
            self.pending = false;
            let mut counts = self.table.counts.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(e) = counts.get_mut(&self.ip) {
                e.1 = e.1.saturating_sub(1);
            }
        }
    }
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut counts = self.table.counts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = counts.get_mut(&self.ip) {
            e.0 = e.0.saturating_sub(1);
            if self.pending {
                e.1 = e.1.saturating_sub(1);
            }
            if *e == (0, 0) {
                counts.remove(&self.ip);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deploys_are_bounded_per_request_and_per_front_end() {
        let l = FrontendLimits::default();
        assert_eq!(l.admit_deploy(6, 64, &[]), Ok(()));
        // 64 VMs × 64 GiB (the old ceiling) is refused outright.
        assert_eq!(l.admit_deploy(64, 65_536, &[]).unwrap_err().status(), 400);
        assert_eq!(l.admit_deploy(2, 1025, &[]).unwrap_err().status(), 400);
        // The front-end fills up: by count, then by memory.
        let full = [16u32; 31];
        assert_eq!(l.admit_deploy(1, 16, &full), Ok(()));
        assert_eq!(l.admit_deploy(2, 16, &full).unwrap_err().status(), 429);
        let big = [1024u32; 3];
        assert_eq!(l.admit_deploy(1, 1024, &big), Ok(()));
        let e = l.admit_deploy(2, 512, &[1024u32; 4]).unwrap_err();
        assert_eq!(e.status(), 429, "{e}");
    }

    #[test]
    fn one_source_cannot_take_every_slot() {
        let table = Arc::new(SourceTable::default());
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        // Pending connections are capped first.
        let mut held: Vec<SourceSlot> = (0..PENDING_PER_SOURCE)
            .map(|_| SourceTable::admit(&table, a).unwrap())
            .collect();
        assert!(SourceTable::admit(&table, a).is_err());
        assert!(SourceTable::admit(&table, b).is_ok());
        // Authenticated ones up to the per-source cap.
        for s in held.iter_mut() {
            s.authenticated();
        }
        while held.len() < CONNECTIONS_PER_SOURCE {
            let mut s = SourceTable::admit(&table, a).unwrap();
            s.authenticated();
            held.push(s);
        }
        assert!(SourceTable::admit(&table, a).is_err());
        assert_eq!(table.of(a), (CONNECTIONS_PER_SOURCE, 0));
        drop(held);
        assert_eq!(table.of(a), (0, 0));
        assert!(SourceTable::admit(&table, a).is_ok());
    }
}
