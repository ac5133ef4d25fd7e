use super::*;
use crate::id::{ServerTag, placeholder_public_key};

fn addr(i: u8) -> PeerAddr {
    PeerAddr {
        ipv4: [10, 0, 0, i],
        port: 7000,
    }
}

fn config(i: u8) -> NodeConfig {
    let key = placeholder_public_key(&format!("node-{i}"));
    NodeConfig::new(&key, addr(i), ServerTag(1), [i; 32])
}

fn events(n: &mut Node) -> Vec<Event> {
    core::iter::from_fn(|| n.poll_event()).collect()
}

/// Delivers every queued datagram between the nodes until quiet (a two-node `Pair`).
fn exchange(nodes: &mut [Node], now: Instant) {
    for _ in 0..100 {
        let mut moved = false;
        for i in 0..nodes.len() {
            while let Some(t) = nodes[i].poll_transmit() {
                moved = true;
                let from = nodes[i].contact().addr;
                if let Some(j) = nodes.iter().position(|n| n.contact().addr == t.dst) {
                    nodes[j].handle_datagram(now, from, &t.payload);
                }
            }
        }
        if !moved {
            return;
        }
    }
    panic!("the nodes never went quiet");
}

#[test]
fn config_is_validated() {
    let mut c = config(1);
    c.leaf_set_len = 5;
    assert_eq!(
        Node::new(c, Instant::ZERO).err(),
        Some(ConfigError::LeafSetLen(5))
    );
    let mut c = config(1);
    c.replicas = 10;
    assert_eq!(
        Node::new(c, Instant::ZERO).err(),
        Some(ConfigError::Replicas(10))
    );
    let mut c = config(1);
    c.timing.leaf_fail_ms = c.timing.keepalive_ms;
    assert_eq!(Node::new(c, Instant::ZERO).err(), Some(ConfigError::Timing));
}

#[test]
fn requests_need_a_joined_node_and_small_values() {
    let mut n = Node::new(config(1), Instant::ZERO).unwrap();
    assert_eq!(n.poll_timeout(), None);
    assert_eq!(n.lookup(Instant::ZERO, Id(5)), Err(RequestError::NotJoined));
    n.join(Instant::ZERO, &[]);
    assert_eq!(events(&mut n), vec![Event::Joined]);
    let big = vec![0u8; MAX_VALUE_LEN + 1];
    assert_eq!(
        n.put(Instant::ZERO, Id(5), &big),
        Err(RequestError::ValueTooLarge)
    );
}

#[test]
fn alone_a_node_is_every_key_root_but_cannot_ack_k_copies() {
    let mut n = Node::new(config(1), Instant::ZERO).unwrap();
    n.join(Instant::ZERO, &[]);
    events(&mut n);
    let op = n.lookup(Instant::ZERO, Id(77)).unwrap();
    let ev = events(&mut n);
    assert!(ev.contains(&Event::LookupDone {
        op,
        key: Id(77),
        root: n.contact(),
        path: vec![n.id()],
    }));
    // A majority of k = 3 (two copies) cannot exist with one node: the put fails after its
    // attempts, saying why.
    let op = n.put(Instant::ZERO, Id(9), b"v").unwrap();
    let mut now = Instant::ZERO;
    let mut failed = false;
    for _ in 0..40 {
        now = n.poll_timeout().unwrap().max(now);
        n.handle_timeout(now);
        failed |= events(&mut n).iter().any(
            |e| matches!(e, Event::PutFailed { op: o, error: PutError::NoQuorum, .. } if *o == op),
        );
    }
    assert!(failed);
}

#[test]
fn second_node_joins_through_the_first_and_both_know_each_other() {
    let mut a = {
        let mut c = config(1);
        c.replicas = 2;
        Node::new(c, Instant::ZERO).unwrap()
    };
    a.join(Instant::ZERO, &[]);
    let mut b = {
        let mut c = config(2);
        c.replicas = 2;
        Node::new(c, Instant::ZERO).unwrap()
    };
    b.join(Instant::ZERO, &[addr(1)]);
    let mut nodes = [a, b];
    exchange(&mut nodes, Instant::from_millis(1));
    let [a, b] = &mut nodes;
    assert!(b.is_joined());
    assert!(events(b).contains(&Event::Joined));
    assert!(a.leaf_set().contains(b.id()));
    assert!(b.leaf_set().contains(a.id()));
    // With k = 2, a put from b is acknowledged once both hold it.
    let key = Id::for_name(b"k");
    let op = b.put(Instant::from_millis(2), key, b"value").unwrap();
    exchange(&mut nodes, Instant::from_millis(3));
    let [a, b] = &mut nodes;
    assert!(
        events(b)
            .iter()
            .any(|e| matches!(e, Event::PutDone { op: o, .. } if *o == op))
    );
    assert!(a.records().get(key).is_some() && b.records().get(key).is_some());
    assert_eq!(a.counters().undecodable + b.counters().undecodable, 0);
}

/// Like `exchange`, through `handle_authenticated_datagram`; `verified` answers the
/// NodeId the trust layer proved for a datagram from node `i` to node `j`.
fn exchange_authenticated(
    nodes: &mut [Node],
    now: Instant,
    verified: impl Fn(usize, usize) -> NodeId,
) {
    for _ in 0..100 {
        let mut moved = false;
        for i in 0..nodes.len() {
            while let Some(t) = nodes[i].poll_transmit() {
                moved = true;
                let from = nodes[i].contact().addr;
                if let Some(j) = nodes.iter().position(|n| n.contact().addr == t.dst) {
                    nodes[j].handle_authenticated_datagram(now, from, verified(i, j), &t.payload);
                }
            }
        }
        if !moved {
            return;
        }
    }
    panic!("the nodes never went quiet");
}

fn joining_pair() -> [Node; 2] {
    let mut a = Node::new(config(1), Instant::ZERO).unwrap();
    a.join(Instant::ZERO, &[]);
    let mut b = Node::new(config(2), Instant::ZERO).unwrap();
    b.join(Instant::ZERO, &[addr(1)]);
    [a, b]
}

#[test]
fn authenticated_datagrams_must_name_the_verified_sender() {
    // Genuine: each header names the node the session verified; the join goes through.
    let mut nodes = joining_pair();
    let ids = [nodes[0].id(), nodes[1].id()];
    exchange_authenticated(&mut nodes, Instant::from_millis(1), |i, _| ids[i]);
    let [a, b] = &mut nodes;
    assert!(b.is_joined());
    assert!(a.leaf_set().contains(b.id()));
    assert_eq!(
        a.counters().sender_mismatch + b.counters().sender_mismatch,
        0
    );

    // Forged: node 2's session verified another identity than its headers claim.
    let mut nodes = joining_pair();
    let impostor = Id::for_name(b"someone else");
    let a_id = nodes[0].id();
    exchange_authenticated(&mut nodes, Instant::from_millis(1), |i, _| {
        if i == 1 { impostor } else { a_id }
    });
    let [a, b] = &mut nodes;
    assert!(!b.is_joined());
    assert!(!a.leaf_set().contains(b.id()));
    assert!(a.counters().sender_mismatch >= 1);
    assert_eq!(
        a.counters().datagrams_in,
        a.counters().sender_mismatch,
        "every datagram from the impostor was dropped"
    );
    assert_eq!(b.counters().sender_mismatch, 0);
    // The clear-mode entry point does not check (the simulator and clear mode use it).
    let before = a.counters().sender_mismatch;
    let packet = Packet {
        header: Header {
            version: WIRE_VERSION,
            sender: b.id(),
            server: ServerTag(1),
            joined: true,
        },
        message: Message::Ping { echo: None },
    };
    let bytes = wire::encode(&packet, MAX_DATAGRAM).unwrap();
    a.handle_datagram(Instant::from_millis(2), addr(2), &bytes);
    assert_eq!(a.counters().sender_mismatch, before);
    assert_eq!(a.counters().undecodable + a.counters().rejected, 0);
}
