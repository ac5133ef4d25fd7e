//! Fault-tolerant jobs (issue 6): applications' interface, task and job records kept in the
//! DHT, content-addressed data chunks, capacity discovery, leases, the completion registry and
//! job-authentication delegation. Every part is an I/O-free state machine like the overlay.

pub mod agent;
pub mod app;
pub mod chunk;
pub mod client;
pub mod delegation;
pub mod overlay;
pub mod record;
pub mod wire;

pub use agent::{JobAgent, JobConfig, JobEvent, JobTransmit, Submission, Work};
pub use overlay::Overlay;
