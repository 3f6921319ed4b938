//! All-reduce bus bandwidth, as nccl-tests reports it, for Kiln's collectives on CPUs.
//!
//! For buffers of 1 KiB to 256 MiB (powers of 4) of f32, each row gives the size in bytes, the
//! count of floats, the time of one all-reduce (µs), the algorithm bandwidth `algbw = bytes /
//! time` and the bus bandwidth `busbw = algbw × 2(n − 1)/n` (GB = 10⁹ bytes), n the devices.
//! Each size is checked once (every device ends with the sum), then warmed up, then timed in
//! several samples of a few iterations each (fewer for big buffers); the time is the median of
//! the samples' mean iteration time.
//!
//! What it measures depends on how it is started:
//!
//! - under `mpirun` (world size > 1): Kiln's MPI backend, `MpiGroup::all_reduce_sum`, one
//!   process per device. Each sample starts after an all-reduce of one float (the barrier);
//!   the time reported is the mean over the ranks (as nccl-tests' default `-a 1`), printed by
//!   rank 0.
//! - on its own (world size 1): the in-process ring, `cpu_ring(2)`, two threads of one process
//!   (the threads meet at a barrier before each sample; the slower thread's time is reported);
//!   then the ceiling set by memory bandwidth: one thread copying the buffer into another
//!   (`copy_from_slice`), reported as bytes copied / time (the memory traffic is twice that:
//!   read plus write), and the same copy into a fresh allocation each time (`to_vec`, what
//!   both backends do per call or per ring step).
//!
//! Commands (from the workspace root; as root, Open MPI also wants
//! `export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1`):
//!
//! ```text
//! cargo build --release -p kiln-runtime --features mpi --example allreduce_busbw
//! mpirun --oversubscribe -np 2 target/release/examples/allreduce_busbw   # (a) MPI
//! target/release/examples/allreduce_busbw                                # (b) ring, (c) copy
//! ```
//!
//! `KILN_BUSBW_MAX=<bytes>` lowers the largest size (default 256 MiB).

use kiln_runtime::comm::launch::Launch;
use kiln_runtime::comm::mpi::MpiWorld;
use kiln_runtime::comm::{cpu_ring, Collective};
use std::sync::Barrier;
use std::time::Instant;

const SAMPLES: usize = 5;

/// The buffer sizes in bytes: 1 KiB, 4 KiB, …, up to `KILN_BUSBW_MAX` (default 256 MiB).
fn sizes() -> Vec<usize> {
    let max = std::env::var("KILN_BUSBW_MAX")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(256 << 20);
    std::iter::successors(Some(1usize << 10), |s| Some(s * 4))
        .take_while(|&s| s <= max)
        .collect()
}

/// Timed iterations per sample: about 64 MiB moved per sample, between 2 and 200 iterations.
fn iterations(bytes: usize) -> usize {
    ((64usize << 20) / bytes).clamp(2, 200)
}

fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(f64::total_cmp);
    let m = xs.len() / 2;
    if xs.len() % 2 == 1 {
        xs[m]
    } else {
        (xs[m - 1] + xs[m]) / 2.0
    }
}

fn header(title: &str) {
    println!("# {title}");
    println!(
        "# {:>12} {:>10} {:>12} {:>10} {:>10}",
        "size(B)", "count", "time(us)", "algbw", "busbw"
    );
    println!(
        "# {:>12} {:>10} {:>12} {:>10} {:>10}",
        "", "(floats)", "", "(GB/s)", "(GB/s)"
    );
}

fn row(bytes: usize, secs: f64, devices: usize) {
    let algbw = bytes as f64 / secs / 1e9;
    let busbw = algbw * 2.0 * (devices - 1) as f64 / devices as f64;
    println!(
        "  {:>12} {:>10} {:>12.2} {:>10.3} {:>10.3}",
        bytes,
        bytes / 4,
        secs * 1e6,
        algbw,
        busbw
    );
}

/// One device's measurement of every size: the median over samples of the mean time of one
/// all-reduce, in seconds. `barrier` runs before each sample, on every device alike.
fn measure(group: &mut dyn Collective, mut barrier: impl FnMut(&mut dyn Collective)) -> Vec<f64> {
    let n = group.size();
    let expected = (n * (n + 1) / 2) as f32;
    sizes()
        .into_iter()
        .map(|bytes| {
            let mut buf = vec![(group.rank() + 1) as f32; bytes / 4];
            group.all_reduce_sum(&mut buf).expect("all-reduce");
            assert!(
                buf.iter().all(|&x| x == expected),
                "device {}: an all-reduce of {bytes} B did not sum",
                group.rank()
            );
            // Zeros from here on: sums that neither grow nor overflow.
            buf.fill(0.0);
            let iters = iterations(bytes);
            for _ in 0..iters.min(20) {
                group.all_reduce_sum(&mut buf).expect("all-reduce");
            }
            let samples = (0..SAMPLES)
                .map(|_| {
                    barrier(group);
                    let start = Instant::now();
                    for _ in 0..iters {
                        group.all_reduce_sum(&mut buf).expect("all-reduce");
                    }
                    start.elapsed().as_secs_f64() / iters as f64
                })
                .collect();
            median(samples)
        })
        .collect()
}

/// (a) Kiln's MPI backend, one process per device.
fn mpi(launch: &Launch) {
    let world = MpiWorld::init(launch).unwrap_or_else(|e| panic!("{e}"));
    let (rank, n) = (world.rank(), world.size());
    let mut group = world.group(0, rank);
    let times = measure(&mut group, |g| {
        g.all_reduce_sum(&mut [0.0]).expect("barrier");
    });
    // The mean over the ranks, as nccl-tests reports by default.
    let mut mean: Vec<f32> = times.iter().map(|&t| t as f32).collect();
    group.all_reduce_sum(&mut mean).expect("all-reduce");
    if rank == 0 {
        header(&format!(
            "all_reduce_sum, Kiln MPI backend (MpiGroup), {n} processes"
        ));
        for (bytes, t) in sizes().into_iter().zip(mean) {
            row(bytes, t as f64 / n as f64, n);
        }
    }
}

/// (b) The in-process ring, two threads.
fn ring() {
    let n = 2;
    let barrier = Barrier::new(n);
    let times: Vec<Vec<f64>> = std::thread::scope(|s| {
        let handles: Vec<_> = cpu_ring(n)
            .into_iter()
            .map(|mut ring| {
                let barrier = &barrier;
                s.spawn(move || {
                    measure(&mut ring, |_| {
                        barrier.wait();
                    })
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    header(&format!(
        "all_reduce_sum, Kiln in-process ring (cpu_ring({n})), {n} threads"
    ));
    for (i, bytes) in sizes().into_iter().enumerate() {
        let slowest = times.iter().map(|t| t[i]).fold(0.0, f64::max);
        row(bytes, slowest, n);
    }
}

/// The median over samples of the mean time of `op`, in seconds, after a warm-up.
fn time(iters: usize, mut op: impl FnMut()) -> f64 {
    for _ in 0..iters.min(20) {
        op();
    }
    median(
        (0..SAMPLES)
            .map(|_| {
                let start = Instant::now();
                for _ in 0..iters {
                    op();
                }
                start.elapsed().as_secs_f64() / iters as f64
            })
            .collect(),
    )
}

/// (c) The ceiling: one thread copying the buffer into another it reuses; and, for comparison,
/// into a fresh allocation each time (`to_vec`, as `MpiGroup::all_reduce_sum` and
/// `CpuRing`'s sends do), which pays for the allocation and its page faults.
fn copy() {
    println!(
        "# memory bandwidth ceiling: one thread, dst.copy_from_slice(&src) into a reused dst;"
    );
    println!("# to_vec: the same copy into a fresh allocation each time");
    println!(
        "# {:>12} {:>10} {:>12} {:>10} {:>12} {:>10}",
        "size(B)", "count", "time(us)", "copy(GB/s)", "to_vec(us)", "(GB/s)"
    );
    for bytes in sizes() {
        let src = vec![1.0f32; bytes / 4];
        let mut dst = vec![0.0f32; bytes / 4];
        let iters = iterations(bytes);
        let reused = time(iters, || {
            dst.copy_from_slice(std::hint::black_box(&src));
            std::hint::black_box(&mut dst);
        });
        let fresh = time(iters, || {
            std::hint::black_box(std::hint::black_box(&src).to_vec());
        });
        println!(
            "  {:>12} {:>10} {:>12.2} {:>10.3} {:>12.2} {:>10.3}",
            bytes,
            bytes / 4,
            reused * 1e6,
            bytes as f64 / reused / 1e9,
            fresh * 1e6,
            bytes as f64 / fresh / 1e9
        );
    }
}

fn main() {
    let launch = Launch::from_env().unwrap_or_else(|e| panic!("{e}"));
    if launch.world > 1 {
        mpi(&launch);
    } else {
        ring();
        println!();
        copy();
    }
}
