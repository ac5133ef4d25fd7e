//! User↔peer mutual authentication on the user's 256-bit pre-shared key (source document 4):
//! a challenge-response in which the peer proves first, then the user, and both derive a
//! session key. The Application Agent runs [`UserAuthClient`]; a peer runs [`UserAuthResponder`].
//!
//! ```text
//! U → P  Hello     {user, nonce_u}
//! P → U  Challenge {nonce_p, node, proof_p = HMAC(psk, "peer" | user | nonce_u | nonce_p | node)}
//! U → P  Proof     {proof_u = HMAC(psk, "user" | user | nonce_u | nonce_p | node)}
//! key = HKDF-SHA256(salt = nonce_u | nonce_p, ikm = psk, info = "unipeer user session" | user | node)
//! ```
//! A peer answers only for users the signed list lets it serve; if it lacks the credential it
//! says so ([`UserAuthError::NeedCredential`]) and asks its neighbours (see [`super::delegation`]).

use super::users::{MAX_USER_NAME, UserCredential, UserList};
use crate::id::NodeId;
use alloc::string::String;
use core::fmt;
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The messages of the exchange (postcard; the transport is the caller's).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum UserAuthMessage {
    Hello {
        user: String,
        nonce: [u8; 32],
    },
    Challenge {
        nonce: [u8; 32],
        node: NodeId,
        proof: [u8; 32],
    },
    Proof {
        proof: [u8; 32],
    },
}

impl UserAuthMessage {
    pub fn encode(&self) -> alloc::vec::Vec<u8> {
        postcard::to_allocvec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        match postcard::take_from_bytes::<Self>(bytes) {
            Ok((m, [])) => match &m {
                UserAuthMessage::Hello { user, .. } if user.len() > MAX_USER_NAME => None,
                _ => Some(m),
            },
            _ => None,
        }
    }
}

/// Why a user authentication failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum UserAuthError {
    /// The user is not on the signed list.
    UnknownUser,
    /// The signed list does not let this peer serve the user.
    NotAllowed,
    /// This peer may serve the user but holds no credential: delegation needed.
    NeedCredential,
    /// The other side's proof is wrong (wrong pre-shared key, or tampered).
    BadProof,
    /// A message out of order or undecodable.
    Unexpected,
}

impl fmt::Display for UserAuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            UserAuthError::UnknownUser => "user is not on the signed user list",
            UserAuthError::NotAllowed => "this peer may not serve the user",
            UserAuthError::NeedCredential => "this peer holds no credential for the user",
            UserAuthError::BadProof => "proof does not match the pre-shared key",
            UserAuthError::Unexpected => "unexpected user-authentication message",
        })
    }
}

impl core::error::Error for UserAuthError {}

fn proof(
    psk: &[u8; 32],
    label: &[u8],
    user: &str,
    nu: &[u8; 32],
    np: &[u8; 32],
    node: NodeId,
) -> HmacSha256 {
    let mut m = <HmacSha256 as Mac>::new_from_slice(psk).expect("HMAC takes any key length");
    m.update(label);
    m.update(&(user.len() as u32).to_le_bytes());
    m.update(user.as_bytes());
    m.update(nu);
    m.update(np);
    m.update(&node.to_bytes());
    m
}

fn session_key(psk: &[u8; 32], user: &str, nu: &[u8; 32], np: &[u8; 32], node: NodeId) -> [u8; 32] {
    let mut salt = [0u8; 64];
    salt[..32].copy_from_slice(nu);
    salt[32..].copy_from_slice(np);
    let hk = Hkdf::<Sha256>::new(Some(&salt), psk);
    let mut key = [0u8; 32];
    hk.expand_multi_info(
        &[
            b"unipeer user session\0",
            user.as_bytes(),
            b"\0",
            &node.to_bytes(),
        ],
        &mut key,
    )
    .expect("32 bytes is a valid HKDF length");
    key
}

/// The user's side (Application Agent).
pub struct UserAuthClient {
    credential: UserCredential,
    nonce: [u8; 32],
}

impl UserAuthClient {
    /// Starts with a fresh `nonce`; returns the client and its Hello.
    pub fn start(credential: UserCredential, nonce: [u8; 32]) -> (Self, UserAuthMessage) {
        let hello = UserAuthMessage::Hello {
            user: credential.user.clone(),
            nonce,
        };
        (UserAuthClient { credential, nonce }, hello)
    }

    /// Checks the peer's challenge; on success returns the Proof to send, the peer's NodeId
    /// and the session key.
    pub fn on_challenge(
        &self,
        msg: &UserAuthMessage,
    ) -> Result<(UserAuthMessage, NodeId, [u8; 32]), UserAuthError> {
        let UserAuthMessage::Challenge {
            nonce: np,
            node,
            proof: p,
        } = msg
        else {
            return Err(UserAuthError::Unexpected);
        };
        let c = &self.credential;
        if proof(&c.psk, b"peer", &c.user, &self.nonce, np, *node)
            .verify_slice(p)
            .is_err()
        {
            return Err(UserAuthError::BadProof);
        }
        let mine = proof(&c.psk, b"user", &c.user, &self.nonce, np, *node)
            .finalize()
            .into_bytes()
            .into();
        Ok((
            UserAuthMessage::Proof { proof: mine },
            *node,
            session_key(&c.psk, &c.user, &self.nonce, np, *node),
        ))
    }
}

/// A peer's side of one user's authentication.
pub struct UserAuthResponder {
    credential: UserCredential,
    node: NodeId,
    nonce_u: [u8; 32],
    nonce_p: [u8; 32],
}

impl fmt::Debug for UserAuthResponder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "UserAuthResponder {{ user: {:?}, .. }}",
            self.credential.user
        )
    }
}

/// A peer's answer to a Hello.
pub type Answer = (UserAuthResponder, UserAuthMessage);

impl UserAuthResponder {
    /// Answers a Hello: the list must let peer `node` on `server` serve the user, and the peer
    /// must hold the credential (`credentials`). `nonce` is fresh from the caller's CSPRNG.
    pub fn on_hello(
        msg: &UserAuthMessage,
        node: NodeId,
        server: &str,
        users: &UserList,
        credentials: &[UserCredential],
        nonce: [u8; 32],
    ) -> Result<Answer, UserAuthError> {
        let UserAuthMessage::Hello { user, nonce: nu } = msg else {
            return Err(UserAuthError::Unexpected);
        };
        if !users.knows(user) {
            return Err(UserAuthError::UnknownUser);
        }
        if !users.allows(user, node, server) {
            return Err(UserAuthError::NotAllowed);
        }
        let Some(credential) = credentials.iter().find(|c| c.user == *user) else {
            return Err(UserAuthError::NeedCredential);
        };
        let p = proof(&credential.psk, b"peer", user, nu, &nonce, node)
            .finalize()
            .into_bytes()
            .into();
        Ok((
            UserAuthResponder {
                credential: credential.clone(),
                node,
                nonce_u: *nu,
                nonce_p: nonce,
            },
            UserAuthMessage::Challenge {
                nonce,
                node,
                proof: p,
            },
        ))
    }

    /// Checks the user's proof; on success returns the session key.
    pub fn on_proof(self, msg: &UserAuthMessage) -> Result<[u8; 32], UserAuthError> {
        let UserAuthMessage::Proof { proof: p } = msg else {
            return Err(UserAuthError::Unexpected);
        };
        let c = &self.credential;
        proof(
            &c.psk,
            b"user",
            &c.user,
            &self.nonce_u,
            &self.nonce_p,
            self.node,
        )
        .verify_slice(p)
        .map_err(|_| UserAuthError::BadProof)?;
        Ok(session_key(
            &c.psk,
            &c.user,
            &self.nonce_u,
            &self.nonce_p,
            self.node,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::keys::IdentityKey;
    use crate::auth::users::{Allowance, UserEntry};
    use alloc::vec;

    fn setup() -> (UserList, NodeId, UserCredential) {
        let auth = IdentityKey::from_seed(&[1; 32]);
        let node = NodeId::from_public_key(&[3; 32]);
        let list = UserList::issue(
            1,
            0,
            vec![UserEntry {
                name: "alice".into(),
                allowed: vec![Allowance::Server("s1".into())],
            }],
            &auth,
        );
        let cred = UserCredential {
            user: "alice".into(),
            psk: [7; 32],
        };
        (list, node, cred)
    }

    #[test]
    fn mutual_authentication_gives_one_key() {
        let (list, node, cred) = setup();
        let (client, hello) = UserAuthClient::start(cred.clone(), [1; 32]);
        let hello = UserAuthMessage::decode(&hello.encode()).unwrap();
        let (resp, ch) =
            UserAuthResponder::on_hello(&hello, node, "s1", &list, &[cred], [2; 32]).unwrap();
        let (proof, peer, k_user) = client.on_challenge(&ch).unwrap();
        assert_eq!(peer, node);
        let k_peer = resp.on_proof(&proof).unwrap();
        assert_eq!(k_user, k_peer);
    }

    #[test]
    fn each_refusal() {
        let (list, node, cred) = setup();
        let mut wrong = cred.clone();
        wrong.psk[0] ^= 1;
        // A user with the wrong key: the peer's proof fails at the client ...
        let (client, hello) = UserAuthClient::start(wrong.clone(), [1; 32]);
        let (resp, ch) = UserAuthResponder::on_hello(
            &hello,
            node,
            "s1",
            &list,
            core::slice::from_ref(&cred),
            [2; 32],
        )
        .unwrap();
        assert_eq!(
            client.on_challenge(&ch).err(),
            Some(UserAuthError::BadProof)
        );
        // ... and a proof made with the wrong key fails at the peer.
        let forged = proof(&wrong.psk, b"user", "alice", &[1; 32], &[2; 32], node)
            .finalize()
            .into_bytes()
            .into();
        assert_eq!(
            resp.on_proof(&UserAuthMessage::Proof { proof: forged })
                .err(),
            Some(UserAuthError::BadProof)
        );
        let (_, hello) = UserAuthClient::start(cred.clone(), [1; 32]);
        let refuse = |server: &str, creds: &[UserCredential]| {
            UserAuthResponder::on_hello(&hello, node, server, &list, creds, [2; 32]).err()
        };
        assert_eq!(
            refuse("s2", core::slice::from_ref(&cred)),
            Some(UserAuthError::NotAllowed)
        );
        assert_eq!(refuse("s1", &[]), Some(UserAuthError::NeedCredential));
        let (_, bob) = UserAuthClient::start(
            UserCredential {
                user: "bob".into(),
                psk: [0; 32],
            },
            [1; 32],
        );
        assert_eq!(
            UserAuthResponder::on_hello(&bob, node, "s1", &list, &[cred], [2; 32]).err(),
            Some(UserAuthError::UnknownUser)
        );
    }
}
