//! The host's surfaces as another local user tries them (issue 10, findings 1, 2 and 5): a real
//! front-end (`unipeer frontend`, trust on) deploys 2 VMs, then user `nobody` (uid 65534,
//! through `setpriv`) talks to the API without the token, with a foreign `Origin` and a bad
//! `Host`, tries the dashboard without a session, tries `CONNECT n1:7002`, reads the run
//! directory, the token file and the VMs' files, and connects to `cluster.sock`, `switch.sock` and a QMP socket. The owner's own client checks
//! the limits, the modes of everything `up` made, and that the launch-config blobs are gone once
//! the VMs are ready (also after a restart). One cluster serves every case.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use unipeer::cluster;
use unipeer::frontend::access;
use unipeer::frontend::client::Frontend;
use unipeer_qemu_tests::{exclusive, image, run_dir, unipeer_bin};

const NOBODY: &[&str] = &["--reuid=65534", "--regid=65534", "--clear-groups", "--"];

struct Env {
    dir: PathBuf,
    frontend: Child,
}

impl Drop for Env {
    fn drop(&mut self) {
        let _ = self.frontend.kill();
        let _ = self.frontend.wait();
        let _ = cluster::down(&self.dir);
    }
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

/// Runs `args` as nobody; answers (success, stdout, stderr).
fn as_nobody(args: &[&str], input: &[u8]) -> (bool, String, String) {
    let mut child = Command::new("setpriv")
        .args(NOBODY)
        .args(["timeout", "10"])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("setpriv");
    let _ = child.stdin.take().unwrap().write_all(input);
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// An HTTP head sent by nobody; answers the status of the reply (0: none).
fn nobody_http(port: u16, head: &str) -> (u16, String) {
    let (_, out, err) = as_nobody(
        &["nc", "-N", "127.0.0.1", &port.to_string()],
        head.as_bytes(),
    );
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, format!("{out}{err}"))
}

/// The same from this (the owner's) process, with the token.
fn owner_http(port: u16, head: &str) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(head.as_bytes()).unwrap();
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).unwrap_or(0);
    let out = String::from_utf8_lossy(&buf[..n]).into_owned();
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, out)
}

#[test]
fn another_local_user_cannot_use_the_hosts_surfaces() {
    if !is_root() || !Path::new("/usr/bin/setpriv").exists() {
        eprintln!("skipped: needs root and setpriv to act as user nobody");
        return;
    }
    let _one = exclusive();
    let img = image();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap();
    let dir = run_dir("host-surfaces");
    let log =
        std::env::temp_dir().join(format!("unipeer-host-surfaces-{}.log", std::process::id()));
    let frontend = Command::new(unipeer_bin())
        .arg("--run-dir")
        .arg(&dir)
        .args(["frontend", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--max-vms", "3", "--relay-idle-s", "1"])
        .arg("--ca")
        .arg(dir.join("authority"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .expect("start unipeer frontend");
    let mut env = Env {
        dir: dir.clone(),
        frontend,
    };
    let url = format!("http://127.0.0.1:{port}");
    let fe = Frontend::new(&url);
    let start = Instant::now();
    while fe.info().is_err() {
        let log = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "no answer: {log}"
        );
        if let Ok(Some(st)) = env.frontend.try_wait() {
            panic!("the front-end exited ({st}): {log}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }

    // The token: 0600 in a 0700 directory; nobody cannot read it.
    let token_path = access::token_file(
        &access::token_dir(),
        format!("127.0.0.1:{port}").parse().unwrap(),
    );
    assert_eq!(mode(&token_path), 0o600, "token file");
    assert_eq!(mode(&access::token_dir()), 0o700, "token directory");
    let (ok, out, err) = as_nobody(&["cat", &token_path.display().to_string()], b"");
    assert!(
        !ok && out.is_empty() && err.contains("Permission denied"),
        "{out} {err}"
    );

    // Nobody at the API: no token → 401; a foreign Origin → 403; a rebound Host → 400.
    let host = format!("127.0.0.1:{port}");
    let (status, text) = nobody_http(
        port,
        &format!("GET /v1/info HTTP/1.1\r\nHost: {host}\r\n\r\n"),
    );
    assert_eq!(status, 401, "{text}");
    let (status, text) = nobody_http(
        port,
        &format!(
            "POST /v1/deploy HTTP/1.1\r\nHost: {host}\r\nOrigin: http://evil.example\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\n{{}}"
        ),
    );
    assert_eq!(status, 403, "{text}");
    let (status, text) = nobody_http(
        port,
        &format!("GET /v1/info HTTP/1.1\r\nHost: evil.example:{port}\r\n\r\n"),
    );
    assert_eq!(status, 400, "{text}");
    // Nobody at the dashboard: no page, no state, no events, no sign-in code, and a guessed
    // code is refused.
    for head in [
        format!("GET / HTTP/1.1\r\nHost: {host}\r\n\r\n"),
        format!("GET /v1/dashboard/events HTTP/1.1\r\nHost: {host}\r\n\r\n"),
        format!(
            "GET /v1/dashboard/state HTTP/1.1\r\nHost: {host}\r\nCookie: unipeer_fe_{port}=00\r\n\r\n"
        ),
        format!(
            "GET /login?code=00000000000000000000000000000000 HTTP/1.1\r\nHost: {host}\r\n\r\n"
        ),
        format!(
            "POST /v1/dashboard/login HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{{}}"
        ),
    ] {
        let (status, text) = nobody_http(port, &head);
        assert_eq!(status, 401, "{head}: {text}");
    }

    // The owner deploys 2 VMs; over the limits is refused.
    let deployed = fe
        .deploy(&img.manifest.name, 2, Some(64))
        .unwrap_or_else(|e| {
            panic!(
                "deploy: {e}\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            )
        });
    assert_eq!(deployed.nodes, ["n1", "n2"]);
    let e = fe.deploy(&img.manifest.name, 2, Some(64)).unwrap_err();
    assert_eq!(e.status, Some(429), "{e}");
    let e = fe.deploy(&img.manifest.name, 1, Some(4096)).unwrap_err();
    assert_eq!(e.status, Some(400), "{e}");

    // CONNECT: nobody gets 401 at any port; the owner gets 403 at 7002 and a pipe at 7003.
    let (status, text) = nobody_http(
        port,
        "CONNECT n1:7002 HTTP/1.1\r\nHost: n1:7002\r\n\r\nstats\n",
    );
    assert_eq!(status, 401, "{text}");
    assert!(!text.contains("overlay_id"), "{text}");
    let token = std::fs::read_to_string(&token_path)
        .unwrap()
        .trim()
        .to_string();
    let (status, text) = owner_http(
        port,
        &format!(
            "CONNECT n1:7002 HTTP/1.1\r\nHost: n1:7002\r\nAuthorization: Bearer {token}\r\n\r\nstats\n"
        ),
    );
    assert_eq!(status, 403, "{text}");
    assert!(!text.contains("overlay_id"), "{text}");
    // The client port passes, and a silent relay is closed after --relay-idle-s 1.
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    s.write_all(
        format!(
            "CONNECT n1:7003 HTTP/1.1\r\nHost: n1:7003\r\nAuthorization: Bearer {token}\r\n\r\n"
        )
        .as_bytes(),
    )
    .unwrap();
    let opened = Instant::now();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    let lived = opened.elapsed();
    let text = String::from_utf8_lossy(&got);
    assert!(text.starts_with("HTTP/1.1 200"), "{text}");
    assert!(
        lived >= Duration::from_millis(900) && lived < Duration::from_secs(5),
        "an idle relay lived {lived:?} (idle limit 1 s)"
    );

    // What `up` made: 0700 directories, 0600 files and sockets, no launch configs.
    let vms = dir.join("vms");
    assert_eq!(mode(&dir), 0o700, "run directory");
    assert_eq!(mode(&vms), 0o700, "vms/");
    for f in ["cluster.sock", "switch.sock", "cluster.json", "daemon.log"] {
        assert_eq!(mode(&dir.join(f)), 0o600, "{f}");
    }
    for n in ["n1", "n2"] {
        assert_eq!(mode(&vms.join(format!("{n}.qmp"))), 0o600, "{n}.qmp");
        assert_eq!(
            mode(&vms.join(format!("{n}.serial.log"))),
            0o600,
            "{n}.serial.log"
        );
        assert!(
            !vms.join(format!("{n}.config")).exists(),
            "{n}.config left behind"
        );
    }

    // Nobody can neither read the run directory nor reach a socket in it.
    let (ok, _, err) = as_nobody(&["ls", &vms.display().to_string()], b"");
    assert!(!ok && err.contains("Permission denied"), "{err}");
    for sock in [
        dir.join("cluster.sock"),
        dir.join("switch.sock"),
        vms.join("n1.qmp"),
    ] {
        let (ok, out, err) = as_nobody(
            &["nc", "-N", "-U", &sock.display().to_string()],
            b"{\"op\":\"hello\"}\n{\"execute\":\"qmp_capabilities\"}\n",
        );
        assert!(!ok && out.is_empty(), "{}: {out}", sock.display());
        assert!(
            err.contains("Permission denied"),
            "{}: {err}",
            sock.display()
        );
    }

    // A restart writes the blob again and removes it again once the VM is ready.
    fe.restart("n1").unwrap();
    assert!(
        !vms.join("n1.config").exists(),
        "n1.config left behind after a restart"
    );
    assert_eq!(mode(&vms.join("n1.qmp")), 0o600, "n1.qmp after a restart");
    drop(env);
}
