//! The credential delegator (source document 4): a peer asked to serve a user it holds no
//! credential for gets it from a neighbour, but only on *authenticated* demand.
//!
//! The peer P that lacks the credential runs the user handshake itself (its own nonce and
//! ephemeral X25519 key, [`super::user_auth::UserAuthResponder::relayed`]) and relays the
//! challenge-response through a neighbour H that holds the credential:
//!
//! ```text
//! U → P   Hello {user, nonce_u, eph_u}
//! P → H*  Prove {id, transcript}        (to up to MAX_ASKED neighbours)
//! H → P   Proved {id, proof_p}          (H checks: the list lets P serve the user, the
//!                                        transcript names P, the per-user rate limit)
//! P → U   Challenge {nonce_p, eph_p, P, proof_p}
//! U → P   Proof {proof_u}
//! P → H   Verify {id, proof_u}
//! H → P   Grant {id, credential, ttl_ms} only if proof_u verifies over that transcript,
//!         else Refuse {id, BadProof}
//! ```
//!
//! So a pre-shared key moves only after its user proved, to this very peer, that they hold
//! it: an unauthenticated Hello costs a holder one HMAC and teaches nothing. P checks the
//! granted key against the user's proof as well (a holder cannot hand over a wrong one),
//! keeps it for at most [`MAX_DELEGATED_TTL_MS`] (then it is forgotten and the next
//! authentication asks again), and finishes the handshake with it. The holder never sees P's
//! ephemeral secret, so it cannot derive the user's session key. Both ends rate-limit
//! delegation per user ([`DELEGATIONS_PER_USER`] per [`DELEGATION_RATE_WINDOW_MS`]).
//!
//! Messages travel sealed on [`super::session::Channel::Trust`] as
//! [`super::session::TrustMessage::Delegation`], so a granted pre-shared key is never in clear.
//! The driver moves them: `poll_outbound()` → `SessionLayer::send`, and delivered trust
//! messages → `handle_message` with the sender's verified identity.

use super::user_auth::Transcript;
use super::users::{MAX_USER_NAME, UserCredential, UserList};
use crate::auth::MAX_CREDENTIALS;
use crate::id::NodeId;
use crate::launch::PeerAddr;
use crate::time::Instant;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use serde::{Deserialize, Serialize};

/// Requests in flight at once (asking side).
pub const MAX_DELEGATION_REQUESTS: usize = 16;
/// Neighbours asked per request.
pub const MAX_ASKED: usize = 8;
/// Messages waiting in `poll_outbound`.
pub const MAX_DELEGATION_OUTBOUND: usize = 256;
/// How long each step of a request waits for the neighbour's answer (and, once proved, for
/// the user's proof).
pub const DELEGATION_TIMEOUT_MS: u64 = 5_000;
/// Transcripts a holder keeps proved for others at once, each at most [`PROVE_WINDOW_MS`].
pub const MAX_PROVING: usize = 32;
/// How long a holder waits for the user's proof on a transcript it proved.
pub const PROVE_WINDOW_MS: u64 = 2 * DELEGATION_TIMEOUT_MS;
/// Delegations per user per window, on each side (requests asked; transcripts proved).
pub const DELEGATIONS_PER_USER: u32 = 8;
pub const DELEGATION_RATE_WINDOW_MS: u64 = 60_000;
/// Longest a delegated credential is kept (a grant asking for longer is cut to this).
pub const MAX_DELEGATED_TTL_MS: u64 = 10 * 60_000;

/// Why a neighbour refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefuseReason {
    UnknownUser,
    /// The signed list does not let the asking peer serve the user (or the transcript names
    /// another peer than the one asking).
    NotAllowed,
    /// The neighbour does not hold the credential either.
    NoCredential,
    /// The user's proof did not verify: no delegation.
    BadProof,
    /// Too many delegations for this user lately, or too many transcripts held.
    RateLimited,
    /// The neighbour holds no proved transcript by that id (expired or never proved).
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DelegationMessage {
    /// Asker → holder: make the peer proof for this transcript (which names the asker).
    Prove {
        id: u64,
        transcript: Transcript,
    },
    /// Holder → asker: the peer proof.
    Proved {
        id: u64,
        proof: [u8; 32],
    },
    /// Asker → holder: the user's proof; delegate if it verifies.
    Verify {
        id: u64,
        proof: [u8; 32],
    },
    /// Holder → asker: the credential, to keep for `ttl_ms`.
    Grant {
        id: u64,
        credential: UserCredential,
        ttl_ms: u64,
    },
    Refuse {
        id: u64,
        reason: RefuseReason,
    },
}

impl DelegationMessage {
    /// Whether every length is within bounds (checked before acting on a message).
    pub fn is_bounded(&self) -> bool {
        match self {
            DelegationMessage::Prove { transcript, .. } => transcript.user.len() <= MAX_USER_NAME,
            DelegationMessage::Grant { credential, .. } => credential.user.len() <= MAX_USER_NAME,
            _ => true,
        }
    }
}

/// What the delegator reports to its driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DelegationEvent {
    /// A holder made the peer proof for request `id`: send the user the Challenge with it.
    Proved { id: u64, proof: [u8; 32] },
    /// The credential arrived (after the user's proof verified); the user can be served.
    Obtained { id: u64, user: String, from: NodeId },
    /// Every neighbour refused, the holder refused the user's proof, or time ran out.
    Failed {
        id: u64,
        user: String,
        why: FailReason,
    },
}

/// Why a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailReason {
    /// Refused; when every neighbour asked refused, the most telling reason given (not
    /// allowed, then unknown user, then rate limited, then no credential).
    Refused(RefuseReason),
    /// A step did not finish within [`DELEGATION_TIMEOUT_MS`].
    Timeout,
    /// The granted credential does not verify the user's proof (a lying holder).
    BadGrant,
}

impl fmt::Display for FailReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            FailReason::Refused(RefuseReason::NotAllowed) => {
                "a neighbour refused: the user list does not let this peer serve the user"
            }
            FailReason::Refused(RefuseReason::UnknownUser) => "the neighbours do not know the user",
            FailReason::Refused(RefuseReason::NoCredential) => {
                "no neighbour asked holds the user's credential"
            }
            FailReason::Refused(RefuseReason::BadProof) => {
                "the user's proof does not verify at the credential's holder"
            }
            FailReason::Refused(RefuseReason::RateLimited) => {
                "too many credential delegations for this user lately; try again later"
            }
            FailReason::Refused(RefuseReason::Unknown) => {
                "the credential's holder no longer has the exchange (too slow)"
            }
            FailReason::Timeout => "no neighbour granted the user's credential in time",
            FailReason::BadGrant => "a neighbour granted a credential that does not verify",
        })
    }
}

fn rank(r: RefuseReason) -> u8 {
    match r {
        RefuseReason::NotAllowed => 5,
        RefuseReason::UnknownUser => 4,
        RefuseReason::BadProof => 3,
        RefuseReason::RateLimited => 2,
        RefuseReason::Unknown => 1,
        RefuseReason::NoCredential => 0,
    }
}

/// Why a request was not started (or a step not taken).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DelegationError {
    /// The credential is already held.
    AlreadyHeld,
    /// The signed list does not let this peer serve the user (asking would be refused), or
    /// the transcript does not name this peer.
    NotAllowed,
    NoNeighbours,
    TooManyRequests,
    /// This user's delegations are over [`DELEGATIONS_PER_USER`] in the window.
    RateLimited,
    /// No request by that id waits for the user's proof.
    NoSuchRequest,
}

impl fmt::Display for DelegationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DelegationError::AlreadyHeld => "credential already held",
            DelegationError::NotAllowed => "the user list does not let this peer serve the user",
            DelegationError::NoNeighbours => "no neighbour to ask",
            DelegationError::TooManyRequests => "too many delegation requests in flight",
            DelegationError::RateLimited => {
                "too many credential delegations for this user lately; try again later"
            }
            DelegationError::NoSuchRequest => "no delegation request waits for this proof",
        })
    }
}

impl core::error::Error for DelegationError {}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DelegationCounters {
    pub requests_sent: u64,
    /// Transcripts proved for a neighbour (holder side).
    pub proved: u64,
    /// Credentials handed over after the user's proof verified (holder side).
    pub granted: u64,
    pub refused_not_allowed: u64,
    pub refused_unknown_user: u64,
    pub refused_no_credential: u64,
    /// User proofs relayed that did not verify (holder side): nothing delegated.
    pub refused_bad_proof: u64,
    /// Requests refused by the per-user rate limit or a full table (both sides).
    pub rate_limited: u64,
    pub obtained: u64,
    pub failed: u64,
    /// Answers to no request of ours, from a peer not asked, or out of step.
    pub unsolicited: u64,
    /// Grants for a user the list does not let us serve (dropped).
    pub grant_not_allowed: u64,
    /// Grants whose key does not verify the user's proof (dropped).
    pub bad_grants: u64,
    /// Delegated credentials forgotten at their expiry.
    pub expired: u64,
    /// Messages over a bound (dropped).
    pub malformed: u64,
    pub outbound_drops: u64,
}

enum Stage {
    /// Prove sent to `asked`; waiting for one to prove.
    Asking {
        asked: Vec<PeerAddr>,
        answers: usize,
        worst: Option<RefuseReason>,
    },
    /// `holder` proved; waiting for the user's proof ([`CredentialDelegator::verify`]).
    Proved { holder: PeerAddr },
    /// The user's proof went to `holder`; waiting for its grant.
    Verifying { holder: PeerAddr, proof: [u8; 32] },
}

struct Pending {
    transcript: Transcript,
    stage: Stage,
    deadline: Instant,
}

/// A transcript proved for a neighbour (holder side).
struct Proving {
    transcript: Transcript,
    deadline: Instant,
}

struct Held {
    credential: UserCredential,
    /// `None`: from the launch config, kept for good.
    expires: Option<Instant>,
}

/// Per-user delegation counts in the current window.
#[derive(Clone, Copy)]
struct Rate {
    since: Instant,
    count: u32,
}

/// One peer's credential delegator (both the asking and the answering side).
pub struct CredentialDelegator {
    node: NodeId,
    server: String,
    users: UserList,
    held: Vec<Held>,
    pending: BTreeMap<u64, Pending>,
    proving: BTreeMap<(u64, u64), Proving>,
    asks: BTreeMap<String, Rate>,
    proves: BTreeMap<String, Rate>,
    next_id: u64,
    outbound: VecDeque<(PeerAddr, DelegationMessage)>,
    events: VecDeque<DelegationEvent>,
    counters: DelegationCounters,
}

impl fmt::Debug for CredentialDelegator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialDelegator")
            .field("node", &self.node)
            .field("credentials", &self.held.len())
            .field("pending", &self.pending.len())
            .field("proving", &self.proving.len())
            .finish_non_exhaustive()
    }
}

fn addr_key(a: PeerAddr) -> u64 {
    (u64::from(u32::from_be_bytes(a.ipv4)) << 16) | u64::from(a.port)
}

/// Counts one delegation for `user` in `rates`; false when over the limit.
fn take_rate(rates: &mut BTreeMap<String, Rate>, now: Instant, user: &str) -> bool {
    let r = rates.entry(String::from(user)).or_insert(Rate {
        since: now,
        count: 0,
    });
    if now.millis_since(r.since) >= DELEGATION_RATE_WINDOW_MS {
        *r = Rate {
            since: now,
            count: 0,
        };
    }
    if r.count >= DELEGATIONS_PER_USER {
        return false;
    }
    r.count += 1;
    true
}

impl CredentialDelegator {
    /// A delegator for peer `node` on `server`, with the verified user list and the
    /// credentials it was launched with (kept for good).
    pub fn new(
        node: NodeId,
        server: &str,
        users: UserList,
        credentials: Vec<UserCredential>,
    ) -> Self {
        CredentialDelegator {
            node,
            server: String::from(server),
            users,
            held: credentials
                .into_iter()
                .map(|credential| Held {
                    credential,
                    expires: None,
                })
                .collect(),
            pending: BTreeMap::new(),
            proving: BTreeMap::new(),
            asks: BTreeMap::new(),
            proves: BTreeMap::new(),
            next_id: 1,
            outbound: VecDeque::new(),
            events: VecDeque::new(),
            counters: DelegationCounters::default(),
        }
    }

    /// The credential held for `user` at `now` (a delegated one until it expires).
    pub fn credential(&self, now: Instant, user: &str) -> Option<&UserCredential> {
        self.held
            .iter()
            .find(|h| h.credential.user == user && h.expires.is_none_or(|e| now < e))
            .map(|h| &h.credential)
    }

    /// Credentials held (launch-config ones and unexpired delegated ones, as of the last
    /// [`Self::handle_timeout`]).
    pub fn held_count(&self) -> usize {
        self.held.len()
    }

    pub fn users(&self) -> &UserList {
        &self.users
    }

    pub fn counters(&self) -> &DelegationCounters {
        &self.counters
    }

    pub fn poll_outbound(&mut self) -> Option<(PeerAddr, DelegationMessage)> {
        self.outbound.pop_front()
    }

    pub fn poll_event(&mut self) -> Option<DelegationEvent> {
        self.events.pop_front()
    }

    pub fn poll_timeout(&self) -> Option<Instant> {
        let expiry = self.held.iter().filter_map(|h| h.expires);
        self.pending
            .values()
            .map(|p| p.deadline)
            .chain(self.proving.values().map(|p| p.deadline))
            .chain(expiry)
            .min()
    }

    fn push(&mut self, to: PeerAddr, m: DelegationMessage) {
        if self.outbound.len() >= MAX_DELEGATION_OUTBOUND {
            self.counters.outbound_drops += 1;
        } else {
            self.outbound.push_back((to, m));
        }
    }

    /// Asks `neighbours` (leaf set and nearest, already authenticated) to prove to the user
    /// over `transcript` (which must name this peer); the answer comes as
    /// [`DelegationEvent::Proved`] or [`DelegationEvent::Failed`] with the returned id.
    pub fn request(
        &mut self,
        now: Instant,
        transcript: Transcript,
        neighbours: &[PeerAddr],
    ) -> Result<u64, DelegationError> {
        let user = transcript.user.as_str();
        if self.credential(now, user).is_some() {
            return Err(DelegationError::AlreadyHeld);
        }
        if transcript.node != self.node || !self.users.allows(user, self.node, &self.server) {
            return Err(DelegationError::NotAllowed);
        }
        if neighbours.is_empty() {
            return Err(DelegationError::NoNeighbours);
        }
        if self.pending.len() >= MAX_DELEGATION_REQUESTS {
            return Err(DelegationError::TooManyRequests);
        }
        if !take_rate(&mut self.asks, now, user) {
            self.counters.rate_limited += 1;
            return Err(DelegationError::RateLimited);
        }
        let id = self.next_id;
        self.next_id += 1;
        let asked: Vec<PeerAddr> = neighbours.iter().copied().take(MAX_ASKED).collect();
        for &n in &asked {
            self.counters.requests_sent += 1;
            self.push(
                n,
                DelegationMessage::Prove {
                    id,
                    transcript: transcript.clone(),
                },
            );
        }
        self.pending.insert(
            id,
            Pending {
                transcript,
                stage: Stage::Asking {
                    asked,
                    answers: 0,
                    worst: None,
                },
                deadline: now.plus_ms(DELEGATION_TIMEOUT_MS),
            },
        );
        Ok(id)
    }

    /// The user's proof for request `id` (after [`DelegationEvent::Proved`]): relays it to the
    /// holder, whose grant comes as [`DelegationEvent::Obtained`].
    pub fn verify(
        &mut self,
        now: Instant,
        id: u64,
        proof: [u8; 32],
    ) -> Result<(), DelegationError> {
        let Some(p) = self.pending.get_mut(&id) else {
            return Err(DelegationError::NoSuchRequest);
        };
        let Stage::Proved { holder } = p.stage else {
            return Err(DelegationError::NoSuchRequest);
        };
        p.stage = Stage::Verifying { holder, proof };
        p.deadline = now.plus_ms(DELEGATION_TIMEOUT_MS);
        self.push(holder, DelegationMessage::Verify { id, proof });
        Ok(())
    }

    /// Forgets request `id` (its client went away).
    pub fn cancel(&mut self, id: u64) {
        self.pending.remove(&id);
    }

    fn fail(&mut self, id: u64, why: FailReason) {
        if let Some(p) = self.pending.remove(&id) {
            self.counters.failed += 1;
            self.events.push_back(DelegationEvent::Failed {
                id,
                user: p.transcript.user,
                why,
            });
        }
    }

    /// A delegation message from an authenticated peer (`peer` on `peer_server`, as its
    /// verified certificate says) at `from`.
    pub fn handle_message(
        &mut self,
        now: Instant,
        from: PeerAddr,
        peer: NodeId,
        peer_server: &str,
        msg: DelegationMessage,
    ) {
        if !msg.is_bounded() {
            self.counters.malformed += 1;
            return;
        }
        match msg {
            DelegationMessage::Prove { id, transcript } => {
                let reply = match self.prove(now, from, peer, peer_server, id, transcript) {
                    Ok(proof) => DelegationMessage::Proved { id, proof },
                    Err(reason) => DelegationMessage::Refuse { id, reason },
                };
                self.push(from, reply);
            }
            DelegationMessage::Verify { id, proof } => {
                let reply = match self.grant(now, from, id, &proof) {
                    Ok((credential, ttl_ms)) => DelegationMessage::Grant {
                        id,
                        credential,
                        ttl_ms,
                    },
                    Err(reason) => DelegationMessage::Refuse { id, reason },
                };
                self.push(from, reply);
            }
            DelegationMessage::Proved { id, proof } => {
                let Some(p) = self.pending.get_mut(&id) else {
                    self.counters.unsolicited += 1;
                    return;
                };
                match &p.stage {
                    Stage::Asking { asked, .. } if asked.contains(&from) => {
                        // Only a proof that verifies would let the user go on; the asker
                        // cannot check it (no key), the user does.
                        p.stage = Stage::Proved { holder: from };
                        p.deadline = now.plus_ms(DELEGATION_TIMEOUT_MS);
                        self.events.push_back(DelegationEvent::Proved { id, proof });
                    }
                    // A second holder's proof, or one from a peer not asked.
                    _ => self.counters.unsolicited += 1,
                }
            }
            DelegationMessage::Grant {
                id,
                credential,
                ttl_ms,
            } => {
                let ok = self.pending.get(&id).is_some_and(|p| {
                    matches!(p.stage, Stage::Verifying { holder, .. } if holder == from)
                        && p.transcript.user == credential.user
                });
                if !ok {
                    self.counters.unsolicited += 1;
                    return;
                }
                if !self.users.allows(&credential.user, self.node, &self.server) {
                    self.counters.grant_not_allowed += 1;
                    self.fail(id, FailReason::Refused(RefuseReason::NotAllowed));
                    return;
                }
                let p = self.pending.remove(&id).expect("checked above");
                let Stage::Verifying { proof, .. } = p.stage else {
                    unreachable!("checked above");
                };
                if !p.transcript.check_user_proof(&credential.psk, &proof) {
                    self.counters.bad_grants += 1;
                    self.counters.failed += 1;
                    self.events.push_back(DelegationEvent::Failed {
                        id,
                        user: p.transcript.user,
                        why: FailReason::BadGrant,
                    });
                    return;
                }
                self.keep(now, credential, ttl_ms);
                self.counters.obtained += 1;
                self.events.push_back(DelegationEvent::Obtained {
                    id,
                    user: p.transcript.user,
                    from: peer,
                });
            }
            DelegationMessage::Refuse { id, reason } => {
                let Some(p) = self.pending.get_mut(&id) else {
                    self.counters.unsolicited += 1;
                    return;
                };
                match &mut p.stage {
                    Stage::Asking {
                        asked,
                        answers,
                        worst,
                    } if asked.contains(&from) => {
                        *answers += 1;
                        if worst.is_none_or(|w| rank(reason) > rank(w)) {
                            *worst = Some(reason);
                        }
                        if *answers >= asked.len() {
                            let why =
                                FailReason::Refused(worst.unwrap_or(RefuseReason::NoCredential));
                            self.fail(id, why);
                        }
                    }
                    Stage::Proved { holder } | Stage::Verifying { holder, .. }
                        if *holder == from =>
                    {
                        self.fail(id, FailReason::Refused(reason));
                    }
                    _ => self.counters.unsolicited += 1,
                }
            }
        }
    }

    /// Holder side of `Prove`: the peer proof, or why not.
    fn prove(
        &mut self,
        now: Instant,
        from: PeerAddr,
        peer: NodeId,
        peer_server: &str,
        id: u64,
        transcript: Transcript,
    ) -> Result<[u8; 32], RefuseReason> {
        let user = transcript.user.as_str();
        if !self.users.knows(user) {
            self.counters.refused_unknown_user += 1;
            return Err(RefuseReason::UnknownUser);
        }
        // The transcript must name the asking peer itself: a proof for another node would let
        // the asker impersonate that node to the user.
        if transcript.node != peer || !self.users.allows(user, peer, peer_server) {
            self.counters.refused_not_allowed += 1;
            return Err(RefuseReason::NotAllowed);
        }
        let Some(c) = self.credential(now, user) else {
            self.counters.refused_no_credential += 1;
            return Err(RefuseReason::NoCredential);
        };
        let proof = transcript.peer_proof(&c.psk);
        let key = (addr_key(from), id);
        if (self.proving.len() >= MAX_PROVING && !self.proving.contains_key(&key))
            || !take_rate(&mut self.proves, now, user)
        {
            self.counters.rate_limited += 1;
            return Err(RefuseReason::RateLimited);
        }
        self.counters.proved += 1;
        self.proving.insert(
            key,
            Proving {
                transcript,
                deadline: now.plus_ms(PROVE_WINDOW_MS),
            },
        );
        Ok(proof)
    }

    /// Holder side of `Verify`: the credential and its lifetime if the user's proof verifies
    /// over the transcript proved for this asker under this id.
    fn grant(
        &mut self,
        now: Instant,
        from: PeerAddr,
        id: u64,
        proof: &[u8; 32],
    ) -> Result<(UserCredential, u64), RefuseReason> {
        let Some(p) = self.proving.remove(&(addr_key(from), id)) else {
            return Err(RefuseReason::Unknown);
        };
        let user = p.transcript.user.as_str();
        let Some(h) = self
            .held
            .iter()
            .find(|h| h.credential.user == user && h.expires.is_none_or(|e| now < e))
        else {
            self.counters.refused_no_credential += 1;
            return Err(RefuseReason::NoCredential);
        };
        if !p.transcript.check_user_proof(&h.credential.psk, proof) {
            self.counters.refused_bad_proof += 1;
            return Err(RefuseReason::BadProof);
        }
        // A delegated credential is passed on for no longer than it is held here.
        let ttl_ms = h
            .expires
            .map_or(MAX_DELEGATED_TTL_MS, |e| e.millis_since(now))
            .min(MAX_DELEGATED_TTL_MS);
        self.counters.granted += 1;
        Ok((h.credential.clone(), ttl_ms))
    }

    /// Keeps a granted credential until `now + ttl_ms` (at most [`MAX_DELEGATED_TTL_MS`]).
    fn keep(&mut self, now: Instant, credential: UserCredential, ttl_ms: u64) {
        let expires = Some(now.plus_ms(ttl_ms.min(MAX_DELEGATED_TTL_MS)));
        if let Some(h) = self
            .held
            .iter_mut()
            .find(|h| h.credential.user == credential.user && h.expires.is_some())
        {
            h.credential = credential;
            h.expires = expires;
            return;
        }
        if self.held.len() >= MAX_CREDENTIALS {
            // Make room by forgetting the delegated credential closest to its expiry.
            let Some(i) = self
                .held
                .iter()
                .enumerate()
                .filter_map(|(i, h)| h.expires.map(|e| (e, i)))
                .min()
                .map(|(_, i)| i)
            else {
                return;
            };
            self.held.remove(i);
        }
        self.held.push(Held {
            credential,
            expires,
        });
    }

    /// Ends steps past their time, forgets expired delegated credentials and proved
    /// transcripts nobody verified.
    pub fn handle_timeout(&mut self, now: Instant) {
        let late: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(&i, _)| i)
            .collect();
        for id in late {
            self.fail(id, FailReason::Timeout);
        }
        self.proving.retain(|_, p| p.deadline > now);
        let before = self.held.len();
        self.held.retain(|h| h.expires.is_none_or(|e| now < e));
        self.counters.expired += (before - self.held.len()) as u64;
        self.asks
            .retain(|_, r| now.millis_since(r.since) < DELEGATION_RATE_WINDOW_MS);
        self.proves
            .retain(|_, r| now.millis_since(r.since) < DELEGATION_RATE_WINDOW_MS);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::IdentityKey;
    use crate::auth::user_auth::{UserAuthClient, UserAuthMessage, UserAuthResponder};
    use crate::auth::users::{Allowance, UserEntry};
    use crate::id::Id;
    use alloc::vec;

    fn addr(i: u8) -> PeerAddr {
        PeerAddr {
            ipv4: [10, 0, 0, i],
            port: 7000,
        }
    }

    fn list() -> UserList {
        UserList::issue(
            1,
            0,
            vec![
                UserEntry {
                    name: "alice".into(),
                    allowed: vec![Allowance::AnyPeer],
                },
                UserEntry {
                    name: "bob".into(),
                    allowed: vec![Allowance::Server("s9".into())],
                },
            ],
            &IdentityKey::from_seed(&[4; 32]),
        )
    }

    fn alice() -> UserCredential {
        UserCredential {
            user: "alice".into(),
            psk: [0x33; 32],
        }
    }

    /// P (id 1, at addr 1) lacks every credential; H (id 2, at addr 2) holds alice's.
    fn pair() -> (CredentialDelegator, CredentialDelegator) {
        (
            CredentialDelegator::new(Id(1), "s1", list(), Vec::new()),
            CredentialDelegator::new(Id(2), "s1", list(), vec![alice()]),
        )
    }

    /// Moves every queued message between P (1) and H (2) until both are quiet.
    fn pump(now: Instant, p: &mut CredentialDelegator, h: &mut CredentialDelegator) {
        for _ in 0..8 {
            let mut moved = false;
            while let Some((to, m)) = p.poll_outbound() {
                assert_eq!(to, addr(2));
                h.handle_message(now, addr(1), Id(1), "s1", m);
                moved = true;
            }
            while let Some((to, m)) = h.poll_outbound() {
                assert_eq!(to, addr(1));
                p.handle_message(now, addr(2), Id(2), "s1", m);
                moved = true;
            }
            if !moved {
                return;
            }
        }
    }

    /// A Hello at P for `cred`'s user: P's relayed responder and its request id.
    fn hello_at_p(
        now: Instant,
        p: &mut CredentialDelegator,
        cred: &UserCredential,
        seed: u8,
    ) -> (UserAuthClient, UserAuthResponder, u64) {
        let (client, hello) = UserAuthClient::start(cred.clone(), [seed; 32], [seed ^ 1; 32]);
        let resp = UserAuthResponder::relayed(
            &hello,
            Id(1),
            "s1",
            p.users(),
            [seed ^ 2; 32],
            [seed ^ 3; 32],
        )
        .unwrap();
        let id = p
            .request(now, resp.transcript().clone(), &[addr(2)])
            .unwrap();
        (client, resp, id)
    }

    #[test]
    fn a_credential_moves_only_after_the_users_proof_verified() {
        let (mut p, mut h) = pair();
        let now = Instant::from_millis(10);
        // Someone who knows alice's name but not her key says Hello at P.
        let mallory = UserCredential {
            user: "alice".into(),
            psk: [0x66; 32],
        };
        let (client, resp, id) = hello_at_p(now, &mut p, &mallory, 1);
        pump(now, &mut p, &mut h);
        let Some(DelegationEvent::Proved { id: got, proof }) = p.poll_event() else {
            panic!("the holder proves to the user on P's behalf")
        };
        assert_eq!(got, id);
        assert_eq!(h.counters().proved, 1);
        assert_eq!(
            p.credential(now, "alice"),
            None,
            "nothing delegated on a Hello"
        );
        // Mallory cannot check the challenge (wrong key) and sends a made-up proof.
        assert!(client.on_challenge(&resp.challenge(proof)).is_err());
        p.verify(now, id, [0xee; 32]).unwrap();
        pump(now, &mut p, &mut h);
        assert_eq!(
            p.poll_event(),
            Some(DelegationEvent::Failed {
                id,
                user: "alice".into(),
                why: FailReason::Refused(RefuseReason::BadProof)
            })
        );
        assert_eq!(p.credential(now, "alice"), None);
        assert_eq!(h.counters().granted, 0);
        assert_eq!(h.counters().refused_bad_proof, 1);
        // The proved transcript is spent: a second Verify for it is refused as unknown.
        assert_eq!(
            p.verify(now, id, [0xee; 32]),
            Err(DelegationError::NoSuchRequest)
        );
    }

    #[test]
    fn the_real_user_gets_a_session_and_the_credential_expires() {
        let (mut p, mut h) = pair();
        let now = Instant::from_millis(10);
        let (client, resp, id) = hello_at_p(now, &mut p, &alice(), 5);
        pump(now, &mut p, &mut h);
        let Some(DelegationEvent::Proved { proof, .. }) = p.poll_event() else {
            panic!("proved")
        };
        let (proof_msg, node, k_user) = client.on_challenge(&resp.challenge(proof)).unwrap();
        assert_eq!(node, Id(1));
        let UserAuthMessage::Proof { proof: pu } = proof_msg else {
            panic!("a proof")
        };
        p.verify(now, id, pu).unwrap();
        pump(now, &mut p, &mut h);
        assert_eq!(
            p.poll_event(),
            Some(DelegationEvent::Obtained {
                id,
                user: "alice".into(),
                from: Id(2)
            })
        );
        assert_eq!(h.counters().granted, 1);
        let cred = p.credential(now, "alice").expect("delegated").clone();
        let k_peer = resp
            .with_credential(&cred)
            .unwrap()
            .on_proof(&proof_msg)
            .unwrap();
        assert_eq!(k_user, k_peer);
        assert_eq!(p.held_count(), 1);
        // Held no longer than the longest delegated lifetime.
        let expiry = p.poll_timeout().expect("an expiry to wake for");
        assert_eq!(expiry, now.plus_ms(MAX_DELEGATED_TTL_MS));
        let later = expiry;
        assert_eq!(p.credential(later, "alice"), None);
        p.handle_timeout(later);
        assert_eq!(p.held_count(), 0);
        assert_eq!(p.counters().expired, 1);
        // A launch-config credential never expires.
        h.handle_timeout(later.plus_ms(MAX_DELEGATED_TTL_MS * 10));
        assert!(
            h.credential(later.plus_ms(MAX_DELEGATED_TTL_MS * 10), "alice")
                .is_some()
        );
    }

    #[test]
    fn delegation_is_rate_limited_per_user_on_both_sides() {
        let (mut p, mut h) = pair();
        let now = Instant::from_millis(10);
        for i in 0..DELEGATIONS_PER_USER {
            hello_at_p(now, &mut p, &alice(), i as u8 * 4);
            pump(now, &mut p, &mut h);
        }
        assert_eq!(h.counters().proved, u64::from(DELEGATIONS_PER_USER));
        let (_, hello) = UserAuthClient::start(alice(), [99; 32], [98; 32]);
        let resp =
            UserAuthResponder::relayed(&hello, Id(1), "s1", p.users(), [97; 32], [96; 32]).unwrap();
        assert_eq!(
            p.request(now, resp.transcript().clone(), &[addr(2)]),
            Err(DelegationError::RateLimited)
        );
        // The holder limits on its own, whoever asks: a third peer's Prove is refused.
        h.handle_message(
            now,
            addr(3),
            Id(3),
            "s1",
            DelegationMessage::Prove {
                id: 1,
                transcript: Transcript {
                    node: Id(3),
                    ..resp.transcript().clone()
                },
            },
        );
        assert_eq!(
            h.poll_outbound(),
            Some((
                addr(3),
                DelegationMessage::Refuse {
                    id: 1,
                    reason: RefuseReason::RateLimited
                }
            ))
        );
        // A window later both sides take requests again.
        let later = now.plus_ms(DELEGATION_RATE_WINDOW_MS);
        p.handle_timeout(later);
        h.handle_timeout(later);
        // The earlier requests were proved, then timed out waiting for their users.
        let mut events = 0;
        while let Some(e) = p.poll_event() {
            assert!(matches!(
                e,
                DelegationEvent::Proved { .. }
                    | DelegationEvent::Failed {
                        why: FailReason::Timeout,
                        ..
                    }
            ));
            events += 1;
        }
        assert_eq!(events, 2 * DELEGATIONS_PER_USER);
        let id = p
            .request(later, resp.transcript().clone(), &[addr(2)])
            .unwrap();
        pump(later, &mut p, &mut h);
        assert!(matches!(
            p.poll_event(),
            Some(DelegationEvent::Proved { id: got, .. }) if got == id
        ));
    }

    #[test]
    fn a_holder_proves_only_for_the_asking_peer_and_allowed_users() {
        let (_, mut h) = pair();
        let now = Instant::from_millis(10);
        let (_, hello) = UserAuthClient::start(alice(), [1; 32], [2; 32]);
        let t = UserAuthResponder::relayed(&hello, Id(1), "s1", &list(), [3; 32], [4; 32])
            .unwrap()
            .transcript()
            .clone();
        // Peer 3 asks for a proof over a transcript naming peer 1: it would impersonate 1.
        h.handle_message(
            now,
            addr(3),
            Id(3),
            "s1",
            DelegationMessage::Prove {
                id: 7,
                transcript: t.clone(),
            },
        );
        assert!(matches!(
            h.poll_outbound(),
            Some((
                _,
                DelegationMessage::Refuse {
                    reason: RefuseReason::NotAllowed,
                    ..
                }
            ))
        ));
        // bob may be served on s9 only.
        let bob = Transcript {
            user: "bob".into(),
            node: Id(3),
            ..t.clone()
        };
        h.handle_message(
            now,
            addr(3),
            Id(3),
            "s1",
            DelegationMessage::Prove {
                id: 8,
                transcript: bob,
            },
        );
        assert!(matches!(
            h.poll_outbound(),
            Some((
                _,
                DelegationMessage::Refuse {
                    reason: RefuseReason::NotAllowed,
                    ..
                }
            ))
        ));
        // A Verify for a transcript never proved.
        h.handle_message(
            now,
            addr(3),
            Id(3),
            "s1",
            DelegationMessage::Verify {
                id: 9,
                proof: [0; 32],
            },
        );
        assert!(matches!(
            h.poll_outbound(),
            Some((
                _,
                DelegationMessage::Refuse {
                    reason: RefuseReason::Unknown,
                    ..
                }
            ))
        ));
        assert_eq!(h.counters().proved, 0);
        assert_eq!(h.counters().granted, 0);
    }

    #[test]
    fn a_grant_that_does_not_verify_the_users_proof_is_dropped() {
        let (mut p, mut h) = pair();
        let now = Instant::from_millis(10);
        let (client, resp, id) = hello_at_p(now, &mut p, &alice(), 9);
        pump(now, &mut p, &mut h);
        let Some(DelegationEvent::Proved { proof, .. }) = p.poll_event() else {
            panic!("proved")
        };
        let (UserAuthMessage::Proof { proof: pu }, _, _) =
            client.on_challenge(&resp.challenge(proof)).unwrap()
        else {
            panic!("a proof")
        };
        p.verify(now, id, pu).unwrap();
        let _ = p.poll_outbound();
        // The holder answers with some other key for alice.
        p.handle_message(
            now,
            addr(2),
            Id(2),
            "s1",
            DelegationMessage::Grant {
                id,
                credential: UserCredential {
                    user: "alice".into(),
                    psk: [1; 32],
                },
                ttl_ms: 1_000,
            },
        );
        assert_eq!(
            p.poll_event(),
            Some(DelegationEvent::Failed {
                id,
                user: "alice".into(),
                why: FailReason::BadGrant
            })
        );
        assert_eq!(p.credential(now, "alice"), None);
        assert_eq!(p.counters().bad_grants, 1);
    }

    #[test]
    fn failure_says_why() {
        let mut d = CredentialDelegator::new(Id(1), "s1", list(), Vec::new());
        let now = Instant::ZERO;
        let (_, hello) = UserAuthClient::start(alice(), [1; 32], [2; 32]);
        let t = UserAuthResponder::relayed(&hello, Id(1), "s1", &list(), [3; 32], [4; 32])
            .unwrap()
            .transcript()
            .clone();
        let id = d.request(now, t, &[addr(2), addr(3)]).unwrap();
        let refuse = |reason| DelegationMessage::Refuse { id, reason };
        d.handle_message(
            now,
            addr(2),
            Id(2),
            "s1",
            refuse(RefuseReason::NoCredential),
        );
        assert_eq!(d.poll_event(), None, "one neighbour has not answered yet");
        // An answer from a peer not asked does not count.
        d.handle_message(
            now,
            addr(9),
            Id(9),
            "s1",
            refuse(RefuseReason::NoCredential),
        );
        assert_eq!(d.counters().unsolicited, 1);
        d.handle_message(now, addr(3), Id(3), "s1", refuse(RefuseReason::NotAllowed));
        assert_eq!(
            d.poll_event(),
            Some(DelegationEvent::Failed {
                id,
                user: "alice".into(),
                why: FailReason::Refused(RefuseReason::NotAllowed)
            })
        );
        assert_eq!(d.poll_timeout(), None);
    }
}
