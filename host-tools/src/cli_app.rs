//! `unipeer app ...`: replicated instances of the local cluster.

use std::path::Path;
use std::process::ExitCode;

use clap::Subcommand;
use unipeer::cluster::apps::{self, CreateOptions};

#[derive(Subcommand)]
pub enum AppCommand {
    /// Create an instance: a master (the node asked) and REPLICAS slaves on other servers,
    /// served on PORT by every node (`redis-cli -h ANY_NODE -p PORT`).
    Create {
        name: String,
        /// The replicated service (`kv`: the Redis protocol).
        #[arg(long, default_value = "kv")]
        service: String,
        /// Slaves besides the master.
        #[arg(long, default_value_t = 2)]
        replicas: u8,
        /// `async`: replies do not wait for the slaves; `sync`: they wait for a quorum.
        #[arg(long, default_value = "async", value_parser = ["async", "sync"])]
        mode: String,
        #[arg(long, default_value_t = 6379)]
        port: u16,
        /// The node that creates it (and is its first master); default the first node up.
        #[arg(long)]
        node: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// The instances of the cluster.
    List {
        #[arg(long)]
        node: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Master, slaves, epoch, mode, each slave's lag, writes lost in past failovers.
    Status {
        name: String,
        /// The node asked first (it names the master, which is then asked).
        #[arg(long)]
        node: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Delete an instance (every node stops serving its port).
    Delete {
        name: String,
        #[arg(long)]
        node: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

pub fn app(run_dir: &Path, command: AppCommand) -> anyhow::Result<ExitCode> {
    match command {
        AppCommand::Create {
            name,
            service,
            replicas,
            mode,
            port,
            node,
            json,
        } => {
            let o = CreateOptions {
                name,
                service,
                replicas,
                mode,
                port,
            };
            let line = apps::create(run_dir, node.as_deref(), &o)?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({ "created": o.name, "answer": line })
                );
            } else {
                println!("{line}");
            }
        }
        AppCommand::List { node, json } => {
            let list = apps::list(run_dir, node.as_deref())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list)?);
            } else {
                println!(
                    "{:<20} {:<8} {:>6} {:<6} {:>6}",
                    "NAME", "SERVICE", "PORT", "MODE", "EPOCH"
                );
                for a in &list {
                    println!(
                        "{:<20} {:<8} {:>6} {:<6} {:>6}",
                        a.name, a.service, a.port, a.mode, a.epoch
                    );
                }
            }
        }
        AppCommand::Status { name, node, json } => {
            let s = apps::status_of(run_dir, node.as_deref(), &name)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                let who = |n: &Option<String>, ip: &str| match n {
                    Some(n) => format!("{n} ({ip})"),
                    None => ip.to_string(),
                };
                println!("name         {} ({} on port {})", s.name, s.service, s.port);
                println!("mode         {}", s.mode);
                println!("epoch        {}", s.epoch);
                println!("master       {}", who(&s.master, &s.master_ip));
                println!(
                    "reported by  {} (role there: {}, accepting writes: {}, seq {})",
                    s.reported_by, s.role_there, s.accepting_writes, s.seq
                );
                for sl in &s.slaves {
                    println!(
                        "slave        {}: lag {} ops, {} ms, acked seq {}, {}",
                        who(&sl.node, &sl.ip),
                        sl.lag_ops,
                        sl.lag_ms,
                        sl.acked_seq,
                        if sl.online { "online" } else { "offline" }
                    );
                }
                if s.slaves.is_empty() {
                    println!("slaves       {} in the record", s.members.len());
                }
                println!("lost writes  {} (in past failovers)", s.lost_writes);
                if s.dropped_here > 0 {
                    println!(
                        "dropped here {} (keys: {})",
                        s.dropped_here,
                        s.dropped_keys.join(", ")
                    );
                }
            }
        }
        AppCommand::Delete { name, node, json } => {
            let line = apps::delete(run_dir, node.as_deref(), &name)?;
            if json {
                println!("{}", serde_json::json!({ "deleted": name, "answer": line }));
            } else {
                println!("{line}");
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
