//! Identifiers on the overlay ring: 128-bit node ids and keys, written as 32 hex digits
//! (base b = 4 bits), with the ring distance and shared-prefix helpers Pastry routes by.

use core::fmt;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use sha2::{Digest, Sha256};

/// Bits per digit (Pastry's b).
pub const DIGIT_BITS: u32 = 4;
/// Digits in an id (128 / b).
pub const DIGITS: usize = 32;
/// Values a digit takes (2^b): the routing table's column count.
pub const RADIX: usize = 16;

/// A point on the 2^128 ring: a node's id or a key's.
///
/// Node ids are the first 128 bits of SHA-256 of the node's public key; keys are SHA-256 of a
/// name or content. On the wire an id is 16 big-endian bytes.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Id(pub u128);

/// The id of a node.
pub type NodeId = Id;
/// The id of a piece of content or a name (TaskId, ChunkId, ServiceId, AppId ...).
pub type Key = Id;

fn sha_prefix(parts: &[&[u8]]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        h.update(p);
    }
    h.finalize().into()
}

impl Id {
    /// The node id belonging to a public key.
    pub fn from_public_key(public_key: &[u8]) -> Self {
        Self::from_digest(&sha_prefix(&[public_key]))
    }

    /// The key of a name (service, application ...); domain-separated from content keys.
    pub fn for_name(name: &[u8]) -> Self {
        Self::from_digest(&sha_prefix(&[b"unipeer-name\0", name]))
    }

    /// The key of a piece of content (chunk, task input, output).
    pub fn for_content(content: &[u8]) -> Self {
        Self::from_digest(&sha_prefix(&[content]))
    }

    fn from_digest(d: &[u8; 32]) -> Self {
        let mut b = [0u8; 16];
        b.copy_from_slice(&d[..16]);
        Id(u128::from_be_bytes(b))
    }

    /// Digit `i` (0 = most significant) of the hex form.
    pub fn digit(self, i: usize) -> usize {
        assert!(i < DIGITS, "digit index {i} out of range");
        ((self.0 >> (128 - DIGIT_BITS as usize * (i + 1))) & 0xf) as usize
    }

    /// How many leading hex digits `self` and `other` share (32 when equal).
    pub fn shared_prefix_len(self, other: Id) -> usize {
        ((self.0 ^ other.0).leading_zeros() / DIGIT_BITS) as usize
    }

    /// Clockwise distance from `self` to `other` (towards larger ids, wrapping).
    pub fn cw_distance(self, other: Id) -> u128 {
        other.0.wrapping_sub(self.0)
    }

    /// Ring distance: the shorter way round.
    pub fn distance(self, other: Id) -> u128 {
        let d = self.cw_distance(other);
        d.min(d.wrapping_neg())
    }

    /// Whether `a` is strictly closer to `self` than `b`; ties go to the smaller id, so every
    /// key has exactly one root among any set of nodes.
    pub fn is_closer(self, a: Id, b: Id) -> bool {
        (self.distance(a), a) < (self.distance(b), b)
    }

    /// The 16 bytes of the id, big-endian.
    pub fn to_bytes(self) -> [u8; 16] {
        self.0.to_be_bytes()
    }

    /// Parses 32 hex digits (either case).
    pub fn parse_hex(s: &str) -> Option<Self> {
        if s.len() != DIGITS {
            return None;
        }
        u128::from_str_radix(s, 16).ok().map(Id)
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:032x}", self.0)
    }
}

impl fmt::Debug for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Eight digits identify a node in logs; the full form is `Display`.
        write!(f, "{:08x}", (self.0 >> 96) as u32)
    }
}

impl Serialize for Id {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.to_bytes().serialize(s)
    }
}

impl<'de> Deserialize<'de> for Id {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        <[u8; 16]>::deserialize(d).map(|b| Id(u128::from_be_bytes(b)))
    }
}

/// A short tag of a physical server's name: nodes with equal tags share a machine (the
/// Registrar's strongest proximity hint). Four bytes keep every packet header small.
#[derive(
    Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Debug, Default, Serialize, Deserialize,
)]
pub struct ServerTag(pub u32);

impl ServerTag {
    /// The tag of a server name (`server_id` of the launch config).
    pub fn from_name(name: &str) -> Self {
        let d = sha_prefix(&[b"unipeer-server\0", name.as_bytes()]);
        ServerTag(u32::from_be_bytes([d[0], d[1], d[2], d[3]]))
    }
}

/// The public key of a node without trust material (a VM launched with `--no-trust`, and the
/// simulators): derived from its name, so its NodeId is stable and distinct per name, but
/// anyone can claim it. Nothing is authenticated in that mode, and the kernel does no job
/// delegation there (`jobs_delegation=off`); with trust on, the certified Ed25519 key is used.
pub fn placeholder_public_key(node_name: &str) -> [u8; 32] {
    sha_prefix(&[b"unipeer-placeholder-key\0", node_name.as_bytes()])
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;

    #[test]
    fn digits_and_prefix() {
        let a = Id(0x1234_5678_9abc_def0_1234_5678_9abc_def0);
        assert_eq!(a.digit(0), 1);
        assert_eq!(a.digit(3), 4);
        assert_eq!(a.digit(31), 0);
        let b = Id(0x1235_0000_0000_0000_0000_0000_0000_0000);
        assert_eq!(a.shared_prefix_len(b), 3);
        assert_eq!(a.shared_prefix_len(a), 32);
        assert_eq!(format!("{a}"), "123456789abcdef0123456789abcdef0");
        assert_eq!(Id::parse_hex(&format!("{a}")), Some(a));
        assert_eq!(Id::parse_hex("12"), None);
    }

    #[test]
    fn ring_distance_wraps() {
        let lo = Id(5);
        let hi = Id(u128::MAX - 4);
        assert_eq!(lo.distance(hi), 10);
        assert_eq!(hi.distance(lo), 10);
        assert_eq!(hi.cw_distance(lo), 10);
        assert_eq!(lo.cw_distance(hi), u128::MAX - 9);
        // Equal distance: the smaller id wins, both ways round.
        let k = Id(100);
        assert!(k.is_closer(Id(90), Id(110)));
        assert!(!k.is_closer(Id(110), Id(90)));
    }

    #[test]
    fn ids_from_keys_are_stable_and_distinct() {
        let a = Id::from_public_key(&placeholder_public_key("node-1"));
        let b = Id::from_public_key(&placeholder_public_key("node-2"));
        assert_ne!(a, b);
        assert_eq!(a, Id::from_public_key(&placeholder_public_key("node-1")));
        assert_ne!(Id::for_name(b"x"), Id::for_content(b"x"));
        assert_ne!(ServerTag::from_name("s0"), ServerTag::from_name("s1"));
    }
}
