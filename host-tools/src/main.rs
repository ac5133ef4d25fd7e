//! `unipeer`: build node images, launch VMs, run benchmarks.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use unipeer::hostinfo::{self, AccelChoice};
use unipeer::qemu::Machine;
use unipeer::{bench, cluster, diag, image, vm};

mod cli_app;
mod cli_cluster;
mod cli_frontend;
mod cli_jobs;

/// Counts heap bytes, so that `bench overlay` measures the simulated nodes' memory (an atomic
/// add per allocation; no behaviour changes).
#[global_allocator]
static HEAP: &unipeer_sim::heap::CountingAlloc = &unipeer_sim::heap::COUNTING;
use unipeer_node::launch::{GuestExit, LogLevel};

#[derive(Parser)]
#[command(
    name = "unipeer",
    version,
    about = "unipeer: a fault-tolerant P2P overlay of unikernel VMs"
)]
struct Cli {
    /// Run directory of the local cluster (default: run/cluster under the repository).
    #[arg(long, global = true)]
    run_dir: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Build and inspect node images.
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Run and probe single VMs.
    Vm {
        #[command(subcommand)]
        command: VmCommand,
    },
    /// Benchmarks: each prints a table with ratios against a baseline run in the same invocation.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// Start a local cluster: N VMs on a switch with fault injection, in a network namespace
    /// of its own (root) with a host uplink.
    Up(cli_cluster::UpArgs),
    /// Every node of the local cluster: state, addresses, ports, server, QEMU pid, diagnostics.
    Status {
        #[arg(long)]
        json: bool,
        /// Do not ask the nodes' diagnostic ports.
        #[arg(long)]
        no_probe: bool,
    },
    /// A node's serial console.
    Logs {
        node: String,
        /// Keep printing new output until the cluster stops (or Ctrl-C).
        #[arg(short, long)]
        follow: bool,
    },
    /// Fault injection on the cluster's switch.
    Net {
        #[command(subcommand)]
        command: cli_cluster::NetCommand,
    },
    /// Look a key up in the cluster's overlay: asks one node, prints the root and the path.
    Lookup {
        /// 32 hex digits, or any text (hashed as a name).
        key: String,
        /// The node that asks (default: the first node that is up).
        #[arg(long)]
        from: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Run one diagnostic command on a cluster node and print its answer
    /// (`overlay`, `leafset`, `put KEY VALUE`, `get KEY`, `lookup KEY`, `probe IP`, `stats`).
    Ask {
        node: String,
        #[arg(required = true, num_args = 1..)]
        command: Vec<String>,
    },
    /// Push the authority's revocation list into the running cluster (through one node; it
    /// spreads over the sealed sessions and running nodes cut revoked peers off).
    PublishRevocations {
        /// The node to hand it to (default: the first node up).
        #[arg(long)]
        node: Option<String>,
        /// The authority store.
        #[arg(long, default_value = "run/ca")]
        ca: PathBuf,
    },
    /// Stop the local cluster: VMs, switch, daemon, namespace.
    Down,
    /// The front-end node of one server: an HTTP API that deploys VMs, lists them and relays
    /// TCP connections to them (see the README).
    Frontend(cli_frontend::FrontendArgs),
    /// The live dashboard of a front-end's cluster: prints a one-time URL that signs a browser
    /// in (a session cookie) and shows the ring, jobs, servers, replication and faults.
    Dashboard {
        /// The front-end (its token is read like `unipeer submit` does).
        #[arg(long, default_value = "http://127.0.0.1:7700")]
        frontend: String,
    },
    /// The Application Agent: run a job (manifest) on the cluster through the nearest
    /// front-end, show progress, retrieve the outputs; `--resume JOB` continues one.
    Submit(cli_jobs::SubmitArgs),
    /// Replicated instances (Redis-protocol `kv`): create, list, status, delete.
    App {
        #[command(subcommand)]
        command: cli_app::AppCommand,
    },
    /// Jobs: status, cancel, list.
    Job {
        #[command(subcommand)]
        command: cli_jobs::JobCommand,
    },
    /// The trusted authority: peers' certificates, users' pre-shared keys, revocation.
    Ca {
        #[command(subcommand)]
        command: unipeer::ca::CaCommand,
    },
    /// Internals of the local cluster.
    #[command(hide = true)]
    Cluster {
        #[command(subcommand)]
        command: cli_cluster::ClusterCommand,
    },
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Build the kernel and write images/<name>/ (kernel.elf + manifest.toml).
    Build {
        /// Optimised build (what clusters, tests and benchmarks use).
        #[arg(long)]
        release: bool,
        /// Image name.
        #[arg(long, default_value = "default")]
        name: String,
        /// Applications linked into the image (default: every shipped one:
        /// wordcount, primes, sha256, fail).
        #[arg(long, value_delimiter = ',')]
        apps: Vec<String>,
        /// Compile in the diagnostic port's test helpers (`bench-seal`, `job-primes`,
        /// `job-sha256`): for test images only, never for images that serve users.
        #[arg(long)]
        diag_test: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args, Clone)]
struct LaunchArgs {
    /// Image name under images/.
    #[arg(long, default_value = "default")]
    image: String,
    /// Machine type.
    #[arg(long, value_enum, default_value_t = Machine::Microvm)]
    machine: Machine,
    /// Accelerator: auto takes KVM only when it is hardware-backed.
    #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
    accel: AccelChoice,
    /// QEMU CPU model (e.g. max).
    #[arg(long)]
    cpu: Option<String>,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = vm::DEFAULT_MEMORY_MIB)]
    memory: u32,
}

#[derive(Subcommand)]
enum VmCommand {
    /// Boot one VM under QEMU, reachable from the host on forwarded ports; runs until the VM
    /// exits or Ctrl-C.
    Run {
        #[command(flatten)]
        launch: LaunchArgs,
        /// Node name.
        #[arg(long, default_value = "node-0")]
        name: String,
        /// Guest log level (off, error, warn, info, debug, trace).
        #[arg(long, default_value = "info")]
        log_level: String,
        /// Leave as soon as the guest is ready (a boot check).
        #[arg(long)]
        exit_after_ready: bool,
        /// Print the VM's addresses as JSON once it is ready.
        #[arg(long)]
        json: bool,
    },
    /// Send one command line to a node's diagnostic TCP port and print the answer
    /// (e.g. `lookup KEY`, `put KEY VALUE`, `get KEY`, `overlay`, `probe IP`).
    Send {
        /// Address of the diagnostic TCP port (host:port).
        addr: SocketAddr,
        /// Operator key file (`operator.key` in the VM's or cluster's run directory): needed
        /// for commands that change state (`shutdown`, `put`, `probe`, ...).
        #[arg(long)]
        key_file: Option<PathBuf>,
        /// The command words.
        #[arg(required = true, num_args = 1..)]
        command: Vec<String>,
    },
    /// Ask a node's diagnostic service for its report.
    Probe {
        /// Address of the diagnostic port (host:port).
        addr: SocketAddr,
        /// Use the TCP port instead of UDP.
        #[arg(long)]
        tcp: bool,
        #[arg(long)]
        json: bool,
    },
    /// Kill a cluster node's QEMU (SIGKILL); `status` then shows it down.
    Kill { node: String },
    /// Kill a cluster node if running and boot it again on the same switch port.
    Restart { node: String },
    /// Node FROM asks node TO's diagnostic port and measures COUNT echo round trips.
    Ping {
        from: String,
        to: String,
        #[arg(long, default_value_t = 10)]
        count: u32,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Simulated overlay: hops against log16 N, lookup consistency with and without churn,
    /// upkeep bytes, memory per node, simulation speed.
    Overlay(bench::overlay::OverlayBenchArgs),
    /// Simulated service directory: discover hops against a plain lookup, directory load
    /// against a single root, nearest answers, freshness of failed providers.
    Directory(bench::directory::DirectoryBenchArgs),
    /// Handshake time and per-message sealing overhead of the trust layer (host; `--vm`: with
    /// a node in a VM too).
    Auth(bench::auth::AuthBenchArgs),
    /// Boot time, image size, memory, idle CPU and host<->VM round trips.
    Boot(bench::boot::BootBenchArgs),
    /// Local cluster: VM<->VM round trips through the switch, switch frames/s, time to bring up
    /// N VMs, density (most VMs up and answering) with host memory per VM.
    Cluster(bench::cluster::ClusterBenchArgs),
    /// Jobs: tasks per second on a cluster against the same tasks run natively, the slow-down
    /// when a third of the VMs die mid-job, and re-dispatch time.
    Jobs(bench::jobs::JobsBenchArgs),
    /// The replicated kv service (RESP2) against Redis 7 in a Linux microVM on the same
    /// QEMU and switch: requests/s and p50/p99 (redis-benchmark), replication lag under loss
    /// and delay, failover time and acknowledged writes lost.
    Apps(bench::apps::AppsBenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn parse_level(s: &str) -> anyhow::Result<LogLevel> {
    LogLevel::parse(s)
        .with_context(|| format!("unknown log level {s:?} (off, error, warn, info, debug, trace)"))
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    let run_dir = cli_cluster::run_dir(cli.run_dir.clone())?;
    match cli.command {
        Command::Up(args) => cli_cluster::up(&run_dir, args),
        Command::Frontend(args) => cli_frontend::run(&run_dir, args),
        Command::Dashboard { frontend } => {
            let url = unipeer::frontend::client::Frontend::new(frontend).dashboard_url()?;
            println!("{url}");
            eprintln!(
                "unipeer dashboard: open this URL within a minute (it works once; the browser \
                 then keeps a session cookie for 12 hours)"
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Submit(args) => cli_jobs::submit(args),
        Command::Job { command } => cli_jobs::job(command),
        Command::App { command } => cli_app::app(&run_dir, command),
        Command::Status { json, no_probe } => cli_cluster::status(&run_dir, json, !no_probe),
        Command::Logs { node, follow } => cli_cluster::logs(&run_dir, &node, follow),
        Command::Net { command } => cli_cluster::net(&run_dir, command),
        Command::Lookup { key, from, json } => {
            cli_cluster::lookup(&run_dir, &key, from.as_deref(), json)
        }
        Command::Ca { command } => {
            unipeer::ca::run(command)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Ask { node, command } => {
            print!(
                "{}",
                cluster::node_command(&run_dir, &node, &command.join(" "))?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::PublishRevocations { node, ca } => {
            let ca = if ca.is_absolute() {
                ca
            } else {
                image::repo_root().join(ca)
            };
            println!(
                "{}",
                cluster::publish_revocations(&run_dir, &ca, node.as_deref())?
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Down => {
            println!("{}", cluster::down(&run_dir)?);
            Ok(ExitCode::SUCCESS)
        }
        Command::Cluster { command } => cli_cluster::internal(command),
        Command::Vm {
            command: VmCommand::Kill { node },
        } => {
            cluster::kill(&run_dir, &node)?;
            println!("{node}: killed");
            Ok(ExitCode::SUCCESS)
        }
        Command::Vm {
            command: VmCommand::Restart { node },
        } => {
            let r = cluster::restart(&run_dir, &node)?;
            println!("{node}: restarted, ready in {:.0} ms", r.all_ready_ms);
            Ok(ExitCode::SUCCESS)
        }
        Command::Vm {
            command:
                VmCommand::Ping {
                    from,
                    to,
                    count,
                    json,
                },
        } => cli_cluster::ping(&run_dir, &from, &to, count, json),
        Command::Bench {
            command: BenchCommand::Cluster(args),
        } => {
            bench::cluster::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Image {
            command:
                ImageCommand::Build {
                    release,
                    name,
                    apps,
                    diag_test,
                    json,
                },
        } => {
            let apps = if apps.is_empty() {
                image::default_apps()
            } else {
                apps
            };
            let m = image::build_image(&name, release, false, &apps, diag_test)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&m)?);
            } else {
                println!(
                    "built image {} ({} profile, apps {}): {} bytes, sha256 {}\n  {}",
                    m.name,
                    m.profile,
                    m.apps.join(","),
                    m.size_bytes,
                    m.sha256,
                    image::image_dir(&name).display()
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Vm {
            command:
                VmCommand::Run {
                    launch,
                    name,
                    log_level,
                    exit_after_ready,
                    json,
                },
        } => vm_run(
            launch,
            name,
            parse_level(&log_level)?,
            exit_after_ready,
            json,
        ),
        Command::Vm {
            command:
                VmCommand::Send {
                    addr,
                    key_file,
                    command,
                },
        } => {
            let key = match key_file {
                Some(path) => Some(
                    diag::OperatorKey::read(&path)
                        .with_context(|| format!("reading the operator key {}", path.display()))?,
                ),
                None => None,
            };
            let reply = diag::tcp_command(
                addr,
                key.as_ref(),
                &command.join(" "),
                Duration::from_secs(20),
            )?;
            print!("{reply}");
            Ok(ExitCode::SUCCESS)
        }
        Command::Vm {
            command: VmCommand::Probe { addr, tcp, json },
        } => {
            let timeout = Duration::from_secs(5);
            let report = if tcp {
                diag::query_tcp(addr, timeout)?
            } else {
                diag::query_udp(addr, timeout)?
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&report.fields)?);
            } else {
                for (k, v) in &report.fields {
                    println!("{k:>24}  {v}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            command: BenchCommand::Auth(args),
        } => {
            bench::auth::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            command: BenchCommand::Apps(args),
        } => {
            bench::apps::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            command: BenchCommand::Jobs(args),
        } => {
            bench::jobs::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            command: BenchCommand::Overlay(args),
        } => {
            bench::overlay::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            command: BenchCommand::Directory(args),
        } => {
            bench::directory::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench {
            command: BenchCommand::Boot(args),
        } => {
            bench::boot::run(&args)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn vm_run(
    launch: LaunchArgs,
    name: String,
    log_level: LogLevel,
    exit_after_ready: bool,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let img = image::open(&launch.image)?;
    let accel = hostinfo::choose_accel(launch.accel);
    let run_dir: PathBuf = image::repo_root().join("run").join("vm").join(&name);
    let mut opts = vm::VmOptions::new(&name, run_dir, launch.machine, accel.accel);
    opts.cpu = launch.cpu;
    opts.memory_mib = launch.memory;
    opts.log_level = log_level;
    opts.exit_after_ready = exit_after_ready;
    if !json {
        eprintln!(
            "unipeer: {} on {} ({}), {} MiB, image {} ({})",
            name,
            launch.machine,
            accel.reason,
            launch.memory,
            img.manifest.name,
            img.manifest.profile
        );
    }
    let mut ready = vm::launch_ready(&img, &opts)?;
    let key_path = opts.run_dir.join(diag::OPERATOR_KEY_FILE);
    if let Some(k) = &opts.operator_key {
        k.write(&key_path)
            .with_context(|| format!("writing {}", key_path.display()))?;
    }
    if json {
        println!(
            "{}",
            serde_json::json!({
                "name": name,
                "accel": accel.accel,
                "machine": launch.machine,
                "pid": ready.vm.pid(),
                "ports": ready.ports,
                "serial_log": ready.vm.serial_path,
                "qmp": ready.vm.qmp_path,
                "launch_to_ready_ms": ready.launch_to_ready.as_secs_f64() * 1000.0,
                "guest_entry_to_ready_us": ready.guest_entry_to_ready_us(),
            })
        );
    } else {
        println!("{}", ready.ready_line);
        println!(
            "ready in {:.1} ms (QEMU launch -> ready line); guest entry -> network ready {} us",
            ready.launch_to_ready.as_secs_f64() * 1000.0,
            ready
                .guest_entry_to_ready_us()
                .map(|v| v.to_string())
                .unwrap_or_else(|| "?".into())
        );
        if !exit_after_ready {
            println!(
                "  diagnostics (UDP): echo stats | nc -u -w1 127.0.0.1 {}",
                ready.ports.diag_udp
            );
            println!("  diagnostics (TCP): nc 127.0.0.1 {}", ready.ports.diag_tcp);
            println!(
                "  operator commands: unipeer vm send --key-file {} 127.0.0.1:{} shutdown",
                key_path.display(),
                ready.ports.diag_tcp
            );
            println!("  UDP echo:          nc -u 127.0.0.1 {}", ready.ports.echo);
            println!("  serial log:        {}", ready.vm.serial_path.display());
            println!("  QMP:               {}", ready.vm.qmp_path.display());
            println!(
                "  stop:              Ctrl-C, or: echo shutdown | nc 127.0.0.1 {}",
                ready.ports.diag_tcp
            );
        }
    }
    if !exit_after_ready && let Ok(report) = vm::wait_for_diag(&ready.ports, Duration::from_secs(5))
    {
        vm::learn_tsc(&report);
    }
    let status = ready.vm.wait_forever()?;
    match status.code().and_then(GuestExit::from_qemu_status) {
        Some(GuestExit::Success) => {
            if !json {
                eprintln!("unipeer: {name} shut down cleanly");
            }
            Ok(ExitCode::SUCCESS)
        }
        Some(other) => bail!("{name} exited: {} (QEMU status {status})", other.describe()),
        None => bail!("{name}: QEMU exited with {status}"),
    }
}
