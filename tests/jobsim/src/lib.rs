//! Deterministic simulation of fault-tolerant jobs: N overlay nodes, each with a job agent and
//! an application set, on virtual time with loss, partitions, crashes and restarts. One seeded
//! RNG decides everything, so a failing seed replays (`SIM_SEED=<seed>`).
//!
//! Overlay datagrams and job messages travel on two channels (the kernel's UDP port and its
//! job port); both see the same latency, loss and partitions. Task work takes virtual time:
//! the app runs when the agent hands it out, its result arrives after a cost-based delay.

use std::collections::{BTreeMap, HashMap};
use unipeer_node::id::{Id, Key, NodeId, ServerTag, placeholder_public_key};
use unipeer_node::jobs::app::{AppSet, TaskError, TaskOutput};
use unipeer_node::jobs::delegation::SharedKeyAuthority;
use unipeer_node::jobs::{JobAgent, JobConfig, JobEvent, Submission};
use unipeer_node::node::{Event, Node, NodeConfig, OpId, Timing};
use unipeer_node::rng::Rng;
use unipeer_node::{Instant, PeerAddr};
use unipeer_sim::harness::{self, Clock, Incarnation, Simulation};
use unipeer_sim::network::{Faults, Topology};

pub use unipeer_sim::harness::{replay_seed, seeds};

pub struct JobNode {
    pub node: Option<Node>,
    pub agent: Option<JobAgent>,
    pub apps: AppSet,
    pub id: NodeId,
    pub addr: PeerAddr,
    pub server: usize,
    public_key: [u8; 32],
    timer: Incarnation,
    /// Works handed out and not yet finished (must never exceed the slots).
    works: usize,
}

/// What the job simulator's agenda carries.
pub enum Ev {
    Overlay {
        to: usize,
        from: PeerAddr,
        bytes: Vec<u8>,
    },
    Job {
        to: usize,
        bytes: Vec<u8>,
    },
    Timer {
        slot: usize,
        incarnation: u32,
    },
    WorkDone {
        slot: usize,
        incarnation: u32,
        id: u64,
        result: Result<TaskOutput, TaskError>,
    },
}

/// Everything the checks look at afterwards.
#[derive(Debug, Default)]
pub struct JobLog {
    /// Every registration, per task: (node, output hash, verified).
    pub registered: BTreeMap<Key, Vec<(NodeId, Key, bool)>>,
    pub failed: BTreeMap<Key, Vec<NodeId>>,
    pub disputed: BTreeMap<Key, Vec<Key>>,
    pub spawned: BTreeMap<Key, usize>,
    pub submitted: Vec<Key>,
    pub fetched: BTreeMap<Key, Vec<u8>>,
    /// Works started per task (how often the app ran).
    pub works: BTreeMap<Key, usize>,
    /// Answers to the AA's gets: task key -> record value.
    pub got: BTreeMap<Key, Option<Vec<u8>>>,
    pub violations: Vec<String>,
    pub delegations: u64,
    /// Every lease handed out: (when, task, executor).
    pub dispatched: Vec<(Instant, Key, NodeId)>,
}

pub struct JobSim {
    pub seed: u64,
    pub now: Instant,
    pub rng: Rng,
    pub topology: Topology,
    pub faults: Faults,
    pub nodes: Vec<JobNode>,
    pub job_cfg: JobConfig,
    /// The overlay timing nodes start with (set before `start`).
    pub node_timing: Timing,
    by_addr: HashMap<([u8; 4], u16), usize>,
    clock: Clock<Ev>,
    aa_gets: HashMap<(usize, OpId), Key>,
    pub log: JobLog,
    pub events: u64,
}

impl JobSim {
    pub fn new(seed: u64, servers: usize, job_cfg: JobConfig) -> Self {
        let mut rng = Rng::from_u64(seed);
        let topology = Topology::random(&mut rng, servers, 100, (2_000, 20_000));
        JobSim {
            seed,
            now: Instant::ZERO,
            rng,
            topology,
            faults: Faults::default(),
            nodes: Vec::new(),
            job_cfg,
            node_timing: Timing::default(),
            by_addr: HashMap::new(),
            clock: Clock::new(seed),
            aa_gets: HashMap::new(),
            log: JobLog::default(),
            events: 0,
        }
    }

    /// Adds a node slot with these apps on a random server (not started).
    pub fn add_node(&mut self, apps: AppSet) -> usize {
        let i = self.nodes.len();
        let server = self.rng.below(self.topology.servers() as u64) as usize;
        let public_key = placeholder_public_key(&format!("jobsim-{}-{i}", self.seed));
        let addr = PeerAddr {
            ipv4: [10, 1, (i >> 8) as u8, i as u8],
            port: 7000,
        };
        self.nodes.push(JobNode {
            node: None,
            agent: None,
            apps,
            id: Id::from_public_key(&public_key),
            addr,
            server,
            public_key,
            timer: Incarnation::default(),
            works: 0,
        });
        self.by_addr.insert((addr.ipv4, addr.port), i);
        i
    }

    /// Starts (or restarts with empty state) slot `i`, joining through `bootstrap`.
    pub fn start(&mut self, i: usize, bootstrap: &[usize]) {
        let seed = self.rng.seed32();
        let seed2 = self.rng.seed32();
        let n = &self.nodes[i];
        let mut cfg = NodeConfig::new(
            &n.public_key,
            n.addr,
            ServerTag::from_name(&format!("server-{}", n.server)),
            seed,
        );
        cfg.timing = self.node_timing;
        let mut node = Node::new(cfg, self.now).expect("valid config");
        let addrs: Vec<PeerAddr> = bootstrap.iter().map(|b| self.nodes[*b].addr).collect();
        node.join(self.now, &addrs);
        let auth = SharedKeyAuthority {
            secret: [7; 32],
            me: n.id,
        };
        let agent = JobAgent::new(
            self.job_cfg,
            n.apps.clone(),
            Box::new(auth),
            node.contact(),
            seed2,
            self.now,
        );
        let n = &mut self.nodes[i];
        n.node = Some(node);
        n.agent = Some(agent);
        n.timer.restart();
        n.works = 0;
        self.after_io(i);
    }

    pub fn crash(&mut self, i: usize) {
        let n = &mut self.nodes[i];
        n.node = None;
        n.agent = None;
        n.works = 0;
        // Work and timers of the crashed incarnation are void.
        n.timer.crash();
    }

    /// Node `i`'s overlay wrongly declares `id` failed, as far as its job agent is told (the
    /// overlay itself keeps `id`): a false suspicion.
    pub fn suspect(&mut self, i: usize, id: NodeId) {
        let now = self.now;
        let n = &mut self.nodes[i];
        if let (Some(node), Some(agent)) = (n.node.as_mut(), n.agent.as_mut()) {
            agent.handle_overlay_event(now, node, &Event::PeerFailed { id });
        }
        self.after_io(i);
    }

    pub fn is_up(&self, i: usize) -> bool {
        self.nodes[i].node.is_some()
    }

    pub fn joined(&self) -> usize {
        self.nodes
            .iter()
            .filter(|n| n.node.as_ref().is_some_and(|x| x.is_joined()))
            .count()
    }

    /// Submits a job through node `i` (the Application Agent's entry node).
    pub fn submit(&mut self, i: usize, s: &Submission) -> Key {
        let now = self.now;
        let n = &mut self.nodes[i];
        let (node, agent) = (n.node.as_mut().unwrap(), n.agent.as_mut().unwrap());
        let job = agent.submit(now, node, s).expect("submission accepted");
        self.after_io(i);
        job
    }

    /// The AA stores the records of a job whose inputs node `i` holds (a resumed submission).
    pub fn submit_stored(
        &mut self,
        i: usize,
        user: &str,
        req: &unipeer_node::jobs::client::SubmitRequest,
    ) -> Key {
        let now = self.now;
        let n = &mut self.nodes[i];
        let (node, agent) = (n.node.as_mut().unwrap(), n.agent.as_mut().unwrap());
        let job = agent
            .submit_stored(now, node, user, req)
            .expect("submission accepted");
        self.after_io(i);
        job
    }

    /// The AA cancels `tasks` through node `i`.
    pub fn cancel(&mut self, i: usize, tasks: &[Key]) {
        let now = self.now;
        let n = &mut self.nodes[i];
        if let (Some(node), Some(agent)) = (n.node.as_mut(), n.agent.as_mut()) {
            agent.cancel(now, node, tasks);
        }
        self.after_io(i);
    }

    /// The AA reads a task record from the DHT through node `i`.
    pub fn get_record(&mut self, i: usize, key: Key) {
        let now = self.now;
        let Some(node) = self.nodes[i].node.as_mut() else {
            return;
        };
        if let Ok(op) = node.get(now, key) {
            self.aa_gets.insert((i, op), key);
        }
        self.after_io(i);
    }

    /// The AA fetches an output chunk through node `i`.
    pub fn fetch(&mut self, i: usize, id: Key) {
        let now = self.now;
        let n = &mut self.nodes[i];
        if let (Some(node), Some(agent)) = (n.node.as_mut(), n.agent.as_mut()) {
            agent.fetch_chunk(now, node, id);
        }
        self.after_io(i);
    }

    fn schedule(&mut self, at: Instant, ev: Ev) {
        self.clock.schedule(at, ev);
    }

    pub fn run_until(&mut self, until: Instant) {
        harness::run_until(self, until);
    }

    fn after_io(&mut self, i: usize) {
        for _ in 0..10_000 {
            let mut progress = false;
            let n = &mut self.nodes[i];
            let (Some(node), Some(agent)) = (n.node.as_mut(), n.agent.as_mut()) else {
                return;
            };
            let mut overlay_out = Vec::new();
            while let Some(t) = node.poll_transmit() {
                overlay_out.push(t);
            }
            let mut unclaimed = Vec::new();
            while let Some(e) = node.poll_event() {
                progress = true;
                if !agent.handle_overlay_event(self.now, node, &e) {
                    unclaimed.push(e);
                }
            }
            let mut job_out = Vec::new();
            while let Some(t) = agent.poll_transmit() {
                job_out.push(t);
            }
            let mut job_events = Vec::new();
            while let Some(e) = agent.poll_event() {
                job_events.push(e);
            }
            let mut works = Vec::new();
            while let Some(w) = agent.poll_work() {
                works.push(w);
            }
            progress |= !overlay_out.is_empty() || !job_out.is_empty() || !job_events.is_empty();
            progress |= !works.is_empty();
            let me = n.id;
            for t in overlay_out {
                self.deliver(i, t.dst, t.payload, false);
            }
            for t in job_out {
                self.deliver(i, t.dst, t.payload, true);
            }
            for e in unclaimed {
                if let Event::GetDone { op, value, .. } = e
                    && let Some(key) = self.aa_gets.remove(&(i, op))
                {
                    self.log.got.insert(key, value);
                }
            }
            for e in job_events {
                self.observe(me, e);
            }
            for w in works {
                *self.log.works.entry(w.task).or_insert(0) += 1;
                let inputs: Vec<&[u8]> = w.inputs.iter().map(Vec::as_slice).collect();
                let result = self.nodes[i].apps.run(&w.spec, &inputs);
                // Cost: 1.5 s + 10 ms per KiB of input + jitter, so crashes meet running tasks.
                let bytes: usize = w.inputs.iter().map(Vec::len).sum();
                let cost_ms = 1_500 + bytes as u64 / 100 + self.rng.below(1_000);
                let n = &mut self.nodes[i];
                n.works += 1;
                let inc = n.timer.number();
                let at = self.now.plus_ms(cost_ms);
                self.schedule(
                    at,
                    Ev::WorkDone {
                        slot: i,
                        incarnation: inc,
                        id: w.id,
                        result,
                    },
                );
            }
            if !progress {
                break;
            }
        }
        let n = &mut self.nodes[i];
        let (Some(node), Some(agent)) = (n.node.as_ref(), n.agent.as_ref()) else {
            return;
        };
        let at = match (node.poll_timeout(), agent.poll_timeout()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        if let Some((at, incarnation)) = n.timer.arm(self.now, at) {
            self.schedule(
                at,
                Ev::Timer {
                    slot: i,
                    incarnation,
                },
            );
        }
    }

    fn deliver(&mut self, from: usize, dst: PeerAddr, bytes: Vec<u8>, job: bool) {
        let Some(&to) = self.by_addr.get(&(dst.ipv4, dst.port)) else {
            return;
        };
        // Bulk on the job channel: 10 MB/s between nodes.
        let transfer_us = if job { bytes.len() as u64 / 10 } else { 0 };
        let fate = harness::fate(
            &mut self.rng,
            &self.topology,
            &self.faults,
            self.now,
            (from, self.nodes[from].server),
            (to, self.nodes[to].server),
            transfer_us,
        );
        let src = self.nodes[from].addr;
        for at in fate.arrivals() {
            let bytes = bytes.clone();
            let ev = if job {
                Ev::Job { to, bytes }
            } else {
                Ev::Overlay {
                    to,
                    from: src,
                    bytes,
                }
            };
            self.schedule(at, ev);
        }
    }

    fn observe(&mut self, me: NodeId, e: JobEvent) {
        match e {
            JobEvent::TaskRegistered {
                task,
                output_hash,
                verified,
                ..
            } => {
                let regs = self.log.registered.entry(task).or_default();
                if regs.iter().any(|r| r.1 != output_hash) {
                    let msg = format!("task {task:?} registered with two different outputs");
                    self.violation(msg);
                }
                self.log
                    .registered
                    .entry(task)
                    .or_default()
                    .push((me, output_hash, verified));
            }
            JobEvent::TaskFailed { task, .. } => {
                self.log.failed.entry(task).or_default().push(me);
            }
            JobEvent::TaskDisputed { task, hashes, .. } => {
                self.log.disputed.insert(task, hashes);
            }
            JobEvent::ReduceSpawned { task, .. } => {
                *self.log.spawned.entry(task).or_insert(0) += 1;
            }
            JobEvent::Submitted { job } => self.log.submitted.push(job),
            JobEvent::ChunkFetched { id, data } => {
                if Key::for_content(&data) != id {
                    self.violation(format!("fetched chunk {id:?} does not match its id"));
                }
                self.log.fetched.insert(id, data);
            }
            JobEvent::Dispatched { task, to } => self.log.dispatched.push((self.now, task, to)),
        }
    }

    fn violation(&mut self, what: String) {
        if self.log.violations.len() < 32 {
            self.log
                .violations
                .push(format!("t={:?} seed={}: {what}", self.now, self.seed));
        }
    }

    /// Sum of delegations accepted on live agents.
    pub fn delegations_accepted(&self) -> u64 {
        self.nodes
            .iter()
            .filter_map(|n| n.agent.as_ref())
            .map(|a| a.counters().delegations_accepted)
            .sum()
    }
}

impl Simulation for JobSim {
    type Event = Ev;

    fn clock(&mut self) -> &mut Clock<Ev> {
        &mut self.clock
    }

    fn set_now(&mut self, now: Instant) {
        self.now = self.now.max(now);
    }

    fn step(&mut self, ev: Ev) {
        self.events += 1;
        let now = self.now;
        match ev {
            Ev::Overlay { to, from, bytes } => {
                if let Some(n) = self.nodes[to].node.as_mut() {
                    n.handle_datagram(now, from, &bytes);
                    self.after_io(to);
                }
            }
            Ev::Job { to, bytes } => {
                let n = &mut self.nodes[to];
                if let (Some(node), Some(agent)) = (n.node.as_mut(), n.agent.as_mut()) {
                    agent.handle_message(now, node, &bytes);
                    self.after_io(to);
                }
            }
            Ev::Timer { slot, incarnation } => {
                let n = &mut self.nodes[slot];
                if !n.timer.fire(incarnation, now) {
                    return;
                }
                if let (Some(node), Some(agent)) = (n.node.as_mut(), n.agent.as_mut()) {
                    node.handle_timeout(now);
                    agent.handle_timeout(now, node);
                    self.after_io(slot);
                }
            }
            Ev::WorkDone {
                slot,
                incarnation,
                id,
                result,
            } => {
                let n = &mut self.nodes[slot];
                if !n.timer.is_current(incarnation) {
                    return;
                }
                n.works -= 1;
                if let (Some(node), Some(agent)) = (n.node.as_mut(), n.agent.as_mut()) {
                    agent.handle_work_done(now, node, id, result);
                    self.after_io(slot);
                }
            }
        }
    }

    /// No node ever holds more tasks than its slots (accepted or running).
    fn after_step(&mut self) {
        for i in 0..self.nodes.len() {
            let n = &self.nodes[i];
            let Some(agent) = n.agent.as_ref() else {
                continue;
            };
            let (running, slots) = (agent.running(), agent.slots() as usize);
            if running > slots || n.works > slots {
                let msg = format!(
                    "node {:?} over its slots: {running} accepted, {} running, {slots} slots",
                    n.id, n.works
                );
                self.violation(msg);
            }
        }
    }
}
