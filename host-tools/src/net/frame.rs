//! Ethernet II framing: just enough of IEEE 802.3 to switch a frame (destination, source).

use std::fmt;

/// Length of the Ethernet header the switch reads: destination, source, EtherType.
pub const ETHERNET_HEADER_LEN: usize = 14;

/// A 48-bit IEEE 802 MAC address.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// The broadcast address `ff:ff:ff:ff:ff:ff`.
    pub const BROADCAST: MacAddr = MacAddr([0xff; 6]);

    /// Group (multicast or broadcast) addresses have the I/G bit, the low bit of the first
    /// octet, set; a switch floods them.
    pub fn is_group(self) -> bool {
        self.0[0] & 1 == 1
    }
}

impl fmt::Display for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl fmt::Debug for MacAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// The addresses of an Ethernet frame, or `None` when it is shorter than a header.
pub fn frame_addrs(frame: &[u8]) -> Option<(MacAddr, MacAddr)> {
    if frame.len() < ETHERNET_HEADER_LEN {
        return None;
    }
    let mut dst = [0u8; 6];
    let mut src = [0u8; 6];
    dst.copy_from_slice(&frame[0..6]);
    src.copy_from_slice(&frame[6..12]);
    Some((MacAddr(dst), MacAddr(src)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses_and_group_bit() {
        let mut f = vec![0xffu8; 6];
        f.extend_from_slice(&[0x02, 0, 0, 0, 0, 7]);
        f.extend_from_slice(&[0x08, 0x06]);
        let (dst, src) = frame_addrs(&f).unwrap();
        assert_eq!(dst, MacAddr::BROADCAST);
        assert!(dst.is_group());
        assert!(!src.is_group());
        assert_eq!(src.to_string(), "02:00:00:00:00:07");
        assert!(frame_addrs(&f[..13]).is_none());
    }
}
