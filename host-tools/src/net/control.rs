//! Control of a running switch from other processes: line-delimited JSON over the Unix socket
//! `<run_dir>/switch.sock`. One request per line, one response per line, in order.
//!
//! Request: `{"op":"cut","port":"n1"}`. Response: `{"ok":true,"result":...}` or
//! `{"ok":false,"error":"unknown port \"n9\" (ports: host, n0, n1)"}`.

use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::stats::{PortInfo, SwitchStats};

/// File name of the control socket inside the run directory.
pub const SOCKET_NAME: &str = "switch.sock";
/// Longest request or response line accepted.
const LINE_MAX: u64 = 1 << 20;
/// Bound on control connections served at once.
const CONNECTIONS_MAX: usize = 64;
/// How long a request may wait for the forwarder, and a client for an answer.
pub const CONTROL_TIMEOUT: Duration = Duration::from_secs(10);

/// A control request. Delays are one-way, microseconds, applied in each direction.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum Request {
    /// Adds a VM port. `vm_port`: the UDP port QEMU will bind on loopback (chosen free if
    /// absent). Answers a [`PortInfo`].
    AddPort {
        name: String,
        #[serde(default)]
        server: Option<String>,
        #[serde(default)]
        vm_port: Option<u16>,
    },
    RemovePort {
        name: String,
    },
    /// Answers every port's [`PortInfo`].
    Ports,
    Cut {
        port: String,
    },
    Restore {
        port: String,
    },
    Partition {
        groups: Vec<Vec<String>>,
    },
    Heal,
    /// `port: None` sets the global loss fraction.
    Loss {
        #[serde(default)]
        port: Option<String>,
        fraction: f64,
    },
    Delay {
        port: String,
        delay_us: u64,
    },
    DelayBetween {
        a: Vec<String>,
        b: Vec<String>,
        delay_us: u64,
    },
    ClearDelays,
    /// Declares servers (name, ports) and the delay between them.
    Servers {
        servers: Vec<(String, Vec<String>)>,
        delay_us: u64,
    },
    ServerDelay {
        delay_us: u64,
    },
    /// Clears every fault (links, partition, loss, delays); servers stay.
    Reset,
    /// Answers a [`SwitchStats`].
    Stats,
    /// Answers the network faults injected so far ([`super::faults::FaultEvent`]s).
    Faults,
    /// Stops the switch: tap and socket are removed.
    Shutdown,
}

/// A control response.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub result: Option<serde_json::Value>,
}

impl Response {
    pub fn success(result: Option<serde_json::Value>) -> Self {
        Response {
            ok: true,
            error: None,
            result,
        }
    }

    pub fn failure(error: impl Into<String>) -> Self {
        Response {
            ok: false,
            error: Some(error.into()),
            result: None,
        }
    }
}

/// A request handed to the forwarder thread, with where to send its answer.
pub(crate) struct Call {
    pub request: Request,
    pub reply: mpsc::SyncSender<Response>,
}

/// Serves the control socket until `stop` is set (the owner then connects once to wake it).
pub(crate) fn spawn_server(
    listener: UnixListener,
    calls: Sender<Call>,
    waker: Arc<mio::Waker>,
    stop: Arc<AtomicBool>,
) -> io::Result<JoinHandle<()>> {
    let live = Arc::new(AtomicUsize::new(0));
    thread::Builder::new()
        .name("switch-control".into())
        .spawn(move || {
            for conn in listener.incoming() {
                if stop.load(Ordering::SeqCst) {
                    break;
                }
                let Ok(conn) = conn else { continue };
                // Our user or root only (the socket is also 0600 in a 0700 directory).
                if let Err(e) = crate::owner_only::peer_allowed(&conn) {
                    log::warn!("switch: refused a control connection: {e}");
                    let text = serde_json::to_string(&Response::failure(e.to_string()))
                        .expect("serialisable");
                    crate::owner_only::refuse_peer(conn, &text);
                    continue;
                }
                if live.load(Ordering::SeqCst) >= CONNECTIONS_MAX {
                    let mut conn = conn;
                    let _ = writeln!(
                        conn,
                        "{}",
                        serde_json::to_string(&Response::failure("too many control connections"))
                            .expect("serialisable")
                    );
                    continue;
                }
                live.fetch_add(1, Ordering::SeqCst);
                let (calls, waker, live) = (calls.clone(), waker.clone(), live.clone());
                let spawned = thread::Builder::new()
                    .name("switch-control-conn".into())
                    .spawn(move || {
                        serve_connection(conn, &calls, &waker);
                        live.fetch_sub(1, Ordering::SeqCst);
                    });
                if spawned.is_err() {
                    log::warn!("switch: cannot spawn a control connection thread");
                }
            }
        })
}

fn serve_connection(conn: UnixStream, calls: &Sender<Call>, waker: &mio::Waker) {
    let Ok(mut out) = conn.try_clone() else {
        return;
    };
    let mut reader = BufReader::new(conn);
    loop {
        let mut line = String::new();
        match (&mut reader).take(LINE_MAX).read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) => {}
        }
        if !line.ends_with('\n') && line.len() as u64 >= LINE_MAX {
            let _ = write_line(&mut out, &Response::failure("request line too long"));
            return;
        }
        if line.trim().is_empty() {
            continue;
        }
        let response = match serde_json::from_str::<Request>(&line) {
            Err(e) => Response::failure(format!("bad request: {e}")),
            Ok(request) => forward(request, calls, waker),
        };
        if write_line(&mut out, &response).is_err() {
            return;
        }
    }
}

fn forward(request: Request, calls: &Sender<Call>, waker: &mio::Waker) -> Response {
    let (reply, answer) = mpsc::sync_channel(1);
    if calls.send(Call { request, reply }).is_err() || waker.wake().is_err() {
        return Response::failure("the switch is stopping");
    }
    answer
        .recv_timeout(CONTROL_TIMEOUT)
        .unwrap_or_else(|_| Response::failure("the switch did not answer in time"))
}

fn write_line(out: &mut impl Write, r: &Response) -> io::Result<()> {
    let mut s = serde_json::to_string(r).expect("responses serialise");
    s.push('\n');
    out.write_all(s.as_bytes())?;
    out.flush()
}

/// Why a control call failed.
#[derive(Debug)]
pub enum ControlError {
    /// No switch answers at this socket (none started, or it stopped).
    NotRunning { socket: PathBuf, source: io::Error },
    /// The connection broke or timed out.
    Io(io::Error),
    /// The switch answered something that is not a response of the expected shape.
    Protocol(String),
    /// The switch refused the request; the message says why. Nothing changed.
    Rejected(String),
}

impl fmt::Display for ControlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ControlError::NotRunning { socket, source } => {
                write!(f, "no switch is running at {} ({source})", socket.display())
            }
            ControlError::Io(e) => write!(f, "switch control connection failed: {e}"),
            ControlError::Protocol(m) => write!(f, "switch control protocol error: {m}"),
            ControlError::Rejected(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for ControlError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ControlError::NotRunning { source, .. } | ControlError::Io(source) => Some(source),
            _ => None,
        }
    }
}

/// A connection to a running switch. Each call is one request and its response.
pub struct SwitchClient {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

fn strings<S: AsRef<str>>(v: &[S]) -> Vec<String> {
    v.iter().map(|s| s.as_ref().to_string()).collect()
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl SwitchClient {
    /// Connects to the switch whose run directory is `run_dir`.
    pub fn connect(run_dir: impl AsRef<Path>) -> Result<Self, ControlError> {
        Self::connect_socket(run_dir.as_ref().join(SOCKET_NAME))
    }

    /// Connects to a control socket by path.
    pub fn connect_socket(socket: PathBuf) -> Result<Self, ControlError> {
        let stream = UnixStream::connect(&socket)
            .map_err(|source| ControlError::NotRunning { socket, source })?;
        stream
            .set_read_timeout(Some(CONTROL_TIMEOUT + Duration::from_secs(1)))
            .map_err(ControlError::Io)?;
        let writer = stream.try_clone().map_err(ControlError::Io)?;
        Ok(SwitchClient {
            reader: BufReader::new(stream),
            writer,
        })
    }

    /// Sends one request; answers its raw response (`ok: false` is not an `Err` here).
    pub fn request(&mut self, request: &Request) -> Result<Response, ControlError> {
        let mut line = serde_json::to_string(request).expect("requests serialise");
        line.push('\n');
        self.send_raw_line(&line)
    }

    /// Sends a line as is (for tests of malformed input); answers the parsed response.
    pub fn send_raw_line(&mut self, line: &str) -> Result<Response, ControlError> {
        self.writer
            .write_all(line.as_bytes())
            .map_err(ControlError::Io)?;
        let mut answer = String::new();
        let n = (&mut self.reader)
            .take(LINE_MAX)
            .read_line(&mut answer)
            .map_err(ControlError::Io)?;
        if n == 0 {
            return Err(ControlError::Io(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the switch closed the connection",
            )));
        }
        serde_json::from_str(&answer).map_err(|e| ControlError::Protocol(e.to_string()))
    }

    fn call(&mut self, request: &Request) -> Result<Option<serde_json::Value>, ControlError> {
        let r = self.request(request)?;
        if r.ok {
            Ok(r.result)
        } else {
            Err(ControlError::Rejected(
                r.error.unwrap_or_else(|| "refused".into()),
            ))
        }
    }

    fn call_for<T: DeserializeOwned>(&mut self, request: &Request) -> Result<T, ControlError> {
        let v = self
            .call(request)?
            .ok_or_else(|| ControlError::Protocol("missing result".into()))?;
        serde_json::from_value(v).map_err(|e| ControlError::Protocol(e.to_string()))
    }

    /// Adds a VM port; the answer carries the QEMU netdev argument via
    /// [`PortInfo::qemu_netdev_arg`].
    pub fn add_port(&mut self, name: &str, server: Option<&str>) -> Result<PortInfo, ControlError> {
        self.add_port_at(name, server, None)
    }

    /// Adds a VM port whose QEMU binds loopback UDP port `vm_port` (a free one if `None`).
    pub fn add_port_at(
        &mut self,
        name: &str,
        server: Option<&str>,
        vm_port: Option<u16>,
    ) -> Result<PortInfo, ControlError> {
        self.call_for(&Request::AddPort {
            name: name.into(),
            server: server.map(Into::into),
            vm_port,
        })
    }

    pub fn remove_port(&mut self, name: &str) -> Result<(), ControlError> {
        self.call(&Request::RemovePort { name: name.into() })
            .map(drop)
    }

    pub fn ports(&mut self) -> Result<Vec<PortInfo>, ControlError> {
        self.call_for(&Request::Ports)
    }

    /// Cuts a port's link: frames to and from it are dropped.
    pub fn cut(&mut self, port: &str) -> Result<(), ControlError> {
        self.call(&Request::Cut { port: port.into() }).map(drop)
    }

    pub fn restore(&mut self, port: &str) -> Result<(), ControlError> {
        self.call(&Request::Restore { port: port.into() }).map(drop)
    }

    /// Partitions ports into groups (disjoint). VM ports in no group form one more group; the
    /// uplink `host` reaches every group unless a group names it.
    pub fn partition<G: AsRef<[S]>, S: AsRef<str>>(
        &mut self,
        groups: &[G],
    ) -> Result<(), ControlError> {
        let groups = groups.iter().map(|g| strings(g.as_ref())).collect();
        self.call(&Request::Partition { groups }).map(drop)
    }

    pub fn heal(&mut self) -> Result<(), ControlError> {
        self.call(&Request::Heal).map(drop)
    }

    /// Sets the loss fraction (0..=1) of one port's link, or the global one (`None`).
    pub fn loss(&mut self, port: Option<&str>, fraction: f64) -> Result<(), ControlError> {
        self.call(&Request::Loss {
            port: port.map(Into::into),
            fraction,
        })
        .map(drop)
    }

    /// Delays frames on one port's link, one way, each direction.
    pub fn delay(&mut self, port: &str, delay: Duration) -> Result<(), ControlError> {
        self.call(&Request::Delay {
            port: port.into(),
            delay_us: micros(delay),
        })
        .map(drop)
    }

    /// Delays frames between two disjoint sets of ports, one way, each direction.
    pub fn delay_between<S: AsRef<str>>(
        &mut self,
        a: &[S],
        b: &[S],
        delay: Duration,
    ) -> Result<(), ControlError> {
        self.call(&Request::DelayBetween {
            a: strings(a),
            b: strings(b),
            delay_us: micros(delay),
        })
        .map(drop)
    }

    pub fn clear_delays(&mut self) -> Result<(), ControlError> {
        self.call(&Request::ClearDelays).map(drop)
    }

    /// Declares physical servers (name, ports) and the one-way delay between them.
    pub fn servers<S: AsRef<str>>(
        &mut self,
        servers: &[(S, Vec<S>)],
        delay: Duration,
    ) -> Result<(), ControlError> {
        let servers = servers
            .iter()
            .map(|(n, p)| (n.as_ref().to_string(), strings(p)))
            .collect();
        self.call(&Request::Servers {
            servers,
            delay_us: micros(delay),
        })
        .map(drop)
    }

    pub fn reset(&mut self) -> Result<(), ControlError> {
        self.call(&Request::Reset).map(drop)
    }

    /// The network faults injected so far, with their start and heal times.
    pub fn faults(&mut self) -> Result<Vec<super::faults::FaultEvent>, ControlError> {
        self.call_for(&Request::Faults)
    }

    pub fn stats(&mut self) -> Result<SwitchStats, ControlError> {
        self.call_for(&Request::Stats)
    }

    /// Asks the switch to stop (tap and control socket removed).
    pub fn shutdown(&mut self) -> Result<(), ControlError> {
        self.call(&Request::Shutdown).map(drop)
    }
}

/// Parses a delay as a user types it: `20ms`, `1.5ms`, `500us`, `2s`, or `0`.
pub fn parse_delay(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    if t == "0" {
        return Ok(Duration::ZERO);
    }
    let (num, unit_us) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1_000.0)
    } else if let Some(n) = t.strip_suffix("us").or_else(|| t.strip_suffix("µs")) {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1_000_000.0)
    } else {
        return Err(format!(
            "delay {text:?} needs a unit: us, ms or s (e.g. 20ms)"
        ));
    };
    let x: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("delay {text:?} is not a number with a unit (e.g. 20ms)"))?;
    let us = x * unit_us;
    if !us.is_finite() || us < 0.0 || us > super::fabric::DELAY_US_MAX as f64 {
        return Err(format!(
            "delay {text:?} is outside 0..={} s",
            super::fabric::DELAY_US_MAX / 1_000_000
        ));
    }
    Ok(Duration::from_micros(us.round() as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_parse_with_units() {
        assert_eq!(parse_delay("20ms"), Ok(Duration::from_millis(20)));
        assert_eq!(parse_delay("1.5ms"), Ok(Duration::from_micros(1500)));
        assert_eq!(parse_delay("500us"), Ok(Duration::from_micros(500)));
        assert_eq!(parse_delay("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_delay("0"), Ok(Duration::ZERO));
        for bad in ["20", "ms", "-1ms", "1h", "999s", "NaNms"] {
            assert!(parse_delay(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn requests_have_a_stable_json_form() {
        let r: Request = serde_json::from_str(r#"{"op":"loss","fraction":0.1}"#).unwrap();
        assert_eq!(
            r,
            Request::Loss {
                port: None,
                fraction: 0.1
            }
        );
        let s = serde_json::to_string(&Request::Partition {
            groups: vec![vec!["a".into()], vec!["b".into()]],
        })
        .unwrap();
        assert_eq!(s, r#"{"op":"partition","groups":[["a"],["b"]]}"#);
    }
}
