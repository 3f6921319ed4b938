use std::process::ExitCode;

/// Counts allocations per thread, for `kiln run --report`'s measured memory per device.
#[global_allocator]
static ALLOCATOR: kiln_runtime::memory::CountingAllocator = kiln_runtime::memory::CountingAllocator;

fn main() -> ExitCode {
    set_signal_dispositions();
    keep_freed_memory();
    kiln::cli::main()
}

/// `kiln plan FILE | head` should stop printing when `head` exits, as other Unix tools do,
/// rather than panic on the write error Rust's ignored SIGPIPE turns into; and a write past a
/// file-size limit should fail with an error rather than kill the process (SIGXFSZ).
#[cfg(unix)]
fn set_signal_dispositions() {
    // SAFETY: sets the disposition of two signals before any thread exists.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        // A write past a file-size limit (`ulimit -f`) then fails with an error Kiln reports,
        // its checkpoints intact, instead of killing the process.
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
    }
}

#[cfg(not(unix))]
fn set_signal_dispositions() {}

/// The executor allocates and frees tensors of megabytes at every op. glibc's malloc serves
/// those with mmap and returns them on free, so each op faults its pages back in (a third of a
/// training step went to page faults and TLB shootdowns). Keeping freed memory in the heap made
/// a step 1.5x faster (3.2 s to 2.1 s, bench/gpt2_6l_384.kiln on 2 cores).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    // SAFETY: mallopt only changes allocator tuning; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 1 << 29);
        // One arena for every device thread: per-thread arenas give memory back to the
        // kernel as their heaps shrink, and the next step faults it in again (with TLB
        // shootdowns across the threads) — 2× slower tensor-parallel steps.
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}
