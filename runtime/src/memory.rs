//! Measured memory: an allocator that counts the bytes each thread has allocated and not yet
//! freed, and the peak of that count. A device is one thread, so a device's peak during a step
//! is its thread's peak above where the step started, plus the state it holds between steps.
//!
//! A program opts in by installing [`CountingAllocator`] as its global allocator (the `kiln`
//! binary does); without it every count reads zero and [`installed`] is false.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};

/// The system allocator, counting per thread.
pub struct CountingAllocator;

static INSTALLED: AtomicBool = AtomicBool::new(false);

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

/// Read before written, so that threads do not contend for the flag's cache line.
fn mark_installed() {
    if !INSTALLED.load(Ordering::Relaxed) {
        INSTALLED.store(true, Ordering::Relaxed);
    }
}

fn count(delta: isize) {
    // During thread teardown the counters may be gone; nothing is measured then.
    let _ = LIVE.try_with(|live| {
        let now = live.get() + delta;
        live.set(now);
        let _ = PEAK.try_with(|peak| {
            if now > peak.get() {
                peak.set(now);
            }
        });
    });
}

// SAFETY: every call is forwarded unchanged to the system allocator; counting touches only
// thread-local cells, which never allocate.
unsafe impl GlobalAlloc for CountingAllocator {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        mark_installed();
        let p = System.alloc(layout);
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        mark_installed();
        let p = System.alloc_zeroed(layout);
        if !p.is_null() {
            count(layout.size() as isize);
        }
        p
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout);
        count(-(layout.size() as isize));
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let p = System.realloc(ptr, layout, new_size);
        if !p.is_null() {
            count(new_size as isize - layout.size() as isize);
        }
        p
    }
}

/// Whether the counting allocator is the program's allocator.
pub fn installed() -> bool {
    INSTALLED.load(Ordering::Relaxed)
}

/// Starts a new peak on this thread at its current count; returns that count.
pub fn start_peak() -> isize {
    let live = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(live));
    live
}

/// A buffer this thread allocated is about to be freed by another (a message sent): it stops
/// counting here...
pub fn hand_over(bytes: usize) {
    count(-(bytes as isize));
}

/// ...and counts on the thread that received it, which will free it.
pub fn take_over(bytes: usize) {
    count(bytes as isize);
}

/// This thread's highest count since [`start_peak`].
pub fn peak() -> isize {
    PEAK.with(Cell::get)
}
