//! Byte pipes between two stream sockets: the cluster daemon's `relay` (control connection to
//! a node's TCP port) and the front-end's `CONNECT` (client TCP to that relay) both use one.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::thread;
use std::time::{Duration, Instant};

/// A stream socket that can be cloned and shut down (TCP or Unix).
pub trait Duplex: Read + Write + Send + Sized + 'static {
    fn clone_stream(&self) -> io::Result<Self>;
    fn shut(&self, how: Shutdown);
    fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()>;
}

impl Duplex for TcpStream {
    fn clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shut(&self, how: Shutdown) {
        let _ = self.shutdown(how);
    }
    fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(read)?;
        self.set_write_timeout(write)
    }
}

impl Duplex for UnixStream {
    fn clone_stream(&self) -> io::Result<Self> {
        self.try_clone()
    }
    fn shut(&self, how: Shutdown) {
        let _ = self.shutdown(how);
    }
    fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        self.set_read_timeout(read)?;
        self.set_write_timeout(write)
    }
}

/// Time bounds of a pipe: it ends when no byte moved either way for `idle`, and after `total`
/// whatever moves (the front-end's `CONNECT`: a client cannot hold a relay forever).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PipeLimits {
    pub idle: Duration,
    pub total: Duration,
}

/// Why a pipe ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PipeEnd {
    /// A side closed or broke.
    Closed,
    /// Nothing moved for [`PipeLimits::idle`].
    Idle,
    /// [`PipeLimits::total`] passed.
    TotalTime,
}

const RUNNING: u8 = 0;
const ENDED_IDLE: u8 = 1;
const ENDED_TOTAL: u8 = 2;

/// Time bookkeeping shared by a pipe's two directions.
struct Clock {
    start: Instant,
    /// Milliseconds since `start` of the last byte moved either way.
    last_ms: AtomicU64,
    ended: AtomicU8,
    limits: Option<PipeLimits>,
}

impl Clock {
    fn touch(&self) {
        self.last_ms
            .store(self.start.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// After a read timed out: whether a limit has run out (and which, recorded once).
    fn expired(&self) -> bool {
        let Some(l) = self.limits else {
            return false;
        };
        let now = self.start.elapsed();
        let idle = now.saturating_sub(Duration::from_millis(self.last_ms.load(Ordering::Relaxed)));
        let why = if now >= l.total {
            ENDED_TOTAL
        } else if idle >= l.idle {
            ENDED_IDLE
        } else {
            return self.ended.load(Ordering::Relaxed) != RUNNING;
        };
        let _ = self
            .ended
            .compare_exchange(RUNNING, why, Ordering::Relaxed, Ordering::Relaxed);
        true
    }
}

/// Copies `r` into `w` until `r` ends; a read timeout only checks the clock.
fn copy_timed(r: &mut impl Read, w: &mut impl Write, clock: &Clock) -> io::Result<()> {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match r.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => {
                w.write_all(&buf[..n])?;
                clock.touch();
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) && clock.limits.is_some() =>
            {
                if clock.expired() {
                    return Err(io::Error::new(io::ErrorKind::TimedOut, "pipe time limit"));
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// Copies the client's bytes to the server and the server's bytes to the client until both
/// directions end; returns then. `client_in` reads the client's side: the socket itself, or a
/// reader that already holds bytes the client sent (they go first).
///
/// The client's end of input half-closes toward the server, whose answers still flow back; the
/// server's end (or either side breaking) shuts both sockets down, which also ends the other
/// direction. No time bound: a silent server that never closes keeps a half-closed pipe open
/// (the nodes' TCP services close idle connections themselves). [`pipe_within`] bounds it.
pub fn pipe<C: Duplex, S: Duplex>(client_in: impl Read, client: C, server: S) {
    pipe_with(client_in, client, server, None);
}

/// [`pipe`] with time bounds: both sockets are shut when `limits` run out. The sockets' read
/// and write timeouts are replaced.
pub fn pipe_within<C: Duplex, S: Duplex>(
    client_in: impl Read,
    client: C,
    server: S,
    limits: PipeLimits,
) -> PipeEnd {
    pipe_with(client_in, client, server, Some(limits))
}

fn pipe_with<C: Duplex, S: Duplex>(
    client_in: impl Read,
    client: C,
    server: S,
    limits: Option<PipeLimits>,
) -> PipeEnd {
    let clock = Arc::new(Clock {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
        ended: AtomicU8::new(RUNNING),
        limits,
    });
    if let Some(l) = limits {
        // Reads wake up often enough to notice a limit; a write stuck longer than the idle
        // time is a client that stopped reading.
        let tick = l
            .idle
            .min(l.total)
            .min(Duration::from_millis(250))
            .max(Duration::from_millis(5));
        let set = client
            .set_timeouts(Some(tick), Some(l.idle.max(tick)))
            .and_then(|_| server.set_timeouts(Some(tick), Some(l.idle.max(tick))));
        if set.is_err() {
            client.shut(Shutdown::Both);
            server.shut(Shutdown::Both);
            return PipeEnd::Closed;
        }
    }
    let (server_r, client_w) = match (server.clone_stream(), client.clone_stream()) {
        (Ok(s), Ok(c)) => (s, c),
        _ => {
            client.shut(Shutdown::Both);
            server.shut(Shutdown::Both);
            return PipeEnd::Closed;
        }
    };
    let back_clock = clock.clone();
    let back = thread::Builder::new()
        .name("relay-back".into())
        .spawn(move || {
            let (mut server_r, mut client_w) = (server_r, client_w);
            let _ = copy_timed(&mut server_r, &mut client_w, &back_clock);
            let _ = client_w.flush();
            client_w.shut(Shutdown::Both);
            server_r.shut(Shutdown::Both);
        });
    let Ok(back) = back else {
        client.shut(Shutdown::Both);
        server.shut(Shutdown::Both);
        return PipeEnd::Closed;
    };
    let mut client_in = client_in;
    let mut server_w = server;
    match copy_timed(&mut client_in, &mut server_w, &clock) {
        Ok(()) => server_w.shut(Shutdown::Write),
        Err(_) => {
            server_w.shut(Shutdown::Both);
            client.shut(Shutdown::Both);
        }
    }
    let _ = back.join();
    match clock.ended.load(Ordering::Relaxed) {
        ENDED_IDLE => PipeEnd::Idle,
        ENDED_TOTAL => PipeEnd::TotalTime,
        _ => PipeEnd::Closed,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    #[test]
    fn pipe_carries_both_ways_and_ends_when_the_server_closes() {
        // Server: answers each line upper-cased, closes after "bye".
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let mut r = io::BufReader::new(s.try_clone().unwrap());
            let mut w = s;
            loop {
                let mut line = String::new();
                if io::BufRead::read_line(&mut r, &mut line).unwrap() == 0 {
                    return;
                }
                w.write_all(line.to_uppercase().as_bytes()).unwrap();
                if line.trim() == "bye" {
                    return;
                }
            }
        });
        let (mut client, relay_side) = UnixStream::pair().unwrap();
        let tcp = TcpStream::connect(addr).unwrap();
        // Bytes already read from the client before the pipe starts.
        let early = io::Cursor::new(b"early\n".to_vec()).chain(relay_side.try_clone().unwrap());
        let piper = thread::spawn(move || pipe(early, relay_side, tcp));
        client.write_all(b"hello\nbye\n").unwrap();
        let mut got = String::new();
        client.read_to_string(&mut got).unwrap();
        assert_eq!(got, "EARLY\nHELLO\nBYE\n");
        piper.join().unwrap();
        server.join().unwrap();
    }

    /// A server that never answers and never closes: the bounded pipe ends after the idle
    /// time; one that keeps talking ends at the total time.
    #[test]
    fn a_bounded_pipe_ends_when_idle_and_at_its_total_time() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let talker = thread::spawn(move || {
            // First connection: silent. Second: a byte every 20 ms until the pipe breaks.
            let (_silent, _) = listener.accept().unwrap();
            let (mut chatty, _) = listener.accept().unwrap();
            while chatty.write_all(b".").is_ok() {
                thread::sleep(Duration::from_millis(20));
            }
            drop(_silent);
        });
        let limits = PipeLimits {
            idle: Duration::from_millis(300),
            total: Duration::from_millis(1200),
        };

        let (client, relay_side) = UnixStream::pair().unwrap();
        let start = Instant::now();
        let reader = relay_side.try_clone().unwrap();
        let end = pipe_within(
            reader,
            relay_side,
            TcpStream::connect(addr).unwrap(),
            limits,
        );
        let took = start.elapsed();
        assert_eq!(end, PipeEnd::Idle);
        assert!(took >= limits.idle && took < limits.total, "{took:?}");
        drop(client);

        let (mut client, relay_side) = UnixStream::pair().unwrap();
        let start = Instant::now();
        let reader = relay_side.try_clone().unwrap();
        let piper = thread::spawn(move || {
            pipe_within(
                reader,
                relay_side,
                TcpStream::connect(addr).unwrap(),
                limits,
            )
        });
        let mut got = Vec::new();
        let _ = client.read_to_end(&mut got);
        let end = piper.join().unwrap();
        let took = start.elapsed();
        assert_eq!(end, PipeEnd::TotalTime);
        assert!(took >= limits.total && took < limits.total * 3, "{took:?}");
        assert!(got.len() >= 10, "only {} bytes came through", got.len());
        talker.join().unwrap();
    }
}
