//! The front-end node (`unipeer frontend`): a host daemon standing for one physical server
//! (`--server s1`) of the local cluster in a run directory. It deploys VMs from the images under
//! `images/` on its server, reports the cluster, and relays TCP connections to the nodes (whose
//! addresses exist only inside the cluster's network namespace). The Application Agent talks to
//! it through [`client::Frontend`].
//!
//! # API (HTTP/1.1, JSON bodies, every answer `Connection: close`)
//!
//! Every request carries `Authorization: Bearer TOKEN` (the token file the front-end writes at
//! start, [`access`]), a `Host` naming the front-end, no foreign `Origin`, and for a `POST`
//! `Content-Type: application/json`.
//!
//! | request | answer |
//! |---|---|
//! | `GET /v1/info` | `{"server":"s1","run_dir":"...","cluster":true,"nodes":5,"ready":3,"images":[{"name":"default","apps":["wordcount",...]}]}`: `cluster` whether a cluster daemon answers, `nodes` all nodes of every server, `ready` nodes up on this server, `images` every image under `images/` that opens (verified) |
//! | `GET /v1/nodes[?probe=1]` | `[{"name":"n1","server":"s1","ip":"10.77.0.11","state":"up","image":"default","memory_mb":64}]`, every server's nodes (`[]` without a cluster); `probe=1` also asks each node's diagnostic port and adds `answering` and `overlay_id` |
//! | `POST /v1/deploy` `{"image":"default","count":3,"memory_mb":64,"accel":"auto"}` | `{"server":"s1","image":"default","nodes":["n4","n5","n6"],"ready_ms":812.5}` once every new VM printed its ready line. `memory_mb` and `accel` are optional; the first deploy starts the cluster (with `accel`; later deploys use the cluster's accelerator), later ones add nodes; all tagged with this server. One deploy at a time, within [`limits::FrontendLimits`]. |
//! | `POST /v1/nodes/{name}/kill` | `{"node":"n4","state":"down"}` |
//! | `POST /v1/nodes/{name}/restart` | `{"node":"n4","state":"up","ready_ms":640.1}` |
//! | `CONNECT n3:7003 HTTP/1.1` | `HTTP/1.1 200 Connection established` and a blank line, then the connection is a raw byte pipe to the client port ([`CONNECT_PORT`]) of node `n3` until either side closes, it is idle too long or its time is up; any other port is 403 |
//!
//! Errors answer `{"error":"..."}` with 400 (malformed request, bad JSON, values or `Host`, a
//! deploy over the per-deploy memory), 401 (no or wrong token), 403 (a foreign `Origin`, a
//! `CONNECT` to another port), 404 (unknown path or node), 405 (wrong method), 408 (the head not
//! within [`HEAD_DEADLINE`]), 409 (refused by the cluster: no cluster, a node of another server,
//! a launch refused), 411/413/431 (body or head too large), 415 (a `POST` that is not JSON), 429
//! (this server's VM or memory limit reached), 500 (the cluster failed), 502 (a `CONNECT` that
//! could not reach the node), 503 (more than [`CONNECTIONS_MAX`] connections, or over one
//! source's share, [`limits::CONNECTIONS_PER_SOURCE`] / [`limits::PENDING_PER_SOURCE`]). Kill
//! and restart act only on this server's nodes; `CONNECT` reaches any node.
//!
//! Limits: request line and headers at most [`HEAD_MAX`] bytes (431 beyond), a body at most
//! [`BODY_MAX`] bytes and only with `Content-Length` (413 beyond; `Transfer-Encoding` is refused
//! with 501), the head within [`HEAD_DEADLINE`] and a whole request within 30 s (408), one
//! thread per connection, [`CONNECTIONS_MAX`] at once (open `CONNECT` pipes count).

pub mod access;
pub mod client;
pub mod limits;

use std::io::{self, Read, Write};
use std::net::{IpAddr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use self::access::AccessRule;
use self::limits::{FrontendLimits, SourceSlot, SourceTable};
use crate::cluster::{self, ClusterError, GrowOptions, NodeState};
use crate::hostinfo::{self, AccelChoice};

/// Where `unipeer frontend` listens unless told.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7700";
/// Longest request line plus headers.
pub const HEAD_MAX: usize = 16 * 1024;
/// Longest request body.
pub const BODY_MAX: usize = 1 << 20;
/// Most connections served at once.
pub const CONNECTIONS_MAX: usize = 32;
/// Most VMs one deploy asks for.
pub const DEPLOY_MAX: usize = 64;
/// The only node port a `CONNECT` reaches: the client port, where the Application Agent and
/// the node authenticate each other and seal every frame.
pub const CONNECT_PORT: u16 = unipeer_node::jobs::client::CLIENT_PORT;
/// Longest wait for one write of an answer.
const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a read waiting for a request wakes up to look at its deadlines.
const READ_TICK: Duration = Duration::from_millis(250);
/// Longest time a client may take to send a request's head (line and headers).
pub const HEAD_DEADLINE: Duration = Duration::from_secs(5);
/// Longest time a client may take to send a whole request.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(30);
/// Most header lines.
const HEADERS_MAX: usize = 100;

/// An image the front-end can deploy.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageEntry {
    pub name: String,
    /// Applications linked into it.
    pub apps: Vec<String>,
}

/// `GET /v1/info`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct FrontendInfo {
    pub server: String,
    pub run_dir: String,
    /// Whether a cluster daemon answers.
    pub cluster: bool,
    /// Nodes of the cluster (every server).
    pub nodes: usize,
    /// Nodes up on this front-end's server.
    pub ready: usize,
    pub images: Vec<ImageEntry>,
}

impl FrontendInfo {
    /// Every application some image offers.
    pub fn apps(&self) -> Vec<String> {
        let mut all: Vec<String> = self
            .images
            .iter()
            .flat_map(|i| i.apps.iter().cloned())
            .collect();
        all.sort();
        all.dedup();
        all
    }
}

/// One entry of `GET /v1/nodes`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct NodeEntry {
    pub name: String,
    pub server: String,
    pub ip: String,
    /// `booting`, `up`, `down` or `exited`.
    pub state: String,
    #[serde(default)]
    pub image: String,
    #[serde(default)]
    pub memory_mb: u32,
    /// With `?probe=1`: whether the node answered its diagnostic port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub answering: Option<bool>,
    /// With `?probe=1`: the node's overlay id (32 hex digits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub overlay_id: Option<String>,
}

/// The body of `POST /v1/deploy`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeployRequest {
    pub image: String,
    pub count: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory_mb: Option<u32>,
    /// `auto`, `kvm` or `tcg` (applies when the deploy starts the cluster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accel: Option<String>,
}

/// The answer of `POST /v1/deploy`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct DeployAnswer {
    pub server: String,
    pub image: String,
    pub nodes: Vec<String>,
    /// First QEMU spawn to last ready line, milliseconds.
    pub ready_ms: f64,
}

/// How to run a front-end.
#[derive(Clone, Debug)]
pub struct FrontendConfig {
    pub listen: SocketAddr,
    /// The physical server it stands for (`s1`, `s2`, ...).
    pub server: String,
    /// The cluster's run directory.
    pub run_dir: PathBuf,
    /// The `unipeer` binary that runs the cluster daemon when a deploy starts the cluster.
    pub daemon_exe: PathBuf,
    /// Accelerator for a cluster this front-end starts (a deploy may ask for another).
    pub accel: AccelChoice,
    /// Authority store that certifies the nodes of a cluster it starts; `None`: no trust.
    pub ca_store: Option<PathBuf>,
    /// Copies of every record and chunk in a cluster it starts (`None`: 3).
    pub replicas: Option<u8>,
    /// Where the API token is written ([`access::token_dir`] unless a test says otherwise).
    pub token_dir: PathBuf,
    /// Host names accepted in `Host` besides `localhost` and IP literals.
    pub allow_hosts: Vec<String>,
    pub limits: FrontendLimits,
}

/// A bound front-end; [`FrontendServer::serve`] runs it.
pub struct FrontendServer {
    listener: TcpListener,
    token_path: PathBuf,
    shared: Arc<Shared>,
}

struct Shared {
    cfg: FrontendConfig,
    access: AccessRule,
    /// One deploy at a time.
    deploying: Mutex<()>,
    active: AtomicUsize,
    /// Busy answers lingering on their threads.
    refusing: AtomicUsize,
    sources: Arc<SourceTable>,
}

/// Whether `name` is a plausible node, server or image name (letters, digits, `-`, `_`, `.`,
/// not starting with `.`).
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
}

impl FrontendServer {
    pub fn bind(cfg: FrontendConfig) -> io::Result<FrontendServer> {
        if !valid_name(&cfg.server) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("bad server name {:?}", cfg.server),
            ));
        }
        let listener = TcpListener::bind(cfg.listen)?;
        let addr = listener.local_addr()?;
        let token = access::new_token()?;
        let token_path = access::write_token(&cfg.token_dir, addr, &token).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "writing the API token into {}: {e}",
                    cfg.token_dir.display()
                ),
            )
        })?;
        Ok(FrontendServer {
            listener,
            token_path,
            shared: Arc::new(Shared {
                access: AccessRule::new(token, addr.port(), &cfg.allow_hosts),
                cfg,
                deploying: Mutex::new(()),
                active: AtomicUsize::new(0),
                refusing: AtomicUsize::new(0),
                sources: Arc::new(SourceTable::default()),
            }),
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The file holding the API token (0600).
    pub fn token_path(&self) -> &std::path::Path {
        &self.token_path
    }

    /// Serves connections until the process ends.
    pub fn serve(self) {
        for conn in self.listener.incoming() {
            let Ok(stream) = conn else {
                // Out of descriptors, say: do not spin.
                std::thread::sleep(Duration::from_millis(20));
                continue;
            };
            if self.shared.active.load(Ordering::SeqCst) >= CONNECTIONS_MAX {
                self.shared
                    .refuse_busy(stream, format!("{CONNECTIONS_MAX} connections already"));
                continue;
            }
            let source = stream
                .peer_addr()
                .map(|a| a.ip())
                .unwrap_or(IpAddr::from([0u8; 4]));
            let slot = match SourceTable::admit(&self.shared.sources, source) {
                Ok(slot) => slot,
                Err(why) => {
                    self.shared.refuse_busy(stream, why);
                    continue;
                }
            };
            self.shared.active.fetch_add(1, Ordering::SeqCst);
            let guard = ActiveGuard(self.shared.clone());
            let shared = self.shared.clone();
            let _ = std::thread::Builder::new()
                .name("frontend-conn".into())
                .spawn(move || {
                    let _guard = guard;
                    shared.connection(stream, slot);
                });
        }
    }
}

/// Counts a connection until its thread ends (or never starts).
struct ActiveGuard(Arc<Shared>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A parsed request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpRequest {
    pub method: String,
    pub target: String,
    /// Names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    /// Bytes the client sent after the request (a `CONNECT` client's first tunnel bytes).
    pub rest: Vec<u8>,
}

impl HttpRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The target's path (without the query).
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }

    /// The value of query parameter `name`.
    pub fn query(&self, name: &str) -> Option<&str> {
        let (_, q) = self.target.split_once('?')?;
        q.split('&').find_map(|kv| match kv.split_once('=') {
            Some((k, v)) if k == name => Some(v),
            None if kv == name => Some(""),
            _ => None,
        })
    }
}

/// Why a request could not be read; `status` 0: the client closed without sending anything.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpError {
    pub status: u16,
    pub message: String,
}

fn http_err(status: u16, message: impl Into<String>) -> HttpError {
    HttpError {
        status,
        message: message.into(),
    }
}

fn io_err(e: &io::Error) -> HttpError {
    match e.kind() {
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => http_err(408, "request timed out"),
        _ => http_err(400, format!("reading the request: {e}")),
    }
}

/// Reads one request: head (at most [`HEAD_MAX`] bytes) within [`HEAD_DEADLINE`], then a body
/// of `Content-Length` bytes (at most [`BODY_MAX`]), all within [`REQUEST_DEADLINE`]. A read
/// that times out (the socket's read timeout) only makes it look at the deadlines, so set a
/// short one.
pub fn read_request(r: &mut impl Read) -> Result<HttpRequest, HttpError> {
    read_request_within(r, HEAD_DEADLINE, REQUEST_DEADLINE)
}

/// A read that a timeout interrupted: `None` (try again) while `deadline` has not passed.
fn read_some(
    r: &mut impl Read,
    buf: &mut [u8],
    start: Instant,
    deadline: Duration,
) -> Result<usize, HttpError> {
    loop {
        match r.read(buf) {
            Ok(n) => return Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) && start.elapsed() < deadline => {}
            Err(e) => return Err(io_err(&e)),
        }
        if start.elapsed() >= deadline {
            return Err(http_err(408, "request timed out"));
        }
    }
}

/// [`read_request`] with the head's and the whole request's deadlines given.
pub fn read_request_within(
    r: &mut impl Read,
    head_deadline: Duration,
    request_deadline: Duration,
) -> Result<HttpRequest, HttpError> {
    read_request_checked(r, head_deadline, request_deadline, &|_| Ok(()))
}

/// [`read_request_within`] that runs `check` on the head before reading any body: a request
/// the check refuses (no token, say) costs no body read.
pub fn read_request_checked(
    r: &mut impl Read,
    head_deadline: Duration,
    request_deadline: Duration,
    check: &dyn Fn(&HttpRequest) -> Result<(), HttpError>,
) -> Result<HttpRequest, HttpError> {
    let start = Instant::now();
    let mut buf: Vec<u8> = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let from = buf.len().saturating_sub(3);
        let n = read_some(r, &mut chunk, start, head_deadline)?;
        if n == 0 {
            return Err(if buf.is_empty() {
                http_err(0, "closed")
            } else {
                http_err(400, "the connection closed before the request's head ended")
            });
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(i) = find(&buf[from..], b"\r\n\r\n") {
            let end = from + i + 4;
            if end > HEAD_MAX {
                return Err(http_err(431, format!("request head over {HEAD_MAX} bytes")));
            }
            break end;
        }
        if buf.len() > HEAD_MAX {
            return Err(http_err(431, format!("request head over {HEAD_MAX} bytes")));
        }
        if start.elapsed() > head_deadline {
            return Err(http_err(408, "request head timed out"));
        }
    };
    let (method, target, headers) = parse_head(&buf[..head_end - 4])?;
    let mut req = HttpRequest {
        method,
        target,
        headers,
        body: Vec::new(),
        rest: Vec::new(),
    };
    check(&req)?;
    if req.header("transfer-encoding").is_some() {
        return Err(http_err(
            501,
            "Transfer-Encoding is not supported; send a Content-Length",
        ));
    }
    let lengths: Vec<&str> = req
        .headers
        .iter()
        .filter(|(n, _)| n == "content-length")
        .map(|(_, v)| v.as_str())
        .collect();
    let length = match lengths.first() {
        None => 0,
        Some(first) => {
            if lengths.iter().any(|l| l != first) {
                return Err(http_err(400, "conflicting Content-Length headers"));
            }
            if first.is_empty() || first.len() > 19 || !first.bytes().all(|b| b.is_ascii_digit()) {
                return Err(http_err(400, format!("bad Content-Length {first:?}")));
            }
            let n: u64 = first
                .parse()
                .map_err(|_| http_err(400, format!("bad Content-Length {first:?}")))?;
            if n > BODY_MAX as u64 {
                return Err(http_err(
                    413,
                    format!("body of {n} bytes is over the limit of {BODY_MAX}"),
                ));
            }
            n as usize
        }
    };
    let mut after = buf.split_off(head_end);
    if req.method == "CONNECT" {
        if length != 0 {
            return Err(http_err(400, "CONNECT takes no body"));
        }
        req.rest = after;
        return Ok(req);
    }
    while after.len() < length {
        if start.elapsed() > request_deadline {
            return Err(http_err(408, "request timed out"));
        }
        let want = (length - after.len()).min(chunk.len());
        match read_some(r, &mut chunk[..want], start, request_deadline) {
            Ok(0) => {
                return Err(http_err(
                    400,
                    format!(
                        "the connection closed after {} of {length} body bytes",
                        after.len()
                    ),
                ));
            }
            Ok(n) => after.extend_from_slice(&chunk[..n]),
            Err(e) => return Err(e),
        }
    }
    req.rest = after.split_off(length);
    req.body = after;
    Ok(req)
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
}

type Head = (String, String, Vec<(String, String)>);

/// Parses the request line and headers (without the final blank line).
pub fn parse_head(head: &[u8]) -> Result<Head, HttpError> {
    let text = std::str::from_utf8(head).map_err(|_| http_err(400, "request head is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let line = lines.next().unwrap_or("");
    let parts: Vec<&str> = line.split(' ').collect();
    let [method, target, version] = parts[..] else {
        return Err(http_err(400, format!("bad request line {line:?}")));
    };
    if method.is_empty() || method.len() > 16 || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(http_err(400, format!("bad method {method:?}")));
    }
    if target.is_empty() || target.bytes().any(|b| b.is_ascii_control() || b >= 0x80) {
        return Err(http_err(400, format!("bad request target {target:?}")));
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err(http_err(
            505,
            format!("HTTP version {version:?} not supported (HTTP/1.1 or HTTP/1.0)"),
        ));
    }
    let mut headers = Vec::new();
    for l in lines {
        if headers.len() >= HEADERS_MAX {
            return Err(http_err(431, format!("more than {HEADERS_MAX} headers")));
        }
        let Some((name, value)) = l.split_once(':') else {
            return Err(http_err(400, format!("bad header line {l:?}")));
        };
        if !is_token(name) {
            return Err(http_err(400, format!("bad header name {name:?}")));
        }
        if value.bytes().any(|b| b.is_ascii_control() && b != b'\t') {
            return Err(http_err(400, format!("bad value of header {name}")));
        }
        headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
    }
    Ok((method.to_string(), target.to_string(), headers))
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        401 => "Unauthorized",
        403 => "Forbidden",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        409 => "Conflict",
        411 => "Length Required",
        413 => "Content Too Large",
        415 => "Unsupported Media Type",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// Writes a whole JSON answer.
pub fn respond(w: &mut impl Write, status: u16, body: &Value) -> io::Result<()> {
    let mut text = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    text.push(b'\n');
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         {}Connection: close\r\n\r\n",
        reason(status),
        text.len(),
        if status == 401 {
            "WWW-Authenticate: Bearer realm=\"unipeer front-end\"\r\n"
        } else {
            ""
        }
    );
    w.write_all(head.as_bytes())?;
    w.write_all(&text)?;
    w.flush()
}

fn error(status: u16, message: impl Into<String>) -> (u16, Value) {
    (status, json!({ "error": message.into() }))
}

/// The HTTP status of a cluster failure.
fn status_of(e: &ClusterError) -> u16 {
    match e {
        ClusterError::BadInput(_) => 400,
        ClusterError::Rejected(m) if m.starts_with("unknown node") => 404,
        ClusterError::NotRunning(_)
        | ClusterError::AlreadyRunning { .. }
        | ClusterError::Rejected(_) => 409,
        ClusterError::Setup(_) | ClusterError::Io(_) => 500,
    }
}

fn cluster_error(e: ClusterError) -> (u16, Value) {
    error(status_of(&e), e.to_string())
}

/// Every image under `images/` that opens, by name.
pub fn list_images() -> Vec<ImageEntry> {
    let Ok(dir) = std::fs::read_dir(crate::image::images_dir()) else {
        return Vec::new();
    };
    let mut out: Vec<ImageEntry> = dir
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_string();
            let image = crate::image::open_dir(&e.path()).ok()?;
            Some(ImageEntry {
                name,
                apps: image.manifest.apps,
            })
        })
        .collect();
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

fn parse_accel(s: &str) -> Option<AccelChoice> {
    match s {
        "auto" => Some(AccelChoice::Auto),
        "kvm" => Some(AccelChoice::Kvm),
        "tcg" => Some(AccelChoice::Tcg),
        _ => None,
    }
}

/// Most busy answers lingering at once (each on a thread for at most a second).
const REFUSALS_LINGERING_MAX: usize = 16;

impl Shared {
    /// Answers 503 and closes. While few refusals are in flight, on a thread that reads what
    /// the client sent (so the answer is not cut off by a reset); beyond that, at once.
    fn refuse_busy(self: &Arc<Self>, mut stream: TcpStream, why: String) {
        let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
        let answer = json!({ "error": format!("busy: {why}") });
        if self.refusing.fetch_add(1, Ordering::SeqCst) >= REFUSALS_LINGERING_MAX {
            self.refusing.fetch_sub(1, Ordering::SeqCst);
            let _ = respond(&mut stream, 503, &answer);
            return;
        }
        let shared = self.clone();
        let spawned = std::thread::Builder::new()
            .name("frontend-busy".into())
            .spawn(move || {
                let _ = respond(&mut stream, 503, &answer);
                linger(stream);
                shared.refusing.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            self.refusing.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn connection(&self, mut stream: TcpStream, mut slot: SourceSlot) {
        // Short reads: the head's deadline is checked between them.
        let _ = stream.set_read_timeout(Some(READ_TICK));
        let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
        let _ = stream.set_nodelay(true);
        // Host, Origin, token and content type are judged on the head, before any body.
        let check = |req: &HttpRequest| {
            self.access
                .check(req)
                .map_err(|refusal| http_err(refusal.status(), refusal.to_string()))
        };
        let req = match read_request_checked(&mut stream, HEAD_DEADLINE, REQUEST_DEADLINE, &check) {
            Ok(r) => r,
            Err(e) if e.status == 0 => return,
            Err(e) => {
                let _ = respond(&mut stream, e.status, &json!({ "error": e.message }));
                linger(stream);
                return;
            }
        };
        slot.authenticated();
        if req.method == "CONNECT" {
            self.connect(stream, req);
            return;
        }
        let (status, body) = self.route(&req);
        let _ = respond(&mut stream, status, &body);
        linger(stream);
    }

    /// Answers one non-`CONNECT` request.
    fn route(&self, req: &HttpRequest) -> (u16, Value) {
        let path = req.path();
        if !path.starts_with('/') {
            return error(400, format!("bad request target {:?}", req.target));
        }
        let method = req.method.as_str();
        let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
        match (method, segments.as_slice()) {
            ("GET", ["v1", "info"]) => match serde_json::to_value(self.info()) {
                Ok(v) => (200, v),
                Err(e) => error(500, e.to_string()),
            },
            ("GET", ["v1", "nodes"]) => {
                let probe = matches!(req.query("probe"), Some("1" | "true" | ""));
                self.nodes(probe)
            }
            ("POST", ["v1", "deploy"]) => self.deploy(&req.body),
            ("POST", ["v1", "nodes", name, action @ ("kill" | "restart")]) => {
                self.node_action(name, action)
            }
            (_, ["v1", "info"] | ["v1", "nodes"]) => {
                error(405, format!("{method} {path}: use GET"))
            }
            (_, ["v1", "deploy"] | ["v1", "nodes", _, "kill" | "restart"]) => {
                error(405, format!("{method} {path}: use POST"))
            }
            _ => error(404, format!("no such endpoint: {method} {path}")),
        }
    }

    fn info(&self) -> FrontendInfo {
        let st = cluster::status(&self.cfg.run_dir, false).ok();
        FrontendInfo {
            server: self.cfg.server.clone(),
            run_dir: self.cfg.run_dir.display().to_string(),
            cluster: st.is_some(),
            nodes: st.as_ref().map_or(0, |s| s.nodes.len()),
            ready: st.as_ref().map_or(0, |s| {
                s.nodes
                    .iter()
                    .filter(|n| n.server == self.cfg.server && n.state == NodeState::Up)
                    .count()
            }),
            images: list_images(),
        }
    }

    fn nodes(&self, probe: bool) -> (u16, Value) {
        let st = match cluster::status(&self.cfg.run_dir, probe) {
            Ok(st) => st,
            Err(ClusterError::NotRunning(_)) => return (200, json!([])),
            Err(e) => return cluster_error(e),
        };
        let entries: Vec<NodeEntry> = st
            .nodes
            .iter()
            .map(|n| NodeEntry {
                name: n.name.clone(),
                server: n.server.clone(),
                ip: n.ipv4.to_string(),
                state: n.state.to_string(),
                image: n.image.clone(),
                memory_mb: n.memory_mib,
                answering: n.answering,
                overlay_id: n
                    .diag
                    .as_ref()
                    .map(|d| d.overlay_id.clone())
                    .filter(|id| !id.is_empty()),
            })
            .collect();
        (200, json!(entries))
    }

    fn deploy(&self, body: &[u8]) -> (u16, Value) {
        if body.is_empty() {
            return error(
                400,
                "deploy needs a JSON body: {\"image\": \"default\", \"count\": 1}",
            );
        }
        let req: DeployRequest = match serde_json::from_slice(body) {
            Ok(r) => r,
            Err(e) => return error(400, format!("bad deploy request: {e}")),
        };
        if !(1..=DEPLOY_MAX).contains(&req.count) {
            return error(
                400,
                format!("count {} is outside 1..={DEPLOY_MAX}", req.count),
            );
        }
        if !valid_name(&req.image) {
            return error(400, format!("bad image name {:?}", req.image));
        }
        if let Some(m) = req.memory_mb
            && !(16..=65_536).contains(&m)
        {
            return error(400, format!("memory_mb {m} is outside 16..=65536"));
        }
        let accel = match req.accel.as_deref() {
            None => self.cfg.accel,
            Some(a) => match parse_accel(a) {
                Some(c) => c,
                None => return error(400, format!("accel {a:?}: auto, kvm or tcg")),
            },
        };
        if let Some(m) = req.memory_mb
            && let Err(e) = self.cfg.limits.admit_request(req.count, m)
        {
            return error(e.status(), e.to_string());
        }
        if let Err(e) = crate::image::open(&req.image) {
            return error(400, e.to_string());
        }
        let _one = self.deploying.lock().unwrap_or_else(|p| p.into_inner());
        let run_dir = &self.cfg.run_dir;
        // The limits, counted under the deploy lock: this server's VMs (any state: a killed
        // one can be restarted) and their memory.
        let (current_mb, default_mb) = match cluster::status(run_dir, false) {
            Ok(st) => (
                st.nodes
                    .iter()
                    .filter(|n| n.server == self.cfg.server)
                    .map(|n| n.memory_mib)
                    .collect::<Vec<u32>>(),
                st.settings
                    .as_ref()
                    .map_or(crate::vm::DEFAULT_MEMORY_MIB, |s| s.memory_mib),
            ),
            Err(_) => (Vec::new(), crate::vm::DEFAULT_MEMORY_MIB),
        };
        let memory_mb = req.memory_mb.unwrap_or(default_mb);
        if let Err(e) = self
            .cfg
            .limits
            .admit_deploy(req.count, memory_mb, &current_mb)
        {
            return error(e.status(), e.to_string());
        }
        let grow = || {
            cluster::grow_nodes(
                run_dir,
                &GrowOptions {
                    count: req.count,
                    image: Some(req.image.clone()),
                    server: Some(self.cfg.server.clone()),
                    memory_mib: req.memory_mb,
                    ca_store: None,
                },
            )
        };
        let result = if cluster::status(run_dir, false).is_ok() {
            grow()
        } else {
            let mut opts = cluster::UpOptions::new(
                req.count,
                hostinfo::choose_accel(accel).accel,
                self.cfg.daemon_exe.clone(),
            );
            opts.image = req.image.clone();
            if let Some(m) = req.memory_mb {
                opts.memory_mib = m;
            }
            opts.server = Some(self.cfg.server.clone());
            opts.ca_store = self.cfg.ca_store.clone();
            opts.replicas = self.cfg.replicas;
            match cluster::up(run_dir, &opts) {
                Ok(r) => Ok(r.launch),
                // Another front-end of the same cluster started it meanwhile.
                Err(ClusterError::AlreadyRunning { .. }) => grow(),
                Err(e) => Err(e),
            }
        };
        match result {
            Ok(launch) => {
                let answer = DeployAnswer {
                    server: self.cfg.server.clone(),
                    image: req.image.clone(),
                    nodes: launch.ready_ms.iter().map(|(n, _)| n.clone()).collect(),
                    ready_ms: launch.all_ready_ms,
                };
                (200, json!(answer))
            }
            Err(e) => cluster_error(e),
        }
    }

    fn node_action(&self, name: &str, action: &str) -> (u16, Value) {
        if !valid_name(name) {
            return error(400, format!("bad node name {name:?}"));
        }
        let run_dir = &self.cfg.run_dir;
        let st = match cluster::status(run_dir, false) {
            Ok(st) => st,
            Err(e) => return cluster_error(e),
        };
        let Some(node) = st.node(name) else {
            return error(404, format!("unknown node {name:?}"));
        };
        if node.server != self.cfg.server {
            return error(
                409,
                format!(
                    "{name} runs on server {}, not on this front-end's {}; ask that server's \
                     front-end",
                    node.server, self.cfg.server
                ),
            );
        }
        if action == "kill" {
            match cluster::kill(run_dir, name) {
                Ok(()) => (200, json!({"node": name, "state": "down"})),
                Err(e) => cluster_error(e),
            }
        } else {
            match cluster::restart(run_dir, name) {
                Ok(r) => (
                    200,
                    json!({"node": name, "state": "up", "ready_ms": r.all_ready_ms}),
                ),
                Err(e) => cluster_error(e),
            }
        }
    }

    /// `CONNECT node:port`: a byte pipe to the node through the cluster daemon's relay.
    fn connect(&self, mut stream: TcpStream, req: HttpRequest) {
        let target = match parse_connect_target(&req.target) {
            Ok(t) => t,
            Err(e) => {
                let _ = respond(&mut stream, 400, &json!({ "error": e }));
                linger(stream);
                return;
            }
        };
        if target.1 != CONNECT_PORT {
            let _ = respond(
                &mut stream,
                403,
                &json!({ "error": format!(
                    "CONNECT {}: only a node's client port {CONNECT_PORT} is reachable",
                    req.target
                ) }),
            );
            linger(stream);
            return;
        }
        let relay = match cluster::relay(&self.cfg.run_dir, &target.0, target.1) {
            Ok(r) => r,
            Err(e) => {
                let _ = respond(
                    &mut stream,
                    502,
                    &json!({ "error": format!("CONNECT {}: {e}", req.target) }),
                );
                linger(stream);
                return;
            }
        };
        if stream
            .write_all(b"HTTP/1.1 200 Connection established\r\n\r\n")
            .is_err()
        {
            return;
        }
        // Bounded: idle and total time (`FrontendLimits::relay`).
        let Ok(reader) = stream.try_clone() else {
            return;
        };
        let client_in = io::Cursor::new(req.rest).chain(reader);
        let end = cluster::relay::pipe_within(client_in, stream, relay, self.cfg.limits.relay);
        log::debug!("front-end: CONNECT {} ended: {end:?}", req.target);
    }
}

/// `node:port` of a `CONNECT` request.
pub fn parse_connect_target(target: &str) -> Result<(String, u16), String> {
    let (node, port) = target
        .rsplit_once(':')
        .ok_or_else(|| format!("CONNECT target {target:?} is not node:port"))?;
    if !valid_name(node) {
        return Err(format!("CONNECT target {target:?}: bad node name"));
    }
    match port.parse::<u16>() {
        Ok(p) if p != 0 && port.bytes().all(|b| b.is_ascii_digit()) => Ok((node.to_string(), p)),
        _ => Err(format!("CONNECT target {target:?}: bad port")),
    }
}

/// Ends a connection after an answer without cutting the answer off: half-closes, then reads
/// (and drops) what the client still sends for a short while, so the kernel does not reset the
/// connection over unread bytes.
fn linger(mut stream: TcpStream) {
    let _ = stream.shutdown(Shutdown::Write);
    let _ = stream.set_read_timeout(Some(Duration::from_millis(200)));
    let start = Instant::now();
    let mut sink = [0u8; 4096];
    let mut total = 0usize;
    while start.elapsed() < Duration::from_secs(1) && total < BODY_MAX {
        match stream.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => total += n,
        }
    }
}

#[cfg(test)]
mod tests;
