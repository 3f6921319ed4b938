//! How devices talk: the [`Collective`] operations data, tensor and pipeline parallelism need,
//! and the [`Mailbox`] that carries a pipeline's activations and gradients between stages. The
//! executor programs against these alone; behind them:
//!
//! - `ring`: devices as threads of one process (`mesh = cpu(N)`), a ring of channels;
//! - `mpi` (feature `mpi`): one process per device over MPI, started by `mpirun` or `srun`;
//! - `nccl` (feature `nccl`): NCCL communicators between GPUs;
//! - `launch`: which process of which job this is, as the launcher says;
//! - `world`: the processes of a job, and what each of them hosts.
//!
//! Every backend leaves device r of a group owning block r of a reduce-scattered buffer
//! (`block_shard`: equal blocks, the last ones short), as MPI's and NCCL's reduce-scatter do,
//! so that what a device holds under ZeRO, and what a checkpoint records, does not depend on
//! the backend.

pub mod launch;
mod mailbox;
#[cfg(feature = "mpi")]
pub mod mpi;
#[cfg(feature = "nccl")]
pub mod nccl;
mod ring;
pub mod world;

pub use mailbox::{mailboxes, Mailbox, Payload, Post, Tag};
pub use ring::{cpu_ring, CpuRing};

use std::ops::Range;
use std::time::Duration;

#[derive(Debug)]
pub struct CollectiveError(pub String);

impl std::fmt::Display for CollectiveError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CollectiveError {}

/// The operations data parallelism and ZeRO need; every device of the group calls each one in the
/// same order with buffers of the same length.
pub trait Collective: Send {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Time this device has spent in the group's transfers, waiting for its peers included.
    fn busy(&self) -> Duration;
    /// Every device ends with the element-wise sum of all devices' buffers.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.reduce_scatter_sum(buf)?;
        self.all_gather(buf)
    }
    /// The part of a buffer of `len` values this device owns after a reduce-scatter.
    fn shard(&self, len: usize) -> Range<usize> {
        self.shard_of(len, self.rank())
    }
    /// The part of a buffer of `len` values device `rank` of the group owns: block `rank`, on
    /// every backend.
    fn shard_of(&self, len: usize, rank: usize) -> Range<usize> {
        block_shard(len, self.size(), rank)
    }
    /// This device's shard of `buf` becomes the sum of every device's shard; the rest of `buf`
    /// is left partially reduced.
    fn reduce_scatter_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError>;
    /// Every device ends with each device's shard of its own buffer.
    fn all_gather(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError>;
    /// Every device ends with device `root`'s buffer.
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CollectiveError>;
}

/// Block `rank` of a buffer of `len` values cut into `size` blocks of ⌈len/size⌉ (the last
/// ones short or empty): what device `rank` of a group owns after a reduce-scatter.
pub fn block_shard(len: usize, size: usize, rank: usize) -> Range<usize> {
    let block = block_len(len, size);
    let start = (rank * block).min(len);
    start..(start + block).min(len)
}

/// The length of each of `size` equal blocks of a buffer of `len` values, ⌈len/size⌉: what
/// engines with equal-block reduce-scatter and all-gather (MPI, NCCL) pad every block to.
pub fn block_len(len: usize, size: usize) -> usize {
    len.div_ceil(size.max(1))
}

#[cfg(test)]
mod tests {
    use super::block_shard;

    #[test]
    fn blocks_are_equal_padded_and_cover_the_buffer_in_rank_order() {
        assert_eq!(block_shard(10, 4, 0), 0..3);
        assert_eq!(block_shard(10, 4, 3), 9..10);
        assert_eq!(block_shard(2, 4, 3), 2..2);
        for (len, size) in [(0, 3), (7, 1), (7, 3), (9, 3), (5, 8)] {
            let mut next = 0;
            for rank in 0..size {
                let r = block_shard(len, size, rank);
                assert_eq!(r.start, next);
                next = r.end;
            }
            assert_eq!(next, len);
        }
    }
}
