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

pub mod launch;
