//! Replays command scripts against a real `redis-server` (started on 127.0.0.1 at a free port
//! and killed by the test) and against `kv`, and compares the replies byte for byte.
//!
//! Without `redis-server` on PATH the test is skipped with a message, except under `CI=true`
//! where it fails (CI installs it).

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use unipeer_apps::kv::{Kv, KvState, resp};
use unipeer_node::replication::service::{
    AgentReply, Decoded, ReplicatedService, ReplicationView, RequestClass, ServiceLimits,
    ServiceState,
};

struct RedisServer {
    child: Child,
    port: u16,
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_redis() -> Option<RedisServer> {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok();
    if !found {
        if std::env::var("CI").as_deref() == Ok("true") {
            panic!(
                "redis-server is not installed; CI must install it (apt-get install redis-server)"
            );
        }
        eprintln!("SKIPPED: redis-server is not installed (apt-get install redis-server)");
        return None;
    }
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = std::env::temp_dir().join(format!("kv-redis-compare-{port}"));
    std::fs::create_dir_all(&dir).unwrap();
    let child = Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .arg("--dir")
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start redis-server");
    let server = RedisServer { child, port };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(mut s) = TcpStream::connect(("127.0.0.1", port)) {
            s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            if s.write_all(b"PING\r\n").is_ok() {
                let mut b = [0u8; 7];
                if s.read_exact(&mut b).is_ok() && &b == b"+PONG\r\n" {
                    return Some(server);
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "redis-server did not answer PING within 20 s"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Reads one whole RESP reply, returning its raw bytes.
fn read_reply(r: &mut BufReader<TcpStream>) -> Vec<u8> {
    let mut line = Vec::new();
    r.read_until(b'\n', &mut line).unwrap();
    assert!(line.ends_with(b"\r\n"), "reply line {line:?}");
    let n: i64 = std::str::from_utf8(&line[1..line.len() - 2])
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let mut out = line.clone();
    match line[0] {
        b'$' if n >= 0 => {
            let mut b = vec![0u8; n as usize + 2];
            r.read_exact(&mut b).unwrap();
            out.extend(b);
        }
        b'*' if n > 0 => {
            for _ in 0..n {
                out.extend(read_reply(r));
            }
        }
        _ => {}
    }
    out
}

/// What `kv` answers to `bytes` on one connection, as a master with no slaves would.
fn kv_replies(state: &mut KvState, bytes: &[u8]) -> (Vec<Vec<u8>>, bool) {
    let mut d = Kv.decoder();
    d.feed(bytes);
    let mut out = Vec::new();
    while let Some(x) = d.next_request() {
        match x {
            Decoded::Request(r) => {
                let reply = match Kv.classify(&r) {
                    RequestClass::Rejected(e) => e,
                    RequestClass::Connection => Kv.answer_connection(&r).bytes,
                    RequestClass::WaitReplicas { .. } => Kv.agent_reply(AgentReply::Replicas(0)),
                    RequestClass::Read | RequestClass::Write => {
                        state.apply(1_000, &r, &ReplicationView::standalone()).reply
                    }
                };
                out.push(reply);
            }
            Decoded::Fatal { reply, .. } => {
                out.push(reply);
                return (out, true);
            }
        }
    }
    (out, false)
}

fn multibulk(line: &str) -> Vec<u8> {
    let args = resp::split_args(line.as_bytes()).unwrap();
    let mut f = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        f.extend(format!("${}\r\n", a.len()).into_bytes());
        f.extend(a);
        f.extend(b"\r\n");
    }
    f
}

const SCRIPT: &[&str] = &[
    "PING",
    "PING hello",
    "PING a b",
    "ECHO \"two words\"",
    "ECHO",
    "FOO bar baz",
    "nosuch",
    "GET",
    "GET missing",
    "SET k v",
    "GET k",
    "SET k w NX",
    "SET k w XX GET",
    "SET j w XX",
    "SET k x NX GET",
    "SET k v NX XX",
    "SET k v EX 10 PX 10",
    "SET k v KEEPTTL EX 10",
    "SET k v EX",
    "SET k v EX x",
    "SET k v EX 0",
    "SET k v PX -1",
    "SET k v BOGUS",
    "SET t v EX 100",
    "GET t",
    "SET t w KEEPTTL",
    "GET t",
    "GETSET g 1",
    "GETSET g 2",
    "GETSET g",
    "DEL k k missing g",
    "DEL",
    "EXISTS t t missing",
    "INCR n",
    "INCRBY n 41",
    "DECR n",
    "DECRBY n 50",
    "INCRBY n x",
    "INCRBY n 1.5",
    "SET big 9223372036854775807",
    "INCR big",
    "SET s abc",
    "INCR s",
    "SET z 007",
    "INCR z",
    "APPEND a hello",
    "APPEND a \" world\"",
    "GET a",
    "STRLEN a",
    "STRLEN missing",
    "MSET m1 1 m2 2",
    "MSET m1",
    "MSET m1 1 m2",
    "MGET m1 missing m2",
    "KEYS m1",
    "KEYS nothing*",
    "KEYS",
    "DBSIZE",
    "DBSIZE x",
    "SELECT 0",
    "SELECT x",
    "CLIENT SETNAME bench",
    "CLIENT SETNAME \"has space\"",
    "CONFIG GET save",
    "CONFIG GET appendonly",
    "CONFIG GET",
    "CONFIG NOPE",
    "WAIT 0 0",
    "WAIT 0 -1",
    "WAIT x 0",
    "WAIT 0 x",
    "FLUSHDB BOGUS",
    "FLUSHDB",
    "DBSIZE",
    "GET k",
];

#[test]
fn kv_answers_like_redis() {
    let Some(server) = start_redis() else { return };
    let connect = || {
        let s = TcpStream::connect(("127.0.0.1", server.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    };

    // One command at a time, alternately inline and multibulk.
    let mut conn = connect();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut state = KvState::new(ServiceLimits::default());
    let mut compared = 0;
    for (i, line) in SCRIPT.iter().enumerate() {
        let bytes = if i % 2 == 0 {
            format!("{line}\r\n").into_bytes()
        } else {
            multibulk(line)
        };
        conn.write_all(&bytes).unwrap();
        let theirs = read_reply(&mut reader);
        let (ours, closed) = kv_replies(&mut state, &bytes);
        assert!(!closed);
        assert_eq!(ours.len(), 1, "{line}");
        assert_eq!(
            String::from_utf8_lossy(&ours[0]),
            String::from_utf8_lossy(&theirs),
            "reply to `{line}`"
        );
        compared += 1;
    }

    // The same script pipelined in one write: the same replies, in order.
    let mut conn = connect();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut state = KvState::new(ServiceLimits::default());
    let all: Vec<u8> = SCRIPT.iter().flat_map(|l| multibulk(l)).collect();
    conn.write_all(&all).unwrap();
    let theirs: Vec<Vec<u8>> = SCRIPT.iter().map(|_| read_reply(&mut reader)).collect();
    let (ours, _) = kv_replies(&mut state, &all);
    assert_eq!(ours, theirs, "pipelined replies");
    compared += ours.len();

    // Protocol errors: the same error, then both close the connection.
    for bad in [
        &b"*1\r\n+OK\r\n"[..],
        b"*x\r\n",
        b"set \"abc\r\n",
        b"*1\r\n$-5\r\n",
        b"*1\r\n$x\r\n",
        b"set 'a'b\r\n",
    ] {
        let mut conn = connect();
        conn.write_all(bad).unwrap();
        let mut reader = BufReader::new(conn.try_clone().unwrap());
        let theirs = read_reply(&mut reader);
        let mut rest = Vec::new();
        let n = reader.read_to_end(&mut rest).unwrap_or(0);
        assert_eq!(n, 0, "redis closes after {bad:?}");
        let mut state = KvState::new(ServiceLimits::default());
        let (ours, closed) = kv_replies(&mut state, bad);
        assert!(closed, "kv closes after {bad:?}");
        assert_eq!(
            String::from_utf8_lossy(ours.last().unwrap()),
            String::from_utf8_lossy(&theirs),
            "protocol error for {bad:?}"
        );
        compared += 1;
    }
    eprintln!("compared {compared} replies with redis-server byte for byte");
    assert_eq!(compared, 2 * SCRIPT.len() + 6);
}
