//! The agent driven by a tiny in-memory network and a small register service (`reg`), with
//! faults set by hand: elections, the stream, relays, sync mode, fencing and rejoining.

use super::*;
use crate::Id;
use crate::replication::placement::Mode;
use crate::replication::service::{Applied, BadRecord, Reply, SnapshotChunk};
use alloc::collections::BTreeSet;
use alloc::string::{String, ToString};
use alloc::vec;
use sha2::{Digest, Sha256};

/// Requests are lines: `SET k v`, `GET k`, `PING`, `WAIT n ms`; changes are `k\0v`.
struct Reg;
struct RegDecoder(Vec<u8>);
struct RegState(BTreeMap<Vec<u8>, Vec<u8>>);

impl RequestDecoder for RegDecoder {
    fn feed(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
    fn next_request(&mut self) -> Option<Decoded> {
        let nl = self.0.iter().position(|&c| c == b'\n')?;
        let line: Vec<u8> = self.0.drain(..=nl).take(nl).collect();
        Some(Decoded::Request(Request::new(
            line.split(|&c| c == b' ').map(|a| a.to_vec()).collect(),
        )))
    }
    fn buffered(&self) -> usize {
        self.0.len()
    }
}

fn num(b: &[u8]) -> Option<u64> {
    core::str::from_utf8(b).ok()?.parse().ok()
}

impl ReplicatedService for Reg {
    fn name(&self) -> &'static str {
        "reg"
    }
    fn decoder(&self) -> Box<dyn RequestDecoder> {
        Box::new(RegDecoder(Vec::new()))
    }
    fn classify(&self, r: &Request) -> RequestClass {
        match (r.args[0].as_slice(), r.args.len()) {
            (b"SET", 3) => RequestClass::Write,
            (b"GET", 2) => RequestClass::Read,
            (b"PING", 1) => RequestClass::Connection,
            (b"WAIT", 3) => match (num(&r.args[1]), num(&r.args[2])) {
                (Some(n), Some(t)) => RequestClass::WaitReplicas {
                    replicas: n as u32,
                    timeout_ms: t,
                },
                _ => RequestClass::Rejected(b"ERR\n".to_vec()),
            },
            _ => RequestClass::Rejected(b"ERR\n".to_vec()),
        }
    }
    fn answer_connection(&self, _: &Request) -> Reply {
        Reply {
            bytes: b"PONG\n".to_vec(),
            close: false,
        }
    }
    fn agent_reply(&self, r: AgentReply) -> Vec<u8> {
        match r {
            AgentReply::Replicas(n) => alloc::format!(":{n}\n").into_bytes(),
            AgentReply::Error(e) => alloc::format!("ERR {e:?}\n").into_bytes(),
        }
    }
    fn new_state(&self, _: ServiceLimits) -> Box<dyn ServiceState> {
        Box::new(RegState(BTreeMap::new()))
    }
    fn change_keys(&self, change: &[u8], _: usize) -> Vec<Vec<u8>> {
        change
            .split(|&c| c == 0)
            .take(1)
            .map(|k| k.to_vec())
            .collect()
    }
}

impl ServiceState for RegState {
    fn apply(&mut self, _: u64, r: &Request, _: &ReplicationView) -> Applied {
        if r.args[0] == b"SET" {
            self.0.insert(r.args[1].clone(), r.args[2].clone());
            let mut change = r.args[1].clone();
            change.push(0);
            change.extend_from_slice(&r.args[2]);
            return Applied {
                reply: b"OK\n".to_vec(),
                change: Some(change),
            };
        }
        let mut reply = self.0.get(&r.args[1]).cloned().unwrap_or(b"NIL".to_vec());
        reply.push(b'\n');
        Applied {
            reply,
            change: None,
        }
    }
    fn apply_change(&mut self, c: &[u8]) -> Result<(), BadRecord> {
        let z = c.iter().position(|&b| b == 0).ok_or(BadRecord)?;
        self.0.insert(c[..z].to_vec(), c[z + 1..].to_vec());
        Ok(())
    }
    fn expire_due(&mut self, _: u64, _: usize) -> Option<Vec<u8>> {
        None
    }
    fn snapshot_chunk(&self, _: Option<&[u8]>, _: usize) -> SnapshotChunk {
        let mut bytes = Vec::new();
        for (k, v) in &self.0 {
            bytes.extend_from_slice(k);
            bytes.push(0);
            bytes.extend_from_slice(v);
            bytes.push(b'\n');
        }
        SnapshotChunk { bytes, next: None }
    }
    fn clear(&mut self) {
        self.0.clear();
    }
    fn restore_chunk(&mut self, c: &[u8]) -> Result<(), BadRecord> {
        for line in c.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
            self.apply_change(line)?;
        }
        Ok(())
    }
    fn state_hash(&self) -> [u8; 32] {
        let mut h = Sha256::new();
        for (k, v) in &self.0 {
            h.update(k);
            h.update([0]);
            h.update(v);
            h.update([1]);
        }
        h.finalize().into()
    }
    fn memory_used(&self) -> usize {
        self.0.iter().map(|(k, v)| k.len() + v.len()).sum()
    }
}

static REG: Reg = Reg;

/// Agents on a perfect network (messages delivered in order at the next step), a store
/// everyone reaches unless cut off, and `cut` nodes that neither send nor receive.
struct Net {
    now: Instant,
    agents: Vec<ReplicationAgent>,
    ids: Vec<NodeId>,
    store: BTreeMap<Key, PlacementRecord>,
    cut: BTreeSet<usize>,
    replies: BTreeMap<(usize, ConnId), Vec<u8>>,
}

impl Net {
    fn new(n: usize) -> Self {
        let ids: Vec<NodeId> = (0..n).map(|i| Id(0x1000 + i as u128)).collect();
        let agents = ids
            .iter()
            .map(|&id| {
                let mut c = AgentConfig::new(id, id.0 as u64);
                c.lease_ms = 300;
                c.heartbeat_ms = 50;
                c.store_timeout_ms = 200;
                c.sync_timeout_ms = 400;
                ReplicationAgent::new(c, ServiceSet::new(&[&REG]), Instant::ZERO)
            })
            .collect();
        Net {
            now: Instant::ZERO,
            agents,
            ids,
            store: BTreeMap::new(),
            cut: BTreeSet::new(),
            replies: BTreeMap::new(),
        }
    }

    fn record(&self, mode: Mode) -> PlacementRecord {
        PlacementRecord {
            name: "r".to_string(),
            service: "reg".to_string(),
            master: self.ids[0],
            slaves: vec![self.ids[1], self.ids[2]],
            epoch: 0,
            mode,
            port: 1,
            version: 0,
        }
    }

    fn pump(&mut self) {
        for _ in 0..50 {
            let mut moved = false;
            for i in 0..self.agents.len() {
                while let Some(o) = self.agents[i].poll_transmit() {
                    moved = true;
                    let to = self.ids.iter().position(|&x| x == o.to).unwrap();
                    if !self.cut.contains(&i) && !self.cut.contains(&to) {
                        let (now, from) = (self.now, self.ids[i]);
                        self.agents[to].handle_message(now, from, &o.bytes);
                    }
                }
                while let Some((op, req)) = self.agents[i].poll_store_op() {
                    moved = true;
                    let result = if self.cut.contains(&i) {
                        StoreResult::Unavailable
                    } else {
                        match req {
                            StoreOp::Get { app } => {
                                StoreResult::Record(self.store.get(&app).cloned())
                            }
                            StoreOp::CompareAndSet {
                                app,
                                expected_version,
                                record,
                            } => {
                                if self.store.get(&app).map_or(0, |r| r.version) == expected_version
                                {
                                    self.store.insert(app, record.clone());
                                    StoreResult::Record(Some(record))
                                } else {
                                    StoreResult::Conflict(self.store.get(&app).cloned())
                                }
                            }
                        }
                    };
                    let now = self.now;
                    self.agents[i].handle_store_result(now, op, result);
                }
                while let Some(e) = self.agents[i].poll_event() {
                    if let Event::Reply { conn, bytes } = e {
                        self.replies.entry((i, conn)).or_default().extend(bytes);
                    }
                }
            }
            if !moved {
                return;
            }
        }
    }

    fn run_ms(&mut self, ms: u64, mut check: impl FnMut(&Net)) {
        for _ in 0..ms / 10 {
            self.now = self.now.plus_ms(10);
            for i in 0..self.agents.len() {
                let now = self.now;
                self.agents[i].handle_timeout(now);
            }
            self.pump();
            check(self);
        }
    }

    fn masters(&self, app: Key) -> Vec<usize> {
        (0..self.agents.len())
            .filter(|&i| self.agents[i].is_accepting_writes(app, self.now))
            .collect()
    }

    fn client(&mut self, node: usize, conn: ConnId, bytes: &[u8]) {
        let (now, app) = (self.now, app_id_r());
        self.agents[node]
            .open_connection(now, conn, app, "reg")
            .unwrap();
        self.agents[node].handle_client_bytes(now, conn, bytes);
        self.pump();
    }

    fn reply(&self, node: usize, conn: ConnId) -> String {
        String::from_utf8_lossy(self.replies.get(&(node, conn)).map_or(&[][..], |v| v)).into_owned()
    }
}

fn app_id_r() -> Key {
    crate::replication::placement::app_id("r")
}

fn one_master(n: &Net) {
    assert!(
        n.masters(app_id_r()).len() <= 1,
        "two masters at {:?}",
        n.now
    );
}

fn started(mode: Mode) -> Net {
    let mut n = Net::new(4);
    let rec = n.record(mode);
    n.agents[0].create_instance(rec).unwrap();
    n.pump();
    let q = n.agents[0].config().quarantine_ms();
    n.run_ms(q + 1000, one_master);
    assert_eq!(
        n.masters(app_id_r()),
        vec![0],
        "the preferred master wins epoch 1"
    );
    assert_eq!(n.agents[0].epoch(app_id_r()), 1);
    n
}

#[test]
fn elects_replicates_and_relays_in_order() {
    let mut n = started(Mode::Async);
    let app = app_id_r();
    // Node 3 is no member: it relays, pipelined, and replies keep their order.
    n.client(3, 1, b"SET a 1\nPING\nGET a\nSET b 2\nGET b\n");
    n.run_ms(100, one_master);
    assert_eq!(n.reply(3, 1), "OK\nPONG\n1\nOK\n2\n");
    n.client(1, 2, b"WAIT 2 500\n");
    n.run_ms(100, one_master);
    assert_eq!(n.reply(1, 2), ":2\n");
    let h: Vec<_> = (0..3)
        .map(|i| n.agents[i].status(app, n.now).unwrap().state_hash)
        .collect();
    assert!(
        h[0].is_some() && h.iter().all(|x| *x == h[0]),
        "members converge"
    );
    let st = n.agents[0].status(app, n.now).unwrap();
    assert_eq!(st.view.seq, 2);
    assert!(st.view.slaves.iter().all(|s| s.lag_ops == 0 && s.online));
    assert!(n.agents[3].counters().relays_sent >= 1);
}

#[test]
fn sync_write_fails_after_its_bound_without_slaves() {
    let mut n = started(Mode::Sync);
    n.client(0, 1, b"SET a 1\n");
    n.run_ms(50, one_master);
    assert_eq!(n.reply(0, 1), "OK\n", "acknowledged once a slave holds it");
    n.cut.insert(1);
    n.cut.insert(2);
    n.client(0, 2, b"SET a 2\n");
    n.run_ms(200, one_master);
    assert_eq!(
        n.reply(0, 2),
        "",
        "not acknowledged while no slave holds it"
    );
    n.run_ms(600, one_master);
    let r = n.reply(0, 2);
    assert!(
        r == "ERR NotReplicated\n" || r == "ERR MasterChanged\n",
        "{r}"
    );
}

#[test]
fn fenced_master_stops_and_a_slave_takes_over_then_it_rejoins() {
    let mut n = started(Mode::Async);
    let app = app_id_r();
    n.client(0, 1, b"SET a 1\n");
    n.run_ms(50, one_master);
    // Cut the master off; a write it takes within its lease is acknowledged (async) but
    // never reaches a slave.
    n.cut.insert(0);
    n.client(0, 2, b"SET lost 1\n");
    assert_eq!(n.reply(0, 2), "OK\n");
    let lease = n.agents[0].config().lease_ms;
    n.run_ms(lease + 20, one_master);
    assert!(
        !n.agents[0].is_accepting_writes(app, n.now),
        "fenced after its lease"
    );
    n.client(0, 3, b"SET a 3\n");
    n.run_ms(lease + 100, one_master);
    assert_eq!(n.reply(0, 3), "", "a fenced master does not apply writes");
    let delay = n.agents[1].config().promotion_delay_ms();
    n.run_ms(delay + 1500, one_master);
    let m = n.masters(app);
    assert!(m == vec![1] || m == vec![2], "a slave took over: {m:?}");
    assert!(n.agents[m[0]].epoch(app) >= 2);
    // The new master takes writes (through a relay at the other slave too).
    let other = 3 - m[0];
    n.client(other, 5, b"SET b 2\n");
    n.run_ms(100, one_master);
    assert_eq!(n.reply(other, 5), "OK\n");
    let none = n.agents[0].config().no_master_timeout_ms;
    n.run_ms(none, one_master);
    let r = n.reply(0, 3);
    assert!(
        r == "ERR Fenced\n" || r == "ERR NoMaster\n",
        "cut off, the write fails: {r}"
    );
    // Heal: the old master rejoins as a slave, dropping its unreplicated write, counted.
    n.cut.clear();
    n.run_ms(2000, one_master);
    let st = n.agents[0].status(app, n.now).unwrap();
    assert_eq!(st.view.role, Role::Slave);
    assert_eq!(st.dropped_here, 1);
    assert_eq!(st.dropped_keys, vec![b"lost".to_vec()]);
    // (The cut-off node stood for election again and again; its return may force one more
    // election, which the newer log wins.)
    let m = n.masters(app);
    assert!(m == vec![1] || m == vec![2], "{m:?}");
    let ms = n.agents[m[0]].status(app, n.now).unwrap();
    assert_eq!(ms.lost_writes, 1);
    assert_eq!(
        st.state_hash, ms.state_hash,
        "the old master holds the new master's state"
    );
    // And a client at the old master reaches the new one.
    n.client(0, 4, b"GET a\nGET lost\nGET b\n");
    n.run_ms(100, one_master);
    assert_eq!(n.reply(0, 4), "1\nNIL\n2\n");
}

#[test]
fn bad_messages_are_dropped_and_counted() {
    let mut n = started(Mode::Async);
    let before = n.agents[1].counters().bad_messages;
    let now = n.now;
    for bytes in [
        &[][..],
        &[1, 2, 3],
        &[wire::WIRE_VERSION, 0xff, 0xff, 0xff],
        &[9; 40],
    ] {
        n.agents[1].handle_message(now, Id(77), bytes);
    }
    assert_eq!(n.agents[1].counters().bad_messages, before + 4);
    n.run_ms(200, one_master);
    assert_eq!(n.masters(app_id_r()), vec![0], "the instance keeps serving");
}
