//! The network: the virtio NIC under smoltcp. `Phy` frames IP packets in Ethernet and runs
//! ARP itself (`arp`), presenting an IP-medium device to smoltcp; `Stack` owns the interface
//! and the sockets.

pub mod arp;
pub mod guard;
pub mod virtio;

use alloc::boxed::Box;
use alloc::vec::Vec;

use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use smoltcp::wire::{HardwareAddress, IpCidr, Ipv4Address};
use unipeer_node::launch::LaunchConfig;

use arp::{ETH_HLEN, ETHERTYPE_ARP, ETHERTYPE_IPV4, Neighbours, Outgoing, write_eth_header};
use virtio::Nic;

/// Frames looked at per `receive` call before yielding (bounded work).
const RX_BURST: usize = 64;

/// The NIC plus Ethernet/ARP, as an IP-medium smoltcp device. Received buffers go back to the
/// device after smoltcp has read them (`recycle`).
pub struct Phy {
    pub nic: Nic,
    pub neighbours: Neighbours,
    returned: Vec<Box<[u8]>>,
    /// Frames other than IPv4-to-us and ARP (counted, dropped).
    pub rx_ignored: u64,
    now_us: u64,
}

pub struct RxTok<'a> {
    buf: Box<[u8]>,
    start: usize,
    len: usize,
    returned: &'a mut Vec<Box<[u8]>>,
}

pub struct TxTok<'a> {
    nic: &'a mut Nic,
    neighbours: &'a mut Neighbours,
    now_us: u64,
}

impl phy::RxToken for RxTok<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let r = f(&self.buf[self.start..self.start + self.len]);
        self.returned.push(self.buf);
        r
    }
}

/// Sends frames the ARP layer produced.
fn send_outgoing(nic: &mut Nic, out: &mut Outgoing) {
    let src = nic.mac;
    for (dst, ethertype, payload) in out.drain(..) {
        nic.send_frame(ETH_HLEN + payload.len(), |frame| {
            write_eth_header(frame, dst, src, ethertype);
            frame[ETH_HLEN..].copy_from_slice(&payload);
            true
        });
    }
}

impl phy::TxToken for TxTok<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut f = Some(f);
        let mut result = None;
        let src = self.nic.mac;
        let neighbours = self.neighbours;
        let now = self.now_us;
        let mut arp_request = None;
        self.nic.send_frame(ETH_HLEN + len, |frame| {
            let (header, packet) = frame.split_at_mut(ETH_HLEN);
            result = Some((f.take().expect("called once"))(packet));
            if packet.len() < 20 {
                return false;
            }
            let dst = [packet[16], packet[17], packet[18], packet[19]];
            match neighbours.resolve(now, dst) {
                Some(mac) => {
                    write_eth_header(header, mac, src, ETHERTYPE_IPV4);
                    true
                }
                None => {
                    arp_request = neighbours.hold(now, dst, packet);
                    false
                }
            }
        });
        if let Some(request) = arp_request {
            let mut out: Outgoing = alloc::vec![(arp::BROADCAST, ETHERTYPE_ARP, request)];
            send_outgoing(self.nic, &mut out);
        }
        match result {
            Some(r) => r,
            // No transmit buffer was free: smoltcp still needs its closure run; the packet is
            // dropped as a congested link would drop it (counted by the NIC).
            None => (f.take().expect("not yet called"))(&mut alloc::vec![0u8; len]),
        }
    }
}

impl phy::Device for Phy {
    type RxToken<'a> = RxTok<'a>;
    type TxToken<'a> = TxTok<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(RxTok<'_>, TxTok<'_>)> {
        let now = self.now_us;
        let mut out = Outgoing::new();
        for _ in 0..RX_BURST {
            let (buf, start, len) = self.nic.take_rx()?;
            let frame = &buf[start..start + len];
            if frame.len() < ETH_HLEN {
                self.rx_ignored += 1;
                self.returned.push(buf);
                continue;
            }
            let ethertype = u16::from_be_bytes([frame[12], frame[13]]);
            let mut src = [0u8; 6];
            src.copy_from_slice(&frame[6..12]);
            let for_us = frame[..6] == self.nic.mac || frame[0] & 1 == 1;
            match ethertype {
                ETHERTYPE_ARP => {
                    self.neighbours
                        .handle_arp(now, &frame[ETH_HLEN..], &mut out);
                    self.returned.push(buf);
                    send_outgoing(&mut self.nic, &mut out);
                }
                ETHERTYPE_IPV4 if for_us => {
                    self.neighbours
                        .learn_ipv4(now, src, &frame[ETH_HLEN..], &mut out);
                    send_outgoing(&mut self.nic, &mut out);
                    return Some((
                        RxTok {
                            buf,
                            start: start + ETH_HLEN,
                            len: len - ETH_HLEN,
                            returned: &mut self.returned,
                        },
                        TxTok {
                            nic: &mut self.nic,
                            neighbours: &mut self.neighbours,
                            now_us: now,
                        },
                    ));
                }
                _ => {
                    self.rx_ignored += 1;
                    self.returned.push(buf);
                }
            }
        }
        None
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxTok<'_>> {
        if self.nic.can_send() {
            Some(TxTok {
                nic: &mut self.nic,
                neighbours: &mut self.neighbours,
                now_us: self.now_us,
            })
        } else {
            None
        }
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ip;
        caps.max_transmission_unit = 1500;
        caps.max_burst_size = Some(virtio::QUEUE_SIZE / 2);
        caps
    }
}

impl Phy {
    /// Posts buffers smoltcp has finished with back to the device, and retries ARP requests.
    pub fn recycle(&mut self) {
        for buf in self.returned.drain(..) {
            self.nic.recycle_rx(buf);
        }
        let mut out = Outgoing::new();
        self.neighbours.poll(self.now_us, &mut out);
        send_outgoing(&mut self.nic, &mut out);
    }
}

/// Interface, sockets and device together.
pub struct Stack {
    pub iface: Interface,
    pub sockets: SocketSet<'static>,
    pub phy: Phy,
}

/// smoltcp's clock from the kernel's microseconds.
pub fn instant(now_us: u64) -> Instant {
    Instant::from_micros(now_us as i64)
}

impl Stack {
    /// Configures the interface from the launch config.
    pub fn new(config: &LaunchConfig, nic: Nic, now_us: u64) -> Stack {
        let net = &config.net;
        if nic.mac != net.mac {
            log::warn!(
                "nic: device MAC {:02x?} differs from the config's {:02x?}; using the device's",
                nic.mac,
                net.mac
            );
        }
        let neighbours = Neighbours::new(net.ipv4, nic.mac, net.prefix_len, net.gateway);
        let mut phy = Phy {
            nic,
            neighbours,
            returned: Vec::new(),
            rx_ignored: 0,
            now_us,
        };
        let mut iface_config = Config::new(HardwareAddress::Ip);
        // TCP initial sequence numbers and ephemeral ports: the launch seed with the CPU's
        // entropy (RDSEED/RDRAND where offered) mixed in.
        let mut h = <sha2::Sha256 as sha2::Digest>::new();
        sha2::Digest::update(&mut h, config.rng_seed);
        sha2::Digest::update(&mut h, b"unipeer smoltcp seed");
        sha2::Digest::update(&mut h, crate::arch::cpu::hardware_entropy());
        let digest = sha2::Digest::finalize(h);
        let seed = u64::from_le_bytes(digest[..8].try_into().expect("8 bytes"));
        iface_config.random_seed = seed;
        let mut iface = Interface::new(iface_config, &mut phy, instant(now_us));
        let ip = Ipv4Address::from(net.ipv4);
        iface.update_ip_addrs(|addrs| {
            let _ = addrs.push(IpCidr::new(ip.into(), net.prefix_len));
        });
        if let Some(gw) = net.gateway {
            let _ = iface
                .routes_mut()
                .add_default_ipv4_route(Ipv4Address::from(gw));
        }
        Stack {
            iface,
            sockets: SocketSet::new(Vec::new()),
            phy,
        }
    }

    /// Moves packets between the device and the sockets.
    pub fn poll(&mut self, now_us: u64) {
        self.phy.now_us = now_us;
        self.iface
            .poll(instant(now_us), &mut self.phy, &mut self.sockets);
        self.phy.recycle();
        self.phy.nic.reap_tx();
    }

    /// Microseconds until smoltcp next needs a poll, if it has a deadline.
    pub fn poll_delay_us(&mut self, now_us: u64) -> Option<u64> {
        let stack = self
            .iface
            .poll_delay(instant(now_us), &self.sockets)
            .map(|d| d.total_micros());
        let arp = self
            .phy
            .neighbours
            .next_deadline_us()
            .map(|at| at.saturating_sub(now_us));
        match (stack, arp) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }
}
