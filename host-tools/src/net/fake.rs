//! Fake VMs for tests and benchmarks: a plain UDP socket on the VM's end of a port, sending and
//! receiving handcrafted Ethernet frames exactly as QEMU's `dgram` netdev would.

use std::io;
use std::net::UdpSocket;
use std::time::{Duration, Instant};

use super::frame::{ETHERNET_HEADER_LEN, MacAddr, frame_addrs};
use super::stats::PortInfo;

/// EtherType for local experiments (IEEE 802 local experimental 1).
pub const ETHERTYPE_EXPERIMENTAL: u16 = 0x88b5;

/// An Ethernet II frame `dst, src, ethertype, payload`, padded to the 60-byte minimum.
pub fn ethernet_frame(dst: MacAddr, src: MacAddr, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(ETHERNET_HEADER_LEN + payload.len().max(46));
    f.extend_from_slice(&dst.0);
    f.extend_from_slice(&src.0);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    if f.len() < 60 {
        f.resize(60, 0);
    }
    f
}

/// A locally administered unicast MAC `02:00:00:00:hi:lo` for VM number `n`.
pub fn vm_mac(n: u16) -> MacAddr {
    let [hi, lo] = n.to_be_bytes();
    MacAddr([0x02, 0, 0, 0, hi, lo])
}

/// A fake VM attached to one switch port.
pub struct FakeVm {
    pub name: String,
    pub mac: MacAddr,
    sock: UdpSocket,
}

impl FakeVm {
    /// Binds the port's VM address (where QEMU would bind) and sends to the switch's end.
    pub fn attach(port: &PortInfo, mac: MacAddr) -> io::Result<Self> {
        let (Some(vm), Some(sw)) = (port.vm_addr, port.switch_addr) else {
            return Err(io::Error::other("the uplink has no VM end"));
        };
        let sock = UdpSocket::bind(vm)?;
        sock.connect(sw)?;
        Ok(FakeVm {
            name: port.name.clone(),
            mac,
            sock,
        })
    }

    /// Sends `payload` to `dst` in an experimental-EtherType frame from this VM's MAC.
    pub fn send_to(&self, dst: MacAddr, payload: &[u8]) -> io::Result<()> {
        self.send_frame(&ethernet_frame(
            dst,
            self.mac,
            ETHERTYPE_EXPERIMENTAL,
            payload,
        ))
    }

    pub fn send_frame(&self, frame: &[u8]) -> io::Result<()> {
        self.sock.send(frame).map(drop)
    }

    /// The next frame received before `deadline` (or already queued at it), or `None`.
    pub fn recv_frame(&self, deadline: Instant) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 65_536];
        let n = self.recv_into(&mut buf, deadline)?;
        buf.truncate(n);
        Some(buf)
    }

    /// Like [`FakeVm::recv_frame`], into `buf`; answers the frame's length.
    pub fn recv_into(&self, buf: &mut [u8], deadline: Instant) -> Option<usize> {
        // Bounded: each turn either returns or waits for the time left (at least 50 us).
        for turn in 0..1_000_000u32 {
            let left = deadline.saturating_duration_since(Instant::now());
            // A frame already queued is returned even past the deadline (one short look).
            if left.is_zero() && turn > 0 {
                return None;
            }
            // A zero timeout means "block forever" to the socket: keep it positive.
            self.sock
                .set_read_timeout(Some(left.max(Duration::from_micros(50))))
                .ok()?;
            match self.sock.recv(buf) {
                Ok(n) => return Some(n),
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                            | io::ErrorKind::Interrupted
                            | io::ErrorKind::ConnectionRefused
                    ) => {}
                Err(_) => return None,
            }
        }
        None
    }

    /// The next frame before `deadline` whose payload (after the Ethernet header) starts with
    /// `tag`; other frames are skipped (at most 10,000 of them).
    pub fn recv_tagged(&self, tag: &[u8], deadline: Instant) -> Option<Vec<u8>> {
        for _ in 0..10_000 {
            let f = self.recv_frame(deadline)?;
            if f.len() >= ETHERNET_HEADER_LEN && f[ETHERNET_HEADER_LEN..].starts_with(tag) {
                return Some(f);
            }
        }
        None
    }

    /// Receives and discards frames until none arrives for `quiet`; answers how many.
    pub fn drain(&self, quiet: Duration) -> usize {
        let mut n = 0;
        while n < 1_000_000 && self.recv_frame(Instant::now() + quiet).is_some() {
            n += 1;
        }
        n
    }

    /// Source MAC of a received frame.
    pub fn source_of(frame: &[u8]) -> Option<MacAddr> {
        frame_addrs(frame).map(|(_, src)| src)
    }
}
