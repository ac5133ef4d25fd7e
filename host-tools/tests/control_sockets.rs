//! The host's control sockets against another local user: the cluster daemon's `cluster.sock`
//! and the switch's `switch.sock` are 0600 in 0700 directories (user `nobody` gets EACCES),
//! and even with the modes loosened by hand the daemon and the switch refuse a peer whose
//! uid (`SO_PEERCRED`) is neither theirs nor root's. Needs root and setpriv; no QEMU (a daemon
//! without VMs and without a namespace).

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use unipeer::cluster::{self, ClusterClient, DaemonInfo, Request};

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
}

fn usable() -> bool {
    let ok = is_root()
        && Path::new("/usr/bin/setpriv").exists()
        && Command::new("nc").arg("-h").output().is_ok();
    if !ok {
        eprintln!("skipped: needs root, setpriv and nc (OpenBSD) to act as user nobody");
    }
    ok
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
}

/// `nc -U path` as user nobody, sending `line`; answers (success, stdout, stderr).
fn nobody_nc(path: &Path, line: &str) -> (bool, String, String) {
    let mut child = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .args(["timeout", "5", "nc", "-N", "-U"])
        .arg(path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("setpriv nc");
    let _ = child.stdin.take().unwrap().write_all(line.as_bytes());
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

struct Daemon {
    child: Child,
    dir: PathBuf,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = cluster::down(&self.dir);
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_daemon(dir: &Path) -> Daemon {
    let _ = std::fs::remove_dir_all(dir);
    let child = Command::new(env!("CARGO_BIN_EXE_unipeer"))
        .args(["cluster", "daemon", "--run-dir"])
        .arg(dir)
        .args(["--seed", "1"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start the cluster daemon");
    let d = Daemon {
        child,
        dir: dir.to_path_buf(),
    };
    let start = Instant::now();
    loop {
        if let Ok(mut c) = ClusterClient::connect(dir)
            && c.call_within::<DaemonInfo>(&Request::Hello, Duration::from_secs(2))
                .is_ok()
        {
            return d;
        }
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the daemon did not answer"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn nobody_cannot_use_cluster_or_switch_sockets() {
    if !usable() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("unipeer-control-sockets-{}", std::process::id()));
    let d = start_daemon(&dir);
    let cluster_sock = dir.join("cluster.sock");
    let switch_sock = dir.join("switch.sock");
    assert_eq!(mode(&dir), 0o700, "run directory");
    assert_eq!(mode(&dir.join("vms")), 0o700, "vms/");
    assert_eq!(mode(&cluster_sock), 0o600, "cluster.sock");
    assert_eq!(mode(&switch_sock), 0o600, "switch.sock");
    assert_eq!(mode(&dir.join("cluster.json")), 0o600, "cluster.json");

    // As made: nobody cannot even reach the sockets.
    for sock in [&cluster_sock, &switch_sock] {
        let (ok, out, err) = nobody_nc(sock, "{\"op\":\"hello\"}\n");
        assert!(!ok && out.is_empty(), "{}: {out} {err}", sock.display());
        assert!(
            err.contains("Permission denied"),
            "{}: {err}",
            sock.display()
        );
    }

    // Loosened by hand (a careless chmod): the uid check still refuses nobody.
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o711)).unwrap();
    for sock in [&cluster_sock, &switch_sock] {
        std::fs::set_permissions(sock, std::fs::Permissions::from_mode(0o666)).unwrap();
    }
    let (_, out, err) = nobody_nc(&cluster_sock, "{\"op\":\"status\",\"probe\":false}\n");
    assert!(
        out.contains("\"ok\":false") && out.contains("uid 65534 may not use this socket"),
        "cluster.sock answered nobody: {out} {err}"
    );
    assert!(!out.contains("nodes\""), "{out}");
    let (_, out, err) = nobody_nc(&switch_sock, "{\"op\":\"stats\"}\n");
    assert!(
        out.contains("\"ok\":false") && out.contains("uid 65534 may not use this socket"),
        "switch.sock answered nobody: {out} {err}"
    );
    assert!(!out.contains("ports"), "{out}");

    // Our own user still gets answers.
    let info: DaemonInfo = ClusterClient::connect(&dir)
        .unwrap()
        .call_within(&Request::Hello, Duration::from_secs(5))
        .unwrap();
    assert_eq!(info.nodes, 0);
    assert!(
        unipeer::net::SwitchClient::connect(&dir)
            .unwrap()
            .stats()
            .is_ok()
    );
    drop(d);
}
