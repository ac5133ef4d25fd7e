//! `unipeer submit` and `unipeer job ...`: argument parsing and printing for the Application
//! Agent; the work is in `unipeer::job::aa`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Subcommand};
use unipeer::ca::AuthorityStore;
use unipeer::frontend::client::{Frontend, pick_nearest};
use unipeer::job::JobManifest;
use unipeer::job::aa::{self, FrontendAccess, JobState, SubmitOptions, Tracked};
use unipeer_node::auth::UserCredential;
use unipeer_node::jobs::client::CLIENT_PORT;
use unipeer_node::jobs::record::TaskState;

#[derive(Args, Clone)]
pub struct UserArgs {
    /// Front-end(s) to use; the nearest that answers (lowest measured RTT) and offers the
    /// job's application is picked.
    #[arg(long = "frontend", default_value = "http://127.0.0.1:7700")]
    frontends: Vec<String>,
    /// The user the job runs as.
    #[arg(long, default_value = unipeer::ca::DEFAULT_USER)]
    user: String,
    /// The user's 32-byte pre-shared key file (default: the authority store's copy).
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// Authority store holding the user's key when --key-file is not given.
    #[arg(long, default_value = unipeer::ca::DEFAULT_STORE)]
    ca: PathBuf,
    /// Where job states are kept (`<dir>/jobs/<job>.json`).
    #[arg(long, default_value = "run")]
    state_dir: PathBuf,
}

#[derive(Args)]
pub struct SubmitArgs {
    /// The job manifest (TOML).
    #[arg(required_unless_present = "resume")]
    manifest: Option<PathBuf>,
    /// Continue job JOB (id or unique prefix) from what the overlay holds.
    #[arg(long, value_name = "JOB")]
    resume: Option<String>,
    /// Output directory (default: <state-dir>/jobs/<job>/out).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Run each task on two executors and compare their outputs.
    #[arg(long)]
    verify: bool,
    /// Compare the result with one computed natively on the host; exit 1 on a mismatch.
    #[arg(long)]
    check: bool,
    /// One JSON line per poll on stdout instead of a progress bar (scripts, tests).
    #[arg(long)]
    json_progress: bool,
    /// Poll period, milliseconds.
    #[arg(long, default_value_t = 1000)]
    poll_ms: u64,
    #[command(flatten)]
    user: UserArgs,
}

#[derive(Subcommand)]
pub enum JobCommand {
    /// Every task's state, read from the overlay.
    Status {
        job: String,
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        user: UserArgs,
    },
    /// Cancel every task that is not final yet.
    Cancel {
        job: String,
        #[command(flatten)]
        user: UserArgs,
    },
    /// Writes deterministic sample text (input for wordcount demos).
    #[command(hide = true)]
    SampleText {
        #[arg(long, default_value_t = 100_000)]
        words: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        out: PathBuf,
    },
    /// Jobs submitted from this machine.
    List {
        #[arg(long, default_value = "run")]
        state_dir: PathBuf,
    },
}

fn absolute(p: &Path) -> PathBuf {
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        unipeer::image::repo_root().join(p)
    }
}

fn credential(u: &UserArgs) -> Result<UserCredential> {
    let psk = match &u.key_file {
        Some(f) => {
            let b =
                std::fs::read(f).with_context(|| format!("reading key file {}", f.display()))?;
            <[u8; 32]>::try_from(b.as_slice()).map_err(|_| {
                anyhow!("{} holds {} bytes, not a 32-byte key", f.display(), b.len())
            })?
        }
        None => {
            let store = absolute(&u.ca);
            if !store.exists() {
                // The local cluster's authority: the first deploy would create it; create it now
                // (with the default user) so the user's key exists before any VM does.
                unipeer::cluster::ensure_authority(&store).map_err(|e| anyhow!("{e}"))?;
            }
            AuthorityStore::open(&store)
                .with_context(|| format!("authority store {}", store.display()))?
                .user_psk(&u.user)
                .with_context(|| format!("add the user with: unipeer ca add-user {}", u.user))?
        }
    };
    Ok(UserCredential {
        user: u.user.clone(),
        psk,
    })
}

fn access(u: &UserArgs, need_apps: &[String]) -> Result<FrontendAccess> {
    let (frontend, rtt): (Frontend, Duration) = pick_nearest(&u.frontends, need_apps)
        .map_err(|e| anyhow!("no usable front-end: {e}\n(start one with `unipeer frontend`)"))?;
    eprintln!(
        "front-end {} (RTT {:.2} ms)",
        frontend.url,
        rtt.as_secs_f64() * 1e3
    );
    Ok(FrontendAccess {
        frontend,
        port: CLIENT_PORT,
    })
}

pub fn submit(a: SubmitArgs) -> Result<ExitCode> {
    let state_dir = absolute(&a.user.state_dir);
    let resume = match &a.resume {
        Some(j) => Some(aa::load_state(&state_dir, j)?),
        None => None,
    };
    let manifest_path = match (&a.manifest, &resume) {
        (Some(p), _) => p.clone(),
        (None, Some(st)) => st.manifest.clone(),
        (None, None) => bail!("give a manifest or --resume JOB"),
    };
    let m = JobManifest::load(&manifest_path)
        .map_err(|e| anyhow!("{}: {e}", manifest_path.display()))?;
    let cred = credential(&a.user)?;
    let acc = access(&a.user, &m.requirements.applications)?;
    let opts = SubmitOptions {
        user: cred,
        out_dir: a.out,
        run_root: state_dir,
        report: if a.json_progress {
            aa::Report::JsonLines
        } else {
            aa::Report::Bar
        },
        check: a.check,
        exec_copies: if a.verify { 2 } else { 1 },
        poll: Duration::from_millis(a.poll_ms.max(50)),
    };
    let mut say = |s: &str| eprintln!("{s}");
    let sum = aa::run(&acc, &m, &manifest_path, resume, &opts, &mut say)?;
    let p = sum.progress;
    if a.json_progress {
        println!("{}", serde_json::json!({"summary": sum}));
    }
    eprintln!(
        "job {}: {}/{} tasks done ({} verified), {} failed, {} disputed in {:.1} s; gateway moved {} time(s)",
        sum.job,
        p.done,
        p.total,
        p.verified,
        p.failed,
        p.disputed,
        sum.elapsed_s,
        sum.gateway_reconnects
    );
    for f in &sum.failures {
        eprintln!("  {f}");
    }
    if let Some(r) = &sum.result {
        eprintln!("result: {r}");
    }
    eprintln!("outputs in {}", sum.out_dir.display());
    match sum.reference_match {
        Some(true) => eprintln!("reference: the result equals the host-computed reference"),
        Some(false) => {
            eprintln!("reference: MISMATCH with the host-computed reference");
            return Ok(ExitCode::FAILURE);
        }
        None => {}
    }
    Ok(if sum.failures.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn state_text(t: &Tracked) -> String {
    match t {
        Tracked::Absent => "absent".into(),
        Tracked::Unknown => "unknown (get failed)".into(),
        Tracked::Record(r) => match &r.state {
            TaskState::Pending => "pending".into(),
            TaskState::Running { leases, results } => format!(
                "running on {} ({} result(s) in)",
                leases
                    .iter()
                    .map(|l| l.executor.id.to_string()[..8].to_string())
                    .collect::<Vec<_>>()
                    .join(","),
                results.len()
            ),
            TaskState::Done { verified, .. } => {
                format!("done{}", if *verified { " (verified)" } else { "" })
            }
            TaskState::Disputed { .. } => "disputed".into(),
            TaskState::Failed(f) => format!("failed: {f:?}"),
        },
    }
}

pub fn job(cmd: JobCommand) -> Result<ExitCode> {
    match cmd {
        JobCommand::SampleText { words, seed, out } => {
            if let Some(d) = out.parent() {
                std::fs::create_dir_all(d)?;
            }
            std::fs::write(&out, unipeer::job::sample::text(seed, words))
                .with_context(|| format!("writing {}", out.display()))?;
            Ok(ExitCode::SUCCESS)
        }
        JobCommand::List { state_dir } => {
            let dir = aa::jobs_dir(&absolute(&state_dir));
            let mut n = 0;
            if let Ok(rd) = std::fs::read_dir(&dir) {
                for e in rd.flatten() {
                    if let Some(id) = e.file_name().to_string_lossy().strip_suffix(".json")
                        && let Ok(st) = aa::load_state(&absolute(&state_dir), id)
                    {
                        n += 1;
                        println!(
                            "{}  {:<16} {:<10} {:<22} {}",
                            st.job,
                            st.name,
                            st.app,
                            st.task_count_text(),
                            if st.submitted {
                                "submitted"
                            } else {
                                "submitting"
                            }
                        );
                    }
                }
            }
            if n == 0 {
                println!("no jobs in {}", dir.display());
            }
            Ok(ExitCode::SUCCESS)
        }
        JobCommand::Status { job, json, user } => {
            let st = aa::load_state(&absolute(&user.state_dir), &job)?;
            let acc = access(&user, std::slice::from_ref(&st.app))?;
            let (p, tracked) = aa::status(&acc, &st, credential(&user)?)?;
            if json {
                println!("{}", serde_json::json!({"job": st.job, "progress": p}));
            } else {
                print_status(&st, &tracked);
                println!(
                    "{}/{} final: {} done ({} verified), {} failed, {} disputed, {} running, {} pending, {} absent, {} unknown",
                    p.finals(),
                    p.total,
                    p.done,
                    p.verified,
                    p.failed,
                    p.disputed,
                    p.running,
                    p.pending,
                    p.absent,
                    p.unknown
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        JobCommand::Cancel { job, user } => {
            let st = aa::load_state(&absolute(&user.state_dir), &job)?;
            let acc = access(&user, std::slice::from_ref(&st.app))?;
            let p = aa::cancel(&acc, &st, credential(&user)?, Duration::from_secs(30))?;
            println!(
                "job {}: cancel asked of {} tasks; now {} done, {} failed or cancelled, {} still running, {} pending, {} absent",
                st.job, p.total, p.done, p.failed, p.running, p.pending, p.absent
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn print_status(st: &JobState, tracked: &[Tracked]) {
    println!(
        "job {} ({}, app {}, user {})",
        st.job, st.name, st.app, st.user
    );
    for (i, t) in tracked.iter().enumerate() {
        let label = if i < st.tasks as usize {
            format!("task {i}")
        } else {
            format!("reduce {}", i - st.tasks as usize)
        };
        println!("  {label:<10} {}", state_text(t));
    }
}
