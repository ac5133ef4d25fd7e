//! The front-end's HTTP parser, its answers without a cluster, and the client against fake
//! front-ends on loopback. No root, no QEMU.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::thread;
use std::time::Duration;

use super::client::{Frontend, pick_nearest};
use super::*;

/// The token of the in-memory front-end of these tests.
fn test_token() -> String {
    "k".repeat(64)
}

/// A front-end's state over a run directory with no cluster, token [`test_token`], port 7700.
fn test_shared() -> Arc<Shared> {
    let run_dir = std::env::temp_dir().join(format!("unipeer-frontend-mem-{}", std::process::id()));
    Arc::new(Shared::new(
        access::AccessRule::new(test_token(), 7700, &[]),
        FrontendConfig {
            listen: "127.0.0.1:7700".parse().unwrap(),
            server: "s1".into(),
            run_dir: run_dir.clone(),
            daemon_exe: "/nonexistent/unipeer".into(),
            accel: AccelChoice::Tcg,
            ca_store: None,
            replicas: None,
            token_dir: run_dir.join("tokens"),
            allow_hosts: Vec::new(),
            limits: limits::FrontendLimits::default(),
        },
    ))
}

/// `Host` and the token of the in-memory front-end.
fn mem_auth() -> String {
    format!(
        "Host: 127.0.0.1:7700\r\nAuthorization: Bearer {}\r\n",
        test_token()
    )
}

/// Sends `bytes` to `service` over an in-memory connection (then closes the sending side)
/// and answers (status, body); status 0: closed without an answer.
async fn exchange_with<S: http::Service>(service: Arc<S>, bytes: Vec<u8>) -> (u16, String) {
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let task = tokio::spawn(http::serve_connection(server, service));
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = client.write_all(&bytes).await;
    let _ = client.shutdown().await;
    let mut out = Vec::new();
    let _ = client.read_to_end(&mut out).await;
    let _ = task.await;
    let out = String::from_utf8_lossy(&out).to_string();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

/// [`exchange_with`] the in-memory front-end, on a runtime whose clock jumps to the next timer.
fn exchange(bytes: &[u8]) -> (u16, String) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(exchange_with(test_shared(), bytes.to_vec()))
}

fn status(bytes: &[u8]) -> u16 {
    exchange(bytes).0
}

#[test]
fn the_head_view_reads_path_query_and_headers() {
    let head = RequestHead {
        method: "GET".into(),
        target: "/v1/nodes?x=1&probe".into(),
        headers: vec![("x-y".into(), "z".into())],
    };
    assert_eq!(head.path(), "/v1/nodes");
    assert_eq!(head.query("x"), Some("1"));
    assert_eq!(head.query("probe"), Some(""));
    assert_eq!(head.query("nope"), None);
    assert_eq!(head.header("x-y"), Some("z"));
    assert_eq!(
        parse_connect_target("n3:7003").unwrap(),
        ("n3".into(), 7003)
    );
    for bad in ["n3", "n3:0", "n3:+1", "../x:7003", "n3:99999"] {
        assert!(parse_connect_target(bad).is_err(), "{bad}");
    }
    // A good request passes the whole layer (no cluster: an empty node list).
    let (s, body) = exchange(format!("GET /v1/nodes HTTP/1.1\r\n{}\r\n", mem_auth()).as_bytes());
    assert_eq!((s, body.trim()), (200, "[]"));
    let (s, _) = exchange(format!("GET /v1/nodes HTTP/1.0\r\n{}\r\n", mem_auth()).as_bytes());
    assert_eq!(s, 200);
}

#[test]
fn oversize_heads_are_refused() {
    let mut big = b"GET / HTTP/1.1\r\nX: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', HEAD_MAX + 10));
    big.extend_from_slice(b"\r\n\r\n");
    assert_eq!(status(&big), 431);
    // No end of head at all.
    let endless = vec![b'a'; HEAD_MAX * 2];
    assert_eq!(status(&endless), 431);
    let mut many = b"GET / HTTP/1.1\r\n".to_vec();
    for i in 0..200 {
        many.extend_from_slice(format!("h{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    assert_eq!(status(&many), 431);
}

#[test]
fn bad_request_lines_and_headers_are_400() {
    let auth = mem_auth();
    for bad in [
        b"GET /\r\n\r\n".to_vec(),
        format!("get /v1/info HTTP/1.1\r\n{auth}\r\n").into_bytes(),
        b"GET  / HTTP/1.1\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1 extra\r\n\r\n".to_vec(),
        b"GET /\x01 HTTP/1.1\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nno colon\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\nbad name: v\r\n\r\n".to_vec(),
        b"GET / HTTP/1.1\r\n folded: v\r\n\r\n".to_vec(),
        format!("GET /v1/info HTTP/1.1\r\n{auth}X: \u{ff}\r\n\r\n").into_bytes(),
        format!("GET http://x/v1/info HTTP/1.1\r\n{auth}\r\n").into_bytes(),
        // HTTP/2.0 in an HTTP/1 request line: hyper refuses the version as malformed.
        b"GET / HTTP/2.0\r\n\r\n".to_vec(),
    ] {
        let (s, body) = exchange(&bad);
        assert_eq!(s, 400, "{:?}: {body}", String::from_utf8_lossy(&bad));
    }
    // Closed before the head ended, or without a byte: no answer at all.
    assert_eq!(status(b"GET / HTTP/1.1\r\n"), 0);
    assert_eq!(status(b""), 0);
}

#[test]
fn content_length_is_checked() {
    let auth = mem_auth();
    let ct = "Content-Type: application/json\r\n";
    // Missing: no body (the deploy says what it needs).
    let (s, body) = exchange(format!("POST /v1/deploy HTTP/1.1\r\n{auth}{ct}\r\n").as_bytes());
    assert_eq!(s, 400);
    assert!(body.contains("needs a JSON body"), "{body}");
    let too_big = format!(
        "POST /v1/deploy HTTP/1.1\r\n{auth}{ct}Content-Length: {}\r\n\r\n",
        BODY_MAX + 1
    );
    assert_eq!(status(too_big.as_bytes()), 413);
    let huge =
        format!("POST / HTTP/1.1\r\n{auth}{ct}Content-Length: 99999999999999999999999\r\n\r\n");
    assert_eq!(status(huge.as_bytes()), 400);
    for bad in ["abc", "-1", "+5", "1 2", ""] {
        let t = format!("POST / HTTP/1.1\r\n{auth}{ct}Content-Length: {bad}\r\n\r\n");
        assert_eq!(status(t.as_bytes()), 400, "{bad:?}");
    }
    let conflict =
        format!("POST / HTTP/1.1\r\n{auth}{ct}Content-Length: 1\r\nContent-Length: 2\r\n\r\nab");
    assert_eq!(status(conflict.as_bytes()), 400);
    let short = format!("POST /v1/deploy HTTP/1.1\r\n{auth}{ct}Content-Length: 10\r\n\r\nabc");
    assert_eq!(status(short.as_bytes()), 400);
    let chunked =
        format!("POST /v1/deploy HTTP/1.1\r\n{auth}{ct}Transfer-Encoding: chunked\r\n\r\n");
    assert_eq!(status(chunked.as_bytes()), 501);
    let connect_body = format!("CONNECT n1:7003 HTTP/1.1\r\n{auth}Content-Length: 3\r\n\r\nabc");
    assert_eq!(status(connect_body.as_bytes()), 400);
}

/// A front-end on loopback over a run directory with no cluster: its URL and token.
fn start_frontend() -> (String, String) {
    let run_dir = std::env::temp_dir().join(format!(
        "unipeer-frontend-test-{}-{:?}",
        std::process::id(),
        thread::current().id()
    ));
    let server = FrontendServer::bind(FrontendConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        server: "s1".into(),
        run_dir: run_dir.clone(),
        daemon_exe: "/nonexistent/unipeer".into(),
        accel: AccelChoice::Tcg,
        ca_store: None,
        replicas: None,
        token_dir: run_dir.join("tokens"),
        allow_hosts: Vec::new(),
        limits: limits::FrontendLimits::default(),
    })
    .unwrap();
    let addr = server.local_addr().unwrap();
    let token = String::from_utf8(std::fs::read(server.token_path()).unwrap())
        .unwrap()
        .trim()
        .to_string();
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(server.token_path())
        .unwrap()
        .permissions()
        .mode()
        & 0o777;
    assert_eq!(mode, 0o600, "the token file");
    thread::spawn(move || server.serve());
    (format!("http://{addr}"), token)
}

/// The headers a well-behaved client sends: Host and the token.
fn good_headers(url: &str, token: &str) -> String {
    format!(
        "Host: {}\r\nAuthorization: Bearer {token}\r\n",
        url.strip_prefix("http://").unwrap()
    )
}

/// Sends raw bytes, answers (status, body).
fn raw(url: &str, bytes: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(url.strip_prefix("http://").unwrap()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(bytes).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    (status, body)
}

#[test]
fn the_server_answers_errors_as_json_without_a_cluster() {
    let (url, token) = start_frontend();
    let fe = Frontend::with_token(url.clone(), token.clone());
    let h = good_headers(&url, &token);
    let info = fe.info().unwrap();
    assert_eq!(info.server, "s1");
    assert!(!info.cluster);
    assert_eq!((info.nodes, info.ready), (0, 0));
    assert!(fe.nodes().unwrap().is_empty());

    let post = |path: &str, body: &str| {
        raw(
            &url,
            format!(
                "POST {path} HTTP/1.1\r\n{h}Content-Type: application/json\r\n\
                 Content-Length: {}\r\n\r\n{body}",
                body.len()
            )
            .as_bytes(),
        )
    };
    for (body, want) in [
        ("{not json", 400),
        ("", 400),
        ("[1,2]", 400),
        ("{\"image\":\"default\",\"count\":0}", 400),
        ("{\"image\":\"default\",\"count\":1,\"bogus\":1}", 400),
        ("{\"image\":\"../x\",\"count\":1}", 400),
        ("{\"image\":\"no-such-image\",\"count\":1}", 400),
        ("{\"image\":\"default\",\"count\":1,\"accel\":\"xen\"}", 400),
        ("{\"image\":\"default\",\"count\":1,\"memory_mb\":1}", 400),
    ] {
        let (status, text) = post("/v1/deploy", body);
        assert_eq!(status, want, "{body}: {text}");
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert!(v["error"].is_string(), "{text}");
    }
    let e = fe.deploy("no-such-image", 1, None).unwrap_err();
    assert_eq!(e.status, Some(400), "{e}");
    assert_eq!(post("/v1/nodes/n1/kill", "").0, 409);
    assert_eq!(post("/v1/nodes/n..1/kill", "").0, 409);
    assert_eq!(post("/v1/nodes/n1/explode", "").0, 404);
    assert_eq!(post("/v1/info", "").0, 405);
    let get = |path: &str| raw(&url, format!("GET {path} HTTP/1.1\r\n{h}\r\n").as_bytes());
    let connect = |target: &str| {
        let head = format!(
            "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\nAuthorization: Bearer {token}\r\n\r\n"
        );
        raw(&url, head.as_bytes())
    };
    assert_eq!(get("/v1/deploy").0, 405);
    assert_eq!(get("/nope").0, 404);
    assert_eq!(get("http://x/v1/info").0, 400);
    assert_eq!(raw(&url, b"\x00\x01garbage\r\n\r\n").0, 400);
    assert_eq!(connect("n1").0, 400);
    assert_eq!(connect("n1:0").0, 400);
    // The client port passes the front-end (no cluster behind it: 502).
    assert_eq!(connect("n1:7003").0, 502);
    let e = fe.connect("n1", CONNECT_PORT).unwrap_err();
    assert_eq!(e.status, Some(502), "{e}");
    // Still serving after all that.
    assert!(fe.info().is_ok());
}

/// Finding 1: the API answers only our own token, our Host, no foreign Origin, JSON POSTs,
/// and CONNECT only to the client port (before: everything answered 200/502 to anyone).
#[test]
fn the_api_refuses_requests_without_token_foreign_origins_and_bad_hosts() {
    let (url, token) = start_frontend();
    let host = url.strip_prefix("http://").unwrap().to_string();
    let port = host.rsplit(':').next().unwrap().to_string();
    let send = |head: String| raw(&url, head.as_bytes());
    let auth = format!("Authorization: Bearer {token}\r\n");
    let get = |headers: &str| send(format!("GET /v1/info HTTP/1.1\r\n{headers}\r\n"));
    // No token, a wrong one, another scheme: 401, and the answer says where the token is.
    let (status, body) = get(&format!("Host: {host}\r\n"));
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("run/frontends"), "{body}");
    let zeros = "0".repeat(64);
    assert_eq!(
        get(&format!(
            "Host: {host}\r\nAuthorization: Bearer {zeros}\r\n"
        ))
        .0,
        401
    );
    assert_eq!(
        get(&format!("Host: {host}\r\nAuthorization: Basic {token}\r\n")).0,
        401
    );
    let e = Frontend::with_token(url.clone(), zeros).info().unwrap_err();
    assert_eq!(e.status, Some(401), "{e}");
    // Judged on the head: a body announced but never sent is not waited for.
    let start = std::time::Instant::now();
    let (status, _) = send(format!(
        "POST /v1/deploy HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n\
         Content-Length: 1000000\r\n\r\n"
    ));
    assert_eq!(status, 401);
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    // A cross-site page: a foreign Origin is 403 even with the token; our own origin passes.
    let origin = |o: &str| get(&format!("Host: {host}\r\n{auth}Origin: {o}\r\n")).0;
    assert_eq!(origin("http://evil.example"), 403);
    assert_eq!(origin("null"), 403);
    assert_eq!(origin(&format!("http://{host}")), 200);
    // DNS rebinding: a name that is not ours; no Host at all.
    assert_eq!(get(&format!("Host: evil.example:{port}\r\n{auth}")).0, 400);
    assert_eq!(get(&auth).0, 400);
    assert_eq!(get(&format!("Host: {host}\r\n{auth}")).0, 200);
    // A form post (text/plain) is not JSON: 415, before the deploy is looked at.
    let post = |content_type: &str, body: &str| {
        send(format!(
            "POST /v1/deploy HTTP/1.1\r\nHost: {host}\r\n{auth}Content-Type: {content_type}\r\n\
             Content-Length: {}\r\n\r\n{body}",
            body.len()
        ))
    };
    assert_eq!(
        post("text/plain", "{\"image\":\"default\",\"count\":1}").0,
        415
    );
    // CONNECT to the unauthenticated admin port (and any port but 7003) is refused.
    for target in ["n1:7002", "n1:7001", "n1:22"] {
        let (status, body) = send(format!(
            "CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{auth}\r\n"
        ));
        assert_eq!(status, 403, "{target}: {body}");
    }
    let e = Frontend::with_token(url.clone(), token.clone())
        .connect("n1", 7002)
        .unwrap_err();
    assert_eq!(e.status, Some(403), "{e}");
    // Without the token a CONNECT is 401 whatever its port.
    assert_eq!(
        send("CONNECT n1:7003 HTTP/1.1\r\nHost: n1:7003\r\n\r\n".into()).0,
        401
    );
    // Over the per-deploy memory bound (64 × 64 GiB was accepted before): refused before
    // the image is even looked at.
    let (status, body) = post(
        "application/json",
        "{\"image\":\"default\",\"count\":64,\"memory_mb\":65536}",
    );
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("per deploy"), "{body}");
}

/// A client that never finishes its head is answered 408 within the head deadline, and one
/// source cannot hold more than its share of not-yet-authenticated connections.
#[test]
fn slow_heads_time_out_and_one_source_cannot_hold_every_slot() {
    let (url, token) = start_frontend();
    let addr = url.strip_prefix("http://").unwrap().to_string();
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(HEAD_DEADLINE * 3)).unwrap();
    s.write_all(b"GET /v1/info HTTP/1.1\r\nHost: ").unwrap();
    let start = std::time::Instant::now();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let took = start.elapsed();
    assert!(out.starts_with("HTTP/1.1 408"), "{out:?}");
    assert!(
        took >= HEAD_DEADLINE - Duration::from_millis(300) && took < HEAD_DEADLINE * 2,
        "{took:?}"
    );

    // Silent connections from one source: the pending cap fills, the next is told busy.
    let silent: Vec<TcpStream> = (0..limits::PENDING_PER_SOURCE)
        .map(|_| TcpStream::connect(&addr).unwrap())
        .collect();
    let ask = || {
        let head = format!(
            "GET /v1/info HTTP/1.1\r\n{}\r\n",
            good_headers(&url, &token)
        );
        raw(&url, head.as_bytes())
    };
    // The acceptor admits in order: the first request after the silent ones is refused.
    let (status, body) = ask();
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("not sent a request"), "{body}");
    drop(silent);
    // Slots come back once the silent ones are gone.
    let start = std::time::Instant::now();
    while ask().0 != 200 {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the source's slots never came back"
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// A fake front-end answering `GET /v1/info` after `delay` with images offering `apps`;
/// `CONNECT` answers 200 and echoes.
fn fake_frontend(delay: Duration, apps: &[&str]) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let info = FrontendInfo {
        server: "s9".into(),
        run_dir: "/nowhere".into(),
        cluster: true,
        nodes: 1,
        ready: 1,
        images: vec![ImageEntry {
            name: "default".into(),
            apps: apps.iter().map(|a| a.to_string()).collect(),
        }],
    };
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut s) = conn else { continue };
            let info = info.clone();
            thread::spawn(move || {
                // A test fixture's reader: the head up to its blank line.
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && head.len() < HEAD_MAX {
                    match s.read(&mut byte) {
                        Ok(1) => head.push(byte[0]),
                        _ => return,
                    }
                }
                if head.starts_with(b"CONNECT ") {
                    s.write_all(b"HTTP/1.1 200 Connection established\r\n\r\nhi\n")
                        .unwrap();
                    let mut back = s.try_clone().unwrap();
                    let _ = std::io::copy(&mut s, &mut back);
                    return;
                }
                thread::sleep(delay);
                let body = serde_json::to_vec(&info).unwrap();
                let _ = write!(
                    s,
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(&body);
            });
        }
    });
    format!("http://{addr}")
}

#[test]
fn pick_nearest_takes_the_fastest_that_offers_the_apps() {
    let slow = fake_frontend(Duration::from_millis(120), &["wordcount", "primes"]);
    let fast = fake_frontend(Duration::from_millis(5), &["wordcount", "primes"]);
    let fastest_but_lacking = fake_frontend(Duration::ZERO, &["wordcount"]);
    let dead = {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        format!("http://{}", l.local_addr().unwrap())
    };
    let urls = vec![
        slow.clone(),
        dead.clone(),
        fastest_but_lacking.clone(),
        fast.clone(),
    ];
    let need = vec!["primes".to_string(), "wordcount".to_string()];
    let (fe, rtt) = pick_nearest(&urls, &need).unwrap();
    assert_eq!(fe.url, fast);
    assert!(
        rtt >= Duration::from_millis(5) && rtt < Duration::from_millis(120),
        "{rtt:?}"
    );

    // Without an application requirement the lacking one wins.
    let (fe, _) = pick_nearest(&urls, &[]).unwrap();
    assert_eq!(fe.url, fastest_but_lacking);

    // Nobody fits: the error names each URL and why.
    let err = pick_nearest(&[dead.clone(), fastest_but_lacking.clone()], &need).unwrap_err();
    assert!(
        err.contains(&dead) && err.contains("does not answer"),
        "{err}"
    );
    assert!(
        err.contains(&fastest_but_lacking) && err.contains("do not offer primes"),
        "{err}"
    );
    assert!(pick_nearest(&[], &need).is_err());
    assert!(pick_nearest(&["ftp://x".into()], &[]).is_err());
}

#[test]
fn client_connect_keeps_the_first_bytes() {
    let url = fake_frontend(Duration::ZERO, &[]);
    let mut s = Frontend::new(url).connect("n1", 7002).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut first = [0u8; 3];
    s.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"hi\n");
    s.write_all(b"stats\n").unwrap();
    let mut echo = [0u8; 6];
    s.read_exact(&mut echo).unwrap();
    assert_eq!(&echo, b"stats\n");
}

/// The real gate in front of a handler that only records what reached it.
struct Recorder {
    inner: Arc<Shared>,
    gated: std::sync::atomic::AtomicUsize,
    passed: std::sync::Mutex<Vec<RequestHead>>,
}

impl http::Service for Recorder {
    fn gate(&self, head: &RequestHead) -> Result<(), HttpError> {
        self.gated
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.inner.gate(head)
    }

    fn handle(
        self: Arc<Self>,
        _req: hyper::Request<hyper::body::Incoming>,
        head: RequestHead,
    ) -> http::BoxFuture<hyper::Response<http::ResBody>> {
        self.passed.lock().unwrap().push(head);
        Box::pin(async { http::json_response(200, &serde_json::json!({})) })
    }

    fn deadlines(&self) -> (Duration, Duration) {
        (Duration::from_millis(50), Duration::from_millis(100))
    }
}

/// Property test of the HTTP layer (hyper's parser, the front-end's gate and access rule) on
/// hostile input: mutated good requests and random bytes, sent whole and in pieces with pauses
/// between them (on a clock that jumps to the next timer), never panic, never hang, and every
/// request that reaches a handler carries the token. `FRONTEND_FUZZ_SEED` replays a run; the
/// seed is printed on failure.
#[test]
fn hostile_heads_never_panic_and_never_pass_without_the_token() {
    let seed: u64 = std::env::var("FRONTEND_FUZZ_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x5eed_f00d);
    let mut rng = seed | 1;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let token = test_token();
    let recorder = Arc::new(Recorder {
        inner: test_shared(),
        gated: Default::default(),
        passed: Default::default(),
    });
    let seeds: [&[u8]; 5] = [
        b"GET /v1/info HTTP/1.1\r\nHost: 127.0.0.1:7700\r\nAuthorization: Bearer kkkk\r\n\r\n",
        b"POST /v1/deploy HTTP/1.1\r\nHost: localhost:7700\r\nContent-Type: application/json\r\nContent-Length: 27\r\n\r\n{\"image\":\"a\",\"count\":1}xxxx",
        b"CONNECT n1:7003 HTTP/1.1\r\nHost: n1:7003\r\nOrigin: http://[::1]:7700\r\n\r\nhello",
        b"GET /v1/nodes?probe=1&x HTTP/1.0\r\nHost: [::1]:7700\r\nContent-Length: 0\r\n\r\n",
        b"POST /v1/nodes/n1/kill HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
    ];
    let alphabet =
        b"\r\n :/?&=[]{}\"0123456789GETPOSTCONNECTHTTP/1.Host:Origin:Bearer \x00\x7f\xff";
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    for round in 0..20_000u32 {
        let mut input: Vec<u8> = if round.is_multiple_of(10) {
            (0..next() % 300).map(|_| next() as u8).collect()
        } else {
            seeds[(next() % seeds.len() as u64) as usize].to_vec()
        };
        for _ in 0..(next() % 6) {
            if input.is_empty() {
                break;
            }
            let at = (next() % input.len() as u64) as usize;
            let b = alphabet[(next() % alphabet.len() as u64) as usize];
            match next() % 4 {
                0 => input[at] = b,
                1 => input.insert(at, b),
                2 => {
                    input.remove(at);
                }
                _ => {
                    let end = (at + (next() % 40) as usize).min(input.len());
                    let piece = input[at..end].to_vec();
                    input.splice(at..at, piece);
                }
            }
        }
        // Pieces of 1..64 bytes with pauses of 0..30 ms; a third of them never close.
        let mut pieces: Vec<(Vec<u8>, u64)> = Vec::new();
        let mut at = 0;
        while at < input.len() {
            let n = ((next() % 64 + 1) as usize).min(input.len() - at);
            pieces.push((input[at..at + n].to_vec(), next() % 30));
            at += n;
        }
        let keep_open = next().is_multiple_of(3);
        let run = || -> Result<(), String> {
            rt.block_on(async {
                let whole = exchange_with(recorder.clone(), input.clone());
                if tokio::time::timeout(Duration::from_secs(60), whole)
                    .await
                    .is_err()
                {
                    return Err("a whole request hung".to_string());
                }
                let (mut client, server) = tokio::io::duplex(64 * 1024);
                let task = tokio::spawn(http::serve_connection(server, recorder.clone()));
                let trickled = async {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    for (piece, pause_ms) in &pieces {
                        tokio::time::sleep(Duration::from_millis(*pause_ms)).await;
                        if client.write_all(piece).await.is_err() {
                            break;
                        }
                    }
                    if !keep_open {
                        let _ = client.shutdown().await;
                    }
                    let mut out = Vec::new();
                    let _ = client.read_to_end(&mut out).await;
                    let _ = task.await;
                };
                if tokio::time::timeout(Duration::from_secs(60), trickled)
                    .await
                    .is_err()
                {
                    return Err("a trickled request hung".to_string());
                }
                Ok(())
            })?;
            for head in recorder.passed.lock().unwrap().drain(..) {
                let _ = (
                    head.path(),
                    head.query("probe"),
                    parse_connect_target(&head.target),
                );
                // A browser's sign-in (its code is checked by the handler) is the only way in
                // without the token: no session exists here.
                let signing_in = head.method == "GET" && head.path() == "/login";
                if head.header("authorization") != Some(&format!("Bearer {token}")) && !signing_in {
                    return Err(format!("passed without the token: {head:?}"));
                }
            }
            Ok(())
        };
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(run)) {
            Ok(Ok(())) => {}
            Ok(Err(e)) => panic!(
                "seed {seed}, round {round}: {e}; input {:?}",
                String::from_utf8_lossy(&input)
            ),
            Err(_) => panic!(
                "seed {seed}, round {round}: panicked on {:?}",
                String::from_utf8_lossy(&input)
            ),
        }
    }
    // The mutations kept enough requests well-formed to reach the gate.
    let gated = recorder.gated.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        gated > 4_000,
        "only {gated} of 40000 sends reached the gate"
    );
}

/// The dashboard's sign-in: a one-time code (asked with the token) becomes an HttpOnly,
/// SameSite=Strict cookie that admits the dashboard's GETs and nothing else.
#[test]
fn the_dashboard_signs_a_browser_in_once_and_admits_only_its_pages() {
    let (url, token) = start_frontend();
    let host = url.strip_prefix("http://").unwrap().to_string();
    let port = host.rsplit(':').next().unwrap().to_string();
    let send = |head: String| raw(&url, head.as_bytes());
    // Without a session: 401 for the page, the script, the state and the events.
    for path in [
        "/",
        "/dashboard.js",
        "/v1/dashboard/state",
        "/v1/dashboard/events",
    ] {
        let (s, body) = send(format!("GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n"));
        assert_eq!(s, 401, "{path}: {body}");
    }
    // The token reads the state (what `unipeer dashboard` and tests use).
    let (s, body) = send(format!(
        "GET /v1/dashboard/state HTTP/1.1\r\n{}\r\n",
        good_headers(&url, &token)
    ));
    assert_eq!(s, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["cluster"], false);
    // A code: only with the token.
    let code_url = Frontend::with_token(url.clone(), token.clone())
        .dashboard_url()
        .unwrap();
    assert!(
        code_url.starts_with(&format!("{url}/login?code=")),
        "{code_url}"
    );
    let e = Frontend::with_token(url.clone(), "0".repeat(64))
        .dashboard_url()
        .unwrap_err();
    assert_eq!(e.status, Some(401));
    let path = code_url.strip_prefix(&url).unwrap().to_string();
    let login = |path: &str| {
        let mut s = TcpStream::connect(&host).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        write!(s, "GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n").unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).unwrap();
        out
    };
    // A wrong code, then the right one: a cookie and a redirect home.
    assert!(login("/login?code=00000000000000000000000000000000").starts_with("HTTP/1.1 401"));
    let answer = login(&path);
    assert!(answer.starts_with("HTTP/1.1 303"), "{answer}");
    let set_cookie = answer
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .unwrap()
        .to_string();
    assert!(set_cookie.contains("HttpOnly") && set_cookie.contains("SameSite=Strict"));
    let pair = set_cookie
        .split_once(':')
        .unwrap()
        .1
        .trim()
        .split(';')
        .next()
        .unwrap()
        .to_string();
    assert!(pair.starts_with(&format!("unipeer_fe_{port}=")), "{pair}");
    // Spent: the same code again is refused.
    assert!(login(&path).starts_with("HTTP/1.1 401"));
    let with_cookie = |method: &str, path: &str, extra: &str| {
        send(format!(
            "{method} {path} HTTP/1.1\r\nHost: {host}\r\nCookie: {pair}\r\n{extra}\r\n"
        ))
    };
    let (s, page) = with_cookie("GET", "/", "");
    assert_eq!(s, 200);
    assert!(page.contains("id=\"ring-nodes\""), "{page}");
    assert_eq!(with_cookie("GET", "/dashboard.js", "").0, 200);
    assert_eq!(with_cookie("GET", "/v1/dashboard/state", "").0, 200);
    // The cookie is not the API: no other endpoint, no POST, no CONNECT.
    assert_eq!(with_cookie("GET", "/v1/nodes", "").0, 401);
    assert_eq!(with_cookie("GET", "/v1/info", "").0, 401);
    let (s, _) = with_cookie(
        "POST",
        "/v1/deploy",
        "Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}",
    );
    assert_eq!(s, 401);
    assert_eq!(
        send(format!(
            "CONNECT n1:7003 HTTP/1.1\r\nHost: n1:7003\r\nCookie: {pair}\r\n\r\n"
        ))
        .0,
        401
    );
    // A page of another site cannot use it (the browser would not send it either:
    // SameSite=Strict), nor a rebound host name.
    assert_eq!(
        with_cookie(
            "GET",
            "/v1/dashboard/state",
            "Origin: http://evil.example\r\n"
        )
        .0,
        403
    );
    assert_eq!(
        send(format!(
            "GET / HTTP/1.1\r\nHost: evil.example:{port}\r\nCookie: {pair}\r\n\r\n"
        ))
        .0,
        400
    );
    // The event stream: a snapshot event first.
    let mut s = TcpStream::connect(&host).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /v1/dashboard/events HTTP/1.1\r\nHost: {host}\r\nCookie: {pair}\r\n\r\n"
    )
    .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&got).contains("\n\n") {
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "the stream ended: {}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let text = String::from_utf8_lossy(&got);
    assert!(text.contains("text/event-stream"), "{text}");
    assert!(text.contains("event: snapshot\ndata: {"), "{text}");
}

/// A client that asks for the event stream and never reads: its connection ends once a write
/// has waited [`http::WRITE_STALL_MS`] (on a clock that jumps to the next timer).
#[test]
fn a_client_that_stops_reading_loses_its_stream() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .unwrap();
    rt.block_on(async {
        use tokio::io::AsyncWriteExt;
        let (mut client, server) = tokio::io::duplex(1024);
        let task = tokio::spawn(http::serve_connection(server, test_shared()));
        let head = format!("GET /v1/dashboard/events HTTP/1.1\r\n{}\r\n", mem_auth());
        client.write_all(head.as_bytes()).await.unwrap();
        let started = tokio::time::Instant::now();
        tokio::time::timeout(Duration::from_secs(600), task)
            .await
            .expect("the stream outlived its stalled client")
            .unwrap();
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(http::WRITE_STALL_MS),
            "{took:?}"
        );
        drop(client);
    });
}
