//! The Application Agent (`unipeer submit`): authenticates as a user, gets VMs from the nearest
//! front-end, stores the job's inputs and task records in the overlay through one node, tracks
//! the tasks' records until every one is final, and retrieves the outputs.
//!
//! The job lives in the overlay, not here: the AA keeps only a small state file per job
//! (`run/jobs/<job>.json`: the manifest's path, the user, the nonce), so `submit --resume JOB`
//! after a crash reads what the overlay holds, stores whatever records are missing, and carries
//! on. Any node serves as the gateway; when it dies the AA moves to another.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use serde::{Deserialize, Serialize};
use unipeer_node::auth::UserCredential;
use unipeer_node::id::Key;
use unipeer_node::jobs::client::{RecordAnswer, SubmitRequest};
use unipeer_node::jobs::record::{
    JobId, JobRecord, REDUCE_BASE, TaskFailure, TaskRecord, TaskState, job_id,
};

use super::client::{ClientError, JobClient, NodeInfo, PROOF_FAILED};
use super::manifest::{JobManifest, PlannedTask};
use super::result::{self, JobResult};

/// How the AA reaches nodes: a front-end (the real path) or anything else that can list nodes,
/// deploy VMs and open a byte stream to a node's client port.
pub trait Access {
    type Stream: Read + Write;
    /// The nodes, with their state (`ready` counts) and image.
    fn nodes(&self) -> Result<Vec<NodeView>>;
    /// Deploys `count` VMs from `image`; answers their names once they are ready.
    fn deploy(&self, image: &str, count: usize, memory_mb: u32) -> Result<Vec<String>>;
    /// A byte stream to `node`'s client port.
    fn connect(&self, node: &str) -> Result<Self::Stream>;
    /// What the AA prints about where it is connected.
    fn describe(&self) -> String;
}

/// One node as the AA sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeView {
    pub name: String,
    pub ready: bool,
    pub image: String,
    pub apps: Vec<String>,
}

/// The AA's record of a job, enough to resume it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct JobState {
    /// 32 hex digits.
    pub job: String,
    pub name: String,
    pub user: String,
    pub app: String,
    pub nonce: u64,
    pub manifest: PathBuf,
    pub tasks: u16,
    pub reducers: u8,
    /// Every task record was stored once (a resume then only tracks).
    pub submitted: bool,
    pub submitted_unix_s: u64,
}

impl JobState {
    /// `tasks` tasks, with ` + R reduce` for map jobs.
    pub fn task_count_text(&self) -> String {
        if self.reducers > 0 {
            format!("{} tasks + {} reduce", self.tasks, self.reducers)
        } else {
            format!("{} tasks", self.tasks)
        }
    }

    pub fn job_id(&self) -> Result<JobId> {
        Key::parse_hex(&self.job).ok_or_else(|| anyhow!("bad job id {:?} in state", self.job))
    }

    /// Every task id: map or single tasks, then reduce partitions.
    pub fn task_ids(&self) -> Result<Vec<Key>> {
        let job = self.job_id()?;
        Ok(JobRecord {
            name: self.name.clone(),
            user: self.user.clone(),
            app: self.app.clone(),
            tasks: self.tasks,
            reducers: self.reducers,
            exec_copies: 1,
        }
        .task_ids(job))
    }
}

/// Where the AA keeps job states.
pub fn jobs_dir(run_root: &Path) -> PathBuf {
    run_root.join("jobs")
}

pub fn state_path(run_root: &Path, job: &str) -> PathBuf {
    jobs_dir(run_root).join(format!("{job}.json"))
}

pub fn save_state(run_root: &Path, st: &JobState) -> Result<()> {
    let dir = jobs_dir(run_root);
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let path = state_path(run_root, &st.job);
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec_pretty(st)?)?;
    std::fs::rename(&tmp, &path)?;
    Ok(())
}

/// Loads a job's state by its id or a unique prefix of it.
pub fn load_state(run_root: &Path, job: &str) -> Result<JobState> {
    let dir = jobs_dir(run_root);
    let mut found = Vec::new();
    if let Ok(rd) = std::fs::read_dir(&dir) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(id) = name.strip_suffix(".json")
                && id.starts_with(&job.to_ascii_lowercase())
            {
                found.push(e.path());
            }
        }
    }
    match found.as_slice() {
        [one] => {
            let text = std::fs::read(one).with_context(|| format!("reading {}", one.display()))?;
            serde_json::from_slice(&text)
                .with_context(|| format!("{} is not a job state file", one.display()))
        }
        [] => bail!(
            "no job {job:?} known here (job states live in {}); was it submitted from this machine?",
            dir.display()
        ),
        _ => bail!(
            "job prefix {job:?} is ambiguous ({} jobs match)",
            found.len()
        ),
    }
}

/// One task's state as the AA tracks it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Tracked {
    /// No record at the task's root (yet).
    Absent,
    /// The get failed; state unknown this round.
    Unknown,
    Record(Box<TaskRecord>),
}

impl Tracked {
    pub fn is_final(&self) -> bool {
        matches!(self, Tracked::Record(r) if r.state.is_final())
    }
}

/// Counts of task states.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Progress {
    pub total: usize,
    pub done: usize,
    pub verified: usize,
    pub failed: usize,
    pub disputed: usize,
    pub running: usize,
    pub pending: usize,
    /// Records not (yet) in the overlay: reduce tasks before their first input registers.
    pub absent: usize,
    pub unknown: usize,
}

impl Progress {
    pub fn of(tracked: &[Tracked]) -> Progress {
        let mut p = Progress {
            total: tracked.len(),
            ..Progress::default()
        };
        for t in tracked {
            match t {
                Tracked::Absent => p.absent += 1,
                Tracked::Unknown => p.unknown += 1,
                Tracked::Record(r) => match &r.state {
                    TaskState::Pending => p.pending += 1,
                    TaskState::Running { .. } => p.running += 1,
                    TaskState::Done { verified, .. } => {
                        p.done += 1;
                        if *verified {
                            p.verified += 1;
                        }
                    }
                    TaskState::Disputed { .. } => p.disputed += 1,
                    TaskState::Failed(_) => p.failed += 1,
                },
            }
        }
        p
    }

    pub fn finals(&self) -> usize {
        self.done + self.failed + self.disputed
    }

    pub fn complete(&self) -> bool {
        self.finals() == self.total
    }
}

/// How the AA shows progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Report {
    /// A progress bar on the terminal.
    Bar,
    /// One JSON line per poll on stdout (tests and scripts).
    JsonLines,
    /// Nothing (benchmarks).
    Quiet,
}

/// Options of one `submit` run.
pub struct SubmitOptions {
    pub user: UserCredential,
    /// Output directory (default `run/jobs/<job>/out`).
    pub out_dir: Option<PathBuf>,
    /// Where job states live (`run/`).
    pub run_root: PathBuf,
    /// How progress is shown.
    pub report: Report,
    /// Compare the result with one computed natively on the host.
    pub check: bool,
    /// Executors per task (2: outputs compared, results verified).
    pub exec_copies: u8,
    /// Poll period.
    pub poll: Duration,
}

/// A session with some node, re-established on another node when it breaks.
pub struct Gateway<'a, A: Access> {
    access: &'a A,
    user: UserCredential,
    client: Option<(String, JobClient<A::Stream>)>,
    /// Nodes that failed us recently (tried last).
    avoid: Vec<String>,
    pub reconnects: u32,
}

/// How the AA says the user's key is wrong (no node will accept it).
const WRONG_KEY: &str = "authentication failed (wrong key for this cluster's user?)";

/// Most attempts at one gateway operation before giving up.
const GATEWAY_ATTEMPTS: u32 = 12;

impl<'a, A: Access> Gateway<'a, A> {
    pub fn new(access: &'a A, user: UserCredential) -> Self {
        Gateway {
            access,
            user,
            client: None,
            avoid: Vec::new(),
            reconnects: 0,
        }
    }

    /// The node currently used.
    pub fn node(&self) -> Option<&str> {
        self.client.as_ref().map(|(n, _)| n.as_str())
    }

    fn open(&mut self) -> Result<()> {
        let mut nodes: Vec<NodeView> = self
            .access
            .nodes()?
            .into_iter()
            .filter(|n| n.ready)
            .collect();
        if nodes.is_empty() {
            bail!("no node is ready ({})", self.access.describe());
        }
        nodes.sort_by_key(|n| self.avoid.contains(&n.name));
        let mut last = None;
        for n in nodes {
            match self.access.connect(&n.name).and_then(|s| {
                JobClient::connect(s, &self.user).map_err(|e| match e {
                    // The node's proof does not verify under our key: every node will say the
                    // same (a wrong key, or not this authority's cluster).
                    ClientError::Auth(t) if t.starts_with(PROOF_FAILED) => {
                        anyhow!("{WRONG_KEY} at {}: {t}", n.name)
                    }
                    // A refusal of this node's (the user not allowed here, a credential it
                    // could not obtain): another node may serve the user.
                    ClientError::Auth(t) => anyhow!("{} refused the user: {t}", n.name),
                    e => anyhow!("{}: {e}", n.name),
                })
            }) {
                Ok(mut c) => match c.ping() {
                    Ok(info) if info.joined => {
                        self.client = Some((n.name.clone(), c));
                        return Ok(());
                    }
                    Ok(_) => last = Some(anyhow!("{} has not joined the overlay yet", n.name)),
                    Err(e) => last = Some(anyhow!("{}: {e}", n.name)),
                },
                Err(e) => {
                    if e.to_string().starts_with(WRONG_KEY) {
                        return Err(e);
                    }
                    last = Some(e);
                }
            }
            if !self.avoid.contains(&n.name) {
                self.avoid.push(n.name.clone());
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("no node answered")))
    }

    /// Runs `f` on a live session, moving to another node when the connection breaks. Node
    /// refusals other than `Busy`/`NotJoined`/`Timeout` are returned at once.
    pub fn with<T>(
        &mut self,
        mut f: impl FnMut(&mut JobClient<A::Stream>) -> std::result::Result<T, ClientError>,
    ) -> Result<T> {
        let mut last = None;
        for attempt in 0..GATEWAY_ATTEMPTS {
            if self.client.is_none() {
                if attempt > 0 {
                    self.reconnects += 1;
                    std::thread::sleep(Duration::from_millis(500));
                }
                if let Err(e) = self.open() {
                    if e.to_string().starts_with(WRONG_KEY) {
                        return Err(e);
                    }
                    last = Some(e);
                    continue;
                }
            }
            let (name, c) = self.client.as_mut().expect("opened");
            match f(c) {
                Ok(v) => return Ok(v),
                Err(ClientError::Node { code, text }) => {
                    use unipeer_node::jobs::client::ClientErrorCode as C;
                    if !matches!(code, C::Busy | C::NotJoined | C::Timeout) {
                        return Err(anyhow!("{name} refused: {text}"));
                    }
                    last = Some(anyhow!("{name}: {text}"));
                    std::thread::sleep(Duration::from_millis(300));
                }
                Err(e) => {
                    last = Some(anyhow!("{name}: {e}"));
                    let name = name.clone();
                    if !self.avoid.contains(&name) {
                        self.avoid.push(name);
                    }
                    self.client = None;
                }
            }
        }
        Err(last.unwrap_or_else(|| anyhow!("no gateway node")))
    }

    pub fn ping(&mut self) -> Result<NodeInfo> {
        self.with(|c| c.ping())
    }

    /// Reads the records of `keys` (absent, unknown or a decoded task record each).
    pub fn track(&mut self, keys: &[Key]) -> Result<Vec<Tracked>> {
        let answers = self.with(|c| c.records(keys))?;
        Ok(answers
            .into_iter()
            .map(|(_, a)| match a {
                RecordAnswer::Value(v) => match TaskRecord::decode(&v) {
                    Some(r) => Tracked::Record(Box::new(r)),
                    None => Tracked::Unknown,
                },
                RecordAnswer::Absent => Tracked::Absent,
                RecordAnswer::Failed => Tracked::Unknown,
            })
            .collect())
    }

    /// The job's record, if the overlay holds it.
    pub fn job_record(&mut self, job: JobId) -> Result<Option<JobRecord>> {
        let a = self.with(|c| c.records(&[job]))?;
        Ok(match a.into_iter().next().map(|(_, a)| a) {
            Some(RecordAnswer::Value(v)) => JobRecord::decode(&v),
            _ => None,
        })
    }
}

/// Ensures the cluster has `vms` ready nodes offering `apps`, deploying the missing ones from
/// `images` (round robin). Answers the names deployed.
/// Most copies a record or chunk can have: the root and the nearer half of its leaf set
/// (L = 16 in every image: `NodeConfig::new`).
pub const MAX_PLACEABLE_COPIES: u8 = 16 / 2 + 1;

/// The job's copies of task records and chunks: the manifest's `replication`, clamped to the
/// nodes the cluster has and to what a leaf set can place; says so when it clamps.
pub fn clamp_replication(asked: u8, nodes: usize, say: &mut dyn FnMut(&str)) -> u8 {
    let nodes = u8::try_from(nodes).unwrap_or(u8::MAX).max(1);
    let bound = nodes.min(MAX_PLACEABLE_COPIES);
    if asked <= bound {
        return asked;
    }
    let why = if bound == nodes {
        format!("the cluster has {nodes} ready node(s)")
    } else {
        format!("a leaf set places at most {MAX_PLACEABLE_COPIES}")
    };
    say(&format!(
        "replication {asked} clamped to {bound}: {why}; the job's task records and chunks keep {bound} copies"
    ));
    bound
}

pub fn ensure_vms<A: Access>(
    access: &A,
    m: &JobManifest,
    say: &mut dyn FnMut(&str),
) -> Result<Vec<String>> {
    let nodes = access.nodes()?;
    let ready = nodes.iter().filter(|n| n.ready).count();
    let capable = nodes
        .iter()
        .filter(|n| n.ready && n.apps.contains(&m.application))
        .count();
    let want = m.requirements.vms as usize;
    let missing = want.saturating_sub(ready);
    let mut deployed = Vec::new();
    if missing == 0 && capable > 0 {
        return Ok(deployed);
    }
    let count = missing.max(1);
    say(&format!(
        "deploying {count} VM(s) from image(s) {} ({} MiB each)",
        m.images.join(", "),
        m.requirements.memory_mb
    ));
    let per = count.div_ceil(m.images.len().max(1));
    let mut left = count;
    for img in &m.images {
        if left == 0 {
            break;
        }
        let n = per.min(left);
        deployed.extend(access.deploy(img, n, m.requirements.memory_mb)?);
        left -= n;
    }
    Ok(deployed)
}

fn now_unix_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The submission a manifest's planned tasks make, with the input chunks to put.
pub fn plan_submission(
    m: &JobManifest,
    planned: &[PlannedTask],
    nonce: u64,
    exec_copies: u8,
) -> (SubmitRequest, Vec<Vec<u8>>) {
    let mut chunks: BTreeMap<Key, Vec<u8>> = BTreeMap::new();
    let mut tasks = Vec::with_capacity(planned.len());
    for t in planned {
        match t {
            PlannedTask::Params(p) => tasks.push((p.clone(), Vec::new())),
            PlannedTask::Inputs { params, inputs } => {
                let ids = inputs
                    .iter()
                    .map(|d| {
                        let id = Key::for_content(d);
                        chunks.entry(id).or_insert_with(|| d.clone());
                        id
                    })
                    .collect();
                tasks.push((params.clone(), ids));
            }
        }
    }
    (
        SubmitRequest {
            name: m.name.clone(),
            app: m.application.clone(),
            nonce,
            tasks,
            reducers: m.reducers,
            exec_copies,
            replication: m.replication,
            only: None,
        },
        chunks.into_values().collect(),
    )
}

/// What a finished `submit` reports.
#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub job: String,
    pub progress: Progress,
    pub elapsed_s: f64,
    pub out_dir: PathBuf,
    pub result: Option<String>,
    /// `Some(true)`: matches the host-computed reference.
    pub reference_match: Option<bool>,
    pub gateway_reconnects: u32,
    pub failures: Vec<String>,
}

/// Submits (or resumes) a job and follows it to the end.
pub fn run<A: Access>(
    access: &A,
    m: &JobManifest,
    manifest_path: &Path,
    resume: Option<JobState>,
    o: &SubmitOptions,
    say: &mut dyn FnMut(&str),
) -> Result<Summary> {
    let started = Instant::now();
    let base = manifest_path.parent().unwrap_or(Path::new("."));
    let planned = m
        .plan(base)
        .map_err(|e| anyhow!("{}: {e}", manifest_path.display()))?;
    let resuming = resume.is_some();
    let mut st = match resume {
        Some(st) => {
            if st.name != m.name || st.app != m.application {
                bail!(
                    "job {} was {} ({}), but {} now describes {} ({}); refusing to mix them",
                    st.job,
                    st.name,
                    st.app,
                    manifest_path.display(),
                    m.name,
                    m.application
                );
            }
            st
        }
        None => {
            let mut nonce = [0u8; 8];
            getrandom::fill(&mut nonce).map_err(|e| anyhow!("OS random source: {e}"))?;
            let nonce = u64::from_le_bytes(nonce);
            let job = job_id(&o.user.user, &m.name, nonce);
            JobState {
                job: job.to_string(),
                name: m.name.clone(),
                user: o.user.user.clone(),
                app: m.application.clone(),
                nonce,
                manifest: std::fs::canonicalize(manifest_path)
                    .unwrap_or_else(|_| manifest_path.to_path_buf()),
                tasks: planned.len() as u16,
                reducers: m.reducers,
                submitted: false,
                submitted_unix_s: now_unix_s(),
            }
        }
    };
    let job = st.job_id()?;
    if st.tasks as usize != planned.len() {
        bail!(
            "the manifest now plans {} tasks, the job has {}: its inputs changed",
            planned.len(),
            st.tasks
        );
    }
    save_state(&o.run_root, &st)?;
    say(&format!(
        "job {} ({}, {})",
        st.job,
        m.application,
        st.task_count_text()
    ));

    let deployed = ensure_vms(access, m, say)?;
    if !deployed.is_empty() {
        say(&format!("deployed {}", deployed.join(", ")));
    }
    let ready = access.nodes()?.iter().filter(|n| n.ready).count();
    let replication = clamp_replication(m.replication, ready, say);
    let mut gw = Gateway::new(access, o.user.clone());
    let info = gw.ping()?;
    say(&format!(
        "gateway {} (node {}, authenticated: {})",
        gw.node().unwrap_or("?"),
        info.node,
        gw.client.as_ref().is_some_and(|(_, c)| c.authenticated)
    ));

    let (mut req, chunks) = plan_submission(m, &planned, st.nonce, o.exec_copies);
    req.replication = replication;
    let ids = st.task_ids()?;
    let n_tasks = st.tasks as usize;
    if !st.submitted {
        // A resumed submission stores only the records the overlay lacks: a task that already
        // ran is never reset.
        if resuming {
            let mut tracked = gw.track(&ids[..n_tasks])?;
            for _ in 0..5 {
                if !tracked.iter().any(|t| matches!(t, Tracked::Unknown)) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(500));
                tracked = gw.track(&ids[..n_tasks])?;
            }
            if tracked.iter().any(|t| matches!(t, Tracked::Unknown)) {
                bail!(
                    "cannot read every task record of job {} from the overlay; try --resume again",
                    st.job
                );
            }
            let missing: Vec<u16> = tracked
                .iter()
                .enumerate()
                .filter(|(_, t)| matches!(t, Tracked::Absent))
                .map(|(i, _)| i as u16)
                .collect();
            say(&format!(
                "resuming: {} of {} task records missing from the overlay",
                missing.len(),
                n_tasks
            ));
            req.only = Some(missing);
        }
        let nothing_missing =
            req.only.as_ref().is_some_and(Vec::is_empty) && gw.job_record(job)?.is_some();
        if !nothing_missing {
            let total: usize = chunks.iter().map(Vec::len).sum();
            say(&format!(
                "storing {} input chunk(s), {} KiB",
                chunks.len(),
                total / 1024
            ));
            for c in &chunks {
                gw.with(|cl| cl.put_chunk(c))?;
            }
            let got = gw.with(|cl| cl.submit(&req))?;
            if got != job {
                bail!("the node named the job {got}, expected {job}");
            }
        }
        st.submitted = true;
        save_state(&o.run_root, &st)?;
        say(&format!(
            "submitted: every record stored ({:.1} s)",
            started.elapsed().as_secs_f64()
        ));
    }

    let deadline = m.deadline.map(|d| Instant::now() + d);
    let bar = (o.report == Report::Bar).then(|| {
        let b = indicatif::ProgressBar::new(ids.len() as u64);
        b.set_style(
            indicatif::ProgressStyle::with_template(
                "{elapsed_precise} [{bar:30}] {pos}/{len} tasks final  {msg}",
            )
            .expect("valid template")
            .progress_chars("=> "),
        );
        b
    });
    let tracked = loop {
        let tracked = gw.track(&ids)?;
        let p = Progress::of(&tracked);
        if o.report == Report::JsonLines {
            println!(
                "{}",
                serde_json::json!({"job": st.job, "progress": p, "gateway": gw.node(), "elapsed_s": started.elapsed().as_secs_f64()})
            );
        }
        if let Some(b) = &bar {
            b.set_position(p.finals() as u64);
            b.set_message(format!(
                "running {} pending {} not yet spawned {}",
                p.running, p.pending, p.absent
            ));
        }
        // A map job is over when every map and every reduce is final; a single-task job when
        // every task is. Reduce records appear only as maps register.
        if p.complete() {
            break tracked;
        }
        let maps_failed = tracked[..n_tasks].iter().any(|t| matches!(t, Tracked::Record(r) if matches!(r.state, TaskState::Failed(_) | TaskState::Disputed { .. })));
        if m.reducers > 0 && maps_failed && tracked[..n_tasks].iter().all(Tracked::is_final) {
            // Reduces that can never run (a map failed): stop tracking.
            break tracked;
        }
        if deadline.is_some_and(|d| Instant::now() > d) {
            if let Some(b) = &bar {
                b.abandon();
            }
            bail!(
                "deadline passed with {}/{} tasks final; the job goes on in the overlay: `unipeer submit --resume {}`",
                p.finals(),
                p.total,
                st.job
            );
        }
        std::thread::sleep(o.poll);
    };
    if let Some(b) = &bar {
        b.finish();
    }
    let progress = Progress::of(&tracked);
    let out_dir = o
        .out_dir
        .clone()
        .unwrap_or_else(|| jobs_dir(&o.run_root).join(&st.job).join("out"));
    std::fs::create_dir_all(&out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let mut outputs: Vec<(u16, Vec<Vec<u8>>)> = Vec::new();
    let mut failures = Vec::new();
    let wanted: Vec<&Tracked> = if m.reducers > 0 {
        tracked[n_tasks..].iter().collect()
    } else {
        tracked.iter().collect()
    };
    for (i, t) in wanted.iter().enumerate() {
        let index = if m.reducers > 0 {
            REDUCE_BASE + i as u16
        } else {
            i as u16
        };
        match t {
            Tracked::Record(r) => match &r.state {
                TaskState::Done { outputs: ids, .. } => {
                    let mut parts = Vec::new();
                    for id in ids {
                        parts.push(gw.with(|c| c.fetch(*id))?);
                    }
                    outputs.push((index, parts));
                }
                TaskState::Failed(f) => {
                    failures.push(format!("task {index}: failed ({})", failure_text(f)))
                }
                TaskState::Disputed { hashes } => failures.push(format!(
                    "task {index}: disputed, executors disagree ({} different outputs)",
                    hashes.len()
                )),
                _ => failures.push(format!("task {index}: not final")),
            },
            _ => failures.push(format!("task {index}: no record")),
        }
    }
    for t in tracked[..n_tasks].iter() {
        if let Tracked::Record(r) = t
            && m.reducers > 0
            && let TaskState::Failed(f) = &r.state
        {
            failures.push(format!(
                "map task {}: failed ({})",
                r.index,
                failure_text(f)
            ));
        }
    }
    for (index, parts) in &outputs {
        for (p, data) in parts.iter().enumerate() {
            let name = if parts.len() == 1 {
                format!("task-{index:05}.out")
            } else {
                format!("task-{index:05}-{p}.out")
            };
            std::fs::write(out_dir.join(name), data)?;
        }
    }
    let mut res: Option<JobResult> = result::combine(&m.application, &outputs);
    if let Some(r) = res.as_mut()
        && !failures.is_empty()
    {
        r.summary = format!(
            "PARTIAL ({} task(s) without output): {}",
            failures.len(),
            r.summary
        );
    }
    if let Some(r) = &res {
        std::fs::write(out_dir.join("result.txt"), &r.bytes)?;
    }
    let reference_match = if o.check && failures.is_empty() {
        let reference = result::reference(m, &planned)?;
        Some(
            res.as_ref()
                .map(|r| r.bytes == reference.bytes)
                .unwrap_or(false),
        )
    } else {
        None
    };
    Ok(Summary {
        job: st.job.clone(),
        progress,
        elapsed_s: started.elapsed().as_secs_f64(),
        out_dir,
        result: res.map(|r| r.summary),
        reference_match,
        gateway_reconnects: gw.reconnects,
        failures,
    })
}

fn failure_text(f: &TaskFailure) -> String {
    match f {
        TaskFailure::App(e) => format!("the application returned {e:?}"),
        TaskFailure::AttemptsExhausted => "executors lost too often".into(),
        TaskFailure::Cancelled => "cancelled".into(),
    }
}

/// `unipeer job status`: the job record and every task's state.
pub fn status<A: Access>(
    access: &A,
    st: &JobState,
    user: UserCredential,
) -> Result<(Progress, Vec<Tracked>)> {
    let mut gw = Gateway::new(access, user);
    let ids = st.task_ids()?;
    let tracked = gw.track(&ids)?;
    Ok((Progress::of(&tracked), tracked))
}

/// `unipeer job cancel`: asks every task's root to cancel it, then waits (bounded) until every
/// existing record is final.
pub fn cancel<A: Access>(
    access: &A,
    st: &JobState,
    user: UserCredential,
    within: Duration,
) -> Result<Progress> {
    let mut gw = Gateway::new(access, user);
    let job = st.job_id()?;
    let ids = st.task_ids()?;
    gw.with(|c| c.cancel(job, &ids))?;
    let start = Instant::now();
    loop {
        let tracked = gw.track(&ids)?;
        let p = Progress::of(&tracked);
        if p.running + p.pending + p.unknown == 0 || start.elapsed() > within {
            return Ok(p);
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// The real path: a front-end's HTTP API (node list, deploy, CONNECT to a client port).
pub struct FrontendAccess {
    pub frontend: crate::frontend::client::Frontend,
    /// The nodes' client port.
    pub port: u16,
}

impl Access for FrontendAccess {
    type Stream = std::net::TcpStream;

    fn nodes(&self) -> Result<Vec<NodeView>> {
        let info = self.frontend.info().map_err(|e| anyhow!("{e}"))?;
        let apps_of = |image: &str| {
            info.images
                .iter()
                .find(|i| i.name == image)
                .map(|i| i.apps.clone())
                .unwrap_or_default()
        };
        Ok(self
            .frontend
            .nodes()
            .map_err(|e| anyhow!("{e}"))?
            .into_iter()
            .map(|n| NodeView {
                ready: n.state == "up",
                apps: apps_of(&n.image),
                name: n.name,
                image: n.image,
            })
            .collect())
    }

    fn deploy(&self, image: &str, count: usize, memory_mb: u32) -> Result<Vec<String>> {
        Ok(self
            .frontend
            .deploy(image, count, Some(memory_mb))
            .map_err(|e| anyhow!("{e}"))?
            .nodes)
    }

    fn connect(&self, node: &str) -> Result<Self::Stream> {
        let s = self
            .frontend
            .connect(node, self.port)
            .map_err(|e| anyhow!("{e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(150)))?;
        s.set_write_timeout(Some(Duration::from_secs(30)))?;
        Ok(s)
    }

    fn describe(&self) -> String {
        format!("front-end {}", self.frontend.url)
    }
}

/// Straight to a local cluster's daemon (no front-end): what benchmarks and tools on the
/// cluster's own host use.
pub struct ClusterAccess {
    pub run_dir: PathBuf,
    pub port: u16,
}

impl Access for ClusterAccess {
    type Stream = std::os::unix::net::UnixStream;

    fn nodes(&self) -> Result<Vec<NodeView>> {
        let st = crate::cluster::status(&self.run_dir, false).map_err(|e| anyhow!("{e}"))?;
        Ok(st
            .nodes
            .into_iter()
            .map(|n| {
                let apps = crate::image::open(&n.image)
                    .map(|i| i.manifest.apps)
                    .unwrap_or_default();
                NodeView {
                    ready: n.state == crate::cluster::NodeState::Up,
                    name: n.name,
                    image: n.image,
                    apps,
                }
            })
            .collect())
    }

    fn deploy(&self, image: &str, count: usize, memory_mb: u32) -> Result<Vec<String>> {
        let before = crate::cluster::status(&self.run_dir, false)
            .map_err(|e| anyhow!("{e}"))?
            .nodes
            .len();
        crate::cluster::grow_nodes(
            &self.run_dir,
            &crate::cluster::GrowOptions {
                count,
                image: Some(image.to_string()),
                server: None,
                memory_mib: Some(memory_mb),
                ca_store: None,
            },
        )
        .map_err(|e| anyhow!("{e}"))?;
        Ok((before + 1..=before + count)
            .map(crate::cluster::node_name)
            .collect())
    }

    fn connect(&self, node: &str) -> Result<Self::Stream> {
        let s =
            crate::cluster::relay(&self.run_dir, node, self.port).map_err(|e| anyhow!("{e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(150)))?;
        s.set_write_timeout(Some(Duration::from_secs(30)))?;
        Ok(s)
    }

    fn describe(&self) -> String {
        format!("cluster {}", self.run_dir.display())
    }
}

#[cfg(test)]
mod replication_tests {
    use super::clamp_replication;

    #[test]
    fn replication_is_clamped_to_the_cluster_and_the_leaf_set_and_said() {
        let mut said: Vec<String> = Vec::new();
        let mut clamp = |asked, nodes| {
            let mut say = |m: &str| said.push(m.to_string());
            clamp_replication(asked, nodes, &mut say)
        };
        assert_eq!(clamp(3, 6), 3);
        assert_eq!(clamp(1, 6), 1);
        assert_eq!(clamp(5, 2), 2);
        assert_eq!(clamp(12, 40), 9);
        assert_eq!(said.len(), 2, "said only when clamped: {said:?}");
        assert!(said[0].contains("clamped to 2") && said[0].contains("2 ready"));
        assert!(said[1].contains("leaf set"), "{said:?}");
    }
}
