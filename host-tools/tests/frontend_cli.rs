//! `unipeer frontend` as started from a shell: it warns loudly when its API listens beyond
//! loopback (and not on loopback), and writes its token file 0600 where the client finds it.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Starts a front-end on `listen`; answers it and the lines it printed up to its "API on" line.
fn start(listen: &str, run_dir: &std::path::Path) -> (Child, Vec<String>) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_unipeer"))
        .arg("--run-dir")
        .arg(run_dir)
        .args(["frontend", "--listen", listen, "--no-trust"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start unipeer frontend");
    let err = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let last = line.contains("API on");
            if tx.send(line).is_err() || last {
                return;
            }
        }
    });
    let mut lines = Vec::new();
    while let Ok(l) = rx.recv_timeout(Duration::from_secs(20)) {
        let last = l.contains("API on");
        lines.push(l);
        if last {
            break;
        }
    }
    (child, lines)
}

#[test]
fn listening_beyond_loopback_is_warned_about() {
    let run_dir = std::env::temp_dir().join(format!("unipeer-frontend-cli-{}", std::process::id()));
    for (listen, warned) in [("127.0.0.1:0", false), ("0.0.0.0:0", true)] {
        let (mut child, lines) = start(listen, &run_dir);
        let _ = child.kill();
        let _ = child.wait();
        let text = lines.join("\n");
        let api = lines
            .iter()
            .find(|l| l.contains("API on"))
            .unwrap_or_else(|| panic!("{listen}: no start line:\n{text}"));
        assert_eq!(text.contains("WARNING"), warned, "{listen}:\n{text}");
        // "... (token in PATH)"
        let path = api
            .rsplit_once("token in ")
            .map(|(_, p)| p.trim_end_matches(')'))
            .unwrap_or_else(|| panic!("no token path: {api}"));
        let mode = std::fs::metadata(path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{path}");
        let _ = std::fs::remove_file(path);
    }
    let _ = std::fs::remove_dir_all(&run_dir);
}
