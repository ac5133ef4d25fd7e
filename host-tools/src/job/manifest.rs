//! The job manifest: what `unipeer submit JOB.toml` runs.
//!
//! ```toml
//! name = "wc-demo"
//! images = ["wc"]                 # or image = "wc"
//! application = "wordcount"
//! replication = 3                 # copies of task records and chunks; default 3
//! deadline = "10m"                # s, m or h
//!
//! [requirements]
//! vms = 6
//! memory_mb = 64
//! applications = ["wordcount"]    # defaults to [application]
//!
//! [tasks]                         # exactly one of list, range, files
//! files = ["data/a.txt"]          # split into chunks of at most chunk_bytes at whitespace
//! chunk_bytes = 65536
//! reducers = 4                    # map tasks + in-overlay reduce (wordcount): at most 16 map
//!                                 # tasks, each reading up to 16 consecutive chunks
//! # range = { start = 0, end = 1000000, step = 100000 }   # primes: one task per step
//! # list = [{ params = "...", inputs = ["x.bin"] }]       # tasks given one by one
//! ```
//!
//! A bad manifest is rejected with its line, column and the reason.

use serde::Deserialize;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;
use toml::Spanned;

/// Most tasks one manifest may generate.
pub const MAX_TASKS: u64 = 10_000;
/// Largest input chunk (the node core's `MAX_CHUNK_LEN`).
pub const MAX_CHUNK_BYTES: u64 = unipeer_node::jobs::app::MAX_CHUNK_LEN as u64;
/// Most reduce partitions (the node core's `MAX_PARTS`).
pub const MAX_REDUCERS: u64 = unipeer_node::jobs::app::MAX_PARTS as u64;
/// Most map tasks feeding in-overlay reduce tasks (the node core's `MAX_INPUTS`).
pub const MAX_MAPS: u64 = unipeer_node::jobs::app::MAX_INPUTS as u64;
/// Most input chunks one task reads (the node core's `MAX_INPUTS`).
pub const MAX_TASK_INPUTS: usize = unipeer_node::jobs::app::MAX_INPUTS;
/// Most copies of records and chunks.
pub const MAX_REPLICATION: u8 = 5;

/// Why a manifest was rejected, and where.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ManifestError {
    /// 1-based line and column (0 when the reason has no place, e.g. an unreadable file).
    pub line: usize,
    pub column: usize,
    pub reason: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}", self.reason)
        } else {
            write!(
                f,
                "line {}, column {}: {}",
                self.line, self.column, self.reason
            )
        }
    }
}

impl std::error::Error for ManifestError {}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    name: Spanned<String>,
    image: Option<Spanned<String>>,
    images: Option<Spanned<Vec<String>>>,
    application: Spanned<String>,
    replication: Option<Spanned<i64>>,
    deadline: Option<Spanned<String>>,
    requirements: Option<RawRequirements>,
    tasks: Spanned<RawTasks>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRequirements {
    vms: Option<Spanned<i64>>,
    memory_mb: Option<Spanned<i64>>,
    applications: Option<Spanned<Vec<String>>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTasks {
    list: Option<Spanned<Vec<RawListed>>>,
    range: Option<Spanned<RawRange>>,
    files: Option<Spanned<Vec<String>>>,
    chunk_bytes: Option<Spanned<i64>>,
    reducers: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawListed {
    #[serde(default)]
    params: String,
    #[serde(default)]
    inputs: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRange {
    start: i64,
    end: i64,
    step: i64,
}

/// What the job needs from the cluster.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requirements {
    pub vms: u32,
    pub memory_mb: u32,
    /// Applications some VM must offer (always includes the job's application).
    pub applications: Vec<String>,
}

/// How the tasks are given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TaskPlan {
    /// Listed one by one: parameters (UTF-8) and input files each.
    Listed(Vec<ListedTask>),
    /// `[start, end)` split into tasks of `step` (the last one shorter).
    Range { start: u64, end: u64, step: u64 },
    /// Input files split into chunks of at most `chunk_bytes`, one task per chunk.
    Files {
        files: Vec<PathBuf>,
        chunk_bytes: u64,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ListedTask {
    pub params: String,
    pub inputs: Vec<PathBuf>,
}

/// A parsed, checked job manifest.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobManifest {
    pub name: String,
    pub images: Vec<String>,
    pub application: String,
    pub tasks: TaskPlan,
    /// Reduce partitions when map tasks feed in-overlay reduce tasks; 0: no reduce.
    pub reducers: u8,
    pub requirements: Requirements,
    /// Copies of this job's task records and chunks (the AA clamps it to the cluster).
    pub replication: u8,
    pub deadline: Option<Duration>,
}

/// One task the manifest generates: parameters and the input data it reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PlannedTask {
    /// Parameters only (a range for `primes`: two little-endian u64).
    Params(Vec<u8>),
    /// Parameters and input chunks.
    Inputs {
        params: Vec<u8>,
        inputs: Vec<Vec<u8>>,
    },
}

struct Locator<'a> {
    text: &'a str,
}

impl Locator<'_> {
    fn at(&self, span: Range<usize>, reason: impl Into<String>) -> ManifestError {
        let start = span.start.min(self.text.len());
        let before = &self.text[..start];
        let line = before.matches('\n').count() + 1;
        let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
        ManifestError {
            line,
            column,
            reason: reason.into(),
        }
    }
}

/// Parses a duration like `90s`, `10m`, `2h`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    let (num, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit())?);
    let n: u64 = num.parse().ok()?;
    let secs = match unit {
        "s" => n,
        "m" => n.checked_mul(60)?,
        "h" => n.checked_mul(3600)?,
        _ => return None,
    };
    (secs > 0).then(|| Duration::from_secs(secs))
}

fn in_range(
    loc: &Locator,
    v: &Spanned<i64>,
    what: &str,
    lo: i64,
    hi: i64,
) -> Result<i64, ManifestError> {
    let x = *v.get_ref();
    if x < lo || x > hi {
        return Err(loc.at(v.span(), format!("{what} must be in {lo}..={hi}, not {x}")));
    }
    Ok(x)
}

impl JobManifest {
    /// Parses and checks a manifest's text.
    pub fn parse(text: &str) -> Result<Self, ManifestError> {
        let loc = Locator { text };
        let raw: Raw = toml::from_str(text).map_err(|e| match e.span() {
            Some(span) => loc.at(span, e.message().to_string()),
            None => ManifestError {
                line: 0,
                column: 0,
                reason: e.message().to_string(),
            },
        })?;
        let name = raw.name.get_ref().trim().to_string();
        if name.is_empty() || name.len() > 64 {
            return Err(loc.at(raw.name.span(), "name must be 1 to 64 characters"));
        }
        let images = match (&raw.image, &raw.images) {
            (Some(_), Some(b)) => {
                return Err(loc.at(b.span(), "give either `image` or `images`, not both"));
            }
            (Some(a), None) => vec![a.get_ref().clone()],
            (None, Some(b)) => b.get_ref().clone(),
            (None, None) => {
                return Err(loc.at(0..0, "missing `image` (or `images`)"));
            }
        };
        if images.is_empty() || images.iter().any(|i| i.trim().is_empty()) {
            let span = raw
                .images
                .as_ref()
                .map(|s| s.span())
                .or(raw.image.as_ref().map(|s| s.span()))
                .unwrap_or(0..0);
            return Err(loc.at(span, "image names must not be empty"));
        }
        let application = raw.application.get_ref().clone();
        let max_app = unipeer_node::jobs::app::MAX_APP_NAME;
        if application.is_empty()
            || application.len() > max_app
            || !application
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(loc.at(
                raw.application.span(),
                format!("application must be 1 to {max_app} of [A-Za-z0-9_-]"),
            ));
        }
        let replication = match &raw.replication {
            None => 3,
            Some(r) => in_range(&loc, r, "replication", 1, MAX_REPLICATION as i64)? as u8,
        };
        let deadline = match &raw.deadline {
            None => None,
            Some(d) => Some(parse_duration(d.get_ref()).ok_or_else(|| {
                loc.at(
                    d.span(),
                    format!("deadline {:?} is not like 90s, 10m or 2h", d.get_ref()),
                )
            })?),
        };
        let requirements = {
            let r = raw.requirements.as_ref();
            let vms = match r.and_then(|r| r.vms.as_ref()) {
                None => 1,
                Some(v) => in_range(&loc, v, "requirements.vms", 1, 1024)? as u32,
            };
            let memory_mb = match r.and_then(|r| r.memory_mb.as_ref()) {
                None => 64,
                Some(v) => in_range(&loc, v, "requirements.memory_mb", 16, 65536)? as u32,
            };
            let applications = match r.and_then(|r| r.applications.as_ref()) {
                None => vec![application.clone()],
                Some(a) => {
                    if !a.get_ref().contains(&application) {
                        return Err(loc.at(
                            a.span(),
                            format!("requirements.applications must include {application:?}"),
                        ));
                    }
                    a.get_ref().clone()
                }
            };
            Requirements {
                vms,
                memory_mb,
                applications,
            }
        };
        let t = raw.tasks.get_ref();
        let tspan = raw.tasks.span();
        let given = [t.list.is_some(), t.range.is_some(), t.files.is_some()]
            .iter()
            .filter(|x| **x)
            .count();
        if given != 1 {
            return Err(loc.at(
                tspan,
                "[tasks] needs exactly one of `list`, `range` or `files`",
            ));
        }
        let reducers = match &t.reducers {
            None => 0,
            Some(r) => in_range(&loc, r, "tasks.reducers", 1, MAX_REDUCERS as i64)? as u8,
        };
        if let Some(c) = t.chunk_bytes.as_ref().filter(|_| t.files.is_none()) {
            return Err(loc.at(c.span(), "chunk_bytes applies only to `files`"));
        }
        let tasks = if let Some(list) = &t.list {
            if list.get_ref().is_empty() || list.get_ref().len() as u64 > MAX_TASKS {
                return Err(loc.at(
                    list.span(),
                    format!("list must hold 1 to {MAX_TASKS} tasks"),
                ));
            }
            TaskPlan::Listed(
                list.get_ref()
                    .iter()
                    .map(|l| ListedTask {
                        params: l.params.clone(),
                        inputs: l.inputs.iter().map(PathBuf::from).collect(),
                    })
                    .collect(),
            )
        } else if let Some(r) = &t.range {
            let RawRange { start, end, step } = *r.get_ref();
            if start < 0 || end <= start || step <= 0 {
                return Err(loc.at(r.span(), "range needs 0 <= start < end and step > 0"));
            }
            let n = ((end - start) as u64).div_ceil(step as u64);
            if n > MAX_TASKS {
                return Err(loc.at(
                    r.span(),
                    format!("range makes {n} tasks, more than {MAX_TASKS}"),
                ));
            }
            TaskPlan::Range {
                start: start as u64,
                end: end as u64,
                step: step as u64,
            }
        } else {
            let files = t.files.as_ref().expect("one of three is given");
            if files.get_ref().is_empty() {
                return Err(loc.at(files.span(), "files must name at least one file"));
            }
            let chunk_bytes = match &t.chunk_bytes {
                None => MAX_CHUNK_BYTES,
                Some(c) => {
                    in_range(&loc, c, "tasks.chunk_bytes", 64, MAX_CHUNK_BYTES as i64)? as u64
                }
            };
            TaskPlan::Files {
                files: files.get_ref().iter().map(PathBuf::from).collect(),
                chunk_bytes,
            }
        };
        if reducers > 0 && !matches!(tasks, TaskPlan::Files { .. }) {
            return Err(loc.at(
                t.reducers.as_ref().map_or(tspan, |r| r.span()),
                "reducers needs `files` (map tasks over input chunks)",
            ));
        }
        Ok(JobManifest {
            name,
            images,
            application,
            tasks,
            reducers,
            requirements,
            replication,
            deadline,
        })
    }

    /// Reads and parses a manifest file; errors name the file.
    pub fn load(path: &Path) -> Result<Self, ManifestError> {
        let text = std::fs::read_to_string(path).map_err(|e| ManifestError {
            line: 0,
            column: 0,
            reason: format!("{}: {e}", path.display()),
        })?;
        Self::parse(&text).map_err(|mut e| {
            e.reason = format!("{}: {}", path.display(), e.reason);
            e
        })
    }

    /// The tasks this manifest generates, reading input files relative to `base`.
    pub fn plan(&self, base: &Path) -> Result<Vec<PlannedTask>, ManifestError> {
        let read = |p: &Path| {
            let full = base.join(p);
            std::fs::read(&full).map_err(|e| ManifestError {
                line: 0,
                column: 0,
                reason: format!("input {}: {e}", full.display()),
            })
        };
        let mut out = Vec::new();
        match &self.tasks {
            TaskPlan::Listed(list) => {
                for l in list {
                    let params = l.params.as_bytes().to_vec();
                    if l.inputs.is_empty() {
                        out.push(PlannedTask::Params(params));
                    } else {
                        let inputs = l.inputs.iter().map(|p| read(p)).collect::<Result<_, _>>()?;
                        out.push(PlannedTask::Inputs { params, inputs });
                    }
                }
            }
            TaskPlan::Range { start, end, step } => {
                let mut a = *start;
                while a < *end {
                    let b = a.saturating_add(*step).min(*end);
                    let mut p = a.to_le_bytes().to_vec();
                    p.extend_from_slice(&b.to_le_bytes());
                    out.push(PlannedTask::Params(p));
                    a = b;
                }
            }
            TaskPlan::Files { files, chunk_bytes } => {
                let mut chunks = Vec::new();
                for f in files {
                    let data = read(f)?;
                    for c in split_at_whitespace(&data, *chunk_bytes as usize) {
                        chunks.push(c.to_vec());
                    }
                }
                // One task per chunk; with in-overlay reduce the map tasks are at most
                // MAX_MAPS, each reading consecutive chunks (at most MAX_INPUTS of them).
                let per_task = if self.reducers > 0 {
                    chunks.len().div_ceil(MAX_MAPS as usize).max(1)
                } else {
                    1
                };
                if per_task > MAX_TASK_INPUTS {
                    return Err(ManifestError {
                        line: 0,
                        column: 0,
                        reason: format!(
                            "input files make {} chunks; in-overlay reduce takes at most {} ({MAX_MAPS} map tasks of {MAX_TASK_INPUTS} chunks): raise chunk_bytes or split the job",
                            chunks.len(),
                            MAX_MAPS as usize * MAX_TASK_INPUTS
                        ),
                    });
                }
                let mut it = chunks.into_iter().peekable();
                while it.peek().is_some() {
                    let inputs: Vec<Vec<u8>> = it.by_ref().take(per_task).collect();
                    out.push(PlannedTask::Inputs {
                        params: Vec::new(),
                        inputs,
                    });
                }
                if out.len() as u64 > MAX_TASKS {
                    return Err(ManifestError {
                        line: 0,
                        column: 0,
                        reason: format!(
                            "input files make {} tasks, more than {MAX_TASKS}",
                            out.len()
                        ),
                    });
                }
            }
        }
        Ok(out)
    }
}

/// Splits `data` into chunks of at most `max` bytes, cutting after whitespace when there is
/// some in a chunk (so words stay whole), else at `max`.
pub fn split_at_whitespace(data: &[u8], max: usize) -> Vec<&[u8]> {
    let max = max.max(1);
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        if rest.len() <= max {
            out.push(rest);
            break;
        }
        let cut = rest[..max]
            .iter()
            .rposition(|b| b.is_ascii_whitespace())
            .map_or(max, |i| i + 1);
        let (a, b) = rest.split_at(cut);
        out.push(a);
        rest = b;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "wc-demo"
images = ["wc", "mixed"]
application = "wordcount"
deadline = "10m"

[requirements]
vms = 6
memory_mb = 64
applications = ["wordcount", "primes"]

[tasks]
files = ["a.txt"]
chunk_bytes = 100
reducers = 3
"#;

    fn err(text: &str) -> ManifestError {
        JobManifest::parse(text).expect_err("manifest must be rejected")
    }

    #[test]
    fn good_manifest_parses_with_defaults() {
        let m = JobManifest::parse(GOOD).unwrap();
        assert_eq!(m.name, "wc-demo");
        assert_eq!(m.images, vec!["wc", "mixed"]);
        assert_eq!(m.replication, 3, "default replication");
        assert_eq!(m.deadline, Some(Duration::from_secs(600)));
        assert_eq!(m.reducers, 3);
        assert_eq!(m.requirements.vms, 6);
        assert_eq!(
            m.tasks,
            TaskPlan::Files {
                files: vec![PathBuf::from("a.txt")],
                chunk_bytes: 100
            }
        );

        let p = JobManifest::parse(
            "name = \"p\"\nimage = \"x\"\napplication = \"primes\"\nreplication = 2\n[tasks]\nrange = { start = 0, end = 1000, step = 300 }\n",
        )
        .unwrap();
        assert_eq!(p.replication, 2);
        assert_eq!(p.requirements.applications, vec!["primes"]);
        let tasks = p.plan(Path::new(".")).unwrap();
        assert_eq!(tasks.len(), 4);
        let mut last = Vec::new();
        last.extend_from_slice(&900u64.to_le_bytes());
        last.extend_from_slice(&1000u64.to_le_bytes());
        assert_eq!(tasks[3], PlannedTask::Params(last));
    }

    #[test]
    fn files_are_split_into_map_tasks() {
        let dir = std::env::temp_dir().join(format!("unipeer-manifest-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let text = "lorem ipsum dolor sit amet ".repeat(10);
        std::fs::write(dir.join("a.txt"), &text).unwrap();
        let m = JobManifest::parse(GOOD).unwrap();
        let tasks = m.plan(&dir).unwrap();
        assert!(tasks.len() >= 3, "{} tasks", tasks.len());
        let mut joined = Vec::new();
        for t in &tasks {
            let PlannedTask::Inputs { inputs, .. } = t else {
                panic!("file tasks have inputs")
            };
            assert!(inputs[0].len() <= 100);
            assert!(inputs[0].ends_with(b" ") || joined.len() + inputs[0].len() == text.len());
            joined.extend_from_slice(&inputs[0]);
        }
        assert_eq!(joined, text.as_bytes());
        let missing = m.plan(&dir.join("nope")).unwrap_err();
        assert!(missing.reason.contains("a.txt"), "{missing}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_manifests_name_line_and_reason() {
        // Syntax error on line 2.
        let e = err("name = \"x\"\nimage = \n");
        assert_eq!(e.line, 2, "{e}");

        let e = err(&GOOD.replace("deadline = \"10m\"", "deadline = \"soon\""));
        assert_eq!(e.line, 5, "{e}");
        assert!(e.reason.contains("deadline"), "{e}");

        let e = err(&GOOD.replace("vms = 6", "vms = 0"));
        assert_eq!((e.line, e.column), (8, 7), "{e}");
        assert!(e.reason.contains("requirements.vms"), "{e}");

        let e = err(&GOOD.replace(
            "application = \"wordcount\"",
            "application = \"word count\"",
        ));
        assert_eq!(e.line, 4, "{e}");

        let e = err(&GOOD.replace("\"wordcount\", \"primes\"", "\"primes\""));
        assert_eq!(e.line, 10, "{e}");
        assert!(e.reason.contains("must include"), "{e}");

        let e = err(&GOOD.replace("memory_mb = 64", "memory_mb = 64\ncolour = \"red\""));
        assert_eq!(e.line, 10, "{e}");
        assert!(e.reason.contains("colour"), "unknown field named: {e}");

        let e = err(&GOOD.replace(
            "reducers = 3",
            "reducers = 3\nrange = { start = 0, end = 9, step = 1 }",
        ));
        assert!(e.reason.contains("exactly one"), "{e}");
        assert_eq!(e.line, 12, "{e}");

        let e = err(&GOOD.replace(
            "images = [\"wc\", \"mixed\"]",
            "replication = 9\nimages = [\"wc\"]",
        ));
        assert_eq!(e.line, 3, "{e}");
        assert!(e.reason.contains("replication"), "{e}");

        let e = err(
            "name = \"p\"\nimage = \"x\"\napplication = \"primes\"\n[tasks]\nrange = { start = 5, end = 5, step = 1 }\n",
        );
        assert_eq!(e.line, 5, "{e}");
        let e = err(
            "name = \"p\"\nimage = \"x\"\napplication = \"primes\"\n[tasks]\nrange = { start = 0, end = 100000000, step = 1 }\n",
        );
        assert!(e.reason.contains("more than"), "{e}");
        let e = err(
            "name = \"p\"\napplication = \"primes\"\n[tasks]\nrange = { start = 0, end = 10, step = 1 }\n",
        );
        assert!(e.reason.contains("image"), "{e}");
        let e = err("name = \"p\"\nimage = \"x\"\napplication = \"primes\"\n");
        assert!(e.reason.contains("tasks"), "{e}");
        let e = err(
            "name = \"p\"\nimage = \"x\"\napplication = \"primes\"\nreplication = \"three\"\n[tasks]\nrange = { start = 0, end = 10, step = 1 }\n",
        );
        assert_eq!(e.line, 4, "{e}");
        assert!(e.to_string().starts_with("line 4"), "{e}");
    }

    #[test]
    fn durations_and_splitting() {
        assert_eq!(parse_duration("90s"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("2h"), Some(Duration::from_secs(7200)));
        assert_eq!(parse_duration("0s"), None);
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("5d"), None);
        assert_eq!(
            split_at_whitespace(b"aaaa bb", 5),
            vec![&b"aaaa "[..], b"bb"]
        );
        assert_eq!(
            split_at_whitespace(b"aaaaaaa", 3),
            vec![&b"aaa"[..], b"aaa", b"a"]
        );
        assert!(split_at_whitespace(b"", 3).is_empty());
    }
}
