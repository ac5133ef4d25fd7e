//! Overlay wire format: one postcard-encoded [`Packet`] per UDP datagram, a version field in
//! front, every list and byte string bounded so a datagram never exceeds [`MAX_DATAGRAM`].
//!
//! Every datagram in and out passes one seam, [`Sealer`], where the authentication issue will
//! sign and encrypt; [`Plaintext`] is the identity implementation used until then.

use crate::directory::{Advert, MAX_ANSWER, Requirement};
use crate::id::{Id, ServerTag};
use crate::launch::PeerAddr;
use alloc::borrow::Cow;
use alloc::vec::Vec;
use core::fmt;
use serde::{Deserialize, Serialize};

/// The wire version this build speaks; packets with another version are dropped and counted.
pub const WIRE_VERSION: u8 = 2;
/// Upper bound on a UDP payload (fits a 1280-byte IPv6 minimum MTU with headers to spare).
pub const MAX_DATAGRAM: usize = 1200;
/// Most contacts in one message (a leaf set of 32, or one routing-table row of 15).
pub const MAX_CONTACTS: usize = 32;
/// Most node ids a routed message records on its path; also its hop limit.
pub const MAX_PATH: usize = 24;
/// Largest value of a DHT record.
pub const MAX_VALUE_LEN: usize = 512;

/// A node as others know it: its id, where to reach it, and which server it runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Contact {
    pub id: Id,
    pub addr: PeerAddr,
    pub server: ServerTag,
}

/// What every packet says about its sender. The sender's address is the datagram's source.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Header {
    pub version: u8,
    pub sender: Id,
    pub server: ServerTag,
    /// The sender has finished joining and may be put in tables.
    pub joined: bool,
}

/// What a `LeafSet` message asks of its receiver.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeafKind {
    /// Merge, and answer with your own leaf set.
    Exchange,
    /// Merge; no answer wanted.
    Push,
    /// A node that (re)started and just joined: merge, forget what you believed it stored,
    /// answer with your leaf set.
    Announce,
}

/// The body of a message routed hop by hop towards the root of `key`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RoutedBody {
    Lookup,
    /// The origin is joining with id `key`.
    Join,
    /// A write; with `expected`, a compare-and-set that succeeds only while the record is at
    /// that version (0: absent).
    Put {
        value: Vec<u8>,
        expected: Option<u64>,
        /// Copies the record keeps (0: the root's `k`).
        copies: u8,
    },
    Get,
    /// A record stranded on a node outside its replica set (after a partition, say), handed
    /// to the key's root, which keeps at least `version`.
    Handoff {
        version: u64,
        value: Vec<u8>,
        copies: u8,
    },
    /// The service directory's traffic towards a ServiceId (see `directory`): examined by
    /// every directory node on the way, not only by the root.
    Directory(DirectoryBody),
}

/// What a directory message routed towards a ServiceId carries.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DirectoryBody {
    /// A provider's advert (TTL 0: withdrawn), kept by the directory nodes on the route.
    Advertise(Advert),
    /// A lookup of `k` providers meeting `requirement`.
    Discover { requirement: Requirement, k: u8 },
}

/// A message on its way to the root of `key`; every hop acknowledges it to the previous hop.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Routed {
    /// Chosen by the origin; names the operation attempt in acks and replies.
    pub nonce: u64,
    pub key: Id,
    pub origin: Contact,
    /// Nodes visited so far, origin first. Never revisited: that is the loop guard.
    pub path: Vec<Id>,
    pub body: RoutedBody,
}

/// Why the root did not complete a put (or compare-and-set).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum PutError {
    /// The compare-and-set lost: the record is at version `current` (0: absent).
    VersionMismatch { current: u64 },
    /// Fewer than a majority of the key's replica set answered in time (e.g. this side of a
    /// partition holds fewer of them).
    NoQuorum,
    /// No answer from the key's root after every attempt.
    Timeout,
    /// The root's record store is full.
    StoreFull,
}

impl fmt::Display for PutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PutError::VersionMismatch { current } => {
                write!(f, "version mismatch: the record is at version {current}")
            }
            PutError::NoQuorum => write!(f, "no majority of the key's replicas answered"),
            PutError::Timeout => write!(f, "the key's root did not answer"),
            PutError::StoreFull => write!(f, "the root's record store is full"),
        }
    }
}

impl core::error::Error for PutError {}

/// Every overlay message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// Keepalive to a leaf-set member; with `echo`, also a probe that wants a `Pong`.
    Ping {
        echo: Option<u64>,
    },
    /// Answer to a probe, echoing the prober's timestamp (its round-trip measurement).
    Pong {
        echo: u64,
    },
    LeafSet {
        kind: LeafKind,
        members: Vec<Contact>,
    },
    /// Asks for one routing-table row (table repair).
    RowRequest {
        row: u8,
    },
    /// One routing-table row; sent on request and to a joining node by each node on its path.
    Row {
        row: u8,
        entries: Vec<Contact>,
    },
    /// The sender leaves gracefully; its leaf set helps the receiver repair.
    Leave {
        members: Vec<Contact>,
    },
    Routed(Routed),
    RouteAck {
        nonce: u64,
    },
    /// The root of a joining node's id hands it its leaf set.
    JoinReply {
        nonce: u64,
        members: Vec<Contact>,
    },
    /// The root answers a lookup; `path` and its length are what the CLI prints.
    LookupReply {
        nonce: u64,
        key: Id,
        path: Vec<Id>,
    },
    /// A majority of the key's replica set holds `version`: the put is done.
    PutAck {
        nonce: u64,
        key: Id,
        version: u64,
    },
    /// The root refused the put, or could not gather a majority for it.
    PutRefused {
        nonce: u64,
        key: Id,
        error: PutError,
    },
    /// A write's first phase: the root of `key` asks a replica-set member for its version.
    VersionQuery {
        key: Id,
        round: u64,
    },
    /// The version of `key` this node holds (0: none), for the write named by `round`.
    VersionHeld {
        key: Id,
        round: u64,
        version: u64,
    },
    GetReply {
        nonce: u64,
        key: Id,
        value: Option<Vec<u8>>,
        version: u64,
    },
    /// A replica of a record.
    Store {
        key: Id,
        version: u64,
        value: Vec<u8>,
        /// Copies the record keeps (0: the receiver's `k`).
        copies: u8,
    },
    StoreAck {
        key: Id,
        version: u64,
    },
    /// A terminal directory node asks a member of its arc for providers of service `key`
    /// meeting `requirement`; the member answers `origin` directly.
    DirectoryQuery {
        nonce: u64,
        key: Id,
        origin: Contact,
        requirement: Requirement,
        k: u8,
        /// The arc walked: the nodes sharing `level` digits with `key`.
        level: u8,
        /// The arc may go on past the sender's leaf set on this side (true: clockwise):
        /// the receiver walks on that way.
        extend: Option<bool>,
        /// Nodes the walk may still ask.
        budget: u8,
    },
    /// A directory node's answer to a discover: providers of service `key` it holds.
    /// `routed`: from the node the discover stopped at (it names the level and hops, and how
    /// many arc members it `asked` to answer too); else from an asked arc member.
    DirectoryReply {
        nonce: u64,
        key: Id,
        routed: bool,
        level: u8,
        hops: u8,
        asked: u8,
        adverts: Vec<Advert>,
    },
    /// The root took a handed-off record (it holds `version` or newer).
    HandoffAck {
        key: Id,
        version: u64,
    },
}

/// One datagram's content.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Packet {
    pub header: Header,
    pub message: Message,
}

/// Why a datagram was not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Longer than `MAX_DATAGRAM`.
    TooLong,
    /// Not a postcard packet, or trailing bytes.
    Malformed,
    /// Another wire version.
    Version(u8),
    /// Decoded, but a list or string is over its bound.
    OverBound,
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::TooLong => write!(f, "datagram longer than {MAX_DATAGRAM} bytes"),
            DecodeError::Malformed => write!(f, "datagram does not decode"),
            DecodeError::Version(v) => {
                write!(f, "wire version {v} (this build speaks {WIRE_VERSION})")
            }
            DecodeError::OverBound => write!(f, "a field is over its bound"),
        }
    }
}

impl core::error::Error for DecodeError {}

/// Why a message was not sent.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EncodeError {
    /// The encoding is over the datagram budget.
    TooLong,
    /// A list or string is over its bound.
    OverBound,
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            EncodeError::TooLong => write!(f, "message over the datagram budget"),
            EncodeError::OverBound => write!(f, "a field is over its bound"),
        }
    }
}

impl core::error::Error for EncodeError {}

impl Message {
    /// Whether every list and byte string is within its bound.
    pub fn within_bounds(&self) -> bool {
        match self {
            Message::LeafSet { members, .. }
            | Message::Row {
                entries: members, ..
            }
            | Message::Leave { members }
            | Message::JoinReply { members, .. } => members.len() <= MAX_CONTACTS,
            Message::Routed(r) => {
                r.path.len() <= MAX_PATH
                    && match &r.body {
                        RoutedBody::Put { value, .. } | RoutedBody::Handoff { value, .. } => {
                            value.len() <= MAX_VALUE_LEN
                        }
                        RoutedBody::Directory(DirectoryBody::Advertise(a)) => {
                            a.attrs.within_bounds()
                        }
                        RoutedBody::Directory(DirectoryBody::Discover { requirement, .. }) => {
                            requirement.within_bounds()
                        }
                        _ => true,
                    }
            }
            Message::LookupReply { path, .. } => path.len() <= MAX_PATH,
            Message::GetReply { value, .. } => {
                value.as_ref().is_none_or(|v| v.len() <= MAX_VALUE_LEN)
            }
            Message::Store { value, .. } => value.len() <= MAX_VALUE_LEN,
            Message::DirectoryQuery { requirement, .. } => requirement.within_bounds(),
            Message::DirectoryReply { adverts, .. } => {
                adverts.len() <= MAX_ANSWER && adverts.iter().all(|a| a.attrs.within_bounds())
            }
            Message::Ping { .. }
            | Message::Pong { .. }
            | Message::RowRequest { .. }
            | Message::RouteAck { .. }
            | Message::PutAck { .. }
            | Message::PutRefused { .. }
            | Message::VersionQuery { .. }
            | Message::VersionHeld { .. }
            | Message::StoreAck { .. }
            | Message::HandoffAck { .. } => true,
        }
    }

    /// Whether the message keeps the overlay up (as opposed to serving a request); the
    /// benchmark's upkeep figure counts these.
    pub fn is_maintenance(&self) -> bool {
        match self {
            Message::Routed(r) => matches!(
                r.body,
                RoutedBody::Join
                    | RoutedBody::Handoff { .. }
                    | RoutedBody::Directory(DirectoryBody::Advertise(_))
            ),
            Message::DirectoryQuery { .. } | Message::DirectoryReply { .. } => false,
            Message::RouteAck { .. }
            | Message::LookupReply { .. }
            | Message::PutAck { .. }
            | Message::PutRefused { .. }
            | Message::VersionQuery { .. }
            | Message::VersionHeld { .. }
            | Message::GetReply { .. } => false,
            _ => true,
        }
    }
}

/// Encodes a packet, checking bounds and the `budget` (the datagram size left after sealing).
pub fn encode(packet: &Packet, budget: usize) -> Result<Vec<u8>, EncodeError> {
    if !packet.message.within_bounds() {
        return Err(EncodeError::OverBound);
    }
    let bytes = postcard::to_allocvec(packet).map_err(|_| EncodeError::TooLong)?;
    if bytes.len() > budget.min(MAX_DATAGRAM) {
        return Err(EncodeError::TooLong);
    }
    Ok(bytes)
}

/// Decodes a packet: length, version, then body and bounds. Never panics on any input.
pub fn decode(bytes: &[u8]) -> Result<Packet, DecodeError> {
    if bytes.len() > MAX_DATAGRAM {
        return Err(DecodeError::TooLong);
    }
    // The version is the header's first byte; check it before trusting the layout.
    match bytes.first() {
        None => return Err(DecodeError::Malformed),
        Some(&v) if v != WIRE_VERSION => return Err(DecodeError::Version(v)),
        Some(_) => {}
    }
    let (packet, rest): (Packet, &[u8]) =
        postcard::take_from_bytes(bytes).map_err(|_| DecodeError::Malformed)?;
    if !rest.is_empty() {
        return Err(DecodeError::Malformed);
    }
    if !packet.message.within_bounds() {
        return Err(DecodeError::OverBound);
    }
    Ok(packet)
}

/// Why the seal layer refused a datagram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SealError {
    /// The datagram failed verification (or the peer has no session).
    Rejected,
}

impl fmt::Display for SealError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "datagram rejected by the seal layer")
    }
}

impl core::error::Error for SealError {}

/// The one seam every inbound and outbound datagram passes: authentication and sealing plug in
/// here. `open` must not panic on any input; a rejected datagram is dropped and counted.
pub trait Sealer {
    /// Bytes `seal` adds; the encoder keeps plaintext within `MAX_DATAGRAM - overhead()`.
    fn overhead(&self) -> usize;
    /// Wraps an encoded packet for `peer`.
    fn seal(&mut self, peer: PeerAddr, plaintext: Vec<u8>) -> Result<Vec<u8>, SealError>;
    /// Unwraps a datagram from `peer`.
    fn open<'a>(&mut self, peer: PeerAddr, datagram: &'a [u8]) -> Result<Cow<'a, [u8]>, SealError>;
}

/// The identity seal: no authentication yet.
#[derive(Clone, Copy, Debug, Default)]
pub struct Plaintext;

impl Sealer for Plaintext {
    fn overhead(&self) -> usize {
        0
    }
    fn seal(&mut self, _peer: PeerAddr, plaintext: Vec<u8>) -> Result<Vec<u8>, SealError> {
        Ok(plaintext)
    }
    fn open<'a>(
        &mut self,
        _peer: PeerAddr,
        datagram: &'a [u8],
    ) -> Result<Cow<'a, [u8]>, SealError> {
        Ok(Cow::Borrowed(datagram))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    fn contact(i: u8) -> Contact {
        Contact {
            id: Id((u128::MAX / 7).wrapping_mul(i as u128)),
            addr: PeerAddr {
                ipv4: [10, 0, 0, i],
                port: 7000,
            },
            server: ServerTag(0xdead_beef),
        }
    }

    fn header() -> Header {
        Header {
            version: WIRE_VERSION,
            sender: Id(u128::MAX - 3),
            server: ServerTag(u32::MAX),
            joined: true,
        }
    }

    #[test]
    fn round_trip_and_worst_case_sizes_fit() {
        let full_leaf = Packet {
            header: header(),
            message: Message::LeafSet {
                kind: LeafKind::Exchange,
                members: vec![contact(9); MAX_CONTACTS],
            },
        };
        let bytes = encode(&full_leaf, MAX_DATAGRAM).unwrap();
        assert!(bytes.len() <= MAX_DATAGRAM, "{}", bytes.len());
        assert_eq!(decode(&bytes).unwrap(), full_leaf);

        let worst_put = Packet {
            header: header(),
            message: Message::Routed(Routed {
                nonce: u64::MAX,
                key: Id(u128::MAX),
                origin: contact(200),
                path: vec![Id(u128::MAX); MAX_PATH],
                body: RoutedBody::Put {
                    value: vec![0xff; MAX_VALUE_LEN],
                    expected: Some(u64::MAX),
                    copies: u8::MAX,
                },
            }),
        };
        let bytes = encode(&worst_put, MAX_DATAGRAM).unwrap();
        assert_eq!(decode(&bytes).unwrap(), worst_put);
    }

    #[test]
    fn rejects_over_bound_and_wrong_version() {
        let p = Packet {
            header: header(),
            message: Message::Row {
                row: 0,
                entries: vec![contact(1); MAX_CONTACTS + 1],
            },
        };
        assert_eq!(encode(&p, MAX_DATAGRAM), Err(EncodeError::OverBound));
        let ok = Packet {
            header: header(),
            message: Message::Ping { echo: Some(5) },
        };
        let mut bytes = encode(&ok, MAX_DATAGRAM).unwrap();
        assert!(encode(&ok, 3).is_err());
        bytes.push(0);
        assert_eq!(decode(&bytes), Err(DecodeError::Malformed));
        bytes.pop();
        bytes[0] = 9;
        assert_eq!(decode(&bytes), Err(DecodeError::Version(9)));
        assert_eq!(decode(&[]), Err(DecodeError::Malformed));
        assert_eq!(decode(&[0u8; MAX_DATAGRAM + 1]), Err(DecodeError::TooLong));
    }
}
