//! The front-end node (`unipeer frontend`): a host daemon standing for one physical server
//! (`--server s1`) of the local cluster in a run directory. It deploys VMs from the images under
//! `images/` on its server, reports the cluster, and relays TCP connections to the nodes (whose
//! addresses exist only inside the cluster's network namespace). The Application Agent talks to
//! it through [`client::Frontend`].
//!
//! # API (HTTP/1.1 on `hyper`, JSON bodies, every answer `Connection: close`)
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
//! | `POST /v1/dashboard/login` | `{"path":"/login?code=...","expires_s":60}`: a one-time sign-in for a browser ([`dashboard`]) |
//! | `GET /`, `/dashboard.js`, `/v1/dashboard/state`, `/v1/dashboard/events`, `/v1/dashboard/node/{name}` | the dashboard: page, script, snapshot, snapshots as server-sent events, a node's overlay links; with the token or a browser's session cookie |
//! | `GET /login?code=...` | a valid code: `303` to `/` with the session cookie; else 401 |
//! | `CONNECT n3:7003 HTTP/1.1` | `HTTP/1.1 200` (hyper's upgrade), then the connection is a raw byte pipe to the client port ([`CONNECT_PORT`]) of node `n3` until either side closes, it is idle too long or its time is up; any other port is 403 |
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
//! Limits ([`http`]): request line and headers at most [`HEAD_MAX`] bytes and
//! [`http::HEADERS_MAX`] lines (431 beyond; a head hyper cannot parse is answered 400 with an
//! empty body), a body at most [`BODY_MAX`] bytes and only with `Content-Length` (413 beyond;
//! `Transfer-Encoding` is refused with 501), the head within [`HEAD_DEADLINE`] and a whole
//! request within [`REQUEST_DEADLINE`] (408), [`CONNECTIONS_MAX`] connections at once (open
//! `CONNECT` pipes and event streams count), served by a tokio runtime of two threads; the
//! cluster calls (blocking) run on its blocking pool.

pub mod access;
pub mod client;
pub mod dashboard;
pub mod http;
pub mod limits;

use std::io;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::body::Incoming;
use hyper::{Request, Response};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use self::access::AccessRule;
use self::http::{BoxFuture, ResBody, http_err, json_response};
pub use self::http::{HttpError, RequestHead};
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
/// Longest time a client may take to send a request's head (line and headers).
pub const HEAD_DEADLINE: Duration = Duration::from_secs(5);
/// Longest time a client may take to send a whole request.
pub const REQUEST_DEADLINE: Duration = Duration::from_secs(30);
/// Most busy answers being given at once (each for at most two seconds); beyond, a
/// connection over a cap is closed at once.
const REFUSALS_MAX: usize = 16;

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

/// The front-end's state, shared by its connections.
pub struct Shared {
    cfg: FrontendConfig,
    access: AccessRule,
    /// One deploy at a time.
    deploying: Mutex<()>,
    active: AtomicUsize,
    /// Busy answers being given.
    refusing: AtomicUsize,
    sources: Arc<SourceTable>,
    /// The dashboard's sign-in codes and browser sessions.
    sessions: dashboard::BrowserSessions,
    snapshots: dashboard::SnapshotCache,
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
            shared: Arc::new(Shared::new(
                AccessRule::new(token, addr.port(), &cfg.allow_hosts),
                cfg,
            )),
        })
    }

    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The file holding the API token (0600).
    pub fn token_path(&self) -> &std::path::Path {
        &self.token_path
    }

    /// Serves connections until the process ends (on a runtime of its own).
    pub fn serve(self) {
        let rt = match tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("frontend")
            .enable_all()
            .build()
        {
            Ok(rt) => rt,
            Err(e) => {
                log::error!("front-end: cannot start its runtime: {e}");
                return;
            }
        };
        rt.block_on(self.run());
    }

    async fn run(self) {
        let listener = match self
            .listener
            .set_nonblocking(true)
            .and_then(|_| tokio::net::TcpListener::from_std(self.listener))
        {
            Ok(l) => l,
            Err(e) => {
                log::error!("front-end: cannot listen: {e}");
                return;
            }
        };
        loop {
            let (stream, peer) = match listener.accept().await {
                Ok(c) => c,
                Err(_) => {
                    // Out of descriptors, say: do not spin.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            if self.shared.active.load(Ordering::SeqCst) >= CONNECTIONS_MAX {
                self.shared
                    .refuse_busy(stream, format!("{CONNECTIONS_MAX} connections already"));
                continue;
            }
            let slot = match SourceTable::admit(&self.shared.sources, peer.ip()) {
                Ok(slot) => slot,
                Err(why) => {
                    self.shared.refuse_busy(stream, why);
                    continue;
                }
            };
            self.shared.active.fetch_add(1, Ordering::SeqCst);
            let guard = ActiveGuard(self.shared.clone());
            let conn = Arc::new(Connection {
                shared: self.shared.clone(),
                slot: Mutex::new(slot),
            });
            tokio::spawn(async move {
                let _guard = guard;
                http::serve_connection(stream, conn).await;
            });
        }
    }
}

/// Counts a connection until its task ends.
struct ActiveGuard(Arc<Shared>);

impl Drop for ActiveGuard {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One admitted connection: the front-end and the source slot it holds.
struct Connection {
    shared: Arc<Shared>,
    slot: Mutex<SourceSlot>,
}

impl http::Service for Connection {
    fn gate(&self, head: &RequestHead) -> Result<(), HttpError> {
        self.shared.gate(head)
    }

    fn admitted(&self) {
        self.slot
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .authenticated();
    }

    fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        head: RequestHead,
    ) -> BoxFuture<Response<ResBody>> {
        Box::pin(self.shared.clone().handle(req, head))
    }

    fn deadlines(&self) -> (Duration, Duration) {
        (HEAD_DEADLINE, REQUEST_DEADLINE)
    }
}

impl http::Service for Shared {
    fn gate(&self, head: &RequestHead) -> Result<(), HttpError> {
        Shared::gate(self, head)
    }

    fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        head: RequestHead,
    ) -> BoxFuture<Response<ResBody>> {
        Box::pin(Shared::handle(self, req, head))
    }

    fn deadlines(&self) -> (Duration, Duration) {
        (HEAD_DEADLINE, REQUEST_DEADLINE)
    }
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

impl Shared {
    /// A front-end's state for `cfg`, its requests judged by `access`.
    pub fn new(access: AccessRule, cfg: FrontendConfig) -> Shared {
        Shared {
            access,
            cfg,
            deploying: Mutex::new(()),
            active: AtomicUsize::new(0),
            refusing: AtomicUsize::new(0),
            sources: Arc::new(SourceTable::default()),
            sessions: Default::default(),
            snapshots: Default::default(),
        }
    }

    /// Answers 503 and closes, on a task of its own while few refusals are in flight; beyond
    /// that, closes at once.
    fn refuse_busy(self: &Arc<Self>, stream: tokio::net::TcpStream, why: String) {
        if self.refusing.fetch_add(1, Ordering::SeqCst) >= REFUSALS_MAX {
            self.refusing.fetch_sub(1, Ordering::SeqCst);
            return;
        }
        let shared = self.clone();
        tokio::spawn(async move {
            http::refuse_busy(stream, why).await;
            shared.refusing.fetch_sub(1, Ordering::SeqCst);
        });
    }

    /// Host, Origin, token and content type, then the body's framing: judged on the head,
    /// before any body byte is read.
    ///
    /// A browser (no `Authorization` header) passes with the dashboard's session cookie, for
    /// the dashboard's `GET`s only, or to `GET /login` (whose code the handler checks).
    pub fn gate(&self, head: &RequestHead) -> Result<(), HttpError> {
        let refused = |r: access::AccessRefused| http_err(r.status(), r.to_string());
        let path = head.path();
        let browser = head.method == "GET" && head.header("authorization").is_none();
        if browser && path == "/login" {
            self.access.check_place(head).map_err(refused)?;
        } else if browser && dashboard::is_browser_path(path) {
            self.access.check_place(head).map_err(refused)?;
            let name = dashboard::cookie_name(self.access.port());
            let signed_in = head
                .headers
                .iter()
                .filter(|(n, _)| n == "cookie")
                .filter_map(|(_, v)| dashboard::cookie(v, &name))
                .any(|session| self.sessions.valid(session));
            if !signed_in {
                return Err(http_err(
                    401,
                    "sign in with `unipeer dashboard`, which opens a one-time URL",
                ));
            }
        } else {
            self.access.check(head).map_err(refused)?;
        }
        http::check_body_framing(head)
    }

    /// Answers a request that passed the gate.
    async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        head: RequestHead,
    ) -> Response<ResBody> {
        if head.method == "CONNECT" {
            return self.connect(req, head).await;
        }
        if let Some(answer) = self.dashboard(&head).await {
            return answer;
        }
        let body = match http::read_body(req).await {
            Ok(b) => b,
            Err(e) => return http::error_response(&e),
        };
        let shared = self.clone();
        // The cluster calls block (a deploy waits for VMs to boot): off the runtime's threads.
        let answer = tokio::task::spawn_blocking(move || shared.route(&head, &body)).await;
        let (status, value) =
            answer.unwrap_or_else(|e| error(500, format!("the handler failed: {e}")));
        json_response(status, &value)
    }

    /// The dashboard's requests; `None` for any other.
    async fn dashboard(self: &Arc<Self>, head: &RequestHead) -> Option<Response<ResBody>> {
        let page = |content_type: &str, text: &'static str| {
            Response::builder()
                .header("content-type", content_type)
                .header("cache-control", "no-store")
                .header(
                    "content-security-policy",
                    "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; \
                     connect-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
                )
                .header("x-content-type-options", "nosniff")
                .body(http::full(text))
                .ok()
        };
        let blocking = |f: Box<dyn FnOnce(&Shared) -> Value + Send>| {
            let shared = self.clone();
            async move {
                let v = tokio::task::spawn_blocking(move || f(&shared))
                    .await
                    .unwrap_or_else(|e| json!({"error": e.to_string()}));
                json_response(200, &v)
            }
        };
        match (head.method.as_str(), head.path()) {
            ("GET", "/") => page("text/html; charset=utf-8", dashboard::INDEX_HTML),
            ("GET", "/dashboard.js") => {
                page("text/javascript; charset=utf-8", dashboard::DASHBOARD_JS)
            }
            ("GET", "/login") => Some(self.login(head)),
            ("POST", "/v1/dashboard/login") => Some(match self.sessions.new_code() {
                Ok(code) => json_response(
                    200,
                    &json!({"path": format!("/login?code={code}"),
                            "expires_s": dashboard::CODE_TTL.as_secs()}),
                ),
                Err(e) => json_response(500, &json!({"error": e.to_string()})),
            }),
            ("GET", "/v1/dashboard/state") => Some(
                blocking(Box::new(|s: &Shared| {
                    serde_json::from_str(&s.snapshots.get(&s.cfg.run_dir)).unwrap_or(Value::Null)
                }))
                .await,
            ),
            ("GET", "/v1/dashboard/events") => Some(self.events()),
            ("GET", p) if p.starts_with("/v1/dashboard/node/") => {
                let node = p.trim_start_matches("/v1/dashboard/node/").to_string();
                if !valid_name(&node) {
                    return Some(json_response(400, &json!({"error": "bad node name"})));
                }
                Some(
                    blocking(Box::new(move |s: &Shared| {
                        dashboard::node_links(&s.cfg.run_dir, &node)
                    }))
                    .await,
                )
            }
            (
                _,
                "/" | "/dashboard.js" | "/login" | "/v1/dashboard/state" | "/v1/dashboard/events",
            ) => Some(json_response(405, &json!({"error": "use GET"}))),
            _ => None,
        }
    }

    /// `GET /login?code=...`: a valid code becomes a session cookie and a redirect to `/`.
    fn login(&self, head: &RequestHead) -> Response<ResBody> {
        let Some(session) = head.query("code").and_then(|c| self.sessions.redeem(c)) else {
            return json_response(
                401,
                &json!({"error": "this sign-in code is unknown, used or expired; run `unipeer dashboard` again"}),
            );
        };
        let cookie = format!(
            "{}={session}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
            dashboard::cookie_name(self.access.port()),
            dashboard::SESSION_TTL.as_secs()
        );
        Response::builder()
            .status(303)
            .header("location", "/")
            .header("set-cookie", cookie)
            .header("cache-control", "no-store")
            .body(http::full(Vec::new()))
            .unwrap_or_else(|_| json_response(500, &json!({"error": "building the answer"})))
    }

    /// `GET /v1/dashboard/events`: a snapshot as a server-sent event whenever it changed, at
    /// most [`dashboard::EVENTS_PER_S`] a second, for at most [`dashboard::STREAM_MAX`].
    fn events(self: &Arc<Self>) -> Response<ResBody> {
        let (tx, body) = http::channel_body(2);
        let shared = self.clone();
        tokio::spawn(async move {
            let start = tokio::time::Instant::now();
            let period = Duration::from_millis(1000 / u64::from(dashboard::EVENTS_PER_S));
            let mut last: Option<Arc<String>> = None;
            while start.elapsed() < dashboard::STREAM_MAX && !tx.is_closed() {
                let s = shared.clone();
                let Ok(snap) =
                    tokio::task::spawn_blocking(move || s.snapshots.get(&s.cfg.run_dir)).await
                else {
                    break;
                };
                if last.as_ref() != Some(&snap) {
                    let event = format!("event: snapshot\ndata: {snap}\n\n");
                    if tx.send(bytes::Bytes::from(event)).await.is_err() {
                        break;
                    }
                    last = Some(snap);
                } else if tx
                    .send(bytes::Bytes::from_static(b": idle\n\n"))
                    .await
                    .is_err()
                {
                    break;
                }
                tokio::time::sleep(period).await;
            }
        });
        Response::builder()
            .header("content-type", "text/event-stream")
            .header("cache-control", "no-store")
            .body(body)
            .unwrap_or_else(|_| json_response(500, &json!({"error": "building the answer"})))
    }

    /// Answers one non-`CONNECT` request.
    fn route(&self, req: &RequestHead, body: &[u8]) -> (u16, Value) {
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
            ("POST", ["v1", "deploy"]) => self.deploy(body),
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

    /// `CONNECT node:port`: a byte pipe to the node through the cluster daemon's relay, once
    /// hyper has handed over the connection.
    async fn connect(
        self: Arc<Self>,
        mut req: Request<Incoming>,
        head: RequestHead,
    ) -> Response<ResBody> {
        let target = match parse_connect_target(&head.target) {
            Ok(t) => t,
            Err(e) => return json_response(400, &json!({ "error": e })),
        };
        if target.1 != CONNECT_PORT {
            return json_response(
                403,
                &json!({ "error": format!(
                    "CONNECT {}: only a node's client port {CONNECT_PORT} is reachable",
                    head.target
                ) }),
            );
        }
        let run_dir = self.cfg.run_dir.clone();
        let (node, port) = target.clone();
        let relay = tokio::task::spawn_blocking(move || {
            let relay = cluster::relay(&run_dir, &node, port)?;
            relay.set_read_timeout(None).map_err(ClusterError::Io)?;
            relay.set_nonblocking(true).map_err(ClusterError::Io)?;
            tokio::net::UnixStream::from_std(relay).map_err(ClusterError::Io)
        })
        .await;
        let relay = match relay {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                return json_response(
                    502,
                    &json!({ "error": format!("CONNECT {}: {e}", head.target) }),
                );
            }
            Err(e) => return json_response(500, &json!({ "error": e.to_string() })),
        };
        let upgrade = hyper::upgrade::on(&mut req);
        let limits = self.cfg.limits.relay;
        // A relay's client may stay silent up to the idle limit, as its writes may wait.
        if let Some(stall) = req.extensions().get::<http::WriteStall>() {
            let ms = limits.idle.as_millis().min(u128::from(u64::MAX)) as u64;
            stall
                .0
                .store(ms.max(http::WRITE_STALL_MS), Ordering::Relaxed);
        }
        tokio::spawn(async move {
            let Ok(client) = upgrade.await else {
                return;
            };
            // Bounded: idle and total time (`FrontendLimits::relay`).
            let end = http::pipe(hyper_util::rt::TokioIo::new(client), relay, limits).await;
            log::debug!("front-end: CONNECT {} ended: {end:?}", head.target);
        });
        let mut ok = Response::new(http::full(Vec::new()));
        *ok.status_mut() = hyper::StatusCode::OK;
        ok
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

#[cfg(test)]
mod tests;
