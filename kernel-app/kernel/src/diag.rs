//! The diagnostic service: a UDP port that answers any datagram with the node's report, a UDP
//! echo port for round-trip measurements, and a TCP port that serves the report to many
//! clients at once, each with an idle timeout.
//!
//! TCP protocol (line based): on connect the server sends the report; then `stats` sends it
//! again, `ping` answers `pong`, `quit` closes, `shutdown` stops the VM with the success exit
//! code, `help` lists the commands. Unknown or overlong input is answered with an error line
//! and counted; a client silent for `TCP_IDLE_US` is disconnected.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt::Write;
use core::sync::atomic::Ordering;

use smoltcp::iface::SocketHandle;
use smoltcp::socket::{tcp, udp};
use smoltcp::wire::IpAddress;
use unipeer_node::launch::LaunchConfig;

use crate::BootFacts;
use crate::arch::idt::IRQS;
use crate::net::Stack;
use crate::{clock, heap};

/// TCP connections served at once.
pub const TCP_SESSIONS: usize = 12;
/// A TCP client that sends nothing for this long is disconnected (the launch config's
/// `diag_idle_ms` extra setting overrides it).
pub const TCP_IDLE_US: u64 = 10_000_000;
/// Longest accepted command line.
const LINE_MAX: usize = 128;
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
    pub wakeups: u64,
    /// Loop passes that found work waiting or a deadline already due, and so did not sleep.
    pub busy_polls: u64,
    /// Busy streaks cut short by a nap (should stay near 0).
    pub busy_naps: u64,
}

struct Session {
    handle: SocketHandle,
    /// Set once the connection is established and the greeting sent.
    greeted: bool,
    last_activity_us: u64,
    line: Vec<u8>,
    /// Discarding the rest of an overlong line.
    skipping: bool,
}

pub struct Diag {
    udp: SocketHandle,
    echo: SocketHandle,
    sessions: Vec<Session>,
    tcp_port: u16,
    idle_us: u64,
    pub counters: DiagCounters,
    /// Set by the `shutdown` command; the event loop exits once replies are flushed.
    pub shutdown_requested: bool,
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
        tcp::SocketBuffer::new(vec![0; 4096]),
    );
    stack.sockets.add(socket)
}

impl Diag {
    pub fn new(stack: &mut Stack, config: &LaunchConfig) -> Diag {
        let udp = udp_socket(stack, config.net.diag_udp_port);
        let echo = udp_socket(stack, config.net.echo_port);
        let sessions = (0..TCP_SESSIONS)
            .map(|_| Session {
                handle: tcp_socket(stack),
                greeted: false,
                last_activity_us: 0,
                line: Vec::new(),
                skipping: false,
            })
            .collect();
        let mut diag = Diag {
            udp,
            echo,
            sessions,
            tcp_port: config.net.diag_tcp_port,
            idle_us: config
                .extra("diag_idle_ms")
                .and_then(|v| v.try_into().ok())
                .map(|b: [u8; 4]| u64::from(u32::from_le_bytes(b)) * 1000)
                .filter(|&us| us > 0)
                .unwrap_or(TCP_IDLE_US),
            counters: DiagCounters::default(),
            shutdown_requested: false,
        };
        diag.relisten(stack);
        diag
    }

    /// Puts every closed TCP socket back to listening.
    fn relisten(&mut self, stack: &mut Stack) {
        for s in &mut self.sessions {
            let socket = stack.sockets.get_mut::<tcp::Socket>(s.handle);
            if socket.state() == tcp::State::Closed {
                s.greeted = false;
                s.line.clear();
                s.skipping = false;
                let _ = socket.listen(self.tcp_port);
            }
        }
    }

    /// Serves whatever arrived. Bounded: at most a socket buffer's worth per socket per call.
    pub fn service(
        &mut self,
        now_us: u64,
        stack: &mut Stack,
        facts: &BootFacts,
        config: &LaunchConfig,
    ) {
        // Echo: bounce every datagram back to its sender.
        {
            let socket = stack.sockets.get_mut::<udp::Socket>(self.echo);
            let mut budget = 32;
            while budget > 0 && socket.can_recv() && socket.can_send() {
                budget -= 1;
                let mut buf = [0u8; UDP_PAYLOAD_MAX];
                if let Ok((n, meta)) = socket.recv_slice(&mut buf) {
                    self.counters.echo_packets += 1;
                    let _ = socket.send_slice(&buf[..n], meta.endpoint);
                }
            }
        }
        // Report over UDP.
        let mut pending = heapless::Vec::<smoltcp::wire::IpEndpoint, 16>::new();
        {
            let socket = stack.sockets.get_mut::<udp::Socket>(self.udp);
            while let Ok((_, meta)) = socket.recv() {
                self.counters.udp_requests += 1;
                if pending.push(meta.endpoint).is_err() {
                    break;
                }
            }
        }
        if !pending.is_empty() {
            let report = self.report(now_us, stack, facts, config);
            let socket = stack.sockets.get_mut::<udp::Socket>(self.udp);
            for ep in pending {
                let n = report.len().min(UDP_PAYLOAD_MAX);
                let _ = socket.send_slice(&report.as_bytes()[..n], ep);
            }
        }
        // TCP sessions.
        for i in 0..self.sessions.len() {
            self.service_session(i, now_us, stack, facts, config);
        }
        self.relisten(stack);
    }

    fn service_session(
        &mut self,
        i: usize,
        now_us: u64,
        stack: &mut Stack,
        facts: &BootFacts,
        config: &LaunchConfig,
    ) {
        let handle = self.sessions[i].handle;
        let state = stack.sockets.get::<tcp::Socket>(handle).state();
        if state == tcp::State::Listen || state == tcp::State::SynReceived {
            return;
        }
        if !self.sessions[i].greeted && stack.sockets.get::<tcp::Socket>(handle).may_send() {
            self.sessions[i].greeted = true;
            self.sessions[i].last_activity_us = now_us;
            self.counters.tcp_sessions += 1;
            let report = self.report(now_us, stack, facts, config);
            let _ = stack
                .sockets
                .get_mut::<tcp::Socket>(handle)
                .send_slice(report.as_bytes());
        }
        // Read what arrived, line by line.
        let mut input = [0u8; 512];
        let n = {
            let socket = stack.sockets.get_mut::<tcp::Socket>(handle);
            if socket.can_recv() {
                socket.recv_slice(&mut input).unwrap_or(0)
            } else {
                0
            }
        };
        if n > 0 {
            self.sessions[i].last_activity_us = now_us;
        }
        for &b in &input[..n] {
            let s = &mut self.sessions[i];
            if b == b'\n' {
                if s.skipping {
                    s.skipping = false;
                    continue;
                }
                let line = core::mem::take(&mut s.line);
                if !self.command(&line, handle, now_us, stack, facts, config) {
                    break;
                }
            } else if s.line.len() >= LINE_MAX {
                if !s.skipping {
                    s.skipping = true;
                    s.line.clear();
                    self.counters.bad_requests += 1;
                    let _ = stack
                        .sockets
                        .get_mut::<tcp::Socket>(handle)
                        .send_slice(b"error: line too long\n");
                }
            } else if !s.skipping {
                s.line.push(b);
            }
        }
        let s = &self.sessions[i];
        let socket = stack.sockets.get_mut::<tcp::Socket>(handle);
        if s.greeted && now_us.saturating_sub(s.last_activity_us) > self.idle_us {
            self.counters.tcp_idle_closed += 1;
            socket.abort();
        } else if !socket.may_recv() && socket.state() == tcp::State::CloseWait {
            // The client finished sending: close our side once replies are queued.
            socket.close();
        }
    }

    /// Runs one command line; returns false when the session ends.
    fn command(
        &mut self,
        line: &[u8],
        handle: SocketHandle,
        now_us: u64,
        stack: &mut Stack,
        facts: &BootFacts,
        config: &LaunchConfig,
    ) -> bool {
        let text = core::str::from_utf8(line).unwrap_or("\u{fffd}");
        let reply: String = match text.trim() {
            "" | "stats" => self.report(now_us, stack, facts, config),
            "ping" => String::from("pong\n"),
            "help" => String::from("commands: stats, ping, quit, shutdown, help\n"),
            "quit" => {
                let socket = stack.sockets.get_mut::<tcp::Socket>(handle);
                let _ = socket.send_slice(b"bye\n");
                socket.close();
                return false;
            }
            "shutdown" => {
                log::info!("diag: shutdown requested over TCP");
                self.shutdown_requested = true;
                let socket = stack.sockets.get_mut::<tcp::Socket>(handle);
                let _ = socket.send_slice(b"shutting down\n");
                socket.close();
                return false;
            }
            _ => {
                self.counters.bad_requests += 1;
                String::from("error: unknown command (try help)\n")
            }
        };
        let _ = stack
            .sockets
            .get_mut::<tcp::Socket>(handle)
            .send_slice(reply.as_bytes());
        true
    }

    /// Earliest time a session needs attention (its idle deadline).
    pub fn next_deadline_us(&self, stack: &Stack) -> Option<u64> {
        self.sessions
            .iter()
            .filter(|s| {
                s.greeted
                    && stack.sockets.get::<tcp::Socket>(s.handle).state() != tcp::State::Closed
            })
            .map(|s| s.last_activity_us + self.idle_us + 1)
            .min()
    }

    /// Whether every TCP reply has left (used before a requested shutdown).
    pub fn flushed(&self, stack: &Stack) -> bool {
        self.sessions.iter().all(|s| {
            let socket = stack.sockets.get::<tcp::Socket>(s.handle);
            socket.send_queue() == 0
        })
    }

    /// The report: `key=value` lines between a header and `end`.
    pub fn report(
        &self,
        now_us: u64,
        stack: &Stack,
        facts: &BootFacts,
        config: &LaunchConfig,
    ) -> String {
        let (heap_in_use, heap_high, heap_size) = heap::usage();
        let nic = &stack.phy.nic.stats;
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
             rx_frames={}\ntx_frames={}\nrx_bytes={}\ntx_bytes={}\nrx_errors={}\ntx_queue_full={}\n\
             irq_timer={}\nirq_nic={}\nirq_spurious={}\nirq_other={}\nwakeups={}\nbusy_polls={}\nbusy_naps={}\n\
             udp_requests={}\necho_packets={}\ntcp_sessions={}\ntcp_idle_closed={}\nbad_requests={}\n\
             boot_phases_us={}\n\
             end\n",
            config.node_name,
            config.server_id,
            ip,
            facts.transport,
            now_us,
            entry_to_ready_us,
            clock::boot_tsc(),
            facts.ready_tsc,
            facts.tsc_khz,
            facts.clock_source,
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
            IRQS.timer.load(Ordering::Relaxed),
            IRQS.nic.load(Ordering::Relaxed),
            IRQS.spurious.load(Ordering::Relaxed),
            IRQS.other.load(Ordering::Relaxed),
            c.wakeups,
            c.busy_polls,
            c.busy_naps,
            c.udp_requests,
            c.echo_packets,
            c.tcp_sessions,
            c.tcp_idle_closed,
            c.bad_requests,
            PhaseList(facts),
        );
        out
    }
}

/// `name:us,name:us,...`: microseconds from entry at the end of each boot phase.
struct PhaseList<'a>(&'a BootFacts);

impl core::fmt::Display for PhaseList<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        for (i, (name, tsc)) in self.0.phases.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{name}:{}", clock::tsc_delta_us(tsc.wrapping_sub(clock::boot_tsc())))?;
        }
        Ok(())
    }
}
