//! The replication agent (source document 5): replicated services with a master and slaves,
//! an ordered change log, leases that fence a master that cannot renew, promotion of the most
//! up-to-date slave, and the protocol handler that relays any node's clients to the master.
//!
//! - [`service`]: the interface a replicated service implements (the node core knows none).
//! - [`placement`]: the placement record and the store port (compare-and-set on its version).
//! - [`log`]: the change log with its epoch history and backlog.
//! - [`wire`]: the messages between agents.
//! - [`agent`]: the I/O-free state machine that drives them.

pub mod agent;
pub mod log;
pub mod placement;
pub mod service;
pub mod wire;

pub use agent::{AgentConfig, ConnId, Event, InstanceStatus, ReplicationAgent};
pub use placement::{Mode, PlacementRecord, StoreOp, StoreOpId, StoreResult, app_id};
pub use service::{ReplicatedService, Request, RequestClass, ServiceSet, ServiceState};
