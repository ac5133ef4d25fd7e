use super::*;
use alloc::vec;
use alloc::vec::Vec;
use unipeer_node::replication::service::Decoded;
use unipeer_node::rng::Rng;

struct Client {
    state: KvState,
    changes: Vec<Vec<u8>>,
}

impl Client {
    fn new() -> Self {
        Client::with_limit(1 << 20)
    }
    fn with_limit(max_memory_bytes: usize) -> Self {
        Client {
            state: KvState::new(ServiceLimits { max_memory_bytes }),
            changes: Vec::new(),
        }
    }
    /// Sends one request (split like an inline command) as a master would answer it.
    fn req(&mut self, now: u64, args: &[&[u8]]) -> Vec<u8> {
        let r = Request::new(args.iter().map(|a| a.to_vec()).collect());
        match Kv.classify(&r) {
            RequestClass::Rejected(e) => e,
            RequestClass::Connection => Kv.answer_connection(&r).bytes,
            RequestClass::WaitReplicas { .. } => Kv.agent_reply(AgentReply::Replicas(0)),
            RequestClass::Read | RequestClass::Write => {
                let a = self.state.apply(now, &r, &ReplicationView::standalone());
                if let Some(c) = a.change {
                    self.changes.push(c);
                }
                a.reply
            }
        }
    }
    fn line(&mut self, now: u64, line: &str) -> Vec<u8> {
        let args = resp::split_args(line.as_bytes()).unwrap();
        let refs: Vec<&[u8]> = args.iter().map(|a| a.as_slice()).collect();
        self.req(now, &refs)
    }
}

fn s(b: Vec<u8>) -> String {
    String::from_utf8(b).unwrap()
}

#[test]
fn table_refuses_before_dispatch() {
    let mut c = Client::new();
    assert_eq!(
        s(c.line(0, "FOO a b")),
        "-ERR unknown command 'FOO', with args beginning with: 'a' 'b' \r\n"
    );
    assert_eq!(
        s(c.line(0, "nope")),
        "-ERR unknown command 'nope', with args beginning with: \r\n"
    );
    assert_eq!(
        s(c.line(0, "GET")),
        "-ERR wrong number of arguments for 'get' command\r\n"
    );
    assert_eq!(
        s(c.line(0, "get a b")),
        "-ERR wrong number of arguments for 'get' command\r\n"
    );
    assert_eq!(
        s(c.line(0, "mset a")),
        "-ERR wrong number of arguments for 'mset' command\r\n"
    );
    assert_eq!(
        s(c.line(0, "mset a 1 b")),
        "-ERR wrong number of arguments for 'mset' command\r\n"
    );
    assert_eq!(
        s(c.line(0, "ping a b")),
        "-ERR wrong number of arguments for 'ping' command\r\n"
    );
    assert!(c.changes.is_empty());
    // Every row is found by its name in any case, and its arity is enforced.
    for spec in COMMANDS {
        assert_eq!(
            lookup(spec.name.to_uppercase().as_bytes()).map(|c| c.cmd),
            Some(spec.cmd)
        );
        let too_few = (spec.arity.unsigned_abs() as usize).saturating_sub(1);
        if too_few >= 1 {
            let mut args = vec![spec.name.as_bytes().to_vec()];
            args.resize(too_few, b"x".to_vec());
            assert_eq!(
                Kv.classify(&Request::new(args)),
                RequestClass::Rejected(arity_error(spec.name)),
                "{}",
                spec.name
            );
        }
    }
}

#[test]
fn connection_commands() {
    let mut c = Client::new();
    assert_eq!(s(c.line(0, "PING")), "+PONG\r\n");
    assert_eq!(s(c.line(0, "ping hi")), "$2\r\nhi\r\n");
    assert_eq!(s(c.line(0, "ECHO \"a b\"")), "$3\r\na b\r\n");
    assert_eq!(s(c.line(0, "SELECT 0")), "+OK\r\n");
    assert_eq!(
        s(c.line(0, "SELECT 1")),
        "-ERR DB index is out of range\r\n"
    );
    assert_eq!(
        s(c.line(0, "SELECT x")),
        "-ERR value is not an integer or out of range\r\n"
    );
    assert!(s(c.line(0, "HELLO 3")).starts_with("-NOPROTO"));
    assert_eq!(s(c.line(0, "CLIENT SETNAME bench")), "+OK\r\n");
    assert!(s(c.line(0, "CLIENT SETNAME \"a b\"")).starts_with("-ERR Client names"));
    assert_eq!(s(c.line(0, "CLIENT SETINFO lib-name x")), "+OK\r\n");
    assert_eq!(
        s(c.line(0, "CONFIG GET save")),
        "*2\r\n$4\r\nsave\r\n$0\r\n\r\n"
    );
    assert_eq!(
        s(c.line(0, "config get appendonly")),
        "*2\r\n$10\r\nappendonly\r\n$2\r\nno\r\n"
    );
    assert_eq!(s(c.line(0, "CONFIG GET nothing")), "*0\r\n");
    assert_eq!(
        s(c.line(0, "CONFIG GET")),
        "-ERR wrong number of arguments for 'config|get' command\r\n"
    );
    assert_eq!(
        s(c.line(0, "CONFIG FOO")),
        "-ERR unknown subcommand 'FOO'. Try CONFIG HELP.\r\n"
    );
    assert_eq!(
        s(c.line(0, "COMMAND COUNT")),
        format!(":{}\r\n", COMMANDS.len())
    );
    assert_eq!(s(c.line(0, "COMMAND DOCS")), "*0\r\n");
    assert!(
        s(c.line(0, "COMMAND"))
            .starts_with(&format!("*{}\r\n*10\r\n$4\r\nping\r\n", COMMANDS.len()))
    );
    assert!(s(c.line(0, "COMMAND INFO get nope")).ends_with("*-1\r\n"));
    let quit = Kv.answer_connection(&Request::new(vec![b"QUIT".to_vec()]));
    assert!(quit.close && quit.bytes == b"+OK\r\n");
    assert!(c.changes.is_empty());
}

#[test]
fn get_set_and_options() {
    let mut c = Client::new();
    assert_eq!(s(c.line(0, "GET k")), "$-1\r\n");
    assert_eq!(s(c.line(0, "SET k v")), "+OK\r\n");
    assert_eq!(s(c.line(0, "GET k")), "$1\r\nv\r\n");
    assert_eq!(s(c.line(0, "SET k w NX")), "$-1\r\n");
    assert_eq!(s(c.line(0, "SET j w XX")), "$-1\r\n");
    assert_eq!(s(c.line(0, "SET k w XX GET")), "$1\r\nv\r\n");
    assert_eq!(s(c.line(0, "SET k x NX GET")), "$1\r\nw\r\n");
    for bad in [
        "SET k v NX XX",
        "SET k v EX 1 PX 1",
        "SET k v KEEPTTL EX 1",
        "SET k v EX",
        "SET k v FOO",
    ] {
        assert_eq!(s(c.line(0, bad)), "-ERR syntax error\r\n", "{bad}");
    }
    assert_eq!(
        s(c.line(0, "SET k v EX x")),
        "-ERR value is not an integer or out of range\r\n"
    );
    assert_eq!(
        s(c.line(0, "SET k v EX 0")),
        "-ERR invalid expire time in 'set' command\r\n"
    );
    assert_eq!(
        s(c.line(0, "SET k v PX -5")),
        "-ERR invalid expire time in 'set' command\r\n"
    );
    assert_eq!(
        s(c.line(0, "SET k v EX 9223372036854775807")),
        "-ERR invalid expire time in 'set' command\r\n"
    );
    // Expiry is the caller's time: EX 10 at t=1000 ms lives until 10999 inclusive.
    assert_eq!(s(c.line(1000, "SET t v EX 10")), "+OK\r\n");
    assert_eq!(s(c.line(10_999, "GET t")), "$1\r\nv\r\n");
    assert_eq!(s(c.line(11_000, "GET t")), "$-1\r\n");
    assert_eq!(s(c.line(0, "SET p v PX 50")), "+OK\r\n");
    assert_eq!(s(c.line(0, "SET p w KEEPTTL")), "+OK\r\n");
    assert_eq!(s(c.line(50, "EXISTS p")), ":0\r\n");
    assert_eq!(s(c.line(0, "SET a v PXAT 70")), "+OK\r\n");
    assert_eq!(s(c.line(69, "STRLEN a")), ":1\r\n");
    assert_eq!(s(c.line(70, "STRLEN a")), ":0\r\n");
    assert_eq!(s(c.line(0, "SET e v EXAT 2")), "+OK\r\n");
    assert_eq!(s(c.line(1999, "EXISTS e")), ":1\r\n");
    // The master removes what expired through the log; the record holds absolute times.
    let rec = c.state.expire_due(100_000, 16).expect("expired keys");
    assert_eq!(Kv.change_keys(&rec, 8).len(), 4);
    assert!(c.state.expire_due(100_000, 16).is_none());
}

#[test]
fn getset_del_exists_strlen_append_mget_mset() {
    let mut c = Client::new();
    assert_eq!(s(c.line(0, "GETSET k 1")), "$-1\r\n");
    assert_eq!(s(c.line(0, "GETSET k 2")), "$1\r\n1\r\n");
    assert_eq!(s(c.line(0, "APPEND k 34")), ":3\r\n");
    assert_eq!(s(c.line(0, "APPEND n ab")), ":2\r\n");
    assert_eq!(s(c.line(0, "STRLEN k")), ":3\r\n");
    assert_eq!(s(c.line(0, "STRLEN none")), ":0\r\n");
    assert_eq!(s(c.line(0, "EXISTS k k n none")), ":3\r\n");
    assert_eq!(s(c.line(0, "MSET a 1 b 2")), "+OK\r\n");
    assert_eq!(
        s(c.line(0, "MGET a none b")),
        "*3\r\n$1\r\n1\r\n$-1\r\n$1\r\n2\r\n"
    );
    assert_eq!(s(c.line(0, "DEL a a none b")), ":2\r\n");
    assert_eq!(s(c.line(0, "DBSIZE")), ":2\r\n");
    let before = c.changes.len();
    assert_eq!(s(c.line(0, "DEL none")), ":0\r\n");
    assert_eq!(c.changes.len(), before, "a DEL of nothing changes nothing");
}

#[test]
fn counters() {
    let mut c = Client::new();
    assert_eq!(s(c.line(0, "INCR n")), ":1\r\n");
    assert_eq!(s(c.line(0, "INCRBY n 41")), ":42\r\n");
    assert_eq!(s(c.line(0, "DECR n")), ":41\r\n");
    assert_eq!(s(c.line(0, "DECRBY n 50")), ":-9\r\n");
    assert_eq!(
        s(c.line(0, "INCRBY n x")),
        "-ERR value is not an integer or out of range\r\n"
    );
    assert_eq!(s(c.line(0, "SET s abc")), "+OK\r\n");
    assert_eq!(
        s(c.line(0, "INCR s")),
        "-ERR value is not an integer or out of range\r\n"
    );
    assert_eq!(s(c.line(0, "SET m 9223372036854775807")), "+OK\r\n");
    assert_eq!(
        s(c.line(0, "INCR m")),
        "-ERR increment or decrement would overflow\r\n"
    );
    assert_eq!(
        s(c.line(0, "DECRBY m -9223372036854775808")),
        "-ERR decrement would overflow\r\n"
    );
    assert_eq!(s(c.line(0, "SET t 5 PX 100")), "+OK\r\n");
    assert_eq!(s(c.line(0, "INCR t")), ":6\r\n");
    assert_eq!(s(c.line(100, "GET t")), "$-1\r\n", "INCR keeps the expiry");
}

#[test]
fn keys_flushdb_info_wait() {
    let mut c = Client::new();
    c.line(0, "MSET user:1 a user:2 b other c");
    assert_eq!(
        s(c.line(0, "KEYS user:*")),
        "*2\r\n$6\r\nuser:1\r\n$6\r\nuser:2\r\n"
    );
    assert_eq!(s(c.line(0, "KEYS *")).lines().next(), Some("*3"));
    let info = s(c.line(0, "INFO replication"));
    assert!(
        info.contains("role:master") && info.contains("connected_slaves:0"),
        "{info}"
    );
    assert!(!info.contains("# Server"));
    assert!(s(c.line(0, "INFO")).contains("db0:keys=3"));
    assert_eq!(s(c.line(0, "FLUSHDB x")), "-ERR syntax error\r\n");
    assert_eq!(s(c.line(0, "FLUSHDB ASYNC")), "+OK\r\n");
    assert_eq!(s(c.line(0, "DBSIZE")), ":0\r\n");
    assert_eq!(
        Kv.classify(&Request::new(vec![
            b"WAIT".to_vec(),
            b"1".to_vec(),
            b"100".to_vec()
        ])),
        RequestClass::WaitReplicas {
            replicas: 1,
            timeout_ms: 100
        }
    );
    assert_eq!(s(c.line(0, "WAIT 1 -1")), "-ERR timeout is negative\r\n");
    assert_eq!(
        s(c.line(0, "WAIT x 1")),
        "-ERR value is not an integer or out of range\r\n"
    );
}

#[test]
fn info_reports_the_agents_view() {
    let mut st = KvState::new(ServiceLimits::default());
    let me = unipeer_node::Id(7);
    let view = ReplicationView {
        role: Role::Master,
        epoch: 3,
        master: Some(me),
        seq: 12,
        slaves: vec![unipeer_node::replication::service::SlaveView {
            node: unipeer_node::Id(9),
            acked_seq: 10,
            lag_ops: 2,
            lag_ms: 40,
            online: true,
        }],
        lost_writes: 1,
    };
    let r = st.apply(
        0,
        &Request::new(vec![b"info".to_vec(), b"replication".to_vec()]),
        &view,
    );
    let t = s(r.reply);
    for want in [
        "epoch:3",
        "connected_slaves:1",
        "slave0:node=00000000000000000000000000000009,state=online,offset=10,lag_ops=2,lag_ms=40",
        "master_repl_offset:12",
        "lost_writes:1",
    ] {
        assert!(t.contains(want), "{want} in {t}");
    }
}

#[test]
fn memory_bound_refuses_growth_and_keeps_data() {
    let limit = 4 * entry_cost(b"k0", &[b'v'; 100]);
    let mut c = Client::with_limit(limit);
    let v = "v".repeat(100);
    let mut stored = 0;
    let mut oom = 0;
    for i in 0..10 {
        let r = s(c.line(0, &format!("SET k{i} {v}")));
        if r == "+OK\r\n" {
            stored += 1;
        } else {
            assert_eq!(
                r,
                "-OOM command not allowed when used memory > 'maxmemory'.\r\n"
            );
            oom += 1;
        }
    }
    assert!(stored >= 2 && oom >= 1, "stored {stored}, oom {oom}");
    assert!(c.state.memory_used() <= limit);
    for i in 0..stored {
        assert_eq!(s(c.line(0, &format!("STRLEN k{i}"))), ":100\r\n");
    }
    // Reads and deletes still work past the limit, and a delete makes room.
    assert_eq!(s(c.line(0, "DEL k0")), ":1\r\n");
    assert_eq!(s(c.line(0, &format!("SET k0 {v}"))), "+OK\r\n");
}

#[test]
fn oversized_values_are_refused() {
    let mut st = KvState::new(ServiceLimits {
        max_memory_bytes: 4 << 20,
    });
    let big = vec![b'x'; resp::MAX_BULK_BYTES];
    let v = ReplicationView::standalone();
    let r = st.apply(
        0,
        &Request::new(vec![b"SET".to_vec(), b"k".to_vec(), big]),
        &v,
    );
    assert_eq!(r.reply, b"+OK\r\n");
    let r = st.apply(
        0,
        &Request::new(vec![b"APPEND".to_vec(), b"k".to_vec(), b"y".to_vec()]),
        &v,
    );
    assert_eq!(
        s(r.reply),
        "-ERR string exceeds maximum allowed size (proto-max-bulk-len)\r\n"
    );
    assert!(r.change.is_none());
}

/// Random bytes, and random mutations of valid frames, never panic the decoder or the
/// dispatcher, and the decoder's buffer stays within its limits.
#[test]
fn random_streams_never_panic() {
    let seeds: u64 = std::env::var("KV_FUZZ_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(300);
    let mut rng = Rng::from_u64(0x6b76);
    let alphabet: &[u8] = b"*$\r\n0123456789-+:GETSETPINGpingkv \"'\\x";
    let mut fatal = 0;
    let mut requests = 0;
    for _ in 0..seeds {
        let mut d = Kv.decoder();
        let mut st = KvState::new(ServiceLimits::default());
        for _ in 0..20 {
            let n = rng.below(200) as usize;
            let chunk: Vec<u8> = (0..n)
                .map(|_| {
                    if rng.chance(0.7) {
                        alphabet[rng.below(alphabet.len() as u64) as usize]
                    } else {
                        rng.next_u64() as u8
                    }
                })
                .collect();
            d.feed(&chunk);
            while let Some(x) = d.next_request() {
                match x {
                    Decoded::Request(r) => {
                        requests += 1;
                        match Kv.classify(&r) {
                            RequestClass::Read | RequestClass::Write => {
                                st.apply(rng.below(1000), &r, &ReplicationView::standalone());
                            }
                            RequestClass::Connection => {
                                Kv.answer_connection(&r);
                            }
                            _ => {}
                        }
                    }
                    Decoded::Fatal { reply, .. } => {
                        fatal += 1;
                        assert!(
                            reply.starts_with(b"-ERR Protocol error: ") && reply.ends_with(b"\r\n")
                        );
                        assert_eq!(reply.iter().filter(|&&c| c == b'\n').count(), 1);
                    }
                }
            }
            assert!(d.buffered() <= resp::MAX_REQUEST_BYTES + 64 * 1024);
        }
        // Change records and snapshot chunks that are garbage are refused, not applied.
        let junk: Vec<u8> = (0..rng.below(64)).map(|_| rng.next_u64() as u8).collect();
        let before = st.state_hash();
        if st.apply_change(&junk).is_err() {
            // A record is decoded whole before any change is applied.
            assert_eq!(st.state_hash(), before);
        }
    }
    assert!(
        fatal > 0 && requests > 0,
        "fatal {fatal}, requests {requests}"
    );
}

fn random_command(rng: &mut Rng, now: u64) -> Vec<Vec<u8>> {
    let key = |rng: &mut Rng| format!("k{}", rng.below(12)).into_bytes();
    let val = |rng: &mut Rng| format!("{}", rng.below(30) as i64 - 5).into_bytes();
    let b = |s: &str| s.as_bytes().to_vec();
    match rng.below(14) {
        0 => vec![b("SET"), key(rng), val(rng)],
        1 => vec![
            b("SET"),
            key(rng),
            val(rng),
            b("PX"),
            format!("{}", 1 + rng.below(200)).into_bytes(),
        ],
        2 => vec![b("SET"), key(rng), val(rng), b("NX"), b("GET")],
        3 => vec![b("SET"), key(rng), val(rng), b("XX"), b("KEEPTTL")],
        4 => vec![
            b("SET"),
            key(rng),
            val(rng),
            b("PXAT"),
            format!("{}", now + rng.below(300)).into_bytes(),
        ],
        5 => vec![b("GETSET"), key(rng), val(rng)],
        6 => vec![b("DEL"), key(rng), key(rng)],
        7 => vec![b("INCR"), key(rng)],
        8 => vec![b("INCRBY"), key(rng), val(rng)],
        9 => vec![b("DECR"), key(rng)],
        10 => vec![b("APPEND"), key(rng), val(rng)],
        11 => vec![b("MSET"), key(rng), val(rng), key(rng), val(rng)],
        12 if rng.chance(0.05) => vec![b("FLUSHDB")],
        _ => vec![b("GET"), key(rng)],
    }
}

/// The replication contract: change records replayed in order on a fresh state give the
/// master's state (same hash), with expiry decided only by the master's clock. A slave
/// restored from a snapshot in small chunks, then fed the rest of the log, converges too.
#[test]
fn replay_on_a_fresh_slave_matches_the_master() {
    for seed in 0..200u64 {
        let mut rng = Rng::from_u64(seed);
        let mut master = KvState::new(ServiceLimits::default());
        let mut slave = KvState::new(ServiceLimits::default());
        let mut log: Vec<Vec<u8>> = Vec::new();
        let mut now = 0;
        let snap_at = rng.below(300) as usize;
        let mut late = KvState::new(ServiceLimits::default());
        for i in 0..300 {
            now += rng.below(20);
            if i == snap_at {
                let mut cursor: Option<Vec<u8>> = None;
                late.clear();
                loop {
                    let ch = master.snapshot_chunk(cursor.as_deref(), 16);
                    late.restore_chunk(&ch.bytes).unwrap();
                    match ch.next {
                        Some(n) => cursor = Some(n),
                        None => break,
                    }
                }
                assert_eq!(late.state_hash(), master.state_hash(), "seed {seed}");
            }
            let r = Request::new(random_command(&mut rng, now));
            let a = master.apply(now, &r, &ReplicationView::standalone());
            if let Some(c) = a.change {
                slave.apply_change(&c).unwrap();
                if i >= snap_at {
                    late.apply_change(&c).unwrap();
                }
                log.push(c);
            }
            if rng.chance(0.1)
                && let Some(c) = master.expire_due(now, 4)
            {
                slave.apply_change(&c).unwrap();
                if i >= snap_at {
                    late.apply_change(&c).unwrap();
                }
                log.push(c);
            }
            assert_eq!(
                slave.state_hash(),
                master.state_hash(),
                "seed {seed} op {i}"
            );
        }
        let mut fresh = KvState::new(ServiceLimits::default());
        for c in &log {
            fresh.apply_change(c).unwrap();
        }
        assert_eq!(fresh.state_hash(), master.state_hash(), "seed {seed}");
        assert_eq!(late.state_hash(), master.state_hash(), "seed {seed}");
        assert_eq!(fresh.memory_used(), master.memory_used());
    }
}
