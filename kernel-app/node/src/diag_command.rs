//! The diagnostic TCP port's command language, host-testable: one table of commands (name,
//! arity, access, test-only), a parser that checks arity and every number's range before the
//! kernel acts on a line, and the operator's challenge-response.
//!
//! Access: `stats`, `ping`, `help`, `quit`, `overlay`, `leafset`, `jobs`, `jobs tasks` and the
//! `auth` exchange are open; every command that changes state or costs the node work needs an
//! authenticated session. Authentication: the client asks `auth?`, the node answers
//! `auth-challenge <64 hex>` (a fresh 32-byte nonce), the client sends
//! `auth <hex of HMAC-SHA256(operator key, OPERATOR_MAC_LABEL || nonce)>`. A nonce answers one
//! attempt only. The operator key comes in the launch config ([`OPERATOR_KEY_EXTRA`]); a node
//! without one refuses every operator command.

use alloc::vec::Vec;
use core::fmt;

use hmac::{Hmac, Mac};
use sha2::Sha256;

/// Launch-config `extra` entry holding the 32-byte operator key.
pub const OPERATOR_KEY_EXTRA: &str = "operator_key";
/// Domain label prefixed to the nonce in the operator's MAC.
pub const OPERATOR_MAC_LABEL: &[u8] = b"unipeer diag operator v1\0";
/// Length of the operator key, the nonce and the MAC.
pub const OPERATOR_KEY_LEN: usize = 32;
/// Most tasks one `job-primes` may split into.
pub const PRIMES_TASKS_MAX: u32 = 256;
/// Most tasks one `job-sha256` may have.
pub const SHA256_TASKS_MAX: u32 = 16;
/// Most datagrams per size one `bench-seal` runs (it holds the event loop while it runs).
pub const BENCH_SEAL_MAX: u32 = 20_000;
/// Most handshakes one `bench-handshake` runs (it holds the event loop: ~10 ms each under TCG).
pub const BENCH_HANDSHAKE_MAX: u32 = 500;
/// Most echo round trips one `probe` may ask for.
pub const PROBE_COUNT_MAX: u32 = 1000;
/// Round trips of a `probe` without a count.
pub const PROBE_COUNT_DEFAULT: u32 = 10;

type HmacSha256 = Hmac<Sha256>;

/// Who may run a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Anyone who reaches the port (read-only, cheap).
    Open,
    /// Only an authenticated operator session.
    Operator,
}

/// One row of the command table.
#[derive(Clone, Copy, Debug)]
pub struct CommandSpec {
    pub name: &'static str,
    /// Words after the name: at least this many ...
    pub args_min: usize,
    /// ... and at most this many (`usize::MAX`: the rest of the line).
    pub args_max: usize,
    pub access: Access,
    /// Compiled only into test images (the kernel's `diag-test` feature).
    pub test_only: bool,
    pub usage: &'static str,
}

const fn spec(
    name: &'static str,
    args_min: usize,
    args_max: usize,
    access: Access,
    test_only: bool,
    usage: &'static str,
) -> CommandSpec {
    CommandSpec {
        name,
        args_min,
        args_max,
        access,
        test_only,
        usage,
    }
}

use Access::{Open, Operator};

/// Every diagnostic command. `jobs tasks` is `jobs` with one argument.
pub const COMMANDS: &[CommandSpec] = &[
    spec("stats", 0, 0, Open, false, "stats"),
    spec("ping", 0, 0, Open, false, "ping"),
    spec("help", 0, 0, Open, false, "help"),
    spec("quit", 0, 0, Open, false, "quit"),
    spec("auth?", 0, 0, Open, false, "auth?"),
    spec("auth", 1, 1, Open, false, "auth MAC_HEX"),
    spec("overlay", 0, 0, Open, false, "overlay"),
    spec("leafset", 0, 0, Open, false, "leafset"),
    spec("jobs", 0, 1, Open, false, "jobs [tasks]"),
    spec("lookup", 1, 1, Operator, false, "lookup KEY"),
    spec("get", 1, 1, Operator, false, "get KEY"),
    spec("put", 2, usize::MAX, Operator, false, "put KEY VALUE"),
    spec("revoke", 1, 1, Operator, false, "revoke HEX"),
    spec("probe", 1, 2, Operator, false, "probe IPV4 [COUNT]"),
    spec("shutdown", 0, 0, Operator, false, "shutdown"),
    spec(
        "job-primes",
        3,
        3,
        Operator,
        true,
        "job-primes START END TASKS",
    ),
    spec("job-sha256", 1, 1, Operator, true, "job-sha256 TASKS"),
    spec("bench-seal", 1, 1, Operator, true, "bench-seal N"),
    spec("apps", 0, 0, Open, false, "apps"),
    spec("app-status", 1, 1, Open, false, "app-status NAME"),
    spec(
        "app-create",
        5,
        5,
        Operator,
        false,
        "app-create NAME SERVICE REPLICAS async|sync PORT",
    ),
    spec("app-delete", 1, 1, Operator, false, "app-delete NAME"),
    spec("bench-handshake", 1, 1, Operator, true, "bench-handshake N"),
];

/// Most slaves `app-create` may ask for.
pub const APP_REPLICAS_MAX: u8 = 6;
/// Longest instance name.
pub const APP_NAME_MAX: usize = 64;

/// Whether `name` may name an instance: 1..=64 bytes of `[A-Za-z0-9_.-]`.
pub fn valid_app_name(name: &str) -> bool {
    (1..=APP_NAME_MAX).contains(&name.len())
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'_' | b'-' | b'.'))
}

/// A parsed, range-checked command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DiagCommand<'a> {
    Stats,
    Ping,
    Help,
    Quit,
    /// `auth?`: asks for a challenge.
    AuthChallenge,
    /// `auth MAC`: answers the outstanding challenge.
    Auth {
        mac: [u8; OPERATOR_KEY_LEN],
    },
    Jobs,
    JobsTasks,
    /// `overlay`, `leafset`, `lookup`, `get`, `put`, `revoke`: the words go to the overlay
    /// service (arity checked here).
    Overlay {
        words: Vec<&'a str>,
    },
    Probe {
        target: [u8; 4],
        count: u32,
    },
    Shutdown,
    /// Counts primes in `[start, end)` split in `tasks` tasks; `start < end`, `tasks` in
    /// `1..=PRIMES_TASKS_MAX`, `tasks <= end - start`.
    JobPrimes {
        start: u64,
        end: u64,
        tasks: u32,
    },
    JobSha256 {
        tasks: u32,
    },
    BenchSeal {
        n: u32,
    },
    /// `apps`: the replicated instances this node knows.
    Apps,
    AppStatus {
        name: &'a str,
    },
    /// `app-create`: name checked by [`valid_app_name`], replicas `0..=APP_REPLICAS_MAX`,
    /// port `1..=65535` and not one of the node's own service ports (the kernel checks that).
    AppCreate {
        name: &'a str,
        service: &'a str,
        replicas: u8,
        sync: bool,
        port: u16,
    },
    AppDelete {
        name: &'a str,
    },
    BenchHandshake {
        n: u32,
    },
}

impl DiagCommand<'_> {
    /// The command's table row.
    pub fn spec(&self) -> &'static CommandSpec {
        let name = match self {
            DiagCommand::Stats => "stats",
            DiagCommand::Ping => "ping",
            DiagCommand::Help => "help",
            DiagCommand::Quit => "quit",
            DiagCommand::AuthChallenge => "auth?",
            DiagCommand::Auth { .. } => "auth",
            DiagCommand::Jobs | DiagCommand::JobsTasks => "jobs",
            DiagCommand::Overlay { words } => words.first().copied().unwrap_or("overlay"),
            DiagCommand::Probe { .. } => "probe",
            DiagCommand::Shutdown => "shutdown",
            DiagCommand::JobPrimes { .. } => "job-primes",
            DiagCommand::JobSha256 { .. } => "job-sha256",
            DiagCommand::BenchSeal { .. } => "bench-seal",
            DiagCommand::Apps => "apps",
            DiagCommand::AppStatus { .. } => "app-status",
            DiagCommand::AppCreate { .. } => "app-create",
            DiagCommand::AppDelete { .. } => "app-delete",
            DiagCommand::BenchHandshake { .. } => "bench-handshake",
        };
        find(name).expect("every variant has a table row")
    }

    pub fn access(&self) -> Access {
        self.spec().access
    }
}

fn find(name: &str) -> Option<&'static CommandSpec> {
    COMMANDS.iter().find(|c| c.name == name)
}

/// Why a line was refused. The `Display` text is the error line's message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommandError {
    /// Not UTF-8.
    NotText,
    /// No such command.
    Unknown,
    /// Wrong number of words; carries the usage.
    Arity { usage: &'static str },
    /// A word that must be a number is not one, or is out of range.
    BadNumber {
        usage: &'static str,
        why: &'static str,
    },
    /// A word that must be an IPv4 address or hex string is not one.
    BadValue {
        usage: &'static str,
        why: &'static str,
    },
}

impl fmt::Display for CommandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommandError::NotText => f.write_str("command is not UTF-8 text"),
            CommandError::Unknown => f.write_str("unknown command (try help)"),
            CommandError::Arity { usage } => write!(f, "usage: {usage}"),
            CommandError::BadNumber { usage, why } | CommandError::BadValue { usage, why } => {
                write!(f, "{why} (usage: {usage})")
            }
        }
    }
}

impl core::error::Error for CommandError {}

fn number<T: core::str::FromStr>(
    word: &str,
    usage: &'static str,
    why: &'static str,
) -> Result<T, CommandError> {
    word.parse()
        .map_err(|_| CommandError::BadNumber { usage, why })
}

/// Parses `a.b.c.d`.
pub fn parse_ipv4(s: &str) -> Option<[u8; 4]> {
    let mut out = [0u8; 4];
    let mut parts = s.split('.');
    for b in out.iter_mut() {
        let p = parts.next()?;
        if p.is_empty() || p.len() > 3 || !p.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        *b = p.parse().ok()?;
    }
    parts.next().is_none().then_some(out)
}

/// Decodes exactly `N` bytes of hex.
pub fn parse_hex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let bytes = s.as_bytes();
    if bytes.len() != 2 * N {
        return None;
    }
    let nibble = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    let mut out = [0u8; N];
    for (i, o) in out.iter_mut().enumerate() {
        *o = (nibble(bytes[2 * i])? << 4) | nibble(bytes[2 * i + 1])?;
    }
    Some(out)
}

/// Parses one command line (without its newline). An empty line is `stats`.
pub fn parse(line: &[u8]) -> Result<DiagCommand<'_>, CommandError> {
    let text = core::str::from_utf8(line).map_err(|_| CommandError::NotText)?;
    let words: Vec<&str> = text.split_ascii_whitespace().collect();
    let Some((&name, args)) = words.split_first() else {
        return Ok(DiagCommand::Stats);
    };
    let spec = find(name).ok_or(CommandError::Unknown)?;
    let usage = spec.usage;
    if args.len() < spec.args_min || args.len() > spec.args_max {
        return Err(CommandError::Arity { usage });
    }
    Ok(match name {
        "stats" => DiagCommand::Stats,
        "ping" => DiagCommand::Ping,
        "help" => DiagCommand::Help,
        "quit" => DiagCommand::Quit,
        "shutdown" => DiagCommand::Shutdown,
        "auth?" => DiagCommand::AuthChallenge,
        "auth" => DiagCommand::Auth {
            mac: parse_hex(args[0]).ok_or(CommandError::BadValue {
                usage,
                why: "the MAC must be 64 hex digits",
            })?,
        },
        "jobs" => match args {
            [] => DiagCommand::Jobs,
            ["tasks"] => DiagCommand::JobsTasks,
            _ => return Err(CommandError::Arity { usage }),
        },
        "overlay" | "leafset" | "lookup" | "get" | "put" | "revoke" => {
            DiagCommand::Overlay { words }
        }
        "probe" => {
            let target = parse_ipv4(args[0]).ok_or(CommandError::BadValue {
                usage,
                why: "not an IPv4 address",
            })?;
            let count = match args.get(1) {
                Some(w) => number::<u32>(w, usage, "COUNT must be a number")?,
                None => PROBE_COUNT_DEFAULT,
            };
            if !(1..=PROBE_COUNT_MAX).contains(&count) {
                return Err(CommandError::BadNumber {
                    usage,
                    why: "COUNT must be 1..=1000",
                });
            }
            DiagCommand::Probe { target, count }
        }
        "job-primes" => {
            let start: u64 = number(args[0], usage, "START must be a u64")?;
            let end: u64 = number(args[1], usage, "END must be a u64")?;
            let tasks: u32 = number(args[2], usage, "TASKS must be a number")?;
            if start >= end {
                return Err(CommandError::BadNumber {
                    usage,
                    why: "START must be below END",
                });
            }
            if !(1..=PRIMES_TASKS_MAX).contains(&tasks) || u64::from(tasks) > end - start {
                return Err(CommandError::BadNumber {
                    usage,
                    why: "TASKS must be 1..=256 and at most END - START",
                });
            }
            DiagCommand::JobPrimes { start, end, tasks }
        }
        "job-sha256" => {
            let tasks: u32 = number(args[0], usage, "TASKS must be a number")?;
            if !(1..=SHA256_TASKS_MAX).contains(&tasks) {
                return Err(CommandError::BadNumber {
                    usage,
                    why: "TASKS must be 1..=16",
                });
            }
            DiagCommand::JobSha256 { tasks }
        }
        "bench-seal" => {
            let n: u32 = number(args[0], usage, "N must be a number")?;
            if !(1..=BENCH_SEAL_MAX).contains(&n) {
                return Err(CommandError::BadNumber {
                    usage,
                    why: "N must be 1..=20000",
                });
            }
            DiagCommand::BenchSeal { n }
        }
        "apps" => DiagCommand::Apps,
        "app-status" | "app-delete" | "app-create" => {
            let name = args[0];
            if !valid_app_name(name) {
                return Err(CommandError::BadValue {
                    usage,
                    why: "NAME must be 1..=64 of A-Z a-z 0-9 _ . -",
                });
            }
            match spec.name {
                "app-status" => DiagCommand::AppStatus { name },
                "app-delete" => DiagCommand::AppDelete { name },
                _ => {
                    let service = args[1];
                    if !valid_app_name(service) || service.len() > 24 {
                        return Err(CommandError::BadValue {
                            usage,
                            why: "SERVICE must be a short name",
                        });
                    }
                    let replicas: u8 = number(args[2], usage, "REPLICAS must be a number")?;
                    if replicas > APP_REPLICAS_MAX {
                        return Err(CommandError::BadNumber {
                            usage,
                            why: "REPLICAS must be 0..=6",
                        });
                    }
                    let sync = match args[3] {
                        "async" => false,
                        "sync" => true,
                        _ => {
                            return Err(CommandError::BadValue {
                                usage,
                                why: "the mode is async or sync",
                            });
                        }
                    };
                    let port: u16 = number(args[4], usage, "PORT must be 1..=65535")?;
                    if port == 0 {
                        return Err(CommandError::BadNumber {
                            usage,
                            why: "PORT must be 1..=65535",
                        });
                    }
                    DiagCommand::AppCreate {
                        name,
                        service,
                        replicas,
                        sync,
                        port,
                    }
                }
            }
        }
        "bench-handshake" => {
            let n: u32 = number(args[0], usage, "N must be a number")?;
            if !(1..=BENCH_HANDSHAKE_MAX).contains(&n) {
                return Err(CommandError::BadNumber {
                    usage,
                    why: "N must be 1..=500",
                });
            }
            DiagCommand::BenchHandshake { n }
        }
        _ => return Err(CommandError::Unknown),
    })
}

/// `[start, end)` split into at most `tasks` consecutive ranges of equal width (the last may be
/// shorter), with checked arithmetic: `None` when the arguments are out of range.
pub fn split_range(start: u64, end: u64, tasks: u32) -> Option<Vec<(u64, u64)>> {
    if start >= end || tasks == 0 || tasks > PRIMES_TASKS_MAX {
        return None;
    }
    let span = (end - start).div_ceil(u64::from(tasks));
    let mut out = Vec::with_capacity(tasks as usize);
    let mut a = start;
    while a < end {
        let b = a.checked_add(span).map_or(end, |b| b.min(end));
        out.push((a, b));
        a = b;
    }
    Some(out)
}

/// The `help` text: the commands this build has, open ones first.
pub fn help_text(with_test_commands: bool) -> alloc::string::String {
    let mut out = alloc::string::String::from("commands (open):");
    for access in [Open, Operator] {
        if access == Operator {
            out.push_str("\ncommands (after auth):");
        }
        for c in COMMANDS
            .iter()
            .filter(|c| c.access == access && (with_test_commands || !c.test_only))
        {
            out.push(' ');
            out.push_str(c.usage);
            out.push(',');
        }
        out.pop();
    }
    out.push('\n');
    out
}

/// The MAC an operator answers a challenge with.
pub fn operator_mac(key: &[u8; OPERATOR_KEY_LEN], nonce: &[u8; OPERATOR_KEY_LEN]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(OPERATOR_MAC_LABEL);
    mac.update(nonce);
    mac.finalize().into_bytes().into()
}

/// The node's side of the operator challenge-response for one session.
#[derive(Default)]
pub struct OperatorAuth {
    nonce: Option<[u8; OPERATOR_KEY_LEN]>,
    authenticated: bool,
    failures: u32,
}

/// Why an `auth` line was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OperatorAuthError {
    /// The node has no operator key: operator commands are off.
    NoKey,
    /// `auth` without an outstanding `auth?`.
    NoChallenge,
    /// The MAC does not match the challenge.
    BadMac,
}

impl fmt::Display for OperatorAuthError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            OperatorAuthError::NoKey => "this node has no operator key: operator commands are off",
            OperatorAuthError::NoChallenge => "no challenge outstanding (send auth? first)",
            OperatorAuthError::BadMac => "authentication failed",
        })
    }
}

impl core::error::Error for OperatorAuthError {}

impl OperatorAuth {
    /// Starts a challenge with a fresh `nonce` (from the node's CSPRNG); replaces any earlier one.
    pub fn challenge(&mut self, nonce: [u8; OPERATOR_KEY_LEN]) -> [u8; OPERATOR_KEY_LEN] {
        self.nonce = Some(nonce);
        nonce
    }

    /// Checks the answer to the outstanding challenge (consumed either way), in constant time.
    pub fn answer(
        &mut self,
        key: Option<&[u8; OPERATOR_KEY_LEN]>,
        mac: &[u8; OPERATOR_KEY_LEN],
    ) -> Result<(), OperatorAuthError> {
        let key = key.ok_or(OperatorAuthError::NoKey)?;
        let nonce = self.nonce.take().ok_or(OperatorAuthError::NoChallenge)?;
        let mut check = HmacSha256::new_from_slice(key).expect("HMAC takes any key length");
        check.update(OPERATOR_MAC_LABEL);
        check.update(&nonce);
        if check.verify_slice(mac).is_ok() {
            self.authenticated = true;
            Ok(())
        } else {
            self.failures = self.failures.saturating_add(1);
            Err(OperatorAuthError::BadMac)
        }
    }

    pub fn authenticated(&self) -> bool {
        self.authenticated
    }

    /// Failed answers in this session.
    pub fn failures(&self) -> u32 {
        self.failures
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;
    use alloc::string::String;

    #[test]
    fn app_commands_parse_with_their_bounds() {
        assert_eq!(
            parse(b"app-create cache kv 2 sync 6379"),
            Ok(DiagCommand::AppCreate {
                name: "cache",
                service: "kv",
                replicas: 2,
                sync: true,
                port: 6379
            })
        );
        assert_eq!(parse(b"apps"), Ok(DiagCommand::Apps));
        assert_eq!(
            parse(b"app-status a.b-c_1"),
            Ok(DiagCommand::AppStatus { name: "a.b-c_1" })
        );
        for bad in [
            &b"app-create cache kv 7 sync 6379"[..],
            b"app-create cache kv 2 fast 6379",
            b"app-create cache kv 2 sync 0",
            b"app-create cache kv 2 sync 65536",
            b"app-create ca/che kv 2 sync 6379",
            b"app-create cache kv 2 sync",
            b"app-delete",
            b"app-status a b",
        ] {
            assert!(parse(bad).is_err(), "{:?}", core::str::from_utf8(bad));
        }
        assert_eq!(find("app-create").map(|c| c.access), Some(Operator));
        assert_eq!(find("app-delete").map(|c| c.access), Some(Operator));
        assert_eq!(find("apps").map(|c| c.access), Some(Open));
    }

    #[test]
    fn the_overflowing_primes_line_is_an_error() {
        // Finding 3: this line made the old kernel loop on `a + span` and exhaust its heap.
        assert!(matches!(
            parse(b"job-primes 0 18446744073709551615 256"),
            Ok(DiagCommand::JobPrimes { .. })
        ));
        let ranges = split_range(0, u64::MAX, 256).expect("in range");
        assert_eq!(ranges.len(), 256);
        assert_eq!(ranges.first().map(|r| r.0), Some(0));
        assert_eq!(ranges.last().map(|r| r.1), Some(u64::MAX));
        assert!(
            ranges
                .windows(2)
                .all(|w| w[0].1 == w[1].0 && w[0].0 < w[0].1)
        );
        for bad in [
            &b"job-primes 5 5 1"[..],
            b"job-primes 9 5 1",
            b"job-primes 0 10 0",
            b"job-primes 0 10 257",
            b"job-primes 0 3 4",
            b"job-primes 0 18446744073709551616 2",
            b"job-primes -1 5 1",
            b"job-primes 0 5",
            b"job-primes 0 5 1 extra",
            b"job-sha256 0",
            b"job-sha256 17",
            b"job-sha256 4294967296",
            b"bench-seal 0",
            b"bench-seal 20001",
            b"bench-handshake 0",
            b"bench-handshake 501",
            b"probe 10.0.0.1 0",
            b"probe 10.0.0.1 1001",
            b"probe 10.0.0.256",
            b"probe 10.0.0",
            b"probe +1.2.3.4",
            b"auth 00",
        ] {
            assert!(
                parse(bad).is_err(),
                "{:?} was accepted",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn split_range_covers_exactly_with_checked_steps() {
        for (s, e, t) in [
            (0u64, 10u64, 3u32),
            (5, 6, 1),
            (u64::MAX - 10, u64::MAX, 10),
            (u64::MAX - 1000, u64::MAX, 256),
            (0, 1 << 40, 7),
        ] {
            let r = split_range(s, e, t).unwrap();
            assert!(!r.is_empty() && r.len() <= t as usize, "{s} {e} {t}: {r:?}");
            assert_eq!(r[0].0, s);
            assert_eq!(r.last().unwrap().1, e);
            assert!(r.windows(2).all(|w| w[0].1 == w[1].0));
        }
        assert!(split_range(3, 3, 1).is_none());
        assert!(split_range(0, 3, 0).is_none());
        assert!(split_range(0, 3, 257).is_none());
    }

    #[test]
    fn access_flags_follow_the_table() {
        let open = [
            "", "stats", "ping", "help", "quit", "auth?", "overlay", "leafset", "jobs",
        ];
        for l in open {
            let c = parse(l.as_bytes()).unwrap();
            assert_eq!(c.access(), Access::Open, "{l}");
        }
        let operator = [
            "shutdown",
            "put k v",
            "get k",
            "lookup k",
            "revoke 00",
            "probe 10.0.0.2",
            "job-primes 0 10 2",
            "job-sha256 1",
            "bench-seal 1",
        ];
        for l in operator {
            let c = parse(l.as_bytes()).unwrap();
            assert_eq!(c.access(), Access::Operator, "{l}");
        }
        assert!(parse(b"jobs tasks").is_ok_and(|c| c == DiagCommand::JobsTasks));
        assert_eq!(
            parse(b"jobs nope"),
            Err(CommandError::Arity {
                usage: "jobs [tasks]"
            })
        );
        assert_eq!(parse(b"frobnicate"), Err(CommandError::Unknown));
        assert_eq!(parse(&[0xff, 0xfe]), Err(CommandError::NotText));
        assert!(help_text(false).contains("shutdown") && !help_text(false).contains("bench-seal"));
        assert!(help_text(true).contains("bench-seal"));
    }

    #[test]
    fn operator_challenge_response() {
        let key = [7u8; 32];
        let mut auth = OperatorAuth::default();
        // No challenge yet, or no key on the node: refused.
        assert_eq!(
            auth.answer(Some(&key), &[0; 32]),
            Err(OperatorAuthError::NoChallenge)
        );
        let nonce = auth.challenge([1; 32]);
        assert_eq!(auth.answer(None, &[0; 32]), Err(OperatorAuthError::NoKey));
        // A wrong MAC fails and consumes the nonce: the right one is then too late.
        let nonce = auth.challenge(nonce);
        assert_eq!(
            auth.answer(Some(&key), &[0; 32]),
            Err(OperatorAuthError::BadMac)
        );
        let good = operator_mac(&key, &nonce);
        assert_eq!(
            auth.answer(Some(&key), &good),
            Err(OperatorAuthError::NoChallenge)
        );
        assert!(!auth.authenticated());
        // A MAC under another key fails.
        let nonce = auth.challenge([2; 32]);
        assert_eq!(
            auth.answer(Some(&key), &operator_mac(&[8; 32], &nonce)),
            Err(OperatorAuthError::BadMac)
        );
        // The right MAC for the fresh nonce passes.
        let nonce = auth.challenge([3; 32]);
        let mac = operator_mac(&key, &nonce);
        let line = format!(
            "auth {}",
            mac.iter().map(|b| format!("{b:02x}")).collect::<String>()
        );
        let Ok(DiagCommand::Auth { mac: parsed }) = parse(line.as_bytes()) else {
            panic!("{line} did not parse");
        };
        assert_eq!(auth.answer(Some(&key), &parsed), Ok(()));
        assert!(auth.authenticated());
        assert_eq!(auth.failures(), 2);
    }
}
