//! The trust layer (source document 4, issue 5): a trusted authority's certificates for peers,
//! an authority-signed user list and revocation list, the peer↔peer handshake and sealed
//! datagrams, user↔peer challenge-response, and credential delegation.
//!
//! Every piece is I/O-free like the overlay: time comes in as [`crate::Instant`] (wall-clock
//! expiry through [`WallClock`]), randomness from a seed through [`Csprng`]. Nothing here
//! reads a clock or a random source, and no `getrandom` is in the dependency graph.
//!
//! Where the keys come from at boot ([`TrustConfig::from_launch`]):
//! - `LaunchConfig::node_key`: the node's 32-byte Ed25519 seed;
//! - `LaunchConfig::certificate`: its postcard [`CertChain`] (leaf first);
//! - `extra["trust.authority"]`: the authority's 32-byte public key;
//! - `extra["trust.users"]`: the signed [`UserList`] (optional);
//! - `extra["trust.revocations"]`: the signed [`RevocationList`] (optional);
//! - `extra["trust.credentials"]`: postcard `Vec<UserCredential>` the peer holds (optional).

pub mod bench;
pub mod cert;
pub mod clock;
pub mod csprng;
pub mod delegation;
pub mod keys;
pub mod replay;
pub mod revocation;
pub mod session;
pub mod stream;
pub mod user_auth;
pub mod users;

pub use cert::{CertBody, CertChain, CertError, CertKind, Certificate, VerifiedPeer};
pub use clock::WallClock;
pub use csprng::Csprng;
pub use delegation::{CredentialDelegator, DelegationEvent, DelegationMessage, FailReason};
pub use keys::{IdentityKey, PublicKey, Sig};
pub use revocation::{RevocationError, RevocationList, RevocationState};
pub use session::{
    Channel, Delivered, SEAL_OVERHEAD, SendError, SessionLayer, SessionLimits, TrustCounters,
    TrustMessage,
};
pub use user_auth::{UserAuthClient, UserAuthError, UserAuthMessage, UserAuthResponder};
pub use users::{Allowance, UserCredential, UserEntry, UserList, UserListError};

use crate::launch::LaunchConfig;
use alloc::vec::Vec;
use core::fmt;

/// `LaunchConfig::extra` key of the authority's public key.
pub const EXTRA_AUTHORITY: &str = "trust.authority";
/// `LaunchConfig::extra` key of the signed user list.
pub const EXTRA_USERS: &str = "trust.users";
/// `LaunchConfig::extra` key of the signed revocation list.
pub const EXTRA_REVOCATIONS: &str = "trust.revocations";
/// `LaunchConfig::extra` key of the user credentials this peer holds.
pub const EXTRA_CREDENTIALS: &str = "trust.credentials";
/// Most user credentials one peer holds.
pub const MAX_CREDENTIALS: usize = 64;

/// A node's trust material, decoded from its launch config.
#[derive(Debug)]
pub struct TrustConfig {
    pub identity: IdentityKey,
    pub chain: CertChain,
    pub authority: PublicKey,
    pub users: Option<UserList>,
    pub revocations: Option<RevocationList>,
    pub credentials: Vec<UserCredential>,
}

/// Why the launch config's trust material was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TrustConfigError {
    /// `node_key` is not a 32-byte seed.
    BadNodeKey,
    /// `certificate` does not decode as a chain.
    BadCertificate,
    /// The chain's leaf key is not the node key's public key.
    KeyMismatch,
    /// `trust.authority` is missing or not 32 bytes.
    NoAuthority,
    BadUserList,
    BadRevocationList,
    BadCredentials,
}

impl fmt::Display for TrustConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TrustConfigError::BadNodeKey => "node key is not a 32-byte Ed25519 seed",
            TrustConfigError::BadCertificate => "node certificate chain does not decode",
            TrustConfigError::KeyMismatch => "node certificate is not for the node key",
            TrustConfigError::NoAuthority => "launch config carries no authority public key",
            TrustConfigError::BadUserList => "user list does not decode or verify",
            TrustConfigError::BadRevocationList => "revocation list does not decode or verify",
            TrustConfigError::BadCredentials => "user credentials do not decode",
        })
    }
}

impl core::error::Error for TrustConfigError {}

impl TrustConfig {
    /// Decodes and checks the trust material of a launch config (signatures of the lists
    /// included; the node's own chain is checked by peers, not by itself).
    pub fn from_launch(config: &LaunchConfig) -> Result<Self, TrustConfigError> {
        let seed: [u8; 32] = config
            .node_key
            .as_slice()
            .try_into()
            .map_err(|_| TrustConfigError::BadNodeKey)?;
        let identity = IdentityKey::from_seed(&seed);
        let chain =
            CertChain::decode(&config.certificate).map_err(|_| TrustConfigError::BadCertificate)?;
        if chain.leaf().map(|c| c.body.public_key) != Some(identity.public()) {
            return Err(TrustConfigError::KeyMismatch);
        }
        let authority: PublicKey = config
            .extra(EXTRA_AUTHORITY)
            .and_then(|b| b.try_into().ok())
            .ok_or(TrustConfigError::NoAuthority)?;
        let users = match config.extra(EXTRA_USERS) {
            None => None,
            Some(b) => {
                let l = UserList::decode(b).map_err(|_| TrustConfigError::BadUserList)?;
                l.verify(&authority)
                    .map_err(|_| TrustConfigError::BadUserList)?;
                Some(l)
            }
        };
        let revocations = match config.extra(EXTRA_REVOCATIONS) {
            None => None,
            Some(b) => {
                let l =
                    RevocationList::decode(b).map_err(|_| TrustConfigError::BadRevocationList)?;
                l.verify(&authority)
                    .map_err(|_| TrustConfigError::BadRevocationList)?;
                Some(l)
            }
        };
        let credentials: Vec<UserCredential> = match config.extra(EXTRA_CREDENTIALS) {
            None => Vec::new(),
            Some(b) => postcard::from_bytes(b).map_err(|_| TrustConfigError::BadCredentials)?,
        };
        if credentials.len() > MAX_CREDENTIALS {
            return Err(TrustConfigError::BadCredentials);
        }
        Ok(TrustConfig {
            identity,
            chain,
            authority,
            users,
            revocations,
            credentials,
        })
    }
}
