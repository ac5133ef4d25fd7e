//! Session layer tests: a small network that shuttles datagrams between layers, with hooks to
//! drop, capture and forge them, and virtual time.

use super::*;
use crate::auth::cert::tests::{DAY, T0, authority};
use crate::auth::cert::{CertKind, Certificate, body_for};
use crate::auth::delegation::{CredentialDelegator, DelegationEvent};
use crate::auth::user_auth::{UserAuthClient, UserAuthError, UserAuthMessage, UserAuthResponder};
use crate::auth::users::{Allowance, UserCredential, UserEntry, UserList};
use alloc::vec;
use alloc::vec::Vec;

fn addr(i: usize) -> PeerAddr {
    PeerAddr {
        ipv4: [10, 0, 0, i as u8 + 1],
        port: 7000,
    }
}

fn chain_on(key: &IdentityKey, serial: u64, server: &str, signer: &IdentityKey) -> CertChain {
    CertChain {
        certs: vec![Certificate::issue(
            body_for(
                CertKind::Peer,
                serial,
                &key.public(),
                server,
                T0 - DAY,
                T0 + DAY,
            ),
            signer,
        )],
    }
}

fn layer_with(
    seed: u8,
    chain: impl FnOnce(&IdentityKey) -> CertChain,
    limits: SessionLimits,
) -> SessionLayer {
    let key = IdentityKey::from_seed(&[seed; 32]);
    let chain = chain(&key);
    SessionLayer::new(
        key,
        &chain,
        authority().public(),
        WallClock::new(T0, Instant::ZERO),
        limits,
        [seed; 32],
    )
}

fn layer(seed: u8) -> SessionLayer {
    layer_with(
        seed,
        |k| chain_on(k, seed as u64, "server-a", &authority()),
        SessionLimits::default(),
    )
}

/// Datagrams in flight: (from, to, bytes).
type Wire = Vec<(usize, usize, Vec<u8>)>;

struct Net {
    nodes: Vec<SessionLayer>,
    now: Instant,
    /// Every datagram delivered so far.
    seen: Wire,
}

impl Net {
    fn new(nodes: Vec<SessionLayer>) -> Self {
        Net {
            nodes,
            now: Instant::from_millis(1),
            seen: vec![],
        }
    }

    fn index_of(&self, a: PeerAddr) -> Option<usize> {
        (0..self.nodes.len()).find(|&i| addr(i) == a)
    }

    /// Moves datagrams until none is left; `keep` may drop one (return false).
    fn pump_with(&mut self, mut keep: impl FnMut(usize, usize, &[u8]) -> bool) {
        for _ in 0..10_000 {
            let mut wire: Wire = vec![];
            for i in 0..self.nodes.len() {
                while let Some(t) = self.nodes[i].poll_transmit() {
                    assert!(t.payload.len() <= MAX_SEALED_DATAGRAM);
                    if let Some(j) = self.index_of(t.dst) {
                        wire.push((i, j, t.payload));
                    }
                }
            }
            if wire.is_empty() {
                return;
            }
            for (i, j, bytes) in wire {
                if keep(i, j, &bytes) {
                    self.nodes[j].handle_datagram(self.now, addr(i), &bytes);
                    self.seen.push((i, j, bytes));
                }
            }
        }
        panic!("network did not settle");
    }

    fn pump(&mut self) {
        self.pump_with(|_, _, _| true);
    }

    fn send(&mut self, from: usize, to: usize, bytes: &[u8]) {
        let now = self.now;
        self.nodes[from]
            .send(now, addr(to), Channel::Overlay, bytes)
            .unwrap();
    }

    fn delivered(&mut self, at: usize) -> Vec<Delivered> {
        core::iter::from_fn(|| self.nodes[at].poll_delivered()).collect()
    }

    /// Advances virtual time to `t`, firing timers on the way.
    fn advance_to(&mut self, t: Instant) {
        for _ in 0..10_000 {
            let next = self
                .nodes
                .iter()
                .filter_map(|n| n.poll_timeout())
                .filter(|&d| d <= t)
                .min();
            let Some(d) = next else { break };
            self.now = d.max(self.now);
            let now = self.now;
            for n in &mut self.nodes {
                n.handle_timeout(now);
            }
            self.pump();
        }
        self.now = t;
        let now = self.now;
        for n in &mut self.nodes {
            n.handle_timeout(now);
        }
        self.pump();
    }

    /// Sealed datagrams i → j seen so far.
    fn data(&self, i: usize, j: usize) -> Vec<Vec<u8>> {
        self.seen
            .iter()
            .filter(|(a, b, d)| *a == i && *b == j && d[0] == TYPE_DATA)
            .map(|(_, _, d)| d.clone())
            .collect()
    }
}

fn connected_pair() -> Net {
    let mut net = Net::new(vec![layer(1), layer(2)]);
    net.send(0, 1, b"hello");
    net.pump();
    net
}

#[test]
fn handshake_then_sealed_both_ways() {
    let mut net = connected_pair();
    let got = net.delivered(1);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].bytes, b"hello");
    assert_eq!(got[0].peer, net.nodes[0].node_id());
    assert_eq!(got[0].channel, Channel::Overlay);
    net.send(1, 0, b"back");
    net.pump();
    let got = net.delivered(0);
    assert_eq!(got[0].bytes, b"back");
    assert_eq!(got[0].peer, net.nodes[1].node_id());
    for n in &net.nodes {
        assert_eq!(n.counters().rejected(), 0, "{:?}", n.counters());
        assert_eq!(n.counters().sessions_established, 1);
    }
    assert_eq!(net.nodes[1].counters().cookies_sent, 1);
    assert_eq!(
        net.nodes[0].peer(addr(1)).unwrap().node_id,
        net.nodes[1].node_id()
    );
    // Overhead is exactly SEAL_OVERHEAD, and a full overlay datagram fits.
    let d = net.data(0, 1);
    assert_eq!(d.last().unwrap().len(), 5 + SEAL_OVERHEAD);
    let big = vec![0xab; MAX_PAYLOAD];
    net.send(0, 1, &big);
    net.pump();
    assert_eq!(net.delivered(1)[0].bytes, big);
    assert_eq!(
        net.nodes[0].send(net.now, addr(1), Channel::Overlay, &[0; MAX_PAYLOAD + 1]),
        Err(SendError::TooLong)
    );
}

#[test]
fn forged_handshakes_cost_no_signature_check() {
    let mut net = connected_pair();
    let b = &mut net.nodes[1];
    let before = *b.counters();
    let now = Instant::from_millis(5);
    let hello = |cookie| {
        frame(
            TYPE_HELLO,
            &Hello {
                version: HANDSHAKE_VERSION,
                sender: 77,
                nonce: [3; 32],
                eph: [9; 32],
                cookie,
            },
        )
    };
    // Wrong cookies are refused at one HMAC, with no state and no answer.
    for i in 0..1000u32 {
        let mut c = [0u8; COOKIE_LEN];
        c[..4].copy_from_slice(&i.to_le_bytes());
        b.handle_datagram(now, addr(9), &hello(Some(c)));
    }
    assert_eq!(b.counters().bad_cookie - before.bad_cookie, 1000);
    assert!(b.poll_transmit().is_none());
    assert!(b.half_open.is_empty());
    // A Hello without a cookie is answered statelessly.
    b.handle_datagram(now, addr(9), &hello(None));
    assert!(b.poll_transmit().is_some());
    assert!(b.half_open.is_empty());
    // Responses and Finishes for handshakes we never started are dropped by index lookup.
    let finish = frame(
        TYPE_FINISH,
        &Finish {
            receiver: 12345,
            chain: vec![1, 2, 3],
            sig: Sig([0; 64]),
            mac: [0; 32],
        },
    );
    let response = frame(
        TYPE_RESPONSE,
        &Response {
            receiver: 999,
            sender: 1,
            nonce: [0; 32],
            eph: [9; 32],
            chain: vec![],
            sig: Sig([0; 64]),
            mac: [0; 32],
        },
    );
    b.handle_datagram(now, addr(9), &finish);
    b.handle_datagram(now, addr(9), &response);
    let c = b.counters();
    assert_eq!(c.unknown_index - before.unknown_index, 2);
    // No certificate was even decoded: signature work is zero.
    assert_eq!(
        c.cert_malformed + c.cert_bad_signature + c.handshake_bad_signature,
        0
    );
    assert_eq!(c.sessions_established, before.sessions_established);
}

#[test]
fn a_peer_of_another_authority_cannot_join() {
    let other = IdentityKey::from_seed(&[0xee; 32]);
    let foreign = layer_with(
        3,
        |k| chain_on(k, 3, "server-a", &other),
        SessionLimits::default(),
    );
    let mut net = Net::new(vec![layer(1), layer(2), foreign]);
    // Foreign initiator: the responder refuses its Finish.
    net.send(2, 1, b"let me in");
    net.pump();
    assert!(net.delivered(1).is_empty());
    assert_eq!(net.nodes[1].counters().cert_wrong_authority, 1);
    assert_eq!(net.nodes[1].session_count(), 0);
    // Foreign responder: the initiator refuses its Response.
    net.send(0, 2, b"hi");
    net.pump();
    assert_eq!(net.nodes[0].counters().cert_wrong_authority, 1);
    assert!(net.delivered(2).is_empty());
}

/// Peer 2 with its wall clock two days past T0 (every certificate has expired for it).
fn late_layer() -> SessionLayer {
    let key = IdentityKey::from_seed(&[2; 32]);
    let chain = chain_on(&key, 2, "server-a", &authority());
    SessionLayer::new(
        key,
        &chain,
        authority().public(),
        WallClock::new(T0 + 2 * DAY, Instant::ZERO),
        SessionLimits::default(),
        [2; 32],
    )
}

#[test]
fn expired_revoked_and_mismatched_certificates_are_refused() {
    // Expired: the responder's wall clock is past the initiator's expiry.
    let late = late_layer();
    let mut net = Net::new(vec![layer(1), late]);
    net.send(0, 1, b"x");
    net.pump();
    assert_eq!(net.nodes[1].counters().cert_expired, 1);
    // Node 0's clock says node 1's certificate is still good; node 1 refused, so no session.
    assert_eq!(net.nodes[0].counters().cert_expired, 0);
    assert_eq!(net.nodes[1].session_count(), 0);
    assert!(net.delivered(1).is_empty());

    // Revoked before the handshake.
    let mut net = Net::new(vec![layer(1), layer(2)]);
    let list = RevocationList::issue(1, T0, vec![1], &authority());
    net.nodes[1].install_revocations(net.now, list).unwrap();
    net.send(0, 1, b"x");
    net.pump();
    assert_eq!(net.nodes[1].counters().cert_revoked, 1);
    assert!(net.delivered(1).is_empty());

    // NodeId not matching the key.
    let lying = layer_with(
        3,
        |k| {
            let mut body = body_for(
                CertKind::Peer,
                3,
                &k.public(),
                "server-a",
                T0 - DAY,
                T0 + DAY,
            );
            body.node_id = NodeId::from_public_key(&[0; 32]);
            CertChain {
                certs: vec![Certificate::issue(body, &authority())],
            }
        },
        SessionLimits::default(),
    );
    let mut net = Net::new(vec![layer(1), lying]);
    net.send(1, 0, b"x");
    net.pump();
    assert_eq!(net.nodes[0].counters().cert_node_id_mismatch, 1);
}

#[test]
fn replayed_reordered_tampered_and_truncated_datagrams_are_dropped() {
    let mut net = connected_pair();
    net.delivered(1);
    // 200 datagrams captured and withheld.
    for i in 0..200u32 {
        net.send(0, 1, &i.to_le_bytes());
    }
    let mut held: Vec<Vec<u8>> = vec![];
    while let Some(t) = net.nodes[0].poll_transmit() {
        held.push(t.payload);
    }
    let now = net.now;
    let b = &mut net.nodes[1];
    // Deliver 60..200 in order, then 199..150 again (replays), then 0 (too old), then
    // 59 down to 10 (reordered within the window of the newest).
    for d in &held[60..] {
        b.handle_datagram(now, addr(0), d);
    }
    for d in held[150..].iter().rev() {
        b.handle_datagram(now, addr(0), d);
    }
    b.handle_datagram(now, addr(0), &held[0]);
    for d in held[72..80].iter().rev() {
        b.handle_datagram(now, addr(0), d);
    }
    let c = *b.counters();
    assert_eq!(c.replayed, 50 + 8);
    assert_eq!(c.too_old, 1);
    // Three fresh datagrams, still unseen by node 1.
    let mut fresh: Vec<Vec<u8>> = vec![];
    for i in 200..203u32 {
        net.nodes[0]
            .send(now, addr(1), Channel::Overlay, &i.to_le_bytes())
            .unwrap();
        fresh.push(net.nodes[0].poll_transmit().unwrap().payload);
    }
    let b = &mut net.nodes[1];
    // One bit flipped anywhere: index, sequence number (AAD), ciphertext, tag.
    for at in [2, 9, 13, 16, fresh[0].len() - 1] {
        let mut t = fresh[0].clone();
        t[at] ^= 0x10;
        b.handle_datagram(now, addr(0), &t);
    }
    // Index byte flipped → no such session; the others → tag mismatch.
    assert_eq!(b.counters().tampered - c.tampered, 4);
    assert_eq!(b.counters().unknown_index - c.unknown_index, 1);
    // Truncated below a header + tag, and cut short by one byte.
    b.handle_datagram(now, addr(0), &fresh[1][..DATA_HEADER_LEN + TAG_LEN]);
    b.handle_datagram(now, addr(0), &fresh[1][..fresh[1].len() - 1]);
    assert_eq!(b.counters().truncated, 1);
    assert_eq!(b.counters().tampered - c.tampered, 5);
    // From another address: not the session's peer.
    b.handle_datagram(now, addr(7), &fresh[2]);
    assert_eq!(b.counters().unknown_index - c.unknown_index, 2);
    // None of that moved the window: the genuine ones still get through.
    for d in &fresh {
        b.handle_datagram(now, addr(0), d);
    }
    // Exactly the fresh ones got through: 140 in order, none twice.
    let got: Vec<u32> = net
        .delivered(1)
        .iter()
        .map(|d| u32::from_le_bytes(d.bytes[..4].try_into().unwrap()))
        .collect();
    assert_eq!(got, (60..203).collect::<Vec<_>>());
}

#[test]
fn revocation_cuts_running_sessions_and_spreads() {
    // 0 and 2 both talk to 1 and to each other; the authority revokes 1.
    let mut net = Net::new(vec![layer(1), layer(2), layer(3)]);
    net.send(0, 1, b"a");
    net.send(2, 1, b"b");
    net.send(0, 2, b"c");
    net.pump();
    assert_eq!(net.nodes[1].session_count(), 2);
    let list = RevocationList::issue(1, T0, vec![2], &authority());
    let cut = net.nodes[0].install_revocations(net.now, list).unwrap();
    assert_eq!(cut, 1);
    net.pump();
    // Node 2 learnt the list from node 0 and cut node 1 too.
    assert_eq!(net.nodes[2].revocation_version(), 1);
    assert_eq!(net.nodes[2].counters().sessions_revoked, 1);
    assert!(net.nodes[2].peer(addr(1)).is_none());
    // Node 1's sealed traffic now finds no session; a new handshake is refused.
    let before = net.nodes[0].counters().unknown_index;
    net.send(1, 0, b"still here?");
    net.pump();
    assert!(net.delivered(0).iter().all(|d| d.bytes != b"still here?"));
    let c = net.nodes[0].counters();
    assert_eq!(c.unknown_index - before, 1);
    net.advance_to(net.now.plus_ms(1));
    // After its old session is gone, node 1 re-handshakes only once it has no session at all;
    // a fresh layer for the same identity shows the refusal.
    let mut net2 = Net::new(vec![layer(1), layer(2)]);
    let list = RevocationList::issue(1, T0, vec![2], &authority());
    net2.nodes[0].install_revocations(net2.now, list).unwrap();
    net2.send(1, 0, b"again");
    net2.pump();
    assert_eq!(net2.nodes[0].counters().cert_revoked, 1);
    assert!(net2.delivered(0).is_empty());
    // Stale and forged lists change nothing.
    let stale = RevocationList::issue(1, T0, vec![], &authority());
    assert_eq!(
        net.nodes[0].install_revocations(net.now, stale),
        Err(RevocationError::Stale)
    );
    let forged = RevocationList::issue(9, T0, vec![1, 3], &IdentityKey::from_seed(&[5; 32]));
    assert_eq!(
        net.nodes[2].install_revocations(net.now, forged),
        Err(RevocationError::WrongAuthority)
    );
    assert!(net.nodes[2].peer(addr(0)).is_some());
}

#[test]
fn lost_handshake_messages_are_retransmitted_then_given_up() {
    let mut net = Net::new(vec![layer(1), layer(2)]);
    net.send(0, 1, b"x");
    // Lose the first Finish and the first ack.
    let (mut finish_lost, mut ack_lost) = (false, false);
    net.pump_with(|i, _, d| {
        if i == 0 && d[0] == TYPE_FINISH && !finish_lost {
            finish_lost = true;
            return false;
        }
        if i == 1 && d[0] == TYPE_DATA && !ack_lost {
            ack_lost = true;
            return false;
        }
        true
    });
    assert!(net.delivered(1).is_empty());
    net.advance_to(net.now.plus_ms(1_100));
    net.advance_to(net.now.plus_ms(1_100));
    let got = net.delivered(1);
    assert_eq!(got.len(), 1, "queued datagram sent once confirmed");
    // A peer that never answers: attempts run out and the queue is dropped.
    let mut net = Net::new(vec![layer(1), layer(2)]);
    net.send(0, 1, b"x");
    net.pump_with(|_, _, _| false);
    for _ in 0..10 {
        let t = net.now.plus_ms(1_000);
        net.now = t;
        net.nodes[0].handle_timeout(t);
        while net.nodes[0].poll_transmit().is_some() {}
    }
    assert_eq!(net.nodes[0].counters().handshake_timeouts, 1);
    assert_eq!(net.nodes[0].counters().queue_drops, 1);
    assert!(net.nodes[0].poll_timeout().is_none());
}

#[test]
fn sessions_rekey_and_expire() {
    let mut net = connected_pair();
    net.delivered(1);
    let limits = SessionLimits::default();
    // Past the rekey age, sending starts a new handshake; traffic continues throughout.
    net.advance_to(Instant::from_millis(limits.rekey_after_ms + 10));
    net.send(0, 1, b"during rekey");
    net.pump();
    assert_eq!(net.delivered(1)[0].bytes, b"during rekey");
    assert_eq!(net.nodes[0].counters().sessions_established, 2);
    // The old session expires; the new one carries on.
    net.advance_to(Instant::from_millis(limits.reject_after_ms + 20));
    assert!(net.nodes[0].counters().sessions_expired >= 1);
    net.send(0, 1, b"after");
    net.pump();
    assert_eq!(net.delivered(1)[0].bytes, b"after");
    // Certificates end at T0 + DAY (wall clock): every session ends with them.
    net.advance_to(Instant::from_millis(DAY + 1_000));
    assert_eq!(net.nodes[0].session_count(), 0);
    assert_eq!(net.nodes[1].session_count(), 0);
}

#[test]
fn the_session_table_is_bounded() {
    let limits = SessionLimits {
        max_sessions: 4,
        ..SessionLimits::default()
    };
    let hub = layer_with(1, |k| chain_on(k, 1, "server-a", &authority()), limits);
    let mut nodes = vec![hub];
    for s in 2..9 {
        nodes.push(layer(s));
    }
    let mut net = Net::new(nodes);
    for i in 1..8 {
        net.send(i, 0, b"hi");
        net.pump();
        net.now = net.now.plus_ms(1);
    }
    assert_eq!(net.nodes[0].session_count(), 4);
    assert_eq!(net.nodes[0].counters().sessions_evicted, 3);
    assert_eq!(net.delivered(0).len(), 7);
}

#[test]
fn one_source_holds_at_most_its_share_of_half_open_handshakes() {
    // Six initiators on one host (ports of their choosing) pass the cookie, then never answer
    // the Response; a peer on another host must still get in.
    let hub_addr = addr(0);
    let crowd_ip = [10, 0, 0, 9];
    let mut nodes: Vec<(PeerAddr, SessionLayer)> = vec![(hub_addr, layer(1))];
    for i in 0..6u16 {
        let a = PeerAddr {
            ipv4: crowd_ip,
            port: 7000 + i,
        };
        nodes.push((a, layer(2 + i as u8)));
    }
    nodes.push((addr(2), layer(9)));
    let now = Instant::from_millis(1);
    for (_, n) in nodes.iter_mut().skip(1) {
        n.send(now, hub_addr, Channel::Overlay, b"hi").unwrap();
    }
    for _ in 0..1_000 {
        let mut wire = vec![];
        for (from, n) in nodes.iter_mut() {
            while let Some(t) = n.poll_transmit() {
                wire.push((*from, t.dst, t.payload));
            }
        }
        if wire.is_empty() {
            break;
        }
        for (from, to, bytes) in wire {
            if from == hub_addr && to.ipv4 == crowd_ip && bytes[0] == TYPE_RESPONSE {
                continue;
            }
            if let Some((_, n)) = nodes.iter_mut().find(|(a, _)| *a == to) {
                n.handle_datagram(now, from, &bytes);
            }
        }
    }
    let hub = &nodes[0].1;
    let crowd = PeerAddr {
        ipv4: crowd_ip,
        port: 0,
    };
    assert_eq!(hub.half_open_from(crowd), 4);
    assert_eq!(hub.counters().half_open_source_capped, 2);
    assert_eq!(hub.session_count(), 1, "the peer on another host got in");
    let got: Vec<Delivered> = core::iter::from_fn(|| nodes[0].1.poll_delivered()).collect();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].from, addr(2));
}

/// A deterministic generator for the property tests (xorshift64*).
struct Gen(u64);
impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

#[test]
fn random_and_mutated_datagrams_never_get_through() {
    let mut net = connected_pair();
    net.send(1, 0, b"y");
    net.pump();
    net.delivered(0);
    net.delivered(1);
    let corpus: Vec<Vec<u8>> = net.seen.iter().map(|(_, _, d)| d.clone()).collect();
    assert!(corpus.iter().any(|d| d[0] == TYPE_RESPONSE));
    let before = *net.nodes[1].counters();
    let mut g = Gen(0x5eed_1234_abcd_0001);
    let now = net.now;
    for round in 0..30_000 {
        let mut d = if round % 3 == 0 {
            let len = g.below(MAX_SEALED_DATAGRAM + 50);
            let mut v: Vec<u8> = (0..len).map(|_| g.next() as u8).collect();
            if let Some(b) = v.first_mut() {
                *b = 1 + g.below(6) as u8;
            }
            v
        } else {
            corpus[g.below(corpus.len())].clone()
        };
        // Mutate: flip bytes, truncate, or extend. Always at least one change.
        match g.below(3) {
            0 if !d.is_empty() => {
                for _ in 0..1 + g.below(4) {
                    let at = g.below(d.len());
                    d[at] ^= 1 << g.below(8);
                }
                if d[0] == TYPE_DATA && round % 3 != 0 && d.len() > 5 {
                    // Keep some flips out of the index so they reach the AEAD.
                    let at = 13 + g.below(d.len() - 13);
                    d[at] ^= 0x80;
                }
            }
            1 => {
                let n = g.below(d.len() + 1);
                d.truncate(n.min(d.len().saturating_sub(1)));
            }
            _ => d.extend((0..1 + g.below(8)).map(|_| g.next() as u8)),
        }
        net.nodes[1].handle_datagram(now, addr(0), &d);
        // Answers (cookies, repeated responses) go nowhere.
        while net.nodes[1].poll_transmit().is_some() {}
    }
    let c = *net.nodes[1].counters();
    assert_eq!(
        c.delivered, before.delivered,
        "nothing forged was delivered"
    );
    assert_eq!(c.sessions_established, before.sessions_established);
    assert!(net.nodes[1].poll_delivered().is_none());
    assert!(c.tampered > before.tampered && c.malformed > before.malformed);
    // And the real session still works.
    net.send(0, 1, b"still fine");
    net.pump();
    assert_eq!(net.delivered(1)[0].bytes, b"still fine");
}

fn user_list(users: Vec<(&str, Vec<Allowance>)>) -> UserList {
    UserList::issue(
        1,
        T0,
        users
            .into_iter()
            .map(|(n, a)| UserEntry {
                name: n.into(),
                allowed: a,
            })
            .collect(),
        &authority(),
    )
}

/// Moves delegation messages between delegators over the session layers.
fn run_delegation(net: &mut Net, dels: &mut [CredentialDelegator]) {
    for _ in 0..10 {
        for (i, d) in dels.iter_mut().enumerate() {
            while let Some((to, m)) = d.poll_outbound() {
                let now = net.now;
                let bytes = TrustMessage::Delegation(m).encode();
                net.nodes[i].send(now, to, Channel::Trust, &bytes).unwrap();
            }
        }
        net.pump();
        for (i, d) in dels.iter_mut().enumerate() {
            for got in net.delivered(i) {
                assert_eq!(got.channel, Channel::Trust);
                let Some(TrustMessage::Delegation(m)) = TrustMessage::decode(&got.bytes) else {
                    panic!("not a delegation message");
                };
                let server = net.nodes[i].peer(got.from).unwrap().server.clone();
                d.handle_message(net.now, got.from, got.peer, &server, m);
            }
        }
    }
}

#[test]
fn delegation_grants_to_allowed_peers_and_refuses_others() {
    // Node 0 (server-a) holds alice's key; node 1 (server-a) may serve alice but lacks it;
    // node 2 (server-b) may not serve alice.
    let nodes = vec![
        layer(1),
        layer(2),
        layer_with(
            3,
            |k| chain_on(k, 3, "server-b", &authority()),
            SessionLimits::default(),
        ),
    ];
    let mut net = Net::new(nodes);
    let list = user_list(vec![("alice", vec![Allowance::Server("server-a".into())])]);
    let alice = UserCredential {
        user: "alice".into(),
        psk: [0x11; 32],
    };
    let ids: Vec<NodeId> = net.nodes.iter().map(|n| n.node_id()).collect();
    let mut dels = vec![
        CredentialDelegator::new(ids[0], "server-a", list.clone(), vec![alice.clone()]),
        CredentialDelegator::new(ids[1], "server-a", list.clone(), vec![]),
        CredentialDelegator::new(ids[2], "server-b", list.clone(), vec![]),
    ];

    // Alice contacts node 1, which must first obtain her credential.
    let (client, hello) = UserAuthClient::start(alice.clone(), [1; 32], [7; 32]);
    assert_eq!(
        UserAuthResponder::on_hello(&hello, ids[1], "server-a", &list, None, [2; 32], [8; 32])
            .err(),
        Some(UserAuthError::NeedCredential)
    );
    let resp =
        UserAuthResponder::relayed(&hello, ids[1], "server-a", &list, [2; 32], [8; 32]).unwrap();
    let now = net.now;
    let id = dels[1]
        .request(now, resp.transcript().clone(), &[addr(0)])
        .unwrap();
    run_delegation(&mut net, &mut dels);
    let Some(DelegationEvent::Proved { id: got, proof }) = dels[1].poll_event() else {
        panic!("node 0 proves on node 1's behalf");
    };
    assert_eq!(got, id);
    // Nothing delegated yet: only the user's proof unlocks the credential.
    assert_eq!(dels[0].counters().granted, 0);
    assert!(dels[1].credential(net.now, "alice").is_none());
    let (proof_msg, _, k1) = client.on_challenge(&resp.challenge(proof)).unwrap();
    let UserAuthMessage::Proof { proof: pu } = proof_msg else {
        panic!("a proof");
    };
    dels[1].verify(net.now, id, pu).unwrap();
    run_delegation(&mut net, &mut dels);
    assert_eq!(
        dels[1].poll_event(),
        Some(DelegationEvent::Obtained {
            id,
            user: "alice".into(),
            from: ids[0]
        })
    );
    assert_eq!(dels[0].counters().granted, 1);
    // The granted key travelled sealed: it appears in no datagram.
    assert!(
        net.seen
            .iter()
            .all(|(_, _, d)| !d.windows(32).any(|w| w == [0x11; 32]))
    );
    let cred = dels[1].credential(net.now, "alice").unwrap().clone();
    assert_eq!(
        resp.with_credential(&cred)
            .unwrap()
            .on_proof(&proof_msg)
            .unwrap(),
        k1
    );

    // Node 2 may not serve alice: its own delegator will not ask ...
    let t2 = crate::auth::user_auth::Transcript {
        node: ids[2],
        ..cred_transcript(&hello, ids[1], &list)
    };
    assert_eq!(
        dels[2].request(net.now, t2.clone(), &[addr(0)]),
        Err(crate::auth::delegation::DelegationError::NotAllowed)
    );
    // ... and a node that asks anyway (a buggy or hostile one) is refused.
    let now = net.now;
    let bytes = TrustMessage::Delegation(crate::auth::delegation::DelegationMessage::Prove {
        id: 1,
        transcript: t2,
    })
    .encode();
    net.nodes[2]
        .send(now, addr(0), Channel::Trust, &bytes)
        .unwrap();
    net.pump();
    run_delegation(&mut net, &mut dels);
    assert_eq!(dels[0].counters().refused_not_allowed, 1);
    assert_eq!(dels[0].counters().proved, 1);
    assert_eq!(dels[0].counters().granted, 1);
    assert_eq!(dels[2].held_count(), 0);
    // The refusal answers no request of node 2's own: counted, not trusted.
    assert_eq!(dels[2].counters().unsolicited, 1);

    // A request nobody can answer fails, by refusal or by timeout.
    let list2 = user_list(vec![("bob", vec![Allowance::AnyPeer])]);
    let mut lone = CredentialDelegator::new(ids[1], "server-a", list2.clone(), vec![]);
    let (_, bob_hello) = UserAuthClient::start(
        UserCredential {
            user: "bob".into(),
            psk: [5; 32],
        },
        [1; 32],
        [2; 32],
    );
    let tb = cred_transcript(&bob_hello, ids[1], &list2);
    let id = lone.request(Instant::ZERO, tb, &[addr(0)]).unwrap();
    lone.handle_timeout(Instant::from_millis(
        crate::auth::delegation::DELEGATION_TIMEOUT_MS,
    ));
    assert_eq!(
        lone.poll_event(),
        Some(DelegationEvent::Failed {
            id,
            user: "bob".into(),
            why: crate::auth::delegation::FailReason::Timeout
        })
    );
}

/// The transcript peer `node` starts for `hello` (fixed nonce and ephemeral seed).
fn cred_transcript(
    hello: &UserAuthMessage,
    node: NodeId,
    list: &UserList,
) -> crate::auth::user_auth::Transcript {
    UserAuthResponder::relayed(hello, node, "server-a", list, [2; 32], [8; 32])
        .unwrap()
        .transcript()
        .clone()
}

/// Whether `secret` keys a stream between the two ends: the connector seals with it, the
/// acceptor opens.
fn stream_works(connector: &[u8; 32], acceptor: &[u8; 32]) -> bool {
    use crate::auth::stream::{StreamRole, StreamSealer};
    let mut c = StreamSealer::new(connector, b"test stream", StreamRole::Initiator);
    let mut a = StreamSealer::new(acceptor, b"test stream", StreamRole::Responder);
    let mut frame = c.seal(b"first frame").unwrap();
    a.open(&mut frame).is_ok()
}

#[test]
fn ensure_session_gives_both_ends_one_stream_secret() {
    let mut net = Net::new(vec![layer(1), layer(2), layer(3)]);
    let now = net.now;
    assert_eq!(net.nodes[0].stream_secret(addr(1)), None);
    // Idempotent: one Hello however often it is called.
    net.nodes[0].ensure_session(now, addr(1));
    net.nodes[0].ensure_session(now, addr(1));
    assert_eq!(net.nodes[0].transmits.len(), 1);
    assert_eq!(net.nodes[0].initiating.len(), 1);
    net.pump();
    // No payload travelled; both ends hold one session and the same secret.
    assert!(net.delivered(0).is_empty() && net.delivered(1).is_empty());
    assert_eq!(net.nodes[0].session_count(), 1);
    assert_eq!(net.nodes[1].session_count(), 1);
    let s01 = net.nodes[0].stream_secret(addr(1)).unwrap();
    let s10 = net.nodes[1].stream_secret(addr(0)).unwrap();
    assert_eq!(s01, s10);
    assert_eq!(
        net.nodes[0].verified_peer_id(addr(1)),
        Some(net.nodes[1].node_id())
    );
    assert_eq!(
        net.nodes[1].verified_peer_id(addr(0)),
        Some(net.nodes[0].node_id())
    );
    // Established: calling again sends nothing.
    net.nodes[0].ensure_session(net.now, addr(1));
    net.nodes[1].ensure_session(net.now, addr(0));
    assert!(net.nodes[0].transmits.is_empty() && net.nodes[1].transmits.is_empty());
    // Per connection: equal at both ends, distinct per nonce and from the session secret.
    let c1 = net.nodes[0]
        .stream_secret_for(addr(1), &[1; 16], &[0xa5; 16])
        .unwrap();
    assert_eq!(
        net.nodes[1].stream_secret_for(addr(0), &[1; 16], &[0xa5; 16]),
        Some(c1)
    );
    let c2 = net.nodes[0]
        .stream_secret_for(addr(1), &[2; 16], &[0xa5; 16])
        .unwrap();
    assert_ne!(c1, c2);
    // The accepting end's nonce counts too: a connection recorded and replayed to the
    // acceptor meets a fresh acceptor nonce, and its first frame does not open.
    let recorded = net.nodes[0]
        .stream_secret_for(addr(1), &[1; 16], &[0xa5; 16])
        .unwrap();
    let replayed_to = net.nodes[1]
        .stream_secret_for(addr(0), &[1; 16], &[0x5a; 16])
        .unwrap();
    assert_ne!(recorded, replayed_to);
    assert!(!stream_works(&recorded, &replayed_to));
    assert!(
        net.nodes[1]
            .stream_secret_candidates_for(addr(0), &[1; 16], &[0x5a; 16])
            .iter()
            .all(|k| !stream_works(&recorded, k))
    );
    assert_eq!(
        super::connection_secret(&s01, &[1; 16], &[0xa5; 16]),
        recorded,
        "the connector derives it from the session secret once the acceptor's nonce arrives"
    );
    assert_ne!(c1, s01);
    assert!(stream_works(&c1, &c1));
    assert_eq!(
        net.nodes[1].stream_secret_candidates_for(addr(0), &[1; 16], &[0xa5; 16]),
        vec![c1]
    );
    // A third party's session with node 1 has another secret.
    net.nodes[2].ensure_session(net.now, addr(1));
    net.pump();
    let s21 = net.nodes[2].stream_secret(addr(1)).unwrap();
    assert_eq!(net.nodes[1].stream_secret(addr(2)), Some(s21));
    assert_ne!(s21, s01);
    assert!(!stream_works(
        &net.nodes[2]
            .stream_secret_for(addr(1), &[1; 16], &[0xa5; 16])
            .unwrap(),
        &c1
    ));
    for n in &net.nodes {
        assert_eq!(n.counters().rejected(), 0, "{:?}", n.counters());
    }
}

#[test]
fn simultaneous_opens_agree_on_one_stream_secret() {
    let mut net = Net::new(vec![layer(1), layer(2)]);
    let now = net.now;
    net.nodes[0].ensure_session(now, addr(1));
    net.nodes[1].ensure_session(now, addr(0));
    net.pump();
    // Two handshakes crossed: each end holds two sessions and may send on either one ...
    assert_eq!(net.nodes[0].session_count(), 2);
    assert_eq!(net.nodes[1].session_count(), 2);
    // ... but both pick the same one for streams.
    let s = net.nodes[0].stream_secret(addr(1)).unwrap();
    assert_eq!(net.nodes[1].stream_secret(addr(0)), Some(s));
    let nonce = [7; 16];
    let c = net.nodes[0]
        .stream_secret_for(addr(1), &nonce, &[0xa5; 16])
        .unwrap();
    let cands = net.nodes[1].stream_secret_candidates_for(addr(0), &nonce, &[0xa5; 16]);
    assert_eq!(cands.len(), 2);
    assert_eq!(cands[0], c);
    // Either end's other session is the other's second candidate.
    let other0 = net.nodes[0].stream_secret_candidates_for(addr(1), &nonce, &[0xa5; 16])[1];
    assert_eq!(other0, cands[1]);
    assert_ne!(other0, c);

    // Renewal: past the rekey age, ensure_session starts a new handshake (as send would);
    // the new session's secret replaces the old at both ends.
    let limits = SessionLimits::default();
    net.advance_to(Instant::from_millis(limits.rekey_after_ms + 10));
    net.nodes[0].ensure_session(net.now, addr(1));
    net.pump();
    assert_eq!(net.nodes[0].session_count(), 3);
    let renewed = net.nodes[0].stream_secret(addr(1)).unwrap();
    assert_ne!(renewed, s);
    assert_eq!(net.nodes[1].stream_secret(addr(0)), Some(renewed));
    // Once the old sessions expire the answer stays the same.
    net.advance_to(Instant::from_millis(limits.reject_after_ms + 20));
    assert_eq!(net.nodes[0].session_count(), 1);
    assert_eq!(net.nodes[0].stream_secret(addr(1)), Some(renewed));
    assert_eq!(net.nodes[1].stream_secret(addr(0)), Some(renewed));
}

#[test]
fn ensure_session_waits_for_the_peers_handshake_and_is_bounded() {
    // Node 1's handshake towards node 0 is past the cookie (its Finish lost): node 0 waits
    // for it instead of opening a second session.
    let mut net = Net::new(vec![layer(1), layer(2)]);
    let now = net.now;
    net.nodes[1].ensure_session(now, addr(0));
    let mut lost = false;
    net.pump_with(|i, _, d| {
        if i == 1 && d[0] == TYPE_FINISH && !lost {
            lost = true;
            return false;
        }
        true
    });
    assert_eq!(net.nodes[0].half_open.len(), 1);
    net.nodes[0].ensure_session(net.now, addr(1));
    assert!(net.nodes[0].initiating.is_empty());
    net.advance_to(net.now.plus_ms(1_100));
    assert_eq!(net.nodes[0].session_count(), 1);
    assert_eq!(
        net.nodes[0].stream_secret(addr(1)),
        net.nodes[1].stream_secret(addr(0))
    );
    assert!(net.nodes[0].stream_secret(addr(1)).is_some());

    // Handshakes started are bounded by max_initiating; the rest are counted.
    let limits = SessionLimits {
        max_initiating: 2,
        ..SessionLimits::default()
    };
    let mut l = layer_with(1, |k| chain_on(k, 1, "server-a", &authority()), limits);
    for i in 1..6 {
        l.ensure_session(Instant::from_millis(1), addr(i));
    }
    assert_eq!(l.initiating.len(), 2);
    assert_eq!(l.counters().queue_drops, 3);
    assert_eq!(l.stream_secret(addr(1)), None);
}

#[test]
fn revoked_and_expired_peers_get_no_stream_secret() {
    // Revoked before the handshake, whichever end starts it.
    let mut net = Net::new(vec![layer(1), layer(2)]);
    let list = RevocationList::issue(1, T0, vec![1], &authority());
    net.nodes[1].install_revocations(net.now, list).unwrap();
    let now = net.now;
    net.nodes[0].ensure_session(now, addr(1));
    net.nodes[1].ensure_session(now, addr(0));
    net.pump();
    assert_eq!(net.nodes[0].stream_secret(addr(1)), None);
    assert_eq!(net.nodes[1].stream_secret(addr(0)), None);
    assert_eq!(net.nodes[1].verified_peer_id(addr(0)), None);
    assert!(
        net.nodes[1]
            .stream_secret_candidates_for(addr(0), &[0; 16], &[0xa5; 16])
            .is_empty()
    );
    assert_eq!(net.nodes[1].counters().cert_revoked, 2);

    // Revoked while a session runs: its secret goes with it.
    let mut net = Net::new(vec![layer(1), layer(2)]);
    let now = net.now;
    net.nodes[0].ensure_session(now, addr(1));
    net.pump();
    assert!(net.nodes[1].stream_secret(addr(0)).is_some());
    let list = RevocationList::issue(1, T0, vec![1], &authority());
    net.nodes[1].install_revocations(net.now, list).unwrap();
    assert_eq!(net.nodes[1].stream_secret(addr(0)), None);

    // Expired (by the responder's clock).
    let late = late_layer();
    let mut net = Net::new(vec![layer(1), late]);
    let now = net.now;
    net.nodes[0].ensure_session(now, addr(1));
    net.pump();
    assert_eq!(net.nodes[1].counters().cert_expired, 1);
    assert_eq!(net.nodes[0].stream_secret(addr(1)), None);
    assert_eq!(net.nodes[1].stream_secret(addr(0)), None);
    // Certificates end at T0 + DAY: a running session's secret ends with them.
    let mut net = Net::new(vec![layer(1), layer(2)]);
    let now = net.now;
    net.nodes[0].ensure_session(now, addr(1));
    net.pump();
    assert!(net.nodes[0].stream_secret(addr(1)).is_some());
    net.advance_to(Instant::from_millis(DAY + 1_000));
    assert_eq!(net.nodes[0].stream_secret(addr(1)), None);
    assert_eq!(net.nodes[1].stream_secret(addr(0)), None);
}
