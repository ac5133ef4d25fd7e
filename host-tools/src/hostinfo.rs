//! Facts about the host that launches VMs: which accelerator is usable, the TSC frequency hint
//! handed to guests.

use std::fmt;
use std::fs;
use std::path::PathBuf;

/// The accelerator QEMU runs a guest with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
}

impl fmt::Display for Accel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
        })
    }
}

/// What the user asked for (`--accel`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum AccelChoice {
    /// KVM when it is hardware-backed, TCG otherwise.
    Auto,
    Kvm,
    Tcg,
}

/// The chosen accelerator and why.
#[derive(Clone, Debug)]
pub struct AccelDecision {
    pub accel: Accel,
    pub reason: String,
}

/// Why KVM is not hardware-backed here, or `None` when it is.
pub fn kvm_unusable_reason() -> Option<String> {
    if fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_err()
    {
        return Some("/dev/kvm is missing or not accessible".into());
    }
    if PathBuf::from("/sys/module/kvm_pvm").exists() {
        return Some(
            "KVM here is kvm_pvm (software nested virtualisation, far slower than TCG for a kernel)"
                .into(),
        );
    }
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let hw = cpuinfo
        .lines()
        .find(|l| l.starts_with("flags"))
        .is_some_and(|l| l.split_whitespace().any(|f| f == "vmx" || f == "svm"));
    if !hw {
        return Some("the CPU flags have neither vmx nor svm".into());
    }
    None
}

/// Starts QEMU with KVM and no machine, then quits it over QMP: `None` when KVM initialises,
/// else why not. Only asked when the hardware checks pass.
fn kvm_start_failure() -> Option<String> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let child = Command::new(crate::qemu::QEMU)
        .args([
            "-machine",
            "none",
            "-accel",
            "kvm",
            "-nodefaults",
            "-display",
            "none",
            "-S",
            "-qmp",
            "stdio",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn();
    let mut child = match child {
        Ok(c) => c,
        Err(e) => return Some(format!("cannot run {}: {e}", crate::qemu::QEMU)),
    };
    if let Some(mut stdin) = child.stdin.take() {
        let _ = stdin.write_all(b"{\"execute\":\"qmp_capabilities\"}\n{\"execute\":\"quit\"}\n");
    }
    let out = match child.wait_with_output() {
        Ok(o) => o,
        Err(e) => return Some(format!("KVM probe failed: {e}")),
    };
    if out.status.success() {
        None
    } else {
        Some(format!(
            "QEMU could not start with KVM: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Resolves `--accel`.
pub fn choose_accel(choice: AccelChoice) -> AccelDecision {
    match choice {
        AccelChoice::Kvm => AccelDecision {
            accel: Accel::Kvm,
            reason: "forced with --accel kvm".into(),
        },
        AccelChoice::Tcg => AccelDecision {
            accel: Accel::Tcg,
            reason: "forced with --accel tcg".into(),
        },
        AccelChoice::Auto => match kvm_unusable_reason().or_else(kvm_start_failure) {
            None => AccelDecision {
                accel: Accel::Kvm,
                reason: "hardware-backed KVM".into(),
            },
            Some(why) => AccelDecision {
                accel: Accel::Tcg,
                reason: format!("TCG: {why}"),
            },
        },
    }
}

fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("unipeer")
}

fn boot_id() -> String {
    fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

/// The TSC frequency (kHz) to hint to guests: a frequency a guest measured on this host since
/// it booted (cached), else the kernel's `cpu MHz`, else 0 (no hint: the guest calibrates).
/// Guests check the hint against the PIT before trusting it.
pub fn tsc_khz_hint() -> u64 {
    let cached = fs::read_to_string(cache_dir().join("tsc_khz")).unwrap_or_default();
    if let Some((id, khz)) = cached.trim().split_once(' ')
        && id == boot_id()
        && let Ok(khz) = khz.parse::<u64>()
    {
        return khz;
    }
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|mhz| (mhz * 1000.0) as u64)
        .unwrap_or(0)
}

/// Remembers a TSC frequency a guest calibrated with the PIT, for later launches on this boot.
pub fn remember_tsc_khz(khz: u64) {
    if khz == 0 {
        return;
    }
    let dir = cache_dir();
    let _ = fs::create_dir_all(&dir);
    let _ = fs::write(dir.join("tsc_khz"), format!("{} {khz}\n", boot_id()));
}
