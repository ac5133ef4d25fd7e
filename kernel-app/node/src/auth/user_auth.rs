//! User↔peer mutual authentication on the user's 256-bit pre-shared key (source document 4)
//! with an ephemeral X25519 exchange for forward secrecy: a challenge-response in which the
//! peer proves first, then the user, and both derive a session key from the pre-shared key
//! *and* the Diffie-Hellman secret. A recorded session stays sealed even if the user's key
//! leaks later: the ephemeral secrets are gone. The Application Agent runs
//! [`UserAuthClient`]; a peer runs [`UserAuthResponder`].
//!
//! ```text
//! U → P  Hello     {user, nonce_u, eph_u}
//! P → U  Challenge {nonce_p, eph_p, node, proof_p = HMAC(psk, "peer" | T)}
//! U → P  Proof     {proof_u = HMAC(psk, "user" | T)}
//! T   = SHA-256("unipeer user handshake v2" | len(user) | user | nonce_u | eph_u | nonce_p | eph_p | node)
//! dh  = X25519(eph secret, other's eph public)      (an all-zero result is refused)
//! psk_part = HMAC(psk, "session" | T)
//! key = HKDF-SHA256(salt = T, ikm = psk_part | dh, info = "unipeer user session v2")
//! ```
//! A peer answers only for users the signed list lets it serve. If it lacks the credential it
//! can still run the exchange with the user: it keeps its own ephemeral secret and asks a
//! neighbour holding the credential to make `proof_p` over the [`Transcript`] and, once the
//! user's `proof_u` is relayed back and verifies there, to delegate the credential
//! ([`super::delegation`]). The neighbour never learns `dh`, so it cannot read the session.

use super::users::{MAX_USER_NAME, UserCredential, UserList};
use crate::id::NodeId;
use alloc::string::String;
use core::fmt;
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use x25519_dalek::{PublicKey as XPublic, StaticSecret};

type HmacSha256 = Hmac<Sha256>;

/// The messages of the exchange (postcard; the transport is the caller's).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum UserAuthMessage {
    Hello {
        user: String,
        nonce: [u8; 32],
        /// The user's ephemeral X25519 public key.
        ephemeral: [u8; 32],
    },
    Challenge {
        nonce: [u8; 32],
        /// The peer's ephemeral X25519 public key.
        ephemeral: [u8; 32],
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
    /// The other side's ephemeral key is low-order (the shared secret would be all zero).
    BadEphemeral,
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
            UserAuthError::BadEphemeral => "ephemeral key is not a usable X25519 public key",
            UserAuthError::Unexpected => "unexpected user-authentication message",
        })
    }
}

impl core::error::Error for UserAuthError {}

/// Everything both proofs and the session key are bound to. It travels (sealed, between
/// authenticated peers) when a peer without the credential asks a holder to prove for it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transcript {
    pub user: String,
    pub nonce_u: [u8; 32],
    pub eph_u: [u8; 32],
    pub nonce_p: [u8; 32],
    pub eph_p: [u8; 32],
    /// The peer the user talks to (the one whose ephemeral secret makes the session).
    pub node: NodeId,
}

impl Transcript {
    /// The transcript hash `T`.
    pub fn hash(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(b"unipeer user handshake v2\0");
        h.update((self.user.len() as u32).to_le_bytes());
        h.update(self.user.as_bytes());
        h.update(self.nonce_u);
        h.update(self.eph_u);
        h.update(self.nonce_p);
        h.update(self.eph_p);
        h.update(self.node.to_bytes());
        h.finalize().into()
    }

    fn mac(&self, psk: &[u8; 32], label: &[u8]) -> HmacSha256 {
        let mut m = <HmacSha256 as Mac>::new_from_slice(psk).expect("HMAC takes any key length");
        m.update(label);
        m.update(&self.hash());
        m
    }

    /// `proof_p`: the peer's proof of holding `psk`.
    pub fn peer_proof(&self, psk: &[u8; 32]) -> [u8; 32] {
        self.mac(psk, b"peer").finalize().into_bytes().into()
    }

    /// `proof_u`: the user's proof of holding `psk`.
    pub fn user_proof(&self, psk: &[u8; 32]) -> [u8; 32] {
        self.mac(psk, b"user").finalize().into_bytes().into()
    }

    /// Whether `proof` is the peer's proof under `psk` (constant time).
    pub fn check_peer_proof(&self, psk: &[u8; 32], proof: &[u8; 32]) -> bool {
        self.mac(psk, b"peer").verify_slice(proof).is_ok()
    }

    /// Whether `proof` is the user's proof under `psk` (constant time).
    pub fn check_user_proof(&self, psk: &[u8; 32], proof: &[u8; 32]) -> bool {
        self.mac(psk, b"user").verify_slice(proof).is_ok()
    }

    /// The session key from the pre-shared key and the X25519 secret `dh`.
    fn session_key(&self, psk: &[u8; 32], dh: &[u8; 32]) -> [u8; 32] {
        let psk_part: [u8; 32] = self.mac(psk, b"session").finalize().into_bytes().into();
        let mut ikm = [0u8; 64];
        ikm[..32].copy_from_slice(&psk_part);
        ikm[32..].copy_from_slice(dh);
        let hk = Hkdf::<Sha256>::new(Some(&self.hash()), &ikm);
        zeroize::Zeroize::zeroize(&mut ikm);
        let mut key = [0u8; 32];
        hk.expand(b"unipeer user session v2", &mut key)
            .expect("32 bytes is a valid HKDF length");
        key
    }
}

/// An ephemeral X25519 secret from 32 random bytes, and its public key.
fn ephemeral(seed: [u8; 32]) -> (StaticSecret, [u8; 32]) {
    let secret = StaticSecret::from(seed);
    let public = XPublic::from(&secret).to_bytes();
    (secret, public)
}

/// X25519 with the all-zero (low-order) result refused.
fn agree(secret: &StaticSecret, peer: &[u8; 32]) -> Result<[u8; 32], UserAuthError> {
    let shared = secret.diffie_hellman(&XPublic::from(*peer));
    if shared.was_contributory() {
        Ok(*shared.as_bytes())
    } else {
        Err(UserAuthError::BadEphemeral)
    }
}

/// The user's side (Application Agent).
pub struct UserAuthClient {
    credential: UserCredential,
    nonce: [u8; 32],
    secret: StaticSecret,
    public: [u8; 32],
}

impl UserAuthClient {
    /// Starts with a fresh `nonce` and 32 fresh random bytes for the ephemeral key; returns the
    /// client and its Hello.
    pub fn start(
        credential: UserCredential,
        nonce: [u8; 32],
        ephemeral_seed: [u8; 32],
    ) -> (Self, UserAuthMessage) {
        let (secret, public) = ephemeral(ephemeral_seed);
        let hello = UserAuthMessage::Hello {
            user: credential.user.clone(),
            nonce,
            ephemeral: public,
        };
        (
            UserAuthClient {
                credential,
                nonce,
                secret,
                public,
            },
            hello,
        )
    }

    /// Checks the peer's challenge; on success returns the Proof to send, the peer's NodeId
    /// and the session key.
    pub fn on_challenge(
        &self,
        msg: &UserAuthMessage,
    ) -> Result<(UserAuthMessage, NodeId, [u8; 32]), UserAuthError> {
        let UserAuthMessage::Challenge {
            nonce,
            ephemeral,
            node,
            proof,
        } = msg
        else {
            return Err(UserAuthError::Unexpected);
        };
        let c = &self.credential;
        let t = Transcript {
            user: c.user.clone(),
            nonce_u: self.nonce,
            eph_u: self.public,
            nonce_p: *nonce,
            eph_p: *ephemeral,
            node: *node,
        };
        if !t.check_peer_proof(&c.psk, proof) {
            return Err(UserAuthError::BadProof);
        }
        let dh = agree(&self.secret, ephemeral)?;
        Ok((
            UserAuthMessage::Proof {
                proof: t.user_proof(&c.psk),
            },
            *node,
            t.session_key(&c.psk, &dh),
        ))
    }
}

/// A peer's side of one user's authentication: directly on a credential it holds, or relayed
/// through a holder ([`Self::relayed`]) until the holder delegates the credential.
pub struct UserAuthResponder {
    transcript: Transcript,
    secret: StaticSecret,
    credential: Option<UserCredential>,
}

impl fmt::Debug for UserAuthResponder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "UserAuthResponder {{ user: {:?}, holds: {}, .. }}",
            self.transcript.user,
            self.credential.is_some()
        )
    }
}

/// A peer's answer to a Hello.
pub type Answer = (UserAuthResponder, UserAuthMessage);

impl UserAuthResponder {
    /// The checks every Hello gets: on the list, allowed here, a usable ephemeral key.
    fn begin(
        msg: &UserAuthMessage,
        node: NodeId,
        server: &str,
        users: &UserList,
        nonce: [u8; 32],
        ephemeral_seed: [u8; 32],
    ) -> Result<Self, UserAuthError> {
        let UserAuthMessage::Hello {
            user,
            nonce: nonce_u,
            ephemeral: eph_u,
        } = msg
        else {
            return Err(UserAuthError::Unexpected);
        };
        if !users.knows(user) {
            return Err(UserAuthError::UnknownUser);
        }
        if !users.allows(user, node, server) {
            return Err(UserAuthError::NotAllowed);
        }
        let (secret, eph_p) = ephemeral(ephemeral_seed);
        agree(&secret, eph_u)?;
        Ok(UserAuthResponder {
            transcript: Transcript {
                user: user.clone(),
                nonce_u: *nonce_u,
                eph_u: *eph_u,
                nonce_p: nonce,
                eph_p,
                node,
            },
            secret,
            credential: None,
        })
    }

    /// Answers a Hello on a credential this peer holds: the list must let peer `node` on
    /// `server` serve the user. `nonce` and `ephemeral_seed` are fresh from the caller's CSPRNG.
    /// Without the credential: [`UserAuthError::NeedCredential`] (then see [`Self::relayed`]).
    pub fn on_hello(
        msg: &UserAuthMessage,
        node: NodeId,
        server: &str,
        users: &UserList,
        credential: Option<&UserCredential>,
        nonce: [u8; 32],
        ephemeral_seed: [u8; 32],
    ) -> Result<Answer, UserAuthError> {
        let mut r = Self::begin(msg, node, server, users, nonce, ephemeral_seed)?;
        let Some(c) = credential.filter(|c| c.user == r.transcript.user) else {
            return Err(UserAuthError::NeedCredential);
        };
        let proof = r.transcript.peer_proof(&c.psk);
        r.credential = Some(c.clone());
        let challenge = r.challenge(proof);
        Ok((r, challenge))
    }

    /// Starts the exchange for a user this peer may serve but holds no credential for: the
    /// Challenge waits for a holder's proof over [`Self::transcript`] ([`Self::challenge`]).
    pub fn relayed(
        msg: &UserAuthMessage,
        node: NodeId,
        server: &str,
        users: &UserList,
        nonce: [u8; 32],
        ephemeral_seed: [u8; 32],
    ) -> Result<Self, UserAuthError> {
        Self::begin(msg, node, server, users, nonce, ephemeral_seed)
    }

    pub fn transcript(&self) -> &Transcript {
        &self.transcript
    }

    pub fn user(&self) -> &str {
        &self.transcript.user
    }

    /// The Challenge carrying `proof` (the peer proof over this transcript).
    pub fn challenge(&self, proof: [u8; 32]) -> UserAuthMessage {
        UserAuthMessage::Challenge {
            nonce: self.transcript.nonce_p,
            ephemeral: self.transcript.eph_p,
            node: self.transcript.node,
            proof,
        }
    }

    /// Gives a relayed exchange the credential a holder delegated.
    pub fn with_credential(mut self, credential: &UserCredential) -> Result<Self, UserAuthError> {
        if credential.user != self.transcript.user {
            return Err(UserAuthError::Unexpected);
        }
        self.credential = Some(credential.clone());
        Ok(self)
    }

    /// Checks the user's proof; on success returns the session key.
    pub fn on_proof(self, msg: &UserAuthMessage) -> Result<[u8; 32], UserAuthError> {
        let UserAuthMessage::Proof { proof } = msg else {
            return Err(UserAuthError::Unexpected);
        };
        let Some(c) = self.credential.as_ref() else {
            return Err(UserAuthError::NeedCredential);
        };
        if !self.transcript.check_user_proof(&c.psk, proof) {
            return Err(UserAuthError::BadProof);
        }
        let dh = agree(&self.secret, &self.transcript.eph_u)?;
        Ok(self.transcript.session_key(&c.psk, &dh))
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
        let (client, hello) = UserAuthClient::start(cred.clone(), [1; 32], [11; 32]);
        let hello = UserAuthMessage::decode(&hello.encode()).unwrap();
        let (resp, ch) =
            UserAuthResponder::on_hello(&hello, node, "s1", &list, Some(&cred), [2; 32], [12; 32])
                .unwrap();
        let ch = UserAuthMessage::decode(&ch.encode()).unwrap();
        let (proof, peer, k_user) = client.on_challenge(&ch).unwrap();
        assert_eq!(peer, node);
        let k_peer = resp.on_proof(&proof).unwrap();
        assert_eq!(k_user, k_peer);
    }

    /// Forward secrecy: the key depends on both ephemeral secrets, not only on the pre-shared
    /// key and what crossed the wire. Two runs with the same nonces differ by their ephemeral
    /// keys alone and give different keys; someone holding the pre-shared key who recorded
    /// one run and replays its Hello gets a new key from the peer.
    #[test]
    fn session_keys_depend_on_the_ephemeral_exchange() {
        let (list, node, cred) = setup();
        let run = |eu: u8, ep: u8| {
            let (client, hello) = UserAuthClient::start(cred.clone(), [1; 32], [eu; 32]);
            let (resp, ch) = UserAuthResponder::on_hello(
                &hello,
                node,
                "s1",
                &list,
                Some(&cred),
                [2; 32],
                [ep; 32],
            )
            .unwrap();
            let (proof, _, k) = client.on_challenge(&ch).unwrap();
            assert_eq!(resp.on_proof(&proof).unwrap(), k);
            (hello, k)
        };
        let (hello_a, k_a) = run(11, 12);
        let (_, k_b) = run(13, 12);
        let (_, k_c) = run(11, 14);
        assert_ne!(k_a, k_b);
        assert_ne!(k_a, k_c);
        // The recorded Hello replayed to the peer: a fresh peer ephemeral, a fresh key.
        let (_, ch) = UserAuthResponder::on_hello(
            &hello_a,
            node,
            "s1",
            &list,
            Some(&cred),
            [2; 32],
            [15; 32],
        )
        .unwrap();
        let UserAuthMessage::Challenge { ephemeral, .. } = ch else {
            panic!("a challenge")
        };
        assert_ne!(ephemeral, ephemeral_public(12));
        // The old PSK-only derivation over the same nonces is not the key.
        let t = Transcript {
            user: "alice".into(),
            nonce_u: [1; 32],
            eph_u: ephemeral_public(11),
            nonce_p: [2; 32],
            eph_p: ephemeral_public(12),
            node,
        };
        assert_ne!(t.session_key(&cred.psk, &[0; 32]), k_a);
    }

    fn ephemeral_public(seed: u8) -> [u8; 32] {
        ephemeral([seed; 32]).1
    }

    #[test]
    fn low_order_ephemeral_keys_are_refused() {
        let (list, node, cred) = setup();
        let hello = UserAuthMessage::Hello {
            user: "alice".into(),
            nonce: [1; 32],
            ephemeral: [0; 32],
        };
        assert_eq!(
            UserAuthResponder::on_hello(&hello, node, "s1", &list, Some(&cred), [2; 32], [3; 32])
                .err(),
            Some(UserAuthError::BadEphemeral)
        );
        let (client, _) = UserAuthClient::start(cred.clone(), [1; 32], [4; 32]);
        let t = Transcript {
            user: "alice".into(),
            nonce_u: [1; 32],
            eph_u: ephemeral_public(4),
            nonce_p: [2; 32],
            eph_p: [0; 32],
            node,
        };
        let ch = UserAuthMessage::Challenge {
            nonce: [2; 32],
            ephemeral: [0; 32],
            node,
            proof: t.peer_proof(&cred.psk),
        };
        assert_eq!(
            client.on_challenge(&ch).err(),
            Some(UserAuthError::BadEphemeral)
        );
    }

    /// A peer without the credential runs the exchange with a holder's proof over its
    /// transcript, and finishes it once the credential is delegated; the key is the user's.
    #[test]
    fn a_relayed_exchange_gives_the_users_key() {
        let (list, node, cred) = setup();
        let (client, hello) = UserAuthClient::start(cred.clone(), [1; 32], [21; 32]);
        assert_eq!(
            UserAuthResponder::on_hello(&hello, node, "s1", &list, None, [2; 32], [22; 32]).err(),
            Some(UserAuthError::NeedCredential)
        );
        let resp =
            UserAuthResponder::relayed(&hello, node, "s1", &list, [2; 32], [22; 32]).unwrap();
        // The holder's part: a proof over the transcript.
        let proof_p = resp.transcript().peer_proof(&cred.psk);
        let (proof, _, k_user) = client.on_challenge(&resp.challenge(proof_p)).unwrap();
        let UserAuthMessage::Proof { proof: pu } = proof else {
            panic!("a proof")
        };
        assert!(resp.transcript().check_user_proof(&cred.psk, &pu));
        // Without the credential the peer cannot finish.
        let again =
            UserAuthResponder::relayed(&hello, node, "s1", &list, [2; 32], [22; 32]).unwrap();
        assert_eq!(
            again.on_proof(&UserAuthMessage::Proof { proof: pu }).err(),
            Some(UserAuthError::NeedCredential)
        );
        let k_peer = resp
            .with_credential(&cred)
            .unwrap()
            .on_proof(&UserAuthMessage::Proof { proof: pu })
            .unwrap();
        assert_eq!(k_user, k_peer);
    }

    #[test]
    fn each_refusal() {
        let (list, node, cred) = setup();
        let mut wrong = cred.clone();
        wrong.psk[0] ^= 1;
        // A user with the wrong key: the peer's proof fails at the client ...
        let (client, hello) = UserAuthClient::start(wrong.clone(), [1; 32], [5; 32]);
        let (resp, ch) =
            UserAuthResponder::on_hello(&hello, node, "s1", &list, Some(&cred), [2; 32], [6; 32])
                .unwrap();
        assert_eq!(
            client.on_challenge(&ch).err(),
            Some(UserAuthError::BadProof)
        );
        // ... and a proof made with the wrong key fails at the peer.
        let forged = resp.transcript().user_proof(&wrong.psk);
        assert_eq!(
            resp.on_proof(&UserAuthMessage::Proof { proof: forged })
                .err(),
            Some(UserAuthError::BadProof)
        );
        let (_, hello) = UserAuthClient::start(cred.clone(), [1; 32], [5; 32]);
        let refuse = |server: &str, c: Option<&UserCredential>| {
            UserAuthResponder::on_hello(&hello, node, server, &list, c, [2; 32], [6; 32]).err()
        };
        assert_eq!(refuse("s2", Some(&cred)), Some(UserAuthError::NotAllowed));
        assert_eq!(refuse("s1", None), Some(UserAuthError::NeedCredential));
        let (_, bob) = UserAuthClient::start(
            UserCredential {
                user: "bob".into(),
                psk: [0; 32],
            },
            [1; 32],
            [5; 32],
        );
        assert_eq!(
            UserAuthResponder::on_hello(&bob, node, "s1", &list, Some(&cred), [2; 32], [6; 32])
                .err(),
            Some(UserAuthError::UnknownUser)
        );
        // Someone else's credential is not this user's.
        let carol = UserCredential {
            user: "carol".into(),
            psk: [7; 32],
        };
        assert_eq!(
            refuse("s1", Some(&carol)),
            Some(UserAuthError::NeedCredential)
        );
    }
}
