//! Certificates and chains: the authority signs peer certificates directly, or signs an
//! intermediate for a front-end, limited to one physical server and a validity window, which
//! then signs the certificates of the VMs it launches.
//!
//! A chain is leaf first: `[peer]` or `[peer, intermediate]`. Verification checks structure,
//! the authority, NodeId derivation, validity windows, the intermediate's limits and revocation
//! before any signature (signatures are the slow part on a TCG guest); each failure is its own
//! [`CertError`] so it can be counted.

use super::keys::{self, IdentityKey, PublicKey, Sig};
use crate::id::NodeId;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use serde::{Deserialize, Serialize};

/// Longest physical-server name in a certificate (the launch config's `NAME_MAX_LEN`).
pub const MAX_SERVER_LEN: usize = crate::launch::NAME_MAX_LEN;
/// Certificates in a chain: a peer certificate and at most one intermediate.
pub const MAX_CHAIN: usize = 2;
/// Largest encoded chain; keeps a handshake message within one datagram.
pub const MAX_CHAIN_LEN: usize =
    2 * (1 + 10 + 32 + 16 + 1 + MAX_SERVER_LEN + 10 + 10 + 32 + 64) + 1;

const CERT_DOMAIN: &[u8] = b"unipeer-cert-v1\0";

/// What a certificate allows its key to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CertKind {
    /// A node of the overlay.
    Peer,
    /// A front-end that may certify peers on its `server` within its validity window.
    Intermediate,
}

/// The signed part of a certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertBody {
    pub kind: CertKind,
    /// Unique per authority (intermediates issue from their own serial range); revocation names it.
    pub serial: u64,
    pub public_key: PublicKey,
    /// Must equal `NodeId::from_public_key(public_key)`.
    pub node_id: NodeId,
    /// The physical server the peer runs on; for an intermediate, the only server it may certify.
    pub server: String,
    /// Validity window, Unix milliseconds, inclusive.
    pub not_before_ms: u64,
    pub not_after_ms: u64,
    /// Public key of the signer (the authority or an intermediate).
    pub issuer: PublicKey,
}

/// A signed certificate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Certificate {
    pub body: CertBody,
    pub signature: Sig,
}

/// A certificate chain, leaf first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CertChain {
    pub certs: Vec<Certificate>,
}

/// Why a certificate chain was refused. The `Display` text is the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CertError {
    /// The chain does not decode, or breaks a size bound.
    Malformed,
    /// The chain does not end at this authority.
    WrongAuthority,
    /// The chain's links do not fit (wrong kinds, issuer mismatch, too long or empty).
    BrokenChain,
    /// A certificate's validity ended.
    Expired,
    /// A certificate is not valid yet.
    NotYetValid,
    /// The peer's server is not the one the intermediate is limited to.
    ServerOutsideLimit,
    /// The peer's validity window reaches beyond the intermediate's.
    WindowOutsideLimit,
    /// The NodeId does not derive from the certificate's public key.
    NodeIdMismatch,
    /// A certificate of the chain is on the revocation list.
    Revoked,
    /// A signature does not verify.
    BadSignature,
}

impl fmt::Display for CertError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CertError::Malformed => "certificate chain is malformed",
            CertError::WrongAuthority => "certificate chain is not from this authority",
            CertError::BrokenChain => "certificate chain links do not fit",
            CertError::Expired => "certificate expired",
            CertError::NotYetValid => "certificate not valid yet",
            CertError::ServerOutsideLimit => "peer's server is outside the intermediate's limit",
            CertError::WindowOutsideLimit => "peer's validity is outside the intermediate's window",
            CertError::NodeIdMismatch => "NodeId does not match the certificate's key",
            CertError::Revoked => "certificate revoked",
            CertError::BadSignature => "certificate signature does not verify",
        })
    }
}

impl core::error::Error for CertError {}

/// A peer whose chain verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedPeer {
    pub node_id: NodeId,
    pub public_key: PublicKey,
    pub server: String,
    /// Serials of every certificate in the chain (revoking any of them cuts the peer off).
    pub serials: Vec<u64>,
    /// The earliest `not_after_ms` of the chain: the session must end by then.
    pub not_after_ms: u64,
}

fn signed_bytes(body: &CertBody) -> Vec<u8> {
    let mut m = Vec::with_capacity(CERT_DOMAIN.len() + 200);
    m.extend_from_slice(CERT_DOMAIN);
    // Serialising a body of bounded fields into a Vec cannot fail.
    m.extend_from_slice(&postcard::to_allocvec(body).unwrap_or_default());
    m
}

impl Certificate {
    /// Signs `body` with `issuer`; `body.issuer` is set to the issuer's public key.
    pub fn issue(mut body: CertBody, issuer: &IdentityKey) -> Self {
        assert!(
            body.server.len() <= MAX_SERVER_LEN,
            "server name over bound"
        );
        body.issuer = issuer.public();
        let signature = issuer.sign(&signed_bytes(&body));
        Certificate { body, signature }
    }

    fn signature_ok(&self) -> bool {
        keys::verify(
            &self.body.issuer,
            &signed_bytes(&self.body),
            &self.signature,
        )
    }
}

impl CertChain {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }

    /// Decodes a chain, refusing trailing bytes and anything over the bounds.
    pub fn decode(bytes: &[u8]) -> Result<Self, CertError> {
        if bytes.len() > MAX_CHAIN_LEN {
            return Err(CertError::Malformed);
        }
        let (chain, rest): (CertChain, _) =
            postcard::take_from_bytes(bytes).map_err(|_| CertError::Malformed)?;
        if !rest.is_empty()
            || chain.certs.len() > MAX_CHAIN
            || chain
                .certs
                .iter()
                .any(|c| c.body.server.len() > MAX_SERVER_LEN)
        {
            return Err(CertError::Malformed);
        }
        Ok(chain)
    }

    /// The leaf (peer) certificate.
    pub fn leaf(&self) -> Option<&Certificate> {
        self.certs.first()
    }

    /// Verifies the chain against `authority` at `now_unix_ms`; `is_revoked` answers for a serial.
    pub fn verify(
        &self,
        authority: &PublicKey,
        now_unix_ms: u64,
        is_revoked: impl Fn(u64) -> bool,
    ) -> Result<VerifiedPeer, CertError> {
        let (leaf, inter) = match self.certs.as_slice() {
            [leaf] => (leaf, None),
            [leaf, inter] => (leaf, Some(inter)),
            _ => return Err(CertError::BrokenChain),
        };
        if leaf.body.kind != CertKind::Peer
            || inter.is_some_and(|i| i.body.kind != CertKind::Intermediate)
        {
            return Err(CertError::BrokenChain);
        }
        let top = inter.unwrap_or(leaf);
        if top.body.issuer != *authority {
            return Err(CertError::WrongAuthority);
        }
        if let Some(i) = inter
            && leaf.body.issuer != i.body.public_key
        {
            return Err(CertError::BrokenChain);
        }
        for c in &self.certs {
            if c.body.node_id != NodeId::from_public_key(&c.body.public_key) {
                return Err(CertError::NodeIdMismatch);
            }
        }
        for c in &self.certs {
            if now_unix_ms > c.body.not_after_ms {
                return Err(CertError::Expired);
            }
            if now_unix_ms < c.body.not_before_ms {
                return Err(CertError::NotYetValid);
            }
        }
        if let Some(i) = inter {
            if leaf.body.server != i.body.server {
                return Err(CertError::ServerOutsideLimit);
            }
            if leaf.body.not_before_ms < i.body.not_before_ms
                || leaf.body.not_after_ms > i.body.not_after_ms
            {
                return Err(CertError::WindowOutsideLimit);
            }
        }
        if self.certs.iter().any(|c| is_revoked(c.body.serial)) {
            return Err(CertError::Revoked);
        }
        // Signatures last: the top first, so a chain from elsewhere costs one verification.
        for c in self.certs.iter().rev() {
            if !c.signature_ok() {
                return Err(CertError::BadSignature);
            }
        }
        Ok(VerifiedPeer {
            node_id: leaf.body.node_id,
            public_key: leaf.body.public_key,
            server: leaf.body.server.clone(),
            serials: self.certs.iter().map(|c| c.body.serial).collect(),
            not_after_ms: self
                .certs
                .iter()
                .map(|c| c.body.not_after_ms)
                .min()
                .unwrap_or(0),
        })
    }
}

/// Builds the body of a certificate for `key` (issuer filled in by [`Certificate::issue`]).
pub fn body_for(
    kind: CertKind,
    serial: u64,
    key: &PublicKey,
    server: &str,
    not_before_ms: u64,
    not_after_ms: u64,
) -> CertBody {
    CertBody {
        kind,
        serial,
        public_key: *key,
        node_id: NodeId::from_public_key(key),
        server: String::from(server),
        not_before_ms,
        not_after_ms,
        issuer: [0; 32],
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use alloc::vec;

    pub const T0: u64 = 1_790_000_000_000;
    pub const DAY: u64 = 86_400_000;

    pub fn authority() -> IdentityKey {
        IdentityKey::from_seed(&[0xa0; 32])
    }

    /// A peer certified directly by `authority()`.
    pub fn direct_chain(seed: u8, serial: u64) -> (IdentityKey, CertChain) {
        let k = IdentityKey::from_seed(&[seed; 32]);
        let c = Certificate::issue(
            body_for(
                CertKind::Peer,
                serial,
                &k.public(),
                "server-a",
                T0 - DAY,
                T0 + DAY,
            ),
            &authority(),
        );
        (k, CertChain { certs: vec![c] })
    }

    fn intermediate(server: &str, from: u64, to: u64) -> (IdentityKey, Certificate) {
        let k = IdentityKey::from_seed(&[0xb0; 32]);
        let c = Certificate::issue(
            body_for(CertKind::Intermediate, 100, &k.public(), server, from, to),
            &authority(),
        );
        (k, c)
    }

    fn via_intermediate(server: &str, from: u64, to: u64) -> CertChain {
        let (ik, ic) = intermediate("server-a", T0 - 2 * DAY, T0 + 2 * DAY);
        let k = IdentityKey::from_seed(&[7; 32]);
        let leaf = Certificate::issue(
            body_for(CertKind::Peer, 101, &k.public(), server, from, to),
            &ik,
        );
        CertChain {
            certs: vec![leaf, ic],
        }
    }

    fn check(chain: &CertChain) -> Result<VerifiedPeer, CertError> {
        chain.verify(&authority().public(), T0, |s| s == 666)
    }

    #[test]
    fn good_chains_verify_and_round_trip() {
        let (k, chain) = direct_chain(1, 5);
        let v = check(&chain).unwrap();
        assert_eq!(v.node_id, k.node_id());
        assert_eq!(v.serials, vec![5]);
        let bytes = chain.encode();
        assert!(bytes.len() <= MAX_CHAIN_LEN);
        assert_eq!(CertChain::decode(&bytes).unwrap(), chain);

        let two = via_intermediate("server-a", T0 - DAY, T0 + DAY);
        let v = check(&two).unwrap();
        assert_eq!(v.serials, vec![101, 100]);
        assert_eq!(v.server, "server-a");
        assert!(
            two.encode().len() <= MAX_CHAIN_LEN,
            "{}",
            two.encode().len()
        );
    }

    #[test]
    fn each_rejection_is_distinct() {
        // Wrong authority: signed by another key.
        let other = IdentityKey::from_seed(&[0xee; 32]);
        let k = IdentityKey::from_seed(&[1; 32]);
        let foreign = CertChain {
            certs: vec![Certificate::issue(
                body_for(
                    CertKind::Peer,
                    1,
                    &k.public(),
                    "server-a",
                    T0 - DAY,
                    T0 + DAY,
                ),
                &other,
            )],
        };
        assert_eq!(check(&foreign), Err(CertError::WrongAuthority));

        // Broken chain: leaf not signed by the intermediate that follows it.
        let mut broken = via_intermediate("server-a", T0 - DAY, T0 + DAY);
        broken.certs[0] = direct_chain(3, 9).1.certs[0].clone();
        assert_eq!(check(&broken), Err(CertError::BrokenChain));
        // Broken chain: an intermediate used as a leaf, and an empty chain.
        let mut inter_leaf = via_intermediate("server-a", T0 - DAY, T0 + DAY);
        inter_leaf.certs.remove(0);
        assert_eq!(check(&inter_leaf), Err(CertError::BrokenChain));
        assert_eq!(
            check(&CertChain { certs: vec![] }),
            Err(CertError::BrokenChain)
        );

        // Expired and not yet valid.
        let (_, chain) = direct_chain(1, 5);
        assert_eq!(
            chain.verify(&authority().public(), T0 + 2 * DAY, |_| false),
            Err(CertError::Expired)
        );
        assert_eq!(
            chain.verify(&authority().public(), T0 - 2 * DAY, |_| false),
            Err(CertError::NotYetValid)
        );

        // Intermediate limits: another server, a longer window.
        assert_eq!(
            check(&via_intermediate("server-b", T0 - DAY, T0 + DAY)),
            Err(CertError::ServerOutsideLimit)
        );
        assert_eq!(
            check(&via_intermediate("server-a", T0 - DAY, T0 + 9 * DAY)),
            Err(CertError::WindowOutsideLimit)
        );

        // NodeId not matching the key (re-signed, so only the id is wrong).
        let mut body = chain.certs[0].body.clone();
        body.node_id = NodeId::from_public_key(&[9; 32]);
        let lying = CertChain {
            certs: vec![Certificate::issue(body, &authority())],
        };
        assert_eq!(check(&lying), Err(CertError::NodeIdMismatch));

        // Revoked serial.
        assert_eq!(check(&direct_chain(1, 666).1), Err(CertError::Revoked));
        // Revoking the intermediate revokes the peers it certified.
        let two = via_intermediate("server-a", T0 - DAY, T0 + DAY);
        assert_eq!(
            two.verify(&authority().public(), T0, |s| s == 100),
            Err(CertError::Revoked)
        );

        // Tampered body keeps the issuer but breaks the signature.
        let mut tampered = chain.clone();
        tampered.certs[0].body.server = String::from("server-z");
        assert_eq!(check(&tampered), Err(CertError::BadSignature));

        // Garbage and trailing bytes.
        assert_eq!(CertChain::decode(&[0xff; 40]), Err(CertError::Malformed));
        let mut bytes = chain.encode();
        bytes.push(0);
        assert_eq!(CertChain::decode(&bytes), Err(CertError::Malformed));
    }
}
