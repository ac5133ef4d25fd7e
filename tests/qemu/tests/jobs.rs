//! Fault-tolerant jobs in real VMs, driven the way a user drives them: a front-end
//! (`unipeer frontend`) deploys 6 VMs from two images with different application sets, and
//! Application Agents (`unipeer submit`) run a `wordcount` over a few MB and a `primes` job at
//! once, with authentication and sealing on. When 25–75 % of the primes tasks are final
//! (read from the AA's own progress lines, not timed), two VMs are killed with SIGKILL while
//! both jobs run; both must finish with results equal to the host-computed reference. Then an AA is killed
//! mid-job and `submit --resume` finishes the job; a malformed manifest and an unknown
//! application fail cleanly.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use unipeer::cluster;
use unipeer::frontend::client::Frontend;
use unipeer::job::client::JobClient;
use unipeer::job::sample::text;
use unipeer::vm;
use unipeer_node::jobs::client::CLIENT_PORT;
use unipeer_qemu_tests::{exclusive, image, run_dir, unipeer_bin, wc_image};

fn scaled(d: Duration) -> Duration {
    d.mul_f64(vm::timeout_scale())
}

/// Everything a test started, stopped on drop (also when it fails).
struct Env {
    dir: PathBuf,
    frontend: Option<Child>,
    url: String,
    children: Vec<Child>,
}

impl Drop for Env {
    fn drop(&mut self) {
        for c in self.children.iter_mut().chain(self.frontend.as_mut()) {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = cluster::down(&self.dir);
    }
}

impl Env {
    fn start(test: &str) -> Env {
        // A free port for the front-end's API (another run may hold any fixed one).
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free loopback port");
        let dir = run_dir(test);
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
            dir,
            frontend: Some(frontend),
            url,
            children: Vec::new(),
        };
        let fe = Frontend::new(&env.url);
        let start = Instant::now();
        while fe.info().is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "the front-end did not answer: {}",
                env.log("frontend.log")
            );
            if let Some(Ok(Some(st))) = env.frontend.as_mut().map(Child::try_wait) {
                panic!("the front-end exited ({st}): {}", env.log("frontend.log"));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        env
    }

    fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.join(name)).unwrap_or_default()
    }

    /// `unipeer submit` with this environment's front-end, authority and state directory.
    fn submit(&self, args: &[&str], log: &str) -> Command {
        let mut c = Command::new(unipeer_bin());
        c.arg("submit")
            .args(args)
            .args([
                "--frontend",
                &self.url,
                "--json-progress",
                "--poll-ms",
                "250",
            ])
            .arg("--ca")
            .arg(self.dir.join("authority"))
            .arg("--state-dir")
            .arg(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(self.dir.join(log)).unwrap());
        c
    }
}

fn write(dir: &Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p
}

/// Reads an AA's JSON lines on a thread; the test sees them through a channel.
fn lines(child: &mut Child) -> mpsc::Receiver<serde_json::Value> {
    let out = child.stdout.take().expect("piped stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if let Ok(v) = serde_json::from_str::<serde_json::Value>(&line)
                && tx.send(v).is_err()
            {
                return;
            }
        }
    });
    rx
}

fn wait_exit(child: &mut Child, within: Duration) -> std::process::ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return st;
        }
        if start.elapsed() > within {
            let _ = child.kill();
            panic!("the AA did not finish within {within:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The last summary line an AA printed.
fn summary(rx: &mpsc::Receiver<serde_json::Value>) -> Option<serde_json::Value> {
    rx.try_iter()
        .filter_map(|v| v.get("summary").cloned())
        .last()
}

#[test]
fn jobs_survive_killed_vms_and_a_killed_agent() {
    let _guard = exclusive();
    let (all, wc) = (image(), wc_image());
    let mut env = Env::start("jobs");
    let fe = Frontend::new(&env.url);

    // 3 VMs with every application, 3 with wordcount + sha256 only: primes tasks that land on
    // the latter are delegated.
    let a = fe
        .deploy(&all.manifest.name, 3, Some(64))
        .unwrap_or_else(|e| panic!("deploy: {e}\n{}", env.log("frontend.log")));
    let b = fe
        .deploy(&wc.manifest.name, 3, Some(64))
        .unwrap_or_else(|e| panic!("deploy: {e}\n{}", env.log("frontend.log")));
    assert_eq!(a.nodes.len() + b.nodes.len(), 6);
    let st = cluster::status(&env.dir, false).unwrap();
    assert_eq!(st.nodes.len(), 6);

    // Inputs: 3 MB of text in two files; a primes job of 48 ranges.
    let data = env.dir.join("data");
    std::fs::create_dir_all(&data).unwrap();
    std::fs::write(data.join("a.txt"), text(1, 250_000)).unwrap();
    std::fs::write(data.join("b.txt"), text(2, 130_000)).unwrap();
    let images = format!("[\"{}\", \"{}\"]", all.manifest.name, wc.manifest.name);
    let wc_job = write(
        &env.dir,
        "wc.toml",
        &format!(
            "name = \"wc\"\nimages = {images}\napplication = \"wordcount\"\n\
             [requirements]\nvms = 6\nmemory_mb = 64\n\
             [tasks]\nfiles = [\"data/a.txt\", \"data/b.txt\"]\nchunk_bytes = 65536\nreducers = 4\n"
        ),
    );
    let primes_job = write(
        &env.dir,
        "primes.toml",
        &format!(
            "name = \"primes\"\nimages = {images}\napplication = \"primes\"\n\
             [requirements]\nvms = 6\nmemory_mb = 64\napplications = [\"primes\"]\n\
             [tasks]\nrange = {{ start = 1000000000, end = 1009600000, step = 200000 }}\n"
        ),
    );
    let total_bytes = std::fs::metadata(data.join("a.txt")).unwrap().len()
        + std::fs::metadata(data.join("b.txt")).unwrap().len();
    assert!(total_bytes > 2_000_000, "a few MB of input: {total_bytes}");

    // The primes job (48 steady tasks) paces the test; the wordcount job starts once primes is
    // 10 % done; two VMs (one of each image, neither AA's gateway) are killed once primes passes
    // 25 % and the wordcount has reported progress without finishing. The kill waits for both
    // (and says so) but no later than primes at 75 %: past that the test fails.
    let mut pr_aa = env
        .submit(&[primes_job.to_str().unwrap(), "--check"], "primes.log")
        .spawn()
        .unwrap();
    let pr_rx = lines(&mut pr_aa);
    let deadline = Instant::now() + scaled(Duration::from_secs(240));
    let mut wc: Option<(Child, mpsc::Receiver<serde_json::Value>)> = None;
    let mut wc_last: Option<serde_json::Value> = None;
    let mut killed = Vec::new();
    let mut at_kill = None;
    let mut wc_at_kill = None;
    let mut deferred = 0u32;
    while killed.is_empty() {
        assert!(
            Instant::now() < deadline,
            "primes progress never reached 25 %: {}",
            env.log("primes.log")
        );
        if let Ok(st) = pr_aa.try_wait() {
            assert!(
                st.is_none(),
                "the primes AA ended early: {}",
                env.log("primes.log")
            );
        }
        if let Some((_, rx)) = &wc {
            for v in rx.try_iter() {
                if v.get("progress").is_some() || v.get("summary").is_some() {
                    wc_last = Some(v);
                }
            }
        }
        assert!(
            wc_last.as_ref().is_none_or(|w| w.get("summary").is_none()),
            "the wordcount finished before the kill window opened: {wc_last:?}"
        );
        let Ok(v) = pr_rx.recv_timeout(Duration::from_secs(5)) else {
            continue;
        };
        let Some(p) = v.get("progress") else { continue };
        let total = p["total"].as_u64().unwrap();
        let finals = p["done"].as_u64().unwrap() + p["failed"].as_u64().unwrap();
        if wc.is_none() && finals * 10 >= total {
            let mut child = env
                .submit(&[wc_job.to_str().unwrap(), "--check"], "wc.log")
                .spawn()
                .unwrap();
            let rx = lines(&mut child);
            wc = Some((child, rx));
        }
        if finals * 4 < total {
            continue;
        }
        // The kill window: primes between 25 % and 75 % final, and the wordcount mid-way (its
        // records stored, not all done). Outside it the test defers the kill, and fails if the
        // window closes first: a kill after a job finished would prove nothing.
        assert!(
            finals * 4 <= total * 3,
            "the kill window closed at {finals}/{total} primes tasks without the wordcount mid-way \
             (last wordcount line: {wc_last:?}); deferred {deferred} times"
        );
        // (done, running, total) of the wordcount's last progress line.
        let wc_progress = wc_last.as_ref().and_then(|w| w.get("progress")).map(|p| {
            (
                p["done"].as_u64().unwrap(),
                p["running"].as_u64().unwrap(),
                p["total"].as_u64().unwrap(),
            )
        });
        if let Some((d, _, t)) = wc_progress {
            assert!(
                d < t,
                "the wordcount finished ({d}/{t}) before the kill window opened at {finals}/{total} primes tasks"
            );
        }
        // Mid-way: some of its tasks running or done (its records stored, executors at work).
        if wc_progress.is_none_or(|(d, r, t)| t == 0 || d + r == 0) {
            if deferred == 0 {
                eprintln!(
                    "kill deferred at {finals}/{total} primes tasks: the wordcount is not under way yet ({wc_progress:?})"
                );
            }
            deferred += 1;
            continue;
        }
        let mut gws = vec![v["gateway"].as_str().unwrap_or("").to_string()];
        if let Some(w) = &wc_last {
            gws.push(w["gateway"].as_str().unwrap_or("").to_string());
        }
        let victims: Vec<String> = [&a.nodes, &b.nodes]
            .iter()
            .map(|set| set.iter().find(|n| !gws.contains(n)).unwrap().clone())
            .collect();
        for n in &victims {
            cluster::kill(&env.dir, n).unwrap();
        }
        at_kill = Some((finals, total));
        wc_at_kill = wc_progress;
        killed = victims;
    }
    let (mut wc_aa, wc_rx) = wc.expect("the wordcount AA started");
    let (finals, total) = at_kill.unwrap();
    eprintln!(
        "killed {killed:?} at {finals}/{total} primes tasks final; wordcount (done, running, total) then: {wc_at_kill:?}; kill deferred {deferred} progress lines"
    );

    for (name, child, rx, log) in [
        ("primes", &mut pr_aa, &pr_rx, "primes.log"),
        ("wordcount", &mut wc_aa, &wc_rx, "wc.log"),
    ] {
        let status = wait_exit(child, scaled(Duration::from_secs(420)));
        let s = summary(rx);
        assert!(
            status.success(),
            "{name} failed ({status}): {}\nsummary: {s:?}",
            env.log(log)
        );
        let s = s.expect("a summary line");
        assert_eq!(
            s["reference_match"],
            serde_json::Value::Bool(true),
            "{name}: {s}"
        );
        assert!(s["failures"].as_array().unwrap().is_empty(), "{name}: {s}");
        eprintln!("{name}: {s}");
    }

    // The AA dies mid-job; `--resume` finishes the job from what the overlay holds.
    let sha_inputs = [1u64, 2, 3, 4, 5, 6]
        .iter()
        .map(|i| {
            let f = format!("data/s{i}.bin");
            std::fs::write(env.dir.join(&f), text(10 + i, 9000)).unwrap();
            format!("{{ params = \"\", inputs = [\"{f}\"] }}")
        })
        .collect::<Vec<_>>()
        .join(", ");
    let sha_job = write(
        &env.dir,
        "sha.toml",
        &format!(
            "name = \"sha\"\nimages = {images}\napplication = \"sha256\"\n\
             [requirements]\nvms = 4\nmemory_mb = 64\n\
             [tasks]\nlist = [{sha_inputs}]\n"
        ),
    );
    let mut aa = env
        .submit(&[sha_job.to_str().unwrap()], "sha-1.log")
        .spawn()
        .unwrap();
    let rx = lines(&mut aa);
    let job = loop {
        let v = rx
            .recv_timeout(scaled(Duration::from_secs(120)))
            .unwrap_or_else(|_| panic!("no progress from the sha AA: {}", env.log("sha-1.log")));
        if v.get("progress").is_some() {
            break v["job"].as_str().unwrap().to_string();
        }
    };
    aa.kill().unwrap();
    let _ = aa.wait();
    let mut resumed = env
        .submit(&["--resume", &job[..12], "--check"], "sha-2.log")
        .spawn()
        .unwrap();
    let rx2 = lines(&mut resumed);
    let status = wait_exit(&mut resumed, scaled(Duration::from_secs(300)));
    let s = summary(&rx2);
    assert!(
        status.success(),
        "resume failed ({status}): {}\n{s:?}",
        env.log("sha-2.log")
    );
    let s = s.unwrap();
    assert_eq!(s["job"].as_str(), Some(job.as_str()));
    assert_eq!(s["reference_match"], serde_json::Value::Bool(true), "{s}");
    env.children.push(resumed);

    // Garbage at a live node's client port and job channel: the connection is closed and
    // counted, and the node goes on serving.
    let st = cluster::status(&env.dir, false).unwrap();
    let live = st
        .nodes
        .iter()
        .find(|n| n.state == cluster::NodeState::Up)
        .expect("a live node")
        .name
        .clone();
    // A missing counter fails the test (read as 0 it would let a renamed one pass).
    let counter = |text: &str, key: &str| -> u64 {
        let v = text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("no {key} in the node's jobs report:\n{text}"));
        v.trim()
            .parse()
            .unwrap_or_else(|_| panic!("{key}={v} is not a number"))
    };
    let before = cluster::node_command(&env.dir, &live, "jobs").unwrap();
    let junk: [&[u8]; 3] = [
        &[0xff, 0xff, 0xff, 0xff, 1, 2, 3], // a frame longer than any allowed
        &[0, 0, 0, 5, b'h', b'e', b'l', b'l', b'o'], // a frame that is no message
        &[0, 0, 0, 3, 9, 9, 9],             // another version's bytes
    ];
    for (port, bytes) in junk
        .iter()
        .map(|b| (CLIENT_PORT, *b))
        .chain([(7001, &b"UJ\x07not a hello at all, not at all"[..])])
    {
        let mut s = cluster::relay(&env.dir, &live, port).unwrap();
        s.set_read_timeout(Some(scaled(Duration::from_secs(20))))
            .unwrap();
        let _ = s.write_all(bytes);
        let mut buf = [0u8; 64];
        let closed = matches!(s.read(&mut buf), Ok(0) | Err(_));
        assert!(
            closed,
            "{live}:{port} kept a connection that sent {bytes:?}"
        );
    }
    let after = cluster::node_command(&env.dir, &live, "jobs").unwrap();
    assert!(
        counter(&after, "client_bad_frames") >= counter(&before, "client_bad_frames") + 3,
        "bad client frames not counted:\n{after}"
    );
    assert!(
        counter(&after, "jobch_refused") + counter(&after, "jobch_bad_frames")
            > counter(&before, "jobch_refused") + counter(&before, "jobch_bad_frames"),
        "a bad job-channel hello not counted:\n{after}"
    );
    let store = unipeer::ca::AuthorityStore::open(&env.dir.join("authority")).unwrap();
    let cred = unipeer_node::auth::UserCredential {
        user: "demo".into(),
        psk: store.user_psk("demo").unwrap(),
    };
    let stream = cluster::relay(&env.dir, &live, CLIENT_PORT).unwrap();
    stream
        .set_read_timeout(Some(scaled(Duration::from_secs(20))))
        .unwrap();
    let mut c = JobClient::connect(stream, &cred).expect("the node still authenticates users");
    assert!(c.ping().unwrap().joined, "{live} still serves");

    // A malformed manifest: the line and the reason, no cluster work.
    let bad = write(&env.dir, "bad.toml", "name = \"x\"\napplication = 7\n");
    let out = env
        .submit(&[bad.to_str().unwrap()], "bad.log")
        .output()
        .unwrap();
    let err = env.log("bad.log");
    assert!(!out.status.success() && err.contains("line 2"), "{err}");
    // An application no image offers: refused before anything is stored.
    let unknown = write(
        &env.dir,
        "unknown.toml",
        &format!(
            "name = \"u\"\nimages = {images}\napplication = \"nope\"\n\
             [tasks]\nrange = {{ start = 0, end = 10, step = 5 }}\n"
        ),
    );
    let out = env
        .submit(&[unknown.to_str().unwrap()], "unknown.log")
        .output()
        .unwrap();
    let err = env.log("unknown.log");
    assert!(
        !out.status.success() && err.contains("nope"),
        "unknown application: {err}"
    );
}
