//! The unipeer node agent's logic, free of I/O.
//!
//! Everything here is driven from outside (`handle_*(now, ..)` in, `poll_*()` out): the
//! kernel's event loop, the deterministic simulator and unit tests run the same code.
//! It never reads a clock, a random source or a socket.
#![no_std]
#![forbid(unsafe_code)]

extern crate alloc;
#[cfg(test)]
extern crate std;

pub mod auth;
pub mod diag_command;
pub mod directory;
pub mod id;
pub mod jobs;
pub mod launch;
pub mod leaf_set;
pub mod node;
pub mod replication;
pub mod rng;
pub mod routing_table;
pub mod store;
pub mod time;
pub mod wire;

pub use id::{Id, Key, NodeId, ServerTag};
pub use launch::PeerAddr;
pub use node::{Event, Node, NodeConfig, OpId, Transmit};
pub use time::Instant;
