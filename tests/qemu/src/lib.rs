//! Shared fixture of the QEMU tests: the image is built once per test run, VMs are started
//! through the CLI's one launcher, one at a time, with deadlines scaled to the accelerator.
//! A failing test prints the QEMU command line and the tail of the serial log.

use std::path::PathBuf;
use std::sync::{Mutex, MutexGuard, OnceLock};

use unipeer::hostinfo::{self, Accel};
use unipeer::image::{self, Image};
use unipeer::qemu::{self, Machine};
use unipeer::vm::VmOptions;

/// Name of the image the tests build and boot (every shipped application).
pub const TEST_IMAGE: &str = "test";
/// A second image with another application set (jobs tests mix the two).
pub const TEST_WC_IMAGE: &str = "test-wc";
/// Applications of [`TEST_WC_IMAGE`].
pub const TEST_WC_APPS: &[&str] = &["wordcount", "sha256"];

static IMAGE: OnceLock<Result<Image, String>> = OnceLock::new();
static WC_IMAGE: OnceLock<Result<Image, String>> = OnceLock::new();
static ONE_VM_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Serialises QEMU tests inside a test binary (the test harness runs tests on threads).
pub fn exclusive() -> MutexGuard<'static, ()> {
    ONE_VM_AT_A_TIME
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The release image, built on first use (`UNIPEER_TEST_IMAGE_PREBUILT=1` reuses
/// images/test as it is, as the test script does after building it once).
pub fn image() -> &'static Image {
    built(&IMAGE, TEST_IMAGE, &image::default_apps())
}

/// The second test image ([`TEST_WC_IMAGE`], applications [`TEST_WC_APPS`]), built on first use
/// like [`image`].
pub fn wc_image() -> &'static Image {
    let apps: Vec<String> = TEST_WC_APPS.iter().map(|a| a.to_string()).collect();
    built(&WC_IMAGE, TEST_WC_IMAGE, &apps)
}

fn built(
    cell: &'static OnceLock<Result<Image, String>>,
    name: &str,
    apps: &[String],
) -> &'static Image {
    let result = cell.get_or_init(|| {
        assert!(
            qemu::qemu_available(),
            "{} is required for the QEMU tests: apt-get install -y qemu-system-x86 (scripts/setup.sh does it)",
            qemu::QEMU
        );
        if std::env::var_os("UNIPEER_TEST_IMAGE_PREBUILT").is_some()
            && let Ok(img) = image::open(name)
            && img.manifest.apps == apps
            && img.manifest.diag_test
        {
            return Ok(img);
        }
        // Test images carry the diagnostic port's test helpers (`bench-seal`, `job-*`).
        image::build_image(name, true, true, apps, true)
            .and_then(|_| image::open(name))
            .map_err(|e| e.to_string())
    });
    match result {
        Ok(img) => img,
        Err(e) => panic!("cannot build the test image {name}: {e}"),
    }
}

/// The accelerator tests run on (auto: TCG unless KVM is hardware-backed).
pub fn accel() -> Accel {
    hostinfo::choose_accel(hostinfo::AccelChoice::Auto).accel
}

/// A fresh run directory for one test.
pub fn run_dir(test: &str) -> PathBuf {
    let dir = image::repo_root()
        .join("run")
        .join("tests")
        .join(format!("{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Options for a test VM.
pub fn options(test: &str, machine: Machine) -> VmOptions {
    VmOptions::new(test, run_dir(test), machine, accel())
}

static UNIPEER_BIN: OnceLock<Result<PathBuf, String>> = OnceLock::new();

/// The `unipeer` binary (cluster tests start its daemon): `UNIPEER_BIN`, or built here once
/// with the test binary's own profile.
pub fn unipeer_bin() -> &'static PathBuf {
    let result = UNIPEER_BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("UNIPEER_BIN") {
            return Ok(PathBuf::from(p));
        }
        // target/<profile>/deps/<test binary>
        let exe = std::env::current_exe().map_err(|e| e.to_string())?;
        let profile_dir = exe
            .parent()
            .and_then(|d| d.parent())
            .ok_or("test binary outside a target directory")?
            .to_path_buf();
        let mut cmd = std::process::Command::new("cargo");
        cmd.args(["build", "-q", "-p", "unipeer", "--bin", "unipeer"])
            .current_dir(image::repo_root());
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().map_err(|e| format!("cargo: {e}"))?;
        if !status.success() {
            return Err(format!("cargo build -p unipeer failed: {status}"));
        }
        Ok(profile_dir.join("unipeer"))
    });
    match result {
        Ok(p) => p,
        Err(e) => panic!("cannot build the unipeer binary: {e}"),
    }
}

/// A numeric field of a node's report (as `cluster::host_probe` returns it) that the test relies
/// on. A missing or non-numeric field fails the test: read as 0 it would let a renamed counter
/// pass every "== 0" check without testing anything.
pub fn field(report: &std::collections::BTreeMap<String, String>, key: &str) -> u64 {
    match report.get(key) {
        None => panic!("the report has no field {key:?}: {report:#?}"),
        Some(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("report field {key}={v:?} is not a number")),
    }
}

/// [`field`] for a report read straight from a VM's diagnostic port.
pub fn counter(report: &unipeer::diag::Report, key: &str) -> u64 {
    report
        .require(key)
        .unwrap_or_else(|e| panic!("{e} (report: {:?})", report.get("name")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_field_fails_instead_of_reading_as_zero() {
        let mut r = std::collections::BTreeMap::new();
        r.insert("trust_replayed".to_string(), "0".to_string());
        assert_eq!(field(&r, "trust_replayed"), 0);
        assert!(std::panic::catch_unwind(|| field(&r, "trust_replays")).is_err());
        r.insert("name".to_string(), "n1".to_string());
        assert!(std::panic::catch_unwind(|| field(&r, "name")).is_err());
        let report =
            unipeer::diag::Report::parse("unipeer-node diag v1\nirq_nic=3\nend\n").unwrap();
        assert_eq!(counter(&report, "irq_nic"), 3);
        assert!(std::panic::catch_unwind(|| counter(&report, "irq_timer")).is_err());
    }
}
