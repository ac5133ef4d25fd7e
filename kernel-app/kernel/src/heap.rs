//! The kernel heap: a linked-list allocator over the largest free RAM range, with usage and
//! high-water counters for the diagnostic report.

use core::alloc::{GlobalAlloc, Layout};
use core::sync::atomic::{AtomicUsize, Ordering};

use linked_list_allocator::LockedHeap;

pub struct CountingHeap {
    inner: LockedHeap,
    in_use: AtomicUsize,
    high_water: AtomicUsize,
    size: AtomicUsize,
}

// SAFETY: forwards to `LockedHeap`, which upholds the `GlobalAlloc` contract; the counters are
// bookkeeping only.
unsafe impl GlobalAlloc for CountingHeap {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: the caller's contract is passed on unchanged.
        let ptr = unsafe { self.inner.alloc(layout) };
        if !ptr.is_null() {
            let now = self.in_use.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            self.high_water.fetch_max(now, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract is passed on unchanged.
        unsafe { self.inner.dealloc(ptr, layout) };
        self.in_use.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static HEAP: CountingHeap = CountingHeap {
    inner: LockedHeap::empty(),
    in_use: AtomicUsize::new(0),
    high_water: AtomicUsize::new(0),
    size: AtomicUsize::new(0),
};

/// Hands `[start, start + size)` to the allocator.
///
/// # Safety
///
/// The range must be RAM that nothing else uses for the rest of the kernel's life, and this
/// must be called once.
pub unsafe fn init(start: usize, size: usize) {
    // SAFETY: the caller guarantees the range is unused RAM, given once.
    unsafe { HEAP.inner.lock().init(start as *mut u8, size) };
    HEAP.size.store(size, Ordering::Relaxed);
}

/// Heap usage in bytes: `(in_use, high_water, size)`.
pub fn usage() -> (usize, usize, usize) {
    (
        HEAP.in_use.load(Ordering::Relaxed),
        HEAP.high_water.load(Ordering::Relaxed),
        HEAP.size.load(Ordering::Relaxed),
    )
}
