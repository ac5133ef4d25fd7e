//! The diagnostic service: a UDP port that answers any datagram with the node's report, a UDP
//! echo port for round-trip measurements, and a TCP port that serves the report to many
//! clients at once, each with an idle timeout.
//!
//! TCP protocol (line based; the language is `unipeer_node::diag_command`): on connect the
//! server sends the report; then `stats` sends it again, `ping` answers `pong`, `quit` closes,
//! `help` lists the commands. Commands that change state or cost work (`shutdown`, `put`,
//! `probe`, `job-*`, ...) need the operator's challenge-response first (`auth?`, `auth MAC`);
//! test helpers (`bench-seal`, `job-*`) exist only in images built with the `diag-test`
//! feature. Unknown or overlong input is answered with an error line and counted; a client
//! silent for `TCP_IDLE_US` is disconnected (an unauthenticated one from a source other than
//! the host after `guard::HELLO_DEADLINE_US`), and one source other than the host holds at
//! most `guard::DIAG_SLOTS_PER_SOURCE` sessions.
//!
//! UDP: a datagram from another node's service port is not answered; a source other than the
//! host gets answers no larger than its request and at most `guard::DIAG_UDP_RATE` of them
//! (echo: `guard::ECHO_RATE`).
//!
//! A [`Service`]: the report's sections come from the other services (`Service::report`).
//! Every line is parsed once, here, and checked (test-only, operator access) before anything
//! acts on it; a command another service answers (the overlay's, the job host's) goes on the
//! bus as a typed [`ServiceEvent::Command`] carrying the session's operator flag, and that
//! service's `CommandReply` is written to the session. A session's next line waits for the
//! next pass after such a command, so answers keep the order of the commands.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt::Write;
use core::sync::atomic::Ordering;

use smoltcp::iface::SocketHandle;
use smoltcp::socket::{tcp, udp};
use smoltcp::wire::IpAddress;
use unipeer_node::auth::Csprng;
use unipeer_node::diag_command::{
    self, Access, DiagCommand, OPERATOR_KEY_EXTRA, OPERATOR_KEY_LEN, OperatorAuth,
};
use unipeer_node::launch::LaunchConfig;

use crate::BootFacts;
use crate::arch::idt::IRQS;
use crate::net::Stack;
use crate::net::guard::{self, RateLimiter, SourcePolicy};
use crate::service::{Context, RoutedCommand, Service, ServiceEvent, UNAUTHORIZED_REPLY};
use crate::{clock, heap};

/// TCP connections served at once.
pub const TCP_SESSIONS: usize = 12;
/// A TCP client that sends nothing for this long is disconnected (the launch config's
/// `diag_idle_ms` extra setting overrides it).
pub const TCP_IDLE_US: u64 = 10_000_000;
/// Longest accepted command line.
/// (A revocation list travels as one hex line.)
const LINE_MAX: usize = 4096;
/// Local port of the probe client socket.
const PROBE_CLIENT_PORT: u16 = 7100;
/// How long a probe waits for each answer.
const PROBE_TIMEOUT_US: u64 = 500_000;
/// Largest UDP payload this node sends.
pub const UDP_PAYLOAD_MAX: usize = 1200;

/// Counters of the service itself.
#[derive(Default, Clone, Copy)]
pub struct DiagCounters {
    pub udp_requests: u64,
    pub echo_packets: u64,
    pub tcp_sessions: u64,
    pub tcp_idle_closed: u64,
    pub bad_requests: u64,
    /// Operator authentications that passed, failed, or were never answered in time.
    pub auth_ok: u64,
    pub auth_failed: u64,
    pub auth_timeouts: u64,
    /// Operator commands refused to an unauthenticated session.
    pub unauthorized: u64,
    /// Connections refused because their source held its share of the slots.
    pub source_capped: u64,
    /// Datagrams not answered: from a service port, over the source's rate, or too small for
    /// any answer.
    pub udp_from_service_port: u64,
    pub udp_rate_limited: u64,
    pub udp_too_small: u64,
}

/// A running `probe`: first the peer's name from its diagnostic port, then `count` echo round
/// trips, one at a time; the result goes back to the TCP session that asked.
struct ProbeJob {
    session: SocketHandle,
    target: [u8; 4],
    count: u32,
    /// 0 while asking for the name; then the echo sequence number outstanding.
    step: u32,
    name_tries: u32,
    name: Option<String>,
    received: u32,
    rtts_us: Vec<u32>,
    /// When the outstanding request went out (0: nothing outstanding yet).
    sent_at_us: u64,
}

struct Session {
    handle: SocketHandle,
    /// Set once the connection is established and the greeting sent.
    greeted: bool,
    last_activity_us: u64,
    line: Vec<u8>,
    /// Discarding the rest of an overlong line.
    skipping: bool,
    /// Input read but left for the next pass (after a command another service answers).
    backlog: Vec<u8>,
    /// A command went to another service this pass: look again next pass (its answer comes
    /// back first, so the session is not closed before it).
    resume: bool,
    auth: OperatorAuth,
    /// When the outstanding challenge must be answered by (0: none outstanding).
    challenge_deadline_us: u64,
    /// The peer is the host uplink.
    from_host: bool,
}

impl Session {
    fn new(handle: SocketHandle) -> Session {
        Session {
            handle,
            greeted: false,
            last_activity_us: 0,
            line: Vec::new(),
            skipping: false,
            backlog: Vec::new(),
            resume: false,
            auth: OperatorAuth::default(),
            challenge_deadline_us: 0,
            from_host: false,
        }
    }
}

pub struct Diag {
    /// `(uptime_us, wakeups)` at the previous report, for `wakeups_per_s_recent`.
    last_report: core::cell::Cell<(u64, u64)>,
    udp: SocketHandle,
    echo: SocketHandle,
    /// Client socket for `probe` (asks peers' diagnostic and echo ports).
    prober: SocketHandle,
    probe: Option<ProbeJob>,
    peer_diag_port: u16,
    peer_echo_port: u16,
    sessions: Vec<Session>,
    tcp_port: u16,
    idle_us: u64,
    pub counters: DiagCounters,
    /// The command just run went to another service (see `Diag::command`).
    routed: bool,
    /// The operator key from the launch config (none: operator commands are refused).
    operator_key: Option<[u8; OPERATOR_KEY_LEN]>,
    /// Challenge nonces.
    rng: Csprng,
    policy: SourcePolicy,
    udp_rate: RateLimiter,
    echo_rate: RateLimiter,
}

fn udp_socket(stack: &mut Stack, port: u16) -> SocketHandle {
    let rx = udp::PacketBuffer::new(
        vec![udp::PacketMetadata::EMPTY; 16],
        vec![0; 16 * UDP_PAYLOAD_MAX],
    );
    let tx = udp::PacketBuffer::new(
        vec![udp::PacketMetadata::EMPTY; 16],
        vec![0; 16 * UDP_PAYLOAD_MAX],
    );
    let mut socket = udp::Socket::new(rx, tx);
    socket.bind(port).expect("fresh socket binds");
    stack.sockets.add(socket)
}

fn tcp_socket(stack: &mut Stack) -> SocketHandle {
    let socket = tcp::Socket::new(
        tcp::SocketBuffer::new(vec![0; 1024]),
        tcp::SocketBuffer::new(vec![0; 8192]),
    );
    stack.sockets.add(socket)
}

impl Diag {
    pub fn new(stack: &mut Stack, config: &LaunchConfig) -> Diag {
        let udp = udp_socket(stack, config.net.diag_udp_port);
        let echo = udp_socket(stack, config.net.echo_port);
        let prober = udp_socket(stack, PROBE_CLIENT_PORT);
        let sessions = (0..TCP_SESSIONS)
            .map(|_| Session::new(tcp_socket(stack)))
            .collect();
        let operator_key = config
            .extra(OPERATOR_KEY_EXTRA)
            .and_then(|k| <[u8; OPERATOR_KEY_LEN]>::try_from(k).ok());
        if operator_key.is_none() {
            log::warn!("diag: no operator key in the launch config: operator commands are off");
        }
        let mut seed_input = Vec::with_capacity(96);
        seed_input.extend_from_slice(&config.rng_seed);
        seed_input.extend_from_slice(b"unipeer diag challenge seed");
        seed_input.extend_from_slice(&crate::arch::cpu::hardware_entropy());
        seed_input.extend_from_slice(&crate::arch::cpu::rdtsc().to_le_bytes());
        let seed: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(&seed_input).into();
        let mut diag = Diag {
            last_report: core::cell::Cell::new((0, 0)),
            udp,
            echo,
            prober,
            probe: None,
            peer_diag_port: config.net.diag_udp_port,
            peer_echo_port: config.net.echo_port,
            sessions,
            tcp_port: config.net.diag_tcp_port,
            idle_us: config
                .extra("diag_idle_ms")
                .and_then(|v| v.try_into().ok())
                .map(|b: [u8; 4]| u64::from(u32::from_le_bytes(b)) * 1000)
                .filter(|&us| us > 0)
                .unwrap_or(TCP_IDLE_US),
            counters: DiagCounters::default(),
            routed: false,
            operator_key,
            rng: Csprng::from_seed(seed),
            policy: SourcePolicy::new(config),
            udp_rate: RateLimiter::new(guard::DIAG_UDP_RATE),
            echo_rate: RateLimiter::new(guard::ECHO_RATE),
        };
        diag.relisten(stack);
        diag
    }

    /// Puts every closed TCP socket back to listening.
    fn relisten(&mut self, stack: &mut Stack) {
        for s in &mut self.sessions {
            let socket = stack.sockets.get_mut::<tcp::Socket>(s.handle);
            if socket.state() == tcp::State::Closed {
                *s = Session::new(s.handle);
                let _ = socket.listen(self.tcp_port);
            }
        }
    }

    /// Serves whatever arrived. Bounded: at most a socket buffer's worth per socket per call.
    fn service(&mut self, cx: &mut Context<'_>) {
        let now_us = cx.now_us;
        let config = cx.node.config;
        // Sockets closed in an earlier pass listen again; one aborted in this pass keeps its
        // endpoint until the stack has sent its RST (listen() would forget it).
        self.relisten(cx.stack);
        // Echo: bounce datagrams back to their senders (same size), within the guard's rules.
        {
            let socket = cx.stack.sockets.get_mut::<udp::Socket>(self.echo);
            let mut budget = 32;
            while budget > 0 && socket.can_recv() && socket.can_send() {
                budget -= 1;
                let mut buf = [0u8; UDP_PAYLOAD_MAX];
                if let Ok((n, meta)) = socket.recv_slice(&mut buf) {
                    self.counters.echo_packets += 1;
                    let ep = meta.endpoint;
                    if guard::is_service_port(ep.port, config) {
                        self.counters.udp_from_service_port += 1;
                    } else if !self.policy.is_host(ep.addr)
                        && !self.echo_rate.allow(now_us, ep.addr)
                    {
                        self.counters.udp_rate_limited += 1;
                    } else {
                        let _ = socket.send_slice(&buf[..n], ep);
                    }
                }
            }
        }
        // Report over UDP: each sender gets at most as many bytes as it sent (the host: all).
        let mut pending = heapless::Vec::<(smoltcp::wire::IpEndpoint, usize), 16>::new();
        {
            let socket = cx.stack.sockets.get_mut::<udp::Socket>(self.udp);
            while let Ok((payload, meta)) = socket.recv() {
                self.counters.udp_requests += 1;
                let ep = meta.endpoint;
                let budget = self
                    .policy
                    .answer_budget(ep.addr, payload.len(), UDP_PAYLOAD_MAX);
                if guard::is_service_port(ep.port, config) {
                    self.counters.udp_from_service_port += 1;
                } else if !self.policy.is_host(ep.addr) && !self.udp_rate.allow(now_us, ep.addr) {
                    self.counters.udp_rate_limited += 1;
                } else if pending.push((ep, budget)).is_err() {
                    break;
                }
            }
        }
        if !pending.is_empty() {
            let report = self.report(cx);
            let socket = cx.stack.sockets.get_mut::<udp::Socket>(self.udp);
            for (ep, budget) in pending {
                match fit_datagram(&report, budget) {
                    Some(datagram) => {
                        let _ = socket.send_slice(datagram.as_bytes(), ep);
                    }
                    None => self.counters.udp_too_small += 1,
                }
            }
        }
        // TCP sessions.
        for i in 0..self.sessions.len() {
            self.service_session(i, cx);
        }
        self.service_probe(now_us, cx.stack);
    }

    fn service_session(&mut self, i: usize, cx: &mut Context<'_>) {
        let now_us = cx.now_us;
        let handle = self.sessions[i].handle;
        let state = cx.stack.sockets.get::<tcp::Socket>(handle).state();
        if state == tcp::State::Listen || state == tcp::State::SynReceived {
            return;
        }
        if !self.sessions[i].greeted && cx.stack.sockets.get::<tcp::Socket>(handle).may_send() {
            let source = cx
                .stack
                .sockets
                .get::<tcp::Socket>(handle)
                .remote_endpoint()
                .map(|e| e.addr);
            if let Some(source) = source {
                let held = guard::remote_addrs(
                    &cx.stack.sockets,
                    self.sessions.iter().filter(|s| s.greeted).map(|s| s.handle),
                );
                if self
                    .policy
                    .over_cap(source, held, guard::DIAG_SLOTS_PER_SOURCE)
                {
                    self.counters.source_capped += 1;
                    cx.stack.sockets.get_mut::<tcp::Socket>(handle).abort();
                    return;
                }
                self.sessions[i].from_host = self.policy.is_host(source);
            }
            self.sessions[i].greeted = true;
            self.sessions[i].last_activity_us = now_us;
            self.counters.tcp_sessions += 1;
            let report = self.report(cx);
            let _ = cx
                .stack
                .sockets
                .get_mut::<tcp::Socket>(handle)
                .send_slice(report.as_bytes());
        }
        // Read what arrived (first what an earlier pass left), line by line.
        let mut input = [0u8; 512];
        self.sessions[i].resume = false;
        let backlog = core::mem::take(&mut self.sessions[i].backlog);
        let n = if !backlog.is_empty() {
            input[..backlog.len()].copy_from_slice(&backlog);
            backlog.len()
        } else {
            let socket = cx.stack.sockets.get_mut::<tcp::Socket>(handle);
            if socket.can_recv() {
                socket.recv_slice(&mut input).unwrap_or(0)
            } else {
                0
            }
        };
        if n > 0 {
            self.sessions[i].last_activity_us = now_us;
        }
        for (k, &b) in input[..n].iter().enumerate() {
            let s = &mut self.sessions[i];
            if b == b'\n' {
                if s.skipping {
                    s.skipping = false;
                    continue;
                }
                let line = core::mem::take(&mut s.line);
                if !self.command(&line, i, handle, cx) {
                    break;
                }
                if core::mem::take(&mut self.routed) {
                    // The answer comes back in this pass; the next line waits for the next.
                    self.sessions[i].backlog = input[k + 1..n].to_vec();
                    self.sessions[i].resume = true;
                    break;
                }
            } else if s.line.len() >= LINE_MAX {
                if !s.skipping {
                    s.skipping = true;
                    s.line.clear();
                    self.counters.bad_requests += 1;
                    let _ = cx
                        .stack
                        .sockets
                        .get_mut::<tcp::Socket>(handle)
                        .send_slice(b"error: line too long\n");
                }
            } else if !s.skipping {
                s.line.push(b);
            }
        }
        let s = &self.sessions[i];
        let socket = cx.stack.sockets.get_mut::<tcp::Socket>(handle);
        if s.resume {
            // Closing waits until the routed command's answer is in the socket.
        } else if s.challenge_deadline_us != 0 && now_us > s.challenge_deadline_us {
            // An unanswered challenge frees the slot within the deadline.
            self.counters.auth_timeouts += 1;
            socket.abort();
        } else if s.greeted
            && now_us.saturating_sub(s.last_activity_us) > session_idle_us(s, self.idle_us)
        {
            self.counters.tcp_idle_closed += 1;
            socket.abort();
        } else if !socket.may_recv() && socket.state() == tcp::State::CloseWait {
            // The client finished sending: close our side once replies are queued.
            socket.close();
        }
    }

    /// Runs one command line of session `i`; returns false when the session ends. The line is
    /// parsed (`diag_command::parse`) and checked here, before anything acts on it: a test
    /// helper outside a test image and an operator command from a session that has not
    /// authenticated are refused. What another service answers goes on the bus only after these
    /// checks (`routed` is set; the answer comes back on the bus).
    fn command(
        &mut self,
        line: &[u8],
        i: usize,
        handle: SocketHandle,
        cx: &mut Context<'_>,
    ) -> bool {
        let cmd = match diag_command::parse(line) {
            Ok(cmd) => cmd,
            Err(e) => {
                self.counters.bad_requests += 1;
                return reply(cx, handle, &alloc::format!("error: {e}\n"));
            }
        };
        let spec = cmd.spec();
        if spec.test_only && !cfg!(feature = "diag-test") {
            self.counters.bad_requests += 1;
            return reply(
                cx,
                handle,
                &alloc::format!(
                    "error: {} is compiled only into test images (image build --diag-test)\n",
                    spec.name
                ),
            );
        }
        let operator = self.sessions[i].auth.authenticated();
        if spec.access == Access::Operator && !operator {
            self.counters.unauthorized += 1;
            return reply(cx, handle, UNAUTHORIZED_REPLY);
        }
        if let Some(command) = RoutedCommand::from_parsed(&cmd) {
            // Another service's (or nobody's: then it comes back to `unclaimed`).
            cx.outbox.post(ServiceEvent::Command {
                session: handle,
                command,
                operator,
            });
            self.routed = true;
            return true;
        }
        let now_us = cx.now_us;
        let reply_text: String = match cmd {
            DiagCommand::Stats => self.report(cx),
            // The job host's lines and the client port's, as before they were two services.
            DiagCommand::Jobs => {
                let mut out = String::with_capacity(2048);
                if cx.peers.report_of("jobs", &mut out) {
                    cx.peers.report_of("client", &mut out);
                } else {
                    out.push_str("jobs=off\n");
                }
                out + "end\n"
            }
            DiagCommand::AuthChallenge => {
                let mut nonce = [0u8; OPERATOR_KEY_LEN];
                self.rng.mix(&crate::arch::cpu::rdtsc().to_le_bytes());
                self.rng.fill(&mut nonce);
                let s = &mut self.sessions[i];
                let nonce = s.auth.challenge(nonce);
                s.challenge_deadline_us = now_us.saturating_add(guard::HELLO_DEADLINE_US);
                let mut line = String::from("auth-challenge ");
                for b in nonce {
                    let _ = write!(line, "{b:02x}");
                }
                line.push('\n');
                line
            }
            DiagCommand::Auth { mac } => {
                let key = self.operator_key;
                let s = &mut self.sessions[i];
                s.challenge_deadline_us = 0;
                match s.auth.answer(key.as_ref(), &mac) {
                    Ok(()) => {
                        self.counters.auth_ok += 1;
                        String::from("auth ok\n")
                    }
                    Err(e) => {
                        self.counters.auth_failed += 1;
                        log::warn!("diag: operator authentication refused: {e}");
                        if s.auth.failures() >= AUTH_FAILURES_MAX {
                            let socket = cx.stack.sockets.get_mut::<tcp::Socket>(handle);
                            let _ = socket.send_slice(b"error: authentication failed\n");
                            socket.close();
                            return false;
                        }
                        alloc::format!("error: {e}\n")
                    }
                }
            }
            #[cfg(feature = "diag-test")]
            DiagCommand::BenchSeal { n } => bench_seal(n),
            #[cfg(feature = "diag-test")]
            DiagCommand::BenchHandshake { n } => bench_handshake(n),
            #[cfg(not(feature = "diag-test"))]
            DiagCommand::BenchSeal { .. } | DiagCommand::BenchHandshake { .. } => {
                return reply(cx, handle, "error: a test helper\n");
            }
            DiagCommand::Ping => String::from("pong\n"),
            DiagCommand::Help => diag_command::help_text(cfg!(feature = "diag-test")),
            DiagCommand::Probe { target, count } => match self.start_probe(target, count, handle) {
                Ok(()) => return true,
                Err(e) => {
                    self.counters.bad_requests += 1;
                    alloc::format!("probe error={e}\n")
                }
            },
            DiagCommand::Quit => {
                let socket = cx.stack.sockets.get_mut::<tcp::Socket>(handle);
                let _ = socket.send_slice(b"bye\n");
                socket.close();
                return false;
            }
            DiagCommand::Shutdown => {
                log::info!("diag: shutdown requested over TCP");
                cx.request_shutdown();
                let socket = cx.stack.sockets.get_mut::<tcp::Socket>(handle);
                let _ = socket.send_slice(b"shutting down\n");
                socket.close();
                return false;
            }
            // Routed above.
            DiagCommand::Overlay { .. }
            | DiagCommand::JobsTasks
            | DiagCommand::JobPrimes { .. }
            | DiagCommand::JobSha256 { .. }
            | DiagCommand::Apps
            | DiagCommand::AppStatus { .. }
            | DiagCommand::AppCreate { .. }
            | DiagCommand::AppDelete { .. } => return true,
        };
        reply(cx, handle, &reply_text)
    }

    /// A routed command no service answered: the answers of a node whose overlay (and so job
    /// host) is off.
    fn unclaimed(&mut self, command: &RoutedCommand) -> String {
        let error = match command {
            RoutedCommand::JobsTasks => return String::from("jobs=off\nend\n"),
            RoutedCommand::Overlay(_) => "error: the overlay is off on this node\n",
            RoutedCommand::JobPrimes { .. } | RoutedCommand::JobSha256 { .. } => {
                "error: jobs are off on this node\n"
            }
            RoutedCommand::App(_) => "error: replication is off on this node\n",
        };
        self.counters.bad_requests += 1;
        String::from(error)
    }

    /// Earliest time a session or the running probe needs attention.
    fn next_deadline(&self, now_us: u64, stack: &Stack) -> Option<u64> {
        let probe = self.probe.as_ref().map(|p| p.sent_at_us + PROBE_TIMEOUT_US);
        let backlog = self.sessions.iter().any(|s| s.resume).then_some(now_us);
        // A socket aborted in the last pass listens again in the next one, at once.
        let relisten = self
            .sessions
            .iter()
            .any(|s| stack.sockets.get::<tcp::Socket>(s.handle).state() == tcp::State::Closed)
            .then_some(0);
        self.sessions
            .iter()
            .filter(|s| {
                s.greeted
                    && stack.sockets.get::<tcp::Socket>(s.handle).state() != tcp::State::Closed
            })
            .map(|s| {
                let idle = s.last_activity_us + session_idle_us(s, self.idle_us) + 1;
                if s.challenge_deadline_us != 0 {
                    idle.min(s.challenge_deadline_us + 1)
                } else {
                    idle
                }
            })
            .chain(probe)
            .chain(backlog)
            .chain(relisten)
            .min()
    }

    fn start_probe(
        &mut self,
        target: [u8; 4],
        count: u32,
        session: SocketHandle,
    ) -> Result<(), &'static str> {
        if self.probe.is_some() {
            return Err("busy");
        }
        self.probe = Some(ProbeJob {
            session,
            target,
            count,
            step: 0,
            name_tries: 0,
            name: None,
            received: 0,
            rtts_us: Vec::with_capacity(count as usize),
            sent_at_us: 0,
        });
        Ok(())
    }

    fn service_probe(&mut self, now_us: u64, stack: &mut Stack) {
        let Some(job) = self.probe.as_mut() else {
            return;
        };
        let endpoint = |port| {
            smoltcp::wire::IpEndpoint::new(
                IpAddress::from(smoltcp::wire::Ipv4Address::from(job.target)),
                port,
            )
        };
        let diag_ep = endpoint(self.peer_diag_port);
        let echo_ep = endpoint(self.peer_echo_port);
        let socket = stack.sockets.get_mut::<udp::Socket>(self.prober);
        // Answers.
        let mut buf = [0u8; UDP_PAYLOAD_MAX];
        while let Ok((n, meta)) = socket.recv_slice(&mut buf) {
            if meta.endpoint.addr != diag_ep.addr || job.sent_at_us == 0 {
                continue;
            }
            if job.step == 0 && meta.endpoint.port == diag_ep.port {
                let text = core::str::from_utf8(&buf[..n]).unwrap_or("");
                let name = text
                    .lines()
                    .find_map(|l| l.strip_prefix("name="))
                    .unwrap_or("?");
                job.name = Some(String::from(name));
                job.step = 1;
                job.sent_at_us = 0;
            } else if job.step >= 1
                && meta.endpoint.port == echo_ep.port
                && n >= 4
                && u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) == job.step
            {
                job.received += 1;
                job.rtts_us
                    .push(now_us.saturating_sub(job.sent_at_us) as u32);
                job.step += 1;
                job.sent_at_us = 0;
            }
        }
        // Timeouts.
        if job.sent_at_us != 0 && now_us.saturating_sub(job.sent_at_us) > PROBE_TIMEOUT_US {
            job.sent_at_us = 0;
            if job.step == 0 {
                job.name_tries += 1;
            } else {
                job.step += 1;
            }
        }
        // Finished?
        let unreachable = job.step == 0 && job.name_tries >= 3;
        let done = job.step > job.count;
        if unreachable || done {
            let ip = job.target;
            let line = if unreachable {
                alloc::format!(
                    "probe ip={}.{}.{}.{} error=timeout\n",
                    ip[0],
                    ip[1],
                    ip[2],
                    ip[3]
                )
            } else {
                let rtts = &mut job.rtts_us;
                rtts.sort_unstable();
                let pick = |p: usize| {
                    if rtts.is_empty() {
                        0
                    } else {
                        rtts[((rtts.len() - 1) * p).div_ceil(100)]
                    }
                };
                alloc::format!(
                    "probe ip={}.{}.{}.{} name={} sent={} received={} rtt_us_p50={} rtt_us_p99={} rtt_us_max={}\n",
                    ip[0],
                    ip[1],
                    ip[2],
                    ip[3],
                    job.name.as_deref().unwrap_or("?"),
                    job.count,
                    job.received,
                    pick(50),
                    pick(99),
                    rtts.last().copied().unwrap_or(0),
                )
            };
            let session = job.session;
            self.probe = None;
            let tcp = stack.sockets.get_mut::<tcp::Socket>(session);
            if tcp.may_send() {
                let _ = tcp.send_slice(line.as_bytes());
            }
            return;
        }
        // Send the next request.
        if job.sent_at_us == 0 && socket.can_send() {
            let sent = if job.step == 0 {
                // Padded: a node answers no more bytes than it was sent.
                let mut request = [b' '; UDP_PAYLOAD_MAX];
                request[..6].copy_from_slice(b"stats\n");
                socket.send_slice(&request, diag_ep)
            } else {
                let mut payload = [0u8; 64];
                payload[..4].copy_from_slice(&job.step.to_le_bytes());
                socket.send_slice(&payload, echo_ep)
            };
            if sent.is_ok() {
                job.sent_at_us = now_us.max(1);
            }
        }
    }

    /// Whether every TCP reply has left (used before a requested shutdown).
    fn all_sent(&self, stack: &Stack) -> bool {
        self.sessions.iter().all(|s| {
            let socket = stack.sockets.get::<tcp::Socket>(s.handle);
            socket.send_queue() == 0
        })
    }

    /// The report: `key=value` lines between a header and `end`: its own and the loop's,
    /// then every other service's section (in set order).
    fn report(&self, cx: &Context<'_>) -> String {
        let (now_us, stack) = (cx.now_us, &*cx.stack);
        let (facts, config) = (cx.node.facts, cx.node.config);
        let lc = cx.loop_counters;
        let bus = cx.outbox.counters();
        let (heap_in_use, heap_high, heap_size) = heap::usage();
        let nic = &stack.phy.nic.stats;
        let arp = &stack.phy.neighbours.stats;
        let c = &self.counters;
        let ip = IpAddress::from(smoltcp::wire::Ipv4Address::from(config.net.ipv4));
        let entry_to_ready_us =
            clock::tsc_delta_us(facts.ready_tsc.wrapping_sub(clock::boot_tsc()));
        let mut out = String::with_capacity(1024);
        let _ = write!(
            out,
            "unipeer-node diag v1\n\
             name={}\nserver={}\nip={}\nnic={}\nuptime_us={}\n\
             boot_entry_to_ready_us={}\nboot_entry_tsc={}\nboot_ready_tsc={}\n\
             tsc_khz={}\nclock={:?}\napic_ticks_per_ms={}\nsimd={}\n\
             ram_bytes={}\nheap_size={}\nheap_in_use={}\nheap_high_water={}\n\
             rx_frames={}\ntx_frames={}\nrx_bytes={}\ntx_bytes={}\nrx_errors={}\ntx_queue_full={}\nrx_ignored={}\n\
             arp_neighbours={}\narp_requests={}\narp_replies={}\narp_queued={}\narp_dropped={}\n\
             irq_timer={}\nirq_nic={}\nirq_spurious={}\nirq_other={}\nwakeups={}\nbusy_polls={}\nbusy_naps={}\n\
             {}bus_posted={}\nbus_dropped={}\nbus_unclaimed={}\n\
             udp_requests={}\necho_packets={}\ntcp_sessions={}\ntcp_idle_closed={}\nbad_requests={}\n\
             diag_auth_ok={}\ndiag_auth_failed={}\ndiag_auth_timeouts={}\ndiag_unauthorized={}\n\
             diag_source_capped={}\nudp_from_service_port={}\nudp_rate_limited={}\nudp_too_small={}\n\
             arp_refused={}\nentropy={}\n\
             boot_phases_us={}\n",
            config.node_name,
            config.server_id,
            ip,
            facts.transport,
            now_us,
            entry_to_ready_us,
            clock::boot_tsc(),
            facts.ready_tsc,
            facts.calibration.tsc_khz,
            facts.calibration.source,
            facts.apic_ticks_per_ms,
            facts.simd,
            facts.ram_bytes,
            heap_size,
            heap_in_use,
            heap_high,
            nic.rx_frames,
            nic.tx_frames,
            nic.rx_bytes,
            nic.tx_bytes,
            nic.rx_errors,
            nic.tx_queue_full,
            stack.phy.rx_ignored,
            stack.phy.neighbours.len(),
            arp.requests_sent,
            arp.replies_sent,
            arp.queued,
            arp.dropped_unresolved + arp.dropped_malformed,
            IRQS.timer.load(Ordering::Relaxed),
            IRQS.nic.load(Ordering::Relaxed),
            IRQS.spurious.load(Ordering::Relaxed),
            IRQS.other.load(Ordering::Relaxed),
            lc.wakeups,
            lc.busy_polls,
            lc.busy_naps,
            SleepCauses(&lc.sleeps_until),
            bus.posted,
            bus.dropped,
            bus.unclaimed,
            c.udp_requests,
            c.echo_packets,
            c.tcp_sessions,
            c.tcp_idle_closed,
            c.bad_requests,
            c.auth_ok,
            c.auth_failed,
            c.auth_timeouts,
            c.unauthorized,
            c.source_capped,
            c.udp_from_service_port,
            c.udp_rate_limited,
            c.udp_too_small,
            arp.refused,
            EntropySources(config),
            PhaseList(facts),
        );
        // Wake-ups per second: since boot, and since the previous report (a rate over the
        // window a poller chooses; equal to the first when there was none).
        let per_s = |n: u64, us: u64| n as f64 * 1e6 / us.max(1) as f64;
        let (t0, w0) = self.last_report.get();
        let _ = writeln!(
            out,
            "wakeups_per_s={:.2}\nwakeups_per_s_recent={:.2}",
            per_s(lc.wakeups, now_us),
            per_s(lc.wakeups.saturating_sub(w0), now_us.saturating_sub(t0))
        );
        self.last_report.set((now_us, lc.wakeups));
        cx.peers.report_all(&mut out);
        // Sections the report always has: a node without the overlay says so.
        for name in ["overlay", "jobs"] {
            if !cx.peers.has(name) {
                let _ = writeln!(out, "{name}=off");
            }
        }
        out.push_str("end\n");
        out
    }
}

impl Service for Diag {
    fn name(&self) -> &'static str {
        "diag"
    }

    fn poll(&mut self, cx: &mut Context<'_>) {
        self.service(cx);
    }

    fn handle(
        &mut self,
        cx: &mut Context<'_>,
        _from: &'static str,
        event: ServiceEvent,
    ) -> Option<ServiceEvent> {
        let (session, text) = match event {
            ServiceEvent::CommandReply {
                session,
                text,
                failed,
            } => {
                if failed {
                    self.counters.bad_requests += 1;
                }
                (session, text)
            }
            // Its own command, back because no other service answers it.
            ServiceEvent::Command {
                session, command, ..
            } => (session, self.unclaimed(&command)),
            other => return Some(other),
        };
        // The session is one of ours; it may have closed meanwhile.
        if self.sessions.iter().any(|s| s.handle == session) {
            let tcp = cx.stack.sockets.get_mut::<tcp::Socket>(session);
            if tcp.may_send() {
                let _ = tcp.send_slice(text.as_bytes());
            }
        }
        None
    }

    fn next_deadline_us(&self, now_us: u64, stack: &Stack) -> Option<u64> {
        self.next_deadline(now_us, stack)
    }

    fn flushed(&self, stack: &Stack) -> bool {
        self.all_sent(stack)
    }
}

/// `sleeps_until_<cause>=n` lines, one per cause.
struct SleepCauses<'a>(&'a [(&'static str, u64)]);

impl core::fmt::Display for SleepCauses<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for (name, n) in self.0 {
            writeln!(f, "sleeps_until_{name}={n}")?;
        }
        Ok(())
    }
}

/// Where the node's randomness came from: `os-seed` (the host's OS random source) or
/// `host-seed` (unmarked), plus `rdseed`/`rdrand` when the CPU has them (mixed into every seed).
struct EntropySources<'a>(&'a LaunchConfig);

impl core::fmt::Display for EntropySources<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(if self.0.seed_from_os() {
            "os-seed"
        } else {
            "host-seed"
        })?;
        match crate::arch::cpu::entropy_instruction() {
            Some(i) => write!(f, "+{i}"),
            None => Ok(()),
        }
    }
}

/// `name:us,name:us,...`: microseconds from entry at the end of each boot phase (those after
/// `ready` ran after the ready line).
pub struct PhaseList<'a>(pub &'a BootFacts);

impl core::fmt::Display for PhaseList<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for (i, (name, tsc)) in self.0.phases.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(
                f,
                "{name}:{}",
                clock::tsc_delta_us(tsc.wrapping_sub(clock::boot_tsc()))
            )?;
        }
        Ok(())
    }
}

/// Keys kept when the full report does not fit one datagram.
const COMPACT_KEYS: &[&str] = &[
    "name",
    "server",
    "ip",
    "nic",
    "uptime_us",
    "boot_entry_to_ready_us",
    "tsc_khz",
    "clock",
    "heap_in_use",
    "heap_high_water",
    "heap_size",
    "rx_frames",
    "tx_frames",
    "irq_timer",
    "irq_nic",
    "wakeups",
    "wakeups_per_s",
    "wakeups_per_s_recent",
    "sleeps_until_stack",
    "sleeps_until_diag",
    "sleeps_until_overlay",
    "sleeps_until_jobs",
    "busy_polls",
    "udp_requests",
    "echo_packets",
    "tcp_sessions",
    "diag_source_capped",
    "bad_requests",
    "tcp_idle_closed",
    "simd",
    "overlay_id",
    "overlay_joined",
    "leaf_set",
    "table_filled",
    "records",
    "overlay_undecodable",
    "trust",
    "entropy",
    "trust_sessions",
    "trust_established",
    "trust_delivered",
    "trust_rejected",
    "jobs",
    "jobs_slots",
    "jobs_running",
    "jobs_supervising",
    "jobs_works_run",
];

/// The report as one datagram of at most `max` bytes: whole if it fits, else the
/// `COMPACT_KEYS` lines that fit (the TCP port always serves it whole); `None` when not even the
/// header and the end fit.
fn fit_datagram(report: &str, max: usize) -> Option<alloc::borrow::Cow<'_, str>> {
    const TAIL: &str = "compact=1\nend\n";
    if report.len() <= max {
        return Some(alloc::borrow::Cow::Borrowed(report));
    }
    let mut out = String::with_capacity(max);
    for line in report.lines() {
        let key = line.split('=').next().unwrap_or("");
        let header = !line.contains('=') && line != "end";
        let keep = header || COMPACT_KEYS.contains(&key);
        if keep && out.len() + line.len() + 1 + TAIL.len() <= max {
            out.push_str(line);
            out.push('\n');
        } else if header {
            return None;
        }
    }
    out.push_str(TAIL);
    (out.len() <= max).then_some(alloc::borrow::Cow::Owned(out))
}

/// Sends one reply to a session; the session goes on.
fn reply(cx: &mut Context<'_>, handle: SocketHandle, text: &str) -> bool {
    let _ = cx
        .stack
        .sockets
        .get_mut::<tcp::Socket>(handle)
        .send_slice(text.as_bytes());
    true
}

/// Failed answers after which a session is closed.
const AUTH_FAILURES_MAX: u32 = 3;

/// How long a session may stay silent: an unauthenticated one from a source other than the
/// host only for the hello deadline.
fn session_idle_us(s: &Session, idle_us: u64) -> u64 {
    if s.from_host || s.auth.authenticated() {
        idle_us
    } else {
        idle_us.min(guard::HELLO_DEADLINE_US)
    }
}

/// `bench-handshake N`: `n` throwaway handshakes back to back (`SealPair::new`, both ends'
/// CPU, as `bench-seal` times one), for the host to time by the CPU its QEMU process spends
/// meanwhile (the guest's own clock is wall time, stretched by preemption on a busy host).
/// Answers `bench-handshake n=N wall_us=T`. Test images only (`diag-test`).
#[cfg(feature = "diag-test")]
fn bench_handshake(n: u32) -> String {
    use unipeer_node::auth::bench::SealPair;
    let t0 = clock::now_us();
    for _ in 0..n {
        if SealPair::new().is_none() {
            return String::from("error: the throwaway session did not establish\n");
        }
    }
    alloc::format!("bench-handshake n={n} wall_us={}\n", clock::now_us() - t0)
}

/// Timed repetitions of the handshake and of each curve primitive after the first (cold) one.
#[cfg(feature = "diag-test")]
const BENCH_WARM_RUNS: usize = 7;

/// Fastest µs of `BENCH_WARM_RUNS` calls of `f` (`None` if one failed): the guest clock is
/// wall time, and on a shared host the fastest run is the one least stretched by preemption.
#[cfg(feature = "diag-test")]
fn fastest_us(mut f: impl FnMut(usize) -> bool) -> Option<u64> {
    let mut times = [0u64; BENCH_WARM_RUNS];
    for (i, t) in times.iter_mut().enumerate() {
        let t0 = clock::now_us();
        if !f(i) {
            return None;
        }
        *t = clock::now_us() - t0;
    }
    times.iter().copied().min()
}

/// `bench-seal N`: seals and opens `n` datagrams of 64 and of 1,200 bytes over a throwaway
/// in-memory session pair (`unipeer_node::auth::bench::SealPair`: the overlay's own sealing
/// path, ChaCha20-Poly1305), timed with the TSC. One line: µs per seal+open for each size,
/// the bytes a seal adds, the throwaway handshake's time (both ends' CPU) the first time
/// (`handshake_us`: the emulator translates the curve code then), the fastest of the next
/// runs (`handshake_warm_us`), each step of one more (`steps`), and the fastest run of each
/// curve primitive
/// (`unipeer_node::auth::bench::Primitive`). Runs inside the event loop.
/// Test images only (`diag-test`).
#[cfg(feature = "diag-test")]
fn bench_seal(n: u32) -> String {
    use unipeer_node::auth::SEAL_OVERHEAD;
    use unipeer_node::auth::bench::{Primitive, Primitives, SealPair};
    let t0 = clock::now_us();
    let Some(mut pair) = SealPair::new() else {
        return String::from("error: the throwaway session did not establish\n");
    };
    let handshake_us = clock::now_us() - t0;
    let Some(warm_us) = fastest_us(|_| SealPair::new().is_some()) else {
        return String::from("error: the throwaway session did not establish\n");
    };
    let mut steps = String::from(" steps=");
    let mut last = clock::now_us();
    let _ = SealPair::new_timed(&mut |name| {
        let t = clock::now_us();
        let _ = write!(steps, "{name}:{},", t - last);
        last = t;
    });
    let prims = Primitives::new();
    let mut prim_line = steps;
    for p in Primitive::ALL {
        let Some(us) = fastest_us(|i| prims.run(p, i as u8 + 1)) else {
            return alloc::format!("error: {p:?} gave a wrong answer\n");
        };
        let _ = write!(prim_line, " {}={us}", p.key());
    }
    let mut line = alloc::format!("bench-seal n={n} overhead={SEAL_OVERHEAD}");
    for size in [64usize, 1200] {
        let payload = alloc::vec![0x5au8; size];
        let t = clock::now_us();
        for _ in 0..n {
            if pair.seal_open(&payload) != Some(size + SEAL_OVERHEAD) {
                return alloc::format!("error: a {size}-byte datagram did not come through\n");
            }
        }
        let per = (clock::now_us() - t) as f64 / f64::from(n);
        let _ = write!(line, " us_{size}={per:.2}");
    }
    let _ = writeln!(
        line,
        " handshake_us={handshake_us} handshake_warm_us={warm_us}{prim_line} path=session-pair"
    );
    line
}
