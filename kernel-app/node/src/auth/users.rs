//! Users: the authority-signed user list (which peers or servers may serve each user) and the
//! 256-bit pre-shared credentials a peer may hold for some users only.

use super::keys::{self, IdentityKey, PublicKey, Sig};
use crate::id::NodeId;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use serde::{Deserialize, Serialize};
use zeroize::Zeroize;

/// Longest user name.
pub const MAX_USER_NAME: usize = 64;
/// Most users one list names.
pub const MAX_USERS: usize = 64;
/// Most allowances per user.
pub const MAX_ALLOWANCES: usize = 16;
/// Largest encoded user list (fits the launch config's `SECRET_MAX_LEN`).
pub const MAX_USER_LIST_LEN: usize = 8 * 1024;

const USERS_DOMAIN: &[u8] = b"unipeer-users-v1\0";

/// Which peers may serve a user.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Allowance {
    /// Every peer of this authority.
    AnyPeer,
    /// Peers on this physical server.
    Server(String),
    /// This one peer.
    Peer(NodeId),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserEntry {
    pub name: String,
    pub allowed: Vec<Allowance>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserListBody {
    pub version: u64,
    pub issued_unix_ms: u64,
    pub authority: PublicKey,
    pub users: Vec<UserEntry>,
}

/// The authority-signed user list.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserList {
    pub body: UserListBody,
    pub signature: Sig,
}

/// Why a user list was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UserListError {
    Malformed,
    WrongAuthority,
    BadSignature,
}

impl fmt::Display for UserListError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UserListError::Malformed => "user list is malformed",
            UserListError::WrongAuthority => "user list is not from this authority",
            UserListError::BadSignature => "user list signature does not verify",
        })
    }
}

impl core::error::Error for UserListError {}

fn signed_bytes(body: &UserListBody) -> Vec<u8> {
    let mut m = Vec::from(USERS_DOMAIN);
    m.extend_from_slice(&postcard::to_allocvec(body).unwrap_or_default());
    m
}

fn within_bounds(body: &UserListBody) -> bool {
    body.users.len() <= MAX_USERS
        && body.users.iter().all(|u| {
            !u.name.is_empty()
                && u.name.len() <= MAX_USER_NAME
                && u.allowed.len() <= MAX_ALLOWANCES
                && u.allowed.iter().all(|a| match a {
                    Allowance::Server(s) => s.len() <= super::cert::MAX_SERVER_LEN,
                    _ => true,
                })
        })
}

impl UserList {
    pub fn issue(
        version: u64,
        issued_unix_ms: u64,
        users: Vec<UserEntry>,
        authority: &IdentityKey,
    ) -> Self {
        let body = UserListBody {
            version,
            issued_unix_ms,
            authority: authority.public(),
            users,
        };
        assert!(within_bounds(&body), "user list over bound");
        let signature = authority.sign(&signed_bytes(&body));
        UserList { body, signature }
    }

    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, UserListError> {
        if bytes.len() > MAX_USER_LIST_LEN {
            return Err(UserListError::Malformed);
        }
        let (list, rest): (UserList, _) =
            postcard::take_from_bytes(bytes).map_err(|_| UserListError::Malformed)?;
        if !rest.is_empty() || !within_bounds(&list.body) {
            return Err(UserListError::Malformed);
        }
        Ok(list)
    }

    pub fn verify(&self, authority: &PublicKey) -> Result<(), UserListError> {
        if self.body.authority != *authority {
            return Err(UserListError::WrongAuthority);
        }
        if !keys::verify(authority, &signed_bytes(&self.body), &self.signature) {
            return Err(UserListError::BadSignature);
        }
        Ok(())
    }

    /// Whether the list lets the peer `node` on `server` serve `user`.
    pub fn allows(&self, user: &str, node: NodeId, server: &str) -> bool {
        self.body
            .users
            .iter()
            .find(|u| u.name == user)
            .is_some_and(|u| {
                u.allowed.iter().any(|a| match a {
                    Allowance::AnyPeer => true,
                    Allowance::Server(s) => s == server,
                    Allowance::Peer(n) => *n == node,
                })
            })
    }

    pub fn knows(&self, user: &str) -> bool {
        self.body.users.iter().any(|u| u.name == user)
    }
}

/// A user's 256-bit pre-shared key. Zeroised on drop; `Debug` never shows the key.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserCredential {
    pub user: String,
    pub psk: [u8; 32],
}

impl Drop for UserCredential {
    fn drop(&mut self) {
        self.psk.zeroize();
    }
}

impl fmt::Debug for UserCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "UserCredential {{ user: {:?}, psk: <secret> }}",
            self.user
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;
    use alloc::vec;

    #[test]
    fn allowances_and_verification() {
        let auth = IdentityKey::from_seed(&[1; 32]);
        let n1 = NodeId::from_public_key(&[1; 32]);
        let n2 = NodeId::from_public_key(&[2; 32]);
        let list = UserList::issue(
            3,
            0,
            vec![
                UserEntry {
                    name: "alice".into(),
                    allowed: vec![Allowance::Peer(n1), Allowance::Server("s2".into())],
                },
                UserEntry {
                    name: "bob".into(),
                    allowed: vec![Allowance::AnyPeer],
                },
            ],
            &auth,
        );
        let list = UserList::decode(&list.encode()).unwrap();
        list.verify(&auth.public()).unwrap();
        assert!(list.allows("alice", n1, "s1"));
        assert!(list.allows("alice", n2, "s2"));
        assert!(!list.allows("alice", n2, "s1"));
        assert!(list.allows("bob", n2, "anything"));
        assert!(!list.allows("carol", n1, "s2"));
        let mut forged = list.clone();
        forged.body.users[0].allowed.push(Allowance::AnyPeer);
        assert_eq!(
            forged.verify(&auth.public()),
            Err(UserListError::BadSignature)
        );
        let other = IdentityKey::from_seed(&[2; 32]);
        assert_eq!(
            list.verify(&other.public()),
            Err(UserListError::WrongAuthority)
        );
        let cred = UserCredential {
            user: "alice".into(),
            psk: [0x42; 32],
        };
        assert!(!format!("{cred:?}").contains("42"));
    }
}
