//! What a node is started with: sizes, timeouts and periods, and their checks.

use crate::id::ServerTag;
use crate::launch::PeerAddr;
use alloc::vec::Vec;
use core::fmt;

/// Timeouts and periods, in milliseconds. Defaults are generous for TCG guests (slow, jittery
/// timers) yet keep upkeep under 500 B/s per node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timing {
    /// Period of keepalives to leaf-set members.
    pub keepalive_ms: u64,
    /// Silence after which keepalives ask for an answer.
    pub leaf_probe_after_ms: u64,
    /// Silence after which a leaf-set member is declared failed.
    pub leaf_fail_ms: u64,
    /// A member added on hearsay (another node's leaf set or row) must be heard from within
    /// this long, so dead nodes passed around by peers that have not noticed yet drop out fast.
    pub hearsay_grace_ms: u64,
    /// Period of leaf-set exchange with one random member.
    pub leaf_exchange_ms: u64,
    /// Period of asking a routing-table entry for a row.
    pub table_refresh_ms: u64,
    /// Hop-ack timeout when the next hop's RTT is unknown (upper bound otherwise).
    pub hop_timeout_ms: u64,
    /// Lower bound of the RTT-derived hop-ack timeout.
    pub hop_timeout_min_ms: u64,
    /// Time an own request (lookup, put, get) waits for its answer before retrying.
    pub request_timeout_ms: u64,
    /// Attempts per own request.
    pub request_attempts: u8,
    /// Time a join attempt waits before trying the next bootstrap node.
    pub join_timeout_ms: u64,
    /// Period of the full record re-replication pass.
    pub record_refresh_ms: u64,
    /// How long failed nodes are remembered (and refused from third-party hearsay).
    pub graveyard_ms: u64,
    /// Period of probing one remembered failed node.
    pub graveyard_probe_ms: u64,
    /// How long a failed node still counts in the replica sets whose majority a write needs.
    /// Within it a partition side holding fewer than a majority of a key's replicas cannot
    /// write the key; past it the replicas that are left decide, so keys whose replicas
    /// crashed for good become writable again. (A partition lasting longer loses the
    /// guarantee: membership is not agreed by consensus.)
    pub quorum_memory_ms: u64,
    /// Least time between two proximity (RTT) probes of routing-table candidates.
    pub proximity_probe_ms: u64,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            keepalive_ms: 2_000,
            leaf_probe_after_ms: 5_000,
            leaf_fail_ms: 8_000,
            hearsay_grace_ms: 3_000,
            leaf_exchange_ms: 10_000,
            table_refresh_ms: 20_000,
            hop_timeout_ms: 1_000,
            hop_timeout_min_ms: 50,
            request_timeout_ms: 4_000,
            request_attempts: 4,
            join_timeout_ms: 4_000,
            record_refresh_ms: 10_000,
            graveyard_ms: 300_000,
            graveyard_probe_ms: 2_000,
            quorum_memory_ms: 60_000,
            proximity_probe_ms: 1_000,
        }
    }
}

/// Everything a node is started with.
#[derive(Clone, Debug)]
pub struct NodeConfig {
    /// The node's public key (a placeholder until authentication lands); the id is its hash.
    pub public_key: Vec<u8>,
    /// Where other nodes reach this one.
    pub addr: PeerAddr,
    /// Tag of the physical server this node runs on (`ServerTag::from_name(server_id)`).
    pub server: ServerTag,
    pub rng_seed: [u8; 32],
    /// L: leaf-set size, even, 2..=32.
    pub leaf_set_len: usize,
    /// k: copies of every record, 1..=leaf_set_len/2 + 1.
    pub replicas: usize,
    /// M: neighbourhood-set size.
    pub neighbourhood_len: usize,
    /// Most records this node holds.
    pub max_records: usize,
    pub timing: Timing,
}

impl NodeConfig {
    /// A config with the defaults (L = 16, k = 3, M = 8).
    pub fn new(public_key: &[u8], addr: PeerAddr, server: ServerTag, rng_seed: [u8; 32]) -> Self {
        NodeConfig {
            public_key: public_key.to_vec(),
            addr,
            server,
            rng_seed,
            leaf_set_len: 16,
            replicas: 3,
            neighbourhood_len: 8,
            max_records: 4096,
            timing: Timing::default(),
        }
    }

    /// Checks every range.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.leaf_set_len < 2 || self.leaf_set_len > 32 || !self.leaf_set_len.is_multiple_of(2) {
            return Err(ConfigError::LeafSetLen(self.leaf_set_len));
        }
        if self.replicas == 0 || self.replicas > self.leaf_set_len / 2 + 1 {
            return Err(ConfigError::Replicas(self.replicas));
        }
        let t = &self.timing;
        if t.keepalive_ms == 0
            || t.leaf_fail_ms <= t.keepalive_ms
            || t.hearsay_grace_ms > t.leaf_fail_ms
            || t.hop_timeout_ms == 0
            || t.request_timeout_ms == 0
            || t.request_attempts == 0
            || t.join_timeout_ms == 0
        {
            return Err(ConfigError::Timing);
        }
        Ok(())
    }
}

/// Why a node config was refused. The `Display` text is the message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigError {
    LeafSetLen(usize),
    Replicas(usize),
    Timing,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::LeafSetLen(n) => {
                write!(f, "leaf set length {n} must be even and in 2..=32")
            }
            ConfigError::Replicas(k) => {
                write!(f, "replica count {k} must be in 1..=leaf_set_len/2+1")
            }
            ConfigError::Timing => write!(
                f,
                "timeouts must be non-zero and leaf_fail_ms must exceed keepalive_ms"
            ),
        }
    }
}

impl core::error::Error for ConfigError {}
