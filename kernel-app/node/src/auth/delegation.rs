//! The credential delegator (source document 4): a peer asked to serve a user it holds no
//! credential for asks its neighbours over their authenticated sessions; a neighbour hands the
//! credential over only if the authority-signed user list lets the asking peer serve that user.
//!
//! Messages travel sealed on [`super::session::Channel::Trust`] as
//! [`super::session::TrustMessage::Delegation`], so a granted pre-shared key is never in clear.
//! The driver moves them: `poll_outbound()` → `SessionLayer::send`, and delivered trust
//! messages → `handle_message` with the sender's verified identity.

use super::users::{UserCredential, UserList};
use crate::auth::MAX_CREDENTIALS;
use crate::id::NodeId;
use crate::launch::PeerAddr;
use crate::time::Instant;
use alloc::collections::{BTreeMap, VecDeque};
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use serde::{Deserialize, Serialize};

/// Requests in flight at once.
pub const MAX_DELEGATION_REQUESTS: usize = 16;
/// Neighbours asked per request.
pub const MAX_ASKED: usize = 8;
/// Messages waiting in `poll_outbound`.
pub const MAX_DELEGATION_OUTBOUND: usize = 256;
/// How long a request waits for a grant.
pub const DELEGATION_TIMEOUT_MS: u64 = 5_000;

/// Why a neighbour refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefuseReason {
    UnknownUser,
    /// The signed list does not let the asking peer serve the user.
    NotAllowed,
    /// The neighbour does not hold the credential either.
    NoCredential,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DelegationMessage {
    Request { id: u64, user: String },
    Grant { id: u64, credential: UserCredential },
    Refuse { id: u64, reason: RefuseReason },
}

/// What the delegator reports to its driver.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DelegationEvent {
    /// The credential arrived; the user can now be served.
    Obtained { user: String, from: NodeId },
    /// Every neighbour refused, or none answered in time.
    Failed { user: String, why: FailReason },
}

/// Why a request failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailReason {
    /// Every neighbour asked refused; the most telling reason given (not allowed, then
    /// unknown user, then no credential).
    Refused(RefuseReason),
    /// Not every neighbour answered within [`DELEGATION_TIMEOUT_MS`] and none granted.
    Timeout,
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
            FailReason::Timeout => "no neighbour granted the user's credential in time",
        })
    }
}

fn rank(r: RefuseReason) -> u8 {
    match r {
        RefuseReason::NotAllowed => 2,
        RefuseReason::UnknownUser => 1,
        RefuseReason::NoCredential => 0,
    }
}

/// Why a request was not started.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DelegationError {
    /// The credential is already held.
    AlreadyHeld,
    /// The signed list does not let this peer serve the user (asking would be refused).
    NotAllowed,
    NoNeighbours,
    TooManyRequests,
}

impl fmt::Display for DelegationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DelegationError::AlreadyHeld => "credential already held",
            DelegationError::NotAllowed => "the user list does not let this peer serve the user",
            DelegationError::NoNeighbours => "no neighbour to ask",
            DelegationError::TooManyRequests => "too many delegation requests in flight",
        })
    }
}

impl core::error::Error for DelegationError {}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DelegationCounters {
    pub requests_sent: u64,
    pub granted: u64,
    pub refused_not_allowed: u64,
    pub refused_unknown_user: u64,
    pub refused_no_credential: u64,
    pub obtained: u64,
    pub failed: u64,
    /// Grants or refusals that answer no request of ours (or come from a peer not asked).
    pub unsolicited: u64,
    /// Grants for a user the list does not let us serve (dropped).
    pub grant_not_allowed: u64,
    pub outbound_drops: u64,
}

struct Pending {
    user: String,
    asked: Vec<PeerAddr>,
    answers: usize,
    worst: Option<RefuseReason>,
    deadline: Instant,
}

/// One peer's credential delegator (both the asking and the answering side).
pub struct CredentialDelegator {
    node: NodeId,
    server: String,
    users: UserList,
    credentials: Vec<UserCredential>,
    pending: BTreeMap<u64, Pending>,
    next_id: u64,
    outbound: VecDeque<(PeerAddr, DelegationMessage)>,
    events: VecDeque<DelegationEvent>,
    counters: DelegationCounters,
}

impl fmt::Debug for CredentialDelegator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CredentialDelegator")
            .field("node", &self.node)
            .field("credentials", &self.credentials.len())
            .field("pending", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl CredentialDelegator {
    /// A delegator for peer `node` on `server`, with the verified user list and the
    /// credentials it was launched with.
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
            credentials,
            pending: BTreeMap::new(),
            next_id: 1,
            outbound: VecDeque::new(),
            events: VecDeque::new(),
            counters: DelegationCounters::default(),
        }
    }

    pub fn credentials(&self) -> &[UserCredential] {
        &self.credentials
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
        self.pending.values().map(|p| p.deadline).min()
    }

    fn push(&mut self, to: PeerAddr, m: DelegationMessage) {
        if self.outbound.len() >= MAX_DELEGATION_OUTBOUND {
            self.counters.outbound_drops += 1;
        } else {
            self.outbound.push_back((to, m));
        }
    }

    /// Asks `neighbours` (leaf set and nearest, already authenticated) for `user`'s credential.
    pub fn request(
        &mut self,
        now: Instant,
        user: &str,
        neighbours: &[PeerAddr],
    ) -> Result<u64, DelegationError> {
        if self.credentials.iter().any(|c| c.user == user) {
            return Err(DelegationError::AlreadyHeld);
        }
        if !self.users.allows(user, self.node, &self.server) {
            return Err(DelegationError::NotAllowed);
        }
        if neighbours.is_empty() {
            return Err(DelegationError::NoNeighbours);
        }
        if self.pending.len() >= MAX_DELEGATION_REQUESTS {
            return Err(DelegationError::TooManyRequests);
        }
        let id = self.next_id;
        self.next_id += 1;
        let asked: Vec<PeerAddr> = neighbours.iter().copied().take(MAX_ASKED).collect();
        for &n in &asked {
            self.counters.requests_sent += 1;
            self.push(
                n,
                DelegationMessage::Request {
                    id,
                    user: String::from(user),
                },
            );
        }
        self.pending.insert(
            id,
            Pending {
                user: String::from(user),
                asked,
                answers: 0,
                worst: None,
                deadline: now.plus_ms(DELEGATION_TIMEOUT_MS),
            },
        );
        Ok(id)
    }

    /// A delegation message from an authenticated peer (`peer` on `peer_server`, as its
    /// verified certificate says) at `from`.
    pub fn handle_message(
        &mut self,
        from: PeerAddr,
        peer: NodeId,
        peer_server: &str,
        msg: DelegationMessage,
    ) {
        match msg {
            DelegationMessage::Request { id, user } => {
                let reason = if !self.users.knows(&user) {
                    self.counters.refused_unknown_user += 1;
                    Some(RefuseReason::UnknownUser)
                } else if !self.users.allows(&user, peer, peer_server) {
                    self.counters.refused_not_allowed += 1;
                    Some(RefuseReason::NotAllowed)
                } else if !self.credentials.iter().any(|c| c.user == user) {
                    self.counters.refused_no_credential += 1;
                    Some(RefuseReason::NoCredential)
                } else {
                    None
                };
                let reply = match reason {
                    Some(reason) => DelegationMessage::Refuse { id, reason },
                    None => {
                        self.counters.granted += 1;
                        let credential = self
                            .credentials
                            .iter()
                            .find(|c| c.user == user)
                            .expect("checked above")
                            .clone();
                        DelegationMessage::Grant { id, credential }
                    }
                };
                self.push(from, reply);
            }
            DelegationMessage::Grant { id, credential } => {
                let ok = self
                    .pending
                    .get(&id)
                    .is_some_and(|p| p.asked.contains(&from) && p.user == credential.user);
                if !ok {
                    self.counters.unsolicited += 1;
                    return;
                }
                if !self.users.allows(&credential.user, self.node, &self.server) {
                    self.counters.grant_not_allowed += 1;
                    return;
                }
                self.pending.remove(&id);
                if self.credentials.len() >= MAX_CREDENTIALS {
                    self.credentials.remove(0);
                }
                self.counters.obtained += 1;
                self.events.push_back(DelegationEvent::Obtained {
                    user: credential.user.clone(),
                    from: peer,
                });
                self.credentials.push(credential);
            }
            DelegationMessage::Refuse { id, reason } => {
                let Some(p) = self
                    .pending
                    .get_mut(&id)
                    .filter(|p| p.asked.contains(&from))
                else {
                    self.counters.unsolicited += 1;
                    return;
                };
                p.answers += 1;
                if p.worst.is_none_or(|w| rank(reason) > rank(w)) {
                    p.worst = Some(reason);
                }
                if p.answers >= p.asked.len() {
                    let p = self.pending.remove(&id).expect("present");
                    self.counters.failed += 1;
                    self.events.push_back(DelegationEvent::Failed {
                        user: p.user,
                        why: FailReason::Refused(reason_or(p.worst)),
                    });
                }
            }
        }
    }

    /// Ends requests nobody answered in time.
    pub fn handle_timeout(&mut self, now: Instant) {
        let late: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(&i, _)| i)
            .collect();
        for id in late {
            let p = self.pending.remove(&id).expect("listed");
            self.counters.failed += 1;
            self.events.push_back(DelegationEvent::Failed {
                user: p.user,
                why: FailReason::Timeout,
            });
        }
    }
}

fn reason_or(worst: Option<RefuseReason>) -> RefuseReason {
    worst.unwrap_or(RefuseReason::NoCredential)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::IdentityKey;
    use crate::auth::users::{Allowance, UserEntry};
    use crate::id::Id;

    fn addr(i: u8) -> PeerAddr {
        PeerAddr {
            ipv4: [10, 0, 0, i],
            port: 7000,
        }
    }

    #[test]
    fn failure_says_why() {
        let list = UserList::issue(
            1,
            0,
            alloc::vec![UserEntry {
                name: "alice".into(),
                allowed: alloc::vec![Allowance::AnyPeer],
            }],
            &IdentityKey::from_seed(&[4; 32]),
        );
        let mut d = CredentialDelegator::new(Id(1), "s1", list, Vec::new());
        let now = Instant::ZERO;
        let id = d.request(now, "alice", &[addr(2), addr(3)]).unwrap();
        d.handle_message(
            addr(2),
            Id(2),
            "s1",
            DelegationMessage::Refuse {
                id,
                reason: RefuseReason::NoCredential,
            },
        );
        assert_eq!(d.poll_event(), None, "one neighbour has not answered yet");
        // An answer from a peer not asked does not count.
        d.handle_message(
            addr(9),
            Id(9),
            "s1",
            DelegationMessage::Refuse {
                id,
                reason: RefuseReason::NoCredential,
            },
        );
        assert_eq!(d.counters().unsolicited, 1);
        d.handle_message(
            addr(3),
            Id(3),
            "s1",
            DelegationMessage::Refuse {
                id,
                reason: RefuseReason::NotAllowed,
            },
        );
        assert_eq!(
            d.poll_event(),
            Some(DelegationEvent::Failed {
                user: "alice".into(),
                why: FailReason::Refused(RefuseReason::NotAllowed)
            })
        );
        assert_eq!(d.poll_timeout(), None);
    }
}
