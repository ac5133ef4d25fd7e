//! A driver for Debian's `redis-benchmark` (redis-tools 7.0): runs it with `--csv` (inside the
//! cluster's network namespace when there is one), bounded in time, and reads requests/s and
//! latency percentiles from its CSV.
//!
//! What 7.0 prints with `--csv`: a header line
//! `"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms","p95_latency_ms","p99_latency_ms","max_latency_ms"`
//! and one quoted line per test. When the server answers a command with an error it prints
//! `Error from server: ...` on stderr, exits 1 and leaves only the header; when it cannot
//! connect after the first connection it may spin forever, hence the time bound. A test with
//! no line, a figure that does not parse, or a non-positive rate is "no samples", never 0.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::cluster::netns;

/// The binary (Debian's `redis-tools`).
pub const PROGRAM: &str = "redis-benchmark";

/// One test's figures from a run.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct Sample {
    /// The test as redis-benchmark names it (`SET`, `GET`).
    pub test: String,
    pub rps: f64,
    pub avg_ms: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

/// Why a CSV gave no figures.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParseError {
    /// No header line: not redis-benchmark's `--csv` output.
    NoHeader,
    /// The header lacks a column the driver reads.
    MissingColumn(&'static str),
    /// A data line that does not parse (line number, 1-based).
    BadLine(usize, String),
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::NoHeader => f.write_str("no redis-benchmark CSV header"),
            ParseError::MissingColumn(c) => write!(f, "the CSV header has no {c:?} column"),
            ParseError::BadLine(n, why) => write!(f, "CSV line {n}: {why}"),
        }
    }
}

impl std::error::Error for ParseError {}

/// The fields of one CSV line, quotes removed (redis-benchmark quotes every field and never
/// puts a comma or a quote inside one).
fn fields(line: &str) -> Vec<&str> {
    line.trim()
        .split(',')
        .map(|f| f.trim().trim_matches('"'))
        .collect()
}

/// Reads every test line of redis-benchmark's `--csv` output. Lines before the header (a
/// warning, say) are skipped; a header with no test line gives an empty list.
pub fn parse_csv(text: &str) -> Result<Vec<Sample>, ParseError> {
    let mut lines = text.lines().enumerate().skip_while(|(_, l)| {
        let f = fields(l);
        !(f.first() == Some(&"test") && f.contains(&"rps"))
    });
    let (_, header) = lines.next().ok_or(ParseError::NoHeader)?;
    let header = fields(header);
    let col = |name: &'static str| {
        header
            .iter()
            .position(|h| *h == name)
            .ok_or(ParseError::MissingColumn(name))
    };
    let cols = [
        col("rps")?,
        col("avg_latency_ms")?,
        col("p50_latency_ms")?,
        col("p99_latency_ms")?,
        col("max_latency_ms")?,
    ];
    let mut out = Vec::new();
    for (i, line) in lines {
        if line.trim().is_empty() {
            continue;
        }
        let f = fields(line);
        if f.len() != header.len() {
            return Err(ParseError::BadLine(
                i + 1,
                format!("{} fields, the header has {}", f.len(), header.len()),
            ));
        }
        let mut v = [0.0f64; 5];
        for (slot, &c) in v.iter_mut().zip(&cols) {
            *slot = f[c]
                .parse::<f64>()
                .ok()
                .filter(|x| x.is_finite() && *x >= 0.0)
                .ok_or_else(|| ParseError::BadLine(i + 1, format!("{:?} is not a figure", f[c])))?;
        }
        if v[0] <= 0.0 {
            return Err(ParseError::BadLine(i + 1, "a rate of 0 requests/s".into()));
        }
        out.push(Sample {
            test: f[0].to_string(),
            rps: v[0],
            avg_ms: v[1],
            p50_ms: v[2],
            p99_ms: v[3],
            max_ms: v[4],
        });
    }
    Ok(out)
}

/// One invocation.
#[derive(Clone, Debug)]
pub struct Load {
    /// Tests, lower case as `-t` takes them (`set`, `get`).
    pub tests: Vec<String>,
    /// Requests per test (`-n`).
    pub requests: u64,
    /// Parallel connections (`-c`).
    pub clients: u32,
    /// Commands in flight per connection (`-P`; 1: no pipelining).
    pub pipeline: u32,
    /// Value size in bytes (`-d`).
    pub data_bytes: u32,
    /// Killed after this long; its tests are then "no samples".
    pub timeout: Duration,
}

/// What a run gave: figures by test (upper case, as printed), and why any test has none.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Outcome {
    pub samples: BTreeMap<String, Sample>,
    pub error: Option<String>,
}

impl Outcome {
    pub fn get(&self, test: &str) -> Option<&Sample> {
        self.samples.get(&test.to_ascii_uppercase())
    }
}

/// The arguments for `load` against `host:port` (without the program name).
pub fn args(host: Ipv4Addr, port: u16, load: &Load) -> Vec<String> {
    vec![
        "-h".into(),
        host.to_string(),
        "-p".into(),
        port.to_string(),
        "-t".into(),
        load.tests.join(","),
        "-n".into(),
        load.requests.to_string(),
        "-c".into(),
        load.clients.to_string(),
        "-P".into(),
        load.pipeline.max(1).to_string(),
        "-d".into(),
        load.data_bytes.to_string(),
        "--csv".into(),
    ]
}

/// Runs redis-benchmark against `host:port` from inside `netns` (where the cluster's VMs'
/// addresses exist), output in files under `scratch`; never fails: what went wrong is in
/// `Outcome::error` and the tests it did not report have no samples.
pub fn run(
    netns_name: Option<&str>,
    host: Ipv4Addr,
    port: u16,
    load: &Load,
    scratch: &Path,
) -> Outcome {
    match run_inner(netns_name, host, port, load, scratch) {
        Ok(o) => o,
        Err(e) => Outcome {
            samples: BTreeMap::new(),
            error: Some(e),
        },
    }
}

fn run_inner(
    netns_name: Option<&str>,
    host: Ipv4Addr,
    port: u16,
    load: &Load,
    scratch: &Path,
) -> Result<Outcome, String> {
    fs::create_dir_all(scratch).map_err(|e| format!("{}: {e}", scratch.display()))?;
    let out_path: PathBuf = scratch.join("redis-benchmark.out");
    let err_path: PathBuf = scratch.join("redis-benchmark.err");
    let out = fs::File::create(&out_path).map_err(|e| e.to_string())?;
    let err = fs::File::create(&err_path).map_err(|e| e.to_string())?;
    let mut child = netns::command(netns_name, Path::new(PROGRAM))
        .args(args(host, port, load))
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .map_err(|e| format!("cannot run {PROGRAM} (install redis-tools): {e}"))?;
    let started = Instant::now();
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if started.elapsed() > load.timeout => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            Err(e) => return Err(format!("waiting for {PROGRAM}: {e}")),
        }
    };
    let stdout = fs::read_to_string(&out_path).unwrap_or_default();
    let stderr = fs::read_to_string(&err_path).unwrap_or_default();
    let mut outcome = Outcome::default();
    match parse_csv(&stdout) {
        Ok(samples) => {
            for s in samples {
                outcome.samples.insert(s.test.to_ascii_uppercase(), s);
            }
        }
        Err(e) => outcome.error = Some(e.to_string()),
    }
    let complaint = stderr
        .lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with("WARNING: Could not fetch server CONFIG"));
    let why = match status {
        None => Some(format!(
            "killed after {:.0} s (no answer?)",
            load.timeout.as_secs_f64()
        )),
        Some(s) if !s.success() => Some(format!(
            "{PROGRAM} exited with {s}{}",
            complaint.map(|c| format!(": {c}")).unwrap_or_default()
        )),
        Some(_) => None,
    };
    if let Some(why) = why {
        outcome.error = Some(match outcome.error {
            Some(e) => format!("{why}; {e}"),
            None => why,
        });
    }
    for t in &load.tests {
        if outcome.get(t).is_none() && outcome.error.is_none() {
            outcome.error = Some(format!("{PROGRAM} reported no {t} line"));
        }
    }
    Ok(outcome)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Captured from Debian 12's redis-benchmark 7.0.15 against redis-server 7.0.15 on the
    /// host: `-t set,get -n 20000 -c 50 --csv`, with `-P 16`, and a server refusing SET
    /// with `-OOM` (header only, exit status 1).
    const PLAIN: &str = include_str!("testdata/redis-benchmark-7.0.csv");
    const PIPELINED: &str = include_str!("testdata/redis-benchmark-7.0-P16.csv");
    const REFUSED: &str = include_str!("testdata/redis-benchmark-7.0-oom.csv");

    #[test]
    fn reads_captured_output() {
        let s = parse_csv(PLAIN).unwrap();
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].test, "SET");
        assert_eq!(s[0].rps, 27434.84);
        assert_eq!(s[0].p50_ms, 0.583);
        assert_eq!(s[0].p99_ms, 11.735);
        assert_eq!(s[0].max_ms, 32.431);
        assert_eq!(s[1].test, "GET");
        assert_eq!(s[1].p99_ms, 9.439);
        let p = parse_csv(PIPELINED).unwrap();
        assert_eq!((p[0].test.as_str(), p[0].rps), ("SET", 392156.88));
        assert_eq!((p[1].test.as_str(), p[1].p50_ms), ("GET", 1.895));
    }

    #[test]
    fn a_refused_or_empty_run_has_no_samples() {
        assert_eq!(parse_csv(REFUSED).unwrap(), vec![]);
        assert_eq!(parse_csv(""), Err(ParseError::NoHeader));
        assert_eq!(
            parse_csv("Could not connect to Redis at 10.77.9.1:6379: Connection refused\n"),
            Err(ParseError::NoHeader)
        );
        // A warning before the header is skipped.
        let warned = format!("WARNING: Could not fetch server CONFIG\n{PLAIN}");
        assert_eq!(parse_csv(&warned).unwrap().len(), 2);
    }

    #[test]
    fn broken_lines_are_errors_not_zeros() {
        let header = PLAIN.lines().next().unwrap();
        for bad in [
            "\"SET\",\"-nan\",\"0.1\",\"0.1\",\"0.1\",\"0.1\",\"0.1\",\"0.1\"",
            "\"SET\",\"0.00\",\"0.1\",\"0.1\",\"0.1\",\"0.1\",\"0.1\",\"0.1\"",
            "\"SET\",\"100\",\"0.1\"",
            "\"SET\",\"100\",\"x\",\"0.1\",\"0.1\",\"0.1\",\"0.1\",\"0.1\"",
        ] {
            let text = format!("{header}\n{bad}\n");
            assert!(
                matches!(parse_csv(&text), Err(ParseError::BadLine(2, _))),
                "{bad}"
            );
        }
        let no_p99 = "\"test\",\"rps\",\"avg_latency_ms\",\"p50_latency_ms\",\"max_latency_ms\"\n";
        assert_eq!(
            parse_csv(no_p99),
            Err(ParseError::MissingColumn("p99_latency_ms"))
        );
    }

    #[test]
    fn arguments_name_the_load() {
        let load = Load {
            tests: vec!["set".into(), "get".into()],
            requests: 1000,
            clients: 50,
            pipeline: 16,
            data_bytes: 3,
            timeout: Duration::from_secs(5),
        };
        let a = args(Ipv4Addr::new(10, 77, 9, 1), 6379, &load).join(" ");
        assert_eq!(
            a,
            "-h 10.77.9.1 -p 6379 -t set,get -n 1000 -c 50 -P 16 -d 3 --csv"
        );
    }
}
