//! Limits per source address for the guest's ports: how many connection slots of a port one
//! source may hold, a token bucket per source for the UDP diagnostic and echo ports, and the
//! reflection rules (no answer to the cluster's own service ports, no answer larger than the
//! request except to the host uplink).
//!
//! The host uplink (the launch config's gateway: the host's address on the cluster segment, or
//! QEMU user networking's 10.0.2.2) is exempt from the per-source slot caps and from the size
//! rule: every host-side tool and the front-end's relays share that address, and the host's
//! root is trusted. It is not exempt from the hello/authentication deadlines.

use smoltcp::iface::{SocketHandle, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::wire::IpAddress;
use unipeer_node::launch::LaunchConfig;

/// Slots one non-host source may hold on the diagnostic TCP port (of its 12).
pub const DIAG_SLOTS_PER_SOURCE: usize = 3;
/// Sessions one non-host source may hold on the client port (of its 4).
pub const CLIENT_SLOTS_PER_SOURCE: usize = 1;
/// Connections one non-host source may hold on the job channel (of its 8).
pub const JOB_SLOTS_PER_SOURCE: usize = 2;
/// A connection must finish its hello or authentication within this, or its slot is freed.
pub const HELLO_DEADLINE_US: u64 = 3_000_000;

/// Report datagrams one non-host source may get: a burst of 8, then 20 a second.
pub const DIAG_UDP_RATE: Rate = Rate {
    burst: 8,
    refill_us: 50_000,
};
/// Echo answers one non-host source may get: a burst of 64, then 1,000 a second (a node's
/// `probe` sends one at a time).
pub const ECHO_RATE: Rate = Rate {
    burst: 64,
    refill_us: 1_000,
};
/// Sources tracked at once; the stalest is forgotten first.
const UDP_SOURCES: usize = 32;

/// A token bucket's shape.
#[derive(Clone, Copy)]
pub struct Rate {
    pub burst: u32,
    pub refill_us: u64,
}

/// The remote addresses of the TCP sockets `handles` (the sources holding a port's slots), for
/// [`SourcePolicy::over_cap`].
pub fn remote_addrs<'a>(
    sockets: &'a SocketSet<'_>,
    handles: impl Iterator<Item = SocketHandle> + 'a,
) -> impl Iterator<Item = IpAddress> + 'a {
    handles.filter_map(|h| {
        sockets
            .get::<tcp::Socket>(h)
            .remote_endpoint()
            .map(|e| e.addr)
    })
}

/// Service ports of every node in a cluster (overlay, diagnostics, echo, client, job channel):
/// a datagram from one of these is another node's service speaking, never a client, and is
/// not answered (two nodes must never bounce datagrams between each other).
pub fn is_service_port(port: u16, config: &LaunchConfig) -> bool {
    let n = &config.net;
    port == n.overlay_port
        || port == n.diag_udp_port
        || port == n.diag_tcp_port
        || port == n.echo_port
        || port == unipeer_node::jobs::client::CLIENT_PORT
        || port
            == n.overlay_port
                .wrapping_add(unipeer_node::jobs::wire::JOB_PORT_OFFSET)
}

/// Who the host is, and the per-source rules that follow from it.
#[derive(Clone, Copy)]
pub struct SourcePolicy {
    host: Option<[u8; 4]>,
}

impl SourcePolicy {
    pub fn new(config: &LaunchConfig) -> Self {
        SourcePolicy {
            host: config.net.gateway,
        }
    }

    /// Whether `addr` is the host uplink.
    pub fn is_host(&self, addr: IpAddress) -> bool {
        match (addr, self.host) {
            (IpAddress::Ipv4(a), Some(h)) => a.octets() == h,
            _ => false,
        }
    }

    /// Whether a new connection from `source` would go over `cap` given the sources of the
    /// slots already held (the new one excluded).
    pub fn over_cap(
        &self,
        source: IpAddress,
        held: impl Iterator<Item = IpAddress>,
        cap: usize,
    ) -> bool {
        !self.is_host(source) && held.filter(|a| *a == source).count() >= cap
    }

    /// The most bytes an answer to a `request_len`-byte datagram from `source` may have.
    pub fn answer_budget(&self, source: IpAddress, request_len: usize, max: usize) -> usize {
        if self.is_host(source) {
            max
        } else {
            request_len.min(max)
        }
    }
}

struct Bucket {
    addr: IpAddress,
    tokens: u32,
    last_us: u64,
}

/// Token buckets per source address, bounded in size.
pub struct RateLimiter {
    rate: Rate,
    buckets: heapless::Vec<Bucket, UDP_SOURCES>,
}

impl RateLimiter {
    pub fn new(rate: Rate) -> Self {
        RateLimiter {
            rate,
            buckets: heapless::Vec::new(),
        }
    }

    /// Takes a token for `addr`; false when its bucket is empty (the datagram is dropped).
    pub fn allow(&mut self, now_us: u64, addr: IpAddress) -> bool {
        let i = match self.buckets.iter().position(|b| b.addr == addr) {
            Some(i) => i,
            None => {
                let fresh = Bucket {
                    addr,
                    tokens: self.rate.burst,
                    last_us: now_us,
                };
                if self.buckets.is_full() {
                    // Forget the source heard from least recently.
                    let stalest = self
                        .buckets
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, b)| b.last_us)
                        .map(|(i, _)| i)
                        .unwrap_or(0);
                    self.buckets[stalest] = fresh;
                    stalest
                } else {
                    let _ = self.buckets.push(fresh);
                    self.buckets.len() - 1
                }
            }
        };
        let b = &mut self.buckets[i];
        let Rate { burst, refill_us } = self.rate;
        let refill = now_us.saturating_sub(b.last_us) / refill_us.max(1);
        if refill > 0 {
            let add = u32::try_from(refill).unwrap_or(u32::MAX);
            b.tokens = burst.min(b.tokens.saturating_add(add));
            b.last_us = b.last_us.saturating_add(refill.saturating_mul(refill_us));
        }
        if b.tokens == 0 {
            return false;
        }
        b.tokens -= 1;
        true
    }
}
