//! Fault-tolerant jobs (issue 6): applications' interface, task and job records kept in the
//! DHT, content-addressed data chunks, capacity discovery, leases, the completion registry and
//! job-authentication delegation. Every part is an I/O-free state machine like the overlay.

pub mod app;
