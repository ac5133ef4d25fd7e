//! unipeer's host side: image build, the one QEMU launcher, local cluster networking,
//! benchmarks. The `unipeer` binary is a thin clap front over this library.

pub mod bench;
pub mod ca;
pub mod cluster;
pub mod diag;
pub mod frontend;
pub mod hostinfo;
pub mod image;
pub mod job;
pub mod net;
pub mod owner_only;
pub mod qemu;
pub mod vm;

// The library's tests measure memory like the CLI does (`bench overlay`).
#[cfg(test)]
#[global_allocator]
static HEAP: &unipeer_sim::heap::CountingAlloc = &unipeer_sim::heap::COUNTING;
