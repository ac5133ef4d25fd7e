//! The replication agent (source document 5): replicated services with a master and slaves,
//! an ordered change log, leases that fence a master that cannot renew, promotion of the most
//! up-to-date slave, and the protocol handler that relays any node's clients to the master.

pub mod service;

pub use service::{ReplicatedService, Request, RequestClass, ServiceSet, ServiceState};
