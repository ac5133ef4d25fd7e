//! The front-end's HTTP layer on `hyper` (HTTP/1.1) and `tokio`: the library parses requests,
//! writes answers, streams bodies and hands over `CONNECT` tunnels; this module adds the
//! front-end's own limits around it.
//!
//! - The head: at most [`super::HEAD_MAX`] bytes (hyper's read buffer; 431 beyond) and
//!   [`HEADERS_MAX`] lines (431), within the head deadline (408, answered here because hyper
//!   closes silently), then the [`Service::gate`] (method, target form, header bytes, access
//!   rule, body framing) before any body byte is read.
//! - The body: only with `Content-Length` (`Transfer-Encoding` is 501), at most
//!   [`super::BODY_MAX`] (413), the whole request within the request deadline (408).
//! - One request per connection (`Connection: close`): a connection's limits are its request's.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Body, Frame, Incoming};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde_json::{Value, json};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;

use crate::cluster::relay::{PipeEnd, PipeLimits};

/// Most header lines.
pub const HEADERS_MAX: usize = 100;

/// An answer's body: whole, or a stream (server-sent events).
pub type ResBody = BoxBody<Bytes, Infallible>;
/// A boxed future of a handler.
pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The request line and headers as the gate and the access rule see them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestHead {
    pub method: String,
    /// As sent: a path and query, or `node:port` for `CONNECT`.
    pub target: String,
    /// Names lower-cased, values visible ASCII.
    pub headers: Vec<(String, String)>,
}

impl RequestHead {
    /// The head of a request hyper parsed; 400 when a header value is not visible ASCII.
    pub fn of<B>(req: &Request<B>) -> Result<RequestHead, HttpError> {
        let mut headers = Vec::with_capacity(req.headers().len());
        for (name, value) in req.headers() {
            let value = value
                .to_str()
                .map_err(|_| http_err(400, format!("bad value of header {name}")))?;
            headers.push((name.as_str().to_string(), value.trim().to_string()));
        }
        Ok(RequestHead {
            method: req.method().as_str().to_string(),
            target: req.uri().to_string(),
            headers,
        })
    }

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

/// Why a request is refused: its status and message (answered as `{"error": message}`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpError {
    pub status: u16,
    pub message: String,
}

pub fn http_err(status: u16, message: impl Into<String>) -> HttpError {
    HttpError {
        status,
        message: message.into(),
    }
}

/// What the connection layer needs from the front-end.
pub trait Service: Send + Sync + 'static {
    /// Judges a head before any body is read: an `Err` is answered and nothing else happens.
    fn gate(&self, head: &RequestHead) -> Result<(), HttpError>;
    /// Answers a request that passed the gate; its body is not read yet ([`read_body`]).
    fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
        head: RequestHead,
    ) -> BoxFuture<Response<ResBody>>;
    /// The head's and the whole request's deadlines.
    fn deadlines(&self) -> (Duration, Duration);
    /// The head passed the gate (a source's connection stops counting as pending).
    fn admitted(&self) {}
}

/// The checks every head passes before the access rule: what hyper accepts but the front-end
/// does not (a lower-case method, an absolute-form target, framing it will not read).
pub fn check_form(head: &RequestHead) -> Result<(), HttpError> {
    let m = &head.method;
    if m.is_empty() || m.len() > 16 || !m.bytes().all(|b| b.is_ascii_uppercase()) {
        return Err(http_err(400, format!("bad method {m:?}")));
    }
    if head.method == "CONNECT" {
        if head.header("content-length").is_some_and(|l| l != "0")
            || head.header("transfer-encoding").is_some()
        {
            return Err(http_err(400, "CONNECT takes no body"));
        }
    } else if !head.target.starts_with('/') {
        return Err(http_err(
            400,
            format!("bad request target {:?}", head.target),
        ));
    }
    Ok(())
}

/// The framing checks after the access rule: no `Transfer-Encoding`, a `Content-Length` within
/// [`super::BODY_MAX`] (hyper has refused malformed and conflicting ones).
pub fn check_body_framing(head: &RequestHead) -> Result<(), HttpError> {
    if head.header("transfer-encoding").is_some() {
        return Err(http_err(
            501,
            "Transfer-Encoding is not supported; send a Content-Length",
        ));
    }
    if let Some(l) = head.header("content-length") {
        let n: u64 = l
            .parse()
            .map_err(|_| http_err(400, format!("bad Content-Length {l:?}")))?;
        if n > super::BODY_MAX as u64 {
            return Err(http_err(
                413,
                format!("body of {n} bytes is over the limit of {}", super::BODY_MAX),
            ));
        }
    }
    Ok(())
}

/// When a request's body must have arrived (the connection's start plus the request deadline;
/// an answer that takes longer, a deploy, is not cut off: only reading is bounded).
#[derive(Clone, Copy, Debug)]
pub struct BodyDeadline(pub tokio::time::Instant);

/// Reads a request's body (at most [`super::BODY_MAX`]) within its [`BodyDeadline`].
pub async fn read_body(req: Request<Incoming>) -> Result<Bytes, HttpError> {
    let deadline = req.extensions().get::<BodyDeadline>().map_or_else(
        || tokio::time::Instant::now() + super::REQUEST_DEADLINE,
        |d| d.0,
    );
    let limited = Limited::new(req.into_body(), super::BODY_MAX);
    match tokio::time::timeout_at(deadline, limited.collect()).await {
        Err(_) => Err(http_err(408, "request timed out")),
        Ok(Err(e)) => {
            if e.is::<http_body_util::LengthLimitError>() {
                Err(http_err(
                    413,
                    format!("body over the limit of {}", super::BODY_MAX),
                ))
            } else {
                Err(http_err(400, format!("reading the request's body: {e}")))
            }
        }
        Ok(Ok(c)) => Ok(c.to_bytes()),
    }
}

/// A whole JSON answer.
pub fn json_response(status: u16, body: &Value) -> Response<ResBody> {
    let mut text = serde_json::to_vec(body).unwrap_or_else(|_| b"{}".to_vec());
    text.push(b'\n');
    let mut r = Response::builder()
        .status(StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR))
        .header("content-type", "application/json")
        .header("cache-control", "no-store");
    if status == 401 {
        r = r.header("www-authenticate", "Bearer realm=\"unipeer front-end\"");
    }
    r.body(full(text))
        .unwrap_or_else(|_| Response::new(full(Vec::new())))
}

/// `{"error": message}` with `status`.
pub fn error_response(e: &HttpError) -> Response<ResBody> {
    json_response(e.status, &json!({ "error": e.message }))
}

pub fn full(bytes: impl Into<Bytes>) -> ResBody {
    Full::new(bytes.into()).boxed()
}

/// A body fed by a channel: each message is one chunk (one server-sent event); it ends when the
/// sender is dropped, and the sender sees the receiver gone when the client leaves.
pub struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|m| m.map(|b| Ok(Frame::data(b))))
    }
}

/// A streamed answer and the sender that feeds it (`capacity` chunks buffered).
pub fn channel_body(capacity: usize) -> (mpsc::Sender<Bytes>, ResBody) {
    let (tx, rx) = mpsc::channel(capacity);
    (tx, ChannelBody { rx }.boxed())
}

/// hyper's HTTP/1.1 server settings for one connection.
fn builder() -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    b.keep_alive(false)
        .half_close(true)
        .max_buf_size(super::HEAD_MAX.max(8192))
        .max_headers(HEADERS_MAX)
        .timer(TokioTimer::new());
    b
}

/// Serves one connection: one request through `service`. The head must arrive within the
/// service's head deadline: after it, 408 and the connection ends.
pub async fn serve_connection<S, IO>(io: IO, service: Arc<S>)
where
    S: Service,
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (head_deadline, request_deadline) = service.deadlines();
    let start = tokio::time::Instant::now();
    let head_seen = Arc::new(AtomicBool::new(false));
    let seen = head_seen.clone();
    let body_deadline = BodyDeadline(start + request_deadline);
    let stall = WriteStall(Arc::new(AtomicU64::new(WRITE_STALL_MS)));
    let stall_of_request = stall.clone();
    let svc = hyper::service::service_fn(move |mut req: Request<Incoming>| {
        seen.store(true, Ordering::SeqCst);
        req.extensions_mut().insert(body_deadline);
        req.extensions_mut().insert(stall_of_request.clone());
        let service = service.clone();
        async move {
            let head = match RequestHead::of(&req) {
                Ok(h) => h,
                Err(e) => return Ok::<_, Infallible>(error_response(&e)),
            };
            if let Err(e) = check_form(&head).and_then(|_| service.gate(&head)) {
                return Ok(error_response(&e));
            }
            service.admitted();
            Ok(service.handle(req, head).await)
        }
    });
    let mut conn = builder()
        .serve_connection(TokioIo::new(StallGuard::new(io, stall)), svc)
        .with_upgrades();
    let deadline = start + head_deadline;
    tokio::select! {
        _ = &mut conn => return,
        _ = tokio::time::sleep_until(deadline) => {}
    }
    if head_seen.load(Ordering::SeqCst) {
        let _ = conn.await;
        return;
    }
    // No head in time: answer 408 on the bare connection (hyper would close silently).
    let Some(parts) = conn.into_parts() else {
        return;
    };
    let mut io = parts.io.into_inner().io;
    let body = b"{\"error\":\"request head timed out\"}\n";
    let answer = format!(
        "HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n",
        body.len()
    );
    let write = async {
        io.write_all(answer.as_bytes()).await?;
        io.write_all(body).await?;
        io.shutdown().await
    };
    let _ = tokio::time::timeout(Duration::from_secs(1), write).await;
    drain(&mut io).await;
}

/// How long one write may wait for a client that does not read, unless raised (a `CONNECT`
/// relay raises it to its idle limit).
pub const WRITE_STALL_MS: u64 = 10_000;

/// The write-stall bound of a request's connection, milliseconds (a request extension).
#[derive(Clone, Debug)]
pub struct WriteStall(pub Arc<AtomicU64>);

/// A connection whose writes fail when they wait longer than its [`WriteStall`]: a client
/// that stops reading cannot hold an answer, an event stream or a relay open.
pub struct StallGuard<IO> {
    io: IO,
    bound: WriteStall,
    stalled_since: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<IO> StallGuard<IO> {
    fn new(io: IO, bound: WriteStall) -> Self {
        StallGuard {
            io,
            bound,
            stalled_since: None,
        }
    }

    /// `Ready(Err)` once a pending write has waited too long; arms the timer on the first
    /// pending poll, disarms on progress.
    fn check(&mut self, pending: bool, cx: &mut Context<'_>) -> Poll<std::io::Error> {
        if !pending {
            self.stalled_since = None;
            return Poll::Pending;
        }
        let bound = Duration::from_millis(self.bound.0.load(Ordering::Relaxed));
        let timer = self
            .stalled_since
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(bound)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the client stopped reading",
            )),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for StallGuard<IO> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for StallGuard<IO> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        match self.check(r.is_pending(), cx) {
            Poll::Ready(e) => Poll::Ready(Err(e)),
            Poll::Pending => r,
        }
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let r = Pin::new(&mut self.io).poll_flush(cx);
        match self.check(r.is_pending(), cx) {
            Poll::Ready(e) => Poll::Ready(Err(e)),
            Poll::Pending => r,
        }
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Reads and drops what a client still sends for a short while, so that closing the
/// connection does not reset it under an answer it has not read.
async fn drain<IO: AsyncRead + Unpin>(io: &mut IO) {
    let mut sink = [0u8; 4096];
    let mut total = 0usize;
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        while total < super::BODY_MAX {
            match io.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    })
    .await;
}

/// Answers `503 {"error": "busy: why"}` to whatever request arrives within a second, then
/// closes (a connection over a cap).
pub async fn refuse_busy<IO>(io: IO, why: String)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let answer = json!({ "error": format!("busy: {why}") });
    let svc = hyper::service::service_fn(move |_req: Request<Incoming>| {
        let a = answer.clone();
        async move { Ok::<_, Infallible>(json_response(503, &a)) }
    });
    let mut b = builder();
    b.header_read_timeout(Duration::from_secs(1));
    let conn = b.serve_connection(TokioIo::new(io), svc);
    let _ = tokio::time::timeout(Duration::from_secs(2), conn).await;
}

/// Pipes bytes both ways until both sides closed, nothing moved for `limits.idle`, or
/// `limits.total` passed.
pub async fn pipe<A, B>(a: A, b: B, limits: PipeLimits) -> PipeEnd
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    let last_ms = AtomicU64::new(0);
    let touch = || last_ms.store(start.elapsed().as_millis() as u64, Ordering::Relaxed);
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let forward = async {
        copy_until_eof(&mut ar, &mut bw, &touch).await;
    };
    let backward = async {
        copy_until_eof(&mut br, &mut aw, &touch).await;
    };
    let watchdog = async {
        loop {
            let idle_end = Duration::from_millis(last_ms.load(Ordering::Relaxed)) + limits.idle;
            let end = idle_end.min(limits.total);
            let now = start.elapsed();
            if now >= end {
                return if now >= limits.total {
                    PipeEnd::TotalTime
                } else {
                    PipeEnd::Idle
                };
            }
            tokio::time::sleep(end - now).await;
        }
    };
    tokio::select! {
        _ = async { tokio::join!(forward, backward) } => PipeEnd::Closed,
        end = watchdog => end,
    }
}

async fn copy_until_eof<R, W>(r: &mut R, w: &mut W, touch: &(dyn Fn() + Sync))
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        touch();
        if w.write_all(&buf[..n]).await.is_err() {
            break;
        }
        touch();
    }
    let _ = w.shutdown().await;
}
