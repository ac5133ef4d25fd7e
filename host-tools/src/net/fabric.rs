//! The switch's decisions without I/O: MAC learning, flooding, and the fault model (cut links,
//! partitions, loss, delay, servers). The forwarder feeds it frames and sends what it says.

use std::collections::HashMap;
use std::fmt;
use std::time::{Duration, Instant};

use super::frame::{MacAddr, frame_addrs};
use super::rng::LossRng;
use super::stats::{DelayBetween, PortCounters, PortKind, PortStats, SwitchStats, UplinkStatus};
use super::{PortInfo, UPLINK_PORT};

/// MAC entries not refreshed for this long are forgotten (IEEE 802.1D default ageing time).
const MAC_AGEING: Duration = Duration::from_secs(300);
/// Bound on the MAC table; past it new addresses are not learned (they are flooded).
const MAC_TABLE_MAX: usize = 65_536;
/// Bound on delay rules between port sets (one bit each in a per-port mask).
pub const DELAY_RULES_MAX: usize = 64;
/// Bound on any one delay: one minute.
pub const DELAY_US_MAX: u64 = 60_000_000;
/// Bound on ports (VMs plus uplink).
pub const PORTS_MAX: usize = 4096;

/// Why a fault or port request was refused. The switch is left unchanged.
#[derive(Clone, Debug, PartialEq)]
pub enum FaultError {
    /// No port has this name.
    UnknownPort { name: String, known: Vec<String> },
    /// A port name is in use already.
    DuplicatePort(String),
    /// Port names are 1 to 64 characters of `[A-Za-z0-9_.-]`, and `host` is the uplink's.
    BadPortName(String),
    /// A port appears in two groups (or twice in one).
    OverlappingGroups(String),
    /// A group with no port.
    EmptyGroup,
    /// Partitions need at least two groups... or one group plus the implicit rest.
    TooFewGroups,
    /// A loss fraction must be a number in `0..=1`.
    LossOutOfRange(f64),
    /// A delay must be at most [`DELAY_US_MAX`] microseconds.
    DelayTooLarge(u64),
    /// More than [`DELAY_RULES_MAX`] delay rules.
    TooManyRules,
    /// More than [`PORTS_MAX`] ports.
    TooManyPorts,
    /// The uplink cannot be removed or be placed on a server.
    UplinkNotAllowed,
}

impl fmt::Display for FaultError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FaultError::UnknownPort { name, known } => {
                write!(f, "unknown port {name:?} (ports: {})", known.join(", "))
            }
            FaultError::DuplicatePort(n) => write!(f, "port {n:?} exists already"),
            FaultError::BadPortName(n) => write!(
                f,
                "bad port name {n:?}: use 1-64 characters of A-Z a-z 0-9 _ . - (\"{UPLINK_PORT}\" is the uplink's)"
            ),
            FaultError::OverlappingGroups(n) => {
                write!(f, "port {n:?} is in more than one group")
            }
            FaultError::EmptyGroup => write!(f, "a group has no port"),
            FaultError::TooFewGroups => {
                write!(
                    f,
                    "a partition needs two groups (or one group and other ports left out)"
                )
            }
            FaultError::LossOutOfRange(x) => write!(f, "loss {x} is outside 0..=1"),
            FaultError::DelayTooLarge(us) => {
                write!(f, "delay {us} us is over the maximum {DELAY_US_MAX} us")
            }
            FaultError::TooManyRules => write!(f, "more than {DELAY_RULES_MAX} delay rules"),
            FaultError::TooManyPorts => write!(f, "more than {PORTS_MAX} ports"),
            FaultError::UplinkNotAllowed => {
                write!(
                    f,
                    "the uplink port \"{UPLINK_PORT}\" cannot take this request"
                )
            }
        }
    }
}

impl std::error::Error for FaultError {}

/// Group id of a port that no partition touches: it reaches every group.
const UNPARTITIONED: u32 = 0;

struct PortState {
    info: PortInfo,
    link_up: bool,
    loss: f64,
    delay_us: u64,
    group: u32,
    /// Bit i set: the port is on side a (resp. b) of delay rule i.
    rule_a: u64,
    rule_b: u64,
    counters: PortCounters,
}

/// One forwarding decision: send to port `to` after `delay_us` (0: now).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hop {
    pub to: usize,
    pub delay_us: u64,
}

pub struct Fabric {
    ports: Vec<Option<PortState>>,
    by_name: HashMap<String, usize>,
    macs: HashMap<MacAddr, (usize, Instant)>,
    rng: LossRng,
    seed: u64,
    global_loss: f64,
    partition: Option<Vec<Vec<String>>>,
    rules: Vec<DelayBetween>,
    server_delay_us: u64,
}

fn check_loss(x: f64) -> Result<(), FaultError> {
    if x.is_finite() && (0.0..=1.0).contains(&x) {
        Ok(())
    } else {
        Err(FaultError::LossOutOfRange(x))
    }
}

fn check_delay(us: u64) -> Result<(), FaultError> {
    if us <= DELAY_US_MAX {
        Ok(())
    } else {
        Err(FaultError::DelayTooLarge(us))
    }
}

/// Whether `name` may name a VM port.
pub fn valid_port_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name != UPLINK_PORT
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

impl Fabric {
    pub fn new(seed: u64) -> Self {
        Fabric {
            ports: Vec::new(),
            by_name: HashMap::new(),
            macs: HashMap::new(),
            rng: LossRng::new(seed),
            seed,
            global_loss: 0.0,
            partition: None,
            rules: Vec::new(),
            server_delay_us: 0,
        }
    }

    /// Adds a port; returns its index (stable until removed, then reused).
    pub fn add_port(&mut self, info: PortInfo) -> Result<usize, FaultError> {
        if info.kind == PortKind::Vm && !valid_port_name(&info.name) {
            return Err(FaultError::BadPortName(info.name));
        }
        if self.by_name.contains_key(&info.name) {
            return Err(FaultError::DuplicatePort(info.name));
        }
        if self.by_name.len() >= PORTS_MAX {
            return Err(FaultError::TooManyPorts);
        }
        // A VM port added during a partition joins the rest group, like other unnamed VMs.
        let group = match (&self.partition, info.kind) {
            (Some(groups), PortKind::Vm) => groups.len() as u32 + 1,
            _ => UNPARTITIONED,
        };
        let state = PortState {
            info,
            link_up: true,
            loss: 0.0,
            delay_us: 0,
            group,
            rule_a: 0,
            rule_b: 0,
            counters: PortCounters::default(),
        };
        let idx = match self.ports.iter().position(Option::is_none) {
            Some(i) => i,
            None => {
                self.ports.push(None);
                self.ports.len() - 1
            }
        };
        self.by_name.insert(state.info.name.clone(), idx);
        self.ports[idx] = Some(state);
        Ok(idx)
    }

    /// Removes a VM port and forgets the MAC addresses learned on it.
    pub fn remove_port(&mut self, name: &str) -> Result<usize, FaultError> {
        let idx = self.index(name)?;
        if self.port(idx).info.kind == PortKind::Uplink {
            return Err(FaultError::UplinkNotAllowed);
        }
        self.ports[idx] = None;
        self.by_name.remove(name);
        self.macs.retain(|_, (p, _)| *p != idx);
        // Keep stored rules and partitions consistent with the ports that exist.
        if let Some(groups) = &mut self.partition {
            for g in groups.iter_mut() {
                g.retain(|n| n != name);
            }
            groups.retain(|g| !g.is_empty());
        }
        for r in &mut self.rules {
            r.a.retain(|n| n != name);
            r.b.retain(|n| n != name);
        }
        self.rules.retain(|r| !r.a.is_empty() && !r.b.is_empty());
        self.rebuild_rule_masks();
        Ok(idx)
    }

    pub fn index(&self, name: &str) -> Result<usize, FaultError> {
        self.by_name
            .get(name)
            .copied()
            .ok_or_else(|| FaultError::UnknownPort {
                name: name.to_string(),
                known: self.names(),
            })
    }

    fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self.by_name.keys().cloned().collect();
        v.sort();
        v
    }

    fn port(&self, idx: usize) -> &PortState {
        self.ports[idx].as_ref().expect("live port index")
    }

    fn port_mut(&mut self, idx: usize) -> &mut PortState {
        self.ports[idx].as_mut().expect("live port index")
    }

    pub fn infos(&self) -> Vec<PortInfo> {
        self.ports
            .iter()
            .flatten()
            .map(|p| p.info.clone())
            .collect()
    }

    pub fn link_up(&self, idx: usize) -> bool {
        self.ports
            .get(idx)
            .and_then(Option::as_ref)
            .is_some_and(|p| p.link_up)
    }

    pub fn set_link(&mut self, name: &str, up: bool) -> Result<(), FaultError> {
        let idx = self.index(name)?;
        self.port_mut(idx).link_up = up;
        Ok(())
    }

    /// Partitions ports into `groups`; VM ports in no group form one more group together; the
    /// uplink, unless named, stays connected to every group (so the host can watch both sides).
    pub fn partition(&mut self, groups: &[Vec<String>]) -> Result<(), FaultError> {
        let mut assigned: HashMap<usize, u32> = HashMap::new();
        for (gi, g) in groups.iter().enumerate() {
            if g.is_empty() {
                return Err(FaultError::EmptyGroup);
            }
            for name in g {
                let idx = self.index(name)?;
                if assigned.insert(idx, gi as u32 + 1).is_some() {
                    return Err(FaultError::OverlappingGroups(name.clone()));
                }
            }
        }
        let rest_has_vms = self.ports.iter().enumerate().any(|(i, p)| {
            p.as_ref()
                .is_some_and(|p| p.info.kind == PortKind::Vm && !assigned.contains_key(&i))
        });
        if groups.len() + usize::from(rest_has_vms) < 2 {
            return Err(FaultError::TooFewGroups);
        }
        let rest = groups.len() as u32 + 1;
        for (i, p) in self.ports.iter_mut().enumerate() {
            if let Some(p) = p {
                p.group = match (assigned.get(&i), p.info.kind) {
                    (Some(g), _) => *g,
                    (None, PortKind::Vm) => rest,
                    (None, PortKind::Uplink) => UNPARTITIONED,
                };
            }
        }
        self.partition = Some(groups.to_vec());
        Ok(())
    }

    pub fn heal(&mut self) {
        for p in self.ports.iter_mut().flatten() {
            p.group = UNPARTITIONED;
        }
        self.partition = None;
    }

    /// Sets the loss fraction of one port's link, or the global one (`None`).
    pub fn set_loss(&mut self, port: Option<&str>, fraction: f64) -> Result<(), FaultError> {
        check_loss(fraction)?;
        match port {
            Some(name) => {
                let idx = self.index(name)?;
                self.port_mut(idx).loss = fraction;
            }
            None => self.global_loss = fraction,
        }
        Ok(())
    }

    /// Sets one port's link delay (each direction).
    pub fn set_link_delay(&mut self, name: &str, delay_us: u64) -> Result<(), FaultError> {
        check_delay(delay_us)?;
        let idx = self.index(name)?;
        self.port_mut(idx).delay_us = delay_us;
        Ok(())
    }

    /// Delays frames between any port of `a` and any port of `b` (both directions). A rule with
    /// the same two sets replaces the old one; `delay_us == 0` removes it.
    pub fn set_delay_between(
        &mut self,
        a: &[String],
        b: &[String],
        delay_us: u64,
    ) -> Result<(), FaultError> {
        check_delay(delay_us)?;
        if a.is_empty() || b.is_empty() {
            return Err(FaultError::EmptyGroup);
        }
        let mut seen = HashMap::new();
        for name in a.iter().chain(b) {
            self.index(name)?;
            if seen.insert(name.as_str(), ()).is_some() {
                return Err(FaultError::OverlappingGroups(name.clone()));
            }
        }
        let norm = |v: &[String]| {
            let mut v = v.to_vec();
            v.sort();
            v
        };
        let (na, nb) = (norm(a), norm(b));
        let existing = self.rules.iter().position(|r| {
            let (ra, rb) = (norm(&r.a), norm(&r.b));
            (ra == na && rb == nb) || (ra == nb && rb == na)
        });
        match (existing, delay_us) {
            (Some(i), 0) => {
                self.rules.remove(i);
            }
            (Some(i), d) => self.rules[i].delay_us = d,
            (None, 0) => {}
            (None, d) => {
                if self.rules.len() >= DELAY_RULES_MAX {
                    return Err(FaultError::TooManyRules);
                }
                self.rules.push(DelayBetween {
                    a: na,
                    b: nb,
                    delay_us: d,
                });
            }
        }
        self.rebuild_rule_masks();
        Ok(())
    }

    fn rebuild_rule_masks(&mut self) {
        for p in self.ports.iter_mut().flatten() {
            p.rule_a = 0;
            p.rule_b = 0;
        }
        for (i, r) in self.rules.iter().enumerate() {
            for n in &r.a {
                if let Some(&idx) = self.by_name.get(n) {
                    self.ports[idx].as_mut().expect("named port").rule_a |= 1 << i;
                }
            }
            for n in &r.b {
                if let Some(&idx) = self.by_name.get(n) {
                    self.ports[idx].as_mut().expect("named port").rule_b |= 1 << i;
                }
            }
        }
    }

    /// Declares physical servers: each named server holds the listed VM ports (others are on
    /// none); frames between ports on different servers wait `delay_us` one way.
    pub fn set_servers(
        &mut self,
        servers: &[(String, Vec<String>)],
        delay_us: u64,
    ) -> Result<(), FaultError> {
        check_delay(delay_us)?;
        let mut assigned: HashMap<usize, String> = HashMap::new();
        for (server, ports) in servers {
            for name in ports {
                let idx = self.index(name)?;
                if self.port(idx).info.kind == PortKind::Uplink {
                    return Err(FaultError::UplinkNotAllowed);
                }
                if assigned.insert(idx, server.clone()).is_some() {
                    return Err(FaultError::OverlappingGroups(name.clone()));
                }
            }
        }
        for (i, p) in self.ports.iter_mut().enumerate() {
            if let Some(p) = p {
                p.info.server = assigned.remove(&i);
            }
        }
        self.server_delay_us = delay_us;
        Ok(())
    }

    pub fn set_server_delay(&mut self, delay_us: u64) -> Result<(), FaultError> {
        check_delay(delay_us)?;
        self.server_delay_us = delay_us;
        Ok(())
    }

    /// Clears every fault: links up, no partition, no loss, no delays. Servers stay declared
    /// (they are topology, not a fault) with their delay.
    pub fn reset_faults(&mut self) {
        for p in self.ports.iter_mut().flatten() {
            p.link_up = true;
            p.loss = 0.0;
            p.delay_us = 0;
        }
        self.global_loss = 0.0;
        self.heal();
        self.rules.clear();
        self.rebuild_rule_masks();
    }

    pub fn clear_delays(&mut self) {
        for p in self.ports.iter_mut().flatten() {
            p.delay_us = 0;
        }
        self.rules.clear();
        self.rebuild_rule_masks();
    }

    /// The one-way delay from port `from` to port `to`, microseconds.
    pub fn delay_us(&self, from: usize, to: usize) -> u64 {
        let (p, q) = (self.port(from), self.port(to));
        let mut d = p.delay_us + q.delay_us;
        if let (Some(a), Some(b)) = (&p.info.server, &q.info.server)
            && a != b
        {
            d += self.server_delay_us;
        }
        let mut mask = (p.rule_a & q.rule_b) | (p.rule_b & q.rule_a);
        while mask != 0 {
            let i = mask.trailing_zeros() as usize;
            d += self.rules[i].delay_us;
            mask &= mask - 1;
        }
        d
    }

    fn loss_between(&self, from: usize, to: usize) -> f64 {
        let keep =
            (1.0 - self.global_loss) * (1.0 - self.port(from).loss) * (1.0 - self.port(to).loss);
        1.0 - keep
    }

    /// Decides where a frame received on `from` goes. Pushes the deliveries onto `out` and
    /// counts the frame's reception and every drop. The caller sends and then reports each
    /// send with [`Fabric::note_sent`] or [`Fabric::note_unreachable`].
    pub fn route(&mut self, now: Instant, from: usize, frame: &[u8], out: &mut Vec<Hop>) {
        let p = self.port_mut(from);
        p.counters.rx_frames += 1;
        p.counters.rx_bytes += frame.len() as u64;
        let Some((dst, src)) = frame_addrs(frame) else {
            p.counters.dropped.malformed += 1;
            return;
        };
        if !p.link_up {
            p.counters.dropped.link_down += 1;
            return;
        }
        if !src.is_group() {
            self.learn(src, from, now);
        }
        let known = if dst.is_group() {
            None
        } else {
            self.macs
                .get(&dst)
                .filter(|(_, seen)| now.saturating_duration_since(*seen) < MAC_AGEING)
                .map(|(port, _)| *port)
        };
        match known {
            Some(to) if to == from => self.port_mut(from).counters.dropped.filtered += 1,
            Some(to) => self.consider(from, to, out),
            None => {
                for to in 0..self.ports.len() {
                    if to != from && self.ports[to].is_some() {
                        self.consider(from, to, out);
                    }
                }
            }
        }
    }

    fn learn(&mut self, src: MacAddr, port: usize, now: Instant) {
        if self.macs.len() >= MAC_TABLE_MAX && !self.macs.contains_key(&src) {
            self.macs
                .retain(|_, (_, seen)| now.saturating_duration_since(*seen) < MAC_AGEING);
            if self.macs.len() >= MAC_TABLE_MAX {
                return;
            }
        }
        self.macs.insert(src, (port, now));
    }

    fn consider(&mut self, from: usize, to: usize, out: &mut Vec<Hop>) {
        let (gp, gq) = (self.port(from).group, self.port(to).group);
        if !self.port(to).link_up {
            self.port_mut(to).counters.dropped.link_down += 1;
            return;
        }
        if gp != gq && gp != UNPARTITIONED && gq != UNPARTITIONED {
            self.port_mut(to).counters.dropped.partition += 1;
            return;
        }
        let loss = self.loss_between(from, to);
        if loss > 0.0 && self.rng.next_f64() < loss {
            self.port_mut(to).counters.dropped.loss += 1;
            return;
        }
        out.push(Hop {
            to,
            delay_us: self.delay_us(from, to),
        });
    }

    pub fn note_sent(&mut self, to: usize, len: usize) {
        if let Some(Some(p)) = self.ports.get_mut(to) {
            p.counters.tx_frames += 1;
            p.counters.tx_bytes += len as u64;
        }
    }

    pub fn note_unreachable(&mut self, to: usize) {
        if let Some(Some(p)) = self.ports.get_mut(to) {
            p.counters.dropped.unreachable += 1;
        }
    }

    pub fn note_queue_full(&mut self, to: usize) {
        if let Some(Some(p)) = self.ports.get_mut(to) {
            p.counters.dropped.queue_full += 1;
        }
    }

    /// A delayed frame reached its deadline but the link was cut meanwhile.
    pub fn note_link_down(&mut self, to: usize) {
        if let Some(Some(p)) = self.ports.get_mut(to) {
            p.counters.dropped.link_down += 1;
        }
    }

    pub fn stats(&self, uplink: UplinkStatus, queued_frames: usize) -> SwitchStats {
        let groups = self.partition.as_ref().map(|g| g.len() as u32).unwrap_or(0);
        SwitchStats {
            seed: self.seed,
            uplink,
            global_loss: self.global_loss,
            partition: self.partition.clone(),
            delay_between: self.rules.clone(),
            server_delay_us: self.server_delay_us,
            queued_frames,
            mac_entries: self.macs.len(),
            ports: self
                .ports
                .iter()
                .flatten()
                .map(|p| PortStats {
                    info: p.info.clone(),
                    link_up: p.link_up,
                    loss: p.loss,
                    delay_us: p.delay_us,
                    // Groups as given are 1..=n; n+1 is the rest.
                    partition_group: (p.group != UNPARTITIONED).then(|| {
                        let g = p.group - 1;
                        debug_assert!(g <= groups);
                        g as usize
                    }),
                    counters: p.counters,
                })
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str) -> PortInfo {
        PortInfo {
            name: name.into(),
            kind: PortKind::Vm,
            server: None,
            switch_addr: None,
            vm_addr: None,
        }
    }

    fn frame(dst: u8, src: u8) -> Vec<u8> {
        let mut f = vec![2, 0, 0, 0, 0, dst, 2, 0, 0, 0, 0, src, 0x08, 0x00];
        f.resize(60, 0);
        f
    }

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    fn fabric(n: usize) -> Fabric {
        let mut f = Fabric::new(1);
        for i in 0..n {
            assert_eq!(f.add_port(vm(&format!("v{i}"))).unwrap(), i);
        }
        f
    }

    fn route(f: &mut Fabric, from: usize, fr: &[u8]) -> Vec<Hop> {
        let mut out = Vec::new();
        f.route(Instant::now(), from, fr, &mut out);
        out
    }

    #[test]
    fn floods_unknown_then_forwards_learned() {
        let mut f = fabric(3);
        let to: Vec<_> = route(&mut f, 0, &frame(2, 1))
            .iter()
            .map(|h| h.to)
            .collect();
        assert_eq!(to, vec![1, 2]);
        // Port 2 answers from MAC 2 to MAC 1: learned on port 0, one hop.
        let to: Vec<_> = route(&mut f, 2, &frame(1, 2))
            .iter()
            .map(|h| h.to)
            .collect();
        assert_eq!(to, vec![0]);
        let to: Vec<_> = route(&mut f, 0, &frame(2, 1))
            .iter()
            .map(|h| h.to)
            .collect();
        assert_eq!(to, vec![2]);
        // Hairpin is filtered.
        assert!(route(&mut f, 0, &frame(1, 1)).is_empty());
        assert_eq!(f.stats(off(), 0).ports[0].counters.dropped.filtered, 1);
    }

    fn off() -> UplinkStatus {
        UplinkStatus::Off { reason: "t".into() }
    }

    #[test]
    fn partition_rest_group_and_uplink() {
        let mut f = fabric(5);
        let host = f
            .add_port(PortInfo {
                name: UPLINK_PORT.into(),
                kind: PortKind::Uplink,
                ..vm("x")
            })
            .unwrap();
        f.partition(&[s(&["v0", "v1"]), s(&["v2", "v3"])]).unwrap();
        let reach = |f: &mut Fabric, a: usize| -> Vec<usize> {
            route(f, a, &frame(0xff, a as u8 + 10))
                .iter()
                .map(|h| h.to)
                .collect()
        };
        assert_eq!(reach(&mut f, 0), vec![1, host]);
        assert_eq!(reach(&mut f, 3), vec![2, host]);
        assert_eq!(reach(&mut f, 4), vec![host]); // v4 is the rest group alone
        assert_eq!(reach(&mut f, host), vec![0, 1, 2, 3, 4]);
        let st = f.stats(off(), 0);
        assert_eq!(st.port("v4").unwrap().partition_group, Some(2));
        assert_eq!(st.port(UPLINK_PORT).unwrap().partition_group, None);
        f.heal();
        assert_eq!(reach(&mut f, 0), vec![1, 2, 3, 4, host]);
    }

    #[test]
    fn bad_input_is_rejected_and_changes_nothing() {
        let mut f = fabric(3);
        assert!(matches!(
            f.partition(&[s(&["v0"]), s(&["v0", "v1"])]),
            Err(FaultError::OverlappingGroups(_))
        ));
        assert!(matches!(
            f.partition(&[s(&["v0"]), s(&["nope"])]),
            Err(FaultError::UnknownPort { .. })
        ));
        assert_eq!(
            f.partition(&[s(&["v0", "v1", "v2"])]),
            Err(FaultError::TooFewGroups)
        );
        assert_eq!(
            f.partition(&[s(&[]), s(&["v1"])]),
            Err(FaultError::EmptyGroup)
        );
        assert!(f.stats(off(), 0).partition.is_none());
        for x in [-0.1, 1.5, f64::NAN, f64::INFINITY] {
            assert!(matches!(
                f.set_loss(None, x),
                Err(FaultError::LossOutOfRange(_))
            ));
        }
        assert!(f.set_link_delay("v0", DELAY_US_MAX + 1).is_err());
        assert!(f.add_port(vm("v0")).is_err());
        assert!(f.add_port(vm(UPLINK_PORT)).is_err());
        assert!(f.add_port(vm("a b")).is_err());
        let msg = f.set_link("zz", false).unwrap_err().to_string();
        assert!(msg.contains("zz") && msg.contains("v0, v1, v2"), "{msg}");
    }

    #[test]
    fn delays_add_up_per_link_rule_and_server() {
        let mut f = fabric(4);
        f.set_link_delay("v0", 100).unwrap();
        f.set_delay_between(&s(&["v0", "v1"]), &s(&["v2"]), 1_000)
            .unwrap();
        f.set_servers(
            &[
                ("s1".into(), s(&["v0", "v1"])),
                ("s2".into(), s(&["v2", "v3"])),
            ],
            20_000,
        )
        .unwrap();
        assert_eq!(f.delay_us(0, 1), 100);
        assert_eq!(f.delay_us(0, 2), 100 + 1_000 + 20_000);
        assert_eq!(f.delay_us(2, 0), 100 + 1_000 + 20_000);
        assert_eq!(f.delay_us(1, 3), 20_000);
        assert_eq!(f.delay_us(2, 3), 0);
        // Same sets (either order) replace; zero removes.
        f.set_delay_between(&s(&["v2"]), &s(&["v1", "v0"]), 5)
            .unwrap();
        assert_eq!(f.delay_us(1, 2), 20_005);
        f.set_delay_between(&s(&["v2"]), &s(&["v1", "v0"]), 0)
            .unwrap();
        assert_eq!(f.delay_us(1, 2), 20_000);
        f.remove_port("v0").unwrap();
        assert!(f.index("v0").is_err());
    }

    #[test]
    fn loss_fraction_is_reproducible_from_seed() {
        let run = |seed| {
            let mut f = Fabric::new(seed);
            f.add_port(vm("a")).unwrap();
            f.add_port(vm("b")).unwrap();
            f.set_loss(Some("b"), 0.25).unwrap();
            let fr = frame(0xff, 1);
            let mut pattern = Vec::new();
            for _ in 0..4000 {
                pattern.push(route(&mut f, 0, &fr).len());
            }
            pattern
        };
        let a = run(42);
        assert_eq!(a, run(42));
        assert_ne!(a, run(43));
        let delivered = a.iter().sum::<usize>() as f64 / 4000.0;
        assert!((delivered - 0.75).abs() < 0.03, "delivered {delivered}");
    }

    #[test]
    fn cut_link_drops_both_ways() {
        let mut f = fabric(2);
        f.set_link("v1", false).unwrap();
        assert!(route(&mut f, 0, &frame(0xff, 1)).is_empty());
        assert!(route(&mut f, 1, &frame(0xff, 2)).is_empty());
        let st = f.stats(off(), 0);
        assert_eq!(st.port("v1").unwrap().counters.dropped.link_down, 2);
        f.set_link("v1", true).unwrap();
        assert_eq!(route(&mut f, 0, &frame(0xff, 1)).len(), 1);
    }
}
