//! Feeds arbitrary bytes to every trust-layer decoder and to a live `SessionLayer` (one that
//! already has a session, so sealed datagrams reach the AEAD). Nothing may panic, and nothing
//! may be delivered; what decodes round-trips.
#![no_main]

use libfuzzer_sys::fuzz_target;
use unipeer_node::Instant;
use unipeer_node::auth::cert::{CertKind, Certificate, body_for};
use unipeer_node::auth::{
    CertChain, Channel, IdentityKey, RevocationList, SessionLayer, SessionLimits, TrustMessage,
    UserAuthMessage, UserList, WallClock,
};
use unipeer_node::launch::PeerAddr;

const T0: u64 = 1_790_000_000_000;

fn layer(authority: &IdentityKey, seed: u8) -> SessionLayer {
    let key = IdentityKey::from_seed(&[seed; 32]);
    let chain = CertChain {
        certs: vec![Certificate::issue(
            body_for(
                CertKind::Peer,
                seed as u64,
                &key.public(),
                "fuzz",
                T0 - 1,
                T0 + 1_000_000,
            ),
            authority,
        )],
    };
    SessionLayer::new(
        key,
        &chain,
        authority.public(),
        WallClock::new(T0, Instant::ZERO),
        SessionLimits::default(),
        [seed; 32],
    )
}

fn addr(i: u8) -> PeerAddr {
    PeerAddr {
        ipv4: [10, 0, 0, i],
        port: 7000,
    }
}

fuzz_target!(|data: &[u8]| {
    let _ = CertChain::decode(data);
    let _ = RevocationList::decode(data);
    let _ = UserList::decode(data);
    if let Some(m) = UserAuthMessage::decode(data) {
        assert_eq!(
            UserAuthMessage::decode(&m.encode()),
            Some(m),
            "auth round trip"
        );
    }
    // Trust messages (revocations, credential delegation) round-trip.
    if let Some(m) = TrustMessage::decode(data) {
        assert_eq!(
            TrustMessage::decode(&m.encode()),
            Some(m),
            "trust round trip"
        );
    }

    let authority = IdentityKey::from_seed(&[0xa0; 32]);
    let mut a = layer(&authority, 1);
    let mut b = layer(&authority, 2);
    let now = Instant::from_millis(1);
    a.send(now, addr(2), Channel::Overlay, b"x").unwrap();
    for _ in 0..8 {
        while let Some(t) = a.poll_transmit() {
            b.handle_datagram(now, addr(1), &t.payload);
        }
        while let Some(t) = b.poll_transmit() {
            a.handle_datagram(now, addr(2), &t.payload);
        }
    }
    assert!(b.poll_delivered().is_some());
    // The input, split on 0xfe into datagrams, from the session's peer address.
    for d in data.split(|&x| x == 0xfe) {
        b.handle_datagram(now, addr(1), d);
    }
    assert!(
        b.poll_delivered().is_none(),
        "a fuzzed datagram was delivered"
    );
});
