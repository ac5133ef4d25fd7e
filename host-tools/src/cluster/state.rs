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
    let tmp = run_dir.join(format!("{STATE_NAME}.{}.tmp", std::process::id()));
    let text = serde_json::to_string_pretty(st).map_err(io::Error::other)?;
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path(run_dir))
}

/// `None` when there is no state file; an unreadable one reads as empty (it is cleaned anyway).
pub fn load(run_dir: &Path) -> Option<StateFile> {
    let text = std::fs::read_to_string(path(run_dir)).ok()?;
    Some(serde_json::from_str(&text).unwrap_or_default())
}

/// Whether `pid` is a live (not zombie) process whose command line contains `needle`.
pub fn process_alive(pid: u32, needle: &str) -> bool {
    if pid == 0 {
        return false;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The state follows the parenthesised command name.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    if matches!(state, None | Some("Z") | Some("X")) {
        return false;
    }
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    String::from_utf8_lossy(&cmdline).contains(needle)
}

/// Sends SIGKILL to `pid` (through `kill(1)`: the host code has no `unsafe`).
pub fn kill_process(pid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-KILL", &pid.to_string()])
        .stderr(std::process::Stdio::null())
        .status();
}
