//! The revocation list: authority-signed, versioned, small enough for one datagram so it can
//! spread through the overlay; a newer version replaces an older one, never the reverse.

use super::keys::{self, IdentityKey, PublicKey, Sig};
use alloc::vec::Vec;
use core::fmt;
use serde::{Deserialize, Serialize};

/// Most serials one list revokes (keeps the list within one sealed datagram).
pub const MAX_REVOKED: usize = 96;
/// Largest encoded list.
pub const MAX_REVOCATION_LEN: usize = 10 + 10 + 32 + 1 + MAX_REVOKED * 10 + 64;

const REVOCATION_DOMAIN: &[u8] = b"unipeer-revocations-v1\0";

/// The signed part of a revocation list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationBody {
    pub version: u64,
    pub issued_unix_ms: u64,
    pub authority: PublicKey,
    /// Revoked certificate serials, ascending.
    pub serials: Vec<u64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevocationList {
    pub body: RevocationBody,
    pub signature: Sig,
}

/// Why a revocation list was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RevocationError {
    /// Does not decode, or breaks a bound.
    Malformed,
    /// Signed by (or naming) another authority.
    WrongAuthority,
    BadSignature,
    /// Not newer than the list already held.
    Stale,
}

impl fmt::Display for RevocationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RevocationError::Malformed => "revocation list is malformed",
            RevocationError::WrongAuthority => "revocation list is not from this authority",
            RevocationError::BadSignature => "revocation list signature does not verify",
            RevocationError::Stale => "revocation list is not newer than the one held",
        })
    }
}

impl core::error::Error for RevocationError {}

fn signed_bytes(body: &RevocationBody) -> Vec<u8> {
    let mut m = Vec::from(REVOCATION_DOMAIN);
    m.extend_from_slice(&postcard::to_allocvec(body).unwrap_or_default());
    m
}

impl RevocationList {
    /// Signs a list; serials are sorted and deduplicated first.
    pub fn issue(
        version: u64,
        issued_unix_ms: u64,
        mut serials: Vec<u64>,
        authority: &IdentityKey,
    ) -> Self {
        serials.sort_unstable();
        serials.dedup();
        assert!(serials.len() <= MAX_REVOKED, "revocation list over bound");
        let body = RevocationBody {
            version,
            issued_unix_ms,
            authority: authority.public(),
            serials,
        };
        let signature = authority.sign(&signed_bytes(&body));
        RevocationList { body, signature }
    }

    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, RevocationError> {
        if bytes.len() > MAX_REVOCATION_LEN {
            return Err(RevocationError::Malformed);
        }
        let (list, rest): (RevocationList, _) =
            postcard::take_from_bytes(bytes).map_err(|_| RevocationError::Malformed)?;
        if !rest.is_empty()
            || list.body.serials.len() > MAX_REVOKED
            || !list.body.serials.windows(2).all(|w| w[0] < w[1])
        {
            return Err(RevocationError::Malformed);
        }
        Ok(list)
    }

    /// Checks the list is this authority's.
    pub fn verify(&self, authority: &PublicKey) -> Result<(), RevocationError> {
        if self.body.authority != *authority {
            return Err(RevocationError::WrongAuthority);
        }
        if !keys::verify(authority, &signed_bytes(&self.body), &self.signature) {
            return Err(RevocationError::BadSignature);
        }
        Ok(())
    }

    pub fn is_revoked(&self, serial: u64) -> bool {
        self.body.serials.binary_search(&serial).is_ok()
    }
}

/// The list a node currently enforces.
#[derive(Clone, Debug, Default)]
pub struct RevocationState {
    current: Option<RevocationList>,
}

impl RevocationState {
    pub fn version(&self) -> u64 {
        self.current.as_ref().map_or(0, |l| l.body.version)
    }

    pub fn current(&self) -> Option<&RevocationList> {
        self.current.as_ref()
    }

    pub fn is_revoked(&self, serial: u64) -> bool {
        self.current.as_ref().is_some_and(|l| l.is_revoked(serial))
    }

    /// Takes `list` if it is this authority's and newer than the one held. The version check
    /// comes first: a stale copy (the common case while a list spreads) costs no signature check.
    pub fn offer(
        &mut self,
        list: RevocationList,
        authority: &PublicKey,
    ) -> Result<(), RevocationError> {
        if list.body.version <= self.version() {
            return Err(RevocationError::Stale);
        }
        list.verify(authority)?;
        self.current = Some(list);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn newer_replaces_older_and_forgeries_fail() {
        let auth = IdentityKey::from_seed(&[1; 32]);
        let other = IdentityKey::from_seed(&[2; 32]);
        let mut st = RevocationState::default();
        let v1 = RevocationList::issue(1, 0, vec![9, 3, 3], &auth);
        assert_eq!(v1.body.serials, vec![3, 9]);
        let v1 = RevocationList::decode(&v1.encode()).unwrap();
        st.offer(v1.clone(), &auth.public()).unwrap();
        assert!(st.is_revoked(3) && st.is_revoked(9) && !st.is_revoked(4));
        assert_eq!(st.offer(v1, &auth.public()), Err(RevocationError::Stale));
        let v2 = RevocationList::issue(2, 0, vec![4], &auth);
        st.offer(v2.clone(), &auth.public()).unwrap();
        assert!(st.is_revoked(4) && !st.is_revoked(3));
        let old = RevocationList::issue(1, 0, vec![], &auth);
        assert_eq!(st.offer(old, &auth.public()), Err(RevocationError::Stale));

        let foreign = RevocationList::issue(5, 0, vec![], &other);
        assert_eq!(
            st.offer(foreign, &auth.public()),
            Err(RevocationError::WrongAuthority)
        );
        let mut forged = v2.clone();
        forged.body.version = 7;
        assert_eq!(
            st.offer(forged, &auth.public()),
            Err(RevocationError::BadSignature)
        );
        assert_eq!(st.version(), 2);

        let full = RevocationList::issue(
            3,
            u64::MAX,
            (0..MAX_REVOKED as u64).map(|s| u64::MAX - s).collect(),
            &auth,
        );
        assert!(
            full.encode().len() <= MAX_REVOCATION_LEN,
            "{}",
            full.encode().len()
        );
        assert_eq!(
            RevocationList::decode(&[0xff; 10]),
            Err(RevocationError::Malformed)
        );
    }
}
