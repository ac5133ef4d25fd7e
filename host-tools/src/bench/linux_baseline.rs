//! The Linux baseline of `unipeer bench boot --baseline-linux`: a stock Debian kernel (the
//! package `linux-image-amd64` depends on, fetched with `apt-get download` and cached), booted
//! through the same launcher, QEMU and accelerator with a tiny static init
//! (`scripts/linux-baseline/init.c`) that marks "user space reached", loads the package's
//! virtio-net modules, configures eth0 and runs a UDP echo server on the guest port our nodes
//! use. Measures QEMU launch → user space (host clock) and host↔VM UDP echo round trips over
//! the same user-networking path.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use sha2::{Digest, Sha256};

use crate::bench::boot::{Stats, stats};
use crate::diag;
use crate::hostinfo::{self, Accel};
use crate::image;
use crate::qemu::{Forward, Machine, NetAttach, VmSpec};
use crate::vm;

/// Printed by the init as soon as it runs.
pub const USER_MARKER: &str = "unipeer-linux-baseline: user space reached";
/// Printed by the init once the echo socket is bound.
pub const ECHO_MARKER: &str = "unipeer-linux-baseline: echo listening on udp";
/// Printed by the init when a step fails (it then powers the VM off).
pub const FAIL_MARKER: &str = "unipeer-linux-baseline: FAILED";

/// The meta-package whose dependency names the kernel package.
const META_PACKAGE: &str = "linux-image-amd64";
/// Modules the guest needs for its NIC; their dependencies are added from the modules' own
/// `depends=` records. Both virtio transports are loaded, so either machine type works.
const NET_MODULES: &[&str] = &["virtio_mmio", "virtio_pci", "virtio_net"];
/// The init's source, relative to the repository root.
const INIT_SOURCE: &str = "scripts/linux-baseline/init.c";

/// Default guest RAM for the Linux guest (a stock kernel needs far more than a node's 16 MiB).
pub const DEFAULT_LINUX_MEMORY_MIB: u32 = 256;
/// Default number of Linux boots (each takes seconds under TCG).
pub const DEFAULT_LINUX_BOOTS: usize = 3;

/// A Debian kernel unpacked in the cache.
#[derive(Clone, Debug)]
pub struct DebianKernel {
    pub package: String,
    /// `uname -r` of the kernel (the directory name under lib/modules).
    pub release: String,
    pub vmlinuz: PathBuf,
    pub modules_dir: PathBuf,
    pub cache_dir: PathBuf,
}

/// What was measured for the Linux guest.
#[derive(Clone, Debug, serde::Serialize)]
pub struct LinuxBaselineResult {
    pub package: String,
    pub kernel_release: String,
    pub machine: String,
    /// Why the Linux guest runs on another machine type than requested, if it does.
    pub machine_note: Option<String>,
    pub accel: String,
    pub memory_mib: u32,
    pub append: String,
    pub modules: Vec<String>,
    pub initramfs_bytes: usize,
    pub boots: usize,
    pub launch_to_user_ms: Stats,
    pub launch_to_echo_ms: Stats,
    pub rtt_us: Stats,
    pub rtt_lost: usize,
}

/// What the Linux baseline run needs from the bench's arguments.
#[derive(Clone, Debug)]
pub struct LinuxBaselineParams {
    pub machine: Machine,
    pub accel: Accel,
    pub boots: usize,
    pub memory_mib: u32,
    pub rtt_probes: usize,
}

fn cache_root() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("unipeer")
        .join("linux-baseline")
}

/// Runs a command with no stdin and its output in `log`, killing it after `timeout`.
fn run_bounded(mut cmd: Command, what: &str, log: &Path, timeout: Duration) -> anyhow::Result<()> {
    let out = fs::File::create(log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::from(out))
        .stderr(Stdio::from(err))
        .spawn()
        .with_context(|| format!("{what}: cannot run `{program}` (is it installed?)"))?;
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "{what}: `{program}` did not finish within {:.0} s",
                timeout.as_secs_f64()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    if !status.success() {
        let text = fs::read_to_string(log).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(12).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        bail!(
            "{what}: `{program}` failed ({status}):\n{}",
            tail.join("\n")
        );
    }
    Ok(())
}

/// The kernel package `linux-image-amd64` depends on, from `apt-cache depends`.
pub fn kernel_package() -> anyhow::Result<String> {
    let out = Command::new("apt-cache")
        .args(["depends", META_PACKAGE])
        .stdin(Stdio::null())
        .output()
        .context("cannot run apt-cache: the Linux baseline needs a Debian-based host with apt")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        bail!(
            "apt-cache depends {META_PACKAGE} failed ({}): {}; try `apt-get update`",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    parse_depends(&text).with_context(|| {
        format!("apt-cache depends {META_PACKAGE} names no linux-image package; try `apt-get update`:\n{text}")
    })
}

/// The first `Depends: linux-image-...` of `apt-cache depends` output.
fn parse_depends(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|p| p.starts_with("linux-image-") && !p.contains(['<', ' ']))
        .map(str::to_string)
}

/// Fetches and unpacks the kernel package into the cache, or reuses an earlier unpack.
pub fn fetch_kernel() -> anyhow::Result<DebianKernel> {
    let package = kernel_package()?;
    let dir = cache_root().join(&package);
    let root = dir.join("root");
    let done = dir.join(".complete");
    if !done.exists() {
        let partial = cache_root().join(format!("{package}.partial"));
        let _ = fs::remove_dir_all(&partial);
        fs::create_dir_all(&partial)
            .with_context(|| format!("creating the cache dir {}", partial.display()))?;
        eprintln!("linux baseline: fetching {package} with apt-get download (cached after)");
        let mut apt = Command::new("apt-get");
        apt.args(["download", "-q", &package])
            .current_dir(&partial)
            .env("DEBIAN_FRONTEND", "noninteractive");
        run_bounded(
            apt,
            &format!("apt-get download {package}"),
            &partial.join("apt.log"),
            Duration::from_secs(900),
        )?;
        let deb = fs::read_dir(&partial)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .with_context(|| format!("apt-get download {package} left no .deb"))?;
        let mut x = Command::new("dpkg-deb");
        x.arg("-x").arg(&deb).arg(partial.join("root"));
        run_bounded(
            x,
            "unpacking the kernel package",
            &partial.join("dpkg.log"),
            Duration::from_secs(300),
        )?;
        fs::remove_file(&deb)?;
        let _ = fs::remove_dir_all(&dir);
        fs::rename(&partial, &dir)?;
        fs::write(&done, format!("{package}\n"))?;
    }
    let vmlinuz = fs::read_dir(root.join("boot"))
        .with_context(|| format!("{} has no boot/ directory", root.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
        })
        .with_context(|| format!("no vmlinuz in {}/boot", root.display()))?;
    let modules_parent = ["lib/modules", "usr/lib/modules"]
        .iter()
        .map(|p| root.join(p))
        .find(|p| p.is_dir())
        .with_context(|| format!("no lib/modules in {}", root.display()))?;
    let modules_dir = fs::read_dir(&modules_parent)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.is_dir())
        .with_context(|| format!("{} is empty", modules_parent.display()))?;
    let release = modules_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    Ok(DebianKernel {
        package,
        release,
        vmlinuz,
        modules_dir,
        cache_dir: dir,
    })
}

/// Builds the static init from its committed source into the cache (keyed by the source's
/// hash, so an edited source is rebuilt).
pub fn build_init(cache_dir: &Path) -> anyhow::Result<PathBuf> {
    let src = image::repo_root().join(INIT_SOURCE);
    let text = fs::read(&src).with_context(|| format!("reading {}", src.display()))?;
    let hash = Sha256::digest(&text);
    let tag: String = hash[..8].iter().map(|b| format!("{b:02x}")).collect();
    let out = cache_dir.join(format!("init-{tag}"));
    if !out.exists() {
        let tmp = cache_dir.join(format!("init-{tag}.tmp"));
        let mut cc = Command::new("cc");
        cc.args(["-static", "-Os", "-Wall", "-o"])
            .arg(&tmp)
            .arg(&src);
        run_bounded(
            cc,
            "compiling the baseline init (needs gcc and libc6-dev: apt-get install -y build-essential)",
            &cache_dir.join("cc.log"),
            Duration::from_secs(300),
        )?;
        fs::rename(&tmp, &out)?;
    }
    Ok(out)
}

/// A module's name as the kernel spells it (dashes are underscores).
fn module_name(file_name: &str) -> Option<(String, &'static str)> {
    for ext in [".ko", ".ko.xz", ".ko.zst", ".ko.gz"] {
        if let Some(stem) = file_name.strip_suffix(ext) {
            return Some((stem.replace('-', "_"), ext));
        }
    }
    None
}

/// Every module file under `dir`, by module name.
fn index_modules(dir: &Path) -> anyhow::Result<BTreeMap<String, PathBuf>> {
    let mut index = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Some(name) = path.file_name().map(|n| n.to_string_lossy().into_owned())
                && let Some((module, _)) = module_name(&name)
            {
                index.entry(module).or_insert(path);
            }
        }
    }
    Ok(index)
}

/// A module's bytes, decompressed with the xz/zstd/gzip CLI if needed.
fn module_bytes(path: &Path, scratch: &Path) -> anyhow::Result<Vec<u8>> {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tool = match module_name(&name).map(|(_, ext)| ext) {
        Some(".ko.xz") => "xz",
        Some(".ko.zst") => "zstd",
        Some(".ko.gz") => "gzip",
        _ => return fs::read(path).with_context(|| format!("reading {}", path.display())),
    };
    let out = scratch.join("module.ko");
    let log = scratch.join("decompress.log");
    let file = fs::File::create(&out)?;
    let mut child = Command::new(tool)
        .arg("-dc")
        .arg(path)
        .stdin(Stdio::null())
        .stdout(Stdio::from(file))
        .stderr(Stdio::from(fs::File::create(&log)?))
        .spawn()
        .with_context(|| format!("cannot run {tool} to decompress {name}"))?;
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{tool} -dc {name} did not finish within 60 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    if !status.success() {
        bail!(
            "{tool} -dc {name} failed: {}",
            fs::read_to_string(&log).unwrap_or_default().trim()
        );
    }
    Ok(fs::read(&out)?)
}

/// The `depends=` record of a module's `.modinfo` (NUL-separated `key=value` strings).
fn module_depends(ko: &[u8]) -> Vec<String> {
    const KEY: &[u8] = b"\0depends=";
    let Some(at) = ko.windows(KEY.len()).position(|w| w == KEY) else {
        return Vec::new();
    };
    let rest = &ko[at + KEY.len()..];
    let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
    String::from_utf8_lossy(&rest[..end])
        .split(',')
        .map(|s| s.trim().replace('-', "_"))
        .filter(|s| !s.is_empty())
        .collect()
}

/// `wanted` and their dependencies, each after what it depends on.
fn load_order(
    wanted: &[&str],
    index: &BTreeMap<String, PathBuf>,
    scratch: &Path,
) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    fn visit(
        name: &str,
        index: &BTreeMap<String, PathBuf>,
        scratch: &Path,
        visiting: &mut BTreeSet<String>,
        done: &mut BTreeSet<String>,
        out: &mut Vec<(String, Vec<u8>)>,
    ) -> anyhow::Result<()> {
        if done.contains(name) {
            return Ok(());
        }
        if !visiting.insert(name.to_string()) || visiting.len() > 64 {
            bail!("module dependency cycle at {name}");
        }
        let path = index
            .get(name)
            .with_context(|| format!("module {name} is not in the kernel package"))?;
        let bytes = module_bytes(path, scratch)?;
        for dep in module_depends(&bytes) {
            visit(&dep, index, scratch, visiting, done, out)?;
        }
        visiting.remove(name);
        done.insert(name.to_string());
        out.push((name.to_string(), bytes));
        Ok(())
    }
    let mut out = Vec::new();
    let mut done = BTreeSet::new();
    for name in wanted {
        // A module built into the kernel needs no loading.
        if !index.contains_key(*name) {
            continue;
        }
        visit(
            name,
            index,
            scratch,
            &mut BTreeSet::new(),
            &mut done,
            &mut out,
        )?;
    }
    Ok(out)
}

/// A newc ("070701") cpio archive, written in memory.
#[derive(Default)]
pub struct Cpio {
    buf: Vec<u8>,
    next_ino: u32,
}

impl Cpio {
    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        self.next_ino += 1;
        let namesize = name.len() as u32 + 1;
        let fields = [
            self.next_ino,
            mode,
            0, // uid
            0, // gid
            if mode & 0o170000 == 0o040000 { 2 } else { 1 },
            0, // mtime
            data.len() as u32,
            0, // devmajor
            0, // devminor
            rdev.0,
            rdev.1,
            namesize,
            0, // check
        ];
        self.buf.extend_from_slice(b"070701");
        for f in fields {
            self.buf.extend_from_slice(format!("{f:08X}").as_bytes());
        }
        self.buf.extend_from_slice(name.as_bytes());
        self.buf.push(0);
        self.pad();
        self.buf.extend_from_slice(data);
        self.pad();
    }
    fn pad(&mut self) {
        while !self.buf.len().is_multiple_of(4) {
            self.buf.push(0);
        }
    }
    pub fn dir(&mut self, name: &str) {
        self.entry(name, 0o040755, (0, 0), &[]);
    }
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) {
        self.entry(name, 0o100000 | perm, (0, 0), data);
    }
    pub fn char_dev(&mut self, name: &str, major: u32, minor: u32) {
        self.entry(name, 0o020600, (major, minor), &[]);
    }
    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        self.buf
    }
}

/// The initramfs: /init, /dev/console, and /mod/NN.ko in load order.
pub fn build_initramfs(kernel: &DebianKernel) -> anyhow::Result<(Vec<u8>, Vec<String>)> {
    let init = build_init(&kernel.cache_dir)?;
    let index = index_modules(&kernel.modules_dir)?;
    let modules = load_order(NET_MODULES, &index, &kernel.cache_dir)?;
    if !modules.iter().any(|(n, _)| n == "virtio_net") && index.contains_key("virtio_net") {
        bail!("virtio_net was not selected for the initramfs");
    }
    let mut cpio = Cpio::default();
    cpio.dir("dev");
    cpio.char_dev("dev/console", 5, 1);
    cpio.file("init", 0o755, &fs::read(&init)?);
    cpio.dir("mod");
    for (i, (_, bytes)) in modules.iter().enumerate() {
        cpio.file(&format!("mod/{i:02}.ko"), 0o644, bytes);
    }
    Ok((cpio.finish(), modules.into_iter().map(|(n, _)| n).collect()))
}

/// The machine the Linux guest runs on for a requested machine type, and why if it differs.
///
/// The launcher pins microvm to `acpi=off,pic=off` (what our kernel relies on). Under those
/// flags the Debian kernel finds no virtio-mmio device (it is built without
/// `CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`, so only ACPI announces them) and gets no timer
/// interrupt (no PIC and no ACPI interrupt override for the PIT, so its local-APIC timer fails
/// verification): it reaches user space but cannot load a driver or use the network. Until
/// the launcher can boot a microvm with `acpi=on` for it, the Linux guest runs on q35.
pub fn linux_machine(requested: Machine) -> (Machine, Option<String>) {
    (requested, None)
}

/// `-M` flags for the Linux guest: on microvm, ACPI must stay on (Debian's kernel finds
/// virtio-mmio devices only through ACPI and needs its timer setup); the rest as for our nodes.
pub fn linux_machine_flags(machine: Machine) -> Option<String> {
    match machine {
        Machine::Microvm => Some("microvm,acpi=on,pic=off,pit=on,rtc=off,isa-serial=on".into()),
        Machine::Q35 => None,
    }
}

/// How long to wait for the Linux guest: a stock kernel under TCG takes seconds where ours
/// takes tens of milliseconds, so the launcher's ready deadline is scaled up.
fn linux_deadline(accel: Accel) -> Duration {
    vm::ready_timeout(accel).mul_f64(6.0)
}

/// Printed by the init just before it execs Redis (`exec=redis` in its config).
pub const REDIS_MARKER: &str = "unipeer-linux-baseline: exec redis-server";
/// Printed by Redis 7 once it accepts connections.
pub const REDIS_READY: &str = "Ready to accept connections";
/// The host's Redis server (Debian's `redis-server`), copied into the guest with its libraries.
pub const REDIS_BINARY: &str = "/usr/bin/redis-server";
/// Where the init reads its settings.
const CONF_PATH: &str = "etc/unipeer-baseline.conf";

/// The shared libraries (and the dynamic loader) `ldd` lists for a binary, in its order.
/// A library `ldd` cannot find is an error: the guest would fail to start Redis.
pub fn parse_ldd(text: &str) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for line in text.lines().map(str::trim).filter(|l| !l.is_empty()) {
        if line.contains("not found") {
            bail!("ldd: a library is missing on the host: {line}");
        }
        // `name => /path (0x...)`, `/lib64/ld-linux-x86-64.so.2 (0x...)`, or the vDSO
        // (`linux-vdso.so.1 (0x...)`, no file).
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.trim(),
            None => line,
        };
        let path = path.split(" (").next().unwrap_or("").trim();
        if path.starts_with('/') {
            let p = PathBuf::from(path);
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    if out.is_empty() {
        bail!("ldd listed no libraries (a static binary, or not an ELF file?)");
    }
    Ok(out)
}

/// The version the host's `redis-server --version` reports (`v=7.0.15` → `7.0.15`).
pub fn redis_version() -> anyhow::Result<String> {
    let out = Command::new(REDIS_BINARY)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .with_context(|| {
            format!("cannot run {REDIS_BINARY}: install redis-server (scripts/setup.sh does)")
        })?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .find_map(|w| w.strip_prefix("v="))
        .map(str::to_string)
        .with_context(|| format!("{REDIS_BINARY} --version printed no v=: {text:?}"))
}

/// What the Redis guest's initramfs holds.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RedisImage {
    pub redis_version: String,
    pub libraries: Vec<PathBuf>,
    pub modules: Vec<String>,
    pub initramfs_bytes: usize,
}

/// The dotted mask of a prefix length (`16` → `255.255.0.0`).
fn netmask(prefix: u8) -> std::net::Ipv4Addr {
    let bits = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    };
    std::net::Ipv4Addr::from(bits)
}

/// The initramfs of the Redis baseline: the echo baseline's init and modules, a config that
/// gives eth0 `addr/prefix` and makes the init exec Redis, the host's redis-server and every
/// library `ldd` lists for it at the same paths.
pub fn build_redis_initramfs(
    kernel: &DebianKernel,
    addr: std::net::Ipv4Addr,
    prefix: u8,
) -> anyhow::Result<(Vec<u8>, RedisImage)> {
    let redis_version = redis_version()?;
    let ldd = Command::new("ldd")
        .arg(REDIS_BINARY)
        .stdin(Stdio::null())
        .output()
        .context("cannot run ldd (libc-bin)")?;
    if !ldd.status.success() {
        bail!(
            "ldd {REDIS_BINARY} failed ({}): {}",
            ldd.status,
            String::from_utf8_lossy(&ldd.stderr).trim()
        );
    }
    let libraries = parse_ldd(&String::from_utf8_lossy(&ldd.stdout))?;
    let init = build_init(&kernel.cache_dir)?;
    let index = index_modules(&kernel.modules_dir)?;
    let modules = load_order(NET_MODULES, &index, &kernel.cache_dir)?;
    let mut cpio = Cpio::default();
    let mut dirs = BTreeSet::new();
    let mut add_parents = |cpio: &mut Cpio, path: &str| {
        let mut at = String::new();
        let parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        for part in &parts[..parts.len().saturating_sub(1)] {
            if !at.is_empty() {
                at.push('/');
            }
            at.push_str(part);
            if dirs.insert(at.clone()) {
                cpio.dir(&at);
            }
        }
    };
    add_parents(&mut cpio, "dev/console");
    cpio.char_dev("dev/console", 5, 1);
    cpio.file("init", 0o755, &fs::read(&init)?);
    add_parents(&mut cpio, "mod/00.ko");
    for (i, (_, bytes)) in modules.iter().enumerate() {
        cpio.file(&format!("mod/{i:02}.ko"), 0o644, bytes);
    }
    add_parents(&mut cpio, CONF_PATH);
    cpio.file(
        CONF_PATH,
        0o644,
        format!("addr={addr}\nnetmask={}\nexec=redis\n", netmask(prefix)).as_bytes(),
    );
    let binary = REDIS_BINARY.trim_start_matches('/');
    add_parents(&mut cpio, binary);
    cpio.file(
        binary,
        0o755,
        &fs::read(REDIS_BINARY).with_context(|| format!("reading {REDIS_BINARY}"))?,
    );
    for lib in &libraries {
        let bytes = fs::read(lib).with_context(|| format!("reading {}", lib.display()))?;
        let name = lib.to_string_lossy();
        let name = name.trim_start_matches('/');
        add_parents(&mut cpio, name);
        cpio.file(name, 0o755, &bytes);
    }
    let bytes = cpio.finish();
    let image = RedisImage {
        redis_version,
        libraries,
        modules: modules.into_iter().map(|(n, _)| n).collect(),
        initramfs_bytes: bytes.len(),
    };
    Ok((bytes, image))
}

/// The kernel and initramfs, ready to boot.
pub struct Prepared {
    pub kernel: DebianKernel,
    pub initramfs: Vec<u8>,
    pub modules: Vec<String>,
}

/// Fetches (or reuses) the kernel, builds the init and the initramfs. Done before any timing,
/// so a missing tool fails the bench at once.
pub fn prepare() -> anyhow::Result<Prepared> {
    let kernel = fetch_kernel()?;
    let (initramfs, modules) = build_initramfs(&kernel)?;
    Ok(Prepared {
        kernel,
        initramfs,
        modules,
    })
}

/// Boots the Linux guest `params.boots` times and measures; the round trips are taken on the
/// last boot.
pub fn measure(
    prepared: Prepared,
    params: &LinuxBaselineParams,
) -> anyhow::Result<LinuxBaselineResult> {
    let Prepared {
        kernel,
        initramfs,
        modules,
    } = prepared;
    let (machine, machine_note) = linux_machine(params.machine);
    let mut append = String::from("console=ttyS0 quiet panic=-1 tsc=reliable");
    let hint = hostinfo::tsc_khz_hint();
    if hint > 0 {
        append.push_str(&format!(" tsc_early_khz={hint}"));
    }
    let run_dir = image::repo_root().join("run").join("bench-linux");
    let deadline = linux_deadline(params.accel);
    let boots = params.boots.max(1);
    let mut to_user = Vec::new();
    let mut to_echo = Vec::new();
    let mut rtts = Vec::new();
    let mut lost = 0;
    for i in 0..boots {
        let name = format!("linux-{i}");
        let echo_port = vm::free_port()?;
        let spec = VmSpec {
            name: name.clone(),
            kernel: kernel.vmlinuz.clone(),
            config_blob: initramfs.clone(),
            run_dir: run_dir.clone(),
            machine,
            accel: params.accel,
            cpu: None,
            memory_mib: params.memory_mib,
            mac: vm::mac_for(&name),
            net: NetAttach::User {
                forwards: vec![Forward {
                    udp: true,
                    host_port: echo_port,
                    guest_port: vm::ECHO_PORT,
                }],
            },
            // QEMU's default translation cache: a 32 MiB one (what nodes get) would thrash on
            // a stock kernel and handicap the baseline.
            tb_size_mib: None,
            append: Some(append.clone()),
            die_with_parent: true,
            machine_flags: linux_machine_flags(machine),
        };
        let mut guest = spec.spawn().context("starting the Linux guest")?;
        let (_, user_at) = guest
            .wait_for_line(USER_MARKER, deadline)
            .with_context(|| format!("Linux boot {i}: waiting for user space"))?;
        to_user.push(user_at.duration_since(guest.launched_at).as_secs_f64() * 1000.0);
        let (_, echo_at) = guest.wait_for_line(ECHO_MARKER, deadline).map_err(|e| {
            let serial = guest.serial();
            match serial.lines().find(|l| l.contains(FAIL_MARKER)) {
                Some(l) => anyhow::anyhow!("Linux boot {i}: the init failed: {l}"),
                None => anyhow::anyhow!("Linux boot {i}: waiting for the echo server: {e}"),
            }
        })?;
        to_echo.push(echo_at.duration_since(guest.launched_at).as_secs_f64() * 1000.0);
        if i + 1 == boots {
            let addr = std::net::SocketAddr::from(([127, 0, 0, 1], echo_port));
            wait_for_echo(addr, deadline)
                .with_context(|| format!("Linux boot {i}: no echo through the forwarded port"))?;
            let (r, l) = diag::echo_rtts(addr, params.rtt_probes, 64, Duration::from_millis(500))?;
            rtts = r;
            lost = l;
        }
        guest.kill();
    }
    Ok(LinuxBaselineResult {
        package: kernel.package,
        kernel_release: kernel.release,
        machine: machine.to_string(),
        machine_note,
        accel: params.accel.to_string(),
        memory_mib: params.memory_mib,
        append,
        modules,
        initramfs_bytes: initramfs.len(),
        boots,
        launch_to_user_ms: stats(to_user),
        launch_to_echo_ms: stats(to_echo),
        rtt_us: stats(rtts.iter().map(|d| d.as_secs_f64() * 1e6).collect()),
        rtt_lost: lost,
    })
}

/// Sends a few warm-up datagrams until one comes back (bounded): the first answer also
/// resolves the guest's ARP entry for the gateway, as the diagnostic probe does for our node.
fn wait_for_echo(addr: std::net::SocketAddr, timeout: Duration) -> anyhow::Result<()> {
    let socket = std::net::UdpSocket::bind("127.0.0.1:0")?;
    socket.set_read_timeout(Some(Duration::from_millis(200)))?;
    let start = Instant::now();
    let mut answered = 0;
    let mut buf = [0u8; 64];
    while start.elapsed() < timeout {
        socket.send_to(b"warm-up", addr)?;
        if let Ok((n, _)) = socket.recv_from(&mut buf)
            && &buf[..n] == b"warm-up"
        {
            answered += 1;
            if answered >= 10 {
                return Ok(());
            }
        }
    }
    bail!("no answer within {:.0} s", start.elapsed().as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_kernel_package() {
        let out = "linux-image-amd64\n  Depends: linux-image-6.1.0-56-amd64\n";
        assert_eq!(
            parse_depends(out).as_deref(),
            Some("linux-image-6.1.0-56-amd64")
        );
        assert_eq!(parse_depends("linux-image-amd64\n"), None);
    }

    #[test]
    fn reads_module_depends() {
        let ko =
            b"\x7fELF....\0license=GPL\0depends=virtio_ring,virtio,net-failover\0vermagic=6.1\0";
        assert_eq!(
            module_depends(ko),
            vec!["virtio_ring", "virtio", "net_failover"]
        );
        assert!(module_depends(b"\0depends=\0").is_empty());
        assert!(module_depends(b"nothing here").is_empty());
        assert_eq!(
            module_name("virtio-rng.ko.zst"),
            Some(("virtio_rng".to_string(), ".ko.zst"))
        );
    }

    #[test]
    fn reads_ldd_output() {
        // Captured from Debian 12's `ldd /usr/bin/redis-server` (abridged).
        let out = "\tlinux-vdso.so.1 (0x00007f6078e56000)\n\
            \tlibatomic.so.1 => /lib/x86_64-linux-gnu/libatomic.so.1 (0x00007f6078e3b000)\n\
            \tlibjemalloc.so.2 => /lib/x86_64-linux-gnu/libjemalloc.so.2 (0x00007f6078600000)\n\
            \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f6077e1e000)\n\
            \t/lib64/ld-linux-x86-64.so.2 (0x00007f6078e58000)\n";
        let libs = parse_ldd(out).unwrap();
        assert_eq!(
            libs,
            [
                "/lib/x86_64-linux-gnu/libatomic.so.1",
                "/lib/x86_64-linux-gnu/libjemalloc.so.2",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
        let missing = "\tliblzf.so.1 => not found\n\t/lib64/ld-linux-x86-64.so.2 (0x1)\n";
        assert!(
            parse_ldd(missing)
                .unwrap_err()
                .to_string()
                .contains("liblzf")
        );
        assert!(parse_ldd("\tstatically linked\n").is_err());
        assert_eq!(netmask(16).to_string(), "255.255.0.0");
        assert_eq!(netmask(24).to_string(), "255.255.255.0");
        assert_eq!(netmask(0).to_string(), "0.0.0.0");
    }

    #[test]
    fn cpio_is_newc_and_aligned() {
        let mut c = Cpio::default();
        c.dir("dev");
        c.file("init", 0o755, b"abcde");
        let out = c.finish();
        assert!(out.starts_with(b"070701"));
        assert_eq!(out.len() % 4, 0);
        // Second entry: header (110) + "dev\0" padded to 116 after the first header.
        let second = &out[116..];
        assert!(second.starts_with(b"070701"));
        assert_eq!(&second[110..115], b"init\0");
        // File size field (7th) of the second entry is 5.
        assert_eq!(&second[6 + 6 * 8..6 + 7 * 8], b"00000005");
        assert!(
            out.windows(10).any(|w| w == b"TRAILER!!!"),
            "has the trailer"
        );
    }
}
