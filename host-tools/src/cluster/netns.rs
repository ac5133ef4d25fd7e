//! The cluster's network namespace: the switch, its QEMUs and the tap uplink live in
//! `unipeer-<hash of the run directory>`, so the VMs' addresses exist only inside it and no
//! test traffic leaves it. Needs root and `ip` (iproute2); without them a cluster runs with no
//! namespace and no uplink (VMs still reach each other through the switch on loopback).

use std::path::Path;
use std::process::{Command, Stdio};

use sha2::{Digest, Sha256};

/// Where `ip netns` keeps its namespaces.
const NETNS_DIR: &str = "/run/netns";

/// The namespace name for a run directory (stable, short, distinct per directory).
pub fn name_for(run_dir: &Path) -> String {
    let h = Sha256::digest(run_dir.display().to_string().as_bytes());
    format!("unipeer-{:02x}{:02x}{:02x}{:02x}", h[0], h[1], h[2], h[3])
}

/// Why no namespace can be made here, or `None` when one can.
pub fn unavailable_reason() -> Option<String> {
    if !effective_uid_is_root() {
        return Some("not root".into());
    }
    let ip = Command::new("ip")
        .arg("-V")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    if !ip.is_ok_and(|s| s.success()) {
        return Some("`ip` (iproute2) not found".into());
    }
    None
}

fn effective_uid_is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|e| e == "0"))
        })
        .unwrap_or(false)
}

pub fn exists(name: &str) -> bool {
    Path::new(NETNS_DIR).join(name).exists()
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Creates the namespace with its loopback up (the switch and QEMU talk over it).
pub fn create(name: &str) -> Result<(), String> {
    ip(&["netns", "add", name])?;
    if let Err(e) = ip(&["-n", name, "link", "set", "lo", "up"]) {
        let _ = delete(name);
        return Err(e);
    }
    Ok(())
}

/// Deletes the namespace (its tap goes with it); a missing one is not an error.
pub fn delete(name: &str) -> Result<(), String> {
    if !exists(name) {
        return Ok(());
    }
    ip(&["netns", "delete", name])
}

/// A command that runs `program` inside `netns` (or as is without one).
pub fn command(netns: Option<&str>, program: &Path) -> Command {
    match netns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_stable_and_distinct() {
        let a = name_for(Path::new("/r/run/cluster"));
        assert_eq!(a, name_for(Path::new("/r/run/cluster")));
        assert_ne!(a, name_for(Path::new("/r/run/other")));
        assert!(a.starts_with("unipeer-") && a.len() == 16);
    }
}
