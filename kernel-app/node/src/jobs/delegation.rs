//! Job-authentication delegation (source document 4): a node handed a task for an application
//! it lacks passes it to a node that has it, with a token it signs. The target checks the
//! signature, that it is the target, that the token names this task and job, that it has not
//! expired and that it has not been seen before (no replay, no reuse for another task or
//! target).
//!
//! [`TokenAuthority`] is the seam. [`NodeKeyAuthority`] signs with the node's Ed25519
//! identity key (the one its certificate certifies) and verifies with the delegator's public
//! key as the trust layer verified it ([`PeerKeys`], filled by the driver from its
//! authenticated sessions): a token from a node without a verified session, or with a bad
//! signature, is refused. [`SharedKeyAuthority`] is a keyed-hash stand-in for tests, the
//! simulator and nodes running without trust material.

use super::record::{JobId, MAX_USER, TaskId};
use crate::auth::keys::{self, IdentityKey, PublicKey, Sig};
use crate::id::NodeId;
use crate::time::Instant;
use alloc::collections::BTreeMap;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec::Vec;
use core::cell::RefCell;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Longest signature carried.
pub const MAX_SIGNATURE: usize = 128;
/// Tokens remembered against replay. Every accepted token is kept until it expires (after
/// that it is refused as expired anyway); when this many unexpired ones are held, new tokens
/// are refused ([`DelegationError::Busy`]) rather than an unexpired one forgotten.
pub const MAX_SEEN_TOKENS: usize = 2048;
/// Of these, at most this many from one delegator, so one peer issuing long-lived tokens
/// cannot crowd out the others.
pub const MAX_SEEN_PER_DELEGATOR: usize = 256;

/// What a delegating node vouches for.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DelegationToken {
    pub job: JobId,
    pub task: TaskId,
    /// Attempt of the task this delegation belongs to.
    pub attempt: u8,
    pub user: String,
    pub delegator: NodeId,
    pub target: NodeId,
    /// Expiry on the delegator's clock, in microseconds. Nodes' clocks are not synchronised:
    /// the target accepts when its own clock is before `expires_us` (a TTL of seconds makes
    /// skew of the same order acceptable).
    pub expires_us: u64,
    /// Makes every token unique: the replay guard remembers (delegator, nonce).
    pub nonce: u64,
}

impl DelegationToken {
    /// The bytes that are signed.
    pub fn signed_bytes(&self) -> Vec<u8> {
        let mut v = b"unipeer-delegation\0".to_vec();
        v.extend_from_slice(&postcard::to_allocvec(self).unwrap_or_default());
        v
    }
}

/// Signs and verifies delegation tokens (the trust module's node keys in the real system).
pub trait TokenAuthority {
    /// This node's signature over `msg`.
    fn sign(&self, msg: &[u8]) -> Vec<u8>;
    /// Whether `sig` is `signer`'s signature over `msg`.
    fn verify(&self, signer: NodeId, msg: &[u8], sig: &[u8]) -> bool;
}

/// Stand-in authority: every node derives a per-node key from one shared secret, and a
/// signature is SHA-256(key(signer) || msg). Anyone with the secret can forge: tests only.
#[derive(Clone, Debug)]
pub struct SharedKeyAuthority {
    pub secret: [u8; 32],
    pub me: NodeId,
}

impl SharedKeyAuthority {
    fn mac(&self, signer: NodeId, msg: &[u8]) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.secret);
        h.update(signer.to_bytes());
        h.update(msg);
        h.finalize().into()
    }
}

impl TokenAuthority for SharedKeyAuthority {
    fn sign(&self, msg: &[u8]) -> Vec<u8> {
        self.mac(self.me, msg).to_vec()
    }

    fn verify(&self, signer: NodeId, msg: &[u8], sig: &[u8]) -> bool {
        // Not constant-time: a stand-in, see the type's doc.
        sig == self.mac(signer, msg)
    }
}

/// Most peer keys [`PeerKeys`] holds (more verified sessions than this: the rest are not
/// trusted for tokens until the set shrinks).
pub const MAX_PEER_KEYS: usize = 512;

/// What [`NodeKeyAuthority::verify`] decided, by outcome.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenCheckCounters {
    pub verified: u64,
    /// The signer has no verified session (no key known for its NodeId).
    pub unknown_signer: u64,
    /// Wrong length, or not the signer's signature over the token.
    pub bad_signature: u64,
    /// Keys not kept because the set was full.
    pub keys_dropped: u64,
}

/// The public keys of peers the trust layer has verified (certificate chain from the
/// authority, handshake signature), by NodeId. The driver refreshes it from its sessions;
/// a key is kept only if it hashes to its NodeId.
#[derive(Clone, Debug, Default)]
pub struct PeerKeys {
    keys: BTreeMap<NodeId, PublicKey>,
    counters: TokenCheckCounters,
}

impl PeerKeys {
    pub fn shared() -> Rc<RefCell<PeerKeys>> {
        Rc::new(RefCell::new(PeerKeys::default()))
    }

    /// Adds one verified peer's key; `false` if it does not hash to `node` or the set is full.
    pub fn insert(&mut self, node: NodeId, key: PublicKey) -> bool {
        if NodeId::from_public_key(&key) != node {
            return false;
        }
        if self.keys.len() >= MAX_PEER_KEYS && !self.keys.contains_key(&node) {
            self.counters.keys_dropped += 1;
            return false;
        }
        self.keys.insert(node, key);
        true
    }

    /// Replaces the set with the peers of the current verified sessions (peers whose
    /// sessions ended, or were cut by a revocation, are forgotten).
    pub fn replace(&mut self, peers: impl IntoIterator<Item = (NodeId, PublicKey)>) {
        self.keys.clear();
        for (node, key) in peers {
            self.insert(node, key);
        }
    }

    pub fn get(&self, node: NodeId) -> Option<PublicKey> {
        self.keys.get(&node).copied()
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    pub fn counters(&self) -> TokenCheckCounters {
        self.counters
    }
}

/// Signs tokens with this node's Ed25519 identity key; verifies them with the signer's key
/// from [`PeerKeys`] (shared with the driver, which fills it from verified sessions).
pub struct NodeKeyAuthority {
    identity: IdentityKey,
    me: NodeId,
    peers: Rc<RefCell<PeerKeys>>,
}

impl core::fmt::Debug for NodeKeyAuthority {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("NodeKeyAuthority")
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

impl NodeKeyAuthority {
    pub fn new(identity: IdentityKey, peers: Rc<RefCell<PeerKeys>>) -> Self {
        NodeKeyAuthority {
            me: identity.node_id(),
            identity,
            peers,
        }
    }
}

impl TokenAuthority for NodeKeyAuthority {
    fn sign(&self, msg: &[u8]) -> Vec<u8> {
        self.identity.sign(msg).0.to_vec()
    }

    fn verify(&self, signer: NodeId, msg: &[u8], sig: &[u8]) -> bool {
        let mut peers = self.peers.borrow_mut();
        let key = if signer == self.me {
            Some(self.identity.public())
        } else {
            peers.get(signer)
        };
        let Some(key) = key else {
            peers.counters.unknown_signer += 1;
            return false;
        };
        let ok = <[u8; 64]>::try_from(sig).is_ok_and(|s| keys::verify(&key, msg, &Sig(s)));
        if ok {
            peers.counters.verified += 1;
        } else {
            peers.counters.bad_signature += 1;
        }
        ok
    }
}

/// Why a delegated task was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DelegationError {
    BadSignature,
    NotTarget,
    WrongTask,
    Expired,
    Replayed,
    Malformed,
    /// The replay cache is full of unexpired tokens (overall or from this delegator).
    Busy,
}

/// Checks tokens and remembers the ones accepted until they expire.
#[derive(Clone, Debug, Default)]
pub struct DelegationGuard {
    /// (delegator, nonce) → expiry (µs, as the token says).
    seen: BTreeMap<(NodeId, u64), u64>,
}

impl DelegationGuard {
    /// Verifies `token` for running `task` of `job` on node `me` at `now`; on success remembers
    /// it so the same token is refused next time.
    #[allow(clippy::too_many_arguments)]
    pub fn check(
        &mut self,
        auth: &dyn TokenAuthority,
        token: &DelegationToken,
        sig: &[u8],
        me: NodeId,
        job: JobId,
        task: TaskId,
        now: Instant,
    ) -> Result<(), DelegationError> {
        if token.user.len() > MAX_USER || sig.len() > MAX_SIGNATURE {
            return Err(DelegationError::Malformed);
        }
        if !auth.verify(token.delegator, &token.signed_bytes(), sig) {
            return Err(DelegationError::BadSignature);
        }
        if token.target != me {
            return Err(DelegationError::NotTarget);
        }
        if token.task != task || token.job != job {
            return Err(DelegationError::WrongTask);
        }
        if now.as_micros() >= token.expires_us {
            return Err(DelegationError::Expired);
        }
        self.seen
            .retain(|_, &mut expires| expires > now.as_micros());
        let key = (token.delegator, token.nonce);
        if self.seen.contains_key(&key) {
            return Err(DelegationError::Replayed);
        }
        let from_delegator = self
            .seen
            .range((token.delegator, 0)..=(token.delegator, u64::MAX))
            .count();
        if self.seen.len() >= MAX_SEEN_TOKENS || from_delegator >= MAX_SEEN_PER_DELEGATOR {
            return Err(DelegationError::Busy);
        }
        self.seen.insert(key, token.expires_us);
        Ok(())
    }

    /// Unexpired tokens remembered (as of the last check).
    pub fn remembered(&self) -> usize {
        self.seen.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::id::Id;

    #[test]
    fn tokens_verify_once_for_their_task_and_target() {
        let secret = [9u8; 32];
        let x = SharedKeyAuthority { secret, me: Id(1) };
        let y = SharedKeyAuthority { secret, me: Id(2) };
        let token = DelegationToken {
            job: Id(100),
            task: Id(200),
            attempt: 0,
            user: "alice".into(),
            delegator: Id(1),
            target: Id(2),
            expires_us: 5_000_000,
            nonce: 42,
        };
        let sig = x.sign(&token.signed_bytes());
        let now = Instant::from_millis(1000);
        let mut g = DelegationGuard::default();
        let check = |g: &mut DelegationGuard, t: &DelegationToken, sig: &[u8], me, task, now| {
            g.check(&y, t, sig, me, Id(100), task, now)
        };
        assert_eq!(
            check(&mut g, &token, &sig, Id(3), Id(200), now),
            Err(DelegationError::NotTarget)
        );
        assert_eq!(
            check(&mut g, &token, &sig, Id(2), Id(201), now),
            Err(DelegationError::WrongTask)
        );
        assert_eq!(
            check(
                &mut g,
                &token,
                &sig,
                Id(2),
                Id(200),
                Instant::from_millis(6000)
            ),
            Err(DelegationError::Expired)
        );
        let mut forged = token.clone();
        forged.target = Id(3);
        assert_eq!(
            check(&mut g, &forged, &sig, Id(3), Id(200), now),
            Err(DelegationError::BadSignature),
            "retargeting breaks the signature"
        );
        let other = SharedKeyAuthority {
            secret: [8; 32],
            me: Id(1),
        };
        assert_eq!(
            check(
                &mut g,
                &token,
                &other.sign(&token.signed_bytes()),
                Id(2),
                Id(200),
                now
            ),
            Err(DelegationError::BadSignature)
        );
        assert_eq!(check(&mut g, &token, &sig, Id(2), Id(200), now), Ok(()));
        assert_eq!(
            check(&mut g, &token, &sig, Id(2), Id(200), now),
            Err(DelegationError::Replayed)
        );
    }

    fn token(delegator: NodeId, target: NodeId) -> DelegationToken {
        DelegationToken {
            job: Id(100),
            task: Id(200),
            attempt: 0,
            user: "alice".into(),
            delegator,
            target,
            expires_us: 5_000_000,
            nonce: 7,
        }
    }

    #[test]
    fn node_keys_sign_and_verify_tokens() {
        let kx = IdentityKey::from_seed(&[1; 32]);
        let ky = IdentityKey::from_seed(&[2; 32]);
        let (x_id, x_pub) = (kx.node_id(), kx.public());
        let y_id = ky.node_id();
        let x_keys = PeerKeys::shared();
        let y_keys = PeerKeys::shared();
        let x = NodeKeyAuthority::new(kx, x_keys);
        let y = NodeKeyAuthority::new(ky, y_keys.clone());
        let t = token(x_id, y_id);
        let sig = x.sign(&t.signed_bytes());
        assert_eq!(sig.len(), 64);
        let now = Instant::from_millis(1000);
        let mut g = DelegationGuard::default();

        // Unknown signer: no verified session with x yet.
        assert_eq!(
            g.check(&y, &t, &sig, y_id, Id(100), Id(200), now),
            Err(DelegationError::BadSignature)
        );
        assert_eq!(y_keys.borrow().counters().unknown_signer, 1);

        // A key that does not hash to the NodeId is not taken.
        assert!(!y_keys.borrow_mut().insert(x_id, [9; 32]));
        y_keys.borrow_mut().replace([(x_id, x_pub)]);
        assert_eq!(y_keys.borrow().len(), 1);

        // Tampered token.
        let mut tampered = t.clone();
        tampered.expires_us += 1;
        assert_eq!(
            g.check(&y, &tampered, &sig, y_id, Id(100), Id(200), now),
            Err(DelegationError::BadSignature)
        );
        // Signed by the wrong key (a member claiming to be x).
        let z = NodeKeyAuthority::new(IdentityKey::from_seed(&[3; 32]), PeerKeys::shared());
        assert_eq!(
            g.check(
                &y,
                &t,
                &z.sign(&t.signed_bytes()),
                y_id,
                Id(100),
                Id(200),
                now
            ),
            Err(DelegationError::BadSignature)
        );
        // Truncated signature.
        assert_eq!(
            g.check(&y, &t, &sig[..63], y_id, Id(100), Id(200), now),
            Err(DelegationError::BadSignature)
        );
        assert_eq!(y_keys.borrow().counters().bad_signature, 3);
        assert_eq!(g.check(&y, &t, &sig, y_id, Id(100), Id(200), now), Ok(()));
        assert_eq!(y_keys.borrow().counters().verified, 1);

        // The session ends: x's key is forgotten and its tokens refused again.
        y_keys.borrow_mut().replace([]);
        let t2 = DelegationToken { nonce: 8, ..t };
        let sig2 = x.sign(&t2.signed_bytes());
        assert_eq!(
            g.check(&y, &t2, &sig2, y_id, Id(100), Id(200), now),
            Err(DelegationError::BadSignature)
        );
        assert_eq!(y_keys.borrow().counters().unknown_signer, 2);
    }

    #[test]
    fn unexpired_tokens_are_never_forgotten_and_a_full_cache_refuses_new_ones() {
        let secret = [9u8; 32];
        let target = Id(1000);
        let verifier = SharedKeyAuthority { secret, me: target };
        let signed = |delegator: u64, nonce: u64, expires_us: u64| {
            let t = DelegationToken {
                job: Id(100),
                task: Id(200),
                attempt: 0,
                user: "alice".into(),
                delegator: Id(delegator.into()),
                target,
                expires_us,
                nonce,
            };
            let sig = SharedKeyAuthority {
                secret,
                me: Id(delegator.into()),
            }
            .sign(&t.signed_bytes());
            (t, sig)
        };
        let mut g = DelegationGuard::default();
        let now = Instant::from_millis(1000);
        let far = 60_000_000;
        let check = |g: &mut DelegationGuard, (t, sig): &(DelegationToken, Vec<u8>), now| {
            g.check(&verifier, t, sig, target, Id(100), Id(200), now)
        };
        let first = signed(1, 1, far);
        assert_eq!(check(&mut g, &first, now), Ok(()));
        // Many more tokens than the old 256-entry FIFO held, from other delegators.
        for d in 2..2 + 300 {
            assert_eq!(check(&mut g, &signed(d, 1, far), now), Ok(()));
        }
        assert_eq!(
            check(&mut g, &first, now),
            Err(DelegationError::Replayed),
            "an unexpired token stays remembered"
        );
        // One delegator gets its share, no more: the next is refused, others still pass.
        for n in 2..MAX_SEEN_PER_DELEGATOR as u64 + 1 {
            assert_eq!(check(&mut g, &signed(1, n, far), now), Ok(()));
        }
        assert_eq!(
            check(&mut g, &signed(1, 99_999, far), now),
            Err(DelegationError::Busy)
        );
        assert_eq!(check(&mut g, &signed(500, 1, far), now), Ok(()));
        // Fill the whole cache: new tokens are refused, the remembered ones still are too.
        let mut d = 1_000;
        while g.remembered() < MAX_SEEN_TOKENS {
            for n in 0..MAX_SEEN_PER_DELEGATOR as u64 {
                if g.remembered() == MAX_SEEN_TOKENS {
                    break;
                }
                assert_eq!(check(&mut g, &signed(d, n, far), now), Ok(()));
            }
            d += 1;
        }
        assert_eq!(
            check(&mut g, &signed(7_777, 1, far), now),
            Err(DelegationError::Busy)
        );
        assert_eq!(check(&mut g, &first, now), Err(DelegationError::Replayed));
        // Once they expire they are let go, and new tokens are taken again.
        let later = Instant::from_micros(far);
        let fresh = signed(7_777, 1, far + 1_000_000);
        assert_eq!(check(&mut g, &fresh, later), Ok(()));
        assert_eq!(g.remembered(), 1);
    }
}
