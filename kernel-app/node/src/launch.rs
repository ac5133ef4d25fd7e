//! The launch contract between the host and a guest: the per-VM configuration blob handed in
//! at boot, and the exit codes a guest leaves QEMU with.
//!
//! Blob layout (all integers little-endian):
//!
//! ```text
//! offset 0   magic      8 bytes  "UNIPEER\x01"
//! offset 8   version    u16      CONFIG_VERSION
//! offset 10  body_len   u32      length of the postcard body
//! offset 14  checksum   8 bytes  first 8 bytes of SHA-256(body)
//! offset 22  body       postcard-encoded LaunchConfig
//! ```
//!
//! One image serves every VM; everything that differs between VMs lives here.

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// First bytes of every launch-config blob.
pub const CONFIG_MAGIC: [u8; 8] = *b"UNIPEER\x01";
/// The blob format this build reads and writes.
pub const CONFIG_VERSION: u16 = 1;
/// Header length in bytes (magic, version, body length, checksum).
pub const CONFIG_HEADER_LEN: usize = 8 + 2 + 4 + 8;
/// Upper bound on a whole blob; keys and certificates fit with room to spare.
pub const CONFIG_MAX_LEN: usize = 64 * 1024;
/// Longest node or server name.
pub const NAME_MAX_LEN: usize = 64;
/// Most bootstrap peers a config may list.
pub const BOOTSTRAP_MAX: usize = 32;
/// Largest key or certificate blob.
pub const SECRET_MAX_LEN: usize = 8 * 1024;
/// Most extra key/value entries.
pub const EXTRA_MAX: usize = 16;
/// `extra` entry saying where `rng_seed` came from; [`SEED_FROM_OS`] marks the host OS's
/// random source (nodes with trust material refuse to start without it).
pub const SEED_SOURCE_EXTRA: &str = "seed_source";
/// The value of [`SEED_SOURCE_EXTRA`] for a seed read from the host OS's random source.
pub const SEED_FROM_OS: &[u8] = b"os";

/// Log verbosity handed to the guest (mirrors `log::LevelFilter`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogLevel {
    Off,
    Error,
    Warn,
    Info,
    Debug,
    Trace,
}

impl LogLevel {
    /// The matching `log` filter.
    pub fn to_filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Off => log::LevelFilter::Off,
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }

    /// Parses `off|error|warn|info|debug|trace`.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "off" => LogLevel::Off,
            "error" => LogLevel::Error,
            "warn" => LogLevel::Warn,
            "info" => LogLevel::Info,
            "debug" => LogLevel::Debug,
            "trace" => LogLevel::Trace,
            _ => return None,
        })
    }
}

/// An IPv4 address and UDP port of another node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerAddr {
    pub ipv4: [u8; 4],
    pub port: u16,
}

/// The guest's network settings.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetConfig {
    /// Ethernet address of the virtio NIC (the host sets the same one on QEMU's side).
    pub mac: [u8; 6],
    pub ipv4: [u8; 4],
    /// Prefix length of the local segment, 1..=32.
    pub prefix_len: u8,
    pub gateway: Option<[u8; 4]>,
    /// UDP port of the overlay.
    pub overlay_port: u16,
    /// UDP port of the diagnostic service.
    pub diag_udp_port: u16,
    /// TCP port of the diagnostic service.
    pub diag_tcp_port: u16,
    /// UDP echo port used for round-trip measurements.
    pub echo_port: u16,
}

/// Everything one VM needs to know at boot.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LaunchConfig {
    /// Human name of the node, unique in a cluster (`node-3`).
    pub node_name: String,
    /// Physical server (or host) this VM runs on; used for proximity.
    pub server_id: String,
    pub net: NetConfig,
    /// Nodes to contact when joining the overlay.
    pub bootstrap: Vec<PeerAddr>,
    /// Per-launch seed for the node's RNG.
    pub rng_seed: [u8; 32],
    /// Host wall-clock time at launch, milliseconds since the Unix epoch.
    pub launch_unix_ms: u64,
    /// The host's measured TSC frequency in kHz (0: none); the guest checks it before use.
    pub tsc_khz_hint: u64,
    pub log_level: LogLevel,
    /// Private key material of the node (room for the authentication work).
    pub node_key: Vec<u8>,
    /// The node's certificate chain (room for the authentication work).
    pub certificate: Vec<u8>,
    /// Named settings for later features, bounded in count and size.
    pub extra: Vec<(String, Vec<u8>)>,
}

/// Why a launch-config blob was rejected. The `Display` text is the message shown to a user.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// The blob is shorter than its header.
    TooShort { len: usize },
    /// The blob is larger than `CONFIG_MAX_LEN`.
    TooLong { len: usize },
    /// The first bytes are not `CONFIG_MAGIC`.
    BadMagic,
    /// The blob was written by an incompatible version.
    UnsupportedVersion { found: u16 },
    /// The header's body length disagrees with the blob.
    LengthMismatch { declared: usize, actual: usize },
    /// The body's checksum does not match.
    Checksum,
    /// The body is not a valid postcard `LaunchConfig`.
    Decode,
    /// A field is out of its allowed range.
    Invalid(&'static str),
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::TooShort { len } => {
                write!(
                    f,
                    "launch config is {len} bytes, shorter than its {CONFIG_HEADER_LEN}-byte header"
                )
            }
            ConfigError::TooLong { len } => {
                write!(
                    f,
                    "launch config is {len} bytes, over the {CONFIG_MAX_LEN}-byte limit"
                )
            }
            ConfigError::BadMagic => {
                write!(f, "launch config has a bad magic (not a unipeer config)")
            }
            ConfigError::UnsupportedVersion { found } => write!(
                f,
                "launch config version {found} is not supported (this build reads {CONFIG_VERSION})"
            ),
            ConfigError::LengthMismatch { declared, actual } => write!(
                f,
                "launch config declares a {declared}-byte body but carries {actual} bytes"
            ),
            ConfigError::Checksum => write!(f, "launch config checksum mismatch (corrupted blob)"),
            ConfigError::Decode => write!(f, "launch config body does not decode"),
            ConfigError::Invalid(what) => write!(f, "launch config is invalid: {what}"),
        }
    }
}

impl core::error::Error for ConfigError {}

fn checksum(body: &[u8]) -> [u8; 8] {
    let digest = Sha256::digest(body);
    let mut out = [0u8; 8];
    out.copy_from_slice(&digest[..8]);
    out
}

impl LaunchConfig {
    /// Checks every bound and range; `encode` and `decode` both call it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= NAME_MAX_LEN
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        };
        if !name_ok(&self.node_name) {
            return Err(ConfigError::Invalid(
                "node name must be 1-64 characters of [A-Za-z0-9._-]",
            ));
        }
        if !name_ok(&self.server_id) {
            return Err(ConfigError::Invalid(
                "server id must be 1-64 characters of [A-Za-z0-9._-]",
            ));
        }
        let n = &self.net;
        if n.prefix_len == 0 || n.prefix_len > 32 {
            return Err(ConfigError::Invalid("prefix length must be 1..=32"));
        }
        if n.ipv4 == [0; 4] || n.ipv4[0] >= 224 {
            return Err(ConfigError::Invalid(
                "IPv4 address must be a unicast address",
            ));
        }
        if n.mac[0] & 1 != 0 || n.mac == [0; 6] {
            return Err(ConfigError::Invalid(
                "MAC address must be a non-zero unicast address",
            ));
        }
        let ports = [
            n.overlay_port,
            n.diag_udp_port,
            n.diag_tcp_port,
            n.echo_port,
        ];
        if ports.contains(&0) {
            return Err(ConfigError::Invalid("ports must be non-zero"));
        }
        let udp = [n.overlay_port, n.diag_udp_port, n.echo_port];
        if udp[0] == udp[1] || udp[0] == udp[2] || udp[1] == udp[2] {
            return Err(ConfigError::Invalid("UDP ports must differ"));
        }
        if self.bootstrap.len() > BOOTSTRAP_MAX {
            return Err(ConfigError::Invalid("too many bootstrap peers"));
        }
        if self
            .bootstrap
            .iter()
            .any(|p| p.port == 0 || p.ipv4 == [0; 4])
        {
            return Err(ConfigError::Invalid(
                "bootstrap peer needs an address and a port",
            ));
        }
        if self.node_key.len() > SECRET_MAX_LEN || self.certificate.len() > SECRET_MAX_LEN {
            return Err(ConfigError::Invalid("key or certificate too large"));
        }
        if self.extra.len() > EXTRA_MAX
            || self
                .extra
                .iter()
                .any(|(k, v)| k.is_empty() || k.len() > NAME_MAX_LEN || v.len() > SECRET_MAX_LEN)
        {
            return Err(ConfigError::Invalid("too many or too large extra settings"));
        }
        Ok(())
    }

    /// Looks up a named extra setting.
    pub fn extra(&self, key: &str) -> Option<&[u8]> {
        self.extra
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_slice())
    }

    /// Whether the host marked `rng_seed` as read from its OS's random source.
    pub fn seed_from_os(&self) -> bool {
        self.extra(SEED_SOURCE_EXTRA) == Some(SEED_FROM_OS)
    }

    /// Encodes the config as a blob: header, then postcard body.
    pub fn encode(&self) -> Result<Vec<u8>, ConfigError> {
        self.validate()?;
        let body = postcard::to_allocvec(self).map_err(|_| ConfigError::Decode)?;
        let total = CONFIG_HEADER_LEN + body.len();
        if total > CONFIG_MAX_LEN {
            return Err(ConfigError::TooLong { len: total });
        }
        let mut out = Vec::with_capacity(total);
        out.extend_from_slice(&CONFIG_MAGIC);
        out.extend_from_slice(&CONFIG_VERSION.to_le_bytes());
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&checksum(&body));
        out.extend_from_slice(&body);
        Ok(out)
    }

    /// Decodes and validates a blob. Trailing bytes after the body are rejected
    /// (a PVH module may be padded by the loader: pass the exact module length).
    pub fn decode(blob: &[u8]) -> Result<Self, ConfigError> {
        if blob.len() > CONFIG_MAX_LEN {
            return Err(ConfigError::TooLong { len: blob.len() });
        }
        if blob.len() < CONFIG_HEADER_LEN {
            return Err(ConfigError::TooShort { len: blob.len() });
        }
        if blob[..8] != CONFIG_MAGIC {
            return Err(ConfigError::BadMagic);
        }
        let version = u16::from_le_bytes([blob[8], blob[9]]);
        if version != CONFIG_VERSION {
            return Err(ConfigError::UnsupportedVersion { found: version });
        }
        let declared = u32::from_le_bytes([blob[10], blob[11], blob[12], blob[13]]) as usize;
        let body = &blob[CONFIG_HEADER_LEN..];
        if declared != body.len() {
            return Err(ConfigError::LengthMismatch {
                declared,
                actual: body.len(),
            });
        }
        if blob[14..22] != checksum(body) {
            return Err(ConfigError::Checksum);
        }
        let (config, rest): (LaunchConfig, &[u8]) =
            postcard::take_from_bytes(body).map_err(|_| ConfigError::Decode)?;
        if !rest.is_empty() {
            return Err(ConfigError::Decode);
        }
        config.validate()?;
        Ok(config)
    }
}

/// How a guest leaves QEMU. Written to the `isa-debug-exit` port, which makes QEMU exit with
/// `(code << 1) | 1`, so no guest exit is ever QEMU's own 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum GuestExit {
    /// Orderly shutdown (asked for over the diagnostic port, or a test kernel finished).
    Success = 0x10,
    /// A Rust panic.
    Panic = 0x11,
    /// A CPU exception (page fault, general protection, ...).
    CpuException = 0x12,
    /// The launch config was missing or malformed.
    BadConfig = 0x13,
    /// No usable network device was found.
    NoNetwork = 0x14,
    /// The clock could not be calibrated.
    NoClock = 0x15,
    /// Boot-time resources (memory, heap) were insufficient.
    NoMemory = 0x16,
}

impl GuestExit {
    /// Port of QEMU's `isa-debug-exit` device (pinned by the launcher).
    pub const PORT: u16 = 0xf4;

    /// The process exit status QEMU reports for this guest exit.
    pub const fn qemu_status(self) -> i32 {
        ((self as i32) << 1) | 1
    }

    /// Maps a QEMU exit status back to a guest exit, if it is one.
    pub fn from_qemu_status(status: i32) -> Option<Self> {
        [
            GuestExit::Success,
            GuestExit::Panic,
            GuestExit::CpuException,
            GuestExit::BadConfig,
            GuestExit::NoNetwork,
            GuestExit::NoClock,
            GuestExit::NoMemory,
        ]
        .into_iter()
        .find(|e| e.qemu_status() == status)
    }

    /// A short description for users.
    pub fn describe(self) -> &'static str {
        match self {
            GuestExit::Success => "orderly shutdown",
            GuestExit::Panic => "guest panicked",
            GuestExit::CpuException => "guest CPU exception",
            GuestExit::BadConfig => "guest rejected its launch config",
            GuestExit::NoNetwork => "guest found no network device",
            GuestExit::NoClock => "guest could not calibrate its clock",
            GuestExit::NoMemory => "guest ran out of boot memory",
        }
    }
}

/// The line a guest prints on its serial console once its network is ready.
pub const READY_MARKER: &str = "unipeer-node ready";

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use alloc::vec;

    pub(crate) fn sample() -> LaunchConfig {
        LaunchConfig {
            node_name: "node-1".to_string(),
            server_id: "server-0".to_string(),
            net: NetConfig {
                mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
                ipv4: [10, 0, 2, 15],
                prefix_len: 24,
                gateway: Some([10, 0, 2, 2]),
                overlay_port: 7000,
                diag_udp_port: 7001,
                diag_tcp_port: 7002,
                echo_port: 7007,
            },
            bootstrap: vec![PeerAddr {
                ipv4: [10, 0, 2, 16],
                port: 7000,
            }],
            rng_seed: [7; 32],
            launch_unix_ms: 1_790_000_000_000,
            tsc_khz_hint: 2_400_000,
            log_level: LogLevel::Info,
            node_key: vec![1, 2, 3],
            certificate: vec![],
            extra: vec![("leaf_set".to_string(), vec![16])],
        }
    }

    #[test]
    fn round_trip() {
        let c = sample();
        let blob = c.encode().unwrap();
        assert_eq!(&blob[..8], &CONFIG_MAGIC);
        assert_eq!(LaunchConfig::decode(&blob).unwrap(), c);
        assert_eq!(c.extra("leaf_set"), Some(&[16u8][..]));
    }

    #[test]
    fn rejects_each_kind_of_damage() {
        let blob = sample().encode().unwrap();
        assert_eq!(
            LaunchConfig::decode(&blob[..10]),
            Err(ConfigError::TooShort { len: 10 })
        );
        let mut bad = blob.clone();
        bad[0] ^= 1;
        assert_eq!(LaunchConfig::decode(&bad), Err(ConfigError::BadMagic));
        let mut bad = blob.clone();
        bad[8] = 9;
        assert_eq!(
            LaunchConfig::decode(&bad),
            Err(ConfigError::UnsupportedVersion { found: 9 })
        );
        let mut bad = blob.clone();
        bad.push(0);
        assert!(matches!(
            LaunchConfig::decode(&bad),
            Err(ConfigError::LengthMismatch { .. })
        ));
        let mut bad = blob.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x40;
        assert_eq!(LaunchConfig::decode(&bad), Err(ConfigError::Checksum));
        let big = vec![0u8; CONFIG_MAX_LEN + 1];
        assert!(matches!(
            LaunchConfig::decode(&big),
            Err(ConfigError::TooLong { .. })
        ));
    }

    #[test]
    fn rejects_garbage_body_with_valid_header() {
        let body = [0xffu8; 40];
        let mut blob = vec![];
        blob.extend_from_slice(&CONFIG_MAGIC);
        blob.extend_from_slice(&CONFIG_VERSION.to_le_bytes());
        blob.extend_from_slice(&(body.len() as u32).to_le_bytes());
        blob.extend_from_slice(&checksum(&body));
        blob.extend_from_slice(&body);
        assert_eq!(LaunchConfig::decode(&blob), Err(ConfigError::Decode));
    }

    #[test]
    fn rejects_out_of_range_fields() {
        let mut c = sample();
        c.node_name = "bad name".to_string();
        assert!(matches!(c.encode(), Err(ConfigError::Invalid(_))));
        let mut c = sample();
        c.net.prefix_len = 33;
        assert!(matches!(c.encode(), Err(ConfigError::Invalid(_))));
        let mut c = sample();
        c.net.mac = [1, 0, 0, 0, 0, 1];
        assert!(matches!(c.encode(), Err(ConfigError::Invalid(_))));
        let mut c = sample();
        c.net.echo_port = c.net.overlay_port;
        assert!(matches!(c.encode(), Err(ConfigError::Invalid(_))));
        let mut c = sample();
        c.bootstrap = vec![
            PeerAddr {
                ipv4: [1, 2, 3, 4],
                port: 1
            };
            BOOTSTRAP_MAX + 1
        ];
        assert!(matches!(c.encode(), Err(ConfigError::Invalid(_))));
    }

    #[test]
    fn random_blobs_never_panic() {
        // A small xorshift keeps the test deterministic without a dependency.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let good = sample().encode().unwrap();
        for i in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut blob = good.clone();
            // Flip a few bytes, or truncate.
            for _ in 0..(x % 4) {
                let at = (x as usize >> 8) % blob.len();
                blob[at] = (x >> 32) as u8;
                x = x.rotate_left(9);
            }
            if i % 3 == 0 {
                blob.truncate((x as usize) % (blob.len() + 1));
            }
            // Whatever is accepted must be a canonical encoding of a valid config.
            if let Ok(c) = LaunchConfig::decode(&blob) {
                assert_eq!(c.encode().unwrap(), blob);
            }
        }
    }

    #[test]
    fn exit_codes_are_odd_and_distinct() {
        assert_eq!(GuestExit::Success.qemu_status(), 33);
        assert_eq!(GuestExit::from_qemu_status(33), Some(GuestExit::Success));
        assert_eq!(GuestExit::from_qemu_status(0), None);
        assert_eq!(GuestExit::from_qemu_status(35), Some(GuestExit::Panic));
    }
}
