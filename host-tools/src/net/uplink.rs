//! The host uplink: a tap device that puts the host on the switch's Ethernet segment.
//!
//! The tap is not persistent: closing its descriptor (switch stopped, or its process killed)
//! removes the device and the connected route that came with its address.

use std::net::Ipv4Addr;

use super::stats::UplinkStatus;

/// Where the host sits on the segment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UplinkConfig {
    /// `false`: no tap at all (the switch only connects VMs).
    pub enabled: bool,
    /// Interface name; `%d` lets the kernel pick a free number.
    pub ifname: String,
    pub address: Ipv4Addr,
    pub prefix_len: u8,
}

impl Default for UplinkConfig {
    fn default() -> Self {
        UplinkConfig {
            enabled: true,
            ifname: "unipeer%d".into(),
            address: Ipv4Addr::new(10, 77, 0, 1),
            prefix_len: 16,
        }
    }
}

impl UplinkConfig {
    /// Netmask for `prefix_len` (clamped to 0..=32).
    pub fn netmask(&self) -> Ipv4Addr {
        let p = u32::from(self.prefix_len.min(32));
        Ipv4Addr::from(u32::MAX.checked_shl(32 - p).unwrap_or(0))
    }
}

/// Opens the tap, or says why not. The device is returned non-blocking.
pub(crate) fn open(cfg: &UplinkConfig) -> (Option<tun::Device>, UplinkStatus) {
    let off = |reason: String| {
        log::warn!("switch: host uplink is off: {reason}");
        (None, UplinkStatus::Off { reason })
    };
    if !cfg.enabled {
        return (
            None,
            UplinkStatus::Off {
                reason: "disabled in the configuration".into(),
            },
        );
    }
    if cfg.prefix_len > 30 {
        return off(format!("prefix /{} leaves no room for VMs", cfg.prefix_len));
    }
    let mask = cfg.netmask();
    let net = Ipv4Addr::from(u32::from(cfg.address) & u32::from(mask));
    if let Some(dev) = route_owner(net, mask) {
        return off(format!(
            "{net}/{} is already routed via {dev} (another cluster's switch?)",
            cfg.prefix_len
        ));
    }
    let mut tc = tun::Configuration::default();
    tc.tun_name(&cfg.ifname)
        .layer(tun::Layer::L2)
        .address(cfg.address)
        .netmask(mask)
        .mtu(1500)
        .up();
    let dev = match tun::create(&tc) {
        Ok(d) => d,
        Err(e) => {
            let hint = if is_root() { "" } else { " (not root)" };
            return off(format!("cannot create tap {}: {e}{hint}", cfg.ifname));
        }
    };
    if let Err(e) = dev.set_nonblock() {
        return off(format!("cannot make the tap non-blocking: {e}"));
    }
    let ifname = match tun::AbstractDevice::tun_name(&dev) {
        Ok(n) => n,
        Err(e) => return off(format!("tap has no name: {e}")),
    };
    // Keep IPv6 chatter (router solicitations, DAD) off the VMs' segment; best effort.
    let _ = std::fs::write(
        format!("/proc/sys/net/ipv6/conf/{ifname}/disable_ipv6"),
        "1",
    );
    log::info!(
        "switch: host uplink {ifname} up, host address {}/{}",
        cfg.address,
        cfg.prefix_len
    );
    let status = UplinkStatus::Up {
        ifname,
        address: cfg.address,
        prefix_len: cfg.prefix_len,
    };
    (Some(dev), status)
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|euid| euid == "0"))
        })
        .unwrap_or(false)
}

/// The interface that already routes exactly `net/mask`, from `/proc/net/route`.
fn route_owner(net: Ipv4Addr, mask: Ipv4Addr) -> Option<String> {
    let table = std::fs::read_to_string("/proc/net/route").ok()?;
    parse_route_owner(&table, net, mask)
}

fn parse_route_owner(table: &str, net: Ipv4Addr, mask: Ipv4Addr) -> Option<String> {
    // Addresses are hex of the in-memory (network order) u32, printed as a native integer.
    let hex = |s: &str| {
        u32::from_str_radix(s, 16)
            .ok()
            .map(|v| Ipv4Addr::from(v.to_le_bytes()))
    };
    table.lines().skip(1).find_map(|line| {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            return None;
        }
        (hex(f[1])? == net && hex(f[7])? == mask).then(|| f[0].to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netmask_and_route_table() {
        let c = UplinkConfig::default();
        assert_eq!(c.netmask(), Ipv4Addr::new(255, 255, 0, 0));
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                     eth0\t00000000\t0100A8C0\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                     unipeer0\t00004D0A\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n";
        assert_eq!(
            parse_route_owner(table, Ipv4Addr::new(10, 77, 0, 0), c.netmask()).as_deref(),
            Some("unipeer0")
        );
        assert_eq!(
            parse_route_owner(table, Ipv4Addr::new(10, 78, 0, 0), c.netmask()),
            None
        );
    }
}
