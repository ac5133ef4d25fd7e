//! `<run_dir>/cluster.json`: what a later command (or the clean-up of a stale run) needs when
//! the daemon cannot be asked: its pid, its namespace and the QEMU pids.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// File name inside the run directory.
pub const STATE_NAME: &str = "cluster.json";

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    pub name: String,
    pub qemu_pid: Option<u32>,
    pub serial_log: PathBuf,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateFile {
    /// 0 until the daemon is spawned.
    pub daemon_pid: u32,
    pub netns: Option<String>,
    pub nodes: Vec<NodeRecord>,
}

pub fn path(run_dir: &Path) -> PathBuf {
    run_dir.join(STATE_NAME)
}

/// Writes atomically (a reader sees the old or the new file, never half of one).
pub fn save(run_dir: &Path, st: &StateFile) -> io::Result<()> {
    let text = serde_json::to_string_pretty(st).map_err(io::Error::other)?;
    crate::owner_only::replace_file(&path(run_dir), text.as_bytes())
}

/// `None` when there is no state file; an unreadable one reads as empty (it is cleaned anyway).
/// A symlink in its place is not followed (it reads as absent).
pub fn load(run_dir: &Path) -> Option<StateFile> {
    let bytes = crate::owner_only::read_file(&path(run_dir)).ok()?;
    Some(serde_json::from_slice(&bytes).unwrap_or_default())
}

/// A live (not zombie) process's arguments, `None` if there is none.
fn live_cmdline(pid: u32) -> Option<Vec<String>> {
    if pid == 0 {
        return None;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The state follows the parenthesised command name.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    if matches!(state, None | Some("Z") | Some("X")) {
        return None;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    Some(
        cmdline
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect(),
    )
}

/// Whether `pid` is a live (not zombie) process whose command line contains `needle`.
pub fn process_alive(pid: u32, needle: &str) -> bool {
    live_cmdline(pid).is_some_and(|args| args.join(" ").contains(needle))
}

/// Whether `pid` is a QEMU of the cluster in `run_dir`: a live `qemu-system-*` whose
/// arguments name a file in that run directory (its `-initrd`, serial log or QMP socket).
/// A pid from a stale `cluster.json` may since belong to anything; only ours is killed.
pub fn is_cluster_qemu(pid: u32, run_dir: &Path) -> bool {
    let Some(args) = live_cmdline(pid) else {
        return false;
    };
    let vms = super::daemon::vms_dir(run_dir).display().to_string() + "/";
    let program = args.first().map(|a| a.rsplit('/').next().unwrap_or(a));
    program.is_some_and(|p| p.starts_with("qemu-system")) && args.iter().any(|a| a.contains(&vms))
}

/// Whether `pid` is the cluster daemon of `run_dir`: a live `unipeer cluster daemon
/// --run-dir RUN_DIR`.
pub fn is_cluster_daemon(pid: u32, run_dir: &Path) -> bool {
    let Some(args) = live_cmdline(pid) else {
        return false;
    };
    let same = |given: &str| {
        let given = Path::new(given);
        given == run_dir
            || matches!(
                (given.canonicalize(), run_dir.canonicalize()),
                (Ok(a), Ok(b)) if a == b
            )
    };
    let words: Vec<&str> = args.iter().map(String::as_str).collect();
    words.windows(2).any(|w| w == ["cluster", "daemon"])
        && words.windows(2).any(|w| w[0] == "--run-dir" && same(w[1]))
}

/// Sends SIGKILL to `pid` (through `kill(1)`: the host code has no `unsafe`).
pub fn kill_process(pid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .stderr(std::process::Stdio::null())
        .status();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Child, Command, Stdio};

    /// A live process whose argv[0] is `name` and whose arguments end with `args`.
    fn spawn_named(name: &str, args: &[&str]) -> Child {
        let mut c = Command::new("bash");
        c.args([
            "-c",
            r#"n="$1"; shift; exec -a "$n" bash -c 'sleep 30; true' "$@""#,
            "x",
            name,
        ])
        .arg("filler")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        c.spawn().unwrap()
    }

    fn wait_for_name(pid: u32, name: &str) {
        let start = std::time::Instant::now();
        while live_cmdline(pid).is_none_or(|a| a.first().is_none_or(|p| p != name)) {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(5),
                "{pid} never became {name}"
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
    }

    /// Stale-run clean-up kills only our QEMU: another program whose arguments mention the run
    /// directory, or a QEMU of another run directory, is left alone; likewise for the daemon.
    #[test]
    fn only_our_qemu_and_daemon_are_recognised() {
        let run_dir = Path::new("/tmp/unipeer-state-test/run");
        let blob = "/tmp/unipeer-state-test/run/vms/n1.config";
        let other_blob = "/tmp/unipeer-state-test/other/vms/n1.config";
        let mut procs = [
            spawn_named("qemu-system-x86_64", &["-initrd", blob]),
            spawn_named("qemu-system-x86_64", &["-initrd", other_blob]),
            spawn_named("sleepy", &["-initrd", blob]),
            spawn_named(
                "unipeer",
                &[
                    "cluster",
                    "daemon",
                    "--run-dir",
                    "/tmp/unipeer-state-test/run",
                ],
            ),
            spawn_named(
                "unipeer",
                &[
                    "cluster",
                    "daemon",
                    "--run-dir",
                    "/tmp/unipeer-state-test/other",
                ],
            ),
        ];
        let names = [
            "qemu-system-x86_64",
            "qemu-system-x86_64",
            "sleepy",
            "unipeer",
            "unipeer",
        ];
        for (p, n) in procs.iter().zip(names) {
            wait_for_name(p.id(), n);
        }
        let ids: Vec<u32> = procs.iter().map(Child::id).collect();
        let found: Vec<(bool, bool)> = ids
            .iter()
            .map(|&pid| {
                (
                    is_cluster_qemu(pid, run_dir),
                    is_cluster_daemon(pid, run_dir),
                )
            })
            .collect();
        for p in procs.iter_mut() {
            let _ = p.kill();
            let _ = p.wait();
        }
        assert_eq!(
            found,
            [
                (true, false),
                (false, false),
                (false, false),
                (false, true),
                (false, false)
            ]
        );
        // Gone (reaped) and absent pids are nobody's.
        assert!(!is_cluster_qemu(ids[0], run_dir));
        assert!(!is_cluster_qemu(0, run_dir));
    }
}
