//! `unipeer image build`: compiles the kernel for `x86_64-unknown-none` and writes
//! `images/<name>/` with the ELF and a manifest (version, sha256, size).

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The bare-metal target the kernel builds for.
pub const KERNEL_TARGET: &str = "x86_64-unknown-none";
/// File name of the kernel inside an image directory.
pub const KERNEL_FILE: &str = "kernel.elf";
/// File name of the manifest inside an image directory.
pub const MANIFEST_FILE: &str = "manifest.toml";

/// What an image directory holds.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    pub name: String,
    pub version: String,
    pub profile: String,
    pub sha256: String,
    pub size_bytes: u64,
    pub target: String,
    pub built_unix_s: u64,
    /// Applications linked into the kernel (`unipeer image build --apps a,b`).
    #[serde(default)]
    pub apps: Vec<String>,
    /// Built with the diagnostic port's test helpers (`bench-seal`, `job-primes`, `job-sha256`;
    /// `unipeer image build --diag-test`): test images only.
    #[serde(default)]
    pub diag_test: bool,
}

/// Applications an image gets when `--apps` is not given: every shipped one.
pub fn default_apps() -> Vec<String> {
    unipeer_apps::ALL
        .iter()
        .map(|a| a.name().to_string())
        .collect()
}

/// Checks an application list against the shipped applications; answers it deduplicated.
pub fn check_apps(apps: &[String]) -> Result<Vec<String>, ImageError> {
    let mut out: Vec<String> = Vec::new();
    for a in apps {
        let a = a.trim();
        if unipeer_apps::by_name(a).is_none() {
            return Err(ImageError::UnknownApp {
                name: a.to_string(),
                known: default_apps().join(", "),
            });
        }
        if !out.iter().any(|o| o == a) {
            out.push(a.to_string());
        }
    }
    if out.is_empty() {
        return Err(ImageError::UnknownApp {
            name: String::new(),
            known: default_apps().join(", "),
        });
    }
    Ok(out)
}

/// Why an image could not be built or read.
#[derive(Debug)]
pub enum ImageError {
    /// `cargo` is not on the PATH.
    NoCargo,
    /// The bare-metal target is not installed.
    TargetMissing,
    /// cargo failed; its output's last lines.
    BuildFailed(String),
    /// The image directory or manifest is missing or broken.
    BadImage {
        dir: PathBuf,
        why: String,
    },
    /// `--apps` names an application this tree does not ship (empty name: none given).
    UnknownApp {
        name: String,
        known: String,
    },
    Io(std::io::Error),
}

impl fmt::Display for ImageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ImageError::NoCargo => write!(
                f,
                "cargo not found; install Rust with rustup (https://rustup.rs) or run scripts/setup.sh"
            ),
            ImageError::TargetMissing => write!(
                f,
                "the Rust target {KERNEL_TARGET} is not installed; fix with: rustup target add {KERNEL_TARGET}"
            ),
            ImageError::BuildFailed(tail) => write!(f, "kernel build failed:\n{tail}"),
            ImageError::BadImage { dir, why } => write!(
                f,
                "image {} is unusable: {why}; rebuild it with: unipeer image build --release",
                dir.display()
            ),
            ImageError::UnknownApp { name, known } if name.is_empty() => {
                write!(
                    f,
                    "an image needs at least one application (known: {known})"
                )
            }
            ImageError::UnknownApp { name, known } => {
                write!(f, "unknown application {name:?} (known: {known})")
            }
            ImageError::Io(e) => write!(f, "image I/O error: {e}"),
        }
    }
}

impl std::error::Error for ImageError {}

impl From<std::io::Error> for ImageError {
    fn from(e: std::io::Error) -> Self {
        ImageError::Io(e)
    }
}

/// The repository root (where the workspace `Cargo.toml` is): `UNIPEER_ROOT`, else the
/// checkout this binary was built from.
pub fn repo_root() -> PathBuf {
    if let Some(r) = std::env::var_os("UNIPEER_ROOT") {
        return PathBuf::from(r);
    }
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("host-tools lives inside the workspace")
        .to_path_buf()
}

/// `images/` under the repository root.
pub fn images_dir() -> PathBuf {
    repo_root().join("images")
}

/// Directory of the image called `name`.
pub fn image_dir(name: &str) -> PathBuf {
    images_dir().join(name)
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn target_installed() -> Option<bool> {
    let out = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .current_dir(repo_root())
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .any(|l| l.trim() == KERNEL_TARGET),
    )
}

/// Builds the kernel with every shipped application and writes the image directory.
pub fn build(name: &str, release: bool, quiet: bool) -> Result<Manifest, ImageError> {
    build_with_apps(name, release, quiet, &default_apps())
}

/// Builds the kernel linking only `apps` (cargo features `app-<name>` of the kernel crate) and
/// writes the image directory. Returns the manifest.
pub fn build_with_apps(
    name: &str,
    release: bool,
    quiet: bool,
    apps: &[String],
) -> Result<Manifest, ImageError> {
    build_image(name, release, quiet, apps, false)
}

/// [`build_with_apps`], with the diagnostic port's test helpers compiled in when `diag_test`
/// (the kernel's `diag-test` feature: test images only).
pub fn build_image(
    name: &str,
    release: bool,
    quiet: bool,
    apps: &[String],
    diag_test: bool,
) -> Result<Manifest, ImageError> {
    let apps = check_apps(apps)?;
    let root = repo_root();
    if Command::new("cargo").arg("--version").output().is_err() {
        return Err(ImageError::NoCargo);
    }
    if target_installed() == Some(false) {
        return Err(ImageError::TargetMissing);
    }
    let mut cmd = Command::new("cargo");
    cmd.current_dir(&root)
        .args(["build", "-p", "unipeer-kernel", "--target", KERNEL_TARGET])
        .args(["--no-default-features", "--features"])
        .arg(
            apps.iter()
                .map(|a| format!("app-{a}"))
                .chain(std::iter::once("service-kv".to_string()))
                .chain(diag_test.then(|| "diag-test".to_string()))
                .collect::<Vec<_>>()
                .join(","),
        );
    if release {
        cmd.arg("--release");
    }
    if quiet {
        cmd.arg("--quiet");
    }
    let out = cmd.output()?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        if stderr.contains("target may not be installed")
            || stderr.contains("can't find crate for `core`")
        {
            return Err(ImageError::TargetMissing);
        }
        let lines: Vec<&str> = stderr.lines().collect();
        return Err(ImageError::BuildFailed(
            lines[lines.len().saturating_sub(30)..].join("\n"),
        ));
    }
    let profile = if release { "release" } else { "debug" };
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let elf = target_dir
        .join(KERNEL_TARGET)
        .join(profile)
        .join("unipeer-kernel");
    let bytes = fs::read(&elf)?;
    let dir = image_dir(name);
    fs::create_dir_all(&dir)?;
    fs::write(dir.join(KERNEL_FILE), &bytes)?;
    let manifest = Manifest {
        name: name.to_string(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        profile: profile.to_string(),
        sha256: sha256_hex(&bytes),
        size_bytes: bytes.len() as u64,
        target: KERNEL_TARGET.to_string(),
        built_unix_s: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        apps,
        diag_test,
    };
    let text = toml::to_string(&manifest).map_err(|e| ImageError::BadImage {
        dir: dir.clone(),
        why: e.to_string(),
    })?;
    fs::write(dir.join(MANIFEST_FILE), text)?;
    Ok(manifest)
}

/// An image on disk, checked against its manifest.
#[derive(Clone, Debug)]
pub struct Image {
    pub dir: PathBuf,
    pub kernel: PathBuf,
    pub manifest: Manifest,
}

/// Opens `images/<name>/`, verifying the kernel's size and hash.
pub fn open(name: &str) -> Result<Image, ImageError> {
    open_dir(&image_dir(name))
}

/// Opens an image directory, verifying the kernel's size and hash.
pub fn open_dir(dir: &Path) -> Result<Image, ImageError> {
    let bad = |why: String| ImageError::BadImage {
        dir: dir.to_path_buf(),
        why,
    };
    let text = fs::read_to_string(dir.join(MANIFEST_FILE))
        .map_err(|e| bad(format!("cannot read {MANIFEST_FILE}: {e}")))?;
    let manifest: Manifest =
        toml::from_str(&text).map_err(|e| bad(format!("broken {MANIFEST_FILE}: {e}")))?;
    let kernel = dir.join(KERNEL_FILE);
    let bytes = fs::read(&kernel).map_err(|e| bad(format!("cannot read {KERNEL_FILE}: {e}")))?;
    if bytes.len() as u64 != manifest.size_bytes || sha256_hex(&bytes) != manifest.sha256 {
        return Err(bad(format!(
            "{KERNEL_FILE} does not match the manifest's size and sha256"
        )));
    }
    Ok(Image {
        dir: dir.to_path_buf(),
        kernel,
        manifest,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("unipeer-image-{tag}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn manifest_round_trip_and_verification() {
        let dir = temp_dir("ok");
        let kernel = b"\x7fELF fake kernel";
        fs::write(dir.join(KERNEL_FILE), kernel).unwrap();
        let m = Manifest {
            name: "t".into(),
            version: "0.1.0".into(),
            profile: "release".into(),
            sha256: sha256_hex(kernel),
            size_bytes: kernel.len() as u64,
            target: KERNEL_TARGET.into(),
            built_unix_s: 1,
            apps: vec!["primes".into()],
            diag_test: false,
        };
        fs::write(dir.join(MANIFEST_FILE), toml::to_string(&m).unwrap()).unwrap();
        assert_eq!(open_dir(&dir).unwrap().manifest, m);

        // A kernel that changed after the build is refused.
        fs::write(dir.join(KERNEL_FILE), b"\x7fELF other kernel").unwrap();
        let err = open_dir(&dir).unwrap_err().to_string();
        assert!(err.contains("does not match"), "{err}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn app_lists_are_checked() {
        assert_eq!(
            check_apps(&["primes".into(), " primes".into(), "wordcount".into()]).unwrap(),
            vec!["primes".to_string(), "wordcount".to_string()]
        );
        let err = check_apps(&["nope".into()]).unwrap_err().to_string();
        assert!(err.contains("unknown application \"nope\""), "{err}");
        assert!(
            check_apps(&[])
                .unwrap_err()
                .to_string()
                .contains("at least one")
        );
    }

    #[test]
    fn missing_and_broken_manifests_are_clear_errors() {
        let dir = temp_dir("bad");
        let err = open_dir(&dir).unwrap_err().to_string();
        assert!(err.contains("cannot read manifest.toml"), "{err}");
        fs::write(dir.join(MANIFEST_FILE), "name = [").unwrap();
        let err = open_dir(&dir).unwrap_err().to_string();
        assert!(err.contains("broken manifest.toml"), "{err}");
        assert!(err.contains("unipeer image build"), "{err}");
        let _ = fs::remove_dir_all(&dir);
    }
}
