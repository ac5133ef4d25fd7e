//! Hostile input: random and mutated datagrams into `handle_datagram` never panic, and every
//! one that fails to decode is counted.

use unipeer_node::id::{Id, ServerTag, placeholder_public_key};
use unipeer_node::node::{Node, NodeConfig};
use unipeer_node::rng::Rng;
use unipeer_node::wire::{self, Contact, Header, LeafKind, Message, Packet, WIRE_VERSION};
use unipeer_node::{Instant, PeerAddr};

fn addr(i: u8) -> PeerAddr {
    PeerAddr {
        ipv4: [10, 0, 0, i],
        port: 7000,
    }
}

fn joined_node() -> Node {
    let cfg = NodeConfig::new(
        &placeholder_public_key("fuzz"),
        addr(1),
        ServerTag(1),
        [3; 32],
    );
    let mut n = Node::new(cfg, Instant::ZERO).unwrap();
    n.join(Instant::ZERO, &[]);
    assert!(n.is_joined());
    n
}

/// Valid packets of several kinds, to mutate.
fn seeds() -> Vec<Vec<u8>> {
    let header = Header {
        version: WIRE_VERSION,
        sender: Id(0x1234 << 100),
        server: ServerTag(7),
        joined: true,
    };
    let c = Contact {
        id: Id(99 << 110),
        addr: addr(9),
        server: ServerTag(2),
    };
    let msgs = vec![
        Message::Ping { echo: Some(5) },
        Message::LeafSet {
            kind: LeafKind::Exchange,
            members: vec![c; 5],
        },
        Message::Row {
            row: 1,
            entries: vec![c; 3],
        },
        Message::Store {
            key: Id(5),
            version: 3,
            value: vec![1; 40],
            copies: 2,
        },
        // The write's first phase and refusals: forged or mangled ones are dropped too.
        Message::VersionQuery {
            key: Id(5),
            round: 77,
        },
        Message::VersionHeld {
            key: Id(5),
            round: 77,
            version: 9,
        },
        Message::PutRefused {
            nonce: 3,
            key: Id(5),
            error: unipeer_node::node::PutError::VersionMismatch { current: 4 },
        },
    ];
    msgs.into_iter()
        .map(|message| wire::encode(&Packet { header, message }, 1200).unwrap())
        .collect()
}

#[test]
fn random_bytes_never_panic_and_are_counted() {
    let mut node = joined_node();
    let mut rng = Rng::from_u64(0xf022);
    let mut bad = 0u64;
    for i in 0..20_000u64 {
        let len = rng.below(1400) as usize;
        let mut bytes: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        if i % 2 == 0 && !bytes.is_empty() {
            bytes[0] = WIRE_VERSION; // get past the version check more often
        }
        if wire::decode(&bytes).is_err() {
            bad += 1;
        }
        node.handle_datagram(Instant::from_millis(i), addr(2), &bytes);
        node.handle_timeout(Instant::from_millis(i));
        while node.poll_transmit().is_some() {}
        while node.poll_event().is_some() {}
    }
    let c = node.counters();
    assert_eq!(c.datagrams_in, 20_000);
    assert_eq!(c.undecodable + c.bad_version, bad, "{c:?}");
    assert!(
        bad > 19_000,
        "random bytes should almost never decode: {bad}"
    );
}

#[test]
fn mutated_packets_never_panic() {
    let mut node = joined_node();
    let mut rng = Rng::from_u64(7);
    let seeds = seeds();
    let mut decoded = 0u64;
    for i in 0..50_000u64 {
        let mut b = seeds[rng.below(seeds.len() as u64) as usize].clone();
        for _ in 0..1 + rng.below(4) {
            match rng.below(3) {
                0 => {
                    let at = rng.below(b.len() as u64) as usize;
                    b[at] = rng.next_u64() as u8;
                }
                1 => b.truncate(rng.below(b.len() as u64 + 1) as usize),
                _ => b.push(rng.next_u64() as u8),
            }
            if b.is_empty() {
                break;
            }
        }
        if wire::decode(&b).is_ok() {
            decoded += 1;
        }
        node.handle_datagram(Instant::from_millis(i), addr(3), &b);
        while node.poll_transmit().is_some() {}
        while node.poll_event().is_some() {}
    }
    let c = node.counters();
    assert_eq!(c.undecodable + c.bad_version, 50_000 - decoded, "{c:?}");
    assert!(decoded > 0, "some mutations should still decode");
}
