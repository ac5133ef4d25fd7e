//! Measured memory: a counting global allocator for the binaries that report memory (the
//! simulator's bench binary, the `unipeer` CLI, the test harnesses of the benches). A binary
//! installs it with
//!
//! ```ignore
//! #[global_allocator]
//! static HEAP: &unipeer_sim::heap::CountingAlloc = &unipeer_sim::heap::COUNTING;
//! ```
//!
//! and [`allocated_bytes`] then reads the bytes the process holds; without it, `None`.

pub use stats_alloc::INSTRUMENTED_SYSTEM as COUNTING;

/// The system allocator with counters (`stats_alloc`).
pub type CountingAlloc = stats_alloc::StatsAlloc<std::alloc::System>;

/// Heap bytes the process holds now, when its global allocator is [`COUNTING`]; `None` when
/// the binary did not install it (its counters never moved).
pub fn allocated_bytes() -> Option<usize> {
    let s = COUNTING.stats();
    if s.allocations == 0 {
        return None;
    }
    Some(s.bytes_allocated.saturating_sub(s.bytes_deallocated))
}

/// Bytes freed while `f` runs (what dropping a value released), when counting.
pub fn freed_by(f: impl FnOnce()) -> Option<usize> {
    let before = allocated_bytes()?;
    f();
    Some(before.saturating_sub(allocated_bytes()?))
}
