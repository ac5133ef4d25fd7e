//! Replicated instances of the local cluster (`unipeer app ...`): created, deleted, listed and
//! inspected through the nodes' diagnostic ports (`app-create` and `app-delete` need the
//! operator's challenge-response, which the cluster daemon answers with the run's operator key;
//! `apps` and `app-status` are open).

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::{ClusterError, NodeState, node_command, node_or_first_up, status};

/// What `app create` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateOptions {
    pub name: String,
    pub service: String,
    pub replicas: u8,
    /// `async` or `sync`.
    pub mode: String,
    pub port: u16,
}

/// One instance in `app list`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppSummary {
    pub name: String,
    pub service: String,
    pub port: u16,
    pub mode: String,
    pub epoch: u64,
}

/// One slave as its master reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SlaveStatus {
    pub id: String,
    pub ip: String,
    /// The cluster node at that address, if any.
    pub node: Option<String>,
    pub acked_seq: u64,
    pub lag_ops: u64,
    pub lag_ms: u64,
    pub online: bool,
}

/// `app status NAME`: the instance as its master (or, without a reachable master, the node
/// asked) reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppStatus {
    pub name: String,
    pub service: String,
    pub port: u16,
    pub mode: String,
    pub epoch: u64,
    pub master_id: String,
    pub master_ip: String,
    pub master: Option<String>,
    /// The node whose answer this is, and its role there.
    pub reported_by: String,
    pub role_there: String,
    pub accepting_writes: bool,
    pub seq: u64,
    /// The record's slaves (ids), and the master's view of each.
    pub members: Vec<String>,
    pub slaves: Vec<SlaveStatus>,
    /// Writes lost in past failovers (the ledger the masters pass on).
    pub lost_writes: u64,
    /// Writes the reporting node dropped when it rejoined as a slave, and some of their keys.
    pub dropped_here: u64,
    pub dropped_keys: Vec<String>,
    pub state_hash: Option<String>,
    pub memory_used: u64,
}

fn check_reply(node: &str, reply: &str) -> Result<(), ClusterError> {
    match reply.lines().find(|l| l.starts_with("error")) {
        Some(e) => Err(ClusterError::Rejected(format!("{node}: {e}"))),
        None => Ok(()),
    }
}

fn valid_name(name: &str) -> bool {
    unipeer_node::diag_command::valid_app_name(name)
}

/// Creates an instance through `node` (default: the first node up); its master is that node,
/// its slaves on other servers where the cluster has them. Returns the node's answer line.
pub fn create(
    run_dir: &Path,
    node: Option<&str>,
    o: &CreateOptions,
) -> Result<String, ClusterError> {
    if !valid_name(&o.name) {
        return Err(ClusterError::BadInput(format!(
            "{:?}: an instance name is 1 to 64 of A-Z a-z 0-9 _ . -",
            o.name
        )));
    }
    if o.mode != "async" && o.mode != "sync" {
        return Err(ClusterError::BadInput(format!(
            "--mode {}: async or sync",
            o.mode
        )));
    }
    let node = node_or_first_up(run_dir, node)?;
    let reply = node_command(
        run_dir,
        &node,
        &format!(
            "app-create {} {} {} {} {}",
            o.name, o.service, o.replicas, o.mode, o.port
        ),
    )?;
    check_reply(&node, &reply)?;
    Ok(reply.trim().to_string())
}

/// Deletes an instance (its port closes on every node within the registry's poll).
pub fn delete(run_dir: &Path, node: Option<&str>, name: &str) -> Result<String, ClusterError> {
    if !valid_name(name) {
        return Err(ClusterError::BadInput(format!(
            "{name:?}: not an instance name"
        )));
    }
    let node = node_or_first_up(run_dir, node)?;
    let reply = node_command(run_dir, &node, &format!("app-delete {name}"))?;
    check_reply(&node, &reply)?;
    Ok(reply.trim().to_string())
}

fn fields(line: &str) -> BTreeMap<&str, &str> {
    line.split_whitespace()
        .filter_map(|w| w.split_once('='))
        .collect()
}

/// The instances the cluster's registry holds (as `node` last read it).
pub fn list(run_dir: &Path, node: Option<&str>) -> Result<Vec<AppSummary>, ClusterError> {
    let node = node_or_first_up(run_dir, node)?;
    let reply = node_command(run_dir, &node, "apps")?;
    check_reply(&node, &reply)?;
    Ok(reply
        .lines()
        .filter(|l| l.starts_with("app "))
        .map(|l| {
            let f = fields(l);
            AppSummary {
                name: f.get("name").unwrap_or(&"").to_string(),
                service: f.get("service").unwrap_or(&"").to_string(),
                port: f.get("port").and_then(|p| p.parse().ok()).unwrap_or(0),
                mode: f.get("mode").unwrap_or(&"?").to_string(),
                epoch: f.get("epoch").and_then(|p| p.parse().ok()).unwrap_or(0),
            }
        })
        .collect())
}

fn parse_status(
    node: &str,
    reply: &str,
    names: &BTreeMap<String, String>,
) -> Result<AppStatus, ClusterError> {
    check_reply(node, reply)?;
    let mut s = AppStatus {
        name: String::new(),
        service: String::new(),
        port: 0,
        mode: String::new(),
        epoch: 0,
        master_id: String::new(),
        master_ip: String::new(),
        master: None,
        reported_by: node.to_string(),
        role_there: String::new(),
        accepting_writes: false,
        seq: 0,
        members: Vec::new(),
        slaves: Vec::new(),
        lost_writes: 0,
        dropped_here: 0,
        dropped_keys: Vec::new(),
        state_hash: None,
        memory_used: 0,
    };
    let num = |v: Option<&&str>| v.and_then(|x| x.parse().ok()).unwrap_or(0u64);
    for line in reply.lines() {
        let f = fields(line);
        let Some((k, v)) = line.split_once('=') else {
            continue;
        };
        let v1 = v.split_whitespace().next().unwrap_or("");
        match k {
            "name" => s.name = v1.into(),
            "service" => s.service = v1.into(),
            "port" => s.port = v1.parse().unwrap_or(0),
            "mode" => s.mode = v1.into(),
            "epoch" => s.epoch = v1.parse().unwrap_or(0),
            "master" => {
                s.master_id = v1.into();
                s.master_ip = f.get("master_ip").unwrap_or(&"").to_string();
                s.master = names.get(&s.master_ip).cloned();
            }
            "member_slave" => s.members.push(v1.into()),
            "role_here" => s.role_there = v1.into(),
            "accepting_writes" => s.accepting_writes = v1 == "true",
            "seq" => s.seq = v1.parse().unwrap_or(0),
            "slave" => {
                let ip = f.get("ip").unwrap_or(&"").to_string();
                s.slaves.push(SlaveStatus {
                    id: v1.into(),
                    node: names.get(&ip).cloned(),
                    ip,
                    acked_seq: num(f.get("acked_seq")),
                    lag_ops: num(f.get("lag_ops")),
                    lag_ms: num(f.get("lag_ms")),
                    online: f.get("online") == Some(&"true"),
                });
            }
            "lost_writes" => s.lost_writes = v1.parse().unwrap_or(0),
            "dropped_here" => s.dropped_here = v1.parse().unwrap_or(0),
            "dropped_key" => s.dropped_keys.push(v1.into()),
            "state_hash" => s.state_hash = Some(v1.into()),
            "memory_used" => s.memory_used = v1.parse().unwrap_or(0),
            _ => {}
        }
    }
    if s.name.is_empty() {
        return Err(ClusterError::Rejected(format!(
            "{node} gave no status: {}",
            reply.trim()
        )));
    }
    Ok(s)
}

/// What one node knows of instance `name`.
pub fn status_at(run_dir: &Path, node: &str, name: &str) -> Result<AppStatus, ClusterError> {
    let names = node_names(run_dir)?;
    let reply = node_command(run_dir, node, &format!("app-status {name}"))?;
    parse_status(node, &reply, &names)
}

/// Cluster nodes by IPv4 address.
fn node_names(run_dir: &Path) -> Result<BTreeMap<String, String>, ClusterError> {
    Ok(status(run_dir, false)?
        .nodes
        .iter()
        .map(|n| (n.ipv4.to_string(), n.name.clone()))
        .collect())
}

/// Instance `name` as its master reports it (asked first at `node`, default the first node up,
/// which names the master); the first node's answer when the master does not answer.
pub fn status_of(
    run_dir: &Path,
    node: Option<&str>,
    name: &str,
) -> Result<AppStatus, ClusterError> {
    if !valid_name(name) {
        return Err(ClusterError::BadInput(format!(
            "{name:?}: not an instance name"
        )));
    }
    let node = node_or_first_up(run_dir, node)?;
    let first = status_at(run_dir, &node, name)?;
    if first.role_there == "master" {
        return Ok(first);
    }
    let up = status(run_dir, false)?;
    let master_up = first
        .master
        .as_deref()
        .and_then(|m| up.node(m))
        .is_some_and(|n| n.state == NodeState::Up);
    match first.master.clone() {
        Some(m) if master_up => Ok(status_at(run_dir, &m, name).unwrap_or(first)),
        _ => Ok(first),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_status_reply_parses() {
        let reply = "name=cache\nservice=kv\nport=6379\nmode=sync\nepoch=3\nmaster=0a master_ip=10.0.0.2\nmember_slave=0b ip=10.0.0.3\nrole_here=master\naccepting_writes=true\nseq=17\nslave=0b ip=10.0.0.3 acked_seq=15 lag_ops=2 lag_ms=40 online=true\nlost_writes=4\ndropped_here=0\nstate_hash=ab\nmemory_used=100\ntrusted=true\nend\n";
        let names: BTreeMap<String, String> = [
            ("10.0.0.2".to_string(), "n1".to_string()),
            ("10.0.0.3".to_string(), "n2".to_string()),
        ]
        .into();
        let s = parse_status("n1", reply, &names).unwrap();
        assert_eq!((s.epoch, s.seq, s.lost_writes), (3, 17, 4));
        assert_eq!(s.master.as_deref(), Some("n1"));
        assert_eq!(s.slaves.len(), 1);
        assert_eq!(s.slaves[0].node.as_deref(), Some("n2"));
        assert_eq!((s.slaves[0].lag_ops, s.slaves[0].lag_ms), (2, 40));
        assert!(s.accepting_writes && s.slaves[0].online);
        assert!(parse_status("n1", "error: no instance named x\n", &names).is_err());
    }
}
