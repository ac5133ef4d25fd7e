//! The authority store: a directory with owner-only permissions (0700, files 0600) holding the
//! authority's Ed25519 seed, the issued certificates, peer keys, user pre-shared keys and the
//! signed user and revocation lists. Secrets live in their own files and are never printed.
//!
//! ```text
//! <store>/authority.key          32-byte seed (secret)
//! <store>/state.json             what was issued: peers, intermediates, users, revoked serials
//! <store>/peers/<name>.key       32-byte seed (secret)       <name>.chain  postcard CertChain
//! <store>/intermediates/<server>-<serial>.key / .chain
//! <store>/users/<name>.psk       32-byte pre-shared key (secret)
//! <store>/user-list.bin          signed UserList           revocations.bin  signed RevocationList
//! ```

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use std::fs::{self, DirBuilder, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use unipeer_node::auth::cert::{self, CertKind, Certificate};
use unipeer_node::auth::{
    Allowance, CertChain, IdentityKey, PublicKey, RevocationList, UserEntry, UserList,
};

/// Format version of `state.json`.
pub const STATE_VERSION: u32 = 1;
const STATE_FILE: &str = "state.json";
const AUTHORITY_KEY: &str = "authority.key";
/// Serials below this are the authority's; the peers of intermediate `s` get serials
/// `s * INTERMEDIATE_SERIAL_BLOCK + 1 ..`.
pub const INTERMEDIATE_SERIAL_BLOCK: u64 = 1 << 32;

/// A peer certificate the authority (or a front-end's intermediate) issued.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct PeerRecord {
    pub name: String,
    pub server: String,
    pub serial: u64,
    pub node_id: String,
    pub public_key: String,
    pub not_before_ms: u64,
    pub not_after_ms: u64,
}

/// An intermediate issued to a front-end.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct IntermediateRecord {
    pub server: String,
    pub serial: u64,
    pub public_key: String,
    pub not_before_ms: u64,
    pub not_after_ms: u64,
}

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct UserRecord {
    pub name: String,
    pub allowed: Vec<Allowance>,
}

/// `state.json`: everything issued, without secrets.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct StoreState {
    pub format: u32,
    pub authority_public: String,
    pub next_serial: u64,
    pub user_list_version: u64,
    pub revocation_version: u64,
    pub peers: Vec<PeerRecord>,
    pub intermediates: Vec<IntermediateRecord>,
    pub users: Vec<UserRecord>,
    pub revoked: Vec<u64>,
}

/// An opened authority store.
pub struct AuthorityStore {
    root: PathBuf,
    authority: IdentityKey,
    pub state: StoreState,
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// 32 bytes from the operating system's RNG (host only).
pub fn os_random32() -> Result<[u8; 32]> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| anyhow!("OS random source failed: {e}"))?;
    Ok(b)
}

pub fn now_unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Checks a path has no group/other permission bits.
fn check_private(path: &Path) -> Result<()> {
    let meta =
        fs::symlink_metadata(path).with_context(|| format!("cannot read {}", path.display()))?;
    if meta.file_type().is_symlink() {
        bail!(
            "{} is a symlink; the authority store refuses symlinks",
            path.display()
        );
    }
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        bail!(
            "{} has permissions {:o}; the authority store must be owner-only (chmod {} {})",
            path.display(),
            mode,
            if meta.is_dir() { "700" } else { "600" },
            path.display()
        );
    }
    Ok(())
}

fn mkdir_private(path: &Path) -> Result<()> {
    if !path.exists() {
        DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
    }
    check_private(path)
}

/// Writes a file 0600 atomically (temp file + rename), so a crash never leaves half a store.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = path.with_extension("tmp");
    let _ = fs::remove_file(&tmp);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(())
}

/// Reads a file after checking it is owner-only.
pub fn read_private(path: &Path) -> Result<Vec<u8>> {
    check_private(path)?;
    fs::read(path).with_context(|| format!("cannot read {}", path.display()))
}

fn read_seed(path: &Path) -> Result<[u8; 32]> {
    let b = read_private(path)?;
    b.as_slice().try_into().map_err(|_| {
        anyhow!(
            "{} is corrupt: expected 32 bytes, found {}",
            path.display(),
            b.len()
        )
    })
}

/// A name safe as a file name and in a certificate.
pub fn check_name(kind: &str, name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > cert::MAX_SERVER_LEN
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        || name.starts_with('.')
    {
        bail!("bad {kind} name {name:?}: use 1-64 of [A-Za-z0-9._-], not starting with '.'");
    }
    Ok(())
}

impl AuthorityStore {
    /// Creates a new store with a fresh authority key; refuses an existing store.
    pub fn init(root: &Path) -> Result<Self> {
        if root.join(STATE_FILE).exists() || root.join(AUTHORITY_KEY).exists() {
            bail!("{} already holds an authority store", root.display());
        }
        mkdir_private(root)?;
        for sub in ["peers", "intermediates", "users"] {
            mkdir_private(&root.join(sub))?;
        }
        let authority = IdentityKey::from_seed(&os_random32()?);
        write_private(&root.join(AUTHORITY_KEY), &authority.seed())?;
        let state = StoreState {
            format: STATE_VERSION,
            authority_public: hex(&authority.public()),
            next_serial: 1,
            user_list_version: 0,
            revocation_version: 0,
            peers: vec![],
            intermediates: vec![],
            users: vec![],
            revoked: vec![],
        };
        let mut store = AuthorityStore {
            root: root.to_path_buf(),
            authority,
            state,
        };
        store.sign_user_list()?;
        store.sign_revocations()?;
        store.save()?;
        Ok(store)
    }

    /// Opens an existing store, checking permissions and consistency.
    pub fn open(root: &Path) -> Result<Self> {
        if !root.exists() {
            bail!(
                "no authority store at {} (create one with `unipeer ca init --store {}`)",
                root.display(),
                root.display()
            );
        }
        check_private(root)?;
        let seed = read_seed(&root.join(AUTHORITY_KEY))?;
        let raw = read_private(&root.join(STATE_FILE))?;
        let state: StoreState = serde_json::from_slice(&raw)
            .with_context(|| format!("{} is corrupt", root.join(STATE_FILE).display()))?;
        if state.format != STATE_VERSION {
            bail!(
                "authority store format {} is not supported (this build reads {STATE_VERSION})",
                state.format
            );
        }
        let authority = IdentityKey::from_seed(&seed);
        if state.authority_public != hex(&authority.public()) {
            bail!(
                "{} is corrupt: authority.key does not match the recorded public key",
                root.display()
            );
        }
        Ok(AuthorityStore {
            root: root.to_path_buf(),
            authority,
            state,
        })
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn authority_public(&self) -> PublicKey {
        self.authority.public()
    }

    pub fn save(&self) -> Result<()> {
        let json = serde_json::to_vec_pretty(&self.state)?;
        write_private(&self.root.join(STATE_FILE), &json)
    }

    fn take_serial(&mut self) -> u64 {
        let s = self.state.next_serial;
        self.state.next_serial += 1;
        assert!(s < INTERMEDIATE_SERIAL_BLOCK, "authority serials exhausted");
        s
    }

    pub fn peer_paths(&self, name: &str) -> (PathBuf, PathBuf) {
        let d = self.root.join("peers");
        (
            d.join(format!("{name}.key")),
            d.join(format!("{name}.chain")),
        )
    }

    /// Issues a key and a certificate for a peer, signed by the authority.
    pub fn add_peer(&mut self, name: &str, server: &str, valid_ms: u64) -> Result<PeerRecord> {
        check_name("peer", name)?;
        check_name("server", server)?;
        if self.state.peers.iter().any(|p| p.name == name) {
            bail!("peer {name:?} already exists");
        }
        let key = IdentityKey::from_seed(&os_random32()?);
        let serial = self.take_serial();
        let now = now_unix_ms();
        let c = Certificate::issue(
            cert::body_for(
                CertKind::Peer,
                serial,
                &key.public(),
                server,
                now,
                now + valid_ms,
            ),
            &self.authority,
        );
        let chain = CertChain { certs: vec![c] };
        let (kp, cp) = self.peer_paths(name);
        write_private(&kp, &key.seed())?;
        write_private(&cp, &chain.encode())?;
        let rec = PeerRecord {
            name: name.to_string(),
            server: server.to_string(),
            serial,
            node_id: key.node_id().to_string(),
            public_key: hex(&key.public()),
            not_before_ms: now,
            not_after_ms: now + valid_ms,
        };
        self.state.peers.push(rec.clone());
        self.save()?;
        Ok(rec)
    }

    /// Issues an intermediate for the front-end of `server`, valid for `valid_ms` from now.
    pub fn add_intermediate(
        &mut self,
        server: &str,
        valid_ms: u64,
    ) -> Result<(IntermediateRecord, PathBuf, PathBuf)> {
        check_name("server", server)?;
        let key = IdentityKey::from_seed(&os_random32()?);
        let serial = self.take_serial();
        let now = now_unix_ms();
        let c = Certificate::issue(
            cert::body_for(
                CertKind::Intermediate,
                serial,
                &key.public(),
                server,
                now,
                now + valid_ms,
            ),
            &self.authority,
        );
        let rec = IntermediateRecord {
            server: server.to_string(),
            serial,
            public_key: hex(&key.public()),
            not_before_ms: now,
            not_after_ms: now + valid_ms,
        };
        let d = self.root.join("intermediates");
        let kp = d.join(format!("{server}-{serial}.key"));
        let cp = d.join(format!("{server}-{serial}.chain"));
        write_private(&kp, &key.seed())?;
        write_private(&cp, &CertChain { certs: vec![c] }.encode())?;
        self.state.intermediates.push(rec.clone());
        self.save()?;
        Ok((rec, kp, cp))
    }

    /// Registers a user with a fresh 256-bit pre-shared key and re-signs the user list.
    pub fn add_user(&mut self, name: &str, allowed: Vec<Allowance>) -> Result<PathBuf> {
        check_name("user", name)?;
        if self.state.users.iter().any(|u| u.name == name) {
            bail!("user {name:?} already exists");
        }
        if allowed.is_empty() || allowed.len() > unipeer_node::auth::users::MAX_ALLOWANCES {
            bail!(
                "a user needs 1-{} allowances",
                unipeer_node::auth::users::MAX_ALLOWANCES
            );
        }
        if self.state.users.len() >= unipeer_node::auth::users::MAX_USERS {
            bail!(
                "the user list is full ({} users)",
                unipeer_node::auth::users::MAX_USERS
            );
        }
        let path = self.user_psk_path(name);
        write_private(&path, &os_random32()?)?;
        self.state.users.push(UserRecord {
            name: name.to_string(),
            allowed,
        });
        self.sign_user_list()?;
        self.save()?;
        Ok(path)
    }

    pub fn user_psk_path(&self, name: &str) -> PathBuf {
        self.root.join("users").join(format!("{name}.psk"))
    }

    /// A user's pre-shared key (for the Application Agent and for peers that hold it).
    pub fn user_psk(&self, name: &str) -> Result<[u8; 32]> {
        if !self.state.users.iter().any(|u| u.name == name) {
            bail!("no user {name:?} in the authority store");
        }
        read_seed(&self.user_psk_path(name))
    }

    /// Revokes a serial (a peer's or an intermediate's) and re-signs the revocation list.
    pub fn revoke(&mut self, serial: u64) -> Result<()> {
        let known = self.state.peers.iter().any(|p| p.serial == serial)
            || self.state.intermediates.iter().any(|i| i.serial == serial)
            || self
                .state
                .intermediates
                .iter()
                .any(|i| serial / INTERMEDIATE_SERIAL_BLOCK == i.serial);
        if !known {
            bail!("no certificate with serial {serial} was issued by this authority");
        }
        if self.state.revoked.contains(&serial) {
            bail!("serial {serial} is already revoked");
        }
        if self.state.revoked.len() >= unipeer_node::auth::revocation::MAX_REVOKED {
            bail!("the revocation list is full");
        }
        self.state.revoked.push(serial);
        self.state.revoked.sort_unstable();
        self.sign_revocations()?;
        self.save()
    }

    fn sign_user_list(&mut self) -> Result<()> {
        self.state.user_list_version += 1;
        let list = UserList::issue(
            self.state.user_list_version,
            now_unix_ms(),
            self.state
                .users
                .iter()
                .map(|u| UserEntry {
                    name: u.name.clone(),
                    allowed: u.allowed.clone(),
                })
                .collect(),
            &self.authority,
        );
        write_private(&self.root.join("user-list.bin"), &list.encode())
    }

    fn sign_revocations(&mut self) -> Result<()> {
        self.state.revocation_version += 1;
        let list = RevocationList::issue(
            self.state.revocation_version,
            now_unix_ms(),
            self.state.revoked.clone(),
            &self.authority,
        );
        write_private(&self.root.join("revocations.bin"), &list.encode())
    }

    pub fn user_list(&self) -> Result<UserList> {
        let b = read_private(&self.root.join("user-list.bin"))?;
        let l = UserList::decode(&b).map_err(|e| anyhow!("user-list.bin: {e}"))?;
        l.verify(&self.authority_public())
            .map_err(|e| anyhow!("user-list.bin: {e}"))?;
        Ok(l)
    }

    pub fn revocations(&self) -> Result<RevocationList> {
        let b = read_private(&self.root.join("revocations.bin"))?;
        let l = RevocationList::decode(&b).map_err(|e| anyhow!("revocations.bin: {e}"))?;
        l.verify(&self.authority_public())
            .map_err(|e| anyhow!("revocations.bin: {e}"))?;
        Ok(l)
    }

    /// A peer's key seed and encoded chain, as they go into its launch config.
    pub fn peer_material(&self, name: &str) -> Result<([u8; 32], Vec<u8>)> {
        if !self.state.peers.iter().any(|p| p.name == name) {
            bail!("no peer {name:?} in the authority store");
        }
        let (kp, cp) = self.peer_paths(name);
        let seed = read_seed(&kp)?;
        let chain = read_private(&cp)?;
        CertChain::decode(&chain).map_err(|e| anyhow!("{}: {e}", cp.display()))?;
        Ok((seed, chain))
    }
}
