//! The network: the virtio NIC under smoltcp. `Phy` adapts the NIC to smoltcp's `Device`;
//! `Stack` owns the interface and the sockets.

pub mod virtio;

use alloc::boxed::Box;
use alloc::vec::Vec;

use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use smoltcp::wire::{EthernetAddress, HardwareAddress, IpCidr, Ipv4Address};
use unipeer_node::launch::LaunchConfig;

use virtio::Nic;

/// The NIC as a smoltcp device. Received buffers go back to the device after smoltcp has read
/// them (`recycle`).
pub struct Phy {
    pub nic: Nic,
    returned: Vec<Box<[u8]>>,
}

pub struct RxTok<'a> {
    buf: Box<[u8]>,
    start: usize,
    len: usize,
    returned: &'a mut Vec<Box<[u8]>>,
}

pub struct TxTok<'a> {
    nic: &'a mut Nic,
}

impl phy::RxToken for RxTok<'_> {
    fn consume<R, F: FnOnce(&[u8]) -> R>(self, f: F) -> R {
        let r = f(&self.buf[self.start..self.start + self.len]);
        self.returned.push(self.buf);
        r
    }
}

impl phy::TxToken for TxTok<'_> {
    fn consume<R, F: FnOnce(&mut [u8]) -> R>(self, len: usize, f: F) -> R {
        let mut f = Some(f);
        if let Some(r) = self
            .nic
            .send_with(len, |buf| (f.take().expect("called once"))(buf))
        {
            return r;
        }
        // The queue was full (counted by the NIC): smoltcp still needs its closure run;
        // the frame is dropped as a congested link would drop it.
        let mut scratch = alloc::vec![0u8; len];
        (f.take().expect("not yet called"))(&mut scratch)
    }
}

impl phy::Device for Phy {
    type RxToken<'a> = RxTok<'a>;
    type TxToken<'a> = TxTok<'a>;

    fn receive(&mut self, _now: Instant) -> Option<(RxTok<'_>, TxTok<'_>)> {
        let (buf, start, len) = self.nic.take_rx()?;
        Some((
            RxTok {
                buf,
                start,
                len,
                returned: &mut self.returned,
            },
            TxTok { nic: &mut self.nic },
        ))
    }

    fn transmit(&mut self, _now: Instant) -> Option<TxTok<'_>> {
        if self.nic.can_send() {
            Some(TxTok { nic: &mut self.nic })
        } else {
            None
        }
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = 1514;
        caps.max_burst_size = Some(virtio::QUEUE_SIZE / 2);
        caps
    }
}

impl Phy {
    /// Posts buffers smoltcp has finished with back to the device.
    pub fn recycle(&mut self) {
        for buf in self.returned.drain(..) {
            self.nic.recycle_rx(buf);
        }
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
        let mac = EthernetAddress(nic.mac);
        let mut phy = Phy {
            nic,
            returned: Vec::new(),
        };
        let mut iface_config = Config::new(HardwareAddress::Ethernet(mac));
        let seed = u64::from_le_bytes(config.rng_seed[..8].try_into().expect("8 bytes"));
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
        self.iface
            .poll(instant(now_us), &mut self.phy, &mut self.sockets);
        self.phy.recycle();
        self.phy.nic.reap_tx();
    }

    /// Microseconds until smoltcp next needs a poll, if it has a deadline.
    pub fn poll_delay_us(&mut self, now_us: u64) -> Option<u64> {
        self.iface
            .poll_delay(instant(now_us), &self.sockets)
            .map(|d| d.total_micros())
    }
}
