//! The front-end's client, for the Application Agent: [`Frontend`] calls one front-end's API,
//! [`pick_nearest`] chooses among several by round-trip time and the applications their images
//! offer.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

use serde::de::DeserializeOwned;

use super::{DeployAnswer, DeployRequest, FrontendInfo, HEAD_MAX, NodeEntry};

/// How long connecting to a front-end may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long one read or write of an ordinary call may wait.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a deploy (VMs booting) or a restart may take.
pub const DEPLOY_TIMEOUT: Duration = Duration::from_secs(300);
/// Largest answer body read.
const ANSWER_MAX: usize = 16 << 20;

/// Why a call to a front-end failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientError {
    pub url: String,
    /// The HTTP status when the front-end answered with an error.
    pub status: Option<u16>,
    pub message: String,
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.status {
            Some(s) => write!(f, "front-end {}: {s}: {}", self.url, self.message),
            None => write!(f, "front-end {}: {}", self.url, self.message),
        }
    }
}

impl std::error::Error for ClientError {}

/// One front-end, e.g. `Frontend::new("http://127.0.0.1:7700")`. Its API token is read for
/// every call from `UNIPEER_FRONTEND_TOKEN` or the token file the front-end wrote
/// ([`super::access::find_token`]), unless one was given ([`Frontend::with_token`]).
#[derive(Clone, PartialEq, Eq)]
pub struct Frontend {
    pub url: String,
    token: Option<String>,
}

impl fmt::Debug for Frontend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Frontend")
            .field("url", &self.url)
            .finish_non_exhaustive()
    }
}

impl Frontend {
    pub fn new(url: impl Into<String>) -> Frontend {
        Frontend {
            url: url.into(),
            token: None,
        }
    }

    /// A front-end whose token the caller knows.
    pub fn with_token(url: impl Into<String>, token: impl Into<String>) -> Frontend {
        Frontend {
            url: url.into(),
            token: Some(token.into()),
        }
    }

    /// The `Authorization` header line for `authority`, if a token is known.
    fn authorization(&self, authority: &str) -> String {
        self.token
            .clone()
            .or_else(|| super::access::find_token(&super::access::token_dir(), authority))
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default()
    }

    fn err(&self, status: Option<u16>, message: impl Into<String>) -> ClientError {
        ClientError {
            url: self.url.clone(),
            status,
            message: message.into(),
        }
    }

    /// `host:port` of the URL (`http://host:port[/]`; the port defaults to 80).
    fn authority(&self) -> Result<String, ClientError> {
        let rest = self
            .url
            .strip_prefix("http://")
            .ok_or_else(|| self.err(None, "only http:// URLs are supported"))?;
        let auth = rest.split('/').next().unwrap_or("");
        if auth.is_empty() {
            return Err(self.err(None, "no host in the URL"));
        }
        Ok(if auth.contains(':') && !auth.ends_with(']') {
            auth.to_string()
        } else {
            format!("{auth}:80")
        })
    }

    /// A connection with timeouts set.
    fn open(&self, timeout: Duration) -> Result<(TcpStream, String), ClientError> {
        let auth = self.authority()?;
        let addrs: Vec<SocketAddr> = auth
            .to_socket_addrs()
            .map_err(|e| self.err(None, format!("cannot resolve {auth}: {e}")))?
            .collect();
        let mut last = None;
        for a in &addrs {
            match TcpStream::connect_timeout(a, CONNECT_TIMEOUT) {
                Ok(s) => {
                    let io = |e: io::Error| self.err(None, e.to_string());
                    s.set_read_timeout(Some(timeout)).map_err(io)?;
                    s.set_write_timeout(Some(timeout)).map_err(io)?;
                    let _ = s.set_nodelay(true);
                    return Ok((s, auth));
                }
                Err(e) => last = Some(e),
            }
        }
        Err(self.err(
            None,
            match last {
                Some(e) => format!("cannot connect: {e}"),
                None => format!("{auth} resolves to no address"),
            },
        ))
    }

    /// One request; answers the body of a 200, an error otherwise.
    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<Vec<u8>, ClientError> {
        let (mut s, auth) = self.open(timeout)?;
        let body = body.unwrap_or_default();
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {auth}\r\nAccept: application/json\r\n\
             Connection: close\r\nContent-Length: {}\r\n{}",
            body.len(),
            self.authorization(&auth)
        );
        if method == "POST" {
            req.push_str("Content-Type: application/json\r\n");
        }
        req.push_str("\r\n");
        let io = |e: io::Error| self.err(None, format!("{method} {path}: {e}"));
        s.write_all(req.as_bytes()).map_err(io)?;
        s.write_all(body).map_err(io)?;
        let (status, head_len, mut data) = read_head(&mut s).map_err(io)?;
        let length = content_length(&data[..head_len]);
        data.drain(..head_len);
        match length {
            Some(n) if n > ANSWER_MAX => {
                return Err(self.err(Some(status), format!("answer of {n} bytes is too large")));
            }
            Some(n) => {
                while data.len() < n {
                    let mut chunk = vec![0u8; (n - data.len()).min(64 * 1024)];
                    let got = s.read(&mut chunk).map_err(io)?;
                    if got == 0 {
                        return Err(self.err(Some(status), "answer cut short"));
                    }
                    data.extend_from_slice(&chunk[..got]);
                }
                data.truncate(n);
            }
            None => {
                (&mut s)
                    .take((ANSWER_MAX - data.len().min(ANSWER_MAX)) as u64)
                    .read_to_end(&mut data)
                    .map_err(io)?;
            }
        }
        if status != 200 {
            let message = serde_json::from_slice::<serde_json::Value>(&data)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&data).trim().to_string());
            return Err(self.err(Some(status), format!("{method} {path}: {message}")));
        }
        Ok(data)
    }

    fn call_json<T: DeserializeOwned>(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        timeout: Duration,
    ) -> Result<T, ClientError> {
        let data = self.call(method, path, body, timeout)?;
        serde_json::from_slice(&data)
            .map_err(|e| self.err(Some(200), format!("{method} {path}: bad answer: {e}")))
    }

    /// `GET /v1/info`.
    pub fn info(&self) -> Result<FrontendInfo, ClientError> {
        self.call_json("GET", "/v1/info", None, CALL_TIMEOUT)
    }

    /// `POST /v1/dashboard/login`: the URL that signs a browser in to the dashboard once
    /// (its code lives a minute).
    pub fn dashboard_url(&self) -> Result<String, ClientError> {
        let v: serde_json::Value =
            self.call_json("POST", "/v1/dashboard/login", Some(b"{}"), CALL_TIMEOUT)?;
        let path = v["path"]
            .as_str()
            .ok_or_else(|| self.err(Some(200), "the sign-in answer has no path"))?;
        Ok(format!("{}{path}", self.url.trim_end_matches('/')))
    }

    /// `GET /v1/nodes`: every node of the cluster.
    pub fn nodes(&self) -> Result<Vec<NodeEntry>, ClientError> {
        self.call_json("GET", "/v1/nodes", None, CALL_TIMEOUT)
    }

    /// `POST /v1/deploy`: `count` VMs of `image` on this front-end's server, once all are
    /// ready (up to [`DEPLOY_TIMEOUT`]).
    pub fn deploy(
        &self,
        image: &str,
        count: usize,
        memory_mb: Option<u32>,
    ) -> Result<DeployAnswer, ClientError> {
        let body = serde_json::to_vec(&DeployRequest {
            image: image.into(),
            count,
            memory_mb,
            accel: None,
        })
        .expect("requests serialise");
        self.call_json("POST", "/v1/deploy", Some(&body), DEPLOY_TIMEOUT)
    }

    /// `POST /v1/nodes/{node}/kill`.
    pub fn kill(&self, node: &str) -> Result<(), ClientError> {
        self.call(
            "POST",
            &format!("/v1/nodes/{node}/kill"),
            None,
            CALL_TIMEOUT,
        )
        .map(|_| ())
    }

    /// `POST /v1/nodes/{node}/restart`: answers the node's spawn-to-ready milliseconds.
    pub fn restart(&self, node: &str) -> Result<f64, ClientError> {
        let v: serde_json::Value = self.call_json(
            "POST",
            &format!("/v1/nodes/{node}/restart"),
            None,
            DEPLOY_TIMEOUT,
        )?;
        Ok(v.get("ready_ms").and_then(|r| r.as_f64()).unwrap_or(0.0))
    }

    /// `CONNECT node:port`: a TCP stream that carries bytes to and from TCP `port` of `node`,
    /// positioned right after the front-end's blank line. Its timeouts are cleared: the caller
    /// sets its own.
    pub fn connect(&self, node: &str, port: u16) -> Result<TcpStream, ClientError> {
        let (mut s, auth) = self.open(CALL_TIMEOUT)?;
        let target = format!("{node}:{port}");
        let io = |e: io::Error| self.err(None, format!("CONNECT {target}: {e}"));
        let head = format!(
            "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{}\r\n",
            self.authorization(&auth)
        );
        s.write_all(head.as_bytes()).map_err(io)?;
        // Byte by byte: the node's first bytes must stay in the stream.
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            if head.len() >= HEAD_MAX {
                return Err(self.err(None, format!("CONNECT {target}: answer head too long")));
            }
            match s.read(&mut byte) {
                Ok(0) => {
                    return Err(self.err(None, format!("CONNECT {target}: connection closed")));
                }
                Ok(_) => head.push(byte[0]),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(io(e)),
            }
        }
        let status = parse_status(&head)
            .ok_or_else(|| self.err(None, format!("CONNECT {target}: bad answer")))?;
        if status != 200 {
            let mut body = Vec::new();
            let _ = (&mut s).take(64 * 1024).read_to_end(&mut body);
            let message = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&body).trim().to_string());
            return Err(self.err(Some(status), format!("CONNECT {target}: {message}")));
        }
        s.set_read_timeout(None).map_err(io)?;
        s.set_write_timeout(None).map_err(io)?;
        Ok(s)
    }
}

/// Reads until the end of an answer's head; answers the status, the head's length and every
/// byte read so far.
fn read_head(s: &mut impl Read) -> io::Result<(u16, usize, Vec<u8>)> {
    let mut data = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(i) = data.windows(4).position(|w| w == b"\r\n\r\n") {
            let status = parse_status(&data[..i + 4])
                .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad HTTP answer"))?;
            return Ok((status, i + 4, data));
        }
        if data.len() > HEAD_MAX {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "HTTP answer head too long",
            ));
        }
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed before the answer",
            ));
        }
        data.extend_from_slice(&chunk[..n]);
    }
}

fn parse_status(head: &[u8]) -> Option<u16> {
    let text = std::str::from_utf8(head).ok()?;
    let mut words = text.lines().next()?.split(' ');
    if !words.next()?.starts_with("HTTP/1.") {
        return None;
    }
    words.next()?.parse().ok()
}

fn content_length(head: &[u8]) -> Option<usize> {
    let text = std::str::from_utf8(head).ok()?;
    text.lines().skip(1).find_map(|l| {
        let (n, v) = l.split_once(':')?;
        n.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse().ok())
            .flatten()
    })
}

/// Measures each front-end's round-trip time (the median of three `GET /v1/info`), drops those
/// that do not answer or whose images do not offer every application in `need_apps` (together,
/// over all their images), and answers the one with the lowest time, with that time. The
/// front-ends are measured in parallel. The error names every URL and why it was dropped.
pub fn pick_nearest(urls: &[String], need_apps: &[String]) -> Result<(Frontend, Duration), String> {
    if urls.is_empty() {
        return Err("no front-end given".into());
    }
    let measured: Vec<Result<Duration, String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = urls
            .iter()
            .map(|url| scope.spawn(move || measure(&Frontend::new(url.clone()), need_apps)))
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err("the measuring thread failed".into()))
            })
            .collect()
    });
    let mut best: Option<(usize, Duration)> = None;
    let mut why = Vec::new();
    for (i, m) in measured.into_iter().enumerate() {
        match m {
            Ok(rtt) if best.is_none_or(|(_, b)| rtt < b) => best = Some((i, rtt)),
            Ok(_) => {}
            Err(e) => why.push(format!("{}: {e}", urls[i])),
        }
    }
    match best {
        Some((i, rtt)) => Ok((Frontend::new(urls[i].clone()), rtt)),
        None => Err(format!("no front-end fits: {}", why.join("; "))),
    }
}

/// The median of three `info` round trips, if the front-end offers `need_apps`.
fn measure(fe: &Frontend, need_apps: &[String]) -> Result<Duration, String> {
    let mut rtts = Vec::with_capacity(3);
    let mut info = None;
    for _ in 0..3 {
        let start = Instant::now();
        let i = fe.info().map_err(|e| match e.status {
            Some(s) => format!("answered {s}: {}", e.message),
            None => format!("does not answer: {}", e.message),
        })?;
        rtts.push(start.elapsed());
        info = Some(i);
    }
    rtts.sort();
    let offered = info.map(|i| i.apps()).unwrap_or_default();
    let missing: Vec<&str> = need_apps
        .iter()
        .filter(|a| !offered.contains(a))
        .map(String::as_str)
        .collect();
    if !missing.is_empty() {
        return Err(format!(
            "its images do not offer {} (they offer: {})",
            missing.join(", "),
            if offered.is_empty() {
                "nothing".to_string()
            } else {
                offered.join(", ")
            }
        ));
    }
    Ok(rtts[1])
}
