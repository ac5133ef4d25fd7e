//! Ethernet framing and ARP for the node (RFC 826), below smoltcp, which runs as an IP-medium
//! interface. smoltcp's own neighbour cache is a small fixed table that, after an unanswered
//! request, stays silent towards that neighbour for a second; an overlay under loss would
//! stall on it. Here the table is large, queues a few packets per unresolved neighbour and
//! retries every 100 ms.
//!
//! What it learns from (so a forged frame cannot redirect traffic): a reply to a request this
//! node sent (a neighbour it is resolving); a request addressed to this node only when the
//! sender is not yet known (an established mapping is never overwritten by a request); an IPv4
//! frame only refreshes an entry whose MAC it matches, it never adds or changes one. Other ARP
//! packets are counted (`refused`); IPv4 frames from unknown or mismatching senders are passed
//! up as usual but teach the table nothing (not counted: a peer's first frames often arrive
//! before this node has resolved it).

use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec::Vec;

/// Ethernet header length.
pub const ETH_HLEN: usize = 14;
pub const ETHERTYPE_IPV4: u16 = 0x0800;
pub const ETHERTYPE_ARP: u16 = 0x0806;
pub const BROADCAST: [u8; 6] = [0xff; 6];

/// Most neighbours remembered; the oldest is forgotten first.
const TABLE_MAX: usize = 4096;
/// An entry not refreshed for this long is asked for again.
const ENTRY_TTL_US: u64 = 300_000_000;
/// Packets held per unresolved neighbour, and unresolved neighbours at once.
const PENDING_PACKETS: usize = 8;
const PENDING_HOSTS: usize = 64;
/// First retry interval for an unanswered request (doubling up to 1.6 s), and attempts. The
/// back-off keeps a busy segment from an ARP storm: every request is a broadcast that wakes
/// every VM.
const RETRY_US: u64 = 100_000;
const MAX_TRIES: u32 = 8;

fn retry_after_us(tries: u32) -> u64 {
    RETRY_US << tries.saturating_sub(1).min(4)
}

/// Counters for the diagnostic report.
#[derive(Default, Clone, Copy)]
pub struct ArpStats {
    pub requests_sent: u64,
    pub replies_sent: u64,
    pub learned: u64,
    pub queued: u64,
    pub dropped_unresolved: u64,
    pub dropped_malformed: u64,
    /// Unsolicited replies, requests claiming a known neighbour's address with another MAC.
    pub refused: u64,
}

struct Pending {
    packets: VecDeque<Vec<u8>>,
    next_request_us: u64,
    tries: u32,
}

/// The neighbour table and the queues of packets waiting for resolution.
pub struct Neighbours {
    ip: [u8; 4],
    mac: [u8; 6],
    mask: u32,
    gateway: Option<[u8; 4]>,
    table: BTreeMap<[u8; 4], ([u8; 6], u64)>,
    pending: BTreeMap<[u8; 4], Pending>,
    pub stats: ArpStats,
}

/// Frames the ARP layer wants sent: `(destination MAC, ethertype, payload)`.
pub type Outgoing = Vec<([u8; 6], u16, Vec<u8>)>;

/// Writes an Ethernet header.
pub fn write_eth_header(frame: &mut [u8], dst: [u8; 6], src: [u8; 6], ethertype: u16) {
    frame[..6].copy_from_slice(&dst);
    frame[6..12].copy_from_slice(&src);
    frame[12..14].copy_from_slice(&ethertype.to_be_bytes());
}

impl Neighbours {
    pub fn new(ip: [u8; 4], mac: [u8; 6], prefix_len: u8, gateway: Option<[u8; 4]>) -> Self {
        let mask = if prefix_len == 0 {
            0
        } else {
            u32::MAX << (32 - u32::from(prefix_len.min(32)))
        };
        Neighbours {
            ip,
            mac,
            mask,
            gateway,
            table: BTreeMap::new(),
            pending: BTreeMap::new(),
            stats: ArpStats::default(),
        }
    }

    fn on_segment(&self, ip: [u8; 4]) -> bool {
        u32::from_be_bytes(ip) & self.mask == u32::from_be_bytes(self.ip) & self.mask
    }

    fn is_broadcast(&self, ip: [u8; 4]) -> bool {
        ip == [255; 4] || u32::from_be_bytes(ip) | self.mask == u32::MAX && self.on_segment(ip)
    }

    /// The MAC to send an IPv4 packet for `dst` to, if known.
    pub fn resolve(&mut self, now_us: u64, dst: [u8; 4]) -> Option<[u8; 6]> {
        if self.is_broadcast(dst) {
            return Some(BROADCAST);
        }
        if dst[0] >= 224 && dst[0] < 240 {
            return Some([0x01, 0x00, 0x5e, dst[1] & 0x7f, dst[2], dst[3]]);
        }
        let hop = self.next_hop(dst);
        match self.table.get(&hop) {
            Some(&(mac, at)) if now_us.saturating_sub(at) < ENTRY_TTL_US => Some(mac),
            _ => None,
        }
    }

    fn next_hop(&self, dst: [u8; 4]) -> [u8; 4] {
        if self.on_segment(dst) {
            dst
        } else {
            self.gateway.unwrap_or(dst)
        }
    }

    /// Holds an IPv4 packet for `dst` until its neighbour answers; returns the ARP request to
    /// send now, if one is due.
    pub fn hold(&mut self, now_us: u64, dst: [u8; 4], packet: &[u8]) -> Option<Vec<u8>> {
        let hop = self.next_hop(dst);
        if !self.pending.contains_key(&hop) && self.pending.len() >= PENDING_HOSTS {
            self.stats.dropped_unresolved += 1;
            return None;
        }
        let p = self.pending.entry(hop).or_insert(Pending {
            packets: VecDeque::new(),
            next_request_us: now_us,
            tries: 0,
        });
        if p.packets.len() >= PENDING_PACKETS {
            p.packets.pop_front();
            self.stats.dropped_unresolved += 1;
        }
        p.packets.push_back(packet.to_vec());
        self.stats.queued += 1;
        if p.next_request_us <= now_us {
            p.tries += 1;
            p.next_request_us = now_us + retry_after_us(p.tries);
            self.stats.requests_sent += 1;
            Some(self.request(hop))
        } else {
            None
        }
    }

    fn arp_packet(&self, op: u16, target_mac: [u8; 6], target_ip: [u8; 4]) -> Vec<u8> {
        let mut p = Vec::with_capacity(28);
        p.extend_from_slice(&1u16.to_be_bytes()); // Ethernet
        p.extend_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
        p.push(6);
        p.push(4);
        p.extend_from_slice(&op.to_be_bytes());
        p.extend_from_slice(&self.mac);
        p.extend_from_slice(&self.ip);
        p.extend_from_slice(&target_mac);
        p.extend_from_slice(&target_ip);
        p
    }

    fn request(&self, ip: [u8; 4]) -> Vec<u8> {
        self.arp_packet(1, [0; 6], ip)
    }

    fn learn(&mut self, now_us: u64, ip: [u8; 4], mac: [u8; 6], out: &mut Outgoing) {
        if !self.on_segment(ip) || ip == self.ip || mac[0] & 1 != 0 || self.is_broadcast(ip) {
            return;
        }
        if self.table.len() >= TABLE_MAX && !self.table.contains_key(&ip) {
            // Forget the stalest entry.
            if let Some(old) = self
                .table
                .iter()
                .min_by_key(|(_, (_, at))| *at)
                .map(|(k, _)| *k)
            {
                self.table.remove(&old);
            }
        }
        if self.table.insert(ip, (mac, now_us)).is_none() {
            self.stats.learned += 1;
        }
        if let Some(p) = self.pending.remove(&ip) {
            for packet in p.packets {
                out.push((mac, ETHERTYPE_IPV4, packet));
            }
        }
    }

    /// Refreshes the entry of an IPv4 packet's sender when the frame agrees with it (the
    /// traffic of an established neighbour); never adds or changes an entry.
    pub fn learn_ipv4(&mut self, now_us: u64, src_mac: [u8; 6], packet: &[u8], out: &mut Outgoing) {
        if packet.len() >= 20 && packet[0] >> 4 == 4 {
            let src = [packet[12], packet[13], packet[14], packet[15]];
            if self.table.get(&src).is_some_and(|&(mac, _)| mac == src_mac) {
                self.learn(now_us, src, src_mac, out);
            }
        }
    }

    /// Handles an ARP packet (the Ethernet payload): learns, answers requests for our address,
    /// and releases packets held for the sender.
    pub fn handle_arp(&mut self, now_us: u64, arp: &[u8], out: &mut Outgoing) {
        if arp.len() < 28
            || arp[0..2] != 1u16.to_be_bytes()
            || arp[2..4] != ETHERTYPE_IPV4.to_be_bytes()
            || arp[4] != 6
            || arp[5] != 4
        {
            self.stats.dropped_malformed += 1;
            return;
        }
        let op = u16::from_be_bytes([arp[6], arp[7]]);
        let mut sender_mac = [0u8; 6];
        sender_mac.copy_from_slice(&arp[8..14]);
        let sender_ip = [arp[14], arp[15], arp[16], arp[17]];
        let target_ip = [arp[24], arp[25], arp[26], arp[27]];
        let known = self.table.get(&sender_ip).map(|&(mac, _)| mac);
        let asked = self.pending.contains_key(&sender_ip);
        let for_us = target_ip == self.ip;
        let agrees = known == Some(sender_mac);
        // A reply we asked for (or one agreeing with what we know); a request to us from a
        // sender we do not know yet (RFC 826's merge, without overwriting a known mapping).
        let learn = match op {
            2 => for_us && (asked || agrees),
            1 => for_us && (known.is_none() || agrees),
            _ => false,
        };
        if learn {
            self.learn(now_us, sender_ip, sender_mac, out);
        } else if (op == 1 || op == 2) && (for_us || known.is_some_and(|m| m != sender_mac)) {
            self.stats.refused += 1;
        }
        if op == 1 && target_ip == self.ip && sender_mac[0] & 1 == 0 {
            self.stats.replies_sent += 1;
            out.push((
                sender_mac,
                ETHERTYPE_ARP,
                self.arp_packet(2, sender_mac, sender_ip),
            ));
        }
    }

    /// Retries due requests; gives up on neighbours that never answered.
    pub fn poll(&mut self, now_us: u64, out: &mut Outgoing) {
        let mut give_up: heapless::Vec<[u8; 4], 16> = heapless::Vec::new();
        let mut ask: heapless::Vec<[u8; 4], 16> = heapless::Vec::new();
        for (ip, p) in self.pending.iter_mut() {
            if p.next_request_us > now_us {
                continue;
            }
            if p.tries >= MAX_TRIES {
                let _ = give_up.push(*ip);
            } else {
                p.tries += 1;
                p.next_request_us = now_us + retry_after_us(p.tries);
                let _ = ask.push(*ip);
            }
        }
        for ip in give_up {
            if let Some(p) = self.pending.remove(&ip) {
                self.stats.dropped_unresolved += p.packets.len() as u64;
            }
        }
        for ip in ask {
            self.stats.requests_sent += 1;
            out.push((BROADCAST, ETHERTYPE_ARP, self.request(ip)));
        }
    }

    /// The next retry deadline.
    pub fn next_deadline_us(&self) -> Option<u64> {
        self.pending.values().map(|p| p.next_request_us).min()
    }

    /// Neighbours known.
    pub fn len(&self) -> usize {
        self.table.len()
    }
}
