//! `unipeer frontend`: argument parsing for the front-end node; the work is in
//! `unipeer::frontend`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use unipeer::cluster::relay::PipeLimits;
use unipeer::frontend::limits::FrontendLimits;
use unipeer::frontend::{self, FrontendConfig, FrontendServer};
use unipeer::hostinfo::AccelChoice;

#[derive(Args)]
pub struct FrontendArgs {
    /// Address of the HTTP API.
    #[arg(long, default_value = frontend::DEFAULT_LISTEN)]
    listen: SocketAddr,
    /// The physical server this front-end stands for (its VMs are tagged with it).
    #[arg(long, default_value = "s1")]
    server: String,
    /// Accelerator of a cluster the first deploy starts.
    #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
    accel: AccelChoice,
    /// Trusted-authority store that certifies the nodes of a cluster this front-end starts.
    #[arg(long, default_value = unipeer::ca::DEFAULT_STORE)]
    ca: PathBuf,
    /// A cluster this front-end starts runs without authentication.
    #[arg(long)]
    no_trust: bool,
    /// Copies of every record and chunk in a cluster this front-end starts (default 3).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=5))]
    replicas: Option<u8>,
    /// Most VMs of this front-end's server at once (killed ones count: they can be restarted).
    #[arg(long, default_value_t = FrontendLimits::default().vms_max)]
    max_vms: usize,
    /// Most guest memory of those VMs together, MiB.
    #[arg(long, default_value_t = FrontendLimits::default().memory_mb_max)]
    max_memory_mb: u64,
    /// Most guest memory one deploy asks for (count × memory_mb), MiB.
    #[arg(long, default_value_t = FrontendLimits::default().deploy_memory_mb_max)]
    max_deploy_memory_mb: u64,
    /// A CONNECT relay ends after this many seconds without traffic.
    #[arg(long, default_value_t = FrontendLimits::default().relay.idle.as_secs())]
    relay_idle_s: u64,
    /// A CONNECT relay ends after this many seconds whatever.
    #[arg(long, default_value_t = FrontendLimits::default().relay.total.as_secs())]
    relay_max_s: u64,
    /// A host name clients may use in `Host` (besides localhost and IP addresses); repeatable.
    #[arg(long = "allow-host")]
    allow_hosts: Vec<String>,
}

pub fn run(run_dir: &Path, a: FrontendArgs) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe().context("cannot find the unipeer binary")?;
    let ca_store = if a.no_trust {
        None
    } else if a.ca.is_absolute() {
        Some(a.ca)
    } else {
        Some(unipeer::image::repo_root().join(a.ca))
    };
    if a.relay_idle_s == 0 || a.relay_max_s == 0 {
        anyhow::bail!("--relay-idle-s and --relay-max-s must be at least 1");
    }
    let limits = FrontendLimits {
        vms_max: a.max_vms,
        memory_mb_max: a.max_memory_mb,
        deploy_memory_mb_max: a.max_deploy_memory_mb,
        relay: PipeLimits {
            idle: Duration::from_secs(a.relay_idle_s),
            total: Duration::from_secs(a.relay_max_s),
        },
    };
    // The daemon it may start, and the token file, are owner-only whatever the shell's umask.
    unipeer::owner_only::owner_only_umask();
    let server = FrontendServer::bind(FrontendConfig {
        listen: a.listen,
        server: a.server.clone(),
        run_dir: run_dir.to_path_buf(),
        daemon_exe: exe,
        accel: a.accel,
        ca_store,
        replicas: a.replicas,
        token_dir: frontend::access::token_dir(),
        allow_hosts: a.allow_hosts,
        limits,
    })
    .with_context(|| format!("front-end on {}", a.listen))?;
    let addr = server.local_addr()?;
    if !addr.ip().is_loopback() {
        eprintln!(
            "unipeer frontend: WARNING: the API listens on {addr}, beyond loopback: any host \
             that can reach this address may try it. Requests need the token in {} (copy it \
             only over a trusted channel; clients take it from {}), and it crosses the \
             network in clear text (plain HTTP): reach the API through an SSH tunnel or a TLS \
             proxy. CONNECT relays carry only the nodes' authenticated client port {}.",
            server.token_path().display(),
            frontend::access::TOKEN_ENV,
            frontend::CONNECT_PORT
        );
    }
    eprintln!(
        "unipeer frontend: server {} of the cluster in {}, API on http://{addr} (token in {})",
        a.server,
        run_dir.display(),
        server.token_path().display()
    );
    server.serve();
    Ok(ExitCode::SUCCESS)
}
