//! `unipeer bench jobs`: jobs on a local cluster, run by the Application Agent's own code,
//! against the same tasks run natively on the host. A `primes` job (CPU-bound) runs undisturbed
//! and again with a third of the VMs killed when a quarter of its tasks are final: tasks per
//! second, the slow-down from the kills (target ≤ 1.5×), and the time from a VM's death until
//! every task it held is leased to another node or done (re-dispatch), read from the task
//! records. A `wordcount` job (data-bound: inputs, map outputs and reduce inputs are chunks)
//! runs on clusters keeping 3 and 1 copies of every record and chunk: the cost of replication.
//!
//! Honest by construction: the kill lands between 25 % and 50 % of the tasks final while the
//! job runs, on VMs that hold leases, or the run fails (it says at which progress it landed);
//! the clock starts once every node reports the others' capacity adverts (observed, not
//! slept); every target row prints a computed verdict, and an empty series "no samples".

use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use unipeer_node::auth::UserCredential;
use unipeer_node::jobs::client::CLIENT_PORT;
use unipeer_node::jobs::record::TaskState;

use crate::bench::boot::Stats;
use crate::bench::{Unmeasured, Verdict, cell};
use crate::cluster::{self, UpOptions};
use crate::hostinfo::{self, AccelChoice};
use crate::job::aa::{self, ClusterAccess, Gateway, JobState, SubmitOptions, Tracked};
use crate::job::{JobManifest, result};

#[derive(clap::Args, Clone, Debug)]
pub struct JobsBenchArgs {
    /// VMs in the cluster (a third of them are killed in the second run).
    #[arg(long, default_value_t = 6)]
    pub vms: usize,
    /// primes tasks per job.
    #[arg(long, default_value_t = 36)]
    pub tasks: u64,
    /// Numbers per task (from 10^9: every prime takes ~16k trial divisions).
    #[arg(long, default_value_t = 200_000)]
    pub span: u64,
    #[arg(long, value_enum, default_value_t = AccelChoice::Auto)]
    pub accel: AccelChoice,
    /// Words of wordcount input (about 6.5 bytes each).
    #[arg(long, default_value_t = 300_000)]
    pub words: usize,
    /// Image name under images/ (must link primes and wordcount).
    #[arg(long, default_value = "default")]
    pub image: String,
}

struct RunResult {
    secs: f64,
    /// Per task a killed VM held: seconds from the kill until it was re-leased or done.
    redispatch_s: Vec<f64>,
    killed: usize,
    /// Tasks final and in all when the VMs were killed.
    killed_at: Option<(usize, usize)>,
    /// Tasks the killed VMs held at the kill, and of them those not re-leased in the bound.
    held_at_kill: usize,
    not_moved: usize,
}

/// Whether a kill with `finals` of `total` tasks final is at the named progress: at least a
/// quarter final, at most half (progress is polled, so it may overshoot a little), and the job
/// unfinished.
fn kill_lands_mid_job(finals: usize, total: usize) -> bool {
    total > 0 && finals * 4 >= total && finals * 2 <= total && finals < total
}

/// Re-dispatch is watched for at most this long after the kill.
const REDISPATCH_WATCH: Duration = Duration::from_secs(300);

/// The wordcount job over `data/bench.txt` in the state directory (written by `run`).
fn wc_manifest(args: &JobsBenchArgs, name: &str) -> Result<JobManifest> {
    let text = format!(
        "name = \"{name}\"\nimage = \"{}\"\napplication = \"wordcount\"\n\
         [requirements]\nvms = {}\nmemory_mb = 64\n\
         [tasks]\nfiles = [\"data/bench.txt\"]\nchunk_bytes = 65536\nreducers = 4\n",
        args.image, args.vms
    );
    JobManifest::parse(&text).map_err(|e| anyhow!("bench manifest: {e}"))
}

fn manifest(args: &JobsBenchArgs, name: &str) -> Result<JobManifest> {
    let start = 1_000_000_000u64;
    let text = format!(
        "name = \"{name}\"\nimage = \"{}\"\napplication = \"primes\"\n\
         [requirements]\nvms = {}\nmemory_mb = 64\n\
         [tasks]\nrange = {{ start = {start}, end = {}, step = {} }}\n",
        args.image,
        args.vms,
        start + args.tasks * args.span,
        args.span
    );
    JobManifest::parse(&text).map_err(|e| anyhow!("bench manifest: {e}"))
}

/// Runs one job; with `kill`, kills a third of the VMs (never the AA's gateway) once a quarter
/// of the tasks are final and measures re-dispatch from the records.
fn run_job(
    run_dir: &Path,
    m: &JobManifest,
    user: &UserCredential,
    state_dir: &Path,
    kill: usize,
) -> Result<RunResult> {
    let access = ClusterAccess {
        run_dir: run_dir.to_path_buf(),
        port: CLIENT_PORT,
    };
    let path = state_dir.join(format!("{}.toml", m.name));
    let opts = SubmitOptions {
        user: user.clone(),
        out_dir: Some(state_dir.join(&m.name)),
        run_root: state_dir.to_path_buf(),
        report: aa::Report::Quiet,
        check: true,
        exec_copies: 1,
        poll: Duration::from_millis(250),
    };
    let started = Instant::now();
    let m2 = m.clone();
    let path2 = path.clone();
    let worker = std::thread::spawn(move || -> Result<aa::Summary> {
        let mut quiet = |_: &str| {};
        aa::run(&access, &m2, &path2, None, &opts, &mut quiet)
    });
    let mut redispatch_s = Vec::new();
    let mut killed = 0;
    let mut killed_at = None;
    let mut held_at_kill = 0;
    let mut not_moved = 0;
    if kill > 0 {
        let fail = |why: String| -> anyhow::Error {
            anyhow!("the kill did not land mid-job, so the run measured no fault: {why}")
        };
        // Watch the job through a gateway of our own.
        let access = ClusterAccess {
            run_dir: run_dir.to_path_buf(),
            port: CLIENT_PORT,
        };
        let mut gw = Gateway::new(&access, user.clone());
        let st = loop {
            if worker.is_finished() {
                return Err(fail("the job ended before its tasks were stored".into()));
            }
            if let Ok(st) = latest_state(state_dir, &m.name)
                && st.submitted
            {
                break st;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        let ids = st.task_ids()?;
        let status = cluster::status(run_dir, false)?;
        let ip_of: BTreeMap<String, [u8; 4]> = status
            .nodes
            .iter()
            .map(|n| (n.name.clone(), n.ipv4.octets()))
            .collect();
        // The named progress: a quarter of the tasks final, with the job still running.
        let before = loop {
            let tracked = gw.track(&ids)?;
            let p = aa::Progress::of(&tracked);
            if p.finals() * 4 >= p.total {
                break tracked;
            }
            if worker.is_finished() {
                return Err(fail(format!(
                    "the job finished before 25 % was seen ({}/{} final)",
                    p.finals(),
                    p.total
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
        };
        let p = aa::Progress::of(&before);
        if !kill_lands_mid_job(p.finals(), p.total) || worker.is_finished() {
            return Err(fail(format!(
                "{}/{} tasks were final at the kill (named: 25 %, accepted up to 50 %)",
                p.finals(),
                p.total
            )));
        }
        // Victims: the VMs holding the most leases (never the watching gateway), so that
        // re-dispatch has tasks to measure.
        let gw_node = gw.node().unwrap_or("").to_string();
        let leases_on = |ip: [u8; 4]| {
            before
                .iter()
                .filter(|t| match t {
                    Tracked::Record(r) => match &r.state {
                        TaskState::Running { leases, .. } => {
                            leases.iter().any(|l| l.executor.addr.ipv4 == ip)
                        }
                        _ => false,
                    },
                    _ => false,
                })
                .count()
        };
        let mut candidates: Vec<(usize, String)> = ip_of
            .iter()
            .filter(|(n, _)| **n != gw_node)
            .map(|(n, ip)| (leases_on(*ip), n.clone()))
            .collect();
        candidates.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));
        let victims: Vec<String> = candidates.into_iter().take(kill).map(|c| c.1).collect();
        let victim_ips: Vec<[u8; 4]> = victims.iter().map(|v| ip_of[v]).collect();
        let held = |t: &Tracked| match t {
            Tracked::Record(r) => match &r.state {
                TaskState::Running { leases, .. } => leases
                    .iter()
                    .any(|l| victim_ips.contains(&l.executor.addr.ipv4)),
                _ => false,
            },
            _ => false,
        };
        let mut waiting: Vec<usize> = (0..ids.len()).filter(|&i| held(&before[i])).collect();
        held_at_kill = waiting.len();
        let t0 = Instant::now();
        for v in &victims {
            cluster::kill(run_dir, v).with_context(|| format!("killing {v}"))?;
        }
        killed = victims.len();
        killed_at = Some((p.finals(), p.total));
        eprintln!(
            "bench jobs: killed {} at {}/{} tasks final ({:.0} %), holding {held_at_kill} leased tasks",
            victims.join(","),
            p.finals(),
            p.total,
            100.0 * p.finals() as f64 / p.total as f64
        );
        while !waiting.is_empty() && t0.elapsed() < REDISPATCH_WATCH {
            std::thread::sleep(Duration::from_millis(250));
            let Ok(now) = gw.track(&ids) else { continue };
            waiting.retain(|&i| {
                let moved = !held(&now[i]) && !matches!(now[i], Tracked::Unknown);
                if moved {
                    redispatch_s.push(t0.elapsed().as_secs_f64());
                }
                !moved
            });
        }
        not_moved = waiting.len();
    }
    let summary = worker
        .join()
        .map_err(|_| anyhow!("the AA thread panicked"))??;
    let secs = started.elapsed().as_secs_f64();
    if summary.reference_match != Some(true) || !summary.failures.is_empty() {
        anyhow::bail!(
            "job {} did not match the host reference: {:?}",
            summary.job,
            summary.failures
        );
    }
    Ok(RunResult {
        secs,
        redispatch_s,
        killed,
        killed_at,
        held_at_kill,
        not_moved,
    })
}

fn latest_state(state_dir: &Path, name: &str) -> Result<JobState> {
    let dir = aa::jobs_dir(state_dir);
    let mut newest: Option<(u64, JobState)> = None;
    for e in std::fs::read_dir(&dir)?.flatten() {
        if let Ok(text) = std::fs::read(e.path())
            && let Ok(st) = serde_json::from_slice::<JobState>(&text)
            && st.name == name
            && newest
                .as_ref()
                .is_none_or(|(t, _)| st.submitted_unix_s >= *t)
        {
            newest = Some((st.submitted_unix_s, st));
        }
    }
    newest
        .map(|(_, s)| s)
        .ok_or_else(|| anyhow!("no state yet"))
}

fn demo_user(run_dir: &Path) -> Result<UserCredential> {
    let store = crate::ca::AuthorityStore::open(&run_dir.join("authority"))?;
    Ok(UserCredential {
        user: crate::ca::DEFAULT_USER.into(),
        psk: store.user_psk(crate::ca::DEFAULT_USER)?,
    })
}

/// Waits until the cluster has settled before a clock starts: every node reports itself joined,
/// a full leaf set, and capacity adverts from the others (`jobs_adverts_heard`), so a job's
/// first dispatches find executors. Observed in the nodes' reports, bounded; returns the wait.
fn settle(run_dir: &Path, user: &UserCredential, vms: usize) -> Result<Duration> {
    let access = ClusterAccess {
        run_dir: run_dir.to_path_buf(),
        port: CLIENT_PORT,
    };
    let mut gw = Gateway::new(&access, user.clone());
    gw.ping()?;
    let want = vms.saturating_sub(1).min(16) as u64;
    let started = Instant::now();
    let deadline = Duration::from_secs(120).mul_f64(crate::vm::timeout_scale());
    let mut lagging = Vec::new();
    while started.elapsed() < deadline {
        lagging.clear();
        let st = cluster::status(run_dir, false)?;
        for n in st
            .nodes
            .iter()
            .filter(|n| n.state == cluster::NodeState::Up)
        {
            let r = match cluster::host_probe(run_dir, &n.name) {
                Ok(r) => r,
                Err(e) => {
                    lagging.push(format!("{}: {e}", n.name));
                    continue;
                }
            };
            let num = |k: &str| -> Result<u64> {
                r.get(k)
                    .ok_or_else(|| anyhow!("{}'s report has no {k} (an older image?)", n.name))?
                    .parse()
                    .with_context(|| format!("{}'s {k}", n.name))
            };
            let joined = r.get("overlay_joined").map(String::as_str) == Some("true");
            let (leaf, heard) = (num("leaf_set")?, num("jobs_adverts_heard")?);
            if !joined || leaf < want || heard < want {
                lagging.push(format!(
                    "{}: joined {joined}, leaf set {leaf}, adverts from {heard}",
                    n.name
                ));
            }
        }
        if lagging.is_empty() {
            return Ok(started.elapsed());
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    anyhow::bail!(
        "the cluster did not settle within {deadline:?} (each node joined, {want} in its leaf set and adverts from {want}): {}",
        lagging.join("; ")
    )
}

pub fn run(args: &JobsBenchArgs) -> Result<()> {
    let accel = hostinfo::choose_accel(args.accel);
    let run_dir = crate::image::repo_root().join("run").join("bench-jobs");
    let _ = cluster::down(&run_dir);
    // Outside the run directory: `down` removes that.
    let state_dir = crate::image::repo_root().join("run").join("bench-jobs-aa");
    let exe = std::env::current_exe().context("locating the unipeer binary")?;
    let mut opts = UpOptions::new(args.vms, accel.accel, exe);
    opts.image = args.image.clone();
    opts.memory_mib = 64;
    opts.ca_store = Some(run_dir.join("authority"));

    // Inputs, and the native baselines: the same tasks, one after another on one host core.
    std::fs::create_dir_all(state_dir.join("data"))?;
    std::fs::write(
        state_dir.join("data").join("bench.txt"),
        crate::job::sample::text(7, args.words),
    )?;
    let m = manifest(args, "bench-native")?;
    let planned = m.plan(Path::new("."))?;
    let t = Instant::now();
    drop(result::native_outputs("primes", &planned)?);
    let native_s = t.elapsed().as_secs_f64();
    let wc = wc_manifest(args, "bench-wc-native")?;
    let wc_planned = wc.plan(&state_dir)?;
    let wc_bytes: usize =
        std::fs::metadata(state_dir.join("data").join("bench.txt"))?.len() as usize;
    let t = Instant::now();
    drop(result::native_outputs("wordcount", &wc_planned)?);
    let wc_native_s = t.elapsed().as_secs_f64();

    let single = (|| -> Result<RunResult> {
        // Replication 1 (records and chunks have only their root's copy): the wordcount job
        // on a cluster launched with `--replicas 1`, for the cost of the default 3.
        let mut o1 = opts.clone();
        o1.replicas = Some(1);
        cluster::up(&run_dir, &o1)?;
        cluster::wait_answering(&run_dir, Duration::from_secs(60))?;
        let user = demo_user(&run_dir)?;
        let waited = settle(&run_dir, &user, args.vms)?;
        eprintln!(
            "bench jobs: the 1-copy cluster settled in {:.1} s",
            waited.as_secs_f64()
        );
        run_job(
            &run_dir,
            &wc_manifest(args, "bench-wc-k1")?,
            &user,
            &state_dir,
            0,
        )
    })();
    let _ = cluster::down(&run_dir);
    let single = single?;

    let outcome = (|| -> Result<(RunResult, RunResult, RunResult)> {
        cluster::up(&run_dir, &opts)?;
        cluster::wait_answering(&run_dir, Duration::from_secs(60))?;
        let user = demo_user(&run_dir)?;
        let waited = settle(&run_dir, &user, args.vms)?;
        eprintln!(
            "bench jobs: the cluster settled in {:.1} s",
            waited.as_secs_f64()
        );
        let wc3 = run_job(
            &run_dir,
            &wc_manifest(args, "bench-wc-k3")?,
            &user,
            &state_dir,
            0,
        )?;
        let calm = run_job(
            &run_dir,
            &manifest(args, "bench-calm")?,
            &user,
            &state_dir,
            0,
        )?;
        let kills = (args.vms / 3).max(1);
        let hurt = run_job(
            &run_dir,
            &manifest(args, "bench-kill")?,
            &user,
            &state_dir,
            kills,
        )?;
        Ok((wc3, calm, hurt))
    })();
    let _ = cluster::down(&run_dir);
    let (wc3, calm, hurt) = outcome?;
    let n = args.tasks as f64;
    let lease_s = unipeer_node::jobs::JobConfig::default().lease_ms as f64 / 1000.0;
    // A task held by a dead VM is re-leased by the time its lease runs out, plus the
    // supervisor's scan and this bench's poll (2 s together).
    let redispatch_target_s = lease_s + 2.0;
    let mut unmeasured = Unmeasured::default();
    println!(
        "bench jobs: primes, {} tasks of {} numbers from 10^9, and wordcount with 4 reduce tasks; {} VMs (microvm, {}, 64 MiB, 2 task slots each), trust on, every result checked against the host's",
        args.tasks, args.span, args.vms, accel.accel
    );
    println!("| figure | measured | ratio | target | verdict |");
    println!("|---|---|---|---|---|");
    println!(
        "| native on the host, 1 core | {native_s:.2} s ({:.1} tasks/s) | 1.00 (baseline) | | |",
        n / native_s
    );
    println!(
        "| cluster, undisturbed | {:.2} s ({:.2} tasks/s) | {:.2}× native | | |",
        calm.secs,
        n / calm.secs,
        calm.secs / native_s
    );
    let slowdown = hurt.secs / calm.secs;
    let v = Verdict::of(hurt.killed_at.map(|_| slowdown), |x| x <= 1.5);
    let (f, t) = hurt.killed_at.unwrap_or((0, 0));
    let row = format!(
        "cluster, {} of {} VMs killed at {}/{} final ({:.0} %), holding {} leased tasks",
        hurt.killed,
        args.vms,
        f,
        t,
        100.0 * f as f64 / t.max(1) as f64,
        hurt.held_at_kill
    );
    unmeasured.note(&row, v);
    println!(
        "| {row} | {:.2} s ({:.2} tasks/s) | {slowdown:.2}× undisturbed | ≤ 1.5× | {v} |",
        hurt.secs,
        n / hurt.secs,
    );
    println!(
        "| wordcount {:.1} MB, native on the host | {wc_native_s:.2} s | 1.00 (baseline) | | |",
        wc_bytes as f64 / 1e6
    );
    println!(
        "| wordcount on the cluster, 3 copies of records and chunks | {:.2} s | {:.2}× native | | |",
        wc3.secs,
        wc3.secs / wc_native_s
    );
    println!(
        "| wordcount on the cluster, 1 copy (`--replicas 1`) | {:.2} s | 3 vs 1: {:.2}× | | |",
        single.secs,
        wc3.secs / single.secs
    );
    let r = Stats::of(hurt.redispatch_s.clone());
    // Every held task must have moved: one that never did fails the row whatever the others
    // measured.
    let v = match r {
        Some(_) if hurt.not_moved > 0 => Verdict::Missed,
        _ => Verdict::of(r.map(|s| s.max), |x| x <= redispatch_target_s),
    };
    let row = "VM death → its tasks re-leased or done";
    unmeasured.note(row, v);
    println!(
        "| {row} | {} ({} of {} tasks moved) | | max ≤ {redispatch_target_s:.0} s (lease {lease_s:.0} s + 2) | {v} |",
        cell(r.map(|s| s.p50), |p50| format!(
            "p50 {p50:.2} s, max {:.2} s",
            r.map_or(0.0, |s| s.max)
        )),
        r.map_or(0, |s| s.n),
        hurt.held_at_kill,
    );
    unmeasured.check()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kill_lands_between_a_quarter_and_a_half_with_the_job_unfinished() {
        assert!(kill_lands_mid_job(9, 36));
        assert!(kill_lands_mid_job(18, 36));
        assert!(!kill_lands_mid_job(8, 36), "before 25 %");
        assert!(!kill_lands_mid_job(19, 36), "past 50 %");
        assert!(kill_lands_mid_job(1, 2), "half of two");
        assert!(!kill_lands_mid_job(2, 2), "finished");
        assert!(!kill_lands_mid_job(0, 0), "no tasks");
    }
}
