//! The replication service: drives the node core's [`ReplicationAgent`] beside the overlay
//! peer the way the replication simulator does (`tests/replsim`), and is the **distributed
//! protocol handler**: every node listens on every instance's port and feeds the connections
//! to the agent, which answers at the master or relays to it.
//!
//! - **Node-to-node messages** go over the replication channel: the job channel's sealed TCP
//!   transport (`jobs::JobChannel`) with its own [`ChannelKind`] (overlay port +
//!   [`REPL_PORT_OFFSET`], its own stream context and hello magic). The sender is the overlay
//!   address its hello named (checked against the trust session and the TCP source), mapped to
//!   a node id through the overlay's contacts; a message from an address no contact has is
//!   dropped, counted.
//! - **The store port** (`StoreOp`): the placement record lives at the instance's key in the
//!   DHT; a get is the overlay's get, a compare-and-set its majority-acknowledged `put_if` on
//!   the record's version (the record carries its version, which every CAS advances by one,
//!   as the DHT's does). A CAS that reports a version mismatch is read back: if the stored
//!   record is the one it wrote (a retry of a CAS that landed), it succeeded.
//! - **The registry**: the list of instances (name, service, port) is one DHT record
//!   ([`registry_key`]) changed by compare-and-set; every node reads it every
//!   [`REGISTRY_POLL_US`] and listens on each instance's port.
//! - **Client connections** on an instance port: up to [`CONNS_PER_PORT`] per port, at most
//!   [`SLOTS_PER_SOURCE`] held by one source other than the host; a connection that sends no
//!   byte, or leaves a partial frame unfinished, for [`HALF_OPEN_US`] is closed (counted
//!   `repl_half_open_closed`), one idle for [`IDLE_US`] too. Oversized and malformed frames are
//!   the agent's (the service's decoder's limits): the connection gets an error and is closed,
//!   counted.
//! - **Control**: `apps`, `app-status NAME` (open), `app-create`, `app-delete` (operator only)
//!   on the diagnostic port.

use alloc::collections::{BTreeMap, VecDeque};
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt::Write;

use sha2::{Digest, Sha256};
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp;
use unipeer_node::auth::Csprng;
use unipeer_node::launch::{LaunchConfig, PeerAddr};
use unipeer_node::node::RequestError;
use unipeer_node::replication::agent::Event as AgentEvent;
use unipeer_node::replication::service::Role;
use unipeer_node::replication::{
    AgentConfig, ConnId, Mode, PlacementRecord, ReplicationAgent, ServiceSet, StoreOp, StoreOpId,
    StoreResult, app_id,
};
use unipeer_node::wire::{Contact, PutError};
use unipeer_node::{Event, Id, Instant, Key, NodeId, OpId};

use crate::jobs::{ChannelKind, JobChannel};
use crate::net::Stack;
use crate::net::guard::{self, SourcePolicy};
use crate::service::{
    AppCommand, Context, Demand, OverlayAccess, RoutedCommand, Service, ServiceEvent, SessionId,
    UNAUTHORIZED_REPLY,
};

/// The replication channel's port: the overlay port + this (TCP).
pub const REPL_PORT_OFFSET: u16 = 4;
/// Largest replication message on the channel (a batch, a snapshot chunk, a relayed batch).
pub const MAX_REPL_MESSAGE: usize = 256 * 1024;
/// The replication channel.
pub const REPL_CHANNEL: ChannelKind = ChannelKind {
    port_offset: REPL_PORT_OFFSET,
    context: b"unipeer replication stream v1",
    magic: b"UR",
    max_message: MAX_REPL_MESSAGE,
    slots_per_source: guard::JOB_SLOTS_PER_SOURCE,
};
/// Client connections one instance port holds at once.
pub const CONNS_PER_PORT: usize = 32;
/// Listening sockets kept ready per port (each takes one connection).
const SPARE_LISTENERS: usize = 4;
/// Connections one source other than the host may hold on one instance port.
pub const SLOTS_PER_SOURCE: usize = 8;
/// A connection silent from its start, or with a partial request unfinished, this long is
/// closed.
pub const HALF_OPEN_US: u64 = 10_000_000;
/// A connection with nothing pending and silent this long is closed.
pub const IDLE_US: u64 = 300_000_000;
/// How often the registry of instances is read.
pub const REGISTRY_POLL_US: u64 = 2_000_000;
/// Client socket buffers.
const CLIENT_BUF: usize = 8 * 1024;
/// Bytes read from one connection per pass.
const READ_BUDGET: usize = 16 * 1024;
/// Bytes of replies queued per connection before the agent's output for it is cut (the
/// client does not read): the connection is closed, counted.
const OUT_LIMIT: usize = 1 << 20;
/// Registry edits retried on a lost compare-and-set.
const REGISTRY_TRIES: u32 = 6;
/// An `app-create` or `app-delete` answers within this.
const COMMAND_DEADLINE_US: u64 = 30_000_000;
const REGISTRY_MAGIC: &str = "unipeer-apps v1";

/// The replicated services linked into this image (kernel features `service-<name>`).
pub fn linked_services() -> ServiceSet {
    let services: &[&'static dyn unipeer_node::replication::ReplicatedService] = &[
        #[cfg(feature = "service-kv")]
        &unipeer_apps::kv::SERVICE,
    ];
    ServiceSet::new(services)
}

/// The DHT key of the registry of instances.
pub fn registry_key() -> Key {
    Id::for_name(b"unipeer replication registry")
}

fn instant(now_us: u64) -> Instant {
    Instant::from_micros(now_us)
}

/// One instance in the registry.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Entry {
    name: String,
    service: String,
    port: u16,
}

/// The registry's value: a version (advanced by every CAS, like the DHT's) and the entries.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
struct Registry {
    version: u64,
    entries: Vec<Entry>,
}

impl Registry {
    fn encode(&self) -> Vec<u8> {
        let mut s = String::new();
        let _ = writeln!(s, "{REGISTRY_MAGIC} {}", self.version);
        for e in &self.entries {
            let _ = writeln!(s, "{} {} {}", e.name, e.service, e.port);
        }
        s.into_bytes()
    }

    fn decode(bytes: &[u8]) -> Option<Registry> {
        let text = core::str::from_utf8(bytes).ok()?;
        let mut lines = text.lines();
        let version = lines
            .next()?
            .strip_prefix(REGISTRY_MAGIC)?
            .trim()
            .parse()
            .ok()?;
        let mut entries = Vec::new();
        for l in lines.take(unipeer_node::replication::agent::MAX_INSTANCES) {
            let mut w = l.split(' ');
            let (Some(name), Some(service), Some(port), None) =
                (w.next(), w.next(), w.next(), w.next())
            else {
                return None;
            };
            if !unipeer_node::diag_command::valid_app_name(name) {
                return None;
            }
            entries.push(Entry {
                name: String::from(name),
                service: String::from(service),
                port: port.parse().ok()?,
            });
        }
        Some(Registry { version, entries })
    }
}

/// Counters of the service (the agent's and the channel's are reported beside them).
#[derive(Default, Clone, Copy)]
pub struct ReplCounters {
    pub conns_accepted: u64,
    pub conns_closed: u64,
    /// Refused: the source held its share of the port's slots.
    pub source_capped: u64,
    /// Refused by the agent (too many connections, unknown service).
    pub conns_refused: u64,
    pub half_open_closed: u64,
    pub idle_closed: u64,
    /// Closed because the client did not read its replies.
    pub out_overflow: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Messages from an address no overlay contact has.
    pub unknown_sender: u64,
    /// Messages for a node whose address is unknown.
    pub unknown_dest: u64,
    pub store_gets: u64,
    pub store_cas: u64,
    pub store_unavailable: u64,
    pub registry_reads: u64,
    pub registry_bad: u64,
    pub role_changes: u64,
    pub creates: u64,
    pub deletes: u64,
}

enum StoreWait {
    /// The agent's get.
    Get(StoreOpId),
    /// The agent's CAS.
    Cas(StoreOpId, PlacementRecord),
    /// Reading back a CAS that reported a mismatch.
    CasCheck(StoreOpId, PlacementRecord),
    /// The periodic registry read.
    RegistryRead,
    /// A registry edit's read, then its CAS.
    EditRead(usize),
    EditCas(usize, Registry),
}

enum EditAction {
    Add(Entry),
    Remove(String),
}

/// A command waiting for the store: a create (its record's CAS, then the registry), a delete.
struct Edit {
    id: usize,
    session: SessionId,
    from: &'static str,
    action: EditAction,
    tries: u32,
    since_us: u64,
    /// The agent's create op, while its CAS is out.
    create_op: Option<StoreOpId>,
    /// Text for the reply once the registry holds the change.
    done_text: String,
}

struct Conn {
    id: ConnId,
    handle: SocketHandle,
    port: u16,
    out: VecDeque<u8>,
    closing: bool,
    since_us: u64,
    last_in_us: u64,
    spoke: bool,
    /// When the partial frame (if any) was last fed.
    partial_since_us: Option<u64>,
    closing_since_us: Option<u64>,
}

struct Port {
    port: u16,
    app: Key,
    service: String,
    listeners: Vec<SocketHandle>,
}

/// The replication agent, its channel, the instance ports.
pub struct ReplicationHost {
    agent: ReplicationAgent,
    channel: JobChannel,
    rng: Csprng,
    policy: SourcePolicy,
    reserved_ports: Vec<u16>,
    contacts: BTreeMap<NodeId, Contact>,
    contacts_at_us: u64,
    store: BTreeMap<OpId, StoreWait>,
    registry: Registry,
    registry_next_us: u64,
    registry_reading: bool,
    ports: Vec<Port>,
    conns: Vec<Conn>,
    next_conn: ConnId,
    edits: Vec<Edit>,
    next_edit: usize,
    replies: Vec<(SessionId, &'static str, String, bool)>,
    requests: u64,
    pub counters: ReplCounters,
}

impl ReplicationHost {
    pub fn new(
        config: &LaunchConfig,
        stack: &mut Stack,
        overlay: &mut dyn OverlayAccess,
        heap_bytes: u64,
        entropy: &[u8],
        now_us: u64,
    ) -> ReplicationHost {
        let mut seed_input = Vec::with_capacity(64 + entropy.len());
        seed_input.extend_from_slice(&config.rng_seed);
        seed_input.extend_from_slice(b"unipeer replication");
        seed_input.extend_from_slice(entropy);
        let seed: [u8; 32] = Sha256::digest(&seed_input).into();
        let mut rng = Csprng::from_seed(seed);
        let me = overlay.node_id();
        let mut cfg = AgentConfig::new(
            me,
            u64::from_le_bytes(rng.bytes32()[..8].try_into().unwrap_or([0; 8])),
        );
        // A 16 MiB guest: the logs, batches and states stay small.
        cfg.backlog_bytes = 512 * 1024;
        cfg.backlog_entries = 4096;
        cfg.batch_bytes = 64 * 1024;
        cfg.snapshot_chunk_bytes = 32 * 1024;
        cfg.max_conns = 256;
        cfg.limits.max_memory_bytes = (heap_bytes / 16) as usize;
        let agent = ReplicationAgent::new(cfg, linked_services(), instant(now_us));
        let addr = PeerAddr {
            ipv4: config.net.ipv4,
            port: config.net.overlay_port,
        };
        let policy = SourcePolicy::new(config);
        let channel = JobChannel::new(REPL_CHANNEL, stack, addr, heap_bytes, policy);
        let n = &config.net;
        let reserved_ports = vec![
            n.overlay_port,
            n.diag_udp_port,
            n.diag_tcp_port,
            n.echo_port,
            unipeer_node::jobs::client::CLIENT_PORT,
            n.overlay_port
                .wrapping_add(unipeer_node::jobs::wire::JOB_PORT_OFFSET),
            n.overlay_port.wrapping_add(REPL_PORT_OFFSET),
        ];
        ReplicationHost {
            agent,
            channel,
            rng,
            policy,
            reserved_ports,
            contacts: BTreeMap::new(),
            contacts_at_us: 0,
            store: BTreeMap::new(),
            registry: Registry::default(),
            registry_next_us: now_us,
            registry_reading: false,
            ports: Vec::new(),
            conns: Vec::new(),
            next_conn: 1,
            edits: Vec::new(),
            next_edit: 1,
            replies: Vec::new(),
            requests: 0,
            counters: ReplCounters::default(),
        }
    }

    fn refresh_contacts(
        &mut self,
        now_us: u64,
        dht: &dyn unipeer_node::jobs::Overlay,
        force: bool,
    ) {
        if !force && now_us.saturating_sub(self.contacts_at_us) < 500_000 {
            return;
        }
        self.contacts_at_us = now_us;
        let me = dht.contact();
        self.contacts.insert(me.id, me);
        for c in dht.neighbours() {
            self.contacts.insert(c.id, c);
        }
    }

    fn id_of(&self, addr: PeerAddr) -> Option<NodeId> {
        self.contacts
            .values()
            .find(|c| c.addr == addr)
            .map(|c| c.id)
    }

    fn service(&mut self, now_us: u64, stack: &mut Stack, overlay: &mut dyn OverlayAccess) {
        let now = instant(now_us);
        {
            let (dht, trust) = overlay.dht_and_keys();
            self.refresh_contacts(now_us, &*dht, false);
            let mut inbox: Vec<(PeerAddr, Vec<u8>)> = Vec::new();
            self.channel
                .pump_in(now_us, stack, trust, &mut self.rng, |from, m| {
                    inbox.push((from, m.to_vec()))
                });
            let mut unknown = inbox.iter().any(|(from, _)| self.id_of(*from).is_none());
            if unknown {
                self.refresh_contacts(now_us, &*dht, true);
            }
            for (from, m) in inbox {
                match self.id_of(from) {
                    Some(id) => self.agent.handle_message(now, id, &m),
                    None => {
                        unknown = true;
                        self.counters.unknown_sender += 1;
                    }
                }
            }
            let _ = unknown;
        }
        if self.agent.poll_timeout().is_some_and(|t| t <= now) {
            self.agent.handle_timeout(now);
        }
        self.registry_tick(now_us, overlay);
        self.edits_tick(now_us);
        self.ports_tick(now_us, stack);
        self.conns_in(now_us, stack);
        self.drain(now_us, stack, overlay);
    }

    /// Moves the agent's transmits to the channel, its store ops to the overlay, its replies
    /// to the connections; pumps the channel out.
    fn drain(&mut self, now_us: u64, stack: &mut Stack, overlay: &mut dyn OverlayAccess) {
        let now = instant(now_us);
        for _ in 0..4 {
            let mut any = false;
            while let Some(o) = self.agent.poll_transmit() {
                any = true;
                if !self.contacts.contains_key(&o.to) {
                    self.refresh_contacts(now_us, overlay.dht(), true);
                }
                match self.contacts.get(&o.to) {
                    Some(c) => self.channel.send(now_us, c.addr, o.bytes),
                    None => self.counters.unknown_dest += 1,
                }
            }
            while let Some((op, req)) = self.agent.poll_store_op() {
                any = true;
                self.start_store_op(now, op, req, overlay);
            }
            while let Some(e) = self.agent.poll_event() {
                any = true;
                self.on_agent_event(e);
            }
            if !any {
                break;
            }
        }
        let (_, trust) = overlay.dht_and_keys();
        self.channel.pump_out(now_us, stack, trust, &mut self.rng);
        self.conns_out(now_us, stack);
    }

    fn start_store_op(
        &mut self,
        now: Instant,
        op: StoreOpId,
        req: StoreOp,
        overlay: &mut dyn OverlayAccess,
    ) {
        let dht = overlay.dht();
        let started: Result<(OpId, StoreWait), RequestError> = match req {
            StoreOp::Get { app } => {
                self.counters.store_gets += 1;
                dht.get(now, app).map(|id| (id, StoreWait::Get(op)))
            }
            StoreOp::CompareAndSet {
                app,
                expected_version,
                record,
            } => {
                self.counters.store_cas += 1;
                dht.put_if(now, app, &record.encode(), expected_version, 0)
                    .map(|id| (id, StoreWait::Cas(op, record)))
            }
        };
        match started {
            Ok((id, wait)) => {
                self.store.insert(id, wait);
            }
            Err(_) => {
                self.counters.store_unavailable += 1;
                self.store_result(now, op, StoreResult::Unavailable);
            }
        }
    }

    /// Hands a store result to the agent (and to a create waiting on it).
    fn store_result(&mut self, now: Instant, op: StoreOpId, result: StoreResult) {
        if let Some(i) = self.edits.iter().position(|e| e.create_op == Some(op)) {
            self.edits[i].create_op = None;
            match &result {
                StoreResult::Record(Some(_)) => {
                    self.edits[i].tries = 0;
                    let id = self.edits[i].id;
                    self.edit_start(id);
                }
                StoreResult::Conflict(_) => {
                    let e = self.edits.remove(i);
                    let name = match &e.action {
                        EditAction::Add(en) => en.name.clone(),
                        EditAction::Remove(n) => n.clone(),
                    };
                    self.replies.push((
                        e.session,
                        e.from,
                        alloc::format!(
                            "error: an instance named {name} exists or existed (names are not reused)\n"
                        ),
                        true,
                    ));
                }
                _ => {
                    let e = self.edits.remove(i);
                    self.replies.push((
                        e.session,
                        e.from,
                        String::from("error: the placement store did not answer (no majority of the key's replicas?)\n"),
                        true,
                    ));
                }
            }
        }
        self.agent.handle_store_result(now, op, result);
    }

    /// Claims the overlay's answers to this service's requests.
    fn on_overlay_event(
        &mut self,
        now_us: u64,
        e: &Event,
        overlay: &mut dyn OverlayAccess,
    ) -> bool {
        let now = instant(now_us);
        let op = match e {
            Event::GetDone { op, .. }
            | Event::PutDone { op, .. }
            | Event::PutFailed { op, .. }
            | Event::RequestFailed { op, .. } => *op,
            _ => return false,
        };
        let Some(wait) = self.store.remove(&op) else {
            return false;
        };
        let value = match e {
            Event::GetDone { value, .. } => Some(value.clone()),
            _ => None,
        };
        match wait {
            StoreWait::Get(aop) => {
                let r = match value {
                    Some(Some(v)) => match PlacementRecord::decode(&v) {
                        Ok(r) => StoreResult::Record(Some(r)),
                        Err(_) => StoreResult::Unavailable,
                    },
                    Some(None) => StoreResult::Record(None),
                    None => StoreResult::Unavailable,
                };
                if matches!(r, StoreResult::Unavailable) {
                    self.counters.store_unavailable += 1;
                }
                self.store_result(now, aop, r);
            }
            StoreWait::Cas(aop, record) => match e {
                Event::PutDone { .. } => {
                    self.store_result(now, aop, StoreResult::Record(Some(record)))
                }
                Event::PutFailed {
                    error: PutError::VersionMismatch { .. },
                    key,
                    ..
                } => match overlay.dht().get(now, *key) {
                    Ok(id) => {
                        self.store.insert(id, StoreWait::CasCheck(aop, record));
                    }
                    Err(_) => {
                        self.counters.store_unavailable += 1;
                        self.store_result(now, aop, StoreResult::Unavailable);
                    }
                },
                _ => {
                    self.counters.store_unavailable += 1;
                    self.store_result(now, aop, StoreResult::Unavailable);
                }
            },
            StoreWait::CasCheck(aop, record) => {
                let r = match value {
                    Some(Some(v)) => match PlacementRecord::decode(&v) {
                        Ok(stored) if stored == record => StoreResult::Record(Some(stored)),
                        Ok(stored) => StoreResult::Conflict(Some(stored)),
                        Err(_) => StoreResult::Unavailable,
                    },
                    Some(None) => StoreResult::Conflict(None),
                    None => StoreResult::Unavailable,
                };
                self.store_result(now, aop, r);
            }
            StoreWait::RegistryRead => {
                self.registry_reading = false;
                if let Some(v) = value {
                    self.counters.registry_reads += 1;
                    match v.as_deref().map(Registry::decode) {
                        Some(Some(r)) => self.adopt_registry(now_us, r),
                        Some(None) => self.counters.registry_bad += 1,
                        None => self.adopt_registry(now_us, Registry::default()),
                    }
                }
            }
            StoreWait::EditRead(id) => {
                let reg = match value {
                    Some(Some(v)) => Registry::decode(&v),
                    Some(None) => Some(Registry::default()),
                    None => None,
                };
                match reg {
                    Some(r) => self.edit_write(now_us, id, r, overlay),
                    None => self.edit_retry(id),
                }
            }
            StoreWait::EditCas(id, reg) => match e {
                Event::PutDone { .. } => {
                    if let Some(i) = self.edits.iter().position(|x| x.id == id) {
                        let edit = self.edits.remove(i);
                        self.replies
                            .push((edit.session, edit.from, edit.done_text, false));
                    }
                    self.adopt_registry(now_us, reg);
                }
                _ => self.edit_retry(id),
            },
        }
        true
    }

    fn adopt_registry(&mut self, now_us: u64, reg: Registry) {
        if reg.version < self.registry.version {
            return;
        }
        let now = instant(now_us);
        for e in &reg.entries {
            if !self.registry.entries.iter().any(|x| x == e)
                || self.agent.epoch(app_id(&e.name)) == 0
            {
                self.agent.watch(now, app_id(&e.name));
            }
        }
        self.registry = reg;
    }

    fn registry_tick(&mut self, now_us: u64, overlay: &mut dyn OverlayAccess) {
        if self.registry_reading || now_us < self.registry_next_us {
            return;
        }
        let dht = overlay.dht();
        if !dht.is_joined() {
            return;
        }
        self.registry_next_us = now_us + REGISTRY_POLL_US;
        if let Ok(id) = dht.get(instant(now_us), registry_key()) {
            self.registry_reading = true;
            self.store.insert(id, StoreWait::RegistryRead);
        }
    }

    fn edit_start(&mut self, id: usize) {
        // Read next pass (the overlay is reached in `edits_tick`).
        if let Some(e) = self.edits.iter_mut().find(|e| e.id == id) {
            e.tries += 1;
            e.create_op = None;
        }
    }

    fn edit_retry(&mut self, id: usize) {
        let Some(i) = self.edits.iter().position(|e| e.id == id) else {
            return;
        };
        if self.edits[i].tries >= REGISTRY_TRIES {
            let e = self.edits.remove(i);
            self.replies.push((
                e.session,
                e.from,
                String::from("error: the registry of instances could not be changed (store unavailable or contended)\n"),
                true,
            ));
            return;
        }
        self.edits[i].tries += 1;
    }

    fn edit_write(
        &mut self,
        now_us: u64,
        id: usize,
        mut reg: Registry,
        overlay: &mut dyn OverlayAccess,
    ) {
        let Some(i) = self.edits.iter().position(|e| e.id == id) else {
            return;
        };
        let expected = reg.version;
        let fail = |text: String, edits: &mut Vec<Edit>, replies: &mut Vec<_>| {
            let e = edits.remove(i);
            replies.push((e.session, e.from, text, true));
        };
        match &self.edits[i].action {
            EditAction::Add(en) => {
                if reg.entries.iter().any(|x| x.name == en.name) {
                    // Already there (a retry that landed): done.
                } else if reg.entries.iter().any(|x| x.port == en.port) {
                    let t =
                        alloc::format!("error: port {} is taken by another instance\n", en.port);
                    fail(t, &mut self.edits, &mut self.replies);
                    return;
                } else {
                    reg.entries.push(en.clone());
                }
            }
            EditAction::Remove(name) => {
                let name = name.clone();
                if !reg.entries.iter().any(|x| x.name == name) {
                    let t = alloc::format!("error: no instance named {name}\n");
                    fail(t, &mut self.edits, &mut self.replies);
                    return;
                }
                reg.entries.retain(|x| x.name != name);
            }
        }
        reg.version = expected + 1;
        let bytes = reg.encode();
        if bytes.len() > unipeer_node::wire::MAX_VALUE_LEN {
            let t = String::from("error: the registry of instances is full\n");
            fail(t, &mut self.edits, &mut self.replies);
            return;
        }
        match overlay
            .dht()
            .put_if(instant(now_us), registry_key(), &bytes, expected, 0)
        {
            Ok(op) => {
                self.store.insert(op, StoreWait::EditCas(id, reg));
            }
            Err(_) => self.edit_retry(id),
        }
    }

    /// Starts registry reads for edits that wait for one; times out old edits.
    fn edits_tick(&mut self, now_us: u64) {
        let mut i = 0;
        while i < self.edits.len() {
            if now_us.saturating_sub(self.edits[i].since_us) > COMMAND_DEADLINE_US {
                let e = self.edits.remove(i);
                self.replies.push((
                    e.session,
                    e.from,
                    String::from("error: timed out waiting for the store\n"),
                    true,
                ));
                continue;
            }
            i += 1;
        }
    }

    fn edits_read(&mut self, now_us: u64, overlay: &mut dyn OverlayAccess) {
        let waiting: Vec<usize> = self
            .edits
            .iter()
            .filter(|e| e.create_op.is_none())
            .filter(|e| {
                !self.store.values().any(|w| {
                    matches!(w, StoreWait::EditRead(x) | StoreWait::EditCas(x, _) if *x == e.id)
                })
            })
            .map(|e| e.id)
            .collect();
        for id in waiting {
            match overlay.dht().get(instant(now_us), registry_key()) {
                Ok(op) => {
                    self.store.insert(op, StoreWait::EditRead(id));
                }
                Err(_) => self.edit_retry(id),
            }
        }
    }

    fn on_agent_event(&mut self, e: AgentEvent) {
        match e {
            AgentEvent::Reply { conn, bytes } => {
                if let Some(c) = self.conns.iter_mut().find(|c| c.id == conn) {
                    if c.out.len() + bytes.len() > OUT_LIMIT {
                        self.counters.out_overflow += 1;
                        c.closing = true;
                        c.out.clear();
                    } else {
                        c.out.extend(bytes);
                    }
                }
            }
            AgentEvent::Close { conn } => {
                if let Some(c) = self.conns.iter_mut().find(|c| c.id == conn) {
                    c.closing = true;
                }
            }
            AgentEvent::RoleChanged { app, role, epoch } => {
                self.counters.role_changes += 1;
                let name = self
                    .registry
                    .entries
                    .iter()
                    .find(|e| app_id(&e.name) == app)
                    .map_or("?", |e| e.name.as_str());
                log::info!("replication: {name}: {} at epoch {epoch}", role_name(role));
            }
        }
    }

    /// Listens on every registered instance's port; closes ports no longer registered.
    fn ports_tick(&mut self, _now_us: u64, stack: &mut Stack) {
        // Ports of removed instances: close their listeners and connections.
        let mut i = 0;
        while i < self.ports.len() {
            let p = &self.ports[i];
            let keep = self
                .registry
                .entries
                .iter()
                .any(|e| e.port == p.port && app_id(&e.name) == p.app);
            if keep {
                i += 1;
                continue;
            }
            let p = self.ports.swap_remove(i);
            for h in p.listeners {
                stack.sockets.remove(h);
            }
            for c in self.conns.iter_mut().filter(|c| c.port == p.port) {
                c.closing = true;
                c.out.clear();
            }
        }
        for e in &self.registry.entries {
            if self.reserved_ports.contains(&e.port) {
                continue;
            }
            if !self.ports.iter().any(|p| p.port == e.port) {
                self.ports.push(Port {
                    port: e.port,
                    app: app_id(&e.name),
                    service: e.service.clone(),
                    listeners: Vec::new(),
                });
            }
        }
        for p in &mut self.ports {
            let held = self.conns.iter().filter(|c| c.port == p.port).count();
            // Listeners that took a connection became `Conn`s (see `conns_in`).
            while p.listeners.len() < SPARE_LISTENERS && p.listeners.len() + held < CONNS_PER_PORT {
                let mut s = tcp::Socket::new(
                    tcp::SocketBuffer::new(vec![0; CLIENT_BUF]),
                    tcp::SocketBuffer::new(vec![0; CLIENT_BUF]),
                );
                s.set_nagle_enabled(false);
                if s.listen(p.port).is_err() {
                    break;
                }
                p.listeners.push(stack.sockets.add(s));
            }
        }
    }

    /// Takes new connections from the listeners, reads the connections' bytes into the agent,
    /// times out half-open and idle ones.
    fn conns_in(&mut self, now_us: u64, stack: &mut Stack) {
        let now = instant(now_us);
        for pi in 0..self.ports.len() {
            let mut li = 0;
            while li < self.ports[pi].listeners.len() {
                let h = self.ports[pi].listeners[li];
                let socket = stack.sockets.get_mut::<tcp::Socket>(h);
                match socket.state() {
                    tcp::State::Listen | tcp::State::SynReceived => {
                        li += 1;
                        continue;
                    }
                    tcp::State::Closed => {
                        let _ = socket.listen(self.ports[pi].port);
                        li += 1;
                        continue;
                    }
                    _ => {}
                }
                self.ports[pi].listeners.swap_remove(li);
                let port = self.ports[pi].port;
                let source = socket.remote_endpoint().map(|e| e.addr);
                let held = self
                    .conns
                    .iter()
                    .filter(|c| c.port == port && !c.closing)
                    .map(|c| c.handle);
                let capped = source.is_some_and(|s| {
                    self.policy.over_cap(
                        s,
                        guard::remote_addrs(&stack.sockets, held),
                        SLOTS_PER_SOURCE,
                    )
                });
                if capped {
                    self.counters.source_capped += 1;
                    stack.sockets.get_mut::<tcp::Socket>(h).abort();
                    self.conns.push(Conn::new(0, h, port, now_us, true));
                    continue;
                }
                let id = self.next_conn;
                self.next_conn += 1;
                let app = self.ports[pi].app;
                match self
                    .agent
                    .open_connection(now, id, app, &self.ports[pi].service)
                {
                    Ok(()) => {
                        self.counters.conns_accepted += 1;
                        self.conns.push(Conn::new(id, h, port, now_us, false));
                    }
                    Err(_) => {
                        self.counters.conns_refused += 1;
                        let s = stack.sockets.get_mut::<tcp::Socket>(h);
                        let _ = s.send_slice(b"-ERR max number of clients reached\r\n");
                        s.close();
                        self.conns.push(Conn::new(0, h, port, now_us, true));
                    }
                }
            }
        }
        let mut buf = [0u8; 2048];
        for c in &mut self.conns {
            let socket = stack.sockets.get_mut::<tcp::Socket>(c.handle);
            if c.closing {
                // What a closing client still sends is read and dropped (bounded), so it
                // reaches our reply and the close instead of blocking on a full window.
                let mut budget = READ_BUDGET;
                while budget > 0 && socket.can_recv() {
                    let n = socket.recv(|b| (b.len(), b.len())).unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    budget = budget.saturating_sub(n);
                }
                let since = *c.closing_since_us.get_or_insert(now_us);
                if now_us.saturating_sub(since) > HALF_OPEN_US {
                    socket.abort();
                }
                continue;
            }
            let mut budget = READ_BUDGET;
            while budget > 0 && socket.can_recv() && self.agent.wants_bytes(c.id) {
                let n = socket.recv_slice(&mut buf[..budget.min(2048)]).unwrap_or(0);
                if n == 0 {
                    break;
                }
                budget -= n;
                c.spoke = true;
                c.last_in_us = now_us;
                self.counters.bytes_in += n as u64;
                self.requests += 1;
                self.agent.handle_client_bytes(now, c.id, &buf[..n]);
            }
            if self.agent.buffered(c.id) > 0 {
                if c.partial_since_us.is_none() || budget < READ_BUDGET {
                    c.partial_since_us = Some(now_us);
                }
            } else {
                c.partial_since_us = None;
            }
            let half_open = (!c.spoke && now_us.saturating_sub(c.since_us) > HALF_OPEN_US)
                || c.partial_since_us
                    .is_some_and(|t| now_us.saturating_sub(t) > HALF_OPEN_US);
            if half_open {
                self.counters.half_open_closed += 1;
                c.closing = true;
                c.closing_since_us = Some(now_us);
                c.out.clear();
                socket.abort();
                continue;
            }
            if c.spoke
                && !self.agent.has_pending(c.id)
                && now_us.saturating_sub(c.last_in_us) > IDLE_US
            {
                self.counters.idle_closed += 1;
                c.closing = true;
                c.closing_since_us = Some(now_us);
                socket.close();
                continue;
            }
            if !socket.may_recv() && c.out.is_empty() && !self.agent.has_pending(c.id) {
                // The client closed its side and has nothing coming.
                c.closing = true;
                socket.close();
            }
        }
    }

    /// Writes queued replies; closes and removes finished connections.
    fn conns_out(&mut self, now_us: u64, stack: &mut Stack) {
        let mut i = 0;
        while i < self.conns.len() {
            let c = &mut self.conns[i];
            let socket = stack.sockets.get_mut::<tcp::Socket>(c.handle);
            if socket.may_send() {
                while !c.out.is_empty() && socket.can_send() {
                    let (a, _) = c.out.as_slices();
                    let n = socket.send_slice(a).unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    self.counters.bytes_out += n as u64;
                    c.out.drain(..n);
                }
            } else if !matches!(socket.state(), tcp::State::SynReceived) {
                c.out.clear();
                c.closing = true;
            }
            if c.closing && c.out.is_empty() {
                if !matches!(
                    socket.state(),
                    tcp::State::Closed
                        | tcp::State::TimeWait
                        | tcp::State::FinWait1
                        | tcp::State::FinWait2
                        | tcp::State::Closing
                        | tcp::State::LastAck
                ) {
                    socket.close();
                }
                // A socket closed (or aborted) in this pass stays until the stack has sent its
                // FIN or RST.
                let since = *c.closing_since_us.get_or_insert(now_us);
                let gone = (matches!(socket.state(), tcp::State::Closed | tcp::State::TimeWait)
                    && now_us > since)
                    || now_us.saturating_sub(since) > 2 * HALF_OPEN_US;
                if gone {
                    if c.id != 0 {
                        self.agent.close_connection(c.id);
                        self.counters.conns_closed += 1;
                    }
                    let h = c.handle;
                    self.conns.swap_remove(i);
                    stack.sockets.remove(h);
                    continue;
                }
            }
            i += 1;
        }
    }

    fn next_deadline(&self, now_us: u64) -> Option<u64> {
        let mut at = self.channel.next_deadline_us(now_us);
        let mut take = |t: u64| at = Some(at.map_or(t, |a: u64| a.min(t)));
        if let Some(t) = self.agent.poll_timeout() {
            take(t.as_micros());
        }
        take(self.registry_next_us);
        if !self.replies.is_empty() {
            take(now_us);
        }
        for c in &self.conns {
            if c.closing {
                take(now_us + 100_000);
            } else if !c.spoke {
                take(c.since_us + HALF_OPEN_US + 1);
            } else if let Some(t) = c.partial_since_us {
                take(t + HALF_OPEN_US + 1);
            } else if !c.out.is_empty() {
                take(now_us + 10_000);
            }
        }
        if !self.edits.is_empty() {
            take(now_us + 50_000);
        }
        at
    }

    fn command(
        &mut self,
        now_us: u64,
        cmd: AppCommand,
        session: SessionId,
        from: &'static str,
        overlay: &mut dyn OverlayAccess,
    ) -> Option<(String, bool)> {
        match cmd {
            AppCommand::List => {
                self.refresh_contacts(now_us, overlay.dht(), true);
                Some((self.list_text(now_us), false))
            }
            AppCommand::Status { name } => Some(self.status_text(now_us, &name)),
            AppCommand::Create {
                name,
                service,
                replicas,
                sync,
                port,
            } => {
                if self.reserved_ports.contains(&port) {
                    return Some((
                        alloc::format!(
                            "error: port {port} is one of the node's own service ports\n"
                        ),
                        true,
                    ));
                }
                if self.registry.entries.iter().any(|e| e.name == name) {
                    return Some((
                        alloc::format!("error: an instance named {name} exists\n"),
                        true,
                    ));
                }
                let dht = overlay.dht();
                self.refresh_contacts(now_us, &*dht, true);
                let me = dht.contact();
                let slaves = pick_slaves(me, &self.contacts, usize::from(replicas), |c| {
                    dht.proximity(c)
                });
                if slaves.len() < usize::from(replicas) {
                    return Some((
                        alloc::format!(
                            "error: {replicas} slaves asked, {} other nodes known\n",
                            slaves.len()
                        ),
                        true,
                    ));
                }
                let record = PlacementRecord {
                    name: name.clone(),
                    service: service.clone(),
                    master: me.id,
                    slaves: slaves.iter().map(|c| c.id).collect(),
                    epoch: 0,
                    mode: if sync { Mode::Sync } else { Mode::Async },
                    port,
                    version: 1,
                };
                match self.agent.create_instance(record) {
                    Ok(op) => {
                        self.counters.creates += 1;
                        let id = self.next_edit;
                        self.next_edit += 1;
                        let mut done = alloc::format!(
                            "created name={name} service={service} port={port} mode={} master={}",
                            if sync { "sync" } else { "async" },
                            me.id
                        );
                        for s in &slaves {
                            let _ = write!(done, " slave={}", s.id);
                        }
                        done.push('\n');
                        self.edits.push(Edit {
                            id,
                            session,
                            from,
                            action: EditAction::Add(Entry {
                                name,
                                service,
                                port,
                            }),
                            tries: 0,
                            since_us: now_us,
                            create_op: Some(op),
                            done_text: done,
                        });
                        None
                    }
                    Err(e) => Some((alloc::format!("error: {e}\n"), true)),
                }
            }
            AppCommand::Delete { name } => {
                self.counters.deletes += 1;
                let id = self.next_edit;
                self.next_edit += 1;
                self.edits.push(Edit {
                    id,
                    session,
                    from,
                    done_text: alloc::format!("deleted name={name}\n"),
                    action: EditAction::Remove(name),
                    tries: 0,
                    since_us: now_us,
                    create_op: None,
                });
                None
            }
        }
    }

    fn list_text(&self, now_us: u64) -> String {
        let now = instant(now_us);
        let mut out = String::new();
        for e in &self.registry.entries {
            let app = app_id(&e.name);
            let st = self.agent.status(app, now);
            let (role, epoch, mode) = match &st {
                Some(s) => (
                    role_name(s.view.role),
                    s.record.as_ref().map_or(0, |r| r.epoch),
                    s.record.as_ref().map_or("?", |r| mode_name(r.mode)),
                ),
                None => ("relay", 0, "?"),
            };
            let _ = writeln!(
                out,
                "app name={} service={} port={} mode={mode} epoch={epoch} role_here={role}",
                e.name, e.service, e.port
            );
        }
        // What placement can choose from (nodes and servers this node knows).
        let mut servers: Vec<u32> = self.contacts.values().map(|c| c.server.0).collect();
        servers.sort_unstable();
        servers.dedup();
        let _ = writeln!(
            out,
            "known nodes={} servers={}",
            self.contacts.len(),
            servers.len()
        );
        out.push_str("end\n");
        out
    }

    fn status_text(&self, now_us: u64, name: &str) -> (String, bool) {
        let now = instant(now_us);
        let app = app_id(name);
        let Some(entry) = self.registry.entries.iter().find(|e| e.name == name) else {
            return (alloc::format!("error: no instance named {name}\n"), true);
        };
        let Some(st) = self.agent.status(app, now) else {
            return (alloc::format!("error: {name}: not known here yet\n"), true);
        };
        let mut out = String::new();
        let addr = |id: NodeId| {
            self.contacts.get(&id).map_or(String::from("?"), |c| {
                let a = c.addr.ipv4;
                alloc::format!("{}.{}.{}.{}", a[0], a[1], a[2], a[3])
            })
        };
        let _ = writeln!(out, "name={name}");
        let _ = writeln!(out, "service={}", entry.service);
        let _ = writeln!(out, "port={}", entry.port);
        if let Some(r) = &st.record {
            let _ = writeln!(out, "mode={}", mode_name(r.mode));
            let _ = writeln!(out, "epoch={}", r.epoch);
            let _ = writeln!(out, "master={} master_ip={}", r.master, addr(r.master));
            for s in &r.slaves {
                let _ = writeln!(out, "member_slave={} ip={}", s, addr(*s));
            }
        }
        let _ = writeln!(out, "role_here={}", role_name(st.view.role));
        let _ = writeln!(out, "accepting_writes={}", st.accepting_writes);
        let _ = writeln!(out, "seq={}", st.view.seq);
        for s in &st.view.slaves {
            let _ = writeln!(
                out,
                "slave={} ip={} acked_seq={} lag_ops={} lag_ms={} online={}",
                s.node,
                addr(s.node),
                s.acked_seq,
                s.lag_ops,
                s.lag_ms,
                s.online
            );
        }
        let _ = writeln!(out, "lost_writes={}", st.lost_writes);
        let _ = writeln!(out, "dropped_here={}", st.dropped_here);
        for k in &st.dropped_keys {
            let _ = writeln!(
                out,
                "dropped_key={}",
                String::from_utf8_lossy(k).replace(char::is_whitespace, "_")
            );
        }
        if let Some(h) = st.state_hash {
            let _ = write!(out, "state_hash=");
            for b in &h[..16] {
                let _ = write!(out, "{b:02x}");
            }
            out.push('\n');
        }
        let _ = writeln!(out, "memory_used={}", st.memory_used);
        let _ = writeln!(out, "trusted={}", st.trusted);
        out.push_str("end\n");
        (out, false)
    }

    fn report_text(&self) -> String {
        let c = &self.counters;
        let a = self.agent.counters();
        let ch = &self.channel.counters;
        let mut out = String::with_capacity(1024);
        let _ = writeln!(
            out,
            "repl_instances={} repl_ports={} repl_conns={} repl_conns_accepted={} repl_conns_closed={} repl_source_capped={} repl_conns_refused={} repl_half_open_closed={} repl_idle_closed={} repl_out_overflow={} repl_bytes_in={} repl_bytes_out={}",
            self.registry.entries.len(),
            self.ports.len(),
            self.conns.iter().filter(|c| c.id != 0).count(),
            c.conns_accepted,
            c.conns_closed,
            c.source_capped,
            c.conns_refused,
            c.half_open_closed,
            c.idle_closed,
            c.out_overflow,
            c.bytes_in,
            c.bytes_out,
        );
        let _ = writeln!(
            out,
            "repl_malformed_frames={} repl_over_limit_frames={} repl_bad_messages={} repl_relays_sent={} repl_relay_redials={} repl_relay_errors={} repl_fenced_refusals={} repl_sync_timeouts={} repl_no_master_errors={} repl_elections={} repl_promotions={} repl_step_downs={} repl_snapshots_sent={} repl_snapshots_installed={} repl_store_ops={}",
            a.malformed_frames,
            a.over_limit_frames,
            a.bad_messages,
            a.relays_sent,
            a.relay_redials,
            a.relay_errors,
            a.fenced_refusals,
            a.sync_timeouts,
            a.no_master_errors,
            a.elections,
            a.promotions,
            a.step_downs,
            a.snapshots_sent,
            a.snapshots_installed,
            a.store_ops,
        );
        let _ = writeln!(
            out,
            "repl_store_gets={} repl_store_cas={} repl_store_unavailable={} repl_registry_reads={} repl_registry_bad={} repl_role_changes={} repl_unknown_sender={} repl_unknown_dest={} repl_creates={} repl_deletes={}",
            c.store_gets,
            c.store_cas,
            c.store_unavailable,
            c.registry_reads,
            c.registry_bad,
            c.role_changes,
            c.unknown_sender,
            c.unknown_dest,
            c.creates,
            c.deletes,
        );
        let _ = writeln!(
            out,
            "repl_channel_frames_out={} repl_channel_frames_in={} repl_channel_connects={} repl_channel_connect_failures={} repl_channel_dropped_failed={} repl_channel_dropped_full={} repl_channel_refused={} repl_channel_bad_frames={}",
            ch.frames_out,
            ch.frames_in,
            ch.connects,
            ch.connect_failures,
            ch.dropped_failed,
            ch.dropped_full,
            ch.refused,
            ch.bad_frames,
        );
        out
    }
}

impl Conn {
    fn new(id: ConnId, handle: SocketHandle, port: u16, now_us: u64, closing: bool) -> Conn {
        Conn {
            id,
            handle,
            port,
            out: VecDeque::new(),
            closing,
            since_us: now_us,
            last_in_us: now_us,
            spoke: false,
            partial_since_us: None,
            closing_since_us: None,
        }
    }
}

fn role_name(r: Role) -> &'static str {
    match r {
        Role::Master => "master",
        Role::Slave => "slave",
        Role::Relay => "relay",
    }
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::Async => "async",
        Mode::Sync => "sync",
    }
}

/// `n` slaves for a master `me`: nodes on servers not yet used first (nearest first by the
/// overlay's proximity), then nodes on servers already used other than the master's, then the
/// master's own server.
fn pick_slaves(
    me: Contact,
    contacts: &BTreeMap<NodeId, Contact>,
    n: usize,
    proximity: impl Fn(&Contact) -> (u8, u32),
) -> Vec<Contact> {
    let mut others: Vec<Contact> = contacts
        .values()
        .filter(|c| c.id != me.id)
        .copied()
        .collect();
    others.sort_by_key(|c| (proximity(c), c.id));
    let mut picked: Vec<Contact> = Vec::new();
    let mut servers = vec![me.server];
    for c in &others {
        if picked.len() < n && !servers.contains(&c.server) {
            servers.push(c.server);
            picked.push(*c);
        }
    }
    for same_as_master in [false, true] {
        for c in &others {
            if picked.len() < n
                && !picked.iter().any(|p| p.id == c.id)
                && (c.server == me.server) == same_as_master
            {
                picked.push(*c);
            }
        }
    }
    picked
}

impl Service for ReplicationHost {
    fn name(&self) -> &'static str {
        "replication"
    }

    fn poll(&mut self, cx: &mut Context<'_>) {
        let Some(overlay) = cx.peers.overlay() else {
            return;
        };
        self.service(cx.now_us, cx.stack, overlay);
        self.edits_read(cx.now_us, overlay);
        for (session, from, text, failed) in self.replies.drain(..) {
            cx.outbox.reply(from, session, text, failed);
        }
    }

    fn flush(&mut self, cx: &mut Context<'_>) {
        let Some(overlay) = cx.peers.overlay() else {
            return;
        };
        self.drain(cx.now_us, cx.stack, overlay);
        for (session, from, text, failed) in self.replies.drain(..) {
            cx.outbox.reply(from, session, text, failed);
        }
    }

    fn handle(
        &mut self,
        cx: &mut Context<'_>,
        from: &'static str,
        event: ServiceEvent,
    ) -> Option<ServiceEvent> {
        match event {
            ServiceEvent::Overlay(e) => {
                let Some(overlay) = cx.peers.overlay() else {
                    return Some(ServiceEvent::Overlay(e));
                };
                (!self.on_overlay_event(cx.now_us, &e, overlay)).then_some(ServiceEvent::Overlay(e))
            }
            ServiceEvent::Command {
                session,
                command: RoutedCommand::App(cmd),
                operator,
            } => {
                let name = RoutedCommand::App(cmd.clone());
                let answer = if !name.allowed(operator) {
                    Some((String::from(UNAUTHORIZED_REPLY), true))
                } else {
                    match cx.peers.overlay() {
                        Some(overlay) => self.command(cx.now_us, cmd, session, from, overlay),
                        None => Some((
                            String::from("error: the overlay is off on this node\n"),
                            true,
                        )),
                    }
                };
                if let Some((text, failed)) = answer {
                    cx.outbox.reply(from, session, text, failed);
                }
                None
            }
            other => Some(other),
        }
    }

    fn next_deadline_us(&self, now_us: u64, _stack: &Stack) -> Option<u64> {
        self.next_deadline(now_us)
    }

    fn report(&self, out: &mut String) {
        out.push_str(&self.report_text());
    }

    fn demand(&self) -> Demand {
        Demand {
            requests: self.requests,
            waiting: false,
        }
    }

    fn log_summary(&self) {
        log::info!(
            "replication: services [{}], channel port {} (TCP)",
            linked_services().names().collect::<Vec<_>>().join(","),
            self.channel_port()
        );
    }
}

impl ReplicationHost {
    fn channel_port(&self) -> u16 {
        self.reserved_ports[6]
    }
}
