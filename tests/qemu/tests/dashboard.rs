//! The dashboard in a real browser: a front-end deploys 3 VMs and a `primes` job runs on them;
//! headless Chromium (Debian's `chromium`, driven over the DevTools protocol) signs in through
//! the one-time URL of `unipeer dashboard` and the test reads the rendered DOM: every node is
//! on the ring's list with its server's colour and joins; the job's task slices advance; a VM
//! killed through the front-end turns `down` (and shows as a kill fault) within a bound; the
//! page's JavaScript logged no error. A screenshot and the last reading of the page are saved
//! in `run/test-output/dashboard/` (`dashboard.png`, `page.json`).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use unipeer::cluster;
use unipeer::frontend::client::Frontend;
use unipeer::vm;
use unipeer_qemu_tests::{exclusive, image, run_dir, unipeer_bin};

fn scaled(d: Duration) -> Duration {
    d.mul_f64(vm::timeout_scale())
}

/// Everything the test started, stopped on drop (also when it fails).
struct Env {
    dir: PathBuf,
    children: Vec<Child>,
}

impl Drop for Env {
    fn drop(&mut self) {
        for c in self.children.iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = cluster::down(&self.dir);
    }
}

impl Env {
    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }
}

/// A DevTools-protocol session with one page: commands by id, events kept.
struct Page {
    ws: tungstenite::WebSocket<TcpStream>,
    next_id: u64,
    events: Vec<Value>,
}

impl Page {
    /// Sends `method` and waits (bounded) for its answer, keeping the events that come first.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        self.ws
            .send(tungstenite::Message::text(msg))
            .unwrap_or_else(|e| panic!("DevTools {method}: {e}"));
        let start = Instant::now();
        loop {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "DevTools {method}: no answer"
            );
            let m = match self.ws.read() {
                Ok(m) => m,
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue;
                }
                Err(e) => panic!("DevTools {method}: {e}"),
            };
            let Ok(text) = m.to_text() else { continue };
            let Ok(v) = serde_json::from_str::<Value>(text) else {
                continue;
            };
            if v["id"] == json!(id) {
                if let Some(err) = v.get("error") {
                    panic!("DevTools {method}: {err}");
                }
                return v["result"].clone();
            }
            if v.get("method").is_some() {
                self.events.push(v);
            }
        }
    }

    /// Evaluates `expr` in the page (awaiting a promise); its value (JSON-able).
    fn eval(&mut self, expr: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true, "awaitPromise": true}),
        );
        r["result"]["value"].clone()
    }

    /// The JavaScript errors seen: exceptions, `console.error`, error log entries.
    fn errors(&self) -> Vec<String> {
        self.events
            .iter()
            .filter_map(|e| match e["method"].as_str()? {
                "Runtime.exceptionThrown" => Some(e["params"]["exceptionDetails"].to_string()),
                "Runtime.consoleAPICalled" if e["params"]["type"] == "error" => {
                    Some(e["params"]["args"].to_string())
                }
                "Log.entryAdded" if e["params"]["entry"]["level"] == "error" => {
                    Some(e["params"]["entry"].to_string())
                }
                _ => None,
            })
            .collect()
    }
}

/// Starts headless Chromium with the DevTools protocol on a free port (the process joins
/// `env`'s, stopped on drop); answers a session with its page.
fn start_browser(env: &mut Env) -> Page {
    let dir = env.dir.clone();
    let child = Command::new("chromium")
        .args([
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--window-size=1400,1000",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
        ])
        .arg(format!("--user-data-dir={}", dir.join("chromium").display()))
        .arg("about:blank")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("chromium is required for this test: apt-get install chromium (scripts/setup.sh does it)");
    // "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/ID" on stderr.
    env.children.push(child);
    let (tx, rx) = std::sync::mpsc::channel();
    let err = env.children.last_mut().unwrap().stderr.take().unwrap();
    let log_path = dir.join("chromium.log");
    std::thread::spawn(move || {
        let mut log = std::fs::File::create(log_path).ok();
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            if let Some(rest) = line.split("DevTools listening on ws://").nth(1) {
                let _ = tx.send(rest.split('/').next().unwrap_or("").to_string());
            }
            if let Some(l) = log.as_mut() {
                let _ = writeln!(l, "{line}");
            }
        }
    });
    let authority = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("chromium did not open its DevTools port");
    // The page target's WebSocket URL, from /json/list.
    let mut s = TcpStream::connect(&authority).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /json/list HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    // Chromium keeps the connection open: read the head, then Content-Length bytes.
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let start = Instant::now();
    let body = loop {
        assert!(start.elapsed() < Duration::from_secs(10), "/json/list");
        let n = s.read(&mut buf).expect("/json/list answer");
        assert!(n > 0, "/json/list: closed");
        out.extend_from_slice(&buf[..n]);
        let text = String::from_utf8_lossy(&out).to_string();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(0);
            if body.len() >= length {
                break body.to_string();
            }
        }
    };
    let out = String::from_utf8_lossy(&out).to_string();
    let body = body.as_str();
    let targets: Value = serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {out}"));
    let ws_url = targets
        .as_array()
        .and_then(|a| a.iter().find(|t| t["type"] == "page"))
        .and_then(|t| t["webSocketDebuggerUrl"].as_str())
        .unwrap_or_else(|| panic!("no page target: {body}"))
        .to_string();
    let stream = TcpStream::connect(&authority).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(1)))
        .unwrap();
    let (ws, _) = tungstenite::client(ws_url.as_str(), stream).expect("DevTools WebSocket");
    let mut page = Page {
        ws,
        next_id: 0,
        events: Vec::new(),
    };
    for domain in ["Runtime.enable", "Log.enable", "Page.enable"] {
        page.call(domain, json!({}));
    }
    page
}

/// Standard base64 (a screenshot from the DevTools protocol).
fn base64_decode(text: &str) -> Vec<u8> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let digits: Vec<u32> = text.bytes().filter_map(value).collect();
    let mut out = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, d)| acc | (d << (18 - 6 * i)));
        let bytes = [(n >> 16) as u8, (n >> 8) as u8, n as u8];
        out.extend_from_slice(&bytes[..chunk.len().saturating_sub(1)]);
    }
    out
}

/// What the page shows: the ring's list, the servers' colours, the job's slices run, faults.
const READ_PAGE: &str = r#"JSON.stringify({
  nodes: [...document.querySelectorAll('#ring-nodes li')].map((li) => ({
    name: li.dataset.node, server: li.dataset.server, state: li.dataset.state, colour: li.dataset.colour,
    id: li.dataset.overlayId })),
  servers: Object.fromEntries([...document.querySelectorAll('#servers td[data-server]')].map(
    (td) => [td.dataset.server, td.dataset.colour])),
  works_run: Number(document.getElementById('jobs-progress').dataset.worksRun || -1),
  faults: [...document.querySelectorAll('#faults tbody tr')].map((tr) => tr.innerText),
  errors: document.getElementById('errors').textContent,
})"#;

fn read_page(page: &mut Page) -> Value {
    let text = page.eval(READ_PAGE);
    serde_json::from_str(text.as_str().unwrap_or("{}")).unwrap_or(Value::Null)
}

/// Polls the page until `done` holds, at most `within`; answers the last reading.
fn wait_page(
    page: &mut Page,
    within: Duration,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let start = Instant::now();
    loop {
        let v = read_page(page);
        if done(&v) {
            return v;
        }
        assert!(
            start.elapsed() < within,
            "{what}: not within {within:?}; the page shows {v}"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
fn the_dashboard_shows_the_ring_a_job_and_a_killed_vm() {
    let _guard = exclusive();
    let all = image();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port");
    let dir = run_dir("dashboard");
    std::fs::create_dir_all(&dir).unwrap();
    let url = format!("http://127.0.0.1:{port}");
    let frontend = Command::new(unipeer_bin())
        .arg("--run-dir")
        .arg(&dir)
        .args(["frontend", "--listen", &format!("127.0.0.1:{port}")])
        .arg("--ca")
        .arg(dir.join("authority"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("frontend.log")).unwrap())
        .spawn()
        .expect("start unipeer frontend");
    let mut env = Env {
        dir: dir.clone(),
        children: vec![frontend],
    };
    let fe = Frontend::new(&url);
    let start = Instant::now();
    while fe.info().is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the front-end did not answer: {}",
            env.log("frontend.log")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let deployed = fe
        .deploy(&all.manifest.name, 3, Some(64))
        .unwrap_or_else(|e| panic!("deploy: {e}\n{}", env.log("frontend.log")));
    assert_eq!(deployed.nodes.len(), 3);

    // A primes job of 24 steady tasks, followed by its AA in the background.
    let job = dir.join("primes.toml");
    std::fs::write(
        &job,
        format!(
            "name = \"primes\"\nimages = [\"{}\"]\napplication = \"primes\"\n\
             [requirements]\nvms = 3\nmemory_mb = 64\n\
             [tasks]\nrange = {{ start = 1000000000, end = 1004800000, step = 200000 }}\n",
            all.manifest.name
        ),
    )
    .unwrap();
    let aa = Command::new(unipeer_bin())
        .arg("submit")
        .arg(&job)
        .args(["--frontend", &url, "--json-progress", "--poll-ms", "250"])
        .arg("--ca")
        .arg(dir.join("authority"))
        .arg("--state-dir")
        .arg(&dir)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(dir.join("aa.out")).unwrap())
        .stderr(std::fs::File::create(dir.join("aa.log")).unwrap())
        .spawn()
        .unwrap();
    env.children.push(aa);

    // The browser signs in through the one-time URL `unipeer dashboard` prints.
    let sign_in = Command::new(unipeer_bin())
        .args(["dashboard", "--frontend", &url])
        .output()
        .unwrap();
    assert!(sign_in.status.success(), "{sign_in:?}");
    let login = String::from_utf8(sign_in.stdout)
        .unwrap()
        .trim()
        .to_string();
    assert!(login.starts_with(&format!("{url}/login?code=")), "{login}");
    let mut page = start_browser(&mut env);
    page.call("Page.navigate", json!({"url": login}));

    // Every node on the ring, joined, coloured by its server.
    let names: Vec<String> = cluster::status(&dir, false)
        .unwrap()
        .nodes
        .iter()
        .map(|n| n.name.clone())
        .collect();
    let v = wait_page(
        &mut page,
        scaled(Duration::from_secs(60)),
        "every node joined",
        |v| {
            let nodes = v["nodes"].as_array().cloned().unwrap_or_default();
            nodes.len() == names.len() && nodes.iter().all(|n| n["state"] == "joined")
        },
    );
    for n in v["nodes"].as_array().unwrap() {
        let name = n["name"].as_str().unwrap();
        assert!(names.iter().any(|x| x == name), "{name} is not a node: {v}");
        let server = n["server"].as_str().unwrap();
        assert_eq!(n["colour"], v["servers"][server], "{name}'s colour: {v}");
        assert!(
            n["colour"].as_str().is_some_and(|c| c.starts_with('#')),
            "{v}"
        );
    }

    // The hover's links: a node's leaf set names the other nodes' overlay ids (asked the way
    // the page asks, with its session cookie).
    let first_node = v["nodes"][0]["name"].as_str().unwrap().to_string();
    let links = page.eval(&format!(
        "fetch('/v1/dashboard/node/{first_node}').then((r) => r.text())"
    ));
    let links: Value = serde_json::from_str(links.as_str().unwrap_or("{}")).unwrap_or_default();
    let others: Vec<&str> = v["nodes"].as_array().unwrap()[1..]
        .iter()
        .filter_map(|n| n["id"].as_str())
        .collect();
    assert!(
        links["leaf_set"].as_array().is_some_and(|l| l
            .iter()
            .any(|id| others.contains(&id.as_str().unwrap_or("")))),
        "{first_node}'s leaf set names none of {others:?}: {links}"
    );

    // The job's task slices advance.
    let first = wait_page(
        &mut page,
        scaled(Duration::from_secs(60)),
        "tasks run",
        |v| v["works_run"].as_i64().unwrap_or(-1) > 0,
    )["works_run"]
        .as_i64()
        .unwrap();
    wait_page(
        &mut page,
        scaled(Duration::from_secs(60)),
        "the slices advance",
        |v| v["works_run"].as_i64().unwrap_or(-1) > first,
    );

    // A VM killed through the front-end turns down, and the kill is listed as a fault.
    let victim = deployed.nodes[1].clone();
    fe.kill(&victim).unwrap();
    let killed = Instant::now();
    wait_page(
        &mut page,
        Duration::from_secs(10),
        "the killed VM shows down",
        |v| {
            v["nodes"].as_array().is_some_and(|a| {
                a.iter()
                    .any(|n| n["name"] == json!(victim) && n["state"] == "down")
            })
        },
    );
    eprintln!("{victim} showed down {:?} after the kill", killed.elapsed());
    let v = wait_page(&mut page, Duration::from_secs(10), "the kill fault", |v| {
        v["faults"].as_array().is_some_and(|f| {
            f.iter().any(|r| {
                r.as_str()
                    .is_some_and(|t| t.contains("kill") && t.contains(&victim))
            })
        })
    });

    let shot = page.call("Page.captureScreenshot", json!({"format": "png"}));
    let png = base64_decode(shot["data"].as_str().unwrap_or(""));
    assert!(png.starts_with(b"\x89PNG"), "not a PNG screenshot");
    // Kept outside the run directory, which the cluster's clean-up removes.
    let out = unipeer::image::repo_root().join("run/test-output/dashboard");
    std::fs::create_dir_all(&out).unwrap();
    std::fs::write(out.join("dashboard.png"), &png).unwrap();
    std::fs::write(out.join("page.json"), v.to_string()).unwrap();
    eprintln!("screenshot: {}", out.join("dashboard.png").display());

    assert_eq!(v["errors"], "", "the page reported an error");
    let errors = page.errors();
    assert!(errors.is_empty(), "JavaScript errors: {errors:#?}");
}
