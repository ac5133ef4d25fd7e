//! Ed25519 identities (the authority, intermediates, peers) and the 64-byte signature type that
//! travels in certificates, lists and handshakes.

use crate::id::NodeId;
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// An Ed25519 public key (32 bytes, compressed Edwards point).
pub type PublicKey = [u8; 32];

/// An Ed25519 signature.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Sig(pub [u8; 64]);

impl Serialize for Sig {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        // serde derives arrays only up to 32 elements: two halves, 64 raw bytes in postcard.
        let mut lo = [0u8; 32];
        let mut hi = [0u8; 32];
        lo.copy_from_slice(&self.0[..32]);
        hi.copy_from_slice(&self.0[32..]);
        (lo, hi).serialize(s)
    }
}

impl<'de> Deserialize<'de> for Sig {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (lo, hi) = <([u8; 32], [u8; 32])>::deserialize(d)?;
        let mut b = [0u8; 64];
        b[..32].copy_from_slice(&lo);
        b[32..].copy_from_slice(&hi);
        Ok(Sig(b))
    }
}

impl core::fmt::Debug for Sig {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "Sig({:02x}{:02x}{:02x}{:02x}..)",
            self.0[0], self.0[1], self.0[2], self.0[3]
        )
    }
}

/// A private signing identity. The secret is the 32-byte Ed25519 seed; it is zeroised on drop
/// and never printed.
pub struct IdentityKey {
    key: SigningKey,
}

impl IdentityKey {
    /// The identity of a 32-byte seed (from the host's OS RNG, or the node's launch config).
    pub fn from_seed(seed: &[u8; 32]) -> Self {
        IdentityKey {
            key: SigningKey::from_bytes(seed),
        }
    }

    /// The seed, for storing in an owner-only file or a launch config.
    pub fn seed(&self) -> [u8; 32] {
        self.key.to_bytes()
    }

    pub fn public(&self) -> PublicKey {
        self.key.verifying_key().to_bytes()
    }

    /// The overlay NodeId of this identity (SHA-256 of the public key, see [`crate::id`]).
    pub fn node_id(&self) -> NodeId {
        NodeId::from_public_key(&self.public())
    }

    pub fn sign(&self, message: &[u8]) -> Sig {
        Sig(self.key.sign(message).to_bytes())
    }
}

impl core::fmt::Debug for IdentityKey {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(
            f,
            "IdentityKey {{ public: {:02x?}.., .. }}",
            &self.public()[..4]
        )
    }
}

/// Strict Ed25519 verification (rejects small-order keys and non-canonical signatures).
pub fn verify(public: &PublicKey, message: &[u8], sig: &Sig) -> bool {
    let Ok(key) = VerifyingKey::from_bytes(public) else {
        return false;
    };
    let sig = ed25519_dalek::Signature::from_bytes(&sig.0);
    key.verify_strict(message, &sig).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sign_verify_and_encoding() {
        let k = IdentityKey::from_seed(&[5; 32]);
        let s = k.sign(b"hello");
        assert!(verify(&k.public(), b"hello", &s));
        assert!(!verify(&k.public(), b"hellO", &s));
        let other = IdentityKey::from_seed(&[6; 32]);
        assert!(!verify(&other.public(), b"hello", &s));
        let bytes = postcard::to_allocvec(&s).unwrap();
        assert_eq!(bytes.len(), 64);
        assert_eq!(postcard::from_bytes::<Sig>(&bytes).unwrap(), s);
        assert_eq!(IdentityKey::from_seed(&k.seed()).public(), k.public());
        assert_eq!(k.node_id(), NodeId::from_public_key(&k.public()));
    }
}
