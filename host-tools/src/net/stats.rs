//! Counters and snapshots the switch reports (`stats`), serialisable for `--json`.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// Frames not delivered, by reason. A frame is counted on the port it was entering the switch
/// through (`malformed`, and `link_down` for a cut sender) or leaving through (every other
/// reason, once per destination port, so a flooded frame can count on several ports).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DropCounters {
    /// The port's link was cut (sender or receiver side).
    pub link_down: u64,
    /// Sender and receiver are in different partition groups.
    pub partition: u64,
    /// Dropped by the configured loss fraction.
    pub loss: u64,
    /// The delay queue was full.
    pub queue_full: u64,
    /// Shorter than an Ethernet header.
    pub malformed: u64,
    /// The destination address was learned on the sending port itself (not forwarded back).
    pub filtered: u64,
    /// The send failed: nobody listening (VM not started), or the socket buffer was full.
    pub unreachable: u64,
}

impl DropCounters {
    pub fn total(&self) -> u64 {
        self.link_down
            + self.partition
            + self.loss
            + self.queue_full
            + self.malformed
            + self.filtered
            + self.unreachable
    }
}

/// Per-port frame and byte counters. `rx` is what the port sent into the switch, `tx` what the
/// switch delivered out of it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortCounters {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub dropped: DropCounters,
}

/// What a port is attached to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PortKind {
    /// A VM's QEMU `dgram` netdev.
    Vm,
    /// The host's tap uplink, port name [`crate::net::UPLINK_PORT`].
    Uplink,
}

/// A port as the launcher needs it: where QEMU must bind and send.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortInfo {
    pub name: String,
    pub kind: PortKind,
    pub server: Option<String>,
    /// The switch's end (QEMU's `remote`). `None` for the uplink.
    pub switch_addr: Option<SocketAddr>,
    /// The VM's end (QEMU's `local`). `None` for the uplink.
    pub vm_addr: Option<SocketAddr>,
}

impl PortInfo {
    /// The exact value of QEMU's `-netdev` option for this port, with netdev id `id`
    /// (pair it with e.g. `-device virtio-net-device,netdev=<id>,mac=...`).
    /// `None` for the uplink, which is no VM's port.
    pub fn qemu_netdev_arg(&self, id: &str) -> Option<String> {
        Some(crate::net::qemu_netdev_arg(
            id,
            self.vm_addr?,
            self.switch_addr?,
        ))
    }
}

/// One port in a [`SwitchStats`] snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PortStats {
    pub info: PortInfo,
    pub link_up: bool,
    /// Loss fraction on this port's link (in addition to the global one).
    pub loss: f64,
    /// One-way delay on this port's link, microseconds, each direction.
    pub delay_us: u64,
    /// Index into [`SwitchStats::partition`] of this port's group; `None` when the port is not
    /// partitioned (no partition, or the uplink not named in one).
    pub partition_group: Option<usize>,
    pub counters: PortCounters,
}

/// The host uplink's state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "state")]
pub enum UplinkStatus {
    /// The tap device exists and the host has `address/prefix_len` on it.
    Up {
        ifname: String,
        address: std::net::Ipv4Addr,
        prefix_len: u8,
    },
    /// No uplink; VMs still reach each other. `reason` says why (disabled, no root, ...).
    Off { reason: String },
}

/// A delay rule between two sets of ports (both directions).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DelayBetween {
    pub a: Vec<String>,
    pub b: Vec<String>,
    pub delay_us: u64,
}

/// A snapshot of the whole switch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SwitchStats {
    pub seed: u64,
    pub uplink: UplinkStatus,
    pub global_loss: f64,
    /// The partition groups as given (unnamed VM ports form one more group), or `None`.
    pub partition: Option<Vec<Vec<String>>>,
    pub delay_between: Vec<DelayBetween>,
    /// One-way delay between ports on different servers, microseconds.
    pub server_delay_us: u64,
    /// Frames waiting in the delay queue.
    pub queued_frames: usize,
    /// Entries in the MAC table.
    pub mac_entries: usize,
    pub ports: Vec<PortStats>,
}

impl SwitchStats {
    pub fn port(&self, name: &str) -> Option<&PortStats> {
        self.ports.iter().find(|p| p.info.name == name)
    }
}

impl std::fmt::Display for SwitchStats {
    /// A human table: one line per port, then the faults in force.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.uplink {
            UplinkStatus::Up {
                ifname,
                address,
                prefix_len,
            } => writeln!(f, "uplink: {ifname} {address}/{prefix_len}")?,
            UplinkStatus::Off { reason } => writeln!(f, "uplink: off ({reason})")?,
        }
        writeln!(
            f,
            "{:<12} {:<8} {:<5} {:>6} {:>9} {:>10} {:>9} {:>10} {:>8}",
            "PORT", "SERVER", "LINK", "GROUP", "RX", "RX_BYTES", "TX", "TX_BYTES", "DROPPED"
        )?;
        for p in &self.ports {
            let c = &p.counters;
            writeln!(
                f,
                "{:<12} {:<8} {:<5} {:>6} {:>9} {:>10} {:>9} {:>10} {:>8}",
                p.info.name,
                p.info.server.as_deref().unwrap_or("-"),
                if p.link_up { "up" } else { "CUT" },
                p.partition_group.map_or("-".into(), |g| g.to_string()),
                c.rx_frames,
                c.rx_bytes,
                c.tx_frames,
                c.tx_bytes,
                c.dropped.total()
            )?;
        }
        if let Some(groups) = &self.partition {
            let g: Vec<String> = groups.iter().map(|g| g.join(",")).collect();
            writeln!(f, "partition: {} | (rest)", g.join(" | "))?;
        }
        if self.global_loss > 0.0 {
            writeln!(f, "loss (global): {}", self.global_loss)?;
        }
        for p in self.ports.iter().filter(|p| p.loss > 0.0 || p.delay_us > 0) {
            writeln!(
                f,
                "link {}: loss {} delay {} us",
                p.info.name, p.loss, p.delay_us
            )?;
        }
        for r in &self.delay_between {
            writeln!(
                f,
                "delay {} <-> {}: {} us",
                r.a.join(","),
                r.b.join(","),
                r.delay_us
            )?;
        }
        if self.server_delay_us > 0 {
            writeln!(f, "delay between servers: {} us", self.server_delay_us)?;
        }
        write!(
            f,
            "seed {}, {} MAC entries, {} frames delayed",
            self.seed, self.mac_entries, self.queued_frames
        )
    }
}
