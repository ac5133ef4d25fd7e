//! Job-authentication delegation (source document 4): a node handed a task for an application
//! it lacks passes it to a node that has it, with a token it signs. The target checks the
//! signature, that it is the target, that the token names this task and job, that it has not
//! expired and that it has not been seen before (no replay, no reuse for another task or
//! target).
//!
//! Signatures come from the trust module later; [`TokenAuthority`] is the seam, and
//! [`SharedKeyAuthority`] a keyed-hash stand-in for tests and the simulator.

use super::record::{JobId, MAX_USER, TaskId};
use crate::id::NodeId;
use crate::time::Instant;
use alloc::collections::VecDeque;
use alloc::string::String;
use alloc::vec::Vec;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Longest signature carried.
pub const MAX_SIGNATURE: usize = 128;
/// Tokens remembered against replay; a token older than its expiry is refused anyway.
pub const MAX_SEEN_TOKENS: usize = 256;

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

/// Why a delegated task was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DelegationError {
    BadSignature,
    NotTarget,
    WrongTask,
    Expired,
    Replayed,
    Malformed,
}

/// Checks tokens and remembers the ones accepted.
#[derive(Clone, Debug, Default)]
pub struct DelegationGuard {
    seen: VecDeque<(NodeId, u64, u64)>,
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
        self.seen.retain(|s| s.2 > now.as_micros());
        if self
            .seen
            .iter()
            .any(|s| (s.0, s.1) == (token.delegator, token.nonce))
        {
            return Err(DelegationError::Replayed);
        }
        if self.seen.len() >= MAX_SEEN_TOKENS {
            self.seen.pop_front();
        }
        self.seen
            .push_back((token.delegator, token.nonce, token.expires_us));
        Ok(())
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
}
