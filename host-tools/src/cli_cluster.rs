//! The cluster commands' front: argument parsing and human / `--json` output. The work is in
//! `unipeer::cluster`.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use unipeer::cluster::{self, ClusterStatus, NodeState};
use unipeer::hostinfo::{self, AccelChoice};
use unipeer::net::{self, UplinkStatus};
use unipeer::qemu::Machine;
use unipeer::vm;

#[derive(Args)]
pub struct UpArgs {
    /// Number of VMs.
    #[arg(short = 'n', long = "nodes", default_value_t = 4)]
    nodes: usize,
    /// Physical servers the VMs are split over (contiguous blocks s1, s2, ...).
    #[arg(long, default_value_t = 1)]
    servers: usize,
    /// One-way delay between servers (e.g. 20ms).
    #[arg(long, default_value = "0", value_parser = net::parse_delay)]
    server_delay: Duration,
    #[arg(long, default_value = "default")]
    image: String,
    #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
    accel: AccelChoice,
    #[arg(long, value_enum, default_value_t = Machine::Microvm)]
    machine: Machine,
    #[arg(long)]
    cpu: Option<String>,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = vm::DEFAULT_MEMORY_MIB)]
    memory: u32,
    /// TCG translation cache per VM in MiB (bounds host memory per VM).
    #[arg(long, default_value_t = 16)]
    tb_size: u32,
    /// Guest log level.
    #[arg(long, default_value = "info")]
    log_level: String,
    /// Seed of the switch's loss RNG.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Overlay leaf-set size L (even, 2..=32; the node's default is 16).
    #[arg(long)]
    leaf_set: Option<u8>,
    /// Copies of every record and chunk, the root's included (1..=5; the node's default is 3).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=5))]
    replicas: Option<u8>,
    /// Only the first N VMs (by launch order) hold the registered users' credentials; the
    /// others obtain them from their neighbours by credential delegation (default: all hold).
    #[arg(long)]
    credential_holders: Option<usize>,
    /// Trusted-authority store that certifies the nodes (created if missing).
    #[arg(long, default_value = "run/ca")]
    ca: PathBuf,
    /// Run the overlay without authentication (no certificates, datagrams in the clear).
    #[arg(long)]
    no_trust: bool,
    /// Do not create a network namespace (no host uplink).
    #[arg(long)]
    no_netns: bool,
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand)]
pub enum NetCommand {
    /// Cut a node's link (frames to and from it are dropped).
    Cut { node: String },
    /// Restore a cut link.
    Restore { node: String },
    /// Partition nodes into groups, e.g. `n1,n2 n3,n4` (nodes in no group form one more).
    Partition {
        #[arg(required = true, num_args = 1..)]
        groups: Vec<String>,
    },
    /// Remove the partition.
    Heal,
    /// Drop a fraction of frames (`0.1` or `10%`) on one node's link, or everywhere.
    Loss {
        fraction: String,
        #[arg(long)]
        node: Option<String>,
    },
    /// Delay frames one way (each direction): on a node's link, between two groups, or between
    /// servers.
    Delay {
        /// e.g. 20ms, 500us, 0.
        delay: String,
        #[arg(long, conflicts_with_all = ["between", "servers"])]
        node: Option<String>,
        /// Group A, e.g. n1,n2 (with --and).
        #[arg(long, requires = "and")]
        between: Option<String>,
        /// Group B.
        #[arg(long = "and", requires = "between")]
        and: Option<String>,
        /// Between the declared servers.
        #[arg(long)]
        servers: bool,
    },
    /// Clear every fault (links, partition, loss, delays; the server delay stays).
    Reset,
    /// Per-port counters and the faults in force.
    Stats {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
pub enum ClusterCommand {
    /// Run the cluster daemon (started by `up`).
    Daemon {
        #[arg(long)]
        run_dir: PathBuf,
        #[arg(long)]
        netns: Option<String>,
        #[arg(long)]
        uplink: bool,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
}

/// The run directory: `--run-dir` or the default, made absolute.
pub fn run_dir(given: Option<PathBuf>) -> anyhow::Result<PathBuf> {
    let dir = given.unwrap_or_else(cluster::default_run_dir);
    Ok(if dir.is_absolute() {
        dir
    } else {
        std::env::current_dir()?.join(dir)
    })
}

pub fn up(run_dir: &Path, a: UpArgs) -> anyhow::Result<ExitCode> {
    let accel = hostinfo::choose_accel(a.accel);
    let exe = std::env::current_exe().context("cannot find the unipeer binary")?;
    let mut opts = cluster::UpOptions::new(a.nodes, accel.accel, exe);
    opts.servers = a.servers;
    opts.server_delay = a.server_delay;
    opts.image = a.image;
    opts.machine = a.machine;
    opts.cpu = a.cpu;
    opts.memory_mib = a.memory;
    opts.tb_size_mib = a.tb_size;
    opts.leaf_set = a.leaf_set;
    opts.replicas = a.replicas;
    opts.credential_holders = a.credential_holders;
    opts.ca_store = if a.no_trust {
        None
    } else if a.ca.is_absolute() {
        Some(a.ca.clone())
    } else {
        Some(unipeer::image::repo_root().join(&a.ca))
    };
    opts.log_level = a.log_level;
    opts.seed = a.seed;
    opts.use_netns = !a.no_netns;
    if !a.json {
        eprintln!(
            "unipeer: starting {} VM(s) on {} ({}) in {}",
            a.nodes,
            a.machine,
            accel.reason,
            run_dir.display()
        );
    }
    let report = cluster::up(run_dir, &opts)?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "launch": report.launch,
                "status": report.status,
                "notes": report.notes,
            }))?
        );
    } else {
        for n in &report.notes {
            eprintln!("note: {n}");
        }
        println!(
            "{} VM(s) ready in {:.0} ms (first spawn -> last ready line)",
            report.launch.ready_ms.len(),
            report.launch.all_ready_ms
        );
        print_status(&report.status);
    }
    Ok(ExitCode::SUCCESS)
}

pub fn status(run_dir: &Path, json: bool, probe: bool) -> anyhow::Result<ExitCode> {
    let st = cluster::status(run_dir, probe)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&st)?);
    } else {
        print_status(&st);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_status(st: &ClusterStatus) {
    println!(
        "cluster {} (daemon pid {})",
        st.run_dir.display(),
        st.daemon_pid
    );
    if let Some(s) = &st.settings {
        println!(
            "  image {} on {} ({}), {} MiB, tb-size {} MiB",
            s.image, s.machine, s.accel, s.memory_mib, s.tb_size_mib
        );
    }
    match (&st.uplink, &st.netns) {
        (
            UplinkStatus::Up {
                ifname,
                address,
                prefix_len,
            },
            Some(ns),
        ) => println!("  network namespace {ns}; host uplink {ifname} {address}/{prefix_len}"),
        (
            UplinkStatus::Up {
                ifname,
                address,
                prefix_len,
            },
            None,
        ) => {
            println!("  host uplink {ifname} {address}/{prefix_len}")
        }
        (UplinkStatus::Off { reason }, _) => println!("  host uplink off ({reason})"),
    }
    if st.server_delay_us > 0 {
        println!("  delay between servers: {} us one way", st.server_delay_us);
    }
    println!(
        "{:<6} {:<7} {:<6} {:<12} {:<5} {:>8} {:>9} {:>8} {:>8} {:<13} {:>4} {:>5} {:<6}",
        "NODE",
        "STATE",
        "SERVER",
        "IP",
        "LINK",
        "PID",
        "UPTIME_S",
        "RX",
        "TX",
        "OVERLAY_ID",
        "LEAF",
        "TABLE",
        "ANSWER"
    );
    for n in &st.nodes {
        let (up, rx, tx) = n
            .diag
            .as_ref()
            .map_or(("-".into(), "-".into(), "-".into()), |d| {
                (
                    format!("{:.1}", d.uptime_ms as f64 / 1000.0),
                    d.rx_frames.to_string(),
                    d.tx_frames.to_string(),
                )
            });
        let (id, leaf, table) = n
            .diag
            .as_ref()
            .map_or(("-".into(), "-".into(), "-".into()), |d| {
                let id = if d.overlay_id.len() > 12 {
                    format!("{}…", &d.overlay_id[..12])
                } else {
                    d.overlay_id.clone()
                };
                let id = if d.overlay_joined {
                    id
                } else {
                    format!("{id} (joining)")
                };
                (id, d.leaf_set.to_string(), d.table_filled.to_string())
            });
        println!(
            "{:<6} {:<7} {:<6} {:<12} {:<5} {:>8} {:>9} {:>8} {:>8} {:<13} {:>4} {:>5} {:<6}{}",
            n.name,
            n.state.to_string(),
            n.server,
            n.ipv4.to_string(),
            if n.link_up { "up" } else { "CUT" },
            n.qemu_pid.map_or("-".into(), |p| p.to_string()),
            up,
            rx,
            tx,
            id,
            leaf,
            table,
            match n.answering {
                Some(true) => "yes",
                Some(false) => "NO",
                None => "-",
            },
            n.exit
                .as_ref()
                .filter(|_| n.state != NodeState::Up)
                .map(|e| format!("  ({e})"))
                .unwrap_or_default()
        );
    }
    if let Some(first) = st.nodes.first() {
        println!(
            "ports on each node: diag UDP {}, diag TCP {}, echo {}, overlay UDP {}, jobs TCP {}, client (AA) TCP {}",
            first.ports.diag_udp,
            first.ports.diag_tcp,
            first.ports.echo,
            first.ports.overlay,
            first.ports.overlay + unipeer_node::jobs::wire::JOB_PORT_OFFSET,
            unipeer_node::jobs::client::CLIENT_PORT
        );
        println!(
            "reach a node:  {}",
            cluster::client_hint(st.netns.as_deref(), first.ipv4)
        );
        println!("serial logs:   unipeer logs {} [-f]", first.name);
    }
}

pub fn logs(run_dir: &Path, node: &str, follow: bool) -> anyhow::Result<ExitCode> {
    let path = cluster::serial_log(run_dir, node)?;
    let mut f = unipeer::owner_only::open_read(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    let mut out = std::io::stdout();
    let mut buf = Vec::new();
    f.read_to_end(&mut buf)?;
    out.write_all(&buf)?;
    out.flush()?;
    if !follow {
        return Ok(ExitCode::SUCCESS);
    }
    // Until the cluster stops; a restarted VM truncates its log, so start over then.
    let mut offset = buf.len() as u64;
    while cluster::daemon_alive(run_dir) {
        std::thread::sleep(Duration::from_millis(200));
        let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        if len < offset {
            offset = 0;
        }
        if len > offset {
            let mut f = unipeer::owner_only::open_read(&path)?;
            f.seek(SeekFrom::Start(offset))?;
            buf.clear();
            f.read_to_end(&mut buf)?;
            offset += buf.len() as u64;
            out.write_all(&buf)?;
            out.flush()?;
        }
    }
    eprintln!("unipeer: the cluster stopped");
    Ok(ExitCode::SUCCESS)
}

fn parse_fraction(text: &str) -> anyhow::Result<f64> {
    let t = text.trim();
    let v = match t.strip_suffix('%') {
        Some(p) => p.trim().parse::<f64>().map(|x| x / 100.0),
        None => t.parse::<f64>(),
    }
    .ok()
    .filter(|v| (0.0..=1.0).contains(v))
    .with_context(|| format!("loss {text:?}: give a fraction 0..1 or a percentage (10%)"))?;
    Ok(v)
}

fn split_group(g: &str) -> Vec<String> {
    g.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

pub fn net(run_dir: &Path, command: NetCommand) -> anyhow::Result<ExitCode> {
    let mut sw = cluster::switch(run_dir)?;
    let done = match command {
        NetCommand::Cut { node } => {
            sw.cut(&node)?;
            format!("{node}: link cut")
        }
        NetCommand::Restore { node } => {
            sw.restore(&node)?;
            format!("{node}: link restored")
        }
        NetCommand::Partition { groups } => {
            let groups: Vec<Vec<String>> = groups.iter().map(|g| split_group(g)).collect();
            if groups.iter().any(Vec::is_empty) {
                bail!("a partition group is empty");
            }
            sw.partition(&groups)?;
            let g: Vec<String> = groups.iter().map(|g| g.join(",")).collect();
            format!("partitioned: {}", g.join(" | "))
        }
        NetCommand::Heal => {
            sw.heal()?;
            "healed".into()
        }
        NetCommand::Loss { fraction, node } => {
            let f = parse_fraction(&fraction)?;
            sw.loss(node.as_deref(), f)?;
            format!(
                "loss {:.1}% on {}",
                f * 100.0,
                node.as_deref().unwrap_or("every link")
            )
        }
        NetCommand::Delay {
            delay,
            node,
            between,
            and,
            servers,
        } => {
            let d = net::parse_delay(&delay).map_err(anyhow::Error::msg)?;
            match (node, between, and, servers) {
                (Some(n), None, None, false) => {
                    sw.delay(&n, d)?;
                    format!("{n}: link delay {delay}")
                }
                (None, Some(a), Some(b), false) => {
                    sw.delay_between(&split_group(&a), &split_group(&b), d)?;
                    format!("delay {a} <-> {b}: {delay}")
                }
                (None, None, None, true) => {
                    sw.request(&net::Request::ServerDelay {
                        delay_us: d.as_micros() as u64,
                    })
                    .map_err(anyhow::Error::from)
                    .and_then(|r| match r.ok {
                        true => Ok(()),
                        false => bail!("{}", r.error.unwrap_or_default()),
                    })?;
                    format!("delay between servers: {delay}")
                }
                _ => bail!("say where: --node NODE, --between A --and B, or --servers"),
            }
        }
        NetCommand::Reset => {
            sw.reset()?;
            "faults cleared".into()
        }
        NetCommand::Stats { json } => {
            let s = sw.stats()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&s)?);
            } else {
                println!("{s}");
            }
            return Ok(ExitCode::SUCCESS);
        }
    };
    println!("{done}");
    Ok(ExitCode::SUCCESS)
}

pub fn ping(
    run_dir: &Path,
    from: &str,
    to: &str,
    count: u32,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let p = cluster::vm_probe(run_dir, from, to, count)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&p)?);
    } else if let Some(e) = &p.error {
        println!("{from} -> {to} ({}): error {e}", p.ip);
    } else {
        println!(
            "{from} -> {to} ({}, name {}): {}/{} answered, rtt p50 {} us, p99 {} us, max {} us",
            p.ip,
            p.name.as_deref().unwrap_or("?"),
            p.received,
            p.sent,
            p.rtt_us_p50,
            p.rtt_us_p99,
            p.rtt_us_max
        );
    }
    Ok(if p.reached() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

pub fn internal(command: ClusterCommand) -> anyhow::Result<ExitCode> {
    match command {
        ClusterCommand::Daemon {
            run_dir,
            netns,
            uplink,
            seed,
        } => {
            cluster::serve(cluster::DaemonConfig {
                run_dir,
                netns,
                uplink,
                seed,
            })
            .map_err(anyhow::Error::msg)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// `unipeer lookup KEY [--from NODE]`.
pub fn lookup(
    run_dir: &Path,
    key: &str,
    from: Option<&str>,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let a = cluster::lookup_from(run_dir, key, from)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&a)?);
    } else {
        println!("key   {}", a.key);
        println!("root  {} at {}", a.root, a.root_addr);
        println!(
            "asked {} ; {} hop(s): {}",
            a.from,
            a.hops,
            a.path.join(" -> ")
        );
    }
    Ok(ExitCode::SUCCESS)
}
