//! `unipeer frontend`: argument parsing for the front-end node; the work is in
//! `unipeer::frontend`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::Args;
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
    let server = FrontendServer::bind(FrontendConfig {
        listen: a.listen,
        server: a.server.clone(),
        run_dir: run_dir.to_path_buf(),
        daemon_exe: exe,
        accel: a.accel,
        ca_store,
        replicas: a.replicas,
    })
    .with_context(|| format!("front-end on {}", a.listen))?;
    eprintln!(
        "unipeer frontend: server {} of the cluster in {}, API on http://{}",
        a.server,
        run_dir.display(),
        server.local_addr()?
    );
    server.serve();
    Ok(ExitCode::SUCCESS)
}
