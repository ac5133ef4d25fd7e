//! The sealing path measured on its own: two sessions between throwaway identities (certified
//! by a throwaway authority, never the node's own keys) established in memory, then each
//! datagram sealed by one end and opened by the other exactly as the overlay's are
//! (`SessionLayer::send` → `poll_transmit` → `handle_datagram` → `poll_delivered`:
//! ChaCha20-Poly1305 with the header as associated data, sequence number, replay window).
//! The host's `unipeer bench auth` and the kernel's `bench-seal` diagnostic command both use
//! the same path, so their figures compare.

use super::cert::{CertKind, Certificate, body_for};
use super::{CertChain, Channel, IdentityKey, SessionLayer, SessionLimits, WallClock};
use crate::launch::PeerAddr;
use crate::time::Instant;

/// The wall clock every throwaway identity's certificate is valid around.
pub const T0: u64 = 1_790_000_000_000;
const DAY: u64 = 86_400_000;

/// Throwaway peer `i`'s address.
pub fn addr(i: u8) -> PeerAddr {
    PeerAddr {
        ipv4: [10, 0, 0, i],
        port: 7000,
    }
}

fn layer(authority: &IdentityKey, seed: u8) -> SessionLayer {
    throwaway_layer(authority, seed, [seed ^ 0x5c; 32])
}

/// A session layer for throwaway peer `seed` (its key from the seed, certified by `authority`
/// for a day around [`T0`]), its CSPRNG seeded with `rng_seed`.
pub fn throwaway_layer(authority: &IdentityKey, seed: u8, rng_seed: [u8; 32]) -> SessionLayer {
    let key = IdentityKey::from_seed(&[seed; 32]);
    let chain = CertChain {
        certs: alloc::vec![Certificate::issue(
            body_for(
                CertKind::Peer,
                u64::from(seed),
                &key.public(),
                "bench",
                T0 - DAY,
                T0 + DAY,
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
        rng_seed,
    )
}

/// Two ends of one established session.
pub struct SealPair {
    a: SessionLayer,
    b: SessionLayer,
}

impl core::fmt::Debug for SealPair {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("SealPair")
    }
}

fn now() -> Instant {
    Instant::from_millis(1)
}

impl SealPair {
    /// Runs a full handshake between two fresh layers; `None` if it did not complete.
    pub fn new() -> Option<SealPair> {
        Self::new_timed(&mut |_| {})
    }

    /// [`SealPair::new`], calling `mark(step)` after each step (the layers built, the first
    /// send, each datagram handled: `"a<-"`/`"b<-"` with the handling end), so a caller with
    /// a clock sees where the time goes.
    pub fn new_timed(mark: &mut dyn FnMut(&'static str)) -> Option<SealPair> {
        let authority = IdentityKey::from_seed(&[0xa0; 32]);
        let mut p = SealPair {
            a: layer(&authority, 1),
            b: layer(&authority, 2),
        };
        mark("layers");
        p.a.send(now(), addr(2), Channel::Overlay, b"x").ok()?;
        mark("send");
        for _ in 0..16 {
            let mut moved = false;
            while let Some(t) = p.a.poll_transmit() {
                p.b.handle_datagram(now(), addr(1), &t.payload);
                mark("b<-");
                moved = true;
            }
            while let Some(t) = p.b.poll_transmit() {
                p.a.handle_datagram(now(), addr(2), &t.payload);
                mark("a<-");
                moved = true;
            }
            if !moved {
                break;
            }
        }
        p.b.poll_delivered()?;
        Some(p)
    }

    /// Seals `payload` at one end and opens it at the other; returns the sealed datagram's
    /// length, `None` if it did not come through.
    pub fn seal_open(&mut self, payload: &[u8]) -> Option<usize> {
        self.a
            .send(now(), addr(2), Channel::Overlay, payload)
            .ok()?;
        let d = self.a.poll_transmit()?;
        self.b.handle_datagram(now(), addr(1), &d.payload);
        let got = self.b.poll_delivered()?;
        (got.bytes.len() == payload.len()).then_some(d.payload.len())
    }
}

/// One user handshake with forward secrecy between a throwaway user and peer, both ends in
/// memory (Hello → Challenge → Proof, each end's key derived): what `bench auth` times for
/// the user side. `seed` varies nonces and ephemeral keys. Returns whether both ends
/// derived the same key.
pub fn user_handshake(seed: u8) -> bool {
    use super::user_auth::{UserAuthClient, UserAuthResponder};
    use super::users::{Allowance, UserCredential, UserEntry, UserList};
    let authority = IdentityKey::from_seed(&[0xa0; 32]);
    let list = UserList::issue(
        1,
        T0,
        alloc::vec![UserEntry {
            name: "bench".into(),
            allowed: alloc::vec![Allowance::AnyPeer],
        }],
        &authority,
    );
    let cred = UserCredential {
        user: "bench".into(),
        psk: [0x42; 32],
    };
    let node = crate::id::NodeId::from_public_key(&[seed; 32]);
    let (client, hello) = UserAuthClient::start(cred.clone(), [seed; 32], [seed ^ 0x11; 32]);
    let Ok((responder, challenge)) = UserAuthResponder::on_hello(
        &hello,
        node,
        "bench",
        &list,
        Some(&cred),
        [seed ^ 0x22; 32],
        [seed ^ 0x33; 32],
    ) else {
        return false;
    };
    let Ok((proof, _, k_user)) = client.on_challenge(&challenge) else {
        return false;
    };
    responder.on_proof(&proof).is_ok_and(|k| k == k_user)
}

/// The X25519 work one user handshake adds for forward secrecy: an ephemeral key generated
/// and a shared secret agreed at each end. Returns the user's shared secret.
pub fn user_handshake_x25519(seed: u8) -> [u8; 32] {
    use x25519_dalek::{PublicKey as XPublic, StaticSecret};
    let u = StaticSecret::from([seed ^ 0x11; 32]);
    let p = StaticSecret::from([seed ^ 0x33; 32]);
    let (pu, pp) = (XPublic::from(&u), XPublic::from(&p));
    let a = u.diffie_hellman(&pp);
    let b = p.diffie_hellman(&pu);
    if a.as_bytes() == b.as_bytes() {
        *a.as_bytes()
    } else {
        [0; 32]
    }
}

/// The curve operations a peer handshake is made of, one at a time: `bench auth` times each on
/// the host and (through `bench-seal`) in the node, so a slow one shows by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Primitive {
    /// An Ed25519 key from its seed (a fixed-base scalar multiplication).
    KeyFromSeed,
    /// An Ed25519 signature over a handshake-sized message (SHA-512 and a fixed-base mul).
    Sign,
    /// A strict Ed25519 verification (a double-base multiplication).
    Verify,
    /// An ephemeral X25519 public key (fixed base).
    X25519Public,
    /// An X25519 agreement (the Montgomery ladder on a peer's key).
    X25519Agree,
    /// One end's setup in [`SealPair::new`]: key from seed, certificate issued by the
    /// authority, session layer built.
    Layer,
    /// 100 small heap allocations and frees in the pattern of a session's maps (not
    /// cryptography: the allocator's share).
    Alloc100,
}

impl Primitive {
    pub const ALL: [Primitive; 7] = [
        Primitive::KeyFromSeed,
        Primitive::Sign,
        Primitive::Verify,
        Primitive::X25519Public,
        Primitive::X25519Agree,
        Primitive::Layer,
        Primitive::Alloc100,
    ];

    /// Its `key` in the node's `bench-seal` line.
    pub fn key(self) -> &'static str {
        match self {
            Primitive::KeyFromSeed => "keygen_us",
            Primitive::Sign => "sign_us",
            Primitive::Verify => "verify_us",
            Primitive::X25519Public => "x25519_public_us",
            Primitive::X25519Agree => "x25519_agree_us",
            Primitive::Layer => "layer_us",
            Primitive::Alloc100 => "alloc100_us",
        }
    }
}

/// Inputs prepared once, so that [`Primitives::run`] times the operation alone.
pub struct Primitives {
    key: IdentityKey,
    authority: IdentityKey,
    public: super::PublicKey,
    message: [u8; 96],
    sig: super::Sig,
    secret: x25519_dalek::StaticSecret,
    peer: x25519_dalek::PublicKey,
}

impl core::fmt::Debug for Primitives {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str("Primitives")
    }
}

impl Default for Primitives {
    fn default() -> Self {
        Self::new()
    }
}

impl Primitives {
    pub fn new() -> Primitives {
        let key = IdentityKey::from_seed(&[0x31; 32]);
        let message = [0x6d; 96];
        let sig = key.sign(&message);
        let peer_secret = x25519_dalek::StaticSecret::from([0x44; 32]);
        Primitives {
            authority: IdentityKey::from_seed(&[0xa0; 32]),
            public: key.public(),
            key,
            message,
            sig,
            secret: x25519_dalek::StaticSecret::from([0x55; 32]),
            peer: x25519_dalek::PublicKey::from(&peer_secret),
        }
    }

    /// Runs `p` once (`seed` varies its input where that is free); whether it gave the
    /// expected answer.
    pub fn run(&self, p: Primitive, seed: u8) -> bool {
        match p {
            Primitive::KeyFromSeed => IdentityKey::from_seed(&[seed; 32]).public() != [0; 32],
            Primitive::Sign => {
                let mut m = self.message;
                m[0] = seed;
                self.key.sign(&m).0 != [0; 64]
            }
            Primitive::Verify => super::keys::verify(&self.public, &self.message, &self.sig),
            Primitive::X25519Public => {
                let s = x25519_dalek::StaticSecret::from([seed; 32]);
                x25519_dalek::PublicKey::from(&s).to_bytes() != [0; 32]
            }
            Primitive::X25519Agree => self.secret.diffie_hellman(&self.peer).was_contributory(),
            Primitive::Layer => {
                let l = throwaway_layer(&self.authority, seed, [seed; 32]);
                core::hint::black_box(&l);
                true
            }
            Primitive::Alloc100 => {
                let mut m = alloc::collections::BTreeMap::new();
                for i in 0..100u32 {
                    m.insert(i, alloc::vec![seed; 48 + (i as usize % 7) * 16]);
                }
                core::hint::black_box(&m);
                m.len() == 100
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::SEAL_OVERHEAD;

    #[test]
    fn the_user_handshake_agrees_on_a_key() {
        assert!(user_handshake(1) && user_handshake(2));
        assert_ne!(user_handshake_x25519(1), [0; 32]);
    }

    #[test]
    fn every_primitive_answers_as_expected() {
        let p = Primitives::new();
        for prim in Primitive::ALL {
            assert!(p.run(prim, 3), "{prim:?}");
        }
    }

    #[test]
    fn a_pair_seals_and_opens() {
        let mut p = SealPair::new().expect("handshake");
        for size in [64, 1200] {
            let payload = alloc::vec![7u8; size];
            assert_eq!(p.seal_open(&payload), Some(size + SEAL_OVERHEAD));
        }
    }
}
