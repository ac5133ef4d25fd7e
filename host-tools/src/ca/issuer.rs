//! A front-end's certificate issuer: holds the intermediate the authority gave it (limited to
//! its physical server and a validity window) and certifies the VMs it launches, so
//! `unipeer up` needs no manual step per VM.

use super::store::{INTERMEDIATE_SERIAL_BLOCK, os_random32, read_private, write_private};
use anyhow::{Context, Result, anyhow, bail};
use std::path::{Path, PathBuf};
use unipeer_node::auth::cert::{self, CertKind, Certificate};
use unipeer_node::auth::{CertChain, IdentityKey};

/// A peer's launch material: its key seed and encoded chain (leaf, intermediate).
pub struct IssuedPeer {
    pub seed: [u8; 32],
    pub chain: Vec<u8>,
    pub serial: u64,
    pub node_id: unipeer_node::NodeId,
}

impl std::fmt::Debug for IssuedPeer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "IssuedPeer {{ serial: {}, node_id: {}, .. }}",
            self.serial, self.node_id
        )
    }
}

/// Issues peer certificates under an intermediate.
pub struct FrontEndIssuer {
    key: IdentityKey,
    intermediate: Certificate,
    counter_path: PathBuf,
    next: u64,
}

impl FrontEndIssuer {
    /// Loads the intermediate key and chain written by `unipeer ca intermediate`; the serial
    /// counter lives next to the key (`<key>.serial`), so restarts never reuse a serial.
    pub fn load(key_path: &Path, chain_path: &Path) -> Result<Self> {
        let seed: [u8; 32] = read_private(key_path)?
            .as_slice()
            .try_into()
            .map_err(|_| anyhow!("{} is corrupt: expected 32 bytes", key_path.display()))?;
        let key = IdentityKey::from_seed(&seed);
        let chain = CertChain::decode(&read_private(chain_path)?)
            .map_err(|e| anyhow!("{}: {e}", chain_path.display()))?;
        let intermediate = match chain.certs.as_slice() {
            [c] if c.body.kind == CertKind::Intermediate && c.body.public_key == key.public() => {
                c.clone()
            }
            _ => bail!(
                "{} is not the intermediate of this key",
                chain_path.display()
            ),
        };
        let counter_path = key_path.with_extension("serial");
        let next = match std::fs::read_to_string(&counter_path) {
            Ok(s) => s
                .trim()
                .parse()
                .with_context(|| format!("{} is corrupt", counter_path.display()))?,
            Err(_) => 1,
        };
        Ok(FrontEndIssuer {
            key,
            intermediate,
            counter_path,
            next,
        })
    }

    pub fn server(&self) -> &str {
        &self.intermediate.body.server
    }

    /// Certifies a fresh key for a VM on this front-end's server, valid from `now_ms` for
    /// `valid_ms`, clipped to the intermediate's window.
    pub fn issue_peer(&mut self, now_ms: u64, valid_ms: u64) -> Result<IssuedPeer> {
        let b = &self.intermediate.body;
        if now_ms < b.not_before_ms || now_ms >= b.not_after_ms {
            bail!("the intermediate for {} is not valid now", b.server);
        }
        if self.next >= INTERMEDIATE_SERIAL_BLOCK {
            bail!(
                "the intermediate for {} has issued all its serials",
                b.server
            );
        }
        let serial = b.serial * INTERMEDIATE_SERIAL_BLOCK + self.next;
        self.next += 1;
        write_private(&self.counter_path, self.next.to_string().as_bytes())?;
        let peer = IdentityKey::from_seed(&os_random32()?);
        let leaf = Certificate::issue(
            cert::body_for(
                CertKind::Peer,
                serial,
                &peer.public(),
                &b.server,
                now_ms,
                now_ms.saturating_add(valid_ms).min(b.not_after_ms),
            ),
            &self.key,
        );
        let chain = CertChain {
            certs: vec![leaf, self.intermediate.clone()],
        };
        Ok(IssuedPeer {
            seed: peer.seed(),
            chain: chain.encode(),
            serial,
            node_id: peer.node_id(),
        })
    }
}
