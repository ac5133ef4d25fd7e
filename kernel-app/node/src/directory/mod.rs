//! The service directory (source document 3) and Discovery: who offers a service, where.
//!
//! A service's id is the hash of its name ([`service_id`]). A *level-l directory node* of a
//! service is a node whose id shares its first `l` hex digits with the service id. A provider
//! routes its [`Advert`] towards the service id by prefix (one more shared digit per hop, each
//! hop chosen for proximity) and every node on that route at level `R` or more keeps a copy,
//! up to the *terminal* directory node: the first one whose leaf set holds every node of its
//! level (the whole "arc" of ids sharing that prefix), or that knows no node sharing more
//! digits, or that is at level `M`. Adverts carry a TTL and are refreshed before it; a copy
//! goes when its TTL runs out or when the directory node's leaf set sees the provider fail.
//!
//! `discover(service, requirement, k)` routes the same way and stops at the first directory
//! node holding `k` providers that meet the requirement (at least one on the asker's server
//! unless the requirement names a server); the terminal node, lacking them, asks its arc's
//! other members, which answer the asker directly. The asker ranks what it got by proximity:
//! same server first, then the round-trip time it measures with one probe per candidate.
//!
//! This module holds the data (adverts, requirements, the bounded record table); the node's
//! glue (`node/directory.rs`) routes, answers and times.

use crate::id::{Id, Key, NodeId, ServerTag};
use crate::time::Instant;
use crate::wire::Contact;
use alloc::collections::BTreeMap;
use alloc::string::{String, ToString};
use alloc::vec::Vec;
use core::fmt;
use serde::{Deserialize, Serialize};

/// Longest service name.
pub const MAX_SERVICE_NAME: usize = 32;
/// Most application names in an advert or a requirement.
pub const MAX_ATTR_APPS: usize = 8;
/// Longest application name in an advert or a requirement.
pub const MAX_ATTR_APP_NAME: usize = 24;
/// Most providers in one directory answer (fewer when they do not fit a datagram).
pub const MAX_ANSWER: usize = 8;
/// Most services one node advertises.
pub const MAX_OWN_ADVERTS: usize = 8;
/// Most discovers of this node in flight.
pub const MAX_DISCOVERS: usize = 64;
/// Longest TTL a directory node grants an advert.
pub const MAX_TTL_MS: u32 = 600_000;

/// The id of a service name: SHA-256 of the name (domain-separated like every name key).
pub fn service_id(name: &str) -> Key {
    Id::for_name(name.as_bytes())
}

/// The service every node advertises itself under (its apps, slots, memory, server).
pub const NODE_SERVICE: &str = "node";

/// What a provider offers, as the directory matches it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attributes {
    /// Applications the node's image offers.
    pub apps: Vec<String>,
    /// Task slots in all.
    pub slots: u8,
    /// Task slots free now.
    pub free_slots: u8,
    /// Free memory in MiB.
    pub memory_mib: u32,
    pub cores: u8,
    /// Replicated instances (masters and slaves) the node holds.
    pub instances: u16,
    /// Load in percent (busy slots over slots, or the driver's measure).
    pub load_pct: u8,
}

impl Attributes {
    pub fn within_bounds(&self) -> bool {
        self.apps.len() <= MAX_ATTR_APPS && self.apps.iter().all(|a| a.len() <= MAX_ATTR_APP_NAME)
    }
}

/// A provider's advertisement of one service.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Advert {
    pub service: Key,
    pub provider: Contact,
    pub attrs: Attributes,
    /// How long a directory node keeps it; 0 withdraws it.
    pub ttl_ms: u32,
    /// Newer adverts of one provider and service replace older ones.
    pub seq: u64,
}

/// A requirement a provider must meet. Every field must hold (an empty one always does).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Requirement {
    /// Applications the provider must offer (`apps ∋ X` for each).
    pub apps: Vec<String>,
    pub min_free_slots: u8,
    pub min_memory_mib: u32,
    pub min_cores: u8,
    /// The provider's physical server (`server = s2`).
    pub server: Option<ServerTag>,
    /// Highest load in percent.
    pub max_load_pct: Option<u8>,
}

/// Why a requirement term did not parse.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequirementError {
    /// Not `key=value`, `key>=value` or `key<=value`.
    Syntax(String),
    /// A key the directory does not know.
    UnknownKey(String),
    /// The key takes another operator (`apps=`, `server=`, `free_slots>=` ...).
    Operator(String),
    /// The value is not a number in range, or an app name is too long or too many.
    Value(String),
}

impl fmt::Display for RequirementError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RequirementError::Syntax(t) => write!(
                f,
                "requirement {t:?}: expected key=value, key>=value or key<=value"
            ),
            RequirementError::UnknownKey(k) => write!(
                f,
                "unknown requirement key {k:?} (known: apps, free_slots, memory, cores, server, load)"
            ),
            RequirementError::Operator(t) => write!(
                f,
                "requirement {t:?}: apps and server take '=', free_slots, memory and cores '>=', load '<='"
            ),
            RequirementError::Value(t) => write!(f, "requirement {t:?}: bad value"),
        }
    }
}

impl core::error::Error for RequirementError {}

fn parse_num<T: core::str::FromStr>(term: &str, v: &str) -> Result<T, RequirementError> {
    v.trim()
        .parse()
        .map_err(|_| RequirementError::Value(term.to_string()))
}

impl Requirement {
    /// Parses CLI terms: `apps=wordcount[,sha256]`, `free_slots>=2`, `memory>=64` (MiB, an
    /// optional `MiB` suffix), `cores>=2`, `server=s2`, `load<=50`.
    pub fn parse<'a>(terms: impl IntoIterator<Item = &'a str>) -> Result<Self, RequirementError> {
        let mut r = Requirement::default();
        for term in terms {
            r.add_term(term)?;
        }
        Ok(r)
    }

    fn add_term(&mut self, term: &str) -> Result<(), RequirementError> {
        let (key, op, value) = if let Some((k, v)) = term.split_once(">=") {
            (k, ">=", v)
        } else if let Some((k, v)) = term.split_once("<=") {
            (k, "<=", v)
        } else if let Some((k, v)) = term.split_once('=') {
            (k, "=", v)
        } else {
            return Err(RequirementError::Syntax(term.to_string()));
        };
        let key = key.trim();
        let value = value.trim();
        if key.is_empty() || value.is_empty() {
            return Err(RequirementError::Syntax(term.to_string()));
        }
        let bad_op = || RequirementError::Operator(term.to_string());
        match key {
            "apps" | "app" => {
                if op != "=" {
                    return Err(bad_op());
                }
                for app in value.split(',').map(str::trim).filter(|a| !a.is_empty()) {
                    if app.len() > MAX_ATTR_APP_NAME || self.apps.len() >= MAX_ATTR_APPS {
                        return Err(RequirementError::Value(term.to_string()));
                    }
                    if !self.apps.iter().any(|a| a == app) {
                        self.apps.push(app.to_string());
                    }
                }
            }
            "free_slots" | "slots" => {
                if op != ">=" {
                    return Err(bad_op());
                }
                self.min_free_slots = parse_num(term, value)?;
            }
            "memory" | "memory_mib" => {
                if op != ">=" {
                    return Err(bad_op());
                }
                let v = value
                    .strip_suffix("MiB")
                    .or_else(|| value.strip_suffix("M"))
                    .unwrap_or(value);
                self.min_memory_mib = parse_num(term, v)?;
            }
            "cores" => {
                if op != ">=" {
                    return Err(bad_op());
                }
                self.min_cores = parse_num(term, value)?;
            }
            "server" => {
                if op != "=" {
                    return Err(bad_op());
                }
                self.server = Some(ServerTag::from_name(value));
            }
            "load" => {
                if op != "<=" {
                    return Err(bad_op());
                }
                let v: u8 = parse_num(term, value)?;
                if v > 100 {
                    return Err(RequirementError::Value(term.to_string()));
                }
                self.max_load_pct = Some(v);
            }
            other => return Err(RequirementError::UnknownKey(other.to_string())),
        }
        Ok(())
    }

    pub fn within_bounds(&self) -> bool {
        self.apps.len() <= MAX_ATTR_APPS && self.apps.iter().all(|a| a.len() <= MAX_ATTR_APP_NAME)
    }

    /// Whether `a` meets every term.
    pub fn matches(&self, a: &Advert) -> bool {
        let x = &a.attrs;
        self.apps
            .iter()
            .all(|want| x.apps.iter().any(|have| have == want))
            && x.free_slots >= self.min_free_slots
            && x.memory_mib >= self.min_memory_mib
            && x.cores >= self.min_cores
            && self.server.is_none_or(|s| a.provider.server == s)
            && self.max_load_pct.is_none_or(|l| x.load_pct <= l)
    }
}

/// The directory's settings (the cluster's R and M, and sizes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DirectoryConfig {
    /// R: the lowest level that keeps adverts and answers lookups.
    pub min_level: u8,
    /// M: the highest level explored; a node at M is terminal.
    pub max_level: u8,
    /// TTL of this node's adverts (refreshed every third of it).
    pub ttl_ms: u32,
    /// Most adverts one directory node keeps (beyond: refused and counted).
    pub max_records: usize,
    /// How long an asker waits for more answers (the terminal's arc) and for RTT probes.
    pub collect_ms: u64,
}

impl Default for DirectoryConfig {
    fn default() -> Self {
        DirectoryConfig {
            min_level: 1,
            max_level: 2,
            ttl_ms: 30_000,
            max_records: 4096,
            collect_ms: 1_000,
        }
    }
}

/// Why an advert was not kept.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdvertError {
    /// Too many services advertised already (`MAX_OWN_ADVERTS`).
    TooMany,
    /// A name or an attribute is over its bound.
    OverBound,
}

impl fmt::Display for AdvertError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AdvertError::TooMany => write!(f, "more than {MAX_OWN_ADVERTS} services advertised"),
            AdvertError::OverBound => write!(f, "service name or attributes over their bounds"),
        }
    }
}

impl core::error::Error for AdvertError {}

/// A provider as a discover answers it, ranked for the asker.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Provider {
    pub contact: Contact,
    pub attrs: Attributes,
    /// The asker's measured round-trip time to it (None: not measured; 0: the asker itself).
    pub rtt_us: Option<u32>,
}

impl Provider {
    /// Ranking key for an asker on `server`: same server first, then RTT (unmeasured last).
    pub fn rank(&self, server: ServerTag) -> (u8, u32, Id) {
        let same = u8::from(self.contact.server != server);
        (same, self.rtt_us.unwrap_or(u32::MAX), self.contact.id)
    }
}

/// What the directory counted, for status and the benchmark.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DirectoryCounters {
    /// Adverts stored or refreshed here as a directory node.
    pub adverts_stored: u64,
    /// Adverts refused because the table was full.
    pub records_refused: u64,
    pub records_expired: u64,
    /// Records dropped because the leaf set saw their provider fail.
    pub records_failed: u64,
    /// Lookups examined here as a directory node (routed or asked by a terminal).
    pub lookups_examined: u64,
    /// Lookups answered here.
    pub lookups_answered: u64,
    /// Answers for discovers no longer in flight, or otherwise unusable.
    pub stray_answers: u64,
    /// Discovers that ended without any answer.
    pub discovers_failed: u64,
    /// Arc walks passed on to this node past a leaf set's edge, and the nodes it then asked.
    pub walks_extended: u64,
    pub walk_extension_asked: u64,
}

#[derive(Clone, Debug)]
struct Stored {
    advert: Advert,
    expires: Instant,
}

/// The adverts a directory node keeps: bounded, by (service, provider).
#[derive(Clone, Debug)]
pub struct DirectoryStore {
    records: BTreeMap<(Key, NodeId), Stored>,
    max: usize,
}

impl DirectoryStore {
    pub fn new(max: usize) -> Self {
        DirectoryStore {
            records: BTreeMap::new(),
            max,
        }
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    pub fn set_max(&mut self, max: usize) {
        self.max = max;
    }

    /// Keeps (or replaces with a newer one, or removes for TTL 0) an advert. `Err(())`: full.
    #[allow(clippy::result_unit_err)]
    pub fn upsert(&mut self, now: Instant, a: Advert) -> Result<(), ()> {
        let key = (a.service, a.provider.id);
        if let Some(old) = self.records.get(&key)
            && old.advert.seq > a.seq
        {
            return Ok(()); // an older advert arriving late
        }
        if a.ttl_ms == 0 {
            self.records.remove(&key);
            return Ok(());
        }
        if !self.records.contains_key(&key) && self.records.len() >= self.max {
            return Err(());
        }
        let expires = now.plus_ms(u64::from(a.ttl_ms.min(MAX_TTL_MS)));
        self.records.insert(key, Stored { advert: a, expires });
        Ok(())
    }

    /// Drops every advert of `provider`; returns how many.
    pub fn forget_provider(&mut self, provider: NodeId) -> usize {
        let before = self.records.len();
        self.records.retain(|(_, p), _| *p != provider);
        before - self.records.len()
    }

    /// Drops adverts whose TTL ran out; returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let before = self.records.len();
        self.records.retain(|_, s| s.expires > now);
        before - self.records.len()
    }

    /// Live adverts of `service` meeting `req`.
    pub fn matching(&self, now: Instant, service: Key, req: &Requirement) -> Vec<&Advert> {
        self.records
            .range((service, Id(0))..=(service, Id(u128::MAX)))
            .filter(|(_, s)| s.expires > now && req.matches(&s.advert))
            .map(|(_, s)| &s.advert)
            .collect()
    }

    /// Whether this node holds a live advert of `provider` for `service`.
    pub fn holds(&self, now: Instant, service: Key, provider: NodeId) -> bool {
        self.records
            .get(&(service, provider))
            .is_some_and(|s| s.expires > now)
    }

    pub fn adverts(&self) -> impl Iterator<Item = &Advert> + '_ {
        self.records.values().map(|s| &s.advert)
    }
}

/// Picks up to `MAX_ANSWER` of `matches` for an asker on `server`: its server's first.
pub fn select_for(matches: Vec<&Advert>, server: ServerTag) -> Vec<Advert> {
    let mut m = matches;
    m.sort_by_key(|a| (a.provider.server != server, a.attrs.load_pct, a.provider.id));
    m.into_iter().take(MAX_ANSWER).cloned().collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::launch::PeerAddr;
    use alloc::vec;

    fn advert(id: u128, server: &str, apps: &[&str], free: u8, seq: u64) -> Advert {
        Advert {
            service: service_id("node"),
            provider: Contact {
                id: Id(id),
                addr: PeerAddr {
                    ipv4: [10, 0, 0, 1],
                    port: 7000,
                },
                server: ServerTag::from_name(server),
            },
            attrs: Attributes {
                apps: apps.iter().map(|s| s.to_string()).collect(),
                slots: 4,
                free_slots: free,
                memory_mib: 128,
                cores: 1,
                instances: 0,
                load_pct: 10,
            },
            ttl_ms: 1000,
            seq,
        }
    }

    #[test]
    fn requirements_parse_and_match() {
        let r = Requirement::parse([
            "apps=wordcount",
            "free_slots>=2",
            "memory>=64MiB",
            "server=s2",
        ])
        .unwrap();
        assert_eq!(r.apps, vec!["wordcount".to_string()]);
        assert_eq!(r.min_free_slots, 2);
        assert_eq!(r.min_memory_mib, 64);
        assert!(r.matches(&advert(1, "s2", &["wordcount", "sha256"], 2, 1)));
        assert!(!r.matches(&advert(1, "s1", &["wordcount"], 2, 1)));
        assert!(!r.matches(&advert(1, "s2", &["sha256"], 2, 1)));
        assert!(!r.matches(&advert(1, "s2", &["wordcount"], 1, 1)));
        assert!(Requirement::default().matches(&advert(1, "s0", &[], 0, 1)));
    }

    #[test]
    fn malformed_requirements_are_clear_errors() {
        for (t, want) in [
            ("apps", "expected key=value"),
            ("colour=red", "unknown requirement key"),
            ("apps>=x", "take '='"),
            ("free_slots=2", "take '='"),
            ("free_slots>=lots", "bad value"),
            ("free_slots>=300", "bad value"),
            ("load<=101", "bad value"),
            ("=3", "expected key=value"),
        ] {
            let e = Requirement::parse([t]).unwrap_err();
            assert!(alloc::format!("{e}").contains(want), "{t}: {e}");
        }
        let long = alloc::format!("apps={}", "x".repeat(MAX_ATTR_APP_NAME + 1));
        assert!(Requirement::parse([long.as_str()]).is_err());
    }

    #[test]
    fn store_is_bounded_newest_wins_and_expires() {
        let mut s = DirectoryStore::new(2);
        let t0 = Instant::ZERO;
        s.upsert(t0, advert(1, "s0", &["a"], 1, 5)).unwrap();
        // An older advert does not replace a newer one.
        s.upsert(t0, advert(1, "s0", &["b"], 1, 4)).unwrap();
        let any = Requirement::default();
        assert_eq!(
            s.matching(t0, service_id("node"), &any)[0].attrs.apps[0],
            "a"
        );
        s.upsert(t0, advert(2, "s0", &[], 1, 1)).unwrap();
        assert_eq!(s.upsert(t0, advert(3, "s0", &[], 1, 1)), Err(()));
        assert_eq!(s.len(), 2);
        // Withdrawal.
        let mut w = advert(2, "s0", &[], 1, 2);
        w.ttl_ms = 0;
        s.upsert(t0, w).unwrap();
        assert_eq!(s.len(), 1);
        assert_eq!(s.expire(t0.plus_ms(999)), 0);
        assert_eq!(s.expire(t0.plus_ms(1000)), 1);
        assert!(s.is_empty());
        s.upsert(t0, advert(7, "s0", &[], 1, 1)).unwrap();
        assert_eq!(s.forget_provider(Id(7)), 1);
    }

    #[test]
    fn worst_case_directory_messages_fit_a_datagram() {
        use crate::wire::{
            self, DirectoryBody, Header, MAX_DATAGRAM, MAX_PATH, Message, Packet, Routed,
            RoutedBody, WIRE_VERSION,
        };
        let app = "a".repeat(MAX_ATTR_APP_NAME);
        let apps: Vec<&str> = vec![app.as_str(); MAX_ATTR_APPS];
        let mut a = advert(u128::MAX, "s0", &apps, u8::MAX, u64::MAX);
        a.ttl_ms = u32::MAX;
        a.attrs.memory_mib = u32::MAX;
        let header = Header {
            version: WIRE_VERSION,
            sender: Id(u128::MAX),
            server: ServerTag(u32::MAX),
            joined: true,
        };
        let routed = |body| Packet {
            header,
            message: Message::Routed(Routed {
                nonce: u64::MAX,
                key: Id(u128::MAX),
                origin: a.provider,
                path: vec![Id(u128::MAX); MAX_PATH],
                body,
            }),
        };
        let req = Requirement {
            apps: apps.iter().map(|s| s.to_string()).collect(),
            min_free_slots: u8::MAX,
            min_memory_mib: u32::MAX,
            min_cores: u8::MAX,
            server: Some(ServerTag(u32::MAX)),
            max_load_pct: Some(100),
        };
        for p in [
            routed(RoutedBody::Directory(DirectoryBody::Advertise(a.clone()))),
            routed(RoutedBody::Directory(DirectoryBody::Discover {
                requirement: req.clone(),
                k: u8::MAX,
            })),
        ] {
            let bytes = wire::encode(&p, MAX_DATAGRAM).unwrap();
            assert_eq!(wire::decode(&bytes).unwrap(), p);
        }
        // An over-bound advert is refused both ways.
        let mut big = a.clone();
        big.attrs.apps.push("x".into());
        let p = routed(RoutedBody::Directory(DirectoryBody::Advertise(big)));
        assert!(wire::encode(&p, MAX_DATAGRAM).is_err());
        // A full answer does not fit: the node trims it (`directory_answer`), at least 3 do.
        let reply = |n: usize| Packet {
            header,
            message: Message::DirectoryReply {
                nonce: u64::MAX,
                key: Id(u128::MAX),
                routed: true,
                level: 32,
                hops: 24,
                asked: u8::MAX,
                adverts: vec![a.clone(); n],
            },
        };
        assert!(wire::encode(&reply(3), MAX_DATAGRAM).is_ok());
        assert!(wire::encode(&reply(MAX_ANSWER + 1), MAX_DATAGRAM).is_err());
    }

    #[test]
    fn answers_prefer_the_askers_server() {
        let a = advert(1, "s1", &[], 1, 1);
        let b = advert(2, "s2", &[], 1, 1);
        let picked = select_for(vec![&a, &b], ServerTag::from_name("s2"));
        assert_eq!(picked[0].provider.id, Id(2));
    }
}
