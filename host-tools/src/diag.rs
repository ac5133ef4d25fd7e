//! Client of a node's diagnostic service: the report over UDP or TCP, UDP echo round trips,
//! and commands over TCP, authenticated with the operator key when they change state
//! (`unipeer_node::diag_command` has the language and the challenge-response).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use unipeer_node::diag_command::{self, OPERATOR_KEY_LEN};

/// File name of a run's operator key (in the cluster's run directory, or a VM's).
pub const OPERATOR_KEY_FILE: &str = "operator.key";

/// The key that authenticates operator commands on a node's diagnostic port: 32 bytes from
/// the OS random source, one per cluster run (or per single VM), handed to the nodes in their
/// launch config and kept by the host in a 0600 file.
#[derive(Clone, PartialEq, Eq)]
pub struct OperatorKey([u8; OPERATOR_KEY_LEN]);

impl std::fmt::Debug for OperatorKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OperatorKey(..)")
    }
}

impl OperatorKey {
    /// A fresh key from the OS random source.
    pub fn generate() -> std::io::Result<OperatorKey> {
        let mut k = [0u8; OPERATOR_KEY_LEN];
        getrandom::fill(&mut k).map_err(|e| std::io::Error::other(e.to_string()))?;
        Ok(OperatorKey(k))
    }

    pub fn from_bytes(bytes: &[u8]) -> Option<OperatorKey> {
        bytes.try_into().ok().map(OperatorKey)
    }

    pub fn bytes(&self) -> &[u8; OPERATOR_KEY_LEN] {
        &self.0
    }

    /// Writes the key as hex to `path`, mode 0600, not following a symlink there.
    pub fn write(&self, path: &Path) -> std::io::Result<()> {
        let _ = std::fs::remove_file(path);
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)?;
        writeln!(f, "{}", hex(&self.0))
    }

    /// Reads a key written by [`OperatorKey::write`].
    pub fn read(path: &Path) -> std::io::Result<OperatorKey> {
        let text = std::fs::read_to_string(path)?;
        diag_command::parse_hex::<OPERATOR_KEY_LEN>(text.trim())
            .map(OperatorKey)
            .ok_or_else(|| {
                std::io::Error::other(format!("{} is not an operator key", path.display()))
            })
    }

    /// The key in `path`, or a new one written there.
    pub fn load_or_create(path: &Path) -> std::io::Result<OperatorKey> {
        match OperatorKey::read(path) {
            Ok(k) => Ok(k),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let k = OperatorKey::generate()?;
                k.write(path)?;
                Ok(k)
            }
            Err(e) => Err(e),
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A parsed diagnostic report (`key=value` lines).
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct Report {
    pub fields: BTreeMap<String, String>,
}

/// Why a probe failed.
#[derive(Debug)]
pub enum ProbeError {
    Io(std::io::Error),
    /// No (complete) answer before the deadline.
    Timeout,
    /// The answer was not a report.
    Malformed(String),
    /// The report has no such field (a renamed counter, an older image).
    MissingField(String),
    /// The node refused the operator key (or has none).
    AuthRefused(String),
}

impl std::fmt::Display for ProbeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ProbeError::Io(e) => write!(f, "probe failed: {e}"),
            ProbeError::Timeout => write!(f, "probe timed out"),
            ProbeError::Malformed(s) => write!(f, "not a diagnostic report: {s:?}"),
            ProbeError::MissingField(k) => write!(f, "the report has no field {k:?}"),
            ProbeError::AuthRefused(s) => write!(f, "operator authentication refused: {s}"),
        }
    }
}

impl std::error::Error for ProbeError {}

impl From<std::io::Error> for ProbeError {
    fn from(e: std::io::Error) -> Self {
        if matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ) {
            ProbeError::Timeout
        } else {
            ProbeError::Io(e)
        }
    }
}

impl Report {
    /// Parses the text a node sends; requires the header and the `end` line.
    pub fn parse(text: &str) -> Result<Report, ProbeError> {
        let mut lines = text.lines();
        if lines.next() != Some("unipeer-node diag v1") {
            return Err(ProbeError::Malformed(text.chars().take(80).collect()));
        }
        let mut fields = BTreeMap::new();
        for line in lines {
            if line == "end" {
                return Ok(Report { fields });
            }
            if let Some((k, v)) = line.split_once('=') {
                fields.insert(k.to_string(), v.to_string());
            }
        }
        Err(ProbeError::Malformed("no end line".into()))
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields.get(key).map(String::as_str)
    }

    /// A numeric field (0 when absent or not a number). For display; a figure or a check that
    /// relies on the field reads it with [`Report::require`].
    pub fn num(&self, key: &str) -> u64 {
        self.get(key).and_then(|v| v.parse().ok()).unwrap_or(0)
    }

    /// A numeric field that must be there: a renamed or missing counter is an error, never 0.
    pub fn require(&self, key: &str) -> Result<u64, ProbeError> {
        match self.get(key) {
            None => Err(ProbeError::MissingField(key.to_string())),
            Some(v) => v
                .parse()
                .map_err(|_| ProbeError::Malformed(format!("{key}={v} is not a number"))),
        }
    }
}

/// The local address to send to `peer` from: loopback for forwarded ports, any address for a
/// node on a cluster segment (the caller runs inside the cluster's network namespace).
pub fn local_for(peer: SocketAddr) -> SocketAddr {
    if peer.ip().is_loopback() {
        SocketAddr::from(([127, 0, 0, 1], 0))
    } else {
        SocketAddr::from(([0, 0, 0, 0], 0))
    }
}

/// Asks the UDP diagnostic port, retrying every `retry` until `timeout`.
pub fn query_udp(addr: SocketAddr, timeout: Duration) -> Result<Report, ProbeError> {
    let socket = UdpSocket::bind(local_for(addr))?;
    let start = Instant::now();
    let retry = Duration::from_millis(200);
    let mut buf = [0u8; 2048];
    // Padded to a full datagram: a node answers a source other than the host with no more
    // bytes than it was sent.
    let mut request = [b' '; 1200];
    request[..6].copy_from_slice(b"stats\n");
    while start.elapsed() < timeout {
        socket.send_to(&request, addr)?;
        socket.set_read_timeout(Some(
            retry.min(
                timeout
                    .saturating_sub(start.elapsed())
                    .max(Duration::from_millis(1)),
            ),
        ))?;
        match socket.recv_from(&mut buf) {
            Ok((n, from)) if from == addr => {
                return Report::parse(&String::from_utf8_lossy(&buf[..n]));
            }
            Ok(_) => continue,
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                continue;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Err(ProbeError::Timeout)
}

/// Connects to the TCP diagnostic port and reads the greeting report.
pub fn query_tcp(addr: SocketAddr, timeout: Duration) -> Result<Report, ProbeError> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    let text = read_until_end(&mut stream, timeout)?;
    let _ = stream.write_all(b"quit\n");
    Report::parse(&text)
}

fn read_until_end(stream: &mut TcpStream, timeout: Duration) -> Result<String, ProbeError> {
    let start = Instant::now();
    let mut text = Vec::new();
    let mut buf = [0u8; 2048];
    while start.elapsed() < timeout {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        text.extend_from_slice(&buf[..n]);
        if text.ends_with(b"\nend\n") {
            break;
        }
        if text.len() > 64 * 1024 {
            return Err(ProbeError::Malformed("report too long".into()));
        }
    }
    Ok(String::from_utf8_lossy(&text).into_owned())
}

/// Reads one line (without its newline), byte by byte so nothing after it is consumed.
fn read_line(stream: &mut TcpStream, timeout: Duration) -> Result<String, ProbeError> {
    let start = Instant::now();
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while start.elapsed() < timeout && line.len() < 4096 {
        if stream.read(&mut b)? == 0 {
            break;
        }
        if b[0] == b'\n' {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        line.push(b[0]);
    }
    Err(ProbeError::Timeout)
}

/// Runs the operator challenge-response on a connected session (after the greeting).
pub fn authenticate(
    stream: &mut TcpStream,
    key: &OperatorKey,
    timeout: Duration,
) -> Result<(), ProbeError> {
    stream.write_all(b"auth?\n")?;
    let line = read_line(stream, timeout)?;
    let nonce = line
        .strip_prefix("auth-challenge ")
        .and_then(diag_command::parse_hex::<OPERATOR_KEY_LEN>)
        .ok_or_else(|| ProbeError::AuthRefused(line.clone()))?;
    let mac = diag_command::operator_mac(key.bytes(), &nonce);
    stream.write_all(format!("auth {}\n", hex(&mac)).as_bytes())?;
    let answer = read_line(stream, timeout)?;
    if answer == "auth ok" {
        Ok(())
    } else {
        Err(ProbeError::AuthRefused(answer))
    }
}

/// Sends one command line over TCP (after the greeting, and after authenticating when `key`
/// is given) and returns the reply text read until the server closes or `timeout` passes.
pub fn tcp_command(
    addr: SocketAddr,
    key: Option<&OperatorKey>,
    command: &str,
    timeout: Duration,
) -> Result<String, ProbeError> {
    let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    let _greeting = read_until_end(&mut stream, timeout)?;
    if let Some(key) = key {
        authenticate(&mut stream, key, timeout)?;
    }
    stream.write_all(format!("{command}\n").as_bytes())?;
    let start = Instant::now();
    let mut out = Vec::new();
    let mut buf = [0u8; 1024];
    while start.elapsed() < timeout {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break;
            }
            Err(e) => return Err(e.into()),
        }
        if reply_complete(command, &out) {
            break;
        }
    }
    Ok(String::from_utf8_lossy(&out).into_owned())
}

/// Whether `out` is the whole reply to `command`. A reply arrives in as many reads as TCP and
/// the buffer cut it into, and a read can end at a line's end in the middle of a listing, so
/// the shape decides: the report and the listings (`jobs`, `jobs tasks`, `leafset`) end with an
/// `end` line, `help` has two lines, an error and every other reply one.
fn reply_complete(command: &str, out: &[u8]) -> bool {
    if !out.ends_with(b"\n") {
        return false;
    }
    if out.starts_with(b"error:") {
        return true;
    }
    let words: Vec<&str> = command.split_ascii_whitespace().collect();
    match words.as_slice() {
        [] | ["stats"] | ["jobs"] | ["jobs", "tasks"] | ["leafset"] => {
            out == b"end\n" || out.ends_with(b"\nend\n")
        }
        ["help"] => out.iter().filter(|&&b| b == b'\n').count() >= 2,
        _ => true,
    }
}

/// Round trips of `count` UDP echo requests of `size` bytes, one at a time; lost probes (no
/// answer within `per_probe`) are counted, not timed.
pub fn echo_rtts(
    addr: SocketAddr,
    count: usize,
    size: usize,
    per_probe: Duration,
) -> std::io::Result<(Vec<Duration>, usize)> {
    let socket = UdpSocket::bind(local_for(addr))?;
    socket.set_read_timeout(Some(per_probe))?;
    let mut rtts = Vec::with_capacity(count);
    let mut lost = 0;
    let mut payload = vec![0u8; size.clamp(8, 1200)];
    let mut buf = [0u8; 1500];
    for seq in 0..count as u64 {
        payload[..8].copy_from_slice(&seq.to_le_bytes());
        let t0 = Instant::now();
        socket.send_to(&payload, addr)?;
        loop {
            match socket.recv_from(&mut buf) {
                Ok((n, _)) if n >= 8 && buf[..8] == seq.to_le_bytes() => {
                    rtts.push(t0.elapsed());
                    break;
                }
                Ok(_) => continue, // a late answer to an earlier probe
                Err(_) => {
                    lost += 1;
                    break;
                }
            }
        }
    }
    Ok((rtts, lost))
}

/// The `p`-th percentile (0..=100) of sorted durations.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_report_and_rejects_others() {
        let r = Report::parse("unipeer-node diag v1\nname=n1\nirq_nic=5\nend\n").unwrap();
        assert_eq!(r.get("name"), Some("n1"));
        assert_eq!(r.num("irq_nic"), 5);
        assert_eq!(r.num("missing"), 0);
        assert!(Report::parse("hello\nend\n").is_err());
        assert!(Report::parse("unipeer-node diag v1\nname=n1\n").is_err());
    }

    #[test]
    fn a_required_field_that_is_missing_or_not_a_number_is_an_error() {
        let r = Report::parse("unipeer-node diag v1\nname=n1\nirq_nic=5\nend\n").unwrap();
        assert_eq!(r.require("irq_nic").unwrap(), 5);
        assert!(
            matches!(r.require("irq_timer"), Err(ProbeError::MissingField(k)) if k == "irq_timer")
        );
        assert!(matches!(r.require("name"), Err(ProbeError::Malformed(_))));
    }

    #[test]
    fn operator_key_file_is_private_and_round_trips() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("unipeer-opkey-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(OPERATOR_KEY_FILE);
        let k = OperatorKey::load_or_create(&path).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(OperatorKey::load_or_create(&path).unwrap(), k);
        assert_ne!(OperatorKey::generate().unwrap(), k);
        assert_eq!(format!("{k:?}"), "OperatorKey(..)");
        std::fs::write(&path, "not hex\n").unwrap();
        assert!(OperatorKey::read(&path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_reply_cut_at_a_line_end_is_not_whole() {
        let jobs = "jobs=on\njobs_slots=2\njobch_bad_frames=0\nclient_sessions=1\nend\n";
        let cut = jobs.find("jobch_bad_frames=0\n").unwrap() + "jobch_bad_frames=0\n".len();
        assert!(!reply_complete("jobs", &jobs.as_bytes()[..cut]));
        assert!(reply_complete("jobs", jobs.as_bytes()));
        assert!(!reply_complete("jobs tasks", b"task job=1 state=running\n"));
        assert!(reply_complete("jobs tasks", b"end\n"));
        assert!(reply_complete(
            "leafset",
            b"leaf id=1 addr=10.0.0.1:7000\nend\n"
        ));
        assert!(!reply_complete("help", b"commands (open): stats, ping\n"));
        assert!(reply_complete(
            "help",
            b"commands (open): stats\ncommands (after auth): shutdown\n"
        ));
        assert!(reply_complete("jobs nope", b"error: usage: jobs [tasks]\n"));
        assert!(reply_complete("ping", b"pong\n"));
        assert!(!reply_complete("ping", b"po"));
        assert!(!reply_complete("stats", b"unipeer-node diag v1\nname=n1\n"));
    }

    #[test]
    fn percentiles() {
        let v: Vec<Duration> = (1..=100).map(Duration::from_micros).collect();
        assert_eq!(percentile(&v, 50.0), Duration::from_micros(51));
        assert_eq!(percentile(&v, 99.0), Duration::from_micros(99));
        assert_eq!(percentile(&[], 50.0), Duration::ZERO);
    }
}
