//! `kv`: a replicated key-value store that speaks RESP2, so `redis-cli`, `redis-benchmark` and
//! Redis client libraries are its clients.
//!
//! Commands live in a table in Redis's style ([`COMMANDS`]: name, arity, flags, key positions);
//! unknown commands and wrong arities are refused from the table before dispatch, so every
//! command gets Redis's errors. Strings are the only type. Expiry uses the time the master
//! passes in; what it decides travels as absolute times in the change records (see
//! [`state`]), so slaves never read a clock. Past `maxmemory`, commands flagged `denyoom` get
//! Redis's `-OOM` error and nothing stored is touched.

pub mod glob;
pub mod resp;
pub mod state;

use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt::Write as _;
use unipeer_node::replication::service::{
    AgentError, AgentReply, Applied, BadRecord, ReplicatedService, ReplicationView, Reply, Request,
    RequestClass, RequestDecoder, Role, ServiceLimits, ServiceState, SnapshotChunk,
};

use resp::{array_header, bulk, error, integer, null, parse_i64, simple};
use state::{Change, KeySpace, cost};

/// The command flags of the table (Redis's names where COMMAND reports them).
pub mod flag {
    pub const WRITE: u16 = 1;
    pub const READONLY: u16 = 2;
    pub const DENYOOM: u16 = 4;
    pub const FAST: u16 = 8;
    /// Answered where the client is connected, from no state.
    pub const CONNECTION: u16 = 16;
    /// Answered by the replication agent (WAIT).
    pub const AGENT: u16 = 32;
}

/// What a table row dispatches to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Cmd {
    Ping,
    Echo,
    Get,
    Set,
    GetSet,
    Del,
    Exists,
    Incr,
    IncrBy,
    Decr,
    DecrBy,
    Append,
    StrLen,
    MGet,
    MSet,
    DbSize,
    Keys,
    FlushDb,
    Info,
    Wait,
    Command,
    Config,
    Client,
    Hello,
    Select,
    Quit,
}

/// One command: Redis's `redisCommand` row.
#[derive(Clone, Copy, Debug)]
pub struct CommandSpec {
    pub name: &'static str,
    /// Exact argument count including the name, or at least `-arity` when negative.
    pub arity: i32,
    pub flags: u16,
    pub first_key: i32,
    pub last_key: i32,
    pub step: i32,
    pub cmd: Cmd,
}

const fn c(
    name: &'static str,
    arity: i32,
    flags: u16,
    keys: (i32, i32, i32),
    cmd: Cmd,
) -> CommandSpec {
    CommandSpec {
        name,
        arity,
        flags,
        first_key: keys.0,
        last_key: keys.1,
        step: keys.2,
        cmd,
    }
}

use flag::*;
const NOKEYS: (i32, i32, i32) = (0, 0, 0);
const KEY1: (i32, i32, i32) = (1, 1, 1);
const ALLKEYS: (i32, i32, i32) = (1, -1, 1);

/// The command table.
pub const COMMANDS: &[CommandSpec] = &[
    c("ping", -1, FAST | CONNECTION, NOKEYS, Cmd::Ping),
    c("echo", 2, FAST | CONNECTION, NOKEYS, Cmd::Echo),
    c("get", 2, READONLY | FAST, KEY1, Cmd::Get),
    c("set", -3, WRITE | DENYOOM, KEY1, Cmd::Set),
    c("getset", 3, WRITE | DENYOOM | FAST, KEY1, Cmd::GetSet),
    c("del", -2, WRITE, ALLKEYS, Cmd::Del),
    c("exists", -2, READONLY | FAST, ALLKEYS, Cmd::Exists),
    c("incr", 2, WRITE | DENYOOM | FAST, KEY1, Cmd::Incr),
    c("incrby", 3, WRITE | DENYOOM | FAST, KEY1, Cmd::IncrBy),
    c("decr", 2, WRITE | DENYOOM | FAST, KEY1, Cmd::Decr),
    c("decrby", 3, WRITE | DENYOOM | FAST, KEY1, Cmd::DecrBy),
    c("append", 3, WRITE | DENYOOM, KEY1, Cmd::Append),
    c("strlen", 2, READONLY | FAST, KEY1, Cmd::StrLen),
    c("mget", -2, READONLY | FAST, ALLKEYS, Cmd::MGet),
    c("mset", -3, WRITE | DENYOOM, (1, -1, 2), Cmd::MSet),
    c("dbsize", 1, READONLY | FAST, NOKEYS, Cmd::DbSize),
    c("keys", 2, READONLY, NOKEYS, Cmd::Keys),
    c("flushdb", -1, WRITE, NOKEYS, Cmd::FlushDb),
    c("info", -1, READONLY, NOKEYS, Cmd::Info),
    c("wait", 3, AGENT, NOKEYS, Cmd::Wait),
    c("command", -1, CONNECTION, NOKEYS, Cmd::Command),
    c("config", -2, CONNECTION, NOKEYS, Cmd::Config),
    c("client", -2, CONNECTION, NOKEYS, Cmd::Client),
    c("hello", -1, FAST | CONNECTION, NOKEYS, Cmd::Hello),
    c("select", 2, FAST | CONNECTION, NOKEYS, Cmd::Select),
    c("quit", -1, FAST | CONNECTION, NOKEYS, Cmd::Quit),
];

/// The row for a command name, case-insensitively.
pub fn lookup(name: &[u8]) -> Option<&'static CommandSpec> {
    COMMANDS
        .iter()
        .find(|c| c.name.as_bytes().eq_ignore_ascii_case(name))
}

fn eq(a: &[u8], b: &str) -> bool {
    a.eq_ignore_ascii_case(b.as_bytes())
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// `-ERR wrong number of arguments for 'name' command`
pub fn arity_error(name: &str) -> Vec<u8> {
    error(&format!(
        "ERR wrong number of arguments for '{name}' command"
    ))
}

fn unknown_command(args: &[Vec<u8>]) -> Vec<u8> {
    // Redis: the name (128 bytes at most) and arguments quoted while under 128 bytes.
    let name: String = text(&args[0]).chars().take(128).collect();
    let mut rest = String::new();
    for a in &args[1..] {
        if rest.len() >= 128 {
            break;
        }
        let room = 128 - rest.len();
        let a: String = text(a).chars().take(room).collect();
        let _ = write!(rest, "'{a}' ");
    }
    error(&format!(
        "ERR unknown command '{name}', with args beginning with: {rest}"
    ))
}

fn unknown_subcommand(sub: &[u8], cmd: &str) -> Vec<u8> {
    let sub: String = text(sub).chars().take(128).collect();
    error(&format!("ERR unknown subcommand '{sub}'. Try {cmd} HELP."))
}

const NOT_INTEGER: &str = "ERR value is not an integer or out of range";
const SYNTAX: &str = "ERR syntax error";
const OOM: &str = "OOM command not allowed when used memory > 'maxmemory'.";
const TOO_BIG: &str = "ERR string exceeds maximum allowed size (proto-max-bulk-len)";

/// The `kv` service (stateless; each instance's state is a [`KvState`]).
#[derive(Clone, Copy, Debug, Default)]
pub struct Kv;

/// The service as the kernel and the simulator hand it in
/// (`ServiceSet::new(&[&kv::SERVICE])`).
pub static SERVICE: Kv = Kv;

impl Kv {
    fn check(&self, req: &Request) -> Result<&'static CommandSpec, Vec<u8>> {
        let Some(name) = req.args.first() else {
            return Err(error("ERR empty command"));
        };
        let Some(spec) = lookup(name) else {
            return Err(unknown_command(&req.args));
        };
        let n = req.args.len() as i32;
        if (spec.arity > 0 && n != spec.arity) || (spec.arity < 0 && n < -spec.arity) {
            return Err(arity_error(spec.name));
        }
        Ok(spec)
    }
}

fn command_info(spec: &CommandSpec) -> Vec<u8> {
    let mut out = array_header(10);
    out.extend(bulk(spec.name.as_bytes()));
    out.extend(integer(spec.arity as i64));
    let names = [
        (WRITE, "write"),
        (READONLY, "readonly"),
        (DENYOOM, "denyoom"),
        (FAST, "fast"),
    ];
    let fl: Vec<&str> = names
        .iter()
        .filter(|(f, _)| spec.flags & f != 0)
        .map(|(_, n)| *n)
        .collect();
    out.extend(array_header(fl.len()));
    for f in fl {
        out.extend(simple(f));
    }
    out.extend(integer(spec.first_key as i64));
    out.extend(integer(spec.last_key as i64));
    out.extend(integer(spec.step as i64));
    for _ in 0..4 {
        out.extend(array_header(0));
    }
    out
}

/// CONFIG GET's answers: what redis-benchmark and clients ask for.
const CONFIG: &[(&str, &str)] = &[("save", ""), ("appendonly", "no"), ("databases", "1")];

fn answer_command(args: &[Vec<u8>]) -> Vec<u8> {
    let Some(sub) = args.get(1) else {
        let mut out = array_header(COMMANDS.len());
        for c in COMMANDS {
            out.extend(command_info(c));
        }
        return out;
    };
    if eq(sub, "count") && args.len() == 2 {
        integer(COMMANDS.len() as i64)
    } else if eq(sub, "docs") {
        // Redis 7 answers a map of docs; an empty one makes clients use their own help.
        array_header(0)
    } else if eq(sub, "info") {
        let names = &args[2..];
        let mut out = array_header(names.len());
        for n in names {
            match lookup(n) {
                Some(c) => out.extend(command_info(c)),
                None => out.extend(b"*-1\r\n"),
            }
        }
        out
    } else if eq(sub, "list") && args.len() == 2 {
        let mut out = array_header(COMMANDS.len());
        for c in COMMANDS {
            out.extend(bulk(c.name.as_bytes()));
        }
        out
    } else if eq(sub, "count") || eq(sub, "list") {
        arity_error(&format!("command|{}", text(sub).to_lowercase()))
    } else {
        unknown_subcommand(sub, "COMMAND")
    }
}

fn answer_config(args: &[Vec<u8>]) -> Vec<u8> {
    let sub = &args[1];
    if !eq(sub, "get") {
        return unknown_subcommand(sub, "CONFIG");
    }
    if args.len() < 3 {
        return arity_error("config|get");
    }
    let mut hits: Vec<(&str, &str)> = Vec::new();
    for pat in &args[2..] {
        let pat = pat.to_ascii_lowercase();
        for &(k, v) in CONFIG {
            if glob::matches(&pat, k.as_bytes()) && !hits.iter().any(|h| h.0 == k) {
                hits.push((k, v));
            }
        }
    }
    let mut out = array_header(hits.len() * 2);
    for (k, v) in hits {
        out.extend(bulk(k.as_bytes()));
        out.extend(bulk(v.as_bytes()));
    }
    out
}

fn answer_client(args: &[Vec<u8>]) -> Vec<u8> {
    let sub = &args[1];
    if eq(sub, "setname") {
        if args.len() != 3 {
            return arity_error("client|setname");
        }
        if args[2].iter().any(|&c| !(b'!'..=b'~').contains(&c)) {
            return error(
                "ERR Client names cannot contain spaces, newlines or special characters.",
            );
        }
        simple("OK")
    } else if eq(sub, "getname") {
        // Names are accepted and not kept: a relayed connection has no home for them.
        null()
    } else if eq(sub, "id") {
        integer(0)
    } else if eq(sub, "list") || eq(sub, "info") {
        bulk(b"")
    } else {
        simple("OK")
    }
}

impl ReplicatedService for Kv {
    fn name(&self) -> &'static str {
        "kv"
    }

    fn decoder(&self) -> Box<dyn RequestDecoder> {
        Box::new(resp::RespDecoder::new())
    }

    fn classify(&self, req: &Request) -> RequestClass {
        let spec = match self.check(req) {
            Ok(s) => s,
            Err(reply) => return RequestClass::Rejected(reply),
        };
        if spec.flags & CONNECTION != 0 {
            RequestClass::Connection
        } else if spec.flags & AGENT != 0 {
            let Some(replicas) = parse_i64(&req.args[1]) else {
                return RequestClass::Rejected(error(NOT_INTEGER));
            };
            let Some(timeout) = parse_i64(&req.args[2]) else {
                return RequestClass::Rejected(error(
                    "ERR timeout is not an integer or out of range",
                ));
            };
            if timeout < 0 {
                return RequestClass::Rejected(error("ERR timeout is negative"));
            }
            RequestClass::WaitReplicas {
                replicas: replicas.clamp(0, u32::MAX as i64) as u32,
                timeout_ms: timeout as u64,
            }
        } else if spec.flags & WRITE != 0 {
            RequestClass::Write
        } else {
            RequestClass::Read
        }
    }

    fn answer_connection(&self, req: &Request) -> Reply {
        let reply = |bytes| Reply {
            bytes,
            close: false,
        };
        let spec = match self.check(req) {
            Ok(s) => s,
            Err(e) => return reply(e),
        };
        let a = &req.args;
        match spec.cmd {
            Cmd::Ping if a.len() > 2 => reply(arity_error("ping")),
            Cmd::Ping if a.len() == 2 => reply(bulk(&a[1])),
            Cmd::Ping => reply(simple("PONG")),
            Cmd::Echo => reply(bulk(&a[1])),
            Cmd::Command => reply(answer_command(a)),
            Cmd::Config => reply(answer_config(a)),
            Cmd::Client => reply(answer_client(a)),
            Cmd::Hello => reply(error(
                "NOPROTO sorry, this protocol version is not supported.",
            )),
            Cmd::Select => reply(match parse_i64(&a[1]) {
                Some(0) => simple("OK"),
                Some(_) => error("ERR DB index is out of range"),
                None => error(NOT_INTEGER),
            }),
            Cmd::Quit => Reply {
                bytes: simple("OK"),
                close: true,
            },
            _ => reply(error("ERR command needs the instance's state")),
        }
    }

    fn agent_reply(&self, r: AgentReply) -> Vec<u8> {
        match r {
            AgentReply::Replicas(n) => integer(n as i64),
            AgentReply::Error(e) => match e {
                AgentError::Fenced => error("READONLY the master lost its lease; retry"),
                AgentError::NoMaster => error("TRYAGAIN no master is reachable; retry"),
                AgentError::MasterChanged => error(
                    "ERR master changed while the command was in flight; it may have been applied",
                ),
                AgentError::NotReplicated => error("NOREPLICAS Not enough good replicas to write."),
                AgentError::Busy => error("BUSY too many commands in flight; retry"),
                AgentError::UnknownService => error("ERR the kv service is not on this node"),
            },
        }
    }

    fn new_state(&self, limits: ServiceLimits) -> Box<dyn ServiceState> {
        Box::new(KvState::new(limits))
    }

    fn change_keys(&self, change: &[u8], max: usize) -> Vec<Vec<u8>> {
        let Ok(cs) = state::decode_all(change) else {
            return Vec::new();
        };
        let mut keys: Vec<Vec<u8>> = Vec::new();
        for c in cs {
            let k = match c {
                Change::Set { key, .. } | Change::Del { key } => key,
                Change::Flush => b"*".to_vec(),
            };
            if keys.len() < max && !keys.contains(&k) {
                keys.push(k);
            }
        }
        keys
    }
}

/// One instance's data.
#[derive(Clone, Debug)]
pub struct KvState {
    keys: KeySpace,
    limits: ServiceLimits,
}

enum Outcome {
    Reply(Vec<u8>),
    Write(Vec<u8>, Vec<Change>),
}

/// An expiry option of SET.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ttl {
    None,
    Keep,
    At(u64),
}

fn set_options(now_ms: u64, opts: &[Vec<u8>]) -> Result<(bool, bool, bool, Ttl), Vec<u8>> {
    let (mut nx, mut xx, mut get) = (false, false, false);
    let mut ttl_kind: Option<(&str, &[u8])> = None;
    let mut keep = false;
    let mut i = 0;
    while i < opts.len() {
        let o = &opts[i];
        let has_next = i + 1 < opts.len();
        if eq(o, "nx") && !xx {
            nx = true;
        } else if eq(o, "xx") && !nx {
            xx = true;
        } else if eq(o, "get") {
            get = true;
        } else if eq(o, "keepttl") && ttl_kind.is_none() {
            keep = true;
        } else if ["ex", "px", "exat", "pxat"].iter().any(|k| eq(o, k))
            && ttl_kind.is_none()
            && !keep
            && has_next
        {
            let kind = ["ex", "px", "exat", "pxat"]
                .into_iter()
                .find(|k| eq(o, k))
                .unwrap_or("ex");
            ttl_kind = Some((kind, &opts[i + 1]));
            i += 1;
        } else {
            return Err(error(SYNTAX));
        }
        i += 1;
    }
    let ttl = match ttl_kind {
        None if keep => Ttl::Keep,
        None => Ttl::None,
        Some((kind, v)) => {
            let v = parse_i64(v).ok_or_else(|| error(NOT_INTEGER))?;
            let invalid = || error("ERR invalid expire time in 'set' command");
            if v <= 0 {
                return Err(invalid());
            }
            let v = v as u64;
            let at = match kind {
                "ex" => v.checked_mul(1000).and_then(|ms| ms.checked_add(now_ms)),
                "px" => v.checked_add(now_ms),
                "exat" => v.checked_mul(1000),
                _ => Some(v),
            };
            match at {
                Some(t) if t < i64::MAX as u64 => Ttl::At(t),
                _ => return Err(invalid()),
            }
        }
    };
    Ok((nx, xx, get, ttl))
}

impl KvState {
    pub fn new(limits: ServiceLimits) -> Self {
        KvState {
            keys: KeySpace::default(),
            limits,
        }
    }

    /// The key space (tests and checkers read it).
    pub fn keys(&self) -> &KeySpace {
        &self.keys
    }

    fn value(&self, key: &[u8], now: u64) -> Option<&[u8]> {
        self.keys.get(key, now).map(|e| e.value.as_slice())
    }

    fn incr_by(&self, now: u64, key: &[u8], by: i64) -> Outcome {
        let entry = self.keys.get(key, now);
        let cur = match entry {
            None => 0,
            Some(e) => match parse_i64(&e.value) {
                Some(v) => v,
                None => return Outcome::Reply(error(NOT_INTEGER)),
            },
        };
        let Some(new) = cur.checked_add(by) else {
            return Outcome::Reply(error("ERR increment or decrement would overflow"));
        };
        Outcome::Write(
            integer(new),
            alloc::vec![Change::Set {
                key: key.to_vec(),
                value: format!("{new}").into_bytes(),
                expire_at_ms: entry.and_then(|e| e.expire_at_ms),
            }],
        )
    }

    fn run(&self, now: u64, spec: &CommandSpec, a: &[Vec<u8>], view: &ReplicationView) -> Outcome {
        use Outcome::{Reply as R, Write as W};
        match spec.cmd {
            Cmd::Get => R(self.value(&a[1], now).map_or_else(null, bulk)),
            Cmd::Set => {
                let (nx, xx, get, ttl) = match set_options(now, &a[3..]) {
                    Ok(o) => o,
                    Err(e) => return R(e),
                };
                let old = self.keys.get(&a[1], now);
                let old_reply = || old.map_or_else(null, |e| bulk(&e.value));
                if (nx && old.is_some()) || (xx && old.is_none()) {
                    return R(if get { old_reply() } else { null() });
                }
                if a[2].len() > resp::MAX_BULK_BYTES {
                    return R(error(TOO_BIG));
                }
                let expire_at_ms = match ttl {
                    Ttl::None => None,
                    Ttl::Keep => old.and_then(|e| e.expire_at_ms),
                    Ttl::At(t) => Some(t),
                };
                let reply = if get { old_reply() } else { simple("OK") };
                W(
                    reply,
                    alloc::vec![Change::Set {
                        key: a[1].clone(),
                        value: a[2].clone(),
                        expire_at_ms,
                    }],
                )
            }
            Cmd::GetSet => W(
                self.value(&a[1], now).map_or_else(null, bulk),
                alloc::vec![Change::Set {
                    key: a[1].clone(),
                    value: a[2].clone(),
                    expire_at_ms: None,
                }],
            ),
            Cmd::Del => {
                let mut n = 0;
                let mut changes = Vec::new();
                for k in &a[1..] {
                    if self.keys.holds(k) && !changes.contains(&Change::Del { key: k.clone() }) {
                        if self.keys.get(k, now).is_some() {
                            n += 1;
                        }
                        changes.push(Change::Del { key: k.clone() });
                    }
                }
                W(integer(n), changes)
            }
            Cmd::Exists => R(integer(
                a[1..]
                    .iter()
                    .filter(|k| self.keys.get(k, now).is_some())
                    .count() as i64,
            )),
            Cmd::Incr => self.incr_by(now, &a[1], 1),
            Cmd::Decr => self.incr_by(now, &a[1], -1),
            Cmd::IncrBy | Cmd::DecrBy => match parse_i64(&a[2]) {
                None => R(error(NOT_INTEGER)),
                Some(by) if spec.cmd == Cmd::IncrBy => self.incr_by(now, &a[1], by),
                Some(by) => match by.checked_neg() {
                    Some(by) => self.incr_by(now, &a[1], by),
                    None => R(error("ERR decrement would overflow")),
                },
            },
            Cmd::Append => {
                let entry = self.keys.get(&a[1], now);
                let mut v = entry.map(|e| e.value.clone()).unwrap_or_default();
                if v.len() + a[2].len() > resp::MAX_BULK_BYTES {
                    return R(error(TOO_BIG));
                }
                v.extend_from_slice(&a[2]);
                W(
                    integer(v.len() as i64),
                    alloc::vec![Change::Set {
                        key: a[1].clone(),
                        value: v,
                        expire_at_ms: entry.and_then(|e| e.expire_at_ms),
                    }],
                )
            }
            Cmd::StrLen => R(integer(self.value(&a[1], now).map_or(0, |v| v.len()) as i64)),
            Cmd::MGet => {
                let mut out = array_header(a.len() - 1);
                for k in &a[1..] {
                    out.extend(self.value(k, now).map_or_else(null, bulk));
                }
                R(out)
            }
            Cmd::MSet => {
                if a.len().is_multiple_of(2) {
                    return R(arity_error("mset"));
                }
                let changes = a[1..]
                    .chunks_exact(2)
                    .map(|kv| Change::Set {
                        key: kv[0].clone(),
                        value: kv[1].clone(),
                        expire_at_ms: None,
                    })
                    .collect();
                W(simple("OK"), changes)
            }
            Cmd::DbSize => R(integer(self.keys.live_len(now) as i64)),
            Cmd::Keys => {
                let hits: Vec<&Vec<u8>> = self
                    .keys
                    .live_keys(now)
                    .filter(|k| glob::matches(&a[1], k))
                    .collect();
                let mut out = array_header(hits.len());
                for k in hits {
                    out.extend(bulk(k));
                }
                R(out)
            }
            Cmd::FlushDb => {
                if a.len() > 2 || (a.len() == 2 && !eq(&a[1], "async") && !eq(&a[1], "sync")) {
                    return R(error(SYNTAX));
                }
                W(simple("OK"), alloc::vec![Change::Flush])
            }
            Cmd::Info => R(bulk(self.info(now, &a[1..], view).as_bytes())),
            // Connection and agent commands are answered before any state is involved.
            _ => R(error("ERR command is not answered by the instance")),
        }
    }

    fn info(&self, now: u64, sections: &[Vec<u8>], view: &ReplicationView) -> String {
        let all = sections.is_empty()
            || sections
                .iter()
                .any(|s| eq(s, "all") || eq(s, "default") || eq(s, "everything"));
        let want = |n: &str| all || sections.iter().any(|s| eq(s, n));
        let mut out = String::new();
        if want("server") {
            out.push_str("# Server\r\nredis_version:7.0.0\r\nredis_mode:standalone\r\nunipeer_service:kv\r\n\r\n");
        }
        if want("memory") {
            let _ = write!(
                out,
                "# Memory\r\nused_memory:{}\r\nmaxmemory:{}\r\nmaxmemory_policy:noeviction\r\n\r\n",
                self.keys.used(),
                self.limits.max_memory_bytes
            );
        }
        if want("replication") {
            let role = match view.role {
                Role::Master => "master",
                Role::Slave => "slave",
                Role::Relay => "relay",
            };
            let _ = write!(
                out,
                "# Replication\r\nrole:{role}\r\nepoch:{}\r\n",
                view.epoch
            );
            if let Some(m) = view.master {
                let _ = write!(out, "master_node:{m}\r\n");
            }
            let _ = write!(out, "connected_slaves:{}\r\n", view.slaves.len());
            for (i, s) in view.slaves.iter().enumerate() {
                let _ = write!(
                    out,
                    "slave{i}:node={},state={},offset={},lag_ops={},lag_ms={}\r\n",
                    s.node,
                    if s.online { "online" } else { "offline" },
                    s.acked_seq,
                    s.lag_ops,
                    s.lag_ms
                );
            }
            let _ = write!(
                out,
                "master_repl_offset:{}\r\nlost_writes:{}\r\n\r\n",
                view.seq, view.lost_writes
            );
        }
        if want("keyspace") {
            out.push_str("# Keyspace\r\n");
            let n = self.keys.live_len(now);
            if n > 0 {
                let _ = write!(out, "db0:keys={n},expires=0,avg_ttl=0\r\n");
            }
        }
        out
    }
}

impl ServiceState for KvState {
    fn apply(&mut self, now_ms: u64, req: &Request, view: &ReplicationView) -> Applied {
        let spec = match Kv.check(req) {
            Ok(s) => s,
            Err(reply) => {
                return Applied {
                    reply,
                    change: None,
                };
            }
        };
        if spec.flags & DENYOOM != 0 {
            let growth: usize = req.args[1..].iter().map(|a| a.len()).sum::<usize>()
                + state::ENTRY_OVERHEAD * req.args.len();
            if self.keys.used().saturating_add(growth) > self.limits.max_memory_bytes {
                return Applied {
                    reply: error(OOM),
                    change: None,
                };
            }
        }
        match self.run(now_ms, spec, &req.args, view) {
            Outcome::Reply(reply) => Applied {
                reply,
                change: None,
            },
            Outcome::Write(reply, changes) if changes.is_empty() => Applied {
                reply,
                change: None,
            },
            Outcome::Write(reply, changes) => {
                for c in &changes {
                    self.keys.apply(c);
                }
                Applied {
                    reply,
                    change: Some(state::encode_all(&changes)),
                }
            }
        }
    }

    fn apply_change(&mut self, change: &[u8]) -> Result<(), BadRecord> {
        for c in state::decode_all(change)? {
            self.keys.apply(&c);
        }
        Ok(())
    }

    fn expire_due(&mut self, now_ms: u64, max: usize) -> Option<Vec<u8>> {
        let gone = self.keys.expired(now_ms, max);
        if gone.is_empty() {
            return None;
        }
        let changes: Vec<Change> = gone.into_iter().map(|key| Change::Del { key }).collect();
        for c in &changes {
            self.keys.apply(c);
        }
        Some(state::encode_all(&changes))
    }

    fn snapshot_chunk(&self, cursor: Option<&[u8]>, max_bytes: usize) -> SnapshotChunk {
        let (bytes, next) = self.keys.chunk(cursor, max_bytes);
        SnapshotChunk { bytes, next }
    }

    fn clear(&mut self) {
        self.keys = KeySpace::default();
    }

    fn restore_chunk(&mut self, chunk: &[u8]) -> Result<(), BadRecord> {
        let cs = state::decode_all(chunk)?;
        if cs.iter().any(|c| !matches!(c, Change::Set { .. })) {
            return Err(BadRecord);
        }
        for c in &cs {
            self.keys.apply(c);
        }
        Ok(())
    }

    fn state_hash(&self) -> [u8; 32] {
        self.keys.hash()
    }

    fn memory_used(&self) -> usize {
        self.keys.used()
    }
}

/// Bytes a SET of `key` to `value` adds (tests size `maxmemory` with it).
pub fn entry_cost(key: &[u8], value: &[u8]) -> usize {
    cost(key, value)
}

#[cfg(test)]
mod tests;
