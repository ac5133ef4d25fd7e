//! `unipeer ca ...`: the trusted authority (source document 4). It registers peers (Ed25519
//! certificates), front-ends (intermediates limited to one server and a validity window) and
//! users (256-bit pre-shared keys and an authority-signed user list), and revokes certificates
//! (a signed, versioned revocation list that spreads through the overlay).
//!
//! The CLI front is [`CaCommand`] + [`run`]; [`launch_material`] gives the launcher what goes
//! into a VM's `LaunchConfig`, and [`FrontEndIssuer`] certifies VMs under an intermediate.

pub mod bench;
pub mod issuer;
pub mod store;

pub use issuer::{FrontEndIssuer, IssuedPeer};
pub use store::AuthorityStore;

use anyhow::{Result, anyhow, bail};
use clap::{Args, Subcommand};
use std::path::PathBuf;
use unipeer_node::NodeId;
use unipeer_node::auth::{
    Allowance, EXTRA_AUTHORITY, EXTRA_CREDENTIALS, EXTRA_REVOCATIONS, EXTRA_USERS, UserCredential,
};

/// Default location of the authority store.
pub const DEFAULT_STORE: &str = "run/ca";
/// The user a new store gets (allowed on every peer), whom `unipeer submit` acts for by default.
pub const DEFAULT_USER: &str = "demo";
const DAY_MS: u64 = 86_400_000;

/// Where the authority store lives.
#[derive(Args, Clone, Debug)]
pub struct StoreArg {
    /// Authority store directory (owner-only permissions).
    #[arg(long, default_value = DEFAULT_STORE)]
    pub store: PathBuf,
}

/// The `unipeer ca` subcommands.
#[derive(Subcommand, Clone, Debug)]
pub enum CaCommand {
    /// Create an authority store with a fresh Ed25519 authority key.
    Init {
        #[command(flatten)]
        store: StoreArg,
    },
    /// Issue a key and certificate for a peer.
    AddPeer {
        /// Peer (node) name, e.g. node-3.
        name: String,
        /// Physical server the peer runs on.
        #[arg(long)]
        server: String,
        #[arg(long, default_value_t = 30)]
        valid_days: u64,
        #[command(flatten)]
        store: StoreArg,
    },
    /// Issue an intermediate certificate for a front-end, limited to one physical server.
    Intermediate {
        /// The physical server the front-end may certify VMs on.
        #[arg(long)]
        server: String,
        #[arg(long, default_value_t = 7)]
        valid_days: u64,
        #[command(flatten)]
        store: StoreArg,
    },
    /// Register a user with a fresh 256-bit pre-shared key.
    AddUser {
        name: String,
        /// Who may serve the user: `any`, `server:NAME` or `peer:NODEID` (repeatable).
        #[arg(long = "allow", default_value = "any")]
        allow: Vec<String>,
        #[command(flatten)]
        store: StoreArg,
    },
    /// Show peers, intermediates, users and revocations (never secrets).
    List {
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        store: StoreArg,
    },
    /// Revoke a certificate by peer name or serial; re-signs the revocation list.
    Revoke {
        /// A peer name or a certificate serial.
        target: String,
        #[command(flatten)]
        store: StoreArg,
    },
}

/// Runs a subcommand and prints its report.
pub fn run(command: CaCommand) -> Result<()> {
    print!("{}", execute(command)?);
    Ok(())
}

/// Runs a subcommand and returns its report (what [`run`] prints).
pub fn execute(command: CaCommand) -> Result<String> {
    match command {
        CaCommand::Init { store } => {
            let s = AuthorityStore::init(&store.store)?;
            Ok(format!(
                "authority store created at {}\nauthority public key {}\n",
                s.root().display(),
                store::hex(&s.authority_public())
            ))
        }
        CaCommand::AddPeer {
            name,
            server,
            valid_days,
            store,
        } => {
            let mut s = AuthorityStore::open(&store.store)?;
            let r = s.add_peer(&name, &server, days(valid_days)?)?;
            let (kp, cp) = s.peer_paths(&name);
            Ok(format!(
                "peer {} on {}: serial {}, node id {}\nkey {} (secret), certificate {}\n",
                r.name,
                r.server,
                r.serial,
                r.node_id,
                kp.display(),
                cp.display()
            ))
        }
        CaCommand::Intermediate {
            server,
            valid_days,
            store,
        } => {
            let mut s = AuthorityStore::open(&store.store)?;
            let (r, kp, cp) = s.add_intermediate(&server, days(valid_days)?)?;
            Ok(format!(
                "intermediate for {}: serial {}, valid until {} (unix ms)\nkey {} (secret), certificate {}\n",
                r.server,
                r.serial,
                r.not_after_ms,
                kp.display(),
                cp.display()
            ))
        }
        CaCommand::AddUser { name, allow, store } => {
            let allowed = allow
                .iter()
                .map(|a| parse_allowance(a))
                .collect::<Result<Vec<_>>>()?;
            let mut s = AuthorityStore::open(&store.store)?;
            let path = s.add_user(&name, allowed)?;
            Ok(format!(
                "user {name}: pre-shared key written to {} (secret); user list version {}\n",
                path.display(),
                s.state.user_list_version
            ))
        }
        CaCommand::List { json, store } => {
            let s = AuthorityStore::open(&store.store)?;
            if json {
                return Ok(serde_json::to_string_pretty(&s.state)? + "\n");
            }
            Ok(list_text(&s))
        }
        CaCommand::Revoke { target, store } => {
            let mut s = AuthorityStore::open(&store.store)?;
            let serial = match s.state.peers.iter().find(|p| p.name == target) {
                Some(p) => p.serial,
                None => target
                    .parse()
                    .map_err(|_| anyhow!("{target:?} is neither a peer name nor a serial"))?,
            };
            s.revoke(serial)?;
            Ok(format!(
                "revoked serial {serial}; revocation list version {}\n",
                s.state.revocation_version
            ))
        }
    }
}

fn days(d: u64) -> Result<u64> {
    if d == 0 || d > 3650 {
        bail!("validity must be 1-3650 days");
    }
    Ok(d * DAY_MS)
}

/// Parses `any`, `server:NAME` or `peer:NODEID`.
pub fn parse_allowance(s: &str) -> Result<Allowance> {
    if s == "any" {
        return Ok(Allowance::AnyPeer);
    }
    if let Some(server) = s.strip_prefix("server:") {
        store::check_name("server", server)?;
        return Ok(Allowance::Server(server.to_string()));
    }
    if let Some(id) = s.strip_prefix("peer:") {
        return NodeId::parse_hex(id)
            .map(Allowance::Peer)
            .ok_or_else(|| anyhow!("{id:?} is not a 32-hex-digit node id"));
    }
    bail!("bad allowance {s:?}: use any, server:NAME or peer:NODEID")
}

fn list_text(s: &AuthorityStore) -> String {
    use std::fmt::Write;
    let st = &s.state;
    let revoked = |serial: u64| {
        st.revoked
            .iter()
            .any(|&r| r == serial || r == serial / store::INTERMEDIATE_SERIAL_BLOCK)
    };
    let mut out = String::new();
    let _ = writeln!(
        out,
        "authority {} ({})",
        st.authority_public,
        s.root().display()
    );
    let _ = writeln!(out, "peers ({}):", st.peers.len());
    for p in &st.peers {
        let _ = writeln!(
            out,
            "  {:<16} server {:<12} serial {:<6} node {} until {}{}",
            p.name,
            p.server,
            p.serial,
            p.node_id,
            p.not_after_ms,
            if revoked(p.serial) { "  REVOKED" } else { "" }
        );
    }
    let _ = writeln!(out, "intermediates ({}):", st.intermediates.len());
    for i in &st.intermediates {
        let _ = writeln!(
            out,
            "  server {:<12} serial {:<6} until {}{}",
            i.server,
            i.serial,
            i.not_after_ms,
            if revoked(i.serial) { "  REVOKED" } else { "" }
        );
    }
    let _ = writeln!(
        out,
        "users ({}), list version {}:",
        st.users.len(),
        st.user_list_version
    );
    for u in &st.users {
        let allowed: Vec<String> = u
            .allowed
            .iter()
            .map(|a| match a {
                Allowance::AnyPeer => "any".to_string(),
                Allowance::Server(s) => format!("server:{s}"),
                Allowance::Peer(n) => format!("peer:{n}"),
            })
            .collect();
        let _ = writeln!(out, "  {:<16} {}", u.name, allowed.join(", "));
    }
    let _ = writeln!(
        out,
        "revoked serials {:?}, list version {}",
        st.revoked, st.revocation_version
    );
    out
}

/// What goes into a VM's `LaunchConfig`: `node_key`, `certificate` and `extra` entries.
#[derive(Clone)]
pub struct LaunchMaterial {
    pub node_key: Vec<u8>,
    pub certificate: Vec<u8>,
    pub extra: Vec<(String, Vec<u8>)>,
}

impl std::fmt::Debug for LaunchMaterial {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "LaunchMaterial {{ certificate: {} bytes, .. }}",
            self.certificate.len()
        )
    }
}

/// The launch material of peer `name` (issued by `add-peer`), holding the credentials of
/// `users` (their pre-shared keys: only users this peer should serve without delegation).
pub fn launch_material(
    store: &AuthorityStore,
    name: &str,
    users: &[&str],
) -> Result<LaunchMaterial> {
    let (seed, chain) = store.peer_material(name)?;
    material(store, seed.to_vec(), chain, users)
}

/// The launch material of a VM certified by a front-end's [`FrontEndIssuer`].
pub fn launch_material_issued(
    store: &AuthorityStore,
    issued: &IssuedPeer,
    users: &[&str],
) -> Result<LaunchMaterial> {
    material(store, issued.seed.to_vec(), issued.chain.clone(), users)
}

fn material(
    store: &AuthorityStore,
    node_key: Vec<u8>,
    certificate: Vec<u8>,
    users: &[&str],
) -> Result<LaunchMaterial> {
    let creds = users
        .iter()
        .map(|u| {
            Ok(UserCredential {
                user: u.to_string(),
                psk: store.user_psk(u)?,
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(LaunchMaterial {
        node_key,
        certificate,
        extra: vec![
            (EXTRA_AUTHORITY.into(), store.authority_public().to_vec()),
            (EXTRA_USERS.into(), store.user_list()?.encode()),
            (EXTRA_REVOCATIONS.into(), store.revocations()?.encode()),
            (EXTRA_CREDENTIALS.into(), postcard::to_allocvec(&creds)?),
        ],
    })
}
