//! Peer↔peer secure channel: a mutual-authentication handshake and sealed datagrams, as an
//! I/O-free state machine between the UDP socket and the overlay [`crate::Node`].
//!
//! ```text
//! I → R  Hello    {i_idx, nonce_i, eph_i}                       (no cookie yet)
//! R → I  Cookie   {i_idx, cookie = HMAC(secret, addr|bucket|hello)}   R keeps no state
//! I → R  Hello    {i_idx, nonce_i, eph_i, cookie}               R checks the cookie (one HMAC)
//! R → I  Response {i_idx, r_idx, nonce_r, eph_r, chain_r, sig_r(th), mac_r(th)}
//! I → R  Finish   {r_idx, chain_i, sig_i(th'), mac_i(th')}
//! R → I  sealed ack; then sealed data both ways
//! ```
//! `th` hashes both indices, nonces, ephemeral X25519 keys and R's chain; `th'` adds I's chain.
//! Keys come from HKDF-SHA256(salt = th, ikm = X25519), and from the same HKDF, under its own
//! label, a per-session stream secret both ends share (for sealed TCP streams, see
//! [`SessionLayer::stream_secret`]). Every signature check is preceded by a
//! cheap one: the cookie (a responder spends no signature or DH on a spoofed source), then the
//! handshake MAC (only someone holding the ephemeral secret gets to a signature check).
//!
//! Sealed datagram: `5 | receiver u32 | seq u64 | ChaCha20-Poly1305(channel | payload) | tag`,
//! nonce = seq, header as associated data; a 128-entry replay window per session.

use super::cert::{CertChain, CertError, MAX_CHAIN_LEN, VerifiedPeer};
use super::clock::WallClock;
use super::csprng::Csprng;
use super::keys::{self, IdentityKey, PublicKey, Sig};
use super::replay::{ReplayError, ReplayWindow};
use super::revocation::{RevocationError, RevocationList, RevocationState};
use crate::id::NodeId;
use crate::launch::PeerAddr;
use crate::node::Transmit;
use crate::time::Instant;
use crate::wire::MAX_DATAGRAM;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::vec::Vec;
use chacha20poly1305::aead::AeadInPlace;
use chacha20poly1305::{ChaCha20Poly1305, KeyInit, Tag};
use core::fmt;
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey as XPublic, StaticSecret};

type HmacSha256 = Hmac<Sha256>;

/// Handshake protocol version carried in `Hello`.
pub const HANDSHAKE_VERSION: u8 = 1;
/// Header of a sealed datagram: type, receiver index, sequence number.
pub const DATA_HEADER_LEN: usize = 1 + 4 + 8;
/// Poly1305 tag.
pub const TAG_LEN: usize = 16;
/// Bytes sealing adds to a plaintext payload (header, channel byte, tag).
pub const SEAL_OVERHEAD: usize = DATA_HEADER_LEN + 1 + TAG_LEN;
/// Largest payload `send` accepts: a whole overlay datagram.
pub const MAX_PAYLOAD: usize = MAX_DATAGRAM;
/// Largest datagram this layer sends or accepts.
pub const MAX_SEALED_DATAGRAM: usize = MAX_PAYLOAD + SEAL_OVERHEAD;

const TYPE_HELLO: u8 = 1;
const TYPE_COOKIE: u8 = 2;
const TYPE_RESPONSE: u8 = 3;
const TYPE_FINISH: u8 = 4;
const TYPE_DATA: u8 = 5;
const COOKIE_LEN: usize = 16;

/// Channel byte of the internal acknowledgement that confirms a session to its initiator.
const CHANNEL_ACK: u8 = 0xff;

/// Bounds and timers, in milliseconds. Defaults suit slow TCG guests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionLimits {
    /// Established sessions; beyond it the least recently heard one is evicted.
    pub max_sessions: usize,
    /// Handshakes this node initiates at once.
    pub max_initiating: usize,
    /// Responder handshakes past the cookie but not finished.
    pub max_half_open: usize,
    /// Of those, at most this many from one source IPv4 address (its ports are free to pick),
    /// so one host cannot hold the whole table while others still get in.
    pub max_half_open_per_source: usize,
    /// Datagrams queued per peer while its handshake runs.
    pub max_queued_per_peer: usize,
    /// Datagrams waiting in `poll_transmit` / `poll_delivered`.
    pub max_outbound: usize,
    pub max_delivered: usize,
    /// Handshake message retransmission period and attempts.
    pub handshake_retry_ms: u64,
    pub handshake_attempts: u8,
    /// Cookie time bucket (a cookie is good for one to two buckets).
    pub cookie_bucket_ms: u64,
    /// Age at which a session is renewed by a new handshake.
    pub rekey_after_ms: u64,
    /// Age at which a session is dropped (must exceed `rekey_after_ms`).
    pub reject_after_ms: u64,
    /// Messages after which a session is renewed.
    pub rekey_after_messages: u64,
}

impl Default for SessionLimits {
    fn default() -> Self {
        SessionLimits {
            max_sessions: 256,
            max_initiating: 64,
            max_half_open: 32,
            max_half_open_per_source: 4,
            max_queued_per_peer: 32,
            max_outbound: 2048,
            max_delivered: 2048,
            handshake_retry_ms: 1_000,
            handshake_attempts: 5,
            cookie_bucket_ms: 10_000,
            rekey_after_ms: 10 * 60_000,
            reject_after_ms: 12 * 60_000,
            rekey_after_messages: 1 << 40,
        }
    }
}

/// What a sealed payload is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Channel {
    /// Overlay datagrams (`wire::Packet`), for the [`crate::Node`].
    Overlay = 0,
    /// Trust-layer messages ([`TrustMessage`]): revocations, credential delegation.
    Trust = 1,
}

impl Channel {
    fn from_byte(b: u8) -> Option<Self> {
        match b {
            0 => Some(Channel::Overlay),
            1 => Some(Channel::Trust),
            _ => None,
        }
    }
}

/// Trust-layer messages between authenticated peers (carried on [`Channel::Trust`]).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TrustMessage {
    /// An encoded [`RevocationList`]; spread to every session when newer than the one held.
    Revocations(Vec<u8>),
    /// Credential delegation (see [`super::delegation`]).
    Delegation(super::delegation::DelegationMessage),
}

impl TrustMessage {
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        match postcard::take_from_bytes(bytes) {
            Ok((m, [])) => Some(m),
            _ => None,
        }
    }
}

/// An authenticated, decrypted payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delivered {
    pub from: PeerAddr,
    /// The peer's NodeId, from its verified certificate.
    pub peer: NodeId,
    pub channel: Channel,
    pub bytes: Vec<u8>,
}

/// Why `send` refused a payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendError {
    /// Longer than [`MAX_PAYLOAD`].
    TooLong,
    /// The peer's queue (while its handshake runs) is full.
    QueueFull,
    /// Too many handshakes in progress.
    HandshakeTableFull,
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            SendError::TooLong => "payload longer than a sealed datagram allows",
            SendError::QueueFull => "the peer's queue is full while its handshake runs",
            SendError::HandshakeTableFull => "too many handshakes in progress",
        })
    }
}

impl core::error::Error for SendError {}

/// Every datagram and handshake the layer dropped, by reason, and what it did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrustCounters {
    pub datagrams_in: u64,
    pub datagrams_out: u64,
    /// Undecodable, over a bound, unknown type or version.
    pub malformed: u64,
    /// Sealed datagrams shorter than header and tag.
    pub truncated: u64,
    /// Hellos whose cookie was missing (answered) or wrong (dropped).
    pub cookies_sent: u64,
    pub bad_cookie: u64,
    /// Responses, Finishes or sealed datagrams naming no handshake/session we have, or from
    /// another address than the one it belongs to.
    pub unknown_index: u64,
    /// Handshake MAC wrong (tampered, or a sender without the ephemeral secret).
    pub handshake_bad_mac: u64,
    /// Handshake signature wrong.
    pub handshake_bad_signature: u64,
    /// The peer's ephemeral key was a low-order point.
    pub handshake_weak_key: u64,
    pub cert_malformed: u64,
    pub cert_wrong_authority: u64,
    pub cert_broken_chain: u64,
    pub cert_expired: u64,
    pub cert_not_yet_valid: u64,
    pub cert_server_outside_limit: u64,
    pub cert_window_outside_limit: u64,
    pub cert_node_id_mismatch: u64,
    pub cert_revoked: u64,
    pub cert_bad_signature: u64,
    /// Responder handshakes refused because the half-open table was full.
    pub half_open_full: u64,
    /// Responder handshakes refused because their source already held its share of it.
    pub half_open_source_capped: u64,
    pub handshake_timeouts: u64,
    /// Sealed datagrams failing authentication (tampered or forged).
    pub tampered: u64,
    pub replayed: u64,
    /// Reordered beyond the replay window.
    pub too_old: u64,
    /// Sealed payloads with an unknown channel byte (authentic, so a peer bug).
    pub bad_channel: u64,
    /// Payloads dropped because a queue was full.
    pub queue_drops: u64,
    pub sessions_established: u64,
    pub sessions_revoked: u64,
    /// Sessions ended by age or by their certificate's expiry.
    pub sessions_expired: u64,
    pub sessions_evicted: u64,
    pub revocations_accepted: u64,
    pub revocations_refused: u64,
    pub delivered: u64,
    pub sealed: u64,
}

impl TrustCounters {
    fn count_cert(&mut self, e: CertError) {
        let c = match e {
            CertError::Malformed => &mut self.cert_malformed,
            CertError::WrongAuthority => &mut self.cert_wrong_authority,
            CertError::BrokenChain => &mut self.cert_broken_chain,
            CertError::Expired => &mut self.cert_expired,
            CertError::NotYetValid => &mut self.cert_not_yet_valid,
            CertError::ServerOutsideLimit => &mut self.cert_server_outside_limit,
            CertError::WindowOutsideLimit => &mut self.cert_window_outside_limit,
            CertError::NodeIdMismatch => &mut self.cert_node_id_mismatch,
            CertError::Revoked => &mut self.cert_revoked,
            CertError::BadSignature => &mut self.cert_bad_signature,
        };
        *c += 1;
    }

    /// Inbound datagrams refused for any reason (handshake chatter excluded).
    pub fn rejected(&self) -> u64 {
        self.malformed
            + self.truncated
            + self.bad_cookie
            + self.unknown_index
            + self.handshake_bad_mac
            + self.handshake_bad_signature
            + self.handshake_weak_key
            + self.cert_malformed
            + self.cert_wrong_authority
            + self.cert_broken_chain
            + self.cert_expired
            + self.cert_not_yet_valid
            + self.cert_server_outside_limit
            + self.cert_window_outside_limit
            + self.cert_node_id_mismatch
            + self.cert_revoked
            + self.cert_bad_signature
            + self.half_open_full
            + self.half_open_source_capped
            + self.tampered
            + self.replayed
            + self.too_old
            + self.bad_channel
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Hello {
    version: u8,
    sender: u32,
    nonce: [u8; 32],
    eph: [u8; 32],
    cookie: Option<[u8; COOKIE_LEN]>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct CookieReply {
    receiver: u32,
    cookie: [u8; COOKIE_LEN],
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Response {
    receiver: u32,
    sender: u32,
    nonce: [u8; 32],
    eph: [u8; 32],
    chain: Vec<u8>,
    sig: Sig,
    mac: [u8; 32],
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Finish {
    receiver: u32,
    chain: Vec<u8>,
    sig: Sig,
    mac: [u8; 32],
}

fn frame<T: Serialize>(ty: u8, body: &T) -> Vec<u8> {
    let mut out = alloc::vec![ty];
    // Bounded structs into a Vec: cannot fail.
    out.extend_from_slice(&postcard::to_allocvec(body).unwrap_or_default());
    out
}

fn unframe<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Option<T> {
    match postcard::take_from_bytes(body) {
        Ok((v, [])) => Some(v),
        _ => None,
    }
}

fn addr_key(a: PeerAddr) -> u64 {
    (u32::from_be_bytes(a.ipv4) as u64) << 16 | a.port as u64
}

/// The handshake transcript hash over everything both ends chose.
fn transcript(
    i_idx: u32,
    nonce_i: &[u8; 32],
    eph_i: &[u8; 32],
    r_idx: u32,
    nonce_r: &[u8; 32],
    eph_r: &[u8; 32],
    chain_r: &[u8],
) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"unipeer-hs-v1\0");
    h.update(i_idx.to_le_bytes());
    h.update(nonce_i);
    h.update(eph_i);
    h.update(r_idx.to_le_bytes());
    h.update(nonce_r);
    h.update(eph_r);
    h.update(Sha256::digest(chain_r));
    h.finalize().into()
}

fn transcript_finish(th: &[u8; 32], chain_i: &[u8]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"unipeer-hs-finish\0");
    h.update(th);
    h.update(Sha256::digest(chain_i));
    h.finalize().into()
}

fn hmac(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    // HMAC accepts keys of any length.
    let mut m = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        m.update(p);
    }
    m.finalize().into_bytes().into()
}

fn hmac_ok(key: &[u8], parts: &[&[u8]], tag: &[u8]) -> bool {
    let mut m = <HmacSha256 as Mac>::new_from_slice(key).expect("HMAC takes any key length");
    for p in parts {
        m.update(p);
    }
    m.verify_slice(tag).is_ok()
}

/// Keys derived from one handshake.
struct SessionKeys {
    i_to_r: [u8; 32],
    r_to_i: [u8; 32],
    mac_r: [u8; 32],
    mac_i: [u8; 32],
    /// The session's stream secret (see [`SessionLayer::stream_secret`]), identical at both
    /// ends.
    stream: [u8; 32],
}

/// HKDF info label of the per-session stream secret (distinct from the session keys').
const STREAM_SECRET_INFO: &[u8] = b"unipeer stream secret v1";
/// HKDF info label of a per-connection stream secret, followed by both ends' nonces.
const STREAM_CONNECTION_INFO: &[u8] = b"unipeer stream connection v2";

fn derive(th: &[u8; 32], shared: &[u8; 32]) -> SessionKeys {
    let hk = Hkdf::<Sha256>::new(Some(th), shared);
    let mut okm = [0u8; 128];
    hk.expand(b"unipeer session keys v1", &mut okm)
        .expect("128 bytes is a valid HKDF-SHA256 length");
    let mut k = SessionKeys {
        i_to_r: [0; 32],
        r_to_i: [0; 32],
        mac_r: [0; 32],
        mac_i: [0; 32],
        stream: [0; 32],
    };
    hk.expand(STREAM_SECRET_INFO, &mut k.stream)
        .expect("32 bytes is a valid HKDF-SHA256 length");
    k.i_to_r.copy_from_slice(&okm[..32]);
    k.r_to_i.copy_from_slice(&okm[32..64]);
    k.mac_r.copy_from_slice(&okm[64..96]);
    k.mac_i.copy_from_slice(&okm[96..]);
    zeroize::Zeroize::zeroize(&mut okm);
    k
}

/// X25519 with the all-zero (low-order) result refused.
fn agree(secret: &StaticSecret, peer: &[u8; 32]) -> Option<[u8; 32]> {
    let shared = secret.diffie_hellman(&XPublic::from(*peer));
    shared.was_contributory().then(|| *shared.as_bytes())
}

/// A handshake this node started.
struct Initiating {
    addr: PeerAddr,
    nonce: [u8; 32],
    eph_secret: StaticSecret,
    eph: [u8; 32],
    cookie: Option<[u8; COOKIE_LEN]>,
    /// The last handshake message sent (retransmitted until answered).
    last_sent: Vec<u8>,
    retry_at: Instant,
    attempts: u8,
    /// Set once the Response verified: waiting for the responder's ack.
    finished: Option<u32>,
}

/// A responder handshake past the cookie, waiting for Finish.
struct HalfOpen {
    addr: PeerAddr,
    peer_index: u32,
    hello_nonce: [u8; 32],
    th: [u8; 32],
    keys: SessionKeys,
    response: Vec<u8>,
    expires: Instant,
}

struct Session {
    addr: PeerAddr,
    peer: VerifiedPeer,
    peer_index: u32,
    /// The handshake transcript hash: the same at both ends, it orders duplicated sessions.
    th: [u8; 32],
    /// 32 bytes from the handshake's HKDF, identical at both ends (for sealed streams).
    stream_secret: [u8; 32],
    send: ChaCha20Poly1305,
    recv: ChaCha20Poly1305,
    send_seq: u64,
    window: ReplayWindow,
    established: Instant,
    last_heard: Instant,
    /// Initiator side: the responder acknowledged (only then queued data flows).
    confirmed: bool,
    /// Responder side: the Finish MAC, to re-acknowledge a retransmitted Finish.
    finish_mac: Option<[u8; 32]>,
    expires: Instant,
}

/// The peer↔peer secure channel of one node. See the module docs for the protocol.
pub struct SessionLayer {
    identity: IdentityKey,
    chain: Vec<u8>,
    authority: PublicKey,
    clock: WallClock,
    limits: SessionLimits,
    rng: Csprng,
    cookie_secret: [u8; 32],
    revocations: RevocationState,
    sessions: BTreeMap<u32, Session>,
    /// The session used to send to an address (the newest confirmed one).
    current: BTreeMap<u64, u32>,
    initiating: BTreeMap<u32, Initiating>,
    initiating_by_addr: BTreeMap<u64, u32>,
    half_open: BTreeMap<u32, HalfOpen>,
    queues: BTreeMap<u64, VecDeque<(Channel, Vec<u8>)>>,
    transmits: VecDeque<Transmit>,
    delivered: VecDeque<Delivered>,
    counters: TrustCounters,
}

impl fmt::Debug for SessionLayer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SessionLayer")
            .field("node", &self.identity.node_id())
            .field("sessions", &self.sessions.len())
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl SessionLayer {
    /// A layer for `identity` with its `chain`, trusting `authority`. `seed` keys the CSPRNG
    /// (nonces, ephemeral keys, session indices, the cookie secret).
    pub fn new(
        identity: IdentityKey,
        chain: &CertChain,
        authority: PublicKey,
        clock: WallClock,
        limits: SessionLimits,
        seed: [u8; 32],
    ) -> Self {
        assert!(limits.reject_after_ms > limits.rekey_after_ms);
        let chain = chain.encode();
        assert!(chain.len() <= MAX_CHAIN_LEN, "own chain over bound");
        let mut rng = Csprng::from_seed(seed);
        rng.mix(&identity.public());
        let cookie_secret = rng.bytes32();
        SessionLayer {
            identity,
            chain,
            authority,
            clock,
            limits,
            rng,
            cookie_secret,
            revocations: RevocationState::default(),
            sessions: BTreeMap::new(),
            current: BTreeMap::new(),
            initiating: BTreeMap::new(),
            initiating_by_addr: BTreeMap::new(),
            half_open: BTreeMap::new(),
            queues: BTreeMap::new(),
            transmits: VecDeque::new(),
            delivered: VecDeque::new(),
            counters: TrustCounters::default(),
        }
    }

    /// A layer from a node's decoded launch material (revocation list installed).
    pub fn from_trust_config(
        config: super::TrustConfig,
        clock: WallClock,
        limits: SessionLimits,
        seed: [u8; 32],
    ) -> Self {
        let mut layer = Self::new(
            config.identity,
            &config.chain,
            config.authority,
            clock,
            limits,
            seed,
        );
        if let Some(list) = config.revocations {
            let _ = layer.revocations.offer(list, &config.authority);
        }
        layer
    }

    pub fn node_id(&self) -> NodeId {
        self.identity.node_id()
    }

    pub fn counters(&self) -> &TrustCounters {
        &self.counters
    }

    /// The verified peer behind the session used to send to `addr`.
    pub fn peer(&self, addr: PeerAddr) -> Option<&VerifiedPeer> {
        let idx = self.current.get(&addr_key(addr))?;
        self.sessions.get(idx).map(|s| &s.peer)
    }

    /// The verified peers of the established sessions (one per session: a peer with two
    /// sessions appears twice).
    pub fn verified_peers(&self) -> impl Iterator<Item = &VerifiedPeer> {
        self.sessions.values().map(|s| &s.peer)
    }

    /// The public key of `node` as its certificate chain certified it, if a session with it
    /// is established.
    pub fn public_key_of(&self, node: NodeId) -> Option<PublicKey> {
        self.verified_peers()
            .find(|p| p.node_id == node)
            .map(|p| p.public_key)
    }

    /// How far apart two sessions with one address may have been established and still count
    /// as made at once (a simultaneous open, or both ends renewing together): the longest a
    /// handshake can run.
    fn concurrent_window_ms(&self) -> u64 {
        self.limits.handshake_retry_ms * self.limits.handshake_attempts as u64
    }

    /// The session whose stream secret answers for `addr`: among the confirmed sessions with
    /// `addr`, those established within [`Self::concurrent_window_ms`] of the newest one, and
    /// of these the one with the smallest transcript hash. Both ends hold the same transcript
    /// hash for a session, so once both have confirmed the same sessions they pick the same one
    /// (see [`Self::stream_secret`]).
    fn stream_session(&self, addr: PeerAddr) -> Option<&Session> {
        let live = || {
            self.sessions
                .values()
                .filter(move |s| s.addr == addr && s.confirmed)
        };
        let newest = live().map(|s| s.established).max()?;
        let window = self.concurrent_window_ms();
        live()
            .filter(|s| newest.millis_since(s.established) <= window)
            .min_by_key(|s| s.th)
    }

    /// A 32-byte secret shared with the peer at `addr` only, for keying sealed streams
    /// ([`super::stream::StreamSealer`]); `None` without a confirmed session with `addr`.
    ///
    /// It comes from the handshake's HKDF (same salt and input as the session keys, its own
    /// label), so both ends of one session derive the same bytes. When several sessions with
    /// `addr` exist (a simultaneous open, a renewal), the answer comes from the newest
    /// generation: the sessions established within one handshake's lifetime of the newest,
    /// and of these the one with the smallest transcript hash, which both ends agree on.
    /// The ends can still disagree for about one round trip, while one end has confirmed a
    /// new session the other has not; a caller accepting a stream should therefore try
    /// [`Self::stream_secret_candidates_for`] rather than give up on the first.
    pub fn stream_secret(&self, peer: PeerAddr) -> Option<[u8; 32]> {
        self.stream_session(peer).map(|s| s.stream_secret)
    }

    /// The stream secret for one connection: HKDF-Expand of [`Self::stream_secret`] with both
    /// ends' connection nonces ([`connection_secret`]): the connecting end's, sent in its
    /// hello, and the accepting end's, sent back before any frame flows. A recorded
    /// connection replayed to the acceptor meets a fresh acceptor nonce, so its frames do not
    /// open.
    pub fn stream_secret_for(
        &self,
        peer: PeerAddr,
        connector_nonce: &[u8; 16],
        acceptor_nonce: &[u8; 16],
    ) -> Option<[u8; 32]> {
        self.stream_secret(peer)
            .map(|secret| connection_secret(&secret, connector_nonce, acceptor_nonce))
    }

    /// Every connection secret `peer` may have used for these nonces, the one
    /// [`Self::stream_secret_for`] answers first, then those of the other sessions with `peer`
    /// (newest first; including a session this node initiated whose ack is still on its way,
    /// which the peer already counts as established). The accepting end tries them in turn
    /// on the first frame: one opening it proves the peer holds that session's keys.
    pub fn stream_secret_candidates_for(
        &self,
        peer: PeerAddr,
        connector_nonce: &[u8; 16],
        acceptor_nonce: &[u8; 16],
    ) -> Vec<[u8; 32]> {
        let first = self.stream_session(peer);
        let mut rest: Vec<&Session> = self
            .sessions
            .values()
            .filter(|s| s.addr == peer && first.is_none_or(|f| f.th != s.th))
            .collect();
        rest.sort_by(|a, b| b.established.cmp(&a.established).then(a.th.cmp(&b.th)));
        first
            .into_iter()
            .chain(rest)
            .map(|s| connection_secret(&s.stream_secret, connector_nonce, acceptor_nonce))
            .collect()
    }

    /// The verified NodeId behind [`Self::stream_secret`]'s session with `peer` (the holder of
    /// that secret).
    pub fn verified_peer_id(&self, peer: PeerAddr) -> Option<NodeId> {
        self.stream_session(peer).map(|s| s.peer.node_id)
    }

    /// Whether a handshake this node started towards `peer` is still running (it gives up
    /// after `handshake_attempts` unanswered retransmissions, dropping what was queued).
    pub fn handshaking(&self, peer: PeerAddr) -> bool {
        self.initiating_by_addr.contains_key(&addr_key(peer))
    }

    /// Established sessions (both directions of a simultaneous open count twice).
    pub fn session_count(&self) -> usize {
        self.sessions.len()
    }

    /// The revocation list version in force.
    pub fn revocation_version(&self) -> u64 {
        self.revocations.version()
    }

    pub fn poll_transmit(&mut self) -> Option<Transmit> {
        self.transmits.pop_front()
    }

    pub fn poll_delivered(&mut self) -> Option<Delivered> {
        self.delivered.pop_front()
    }

    /// The earliest retransmission or expiry.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let a = self.initiating.values().map(|h| h.retry_at);
        let b = self.half_open.values().map(|h| h.expires);
        let c = self.sessions.values().map(|s| s.expires);
        a.chain(b).chain(c).min()
    }

    fn transmit(&mut self, dst: PeerAddr, payload: Vec<u8>) {
        if self.transmits.len() >= self.limits.max_outbound {
            self.counters.queue_drops += 1;
            return;
        }
        self.counters.datagrams_out += 1;
        self.transmits.push_back(Transmit { dst, payload });
    }

    fn fresh_index(&mut self) -> u32 {
        loop {
            let i = self.rng.next_u32();
            if i != 0
                && !self.sessions.contains_key(&i)
                && !self.initiating.contains_key(&i)
                && !self.half_open.contains_key(&i)
            {
                return i;
            }
        }
    }

    /// Wall-clock expiry of a certificate as a monotonic instant.
    fn instant_of_unix(&self, now: Instant, unix_ms: u64) -> Instant {
        let wall_now = self.clock.unix_ms(now);
        now.plus_ms(unix_ms.saturating_sub(wall_now))
    }

    /// Sends `payload` to `to` sealed, starting a handshake (and queueing) if there is no
    /// confirmed session yet.
    pub fn send(
        &mut self,
        now: Instant,
        to: PeerAddr,
        channel: Channel,
        payload: &[u8],
    ) -> Result<(), SendError> {
        if payload.len() > MAX_PAYLOAD {
            return Err(SendError::TooLong);
        }
        let key = addr_key(to);
        if let Some(&idx) = self.current.get(&key) {
            if self.needs_rekey(now, idx) && !self.initiating_by_addr.contains_key(&key) {
                // Best effort: the old session carries traffic until the new one is confirmed.
                let _ = self.start_handshake(now, to);
            }
            self.seal_to(idx, channel as u8, payload);
            return Ok(());
        }
        if !self.initiating_by_addr.contains_key(&key) {
            self.start_handshake(now, to)?;
        }
        let q = self.queues.entry(key).or_default();
        if q.len() >= self.limits.max_queued_per_peer {
            self.counters.queue_drops += 1;
            return Err(SendError::QueueFull);
        }
        q.push_back((channel, Vec::from(payload)));
        Ok(())
    }

    fn needs_rekey(&self, now: Instant, idx: u32) -> bool {
        self.sessions.get(&idx).is_some_and(|s| {
            now.millis_since(s.established) >= self.limits.rekey_after_ms
                || s.send_seq >= self.limits.rekey_after_messages
        })
    }

    /// Makes sure a session with `peer` exists or is on its way, sending no payload: starts a
    /// handshake as [`Self::send`] would unless there is a confirmed session with `peer`, a
    /// handshake this node started towards it, or a handshake `peer` started that is past the
    /// cookie (waiting for it avoids a duplicate session). Renews a confirmed session past its
    /// rekey age, as `send` does. Idempotent; bounded by `max_initiating` (a full table is
    /// counted in `queue_drops`, as by `send`, and a later call tries again).
    pub fn ensure_session(&mut self, now: Instant, peer: PeerAddr) {
        let key = addr_key(peer);
        if self.initiating_by_addr.contains_key(&key) {
            return;
        }
        if let Some(&idx) = self.current.get(&key) {
            if self.needs_rekey(now, idx) {
                let _ = self.start_handshake(now, peer);
            }
            return;
        }
        if self
            .half_open
            .values()
            .any(|h| h.addr == peer && h.expires > now)
        {
            return;
        }
        let _ = self.start_handshake(now, peer);
    }

    fn start_handshake(&mut self, now: Instant, to: PeerAddr) -> Result<(), SendError> {
        if self.initiating.len() >= self.limits.max_initiating {
            self.counters.queue_drops += 1;
            return Err(SendError::HandshakeTableFull);
        }
        let idx = self.fresh_index();
        let nonce = self.rng.bytes32();
        let eph_secret = StaticSecret::from(self.rng.bytes32());
        let eph = XPublic::from(&eph_secret).to_bytes();
        let hello = frame(
            TYPE_HELLO,
            &Hello {
                version: HANDSHAKE_VERSION,
                sender: idx,
                nonce,
                eph,
                cookie: None,
            },
        );
        self.transmit(to, hello.clone());
        self.initiating.insert(
            idx,
            Initiating {
                addr: to,
                nonce,
                eph_secret,
                eph,
                cookie: None,
                last_sent: hello,
                retry_at: now.plus_ms(self.limits.handshake_retry_ms),
                attempts: 1,
                finished: None,
            },
        );
        self.initiating_by_addr.insert(addr_key(to), idx);
        Ok(())
    }

    fn seal_to(&mut self, idx: u32, channel: u8, payload: &[u8]) {
        let Some(s) = self.sessions.get_mut(&idx) else {
            return;
        };
        s.send_seq += 1;
        let seq = s.send_seq;
        let mut out = Vec::with_capacity(SEAL_OVERHEAD + payload.len());
        out.push(TYPE_DATA);
        out.extend_from_slice(&s.peer_index.to_le_bytes());
        out.extend_from_slice(&seq.to_le_bytes());
        out.push(channel);
        out.extend_from_slice(payload);
        let (header, body) = out.split_at_mut(DATA_HEADER_LEN);
        let nonce = seq_nonce(seq);
        let tag = s
            .send
            .encrypt_in_place_detached(&nonce.into(), header, body)
            .expect("payload within ChaCha20-Poly1305 limits");
        out.extend_from_slice(&tag);
        let addr = s.addr;
        self.counters.sealed += 1;
        self.transmit(addr, out);
    }

    /// Feeds one datagram from the socket. Never panics; every refusal is counted.
    pub fn handle_datagram(&mut self, now: Instant, from: PeerAddr, bytes: &[u8]) {
        self.counters.datagrams_in += 1;
        if bytes.is_empty() || bytes.len() > MAX_SEALED_DATAGRAM {
            self.counters.malformed += 1;
            return;
        }
        let body = &bytes[1..];
        match bytes[0] {
            TYPE_DATA => self.on_data(now, from, bytes),
            TYPE_HELLO => match unframe::<Hello>(body) {
                Some(h) if h.version == HANDSHAKE_VERSION => self.on_hello(now, from, h),
                _ => self.counters.malformed += 1,
            },
            TYPE_COOKIE => match unframe::<CookieReply>(body) {
                Some(c) => self.on_cookie(now, from, c),
                None => self.counters.malformed += 1,
            },
            TYPE_RESPONSE => match unframe::<Response>(body) {
                Some(r) if r.chain.len() <= MAX_CHAIN_LEN => self.on_response(now, from, r),
                _ => self.counters.malformed += 1,
            },
            TYPE_FINISH => match unframe::<Finish>(body) {
                Some(f) if f.chain.len() <= MAX_CHAIN_LEN => self.on_finish(now, from, f),
                _ => self.counters.malformed += 1,
            },
            _ => self.counters.malformed += 1,
        }
    }

    fn cookie(&self, from: PeerAddr, bucket: u64, h: &Hello) -> [u8; COOKIE_LEN] {
        let full = hmac(
            &self.cookie_secret,
            &[
                &from.ipv4,
                &from.port.to_le_bytes(),
                &bucket.to_le_bytes(),
                &h.sender.to_le_bytes(),
                &h.nonce,
                &h.eph,
            ],
        );
        let mut c = [0u8; COOKIE_LEN];
        c.copy_from_slice(&full[..COOKIE_LEN]);
        c
    }

    fn on_hello(&mut self, now: Instant, from: PeerAddr, h: Hello) {
        let bucket = now.as_millis() / self.limits.cookie_bucket_ms.max(1);
        let Some(cookie) = h.cookie else {
            // Stateless: answer with a cookie, remember nothing.
            let cookie = self.cookie(from, bucket, &h);
            self.counters.cookies_sent += 1;
            self.transmit(
                from,
                frame(
                    TYPE_COOKIE,
                    &CookieReply {
                        receiver: h.sender,
                        cookie,
                    },
                ),
            );
            return;
        };
        let good = [bucket, bucket.saturating_sub(1)].iter().any(|&b| {
            let expect = self.cookie(from, b, &h);
            // Constant-time compare through HMAC's verifier is overkill for a 16-byte cookie
            // keyed per node; a plain compare leaks nothing an attacker could not get by asking.
            expect == cookie
        });
        if !good {
            self.counters.bad_cookie += 1;
            return;
        }
        // A retransmitted Hello gets the same Response, at no extra cost.
        if let Some(ho) = self
            .half_open
            .values()
            .find(|o| o.addr == from && o.peer_index == h.sender && o.hello_nonce == h.nonce)
        {
            let r = ho.response.clone();
            self.transmit(from, r);
            return;
        }
        if self.half_open_from(from) >= self.limits.max_half_open_per_source {
            // Expired ones go first; if none, refuse (a real initiator retries).
            self.expire_half_open(now);
            if self.half_open_from(from) >= self.limits.max_half_open_per_source {
                self.counters.half_open_source_capped += 1;
                return;
            }
        }
        if self.half_open.len() >= self.limits.max_half_open {
            // Expired ones go first; if none, refuse (the initiator retries).
            self.expire_half_open(now);
            if self.half_open.len() >= self.limits.max_half_open {
                self.counters.half_open_full += 1;
                return;
            }
        }
        let r_idx = self.fresh_index();
        let nonce_r = self.rng.bytes32();
        let eph_secret = StaticSecret::from(self.rng.bytes32());
        let eph_r = XPublic::from(&eph_secret).to_bytes();
        let Some(shared) = agree(&eph_secret, &h.eph) else {
            self.counters.handshake_weak_key += 1;
            return;
        };
        let th = transcript(
            h.sender,
            &h.nonce,
            &h.eph,
            r_idx,
            &nonce_r,
            &eph_r,
            &self.chain,
        );
        let keys = derive(&th, &shared);
        let sig = self.identity.sign(&[b"resp".as_slice(), &th].concat());
        let mac = hmac(&keys.mac_r, &[b"resp", &th]);
        let response = frame(
            TYPE_RESPONSE,
            &Response {
                receiver: h.sender,
                sender: r_idx,
                nonce: nonce_r,
                eph: eph_r,
                chain: self.chain.clone(),
                sig,
                mac,
            },
        );
        self.transmit(from, response.clone());
        self.half_open.insert(
            r_idx,
            HalfOpen {
                addr: from,
                peer_index: h.sender,
                hello_nonce: h.nonce,
                th,
                keys,
                response,
                expires: now.plus_ms(
                    self.limits.handshake_retry_ms * self.limits.handshake_attempts as u64,
                ),
            },
        );
    }

    fn on_cookie(&mut self, now: Instant, from: PeerAddr, c: CookieReply) {
        let Some(hs) = self.initiating.get_mut(&c.receiver) else {
            self.counters.unknown_index += 1;
            return;
        };
        if hs.addr != from || hs.finished.is_some() {
            self.counters.unknown_index += 1;
            return;
        }
        hs.cookie = Some(c.cookie);
        let hello = frame(
            TYPE_HELLO,
            &Hello {
                version: HANDSHAKE_VERSION,
                sender: c.receiver,
                nonce: hs.nonce,
                eph: hs.eph,
                cookie: Some(c.cookie),
            },
        );
        hs.last_sent = hello.clone();
        hs.retry_at = now.plus_ms(self.limits.handshake_retry_ms);
        self.transmit(from, hello);
    }

    fn verify_chain(&mut self, now: Instant, chain: &[u8]) -> Option<VerifiedPeer> {
        let wall = self.clock.unix_ms(now);
        let result = CertChain::decode(chain).and_then(|c| {
            let revocations = &self.revocations;
            c.verify(&self.authority, wall, |s| revocations.is_revoked(s))
        });
        match result {
            Ok(p) => Some(p),
            Err(e) => {
                self.counters.count_cert(e);
                None
            }
        }
    }

    fn on_response(&mut self, now: Instant, from: PeerAddr, r: Response) {
        let Some(hs) = self.initiating.get(&r.receiver) else {
            self.counters.unknown_index += 1;
            return;
        };
        if hs.addr != from || hs.finished.is_some() {
            self.counters.unknown_index += 1;
            return;
        }
        let Some(shared) = agree(&hs.eph_secret, &r.eph) else {
            self.counters.handshake_weak_key += 1;
            return;
        };
        let th = transcript(
            r.receiver, &hs.nonce, &hs.eph, r.sender, &r.nonce, &r.eph, &r.chain,
        );
        let keys = derive(&th, &shared);
        // Cheap before slow: the MAC proves the responder holds the handshake keys.
        if !hmac_ok(&keys.mac_r, &[b"resp", &th], &r.mac) {
            self.counters.handshake_bad_mac += 1;
            return;
        }
        let Some(peer) = self.verify_chain(now, &r.chain) else {
            return;
        };
        if !keys::verify(
            &peer.public_key,
            &[b"resp".as_slice(), &th].concat(),
            &r.sig,
        ) {
            self.counters.handshake_bad_signature += 1;
            return;
        }
        let th2 = transcript_finish(&th, &self.chain);
        let sig = self.identity.sign(&[b"init".as_slice(), &th2].concat());
        let mac = hmac(&keys.mac_i, &[b"init", &th2]);
        let finish = frame(
            TYPE_FINISH,
            &Finish {
                receiver: r.sender,
                chain: self.chain.clone(),
                sig,
                mac,
            },
        );
        self.transmit(from, finish.clone());
        let my_idx = r.receiver;
        let hs = self.initiating.get_mut(&my_idx).expect("looked up above");
        hs.finished = Some(my_idx);
        hs.last_sent = finish;
        hs.retry_at = now.plus_ms(self.limits.handshake_retry_ms);
        hs.attempts = 1;
        // The session exists (to open the ack) but carries nothing until confirmed.
        self.insert_session(now, my_idx, from, peer, r.sender, &th, &keys, None);
    }

    fn on_finish(&mut self, now: Instant, from: PeerAddr, f: Finish) {
        // A retransmitted Finish for a session already made: re-acknowledge.
        if let Some(s) = self.sessions.get(&f.receiver) {
            if s.addr == from && s.finish_mac == Some(f.mac) {
                self.seal_to(f.receiver, CHANNEL_ACK, &[]);
            } else {
                self.counters.unknown_index += 1;
            }
            return;
        }
        let Some(ho) = self.half_open.get(&f.receiver) else {
            self.counters.unknown_index += 1;
            return;
        };
        if ho.addr != from {
            self.counters.unknown_index += 1;
            return;
        }
        let th2 = transcript_finish(&ho.th, &f.chain);
        if !hmac_ok(&ho.keys.mac_i, &[b"init", &th2], &f.mac) {
            self.counters.handshake_bad_mac += 1;
            return;
        }
        let Some(peer) = self.verify_chain(now, &f.chain) else {
            self.half_open.remove(&f.receiver);
            return;
        };
        if !keys::verify(
            &peer.public_key,
            &[b"init".as_slice(), &th2].concat(),
            &f.sig,
        ) {
            self.counters.handshake_bad_signature += 1;
            self.half_open.remove(&f.receiver);
            return;
        }
        let ho = self.half_open.remove(&f.receiver).expect("looked up above");
        self.insert_session(
            now,
            f.receiver,
            from,
            peer,
            ho.peer_index,
            &ho.th,
            &ho.keys,
            Some(f.mac),
        );
        self.seal_to(f.receiver, CHANNEL_ACK, &[]);
        self.flush_queue(from);
    }

    /// Records a session. The responder passes the initiator's Finish MAC (its session is
    /// confirmed at once); the initiator passes `None` and waits for the responder's ack.
    #[allow(clippy::too_many_arguments)]
    fn insert_session(
        &mut self,
        now: Instant,
        idx: u32,
        addr: PeerAddr,
        peer: VerifiedPeer,
        peer_index: u32,
        th: &[u8; 32],
        keys: &SessionKeys,
        finish_mac: Option<[u8; 32]>,
    ) {
        let confirmed = finish_mac.is_some();
        let (send_key, recv_key) = if confirmed {
            (&keys.r_to_i, &keys.i_to_r)
        } else {
            (&keys.i_to_r, &keys.r_to_i)
        };
        while self.sessions.len() >= self.limits.max_sessions {
            let Some((&lru, _)) = self.sessions.iter().min_by_key(|(_, s)| s.last_heard) else {
                break;
            };
            self.remove_session(lru);
            self.counters.sessions_evicted += 1;
        }
        let expires = now
            .plus_ms(self.limits.reject_after_ms)
            .min(self.instant_of_unix(now, peer.not_after_ms.saturating_add(1)));
        log::debug!("session {idx:08x} with {:?} at {addr:?}", peer.node_id);
        self.sessions.insert(
            idx,
            Session {
                addr,
                peer,
                peer_index,
                th: *th,
                stream_secret: keys.stream,
                send: ChaCha20Poly1305::new(send_key.into()),
                recv: ChaCha20Poly1305::new(recv_key.into()),
                send_seq: 0,
                window: ReplayWindow::default(),
                established: now,
                last_heard: now,
                confirmed,
                finish_mac,
                expires,
            },
        );
        self.counters.sessions_established += 1;
        if confirmed {
            self.current.insert(addr_key(addr), idx);
        }
    }

    fn remove_session(&mut self, idx: u32) {
        if let Some(s) = self.sessions.remove(&idx) {
            let key = addr_key(s.addr);
            if self.current.get(&key) == Some(&idx) {
                self.current.remove(&key);
                // Fall back to another live session with the same address, if any.
                if let Some((&other, _)) = self
                    .sessions
                    .iter()
                    .filter(|(_, o)| o.addr == s.addr && o.confirmed)
                    .max_by_key(|(_, o)| o.established)
                {
                    self.current.insert(key, other);
                }
            }
        }
    }

    fn flush_queue(&mut self, addr: PeerAddr) {
        let key = addr_key(addr);
        let Some(&idx) = self.current.get(&key) else {
            return;
        };
        if let Some(q) = self.queues.remove(&key) {
            for (ch, p) in q {
                self.seal_to(idx, ch as u8, &p);
            }
        }
    }

    fn on_data(&mut self, now: Instant, from: PeerAddr, bytes: &[u8]) {
        if bytes.len() < DATA_HEADER_LEN + 1 + TAG_LEN {
            self.counters.truncated += 1;
            return;
        }
        let idx = u32::from_le_bytes(bytes[1..5].try_into().expect("4 bytes"));
        let seq = u64::from_le_bytes(bytes[5..13].try_into().expect("8 bytes"));
        let Some(s) = self.sessions.get_mut(&idx) else {
            self.counters.unknown_index += 1;
            return;
        };
        if s.addr != from {
            self.counters.unknown_index += 1;
            return;
        }
        if let Err(e) = s.window.check(seq) {
            match e {
                ReplayError::Replayed => self.counters.replayed += 1,
                ReplayError::TooOld => self.counters.too_old += 1,
            }
            return;
        }
        let (header, rest) = bytes.split_at(DATA_HEADER_LEN);
        let (ct, tag) = rest.split_at(rest.len() - TAG_LEN);
        let mut plain = Vec::from(ct);
        if s.recv
            .decrypt_in_place_detached(
                &seq_nonce(seq).into(),
                header,
                &mut plain,
                Tag::from_slice(tag),
            )
            .is_err()
        {
            self.counters.tampered += 1;
            return;
        }
        s.window.record(seq);
        s.last_heard = now;
        let peer = s.peer.node_id;
        let newly_confirmed = !s.confirmed;
        s.confirmed = true;
        if newly_confirmed {
            // The responder's first sealed datagram confirms the session: send what waited.
            self.current.insert(addr_key(from), idx);
            if self.initiating_by_addr.get(&addr_key(from)) == Some(&idx) {
                self.initiating_by_addr.remove(&addr_key(from));
            }
            self.initiating.remove(&idx);
            self.flush_queue(from);
        }
        let channel = plain[0];
        if channel == CHANNEL_ACK {
            return;
        }
        let Some(channel) = Channel::from_byte(channel) else {
            self.counters.bad_channel += 1;
            return;
        };
        plain.remove(0);
        if channel == Channel::Trust
            && let Some(TrustMessage::Revocations(list)) = TrustMessage::decode(&plain)
        {
            match RevocationList::decode(&list) {
                Ok(l) => {
                    let _ = self.install_revocations(now, l);
                }
                Err(_) => self.counters.revocations_refused += 1,
            }
            return;
        }
        if self.delivered.len() >= self.limits.max_delivered {
            self.counters.queue_drops += 1;
            return;
        }
        self.counters.delivered += 1;
        self.delivered.push_back(Delivered {
            from,
            peer,
            channel,
            bytes: plain,
        });
    }

    /// Takes a revocation list if it is this authority's and newer than the one in force;
    /// then drops every session whose chain names a revoked serial and spreads the list to
    /// the remaining sessions. Returns how many sessions were cut.
    pub fn install_revocations(
        &mut self,
        now: Instant,
        list: RevocationList,
    ) -> Result<usize, RevocationError> {
        let encoded = list.encode();
        if let Err(e) = self.revocations.offer(list, &self.authority) {
            if e != RevocationError::Stale {
                self.counters.revocations_refused += 1;
            }
            return Err(e);
        }
        self.counters.revocations_accepted += 1;
        let revoked: Vec<u32> = self
            .sessions
            .iter()
            .filter(|(_, s)| {
                s.peer
                    .serials
                    .iter()
                    .any(|&x| self.revocations.is_revoked(x))
            })
            .map(|(&i, _)| i)
            .collect();
        for &i in &revoked {
            self.remove_session(i);
        }
        self.counters.sessions_revoked += revoked.len() as u64;
        let msg = TrustMessage::Revocations(encoded).encode();
        let targets: Vec<PeerAddr> = self
            .current
            .values()
            .filter_map(|i| self.sessions.get(i).map(|s| s.addr))
            .collect();
        for addr in targets {
            let _ = self.send(now, addr, Channel::Trust, &msg);
        }
        Ok(revoked.len())
    }

    /// The revocation list in force (to hand to a peer that joins later).
    pub fn revocations(&self) -> Option<&RevocationList> {
        self.revocations.current()
    }

    /// Half-open responder handshakes whose initiator has `from`'s IPv4 address.
    fn half_open_from(&self, from: PeerAddr) -> usize {
        self.half_open
            .values()
            .filter(|o| o.addr.ipv4 == from.ipv4)
            .count()
    }

    fn expire_half_open(&mut self, now: Instant) {
        self.half_open.retain(|_, h| h.expires > now);
    }

    /// Retransmits handshake messages and ends expired handshakes and sessions.
    pub fn handle_timeout(&mut self, now: Instant) {
        self.expire_half_open(now);
        let due: Vec<u32> = self
            .initiating
            .iter()
            .filter(|(_, h)| h.retry_at <= now)
            .map(|(&i, _)| i)
            .collect();
        for idx in due {
            let h = self.initiating.get_mut(&idx).expect("listed above");
            if h.attempts >= self.limits.handshake_attempts {
                let addr = h.addr;
                let finished = h.finished;
                self.initiating.remove(&idx);
                self.initiating_by_addr.remove(&addr_key(addr));
                if let Some(s) = finished
                    && self.sessions.get(&s).is_some_and(|s| !s.confirmed)
                {
                    self.sessions.remove(&s);
                }
                self.counters.handshake_timeouts += 1;
                if !self.current.contains_key(&addr_key(addr))
                    && let Some(q) = self.queues.remove(&addr_key(addr))
                {
                    self.counters.queue_drops += q.len() as u64;
                }
                continue;
            }
            h.attempts += 1;
            h.retry_at = now.plus_ms(self.limits.handshake_retry_ms);
            let (addr, msg) = (h.addr, h.last_sent.clone());
            self.transmit(addr, msg);
        }
        let wall = self.clock.unix_ms(now);
        let expired: Vec<u32> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.expires <= now || wall > s.peer.not_after_ms)
            .map(|(&i, _)| i)
            .collect();
        for i in expired {
            self.remove_session(i);
            self.counters.sessions_expired += 1;
        }
    }
}

/// One connection's secret: HKDF-Expand of a session's stream secret (already uniform: a
/// valid PRK) with the connecting end's nonce and the accepting end's nonce. The connecting end
/// takes [`SessionLayer::stream_secret`] when it opens the connection and calls this once the
/// acceptor's nonce arrives.
pub fn connection_secret(
    secret: &[u8; 32],
    connector_nonce: &[u8; 16],
    acceptor_nonce: &[u8; 16],
) -> [u8; 32] {
    let hk = Hkdf::<Sha256>::from_prk(secret).expect("32 bytes is a valid HKDF-SHA256 PRK");
    let mut out = [0u8; 32];
    hk.expand_multi_info(
        &[STREAM_CONNECTION_INFO, connector_nonce, acceptor_nonce],
        &mut out,
    )
    .expect("32 bytes is a valid HKDF-SHA256 length");
    out
}

fn seq_nonce(seq: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&seq.to_le_bytes());
    n
}

#[cfg(test)]
#[path = "session_tests.rs"]
mod tests;
