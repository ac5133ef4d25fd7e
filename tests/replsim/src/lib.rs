//! Deterministic simulation of a replicated `kv` instance: replication agents on simulated
//! nodes (each with its own drifting clock), a placement store with majority semantics,
//! clients sending pipelined requests through random nodes, and faults (crashes with or
//! without memory loss, pauses, partitions, isolation of the master, loss, duplication,
//! reordering, delay).
//!
//! Checked after every step: never two nodes whose leases (converted to real time) let them
//! accept writes at once. At the end, after healing: every member converges to the master's
//! log and state hash within a bound; sync mode keeps every acknowledged write; async mode
//! loses no more acknowledged writes than the system itself counts; no write is applied
//! twice (duplicated relays are suppressed). A seed decides everything; `SIM_SEED` replays.
//!
//! In async mode a master that dies *with its memory* takes the writes it acknowledged after
//! its last heartbeat with it, unseen by anyone: the system cannot count those, so async runs
//! pause nodes (a frozen or cut-off VM that comes back) instead of wiping them; sync runs do
//! both.

use std::collections::{BTreeMap, BTreeSet};

use unipeer_apps::kv;
use unipeer_node::replication::agent::{AgentConfig, Event, ReplicationAgent};
use unipeer_node::replication::placement::{
    Mode, PlacementRecord, StoreOp, StoreOpId, StoreResult, app_id,
};
use unipeer_node::replication::service::{ReplicatedService, ServiceSet};
use unipeer_node::rng::Rng;
use unipeer_node::{Id, Instant, Key, NodeId};
use unipeer_sim::harness::{self, Clock, Incarnation, Simulation};
use unipeer_sim::network::{Faults, Topology};

/// One run's shape.
#[derive(Clone, Debug)]
pub struct SimConfig {
    pub seed: u64,
    pub nodes: usize,
    pub servers: usize,
    /// Slaves of the instance (members = replicas + 1).
    pub replicas: usize,
    pub mode: Mode,
    /// Crashes wipe memory (else they pause the node).
    pub amnesia: bool,
    /// Faults and client traffic last this long.
    pub fault_ms: u64,
    /// After healing, convergence must come within this.
    pub heal_bound_ms: u64,
    /// A client operation starts this often.
    pub op_every_ms: u64,
    pub lease_ms: u64,
    /// Bound on clock rate error between two nodes (ppm); clocks drift within it.
    pub max_drift_ppm: u64,
}

impl SimConfig {
    /// The default run of `seed`: even seeds async, odd seeds sync (with memory loss).
    pub fn for_seed(seed: u64) -> Self {
        let sync = seed % 2 == 1;
        SimConfig {
            seed,
            nodes: 5,
            servers: 3,
            replicas: 2,
            mode: if sync { Mode::Sync } else { Mode::Async },
            amnesia: sync,
            fault_ms: 12_000,
            heal_bound_ms: 15_000,
            op_every_ms: 20,
            lease_ms: 600,
            max_drift_ppm: 20_000,
        }
    }
}

/// What a run measured.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub steps: u64,
    pub ops: u64,
    pub acked_writes: u64,
    pub failed_requests: u64,
    pub lost_by_checker: u64,
    pub lost_by_system: u64,
    pub promotions: u64,
    pub faults: u64,
    pub converged_after_ms: u64,
    pub relays: u64,
    pub bad_messages: u64,
}

enum Ev {
    Deliver {
        to: usize,
        from: NodeId,
        bytes: Vec<u8>,
    },
    Timer {
        slot: usize,
        inc: u32,
    },
    StoreArrive {
        slot: usize,
        inc: u32,
        op: StoreOpId,
        req: StoreOp,
    },
    StoreReply {
        slot: usize,
        inc: u32,
        op: StoreOpId,
        result: StoreResult,
    },
    ClientOp,
    Fault,
    Restart {
        slot: usize,
    },
    HealPartition,
}

struct Node {
    id: NodeId,
    server: usize,
    agent: Option<ReplicationAgent>,
    paused: bool,
    inc: Incarnation,
    rate_ppm: i64,
    offset_us: u64,
}

impl Node {
    fn local(&self, real: Instant) -> Instant {
        let r = real.as_micros() as i128;
        Instant::from_micros(
            (self.offset_us as i128 + r + r * self.rate_ppm as i128 / 1_000_000) as u64,
        )
    }

    /// The first real instant at which this node's clock reads at least `local`.
    fn real(&self, local: Instant) -> Instant {
        let l = local.as_micros() as i128 - self.offset_us as i128;
        if l <= 0 {
            return Instant::ZERO;
        }
        let r = (l * 1_000_000 + (1_000_000 + self.rate_ppm as i128) - 1)
            / (1_000_000 + self.rate_ppm as i128);
        Instant::from_micros(r.min(u64::MAX as i128 / 2) as u64)
    }

    fn up(&self) -> bool {
        self.agent.is_some() && !self.paused
    }
}

#[derive(Clone, Debug)]
enum Req {
    Append { key: usize, token: String },
    Get,
    Wait,
}

struct ClientConn {
    slot: usize,
    inc: u32,
    pending: std::collections::VecDeque<Req>,
}

struct Sim {
    cfg: SimConfig,
    rng: Rng,
    agenda: Clock<Ev>,
    now: Instant,
    topo: Topology,
    faults: Faults,
    nodes: Vec<Node>,
    app: Key,
    record: PlacementRecord,
    store: BTreeMap<Key, PlacementRecord>,
    conns: BTreeMap<u64, ClientConn>,
    next_conn: u64,
    next_token: u64,
    acked: Vec<(usize, String)>,
    /// Real-time lease windows: slot → (epoch, accepting until).
    windows: BTreeMap<usize, (u64, Instant)>,
    healing: bool,
    violation: Option<String>,
    final_reads: BTreeMap<usize, Option<Vec<u8>>>,
    reading: BTreeMap<u64, usize>,
    read_errors: Vec<String>,
    report: Report,
    keys: usize,
}

fn services() -> ServiceSet {
    ServiceSet::new(&[&kv::SERVICE as &'static dyn ReplicatedService])
}

impl Sim {
    fn new(cfg: SimConfig) -> Self {
        let mut rng = Rng::from_u64(cfg.seed);
        let topo = Topology::random(&mut rng, cfg.servers, 100, (2_000, 20_000));
        let mut nodes = Vec::new();
        for i in 0..cfg.nodes {
            let half = (cfg.max_drift_ppm / 2) as i64;
            let rate_ppm = rng.below(2 * half as u64 + 1) as i64 - half;
            nodes.push(Node {
                id: Id(rng.next_u128()),
                server: i % cfg.servers,
                agent: None,
                paused: false,
                inc: Incarnation::default(),
                rate_ppm,
                offset_us: rng.below(1_000_000_000),
            });
        }
        let members: Vec<NodeId> = nodes.iter().take(cfg.replicas + 1).map(|n| n.id).collect();
        let record = PlacementRecord {
            name: "cache".into(),
            service: "kv".into(),
            master: members[0],
            slaves: members[1..].to_vec(),
            epoch: 0,
            mode: cfg.mode,
            port: 6379,
            version: 0,
        };
        let app = app_id("cache");
        let mut sim = Sim {
            rng,
            agenda: Clock::new(cfg.seed),
            now: Instant::ZERO,
            topo,
            faults: Faults::default(),
            nodes,
            app,
            record,
            store: BTreeMap::new(),
            conns: BTreeMap::new(),
            next_conn: 1,
            next_token: 1,
            acked: Vec::new(),
            windows: BTreeMap::new(),
            healing: false,
            violation: None,
            final_reads: BTreeMap::new(),
            reading: BTreeMap::new(),
            read_errors: Vec::new(),
            report: Report::default(),
            keys: 8,
            cfg,
        };
        for slot in 0..sim.nodes.len() {
            sim.start(slot);
        }
        sim
    }

    fn agent_config(&mut self, slot: usize) -> AgentConfig {
        let mut c = AgentConfig::new(self.nodes[slot].id, self.rng.next_u64());
        c.lease_ms = self.cfg.lease_ms;
        c.heartbeat_ms = self.cfg.lease_ms / 6;
        c.max_drift_ppm = self.cfg.max_drift_ppm;
        c.sync_timeout_ms = 2 * self.cfg.lease_ms;
        c.relay_timeout_ms = 3 * self.cfg.lease_ms;
        c.no_master_timeout_ms = 6 * self.cfg.lease_ms;
        c.store_timeout_ms = 1000;
        c.backlog_entries = 200;
        c.snapshot_chunk_bytes = 512;
        c
    }

    fn start(&mut self, slot: usize) {
        let cfg = self.agent_config(slot);
        let local = self.nodes[slot].local(self.now);
        let n = &mut self.nodes[slot];
        n.inc.restart();
        n.paused = false;
        n.agent = Some(ReplicationAgent::new(cfg, services(), local));
        if let Some(a) = n.agent.as_mut() {
            a.watch(local, self.app);
        }
        self.drain(slot);
    }

    fn drain(&mut self, slot: usize) {
        let now = self.now;
        let local = self.nodes[slot].local(now);
        let inc = self.nodes[slot].inc.number();
        let from = self.nodes[slot].id;
        let Some(agent) = self.nodes[slot].agent.as_mut() else {
            return;
        };
        let mut sends = Vec::new();
        while let Some(o) = agent.poll_transmit() {
            sends.push(o);
        }
        let mut ops = Vec::new();
        while let Some(op) = agent.poll_store_op() {
            ops.push(op);
        }
        let mut events = Vec::new();
        while let Some(e) = agent.poll_event() {
            events.push(e);
        }
        let wanted = agent.poll_timeout();
        for o in sends {
            let Some(to) = self.nodes.iter().position(|n| n.id == o.to) else {
                continue;
            };
            let fate = harness::fate(
                &mut self.rng,
                &self.topo,
                &self.faults,
                now,
                (slot, self.nodes[slot].server),
                (to, self.nodes[to].server),
                o.bytes.len() as u64 / 100,
            );
            for at in fate.arrivals() {
                self.agenda.schedule(
                    at,
                    Ev::Deliver {
                        to,
                        from,
                        bytes: o.bytes.clone(),
                    },
                );
            }
        }
        for (op, req) in ops {
            let base = 2 * self.topo.base_us(0, self.nodes[slot].server).max(500);
            if self.reaches_majority(slot) && !self.rng.chance(self.faults.loss) {
                self.agenda
                    .schedule(now.plus_us(base), Ev::StoreArrive { slot, inc, op, req });
            } else {
                // The DHT's majority is out of reach: the put fails after its timeout.
                self.agenda.schedule(
                    now.plus_ms(300),
                    Ev::StoreReply {
                        slot,
                        inc,
                        op,
                        result: StoreResult::Unavailable,
                    },
                );
            }
        }
        for e in events {
            self.client_event(e);
        }
        let n = &mut self.nodes[slot];
        let wanted = wanted.map(|w| n.real(w.max(local)));
        if let Some((at, number)) = n.inc.arm(now, wanted) {
            self.agenda.schedule(at, Ev::Timer { slot, inc: number });
        }
    }

    fn reaches_majority(&self, slot: usize) -> bool {
        let n = self.nodes.len();
        let reach = (0..n).filter(|&o| self.faults.connected(slot, o)).count();
        reach > n / 2
    }

    fn store_arrive(&mut self, slot: usize, inc: u32, op: StoreOpId, req: StoreOp) {
        let result = if !self.reaches_majority(slot) {
            StoreResult::Unavailable
        } else {
            match req {
                StoreOp::Get { app } => StoreResult::Record(self.store.get(&app).cloned()),
                StoreOp::CompareAndSet {
                    app,
                    expected_version,
                    record,
                } => {
                    let cur = self.store.get(&app).map_or(0, |r| r.version);
                    if cur == expected_version && record.version == expected_version + 1 {
                        self.store.insert(app, record.clone());
                        StoreResult::Record(Some(record))
                    } else {
                        StoreResult::Conflict(self.store.get(&app).cloned())
                    }
                }
            }
        };
        // The answer may be lost after the store decided (an ambiguous CAS).
        let result = if self.rng.chance(self.faults.loss) {
            StoreResult::Unavailable
        } else {
            result
        };
        let back = 2 * self.topo.base_us(0, self.nodes[slot].server).max(500);
        self.agenda.schedule(
            self.now.plus_us(back),
            Ev::StoreReply {
                slot,
                inc,
                op,
                result,
            },
        );
    }

    fn client_event(&mut self, e: Event) {
        match e {
            Event::Reply { conn, bytes } => {
                if let Some(&key) = self.reading.get(&conn) {
                    if bytes.first() == Some(&b'$') {
                        self.final_reads.insert(key, parse_bulk(&bytes));
                    } else {
                        self.read_errors
                            .push(String::from_utf8_lossy(&bytes).into_owned());
                    }
                }
                let Some(c) = self.conns.get_mut(&conn) else {
                    return;
                };
                let Some(req) = c.pending.pop_front() else {
                    self.violation
                        .get_or_insert(format!("conn {conn}: a reply nobody asked for"));
                    return;
                };
                match req {
                    Req::Append { key, token } => {
                        if bytes.first() == Some(&b':') {
                            self.acked.push((key, token));
                            self.report.acked_writes += 1;
                        } else if bytes.first() == Some(&b'-') {
                            self.report.failed_requests += 1;
                        } else {
                            self.violation.get_or_insert(format!(
                                "APPEND answered {:?}",
                                String::from_utf8_lossy(&bytes)
                            ));
                        }
                    }
                    Req::Get | Req::Wait => {
                        if bytes.first() == Some(&b'-') {
                            self.report.failed_requests += 1;
                        }
                    }
                }
                if c.pending.is_empty() {
                    let (slot, inc) = (c.slot, c.inc);
                    self.conns.remove(&conn);
                    if self.nodes[slot].inc.is_current(inc)
                        && let Some(a) = self.nodes[slot].agent.as_mut()
                    {
                        a.close_connection(conn);
                    }
                }
            }
            Event::Close { conn } => {
                self.conns.remove(&conn);
            }
            Event::RoleChanged { role, epoch, .. } => {
                if std::env::var("REPLSIM_TRACE").is_ok() {
                    eprintln!("{:?} role {role:?} epoch {epoch}", self.now);
                }
            }
        }
    }

    fn pick_up_node(&mut self) -> Option<usize> {
        let up: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| self.nodes[i].up())
            .collect();
        if up.is_empty() {
            return None;
        }
        Some(up[self.rng.below(up.len() as u64) as usize])
    }

    fn send_requests(
        &mut self,
        slot: usize,
        reqs: Vec<Req>,
        lines: Vec<Vec<u8>>,
        read_of: Option<usize>,
    ) -> u64 {
        let conn = self.next_conn;
        self.next_conn += 1;
        if let Some(key) = read_of {
            self.reading.insert(conn, key);
        }
        let local = self.nodes[slot].local(self.now);
        let inc = self.nodes[slot].inc.number();
        self.conns.insert(
            conn,
            ClientConn {
                slot,
                inc,
                pending: reqs.into(),
            },
        );
        if let Some(a) = self.nodes[slot].agent.as_mut()
            && a.open_connection(local, conn, self.app, "kv").is_ok()
        {
            let bytes: Vec<u8> = lines.concat();
            // Bytes arrive in two pieces, split anywhere (the decoder is incremental).
            let cut = self.rng.below(bytes.len() as u64 + 1) as usize;
            a.handle_client_bytes(local, conn, &bytes[..cut]);
            a.handle_client_bytes(local, conn, &bytes[cut..]);
        }
        self.drain(slot);
        conn
    }

    fn client_op(&mut self) {
        self.report.ops += 1;
        let Some(slot) = self.pick_up_node() else {
            return;
        };
        let n = 1 + self.rng.below(3) as usize;
        let mut reqs = Vec::new();
        let mut lines = Vec::new();
        for _ in 0..n {
            let r = self.rng.below(10);
            if r < 7 {
                let key = self.rng.below(self.keys as u64) as usize;
                let token = format!("t{};", self.next_token);
                self.next_token += 1;
                lines.push(multibulk(&[
                    b"APPEND",
                    format!("k{key}").as_bytes(),
                    token.as_bytes(),
                ]));
                reqs.push(Req::Append { key, token });
            } else if r < 9 {
                let key = self.rng.below(self.keys as u64);
                lines.push(multibulk(&[b"GET", format!("k{key}").as_bytes()]));
                reqs.push(Req::Get);
            } else {
                lines.push(b"WAIT 1 50\r\n".to_vec());
                reqs.push(Req::Wait);
            }
        }
        self.send_requests(slot, reqs, lines, None);
    }

    fn fault(&mut self) {
        self.report.faults += 1;
        let n = self.nodes.len();
        let down = self.nodes.iter().filter(|n| !n.up()).count();
        match self.rng.below(10) {
            0..=2 if down < 2 => {
                let slot = self.rng.below(n as u64) as usize;
                self.stop(slot);
            }
            3 | 4 => {
                let groups: Vec<u8> = (0..n).map(|_| self.rng.below(2) as u8).collect();
                self.faults.partition = Some(groups);
                let d = 500 + self.rng.below(3000);
                self.agenda.schedule(self.now.plus_ms(d), Ev::HealPartition);
            }
            5 | 6 => {
                // Cut the master off from everyone (the partition that loses writes).
                if let Some(m) = self.current_master() {
                    let groups: Vec<u8> = (0..n).map(|i| (i == m) as u8).collect();
                    self.faults.partition = Some(groups);
                    let d = 500 + self.rng.below(3000);
                    self.agenda.schedule(self.now.plus_ms(d), Ev::HealPartition);
                }
            }
            7 => {
                if let Some(m) = self.current_master()
                    && down < 2
                {
                    self.stop(m);
                }
            }
            _ => {
                self.faults.loss = [0.0, 0.05, 0.2][self.rng.below(3) as usize];
                self.faults.duplicate = [0.0, 0.05][self.rng.below(2) as usize];
                self.faults.reorder = [0.0, 0.1][self.rng.below(2) as usize];
            }
        }
        let next = 200 + self.rng.below(1200);
        self.agenda.schedule(self.now.plus_ms(next), Ev::Fault);
    }

    fn stop(&mut self, slot: usize) {
        if !self.nodes[slot].up() {
            return;
        }
        // Memory loss beyond one member at a time is beyond what a group of three survives
        // (a sync write lives on two): lose memory only while every other member holds a
        // log it did not lose.
        let members: Vec<NodeId> = self.record.members().collect();
        let others_whole = self.nodes.iter().enumerate().all(|(i, n)| {
            i == slot
                || !members.contains(&n.id)
                || n.agent
                    .as_ref()
                    .is_some_and(|a| a.is_trusted_member(self.app))
        });
        if self.cfg.amnesia && others_whole && self.rng.chance(0.7) {
            self.nodes[slot].agent = None;
            self.windows.remove(&slot);
        } else {
            self.nodes[slot].paused = true;
        }
        self.nodes[slot].inc.crash();
        // Its client connections die with it: their outcome is unknown to the client.
        let dead: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, c)| c.slot == slot)
            .map(|(id, _)| *id)
            .collect();
        for id in dead {
            self.conns.remove(&id);
            self.report.failed_requests += 1;
        }
        let d = 300 + self.rng.below(3000);
        self.agenda
            .schedule(self.now.plus_ms(d), Ev::Restart { slot });
    }

    fn restart(&mut self, slot: usize) {
        let n = &mut self.nodes[slot];
        if n.agent.is_none() {
            self.start(slot);
        } else if n.paused {
            n.paused = false;
            let local = n.local(self.now);
            if let Some(a) = n.agent.as_mut() {
                a.handle_timeout(local);
            }
            self.drain(slot);
        }
    }

    fn current_master(&self) -> Option<usize> {
        (0..self.nodes.len()).find(|&i| {
            let n = &self.nodes[i];
            n.up()
                && n.agent
                    .as_ref()
                    .is_some_and(|a| a.is_accepting_writes(self.app, n.local(self.now)))
        })
    }

    fn handle(&mut self, ev: Ev) {
        if std::env::var("REPLSIM_TRACE").is_ok() {
            match &ev {
                Ev::Fault | Ev::Restart { .. } | Ev::HealPartition => {
                    eprintln!(
                        "{:?} {} partition {:?} loss {}",
                        self.now,
                        match &ev {
                            Ev::Fault => "fault",
                            Ev::Restart { .. } => "restart",
                            _ => "heal",
                        },
                        self.faults.partition,
                        self.faults.loss
                    )
                }
                _ => {}
            }
        }
        match ev {
            Ev::Deliver { to, from, bytes } => {
                let n = &mut self.nodes[to];
                if !n.up() {
                    return;
                }
                let local = n.local(self.now);
                if let Some(a) = n.agent.as_mut() {
                    a.handle_message(local, from, &bytes);
                }
                self.drain(to);
            }
            Ev::Timer { slot, inc } => {
                let n = &mut self.nodes[slot];
                if !n.inc.fire(inc, self.now) || !n.up() {
                    return;
                }
                let local = n.local(self.now);
                if let Some(a) = n.agent.as_mut() {
                    a.handle_timeout(local);
                }
                self.drain(slot);
            }
            Ev::StoreArrive { slot, inc, op, req } => self.store_arrive(slot, inc, op, req),
            Ev::StoreReply {
                slot,
                inc,
                op,
                result,
            } => {
                let n = &mut self.nodes[slot];
                if !n.inc.is_current(inc) || !n.up() {
                    return;
                }
                let local = n.local(self.now);
                if let Some(a) = n.agent.as_mut() {
                    a.handle_store_result(local, op, result);
                }
                self.drain(slot);
            }
            Ev::ClientOp => {
                if !self.healing {
                    self.client_op();
                    self.agenda
                        .schedule(self.now.plus_ms(self.cfg.op_every_ms), Ev::ClientOp);
                }
            }
            Ev::Fault => {
                if !self.healing {
                    self.fault();
                }
            }
            Ev::Restart { slot } => self.restart(slot),
            Ev::HealPartition => {
                if !self.healing {
                    self.faults.partition = None;
                }
            }
        }
    }

    /// Safety after every step: the real-time windows in which nodes may accept writes never
    /// overlap between two nodes.
    fn check(&mut self) {
        for i in 0..self.nodes.len() {
            let n = &self.nodes[i];
            let Some(a) = n.agent.as_ref() else { continue };
            let local = n.local(self.now);
            if !a.is_accepting_writes(self.app, local) {
                // A running node that stopped serving (lease over, or stood down) closed its
                // window; it can only serve again as the winner of a later election.
                if !n.paused {
                    self.windows.remove(&i);
                }
                continue;
            }
            let epoch = a.epoch(self.app);
            let until = a.lease_until(self.app).map_or(self.now, |t| n.real(t));
            for (&j, &(e, u)) in &self.windows {
                if j != i && u > self.now {
                    self.violation.get_or_insert(format!(
                        "two masters: node {i} (epoch {epoch}) accepts writes at {:?} while node {j} (epoch {e}) may until {u:?}",
                        self.now
                    ));
                }
            }
            self.windows.insert(i, (epoch, until));
        }
    }

    fn run_until(&mut self, until: Instant) {
        harness::run_until(self, until);
    }

    fn heal(&mut self) {
        self.healing = true;
        self.faults = Faults::default();
        for slot in 0..self.nodes.len() {
            if !self.nodes[slot].up() {
                self.restart(slot);
            }
        }
    }

    /// Whether every member holds the master's log and state.
    fn converged(&self) -> Result<(), String> {
        let Some(m) = self.current_master() else {
            return Err("no master accepts writes".into());
        };
        let mn = &self.nodes[m];
        let ms = mn
            .agent
            .as_ref()
            .and_then(|a| a.status(self.app, mn.local(self.now)))
            .ok_or("master has no status")?;
        let record = ms.record.clone().ok_or("master has no record")?;
        let want = (
            ms.state_hash,
            self.nodes[m]
                .agent
                .as_ref()
                .and_then(|a| a.log_end(self.app)),
        );
        for id in record.members() {
            let i = self
                .nodes
                .iter()
                .position(|n| n.id == id)
                .ok_or("member unknown")?;
            let n = &self.nodes[i];
            let a = n.agent.as_ref().ok_or("member down")?;
            let s = a
                .status(self.app, n.local(self.now))
                .ok_or("member has no status")?;
            if (s.state_hash, a.log_end(self.app)) != want {
                return Err(format!(
                    "node {i} at {:?}, master {m} at {:?}",
                    a.log_end(self.app),
                    want.1
                ));
            }
        }
        Ok(())
    }
}

impl Simulation for Sim {
    type Event = Ev;
    fn clock(&mut self) -> &mut Clock<Ev> {
        &mut self.agenda
    }
    fn set_now(&mut self, now: Instant) {
        self.now = now;
    }
    fn step(&mut self, ev: Ev) {
        self.report.steps += 1;
        self.handle(ev);
    }
    fn after_step(&mut self) {
        if self.violation.is_none() {
            self.check();
        }
    }
}

fn multibulk(args: &[&[u8]]) -> Vec<u8> {
    let mut f = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        f.extend(format!("${}\r\n", a.len()).into_bytes());
        f.extend_from_slice(a);
        f.extend_from_slice(b"\r\n");
    }
    f
}

fn parse_bulk(b: &[u8]) -> Option<Vec<u8>> {
    if b.starts_with(b"$-1") || !b.starts_with(b"$") {
        return None;
    }
    let nl = b.windows(2).position(|w| w == b"\r\n")?;
    let n: usize = std::str::from_utf8(&b[1..nl]).ok()?.parse().ok()?;
    b.get(nl + 2..nl + 2 + n).map(|v| v.to_vec())
}

/// Runs one seed: faults and traffic, then healing, convergence and the durability checks.
pub fn run(cfg: SimConfig) -> Result<Report, String> {
    let mut sim = Sim::new(cfg.clone());
    let creator = 0;
    let local = sim.nodes[creator].local(sim.now);
    let record = sim.record.clone();
    if let Some(a) = sim.nodes[creator].agent.as_mut() {
        a.create_instance(record)
            .map_err(|e| format!("create: {e}"))?;
        a.handle_timeout(local);
    }
    sim.drain(creator);
    sim.agenda.schedule(Instant::from_millis(100), Ev::ClientOp);
    sim.agenda.schedule(Instant::from_millis(2_000), Ev::Fault);
    sim.run_until(Instant::from_millis(cfg.fault_ms));
    if let Some(v) = sim.violation.take() {
        return Err(v);
    }
    sim.heal();
    let healed_at = sim.now;
    let deadline = healed_at.plus_ms(cfg.heal_bound_ms);
    let mut last = Err(String::from("never checked"));
    while sim.now < deadline {
        let t = sim.now.plus_ms(50);
        sim.run_until(t);
        if let Some(v) = sim.violation.take() {
            return Err(v);
        }
        // Clients still waiting for replies are part of what must settle.
        last = sim.converged();
        if last.is_ok() && sim.conns.is_empty() {
            break;
        }
    }
    if let Err(e) = last {
        return Err(format!(
            "no convergence {} ms after healing: {e}",
            cfg.heal_bound_ms
        ));
    }
    if !sim.conns.is_empty() {
        return Err(format!(
            "{} client connections never answered after healing",
            sim.conns.len()
        ));
    }
    sim.report.converged_after_ms = sim.now.millis_since(healed_at);

    // Read every key back through random nodes, as a client would.
    for key in 0..sim.keys {
        let Some(slot) = sim.pick_up_node() else {
            return Err("no node up".into());
        };
        sim.send_requests(
            slot,
            vec![Req::Get],
            vec![multibulk(&[b"GET", format!("k{key}").as_bytes()])],
            Some(key),
        );
    }
    let t = sim.now.plus_ms(5_000);
    while sim.now < t && sim.final_reads.len() < sim.keys {
        let s = sim.now.plus_ms(50);
        sim.run_until(s);
    }
    if sim.final_reads.len() < sim.keys {
        return Err(format!(
            "final reads: {} of {} answered; errors {:?}",
            sim.final_reads.len(),
            sim.keys,
            sim.read_errors
        ));
    }
    let mut present: BTreeSet<(usize, String)> = BTreeSet::new();
    for (&key, v) in &sim.final_reads {
        let v = String::from_utf8_lossy(v.as_deref().unwrap_or_default()).into_owned();
        for t in v.split(';').filter(|t| !t.is_empty()) {
            if !present.insert((key, format!("{t};"))) {
                return Err(format!("k{key}: token {t} applied twice"));
            }
        }
    }
    let missing: Vec<&(usize, String)> =
        sim.acked.iter().filter(|a| !present.contains(a)).collect();
    let m = sim.current_master().ok_or("no master at the end")?;
    let mn = &sim.nodes[m];
    let status = mn
        .agent
        .as_ref()
        .and_then(|a| a.status(sim.app, mn.local(sim.now)))
        .ok_or("no status")?;
    sim.report.lost_by_checker = missing.len() as u64;
    sim.report.lost_by_system = status.lost_writes;
    for n in &sim.nodes {
        if let Some(a) = n.agent.as_ref() {
            let c = a.counters();
            sim.report.promotions += c.promotions;
            sim.report.relays += c.relays_sent;
            sim.report.bad_messages += c.bad_messages;
        }
    }
    match cfg.mode {
        Mode::Sync if !missing.is_empty() => {
            return Err(format!(
                "sync mode lost {} acknowledged writes, e.g. {:?}",
                missing.len(),
                &missing[..missing.len().min(5)]
            ));
        }
        Mode::Async if missing.len() as u64 > status.lost_writes => {
            return Err(format!(
                "async mode lost {} acknowledged writes, the system counted {}: e.g. {:?}",
                missing.len(),
                status.lost_writes,
                &missing[..missing.len().min(5)]
            ));
        }
        _ => {}
    }
    Ok(sim.report)
}
