//! The one QEMU launcher. Every command and test that starts a VM goes through `VmSpec::spawn`:
//! it pins the machine flags the kernel relies on, hands the launch config in as the PVH
//! module, logs the serial console to a file, opens a QMP socket, and ties QEMU's life to the
//! launcher (parent-death signal, and kill on drop).

use std::fmt;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use unipeer_node::launch::GuestExit;

use crate::hostinfo::Accel;
use crate::owner_only;

/// The QEMU binary.
pub const QEMU: &str = "qemu-system-x86_64";

/// Machine type.
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Machine {
    /// QEMU microvm: virtio-mmio, no firmware to speak of (the default).
    Microvm,
    /// q35 with qboot and virtio-net-pci (fallback).
    Q35,
}

impl fmt::Display for Machine {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Machine::Microvm => "microvm",
            Machine::Q35 => "q35",
        })
    }
}

/// How the VM's NIC is attached.
#[derive(Clone, Debug)]
pub enum NetAttach {
    /// QEMU user networking; host ports forwarded to guest ports on 127.0.0.1.
    User { forwards: Vec<Forward> },
    /// A netdev backend given verbatim, without `id=` (e.g. from the cluster switch).
    Netdev(String),
}

/// A forwarded port for user networking.
#[derive(Clone, Copy, Debug)]
pub struct Forward {
    pub udp: bool,
    pub host_port: u16,
    pub guest_port: u16,
}

/// Everything needed to start one VM.
#[derive(Clone, Debug)]
pub struct VmSpec {
    pub name: String,
    pub kernel: PathBuf,
    /// The encoded launch config (`LaunchConfig::encode`).
    pub config_blob: Vec<u8>,
    /// Directory for the config file, serial log and QMP socket of this VM.
    pub run_dir: PathBuf,
    pub machine: Machine,
    pub accel: Accel,
    /// `-cpu` model; `None` takes the accelerator's default.
    pub cpu: Option<String>,
    pub memory_mib: u32,
    pub mac: [u8; 6],
    pub net: NetAttach,
    /// TCG translation-cache size in MiB (bounds host memory per VM).
    pub tb_size_mib: Option<u32>,
    /// Extra kernel command line.
    pub append: Option<String>,
    /// Kill QEMU when the launching thread exits (off for VMs owned by a daemon that outlives
    /// the command).
    pub die_with_parent: bool,
    /// Replaces the pinned `-M` flags (for guests other than ours, e.g. the Linux baseline,
    /// which needs ACPI on microvm). `None` for every unipeer node.
    pub machine_flags: Option<String>,
}

/// Why a VM could not be started or waited for.
#[derive(Debug)]
pub enum LaunchError {
    /// `qemu-system-x86_64` is not installed.
    QemuMissing,
    /// The kernel image does not exist.
    KernelMissing(PathBuf),
    /// Writing the run directory failed.
    Io(std::io::Error),
    /// QEMU exited before the expected line appeared.
    Exited {
        status: ExitStatus,
        guest: Option<GuestExit>,
        tail: String,
    },
    /// The expected line did not appear in time.
    Timeout { waited: Duration, tail: String },
}

impl fmt::Display for LaunchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LaunchError::QemuMissing => write!(
                f,
                "{QEMU} not found; install it with: apt-get install -y qemu-system-x86 (or run scripts/setup.sh)"
            ),
            LaunchError::KernelMissing(p) => write!(
                f,
                "kernel image {} not found; build it with: unipeer image build",
                p.display()
            ),
            LaunchError::Io(e) => write!(f, "cannot prepare the VM's run directory: {e}"),
            LaunchError::Exited {
                status,
                guest,
                tail,
            } => {
                let what = guest.map(|g| g.describe()).unwrap_or("QEMU failed");
                write!(
                    f,
                    "VM exited early ({status}: {what}); serial log ends with:\n{tail}"
                )
            }
            LaunchError::Timeout { waited, tail } => write!(
                f,
                "VM did not get ready within {:.1} s; serial log ends with:\n{tail}",
                waited.as_secs_f64()
            ),
        }
    }
}

impl std::error::Error for LaunchError {}

impl From<std::io::Error> for LaunchError {
    fn from(e: std::io::Error) -> Self {
        LaunchError::Io(e)
    }
}

/// Formats a MAC address as QEMU wants it.
pub fn mac_string(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Whether QEMU is on the PATH.
pub fn qemu_available() -> bool {
    Command::new(QEMU)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn setpriv_available() -> bool {
    Path::new("/usr/bin/setpriv").exists()
}

impl VmSpec {
    pub fn config_path(&self) -> PathBuf {
        self.run_dir.join(format!("{}.config", self.name))
    }
    pub fn serial_path(&self) -> PathBuf {
        self.run_dir.join(format!("{}.serial.log", self.name))
    }
    pub fn qmp_path(&self) -> PathBuf {
        self.run_dir.join(format!("{}.qmp", self.name))
    }

    /// QEMU's arguments (without the binary).
    pub fn qemu_args(&self) -> Vec<String> {
        let mut a: Vec<String> = Vec::new();
        let mut push = |s: &str| a.push(s.to_string());
        match (self.machine, &self.machine_flags) {
            (_, Some(flags)) => {
                push("-M");
                push(flags);
                if self.machine == Machine::Q35 {
                    push("-bios");
                    push("qboot.rom");
                }
            }
            // Pinned: the kernel relies on acpi=off (one IOAPIC, NIC announced on the command
            // line), no PIC, a PIT for calibration and no RTC.
            (Machine::Microvm, None) => {
                push("-M");
                push("microvm,acpi=off,pic=off,pit=on,rtc=off,isa-serial=on");
            }
            (Machine::Q35, None) => {
                push("-M");
                push("q35");
                push("-bios");
                push("qboot.rom");
            }
        }
        push("-accel");
        match (self.accel, self.tb_size_mib) {
            (Accel::Tcg, Some(tb)) => push(&format!("tcg,tb-size={tb}")),
            (Accel::Tcg, None) => push("tcg"),
            (Accel::Kvm, _) => push("kvm"),
        }
        let cpu = match (&self.cpu, self.accel) {
            (Some(c), _) => Some(c.clone()),
            (None, Accel::Kvm) => Some("host,arch-capabilities=off".to_string()),
            (None, Accel::Tcg) => None,
        };
        if let Some(cpu) = cpu {
            push("-cpu");
            push(&cpu);
        }
        for s in [
            "-smp",
            "1",
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ] {
            push(s);
        }
        push("-m");
        push(&format!("{}M", self.memory_mib));
        push("-kernel");
        push(&self.kernel.display().to_string());
        push("-initrd");
        push(&self.config_path().display().to_string());
        if let Some(extra) = &self.append {
            push("-append");
            push(extra);
        }
        push("-serial");
        push(&format!("file:{}", self.serial_path().display()));
        push("-device");
        push("isa-debug-exit,iobase=0xf4,iosize=0x04");
        push("-qmp");
        push(&format!(
            "unix:{},server=on,wait=off",
            self.qmp_path().display()
        ));
        let netdev = match &self.net {
            NetAttach::User { forwards } => {
                let mut s = String::from("user,id=net0,net=10.0.2.0/24");
                for f in forwards {
                    s.push_str(&format!(
                        ",hostfwd={}:127.0.0.1:{}-:{}",
                        if f.udp { "udp" } else { "tcp" },
                        f.host_port,
                        f.guest_port
                    ));
                }
                s
            }
            NetAttach::Netdev(backend) => format!("{backend},id=net0"),
        };
        push("-netdev");
        push(&netdev);
        let mac = mac_string(self.mac);
        push("-device");
        match self.machine {
            Machine::Microvm => push(&format!("virtio-net-device,netdev=net0,mac={mac}")),
            Machine::Q35 => push(&format!(
                "virtio-net-pci,netdev=net0,mac={mac},romfile=,addr=0x2"
            )),
        }
        a
    }

    /// The full command as a shell-pasteable line (printed when a test fails).
    pub fn command_line(&self) -> String {
        let mut out = String::from(QEMU);
        for arg in self.qemu_args() {
            out.push(' ');
            if arg.contains([' ', ',', '"', '\'']) && !arg.contains('\'') {
                out.push_str(&format!("'{arg}'"));
            } else {
                out.push_str(&arg);
            }
        }
        out
    }

    /// Writes the config, starts QEMU and returns at once.
    pub fn spawn(&self) -> Result<RunningVm, LaunchError> {
        if !self.kernel.exists() {
            return Err(LaunchError::KernelMissing(self.kernel.clone()));
        }
        if !qemu_available() {
            return Err(LaunchError::QemuMissing);
        }
        // The blob holds the node's private key: 0600, created anew (never through a planted
        // symlink), in a 0700 directory; removed once the VM is ready (`remove_config`).
        owner_only::create_dir(&self.run_dir)?;
        owner_only::write_file(&self.config_path(), &self.config_blob)?;
        let _ = fs::remove_file(self.qmp_path());
        drop(owner_only::create_file(&self.serial_path())?);
        let mut cmd = if self.die_with_parent && setpriv_available() {
            let mut c = Command::new("/usr/bin/setpriv");
            c.args(["--pdeathsig", "KILL", "--", QEMU]);
            c
        } else {
            Command::new(QEMU)
        };
        cmd.args(self.qemu_args())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let launched_at = Instant::now();
        let child = cmd.spawn().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                LaunchError::QemuMissing
            } else {
                LaunchError::Io(e)
            }
        })?;
        Ok(RunningVm {
            child: Some(child),
            name: self.name.clone(),
            config_path: Some(self.config_path()),
            serial_path: self.serial_path(),
            qmp_path: self.qmp_path(),
            command_line: self.command_line(),
            launched_at,
            exit: None,
        })
    }
}

/// A started QEMU. Dropping it kills QEMU.
pub struct RunningVm {
    child: Option<Child>,
    pub name: String,
    /// The launch-config blob until [`RunningVm::remove_config`] (or the kill) removes it.
    config_path: Option<PathBuf>,
    pub serial_path: PathBuf,
    pub qmp_path: PathBuf,
    /// The command that started it, for error reports.
    pub command_line: String,
    pub launched_at: Instant,
    exit: Option<ExitStatus>,
}

/// How often the serial log is re-read while waiting for a line.
const LOG_POLL: Duration = Duration::from_micros(500);

impl RunningVm {
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// The serial console so far.
    pub fn serial(&self) -> String {
        owner_only::read_file(&self.serial_path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    fn tail(&mut self) -> String {
        let serial = self.serial();
        let lines: Vec<&str> = serial.lines().collect();
        let mut tail = lines[lines.len().saturating_sub(15)..].join("\n");
        if let Some(child) = self.child.as_mut()
            && let Some(mut err) = child.stderr.take()
            && self.exit.is_some()
        {
            let mut s = String::new();
            let _ = err.read_to_string(&mut s);
            if !s.trim().is_empty() {
                tail.push_str("\nQEMU stderr:\n");
                tail.push_str(s.trim());
            }
        }
        tail
    }

    /// Non-blocking: QEMU's exit status if it has exited.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none()
            && let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            self.exit = Some(status);
        }
        self.exit
    }

    /// Waits until a serial line contains `needle`; returns that line and when it was seen.
    /// Fails if QEMU exits first or `timeout` passes.
    pub fn wait_for_line(
        &mut self,
        needle: &str,
        timeout: Duration,
    ) -> Result<(String, Instant), LaunchError> {
        let start = Instant::now();
        let mut offset = 0usize;
        let mut pending = String::new();
        loop {
            if let Ok(mut f) = owner_only::open_read(&self.serial_path) {
                use std::io::Seek;
                let _ = f.seek(std::io::SeekFrom::Start(offset as u64));
                let mut buf = Vec::new();
                let _ = f.read_to_end(&mut buf);
                offset += buf.len();
                pending.push_str(&String::from_utf8_lossy(&buf));
                while let Some(nl) = pending.find('\n') {
                    let line: String = pending.drain(..=nl).collect();
                    if line.contains(needle) {
                        return Ok((line.trim_end().to_string(), Instant::now()));
                    }
                }
            }
            if let Some(status) = self.try_exit() {
                // One more read: the line may have landed just before exit.
                if let Some(l) = self.serial().lines().find(|l| l.contains(needle)) {
                    return Ok((l.to_string(), Instant::now()));
                }
                return Err(LaunchError::Exited {
                    status,
                    guest: status.code().and_then(GuestExit::from_qemu_status),
                    tail: self.tail(),
                });
            }
            if start.elapsed() > timeout {
                return Err(LaunchError::Timeout {
                    waited: start.elapsed(),
                    tail: self.tail(),
                });
            }
            std::thread::sleep(LOG_POLL);
        }
    }

    /// Waits for QEMU to exit, up to `timeout`; kills it after that.
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus, LaunchError> {
        let start = Instant::now();
        loop {
            if let Some(s) = self.try_exit() {
                return Ok(s);
            }
            if start.elapsed() > timeout {
                let tail = self.tail();
                self.kill();
                return Err(LaunchError::Timeout {
                    waited: start.elapsed(),
                    tail,
                });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Blocks until QEMU exits.
    pub fn wait_forever(&mut self) -> std::io::Result<ExitStatus> {
        if let Some(s) = self.exit {
            return Ok(s);
        }
        let child = self
            .child
            .as_mut()
            .ok_or_else(|| std::io::Error::other("VM detached"))?;
        let s = child.wait()?;
        self.exit = Some(s);
        Ok(s)
    }

    /// The guest's exit, if QEMU has exited with a guest exit code.
    pub fn guest_exit(&mut self) -> Option<GuestExit> {
        self.try_exit()
            .and_then(|s| s.code())
            .and_then(GuestExit::from_qemu_status)
    }

    /// Removes the launch-config blob (it holds the node's private key and users' keys). QEMU
    /// reads `-initrd` while it starts the machine, so call this once the guest has printed a
    /// line (it is ready); a restart writes the blob again.
    pub fn remove_config(&mut self) -> std::io::Result<()> {
        match self.config_path.take() {
            Some(p) => match fs::remove_file(&p) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
            None => Ok(()),
        }
    }

    /// Makes QEMU's QMP socket 0600 (QEMU binds it under our umask; its directory is 0700).
    pub fn restrict_qmp(&self) -> std::io::Result<()> {
        owner_only::restrict(&self.qmp_path)
    }

    /// Kills QEMU (SIGKILL) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.remove_config();
        if let Some(child) = self.child.as_mut() {
            if self.exit.is_none() {
                let _ = child.kill();
            }
            if let Ok(s) = child.wait() {
                self.exit.get_or_insert(s);
            }
        }
    }

    /// Opens the VM's QMP socket.
    pub fn qmp(&self) -> std::io::Result<Qmp> {
        Qmp::connect(&self.qmp_path, Duration::from_secs(5))
    }

    /// Lets QEMU outlive this handle (a daemon records its pid instead).
    pub fn detach(mut self) -> u32 {
        // QEMU may not have read its blob yet: the new owner removes it.
        self.config_path = None;
        let pid = self.pid().unwrap_or(0);
        self.child = None;
        pid
    }
}

impl Drop for RunningVm {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A minimal QMP client over QEMU's JSON socket.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    /// Connects and negotiates capabilities, retrying until `timeout` while QEMU creates the
    /// socket.
    pub fn connect(path: &Path, timeout: Duration) -> std::io::Result<Qmp> {
        let start = Instant::now();
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if start.elapsed() > timeout => return Err(e),
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
        };
        stream.set_read_timeout(Some(timeout))?;
        let writer = stream.try_clone()?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
        };
        let _greeting = qmp.read_message()?;
        qmp.execute("qmp_capabilities", serde_json::json!({}))?;
        Ok(qmp)
    }

    fn read_message(&mut self) -> std::io::Result<serde_json::Value> {
        let mut line = String::new();
        for _ in 0..1000 {
            line.clear();
            if self.reader.read_line(&mut line)? == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "QMP socket closed",
                ));
            }
            let v: serde_json::Value = serde_json::from_str(&line)
                .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))?;
            // Asynchronous events are skipped.
            if v.get("event").is_none() {
                return Ok(v);
            }
        }
        Err(std::io::Error::other("too many QMP events"))
    }

    /// Runs a command; returns its `return` value or the QMP error as an I/O error.
    pub fn execute(
        &mut self,
        command: &str,
        arguments: serde_json::Value,
    ) -> std::io::Result<serde_json::Value> {
        let msg = serde_json::json!({ "execute": command, "arguments": arguments });
        writeln!(self.writer, "{msg}")?;
        let reply = self.read_message()?;
        if let Some(err) = reply.get("error") {
            return Err(std::io::Error::other(format!("QMP {command}: {err}")));
        }
        Ok(reply
            .get("return")
            .cloned()
            .unwrap_or(serde_json::Value::Null))
    }
}
