//! Owner-only files, directories and control sockets: what every run directory (a cluster's,
//! its `vms/`, the front-ends' token directory, `run/` itself) is made of. Directories are 0700
//! and owned by us, files 0600 created anew (`O_EXCL`, `O_NOFOLLOW`: a planted symlink or file
//! is never written through), sockets 0600, and a control socket's client must be our own user
//! or root ([`peer_allowed`], `SO_PEERCRED`). The threat model is in docs/ARCHITECTURE.md
//! ("Host-side surfaces").

use std::fmt;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Component, Path, PathBuf};

use nix::fcntl::OFlag;
use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
use nix::sys::stat::{Mode, umask};
use nix::unistd::geteuid;

/// Mode of every run directory.
pub const DIR_MODE: u32 = 0o700;
/// Mode of every file and socket in one.
pub const FILE_MODE: u32 = 0o600;

fn refused(path: &Path, why: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!("{}: {why}", path.display()),
    )
}

/// Checks that `path` (not followed) is a directory owned by us, and makes it 0700.
fn claim_dir(path: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    if meta.file_type().is_symlink() {
        return Err(refused(
            path,
            "is a symlink; a run directory must be a real directory",
        ));
    }
    if !meta.is_dir() {
        return Err(refused(path, "is not a directory"));
    }
    if meta.uid() != geteuid().as_raw() {
        return Err(refused(
            path,
            &format!(
                "belongs to uid {}, not to us (uid {}); refusing to keep secrets in it",
                meta.uid(),
                geteuid()
            ),
        ));
    }
    if meta.permissions().mode() & 0o7777 != DIR_MODE {
        fs::set_permissions(path, fs::Permissions::from_mode(DIR_MODE))?;
    }
    Ok(())
}

/// Creates `path` and its missing parents, each it creates 0700; `path` itself, created or
/// found, must be a real directory (not a symlink) owned by us and is left 0700. Parents that
/// exist already are not changed (`/tmp`, the repository).
pub fn create_dir(path: &Path) -> io::Result<()> {
    let mut prefix = PathBuf::new();
    for component in path.components() {
        prefix.push(component);
        if matches!(component, Component::RootDir | Component::Prefix(_)) {
            continue;
        }
        match fs::symlink_metadata(&prefix) {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                match DirBuilder::new().mode(DIR_MODE).create(&prefix) {
                    Ok(()) => claim_dir(&prefix)?,
                    // Someone made it meanwhile: judged below if it is `path`.
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(e) => return Err(e),
                }
            }
            Err(e) => return Err(e),
        }
    }
    claim_dir(path)
}

/// Options that create a file anew, 0600, never through a symlink.
fn new_file_options() -> OpenOptions {
    let mut o = OpenOptions::new();
    o.write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC).bits());
    o
}

/// Creates `path` anew (an old file or symlink of that name is removed first, never
/// followed), 0600.
pub fn create_file(path: &Path) -> io::Result<File> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let f = new_file_options().open(path)?;
    // The umask may have taken bits away, never added: make it exactly 0600.
    f.set_permissions(fs::Permissions::from_mode(FILE_MODE))?;
    Ok(f)
}

/// [`create_file`] holding `bytes`.
pub fn write_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut f = create_file(path)?;
    f.write_all(bytes)?;
    f.flush()
}

/// Writes `path` atomically (a new 0600 temporary file renamed over it).
pub fn replace_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let name = path
        .file_name()
        .ok_or_else(|| refused(path, "has no file name"))?;
    let mut tmp_name = name.to_os_string();
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    write_file(&tmp, bytes)?;
    fs::rename(&tmp, path)
}

/// Opens `path` for reading without following a symlink at its last component.
pub fn open_read(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags((OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC).bits())
        .open(path)
}

/// Reads a whole file through [`open_read`].
pub fn read_file(path: &Path) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    io::Read::read_to_end(&mut open_read(path)?, &mut out)?;
    Ok(out)
}

/// Binds a control socket at `path` (a stale file of that name removed first) and makes it
/// 0600. Its directory should be 0700 ([`create_dir`]): that, not this mode, is what keeps
/// other users out between `bind` and `chmod`.
pub fn bind_socket(path: &Path) -> io::Result<UnixListener> {
    match fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    fs::set_permissions(path, fs::Permissions::from_mode(FILE_MODE))?;
    Ok(listener)
}

/// Makes an existing file or socket 0600 (QEMU's QMP socket, which QEMU binds itself).
pub fn restrict(path: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(path)?;
    if meta.file_type().is_symlink() {
        return Err(refused(path, "is a symlink"));
    }
    fs::set_permissions(path, fs::Permissions::from_mode(FILE_MODE))
}

/// Sets this process's umask to 077: whatever it and its children (QEMU) create is
/// owner-only even where no mode is given. For the long-lived daemons (cluster, front-end).
pub fn owner_only_umask() {
    umask(Mode::from_bits_truncate(0o077));
}

/// A control-socket client that is neither our user nor root.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerRefused {
    /// The peer's uid.
    ForeignUser(u32),
    /// The kernel would not say who the peer is.
    Unknown,
}

impl fmt::Display for PeerRefused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerRefused::ForeignUser(uid) => write!(
                f,
                "uid {uid} may not use this socket (only uid {} and root)",
                geteuid()
            ),
            PeerRefused::Unknown => f.write_str("the peer's credentials are unknown"),
        }
    }
}

impl std::error::Error for PeerRefused {}

/// Whether the process at the other end of `stream` may use a control socket: its uid (from
/// `SO_PEERCRED`, fixed at connect time) is ours or root's. Answers the uid.
pub fn peer_allowed(stream: &UnixStream) -> Result<u32, PeerRefused> {
    let cred = getsockopt(stream, PeerCredentials).map_err(|_| PeerRefused::Unknown)?;
    let uid = cred.uid();
    if uid == geteuid().as_raw() || uid == 0 {
        Ok(uid)
    } else {
        Err(PeerRefused::ForeignUser(uid))
    }
}

/// Answers a refused control-socket client with one line and closes, first reading (for at
/// most 100 ms) what it sent, so the close does not reset the connection over the answer.
pub fn refuse_peer(mut conn: UnixStream, line: &str) {
    let _ = conn.set_write_timeout(Some(std::time::Duration::from_millis(100)));
    let _ = writeln!(conn, "{line}");
    let _ = conn.shutdown(std::net::Shutdown::Write);
    let _ = conn.set_read_timeout(Some(std::time::Duration::from_millis(100)));
    let mut sink = [0u8; 4096];
    let _ = io::Read::read(&mut conn, &mut sink);
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    fn scratch(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("unipeer-owner-only-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        d
    }

    fn mode(p: &Path) -> u32 {
        fs::symlink_metadata(p).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn directories_are_created_and_tightened_to_0700() {
        let base = scratch("dirs");
        let deep = base.join("a").join("b");
        create_dir(&deep).unwrap();
        for d in [&base, &base.join("a"), &deep] {
            assert_eq!(mode(d), 0o700, "{}", d.display());
        }
        // An existing loose directory is tightened.
        fs::set_permissions(&deep, fs::Permissions::from_mode(0o755)).unwrap();
        create_dir(&deep).unwrap();
        assert_eq!(mode(&deep), 0o700);
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn a_symlinked_run_directory_is_refused() {
        let base = scratch("symlink-dir");
        create_dir(&base).unwrap();
        let elsewhere = base.join("elsewhere");
        create_dir(&elsewhere).unwrap();
        let link = base.join("run");
        symlink(&elsewhere, &link).unwrap();
        let e = create_dir(&link).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::PermissionDenied, "{e}");
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn files_are_0600_and_never_written_through_a_symlink() {
        let base = scratch("files");
        create_dir(&base).unwrap();
        let victim = base.join("victim");
        fs::write(&victim, b"precious").unwrap();
        let blob = base.join("n1.config");
        symlink(&victim, &blob).unwrap();
        write_file(&blob, b"secret").unwrap();
        assert_eq!(fs::read(&victim).unwrap(), b"precious");
        assert!(
            !fs::symlink_metadata(&blob)
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert_eq!(mode(&blob), 0o600);
        assert_eq!(read_file(&blob).unwrap(), b"secret");
        // Reading refuses a symlink.
        let link = base.join("link");
        symlink(&blob, &link).unwrap();
        assert!(open_read(&link).is_err());
        replace_file(&base.join("state.json"), b"{}").unwrap();
        assert_eq!(mode(&base.join("state.json")), 0o600);
        fs::remove_dir_all(&base).unwrap();
    }

    #[test]
    fn sockets_are_0600_and_our_own_uid_passes_the_peer_check() {
        let base = scratch("sock");
        create_dir(&base).unwrap();
        let path = base.join("c.sock");
        let listener = bind_socket(&path).unwrap();
        assert_eq!(mode(&path), 0o600);
        let _client = UnixStream::connect(&path).unwrap();
        let (server_side, _) = listener.accept().unwrap();
        assert_eq!(peer_allowed(&server_side), Ok(geteuid().as_raw()));
        fs::remove_dir_all(&base).unwrap();
    }
}
