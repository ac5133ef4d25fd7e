//! The overlay peer in the kernel: drives `unipeer_node::Node` from a UDP socket and the clock,
//! and answers overlay commands from the diagnostic TCP port (`overlay`, `lookup`, `put`,
//! `get`). A [`Service`]: the node's events go out on the loop's bus, and other services use
//! the overlay through [`OverlayAccess`] (DHT requests, trust sessions, the delegator).

use alloc::collections::BTreeMap;
use alloc::rc::Rc;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;
use core::fmt::Write;

use alloc::borrow::Cow;
use smoltcp::iface::SocketHandle;
use smoltcp::socket::udp;
use smoltcp::wire::{IpAddress, IpEndpoint, Ipv4Address};
use unipeer_node::auth::delegation::DelegationCounters;
use unipeer_node::auth::{
    Channel, CredentialDelegator, IdentityKey, RevocationList, SEAL_OVERHEAD, SessionLayer,
    SessionLimits, TrustConfig, TrustMessage, WallClock,
};
use unipeer_node::id::placeholder_public_key;
use unipeer_node::jobs::delegation::PeerKeys;
use unipeer_node::launch::{LaunchConfig, PeerAddr};
use unipeer_node::node::RequestKind;
use unipeer_node::wire::{SealError, Sealer};
use unipeer_node::{Event, Instant, Key, Node, NodeConfig, NodeId, OpId, ServerTag, jobs};

use crate::net::Stack;
use crate::service::{
    Context, Outbox, OverlayAccess, RoutedCommand, Service, ServiceEvent, SessionId, StreamKeys,
    UNAUTHORIZED_REPLY, command_allowed,
};

/// Datagrams taken from the socket per pass (bounded work).
const RX_BUDGET: usize = 64;
/// Largest overlay datagram.
const DATAGRAM_MAX: usize = 1200;
/// Overlay socket buffers, in datagrams.
const SOCKET_SLOTS: usize = 64;

/// Counters of the kernel side of the overlay.
#[derive(Default, Clone, Copy)]
pub struct OverlayCounters {
    pub socket_drops: u64,
    /// Overlay datagrams the trust layer would not take (queue or handshake table full).
    pub trust_send_drops: u64,
    pub events: u64,
}

/// Leaves room in every overlay datagram for the trust layer's seal, which wraps datagrams
/// outside the node (see `Overlay::service`), so sealed datagrams stay within 1,200 bytes.
pub struct Headroom(usize);

impl Sealer for Headroom {
    fn overhead(&self) -> usize {
        self.0
    }
    fn seal(&mut self, _peer: PeerAddr, plaintext: Vec<u8>) -> Result<Vec<u8>, SealError> {
        Ok(plaintext)
    }
    fn open<'a>(
        &mut self,
        _peer: PeerAddr,
        datagram: &'a [u8],
    ) -> Result<Cow<'a, [u8]>, SealError> {
        Ok(Cow::Borrowed(datagram))
    }
}

/// The overlay node as the kernel runs it.
pub type OverlayNode = Node<Headroom>;

/// The overlay peer, its trust layer, and the TCP sessions waiting for answers.
pub struct Overlay {
    node: OverlayNode,
    /// Authenticated, sealed sessions with peers; `None` when the launch config carries no
    /// trust material (a single development VM), and then the overlay runs in the clear.
    trust: Option<SessionLayer>,
    /// Serial of this node's own certificate (what `unipeer ca revoke` names).
    cert_serial: u64,
    socket: SocketHandle,
    /// Diagnostic commands waiting for their request: the session and the service that asked.
    waiting: BTreeMap<OpId, (SessionId, &'static str)>,
    counters: OverlayCounters,
    /// The signed user list, the credentials this node holds and the credential delegation
    /// with its neighbours (the client port authenticates users with it); `None` without
    /// trust material or without a user list.
    delegator: Option<CredentialDelegator>,
    /// Trust-channel messages that were not for this node's trust services (undecodable,
    /// or from a peer whose session no longer answers for its address).
    trust_unhandled: u64,
    /// The node's identity key for signing delegation tokens (taken by the job host);
    /// `None` without trust material.
    token_identity: Option<IdentityKey>,
    /// Public keys of the peers with verified sessions, for checking delegation tokens
    /// (shared with the job agent's token authority; refreshed in `service`).
    peer_keys: Rc<RefCell<PeerKeys>>,
    /// (sessions established, sessions held, revocation version) when `peer_keys` was last
    /// refreshed: any change means sessions came or went.
    keys_fingerprint: (u64, usize, u64),
}

fn instant(now_us: u64) -> Instant {
    Instant::from_micros(now_us)
}

fn endpoint(addr: PeerAddr) -> IpEndpoint {
    IpEndpoint::new(IpAddress::from(Ipv4Address::from(addr.ipv4)), addr.port)
}

/// Parses a key: 32 hex digits, or any other text, hashed as a name.
pub fn parse_key(text: &str) -> Key {
    Key::parse_hex(text).unwrap_or_else(|| Key::for_name(text.as_bytes()))
}

impl Overlay {
    /// Creates the peer and starts joining through the config's bootstrap peers (none: this
    /// node starts a new overlay).
    /// `entropy` is mixed into the trust layer's CSPRNG seed (RDRAND output where the CPU has
    /// it).
    pub fn new(
        config: &LaunchConfig,
        stack: &mut Stack,
        now_us: u64,
        entropy: &[u8],
    ) -> Result<Overlay, String> {
        let trust = if config.certificate.is_empty() {
            log::warn!(
                "overlay: no certificate in the launch config: running without authentication"
            );
            None
        } else {
            if !config.seed_from_os() {
                return Err(String::from(
                    "trust: the launch config's seed is not marked as from the host OS's random \
                     source (extra seed_source=os): refusing to derive keys from it",
                ));
            }
            let tc = TrustConfig::from_launch(config).map_err(|e| alloc::format!("trust: {e}"))?;
            let mut seed_input = Vec::with_capacity(64 + entropy.len());
            seed_input.extend_from_slice(&config.rng_seed);
            seed_input.extend_from_slice(b"unipeer trust seed");
            seed_input.extend_from_slice(entropy);
            let seed: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(&seed_input).into();
            Some((tc, seed))
        };
        let cert_serial = trust
            .as_ref()
            .and_then(|(tc, _)| tc.chain.leaf().map(|c| c.body.serial))
            .unwrap_or(0);
        let public_key: Vec<u8> = match &trust {
            Some((tc, _)) => tc.identity.public().to_vec(),
            None => placeholder_public_key(&config.node_name).to_vec(),
        };
        let addr = PeerAddr {
            ipv4: config.net.ipv4,
            port: config.net.overlay_port,
        };
        let mut node_config = NodeConfig::new(
            &public_key,
            addr,
            ServerTag::from_name(&config.server_id),
            config.rng_seed,
        );
        // `replicas` (one byte): copies of every record (and, in the job host, of every chunk).
        if let Some(&[k]) = config.extra("replicas")
            && k > 0
        {
            node_config.replicas = usize::from(k);
        }
        if let Some(&[l]) = config.extra("leaf_set") {
            node_config.leaf_set_len = usize::from(l);
        }
        node_config.replicas = node_config.replicas.min(node_config.leaf_set_len / 2 + 1);
        let headroom = Headroom(if trust.is_some() { SEAL_OVERHEAD } else { 0 });
        let mut node = Node::with_sealer(node_config, headroom, instant(now_us))
            .map_err(|e| alloc::format!("{e}"))?;
        let delegator = trust.as_ref().and_then(|(tc, _)| {
            tc.users.clone().map(|users| {
                CredentialDelegator::new(
                    tc.identity.node_id(),
                    &config.server_id,
                    users,
                    tc.credentials.clone(),
                )
            })
        });
        let token_identity = trust
            .as_ref()
            .map(|(tc, _)| IdentityKey::from_seed(&tc.identity.seed()));
        let trust = trust.map(|(tc, seed)| {
            let clock = WallClock::new(config.launch_unix_ms, Instant::ZERO);
            SessionLayer::from_trust_config(tc, clock, SessionLimits::default(), seed)
        });
        let rx = udp::PacketBuffer::new(
            vec![udp::PacketMetadata::EMPTY; SOCKET_SLOTS],
            vec![0; SOCKET_SLOTS * DATAGRAM_MAX],
        );
        let tx = udp::PacketBuffer::new(
            vec![udp::PacketMetadata::EMPTY; SOCKET_SLOTS],
            vec![0; SOCKET_SLOTS * DATAGRAM_MAX],
        );
        let mut socket = udp::Socket::new(rx, tx);
        socket
            .bind(config.net.overlay_port)
            .map_err(|_| String::from("cannot bind the overlay port"))?;
        let socket = stack.sockets.add(socket);
        let bootstrap: Vec<PeerAddr> = config
            .bootstrap
            .iter()
            .copied()
            .filter(|p| *p != addr)
            .collect();
        node.join(instant(now_us), &bootstrap);
        Ok(Overlay {
            node,
            trust,
            cert_serial,
            socket,
            waiting: BTreeMap::new(),
            counters: OverlayCounters::default(),
            delegator,
            trust_unhandled: 0,
            token_identity,
            peer_keys: PeerKeys::shared(),
            keys_fingerprint: (0, 0, 0),
        })
    }

    /// Feeds datagrams and due timers to the node; what it wants sent and its events go out
    /// in `flush`.
    fn service(&mut self, now_us: u64, stack: &mut Stack) {
        let now = instant(now_us);
        let socket = stack.sockets.get_mut::<udp::Socket>(self.socket);
        let mut buf = [0u8; DATAGRAM_MAX];
        for _ in 0..RX_BUDGET {
            let Ok((n, meta)) = socket.recv_slice(&mut buf) else {
                break;
            };
            let IpAddress::Ipv4(src) = meta.endpoint.addr;
            let from = PeerAddr {
                ipv4: src.octets(),
                port: meta.endpoint.port,
            };
            match self.trust.as_mut() {
                Some(layer) => layer.handle_datagram(now, from, &buf[..n]),
                None => self.node.handle_datagram(now, from, &buf[..n]),
            }
        }
        if let Some(layer) = self.trust.as_mut() {
            if layer.poll_timeout().is_some_and(|t| t <= now) {
                layer.handle_timeout(now);
            }
            while let Some(d) = layer.poll_delivered() {
                match d.channel {
                    Channel::Overlay => {
                        // The header must name the peer the session authenticated.
                        self.node
                            .handle_authenticated_datagram(now, d.from, d.peer, &d.bytes);
                    }
                    Channel::Trust => {
                        // Revocations are handled inside the layer; credential delegation
                        // here, with the sender's verified identity and server.
                        let server = layer
                            .peer(d.from)
                            .filter(|p| p.node_id == d.peer)
                            .map(|p| p.server.clone());
                        match (
                            TrustMessage::decode(&d.bytes),
                            server,
                            self.delegator.as_mut(),
                        ) {
                            (Some(TrustMessage::Delegation(m)), Some(server), Some(del)) => {
                                del.handle_message(now, d.from, d.peer, &server, m);
                            }
                            _ => self.trust_unhandled += 1,
                        }
                    }
                }
            }
        }
        self.pump_delegation(now);
        self.refresh_peer_keys();
        if self.node.poll_timeout().is_some_and(|t| t <= now) {
            self.node.handle_timeout(now);
        }
    }

    /// Ends credential requests past their time and hands the delegator's messages to the
    /// trust layer, sealed on the Trust channel (they go out with `send_trust`).
    fn pump_delegation(&mut self, now: Instant) {
        let (Some(del), Some(layer)) = (self.delegator.as_mut(), self.trust.as_mut()) else {
            return;
        };
        if del.poll_timeout().is_some_and(|t| t <= now) {
            del.handle_timeout(now);
        }
        while let Some((to, m)) = del.poll_outbound() {
            let bytes = TrustMessage::Delegation(m).encode();
            if layer.send(now, to, Channel::Trust, &bytes).is_err() {
                self.counters.trust_send_drops += 1;
            }
        }
    }

    /// Whom to ask for a credential: leaf-set members and the nearest neighbours, those with
    /// an established session first (at most `MAX_ASKED` are asked).
    fn delegation_neighbours(&self) -> Vec<PeerAddr> {
        let mut out: Vec<PeerAddr> = Vec::new();
        let leaf = self.node.leaf_set().contacts().map(|c| c.addr);
        let near = self
            .node
            .neighbourhood()
            .members()
            .iter()
            .map(|e| e.contact.addr);
        for a in leaf.chain(near) {
            if !out.contains(&a) {
                out.push(a);
            }
        }
        if let Some(layer) = self.trust.as_ref() {
            out.sort_by_key(|a| layer.peer(*a).is_none());
        }
        out
    }

    /// Rebuilds the verified peers' keys when sessions came or went (a handshake, an expiry,
    /// a revocation): a delegation token verifies only against a peer with a live session.
    fn refresh_peer_keys(&mut self) {
        let Some(layer) = self.trust.as_ref() else {
            return;
        };
        let fp = (
            layer.counters().sessions_established,
            layer.session_count(),
            layer.revocation_version(),
        );
        if fp != self.keys_fingerprint {
            self.keys_fingerprint = fp;
            self.peer_keys
                .borrow_mut()
                .replace(layer.verified_peers().map(|p| (p.node_id, p.public_key)));
        }
    }

    /// Sends what the node wants sent and puts its events on the bus (the services that asked
    /// claim their answers; what nobody claims comes back to `on_event`); then the credential
    /// delegation's messages and the trust layer's datagrams. The loop calls it again while
    /// events come, since their handling may make the node send more.
    fn flush(&mut self, now_us: u64, stack: &mut Stack, outbox: &mut Outbox<'_>) {
        let now = instant(now_us);
        let socket = stack.sockets.get_mut::<udp::Socket>(self.socket);
        while let Some(t) = self.node.poll_transmit() {
            match self.trust.as_mut() {
                Some(layer) => {
                    if layer
                        .send(now, t.dst, Channel::Overlay, &t.payload)
                        .is_err()
                    {
                        self.counters.trust_send_drops += 1;
                    }
                }
                None => {
                    if socket.send_slice(&t.payload, endpoint(t.dst)).is_err() {
                        self.counters.socket_drops += 1;
                    }
                }
            }
        }
        while let Some(event) = self.node.poll_event() {
            self.counters.events += 1;
            outbox.post(ServiceEvent::Overlay(event));
        }
        self.pump_delegation(now);
        self.send_trust(stack);
    }

    /// Sends the trust layer's datagrams (handshakes, sealed overlay datagrams).
    fn send_trust(&mut self, stack: &mut Stack) {
        if let Some(layer) = self.trust.as_mut() {
            let socket = stack.sockets.get_mut::<udp::Socket>(self.socket);
            while let Some(t) = layer.poll_transmit() {
                if socket.send_slice(&t.payload, endpoint(t.dst)).is_err() {
                    self.counters.socket_drops += 1;
                }
            }
        }
    }

    /// Answers a diagnostic command that waited for its request (through the bus, to the
    /// service that asked).
    fn reply(outbox: &mut Outbox<'_>, (session, asker): (SessionId, &'static str), line: &str) {
        outbox.send_to(
            asker,
            ServiceEvent::CommandReply {
                session,
                text: String::from(line),
                failed: false,
            },
        );
    }

    /// An event of the node no other service claimed.
    fn on_event(&mut self, event: Event, outbox: &mut Outbox<'_>) {
        match event {
            Event::Joined => {
                log::info!(
                    "overlay: joined as {} (leaf set {})",
                    self.node.id(),
                    self.node.leaf_set().len()
                );
            }
            Event::PeerFailed { id } => log::info!("overlay: leaf-set member {id} failed"),
            // No discover is issued from the kernel yet (the directory issue's kernel part).
            Event::Discovered { service, .. } => {
                log::debug!("overlay: directory answer for {service}")
            }
            Event::LookupDone {
                op,
                key,
                root,
                path,
            } => {
                if let Some(session) = self.waiting.remove(&op) {
                    let mut line = String::new();
                    let a = root.addr.ipv4;
                    let _ = write!(
                        line,
                        "lookup key={key} root={} root_addr={}.{}.{}.{}:{} hops={} path=",
                        root.id,
                        a[0],
                        a[1],
                        a[2],
                        a[3],
                        root.addr.port,
                        path.len().saturating_sub(1)
                    );
                    for (i, id) in path.iter().enumerate() {
                        let _ = write!(line, "{}{id}", if i > 0 { "," } else { "" });
                    }
                    line.push('\n');
                    Self::reply(outbox, session, &line);
                }
            }
            Event::PutDone {
                op,
                key,
                root,
                version,
            } => {
                if let Some(session) = self.waiting.remove(&op) {
                    let line = alloc::format!("put key={key} root={} version={version}\n", root.id);
                    Self::reply(outbox, session, &line);
                }
            }
            Event::GetDone {
                op,
                key,
                root,
                value,
            } => {
                if let Some(session) = self.waiting.remove(&op) {
                    let line = match value {
                        Some(v) => alloc::format!(
                            "get key={key} root={} value={}\n",
                            root.id,
                            String::from_utf8_lossy(&v)
                        ),
                        None => alloc::format!("get key={key} root={} value=none\n", root.id),
                    };
                    Self::reply(outbox, session, &line);
                }
            }
            Event::PutFailed { op, key, error } => {
                if let Some(session) = self.waiting.remove(&op) {
                    let line = alloc::format!("put key={key} error={error}\n");
                    Self::reply(outbox, session, &line);
                }
            }
            Event::RequestFailed { op, key, kind } => {
                if let Some(session) = self.waiting.remove(&op) {
                    let what = match kind {
                        RequestKind::Lookup => "lookup",
                        RequestKind::Put => "put",
                        RequestKind::Get => "get",
                        RequestKind::Join => "join",
                        RequestKind::Handoff => "handoff",
                        RequestKind::Discover => "discover",
                    };
                    let line = alloc::format!("{what} key={key} error=failed\n");
                    Self::reply(outbox, session, &line);
                }
            }
            Event::Delivered { .. } => {}
        }
    }

    /// Runs an overlay command from a diagnostic session (`asker` is the service that holds
    /// it); `Err` is the error text to send back. `Ok(None)`: the answer follows when the
    /// request completes.
    fn command(
        &mut self,
        now_us: u64,
        words: &[&str],
        session: (SessionId, &'static str),
    ) -> Result<Option<String>, String> {
        let now = instant(now_us);
        let started = match words {
            ["overlay"] => return Ok(Some(self.status_text())),
            ["leafset"] => {
                let mut out = String::new();
                for c in self.node.leaf_set().contacts() {
                    let a = c.addr.ipv4;
                    let _ = writeln!(
                        out,
                        "leaf id={} addr={}.{}.{}.{}:{}",
                        c.id, a[0], a[1], a[2], a[3], c.addr.port
                    );
                }
                out.push_str("end\n");
                return Ok(Some(out));
            }
            ["revoke", hex] => return self.install_revocations(now, hex).map(Some),
            ["lookup", key] => self.node.lookup(now, parse_key(key)),
            ["get", key] => self.node.get(now, parse_key(key)),
            ["put", key, value @ ..] if !value.is_empty() => {
                let text = value.join(" ");
                self.node.put(now, parse_key(key), text.as_bytes())
            }
            _ => {
                return Err(String::from(
                    "usage: overlay | leafset | lookup KEY | get KEY | put KEY VALUE",
                ));
            }
        };
        match started {
            Ok(op) => {
                self.waiting.insert(op, session);
                Ok(None)
            }
            Err(e) => Err(alloc::format!("{e}")),
        }
    }

    /// Takes a signed revocation list (hex of its encoding) from the host: installed if it is
    /// this authority's and newer, sessions with revoked peers cut, and the list passed on to
    /// every remaining session.
    fn install_revocations(&mut self, now: Instant, hex: &str) -> Result<String, String> {
        let layer = self
            .trust
            .as_mut()
            .ok_or_else(|| String::from("this node runs without authentication"))?;
        let bytes = decode_hex(hex).ok_or_else(|| String::from("not a hex string"))?;
        let list = RevocationList::decode(&bytes).map_err(|e| alloc::format!("{e:?}"))?;
        let cut = layer
            .install_revocations(now, list)
            .map_err(|e| alloc::format!("refused: {e:?}"))?;
        log::info!(
            "trust: revocation list version {} installed; {cut} session(s) cut",
            layer.revocation_version()
        );
        Ok(alloc::format!(
            "revocations version={} cut={cut}\n",
            layer.revocation_version()
        ))
    }

    /// `key=value` lines for the diagnostic report.
    fn status_text(&self) -> String {
        let s = self.node.status();
        let c = self.node.counters();
        alloc::format!(
            "overlay_id={}\noverlay_joined={}\nleaf_set={}\ntable_filled={}\ntable_rows={}\nrecords={}\n\
             overlay_in={}\noverlay_out={}\noverlay_undecodable={}\noverlay_rejected={}\n\
             overlay_routing_drops={}\noverlay_leaf_failures={}\noverlay_socket_drops={}\n",
            s.id,
            s.joined,
            s.leaf_set_len,
            s.table_filled,
            s.table_rows,
            s.records,
            c.datagrams_in,
            c.datagrams_out,
            c.undecodable + c.bad_version,
            c.rejected,
            c.routing_drops,
            c.leaf_failures,
            self.counters.socket_drops,
        )
    }

    /// The earliest deadline of the node and the trust layer, in kernel microseconds.
    fn next_deadline(&self) -> Option<u64> {
        let trust = self.trust.as_ref().and_then(|l| l.poll_timeout());
        let delegation = self.delegator.as_ref().and_then(|d| d.poll_timeout());
        [self.node.poll_timeout(), trust, delegation]
            .into_iter()
            .flatten()
            .min()
            .map(|t| t.as_micros())
    }

    /// `key=value` lines about the trust layer.
    fn trust_text(&self) -> String {
        let Some(layer) = &self.trust else {
            return String::from("trust=off\n");
        };
        let serial = self.cert_serial;
        let c = layer.counters();
        let keys = self.peer_keys.borrow();
        let t = keys.counters();
        alloc::format!(
            "trust=on\ntrust_serial={serial}\ntrust_sessions={}\ntrust_established={}\ntrust_delivered={}\ntrust_rejected={}\n\
             trust_bad_cookie={}\ntrust_cert_wrong_authority={}\ntrust_cert_other={}\n\
             trust_tampered={}\ntrust_replayed={}\ntrust_malformed={}\ntrust_unknown_session={}\n\
             trust_revocation_version={}\n\
             trust_send_drops={}\n\
             trust_token_keys={}\ntrust_tokens_verified={}\ntrust_tokens_unknown_signer={}\n\
             trust_tokens_bad_signature={}\ntrust_unhandled={}\ntrust_half_open_capped={}\n",
            layer.session_count(),
            c.sessions_established,
            c.delivered,
            c.rejected(),
            c.bad_cookie,
            c.cert_wrong_authority,
            c.cert_malformed
                + c.cert_broken_chain
                + c.cert_expired
                + c.cert_not_yet_valid
                + c.cert_server_outside_limit
                + c.cert_window_outside_limit
                + c.cert_node_id_mismatch
                + c.cert_revoked
                + c.cert_bad_signature,
            c.tampered,
            c.replayed + c.too_old,
            c.malformed + c.truncated,
            c.unknown_index,
            layer.revocation_version(),
            self.counters.trust_send_drops,
            keys.len(),
            t.verified,
            t.unknown_signer,
            t.bad_signature,
            self.trust_unhandled,
            c.half_open_source_capped,
        ) + &self.delegation_text()
    }

    /// `key=value` lines about credential delegation (`deleg_*`).
    fn delegation_text(&self) -> String {
        let Some(d) = self.delegator.as_ref() else {
            return String::from("deleg=off\n");
        };
        let DelegationCounters {
            requests_sent,
            proved,
            granted,
            refused_not_allowed,
            refused_unknown_user,
            refused_no_credential,
            refused_bad_proof,
            rate_limited,
            obtained,
            failed,
            unsolicited,
            grant_not_allowed,
            bad_grants,
            expired,
            malformed,
            outbound_drops,
        } = *d.counters();
        alloc::format!(
            "deleg=on\ndeleg_credentials={}\ndeleg_requests_sent={requests_sent}\n\
             deleg_proved={proved}\ndeleg_granted={granted}\n\
             deleg_refused_not_allowed={refused_not_allowed}\n\
             deleg_refused_unknown_user={refused_unknown_user}\n\
             deleg_refused_no_credential={refused_no_credential}\n\
             deleg_refused_bad_proof={refused_bad_proof}\ndeleg_rate_limited={rate_limited}\n\
             deleg_obtained={obtained}\ndeleg_failed={failed}\ndeleg_unsolicited={unsolicited}\n\
             deleg_grant_not_allowed={grant_not_allowed}\ndeleg_bad_grants={bad_grants}\n\
             deleg_expired={expired}\ndeleg_malformed={malformed}\n\
             deleg_outbound_drops={outbound_drops}\n",
            d.held_count(),
        )
    }
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// First words of the diagnostic commands the overlay answers.
impl Service for Overlay {
    fn name(&self) -> &'static str {
        "overlay"
    }

    fn poll(&mut self, cx: &mut Context<'_>) {
        self.service(cx.now_us, cx.stack);
    }

    fn flush(&mut self, cx: &mut Context<'_>) {
        self.flush(cx.now_us, cx.stack, &mut cx.outbox);
    }

    fn handle(
        &mut self,
        cx: &mut Context<'_>,
        from: &'static str,
        event: ServiceEvent,
    ) -> Option<ServiceEvent> {
        match event {
            // Its own event, back after every other service passed on it.
            ServiceEvent::Overlay(e) => {
                self.on_event(e, &mut cx.outbox);
                None
            }
            ServiceEvent::Command {
                session,
                command: RoutedCommand::Overlay(words),
                operator,
            } => {
                let words: Vec<&str> = words.iter().map(String::as_str).collect();
                let name = words.first().copied().unwrap_or("overlay");
                let (text, failed) = if !command_allowed(name, operator) {
                    (String::from(UNAUTHORIZED_REPLY), true)
                } else {
                    match self.command(cx.now_us, &words, (session, from)) {
                        Ok(Some(text)) => (text, false),
                        Ok(None) => return None,
                        Err(e) => (alloc::format!("error: {e}\n"), true),
                    }
                };
                cx.outbox.reply(from, session, text, failed);
                None
            }
            other => Some(other),
        }
    }

    fn next_deadline_us(&self, _now_us: u64, _stack: &Stack) -> Option<u64> {
        self.next_deadline()
    }

    fn report(&self, out: &mut String) {
        out.push_str(&self.status_text());
        out.push_str(&self.trust_text());
    }

    fn as_overlay(&mut self) -> Option<&mut dyn OverlayAccess> {
        Some(self)
    }
}

impl OverlayAccess for Overlay {
    fn dht(&mut self) -> &mut dyn jobs::Overlay {
        &mut self.node
    }

    fn dht_and_keys(&mut self) -> (&mut dyn jobs::Overlay, Option<&mut dyn StreamKeys>) {
        let keys = self.trust.as_mut().map(|t| t as &mut dyn StreamKeys);
        (&mut self.node, keys)
    }

    fn trusted(&self) -> bool {
        self.trust.is_some()
    }

    fn node_id(&self) -> NodeId {
        self.node.id()
    }

    fn delegator(&mut self) -> Option<&mut CredentialDelegator> {
        self.delegator.as_mut()
    }

    fn delegation_neighbours(&self) -> Vec<PeerAddr> {
        Overlay::delegation_neighbours(self)
    }

    fn take_token_identity(&mut self) -> Option<IdentityKey> {
        self.token_identity.take()
    }

    fn peer_keys(&self) -> Rc<RefCell<PeerKeys>> {
        self.peer_keys.clone()
    }
}
