//! The dashboard (`GET /`): one static page embedded in the binary (`dashboard/index.html`,
//! `dashboard/dashboard.js`, no build step) that draws the cluster from snapshots this module
//! builds out of the cluster daemon's status (the nodes' diagnostic reports, the faults it and
//! its switch recorded), pushed as server-sent events at most [`EVENTS_PER_S`] a second.
//!
//! A browser cannot send the API's bearer header, so it signs in once: `unipeer dashboard`
//! (holding the token) asks `POST /v1/dashboard/login` for a one-time code, valid
//! [`CODE_TTL`], and opens `/login?code=...`; the front-end swaps the code for a session
//! cookie (`HttpOnly; SameSite=Strict`, [`SESSION_TTL`]) that admits only the dashboard's
//! `GET`s (page, script, state, events, a node's links), never the API.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use super::access;
use crate::cluster::{self, ClusterStatus, NodeState};

/// The page and its script.
pub const INDEX_HTML: &str = include_str!("dashboard/index.html");
pub const DASHBOARD_JS: &str = include_str!("dashboard/dashboard.js");

/// How long a one-time sign-in code lives.
pub const CODE_TTL: Duration = Duration::from_secs(60);
/// How long a browser session lives.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);
/// Most codes and sessions held (the oldest go first).
const HELD_MAX: usize = 16;
/// Most snapshots pushed per second on one event stream.
pub const EVENTS_PER_S: u32 = 2;
/// Longest an event stream lives (the browser reconnects).
pub const STREAM_MAX: Duration = Duration::from_secs(3600);
/// How long a snapshot is reused by every stream and request.
const SNAPSHOT_REUSE: Duration = Duration::from_millis(400);

/// Whether `path` is one of the dashboard's pages a session cookie admits (`GET` only).
pub fn is_browser_path(path: &str) -> bool {
    matches!(
        path,
        "/" | "/dashboard.js" | "/v1/dashboard/state" | "/v1/dashboard/events"
    ) || path
        .strip_prefix("/v1/dashboard/node/")
        .is_some_and(super::valid_name)
}

/// One-time codes and the sessions they became.
#[derive(Default)]
pub struct BrowserSessions {
    codes: Mutex<Vec<(String, Instant)>>,
    sessions: Mutex<Vec<(String, Instant)>>,
}

fn push_bounded(list: &mut Vec<(String, Instant)>, secret: String, ttl: Duration) {
    list.retain(|(_, t)| t.elapsed() < ttl);
    if list.len() >= HELD_MAX {
        list.remove(0);
    }
    list.push((secret, Instant::now()));
}

impl BrowserSessions {
    /// A new one-time code (128 random bits).
    pub fn new_code(&self) -> std::io::Result<String> {
        let code = access::new_token()?[..32].to_string();
        let mut codes = self.codes.lock().unwrap_or_else(|p| p.into_inner());
        push_bounded(&mut codes, code.clone(), CODE_TTL);
        Ok(code)
    }

    /// Spends a code: a new session's secret, or `None` (unknown, used or expired).
    pub fn redeem(&self, code: &str) -> Option<String> {
        let mut codes = self.codes.lock().unwrap_or_else(|p| p.into_inner());
        codes.retain(|(_, t)| t.elapsed() < CODE_TTL);
        let at = codes
            .iter()
            .position(|(c, _)| access::same_secret(c.as_bytes(), code.as_bytes()))?;
        codes.remove(at);
        drop(codes);
        let session = access::new_token().ok()?;
        let mut sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        push_bounded(&mut sessions, session.clone(), SESSION_TTL);
        Some(session)
    }

    /// Whether `session` is a live session.
    pub fn valid(&self, session: &str) -> bool {
        let sessions = self.sessions.lock().unwrap_or_else(|p| p.into_inner());
        sessions.iter().any(|(s, t)| {
            t.elapsed() < SESSION_TTL && access::same_secret(s.as_bytes(), session.as_bytes())
        })
    }
}

/// The session cookie's name for a front-end on `port` (cookies are per host, not per port).
pub fn cookie_name(port: u16) -> String {
    format!("unipeer_fe_{port}")
}

/// The value of cookie `name` in a `Cookie` header.
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|kv| {
        let (k, v) = kv.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

/// A palette of server colours (the page uses the same order).
pub const SERVER_COLOURS: [&str; 8] = [
    "#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#e15759", "#76b7b2", "#edc948", "#9c755f",
];

/// A node's state on the dashboard: `booting`, `joined` (answering and in the overlay),
/// `suspected` (running but not answering or not joined) or `down`.
fn node_state(n: &crate::cluster::NodeStatus) -> &'static str {
    match n.state {
        NodeState::Booting => "booting",
        NodeState::Down | NodeState::Exited => "down",
        NodeState::Up => match (&n.answering, &n.diag) {
            (Some(true), Some(d)) if d.overlay_joined => "joined",
            _ => "suspected",
        },
    }
}

/// The snapshot the page draws, from a cluster status (with probes) taken at `time_ms`.
pub fn snapshot(st: Option<&ClusterStatus>, time_ms: u64) -> Value {
    let Some(st) = st else {
        return json!({"time_ms": time_ms, "cluster": false, "servers": [], "nodes": [],
                      "replication": [], "faults": []});
    };
    let mut servers: Vec<String> = st.nodes.iter().map(|n| n.server.clone()).collect();
    servers.sort();
    servers.dedup();
    let nodes: Vec<Value> = st
        .nodes
        .iter()
        .map(|n| {
            let d = n.diag.as_ref();
            json!({
                "name": n.name,
                "server": n.server,
                "state": node_state(n),
                "ip": n.ipv4.to_string(),
                "overlay_id": d.map_or("", |d| d.overlay_id.as_str()),
                "memory_mb": n.memory_mib,
                "heap_in_use": d.map_or(0, |d| d.heap_in_use),
                "heap_size": d.map_or(0, |d| d.heap_size),
                "slots": d.map_or(0, |d| d.jobs_slots),
                "running": d.map_or(0, |d| d.jobs_running),
                "supervising": d.map_or(0, |d| d.jobs_supervising),
                "works_run": d.map_or(0, |d| d.jobs_works_run),
                "leaf_set": d.map_or(0, |d| d.leaf_set),
                "table_filled": d.map_or(0, |d| d.table_filled),
                "uptime_ms": d.map_or(0, |d| d.uptime_ms),
                "restarts": n.restarts,
            })
        })
        .collect();
    let server_rows: Vec<Value> = servers
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let of = || st.nodes.iter().filter(|n| &n.server == s);
            json!({
                "name": s,
                "colour": SERVER_COLOURS[i % SERVER_COLOURS.len()],
                "vms": of().count(),
                "up": of().filter(|n| n.state == NodeState::Up).count(),
                "memory_mb": of().map(|n| u64::from(n.memory_mib)).sum::<u64>(),
                "running": of().filter_map(|n| n.diag.as_ref()).map(|d| d.jobs_running).sum::<u64>(),
            })
        })
        .collect();
    let replication: Vec<Value> = st
        .nodes
        .iter()
        .filter_map(|n| {
            let d = n.diag.as_ref()?;
            (!d.repl.is_empty()).then(|| json!({"node": n.name, "fields": d.repl}))
        })
        .collect();
    json!({
        "time_ms": time_ms,
        "cluster": true,
        "servers": server_rows,
        "nodes": nodes,
        "replication": replication,
        "faults": st.faults,
    })
}

/// Snapshots shared by every request and stream for [`SNAPSHOT_REUSE`].
#[derive(Default)]
pub struct SnapshotCache {
    last: Mutex<Option<(Instant, std::sync::Arc<String>)>>,
}

impl SnapshotCache {
    /// The current snapshot as JSON text (blocking: asks the cluster daemon, which probes).
    pub fn get(&self, run_dir: &std::path::Path) -> std::sync::Arc<String> {
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((t, s)) = last.as_ref()
            && t.elapsed() < SNAPSHOT_REUSE
        {
            return s.clone();
        }
        let st = cluster::status(run_dir, true).ok();
        let text =
            std::sync::Arc::new(snapshot(st.as_ref(), crate::net::faults::now_ms()).to_string());
        *last = Some((Instant::now(), text.clone()));
        text
    }
}

/// A node's overlay neighbours for the page's hover: the overlay ids (32 hex digits) in its
/// `leafset` and `overlay` answers.
pub fn node_links(run_dir: &std::path::Path, node: &str) -> Value {
    let ids = |command: &str| -> Vec<String> {
        let text = cluster::node_command(run_dir, node, command).unwrap_or_default();
        let mut ids: Vec<String> = text
            .split(|c: char| !c.is_ascii_hexdigit())
            .filter(|w| w.len() == 32)
            .map(str::to_ascii_lowercase)
            .collect();
        ids.sort();
        ids.dedup();
        ids.truncate(256);
        ids
    };
    json!({"node": node, "leaf_set": ids("leafset"), "table": ids("overlay")})
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_single_use_and_sessions_are_checked() {
        let s = BrowserSessions::default();
        let code = s.new_code().unwrap();
        assert_eq!(code.len(), 32);
        assert!(s.redeem("0".repeat(32).as_str()).is_none());
        let session = s.redeem(&code).unwrap();
        assert!(s.redeem(&code).is_none(), "a code is spent once");
        assert!(s.valid(&session));
        assert!(!s.valid(&"0".repeat(64)));
        assert!(!s.valid(""));
        // Bounded: the oldest sessions go.
        for _ in 0..HELD_MAX {
            let c = s.new_code().unwrap();
            s.redeem(&c).unwrap();
        }
        assert!(!s.valid(&session));
    }

    #[test]
    fn cookies_and_browser_paths() {
        assert_eq!(
            cookie("a=1; unipeer_fe_7700=xyz", "unipeer_fe_7700"),
            Some("xyz")
        );
        assert_eq!(cookie("unipeer_fe_77001=xyz", "unipeer_fe_7700"), None);
        assert!(is_browser_path("/"));
        assert!(is_browser_path("/v1/dashboard/node/n3"));
        assert!(!is_browser_path("/v1/dashboard/node/../x"));
        assert!(!is_browser_path("/v1/nodes"));
        assert!(!is_browser_path("/v1/dashboard/login"));
    }
}
