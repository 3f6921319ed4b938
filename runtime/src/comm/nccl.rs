//! NCCL communicators between GPUs, one process per GPU (cudarc's bindings, the ones dfdx's
//! CUDA device is built on). The processes find each other over MPI: NCCL needs a unique id
//! made by one of them to reach all the others before they can form a communicator, and NCCL
//! itself has no way to carry it, so it travels over the processes' MPI group.
//!
//! For now a group works on host buffers, as the [`Collective`] trait hands them over: each
//! operation copies the buffer to this process's GPU, runs NCCL there and copies the result
//! back, waiting for it. The CUDA runtime (a later issue) will hand NCCL the device buffers it
//! already holds instead of staging them through the host.
//!
//! CI has neither a GPU nor the CUDA toolkit: it only type-checks this module
//! (`--features nccl,ci-check`).

use super::mpi::MpiGroup;
use super::{block_len, Collective, CollectiveError};
use cudarc_nccl::driver::{CudaDevice, CudaSlice, DriverError};
use cudarc_nccl::nccl::{result::NcclError, Comm, Id, ReduceOp};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A communicator handed between threads. Sound because a group is used by one thread at a
/// time (every operation takes `&mut self`; the communicator is not shared, `Sync` is not
/// claimed), NCCL lets a communicator be called from any thread when calls are not concurrent,
/// and every operation first makes this process's GPU current on the calling thread.
struct Nccl(Comm);

unsafe impl Send for Nccl {}

/// A data, tensor or pipeline group as an NCCL communicator on this process's GPU.
pub struct NcclGroup {
    comm: Nccl,
    device: Arc<CudaDevice>,
    rank: usize,
    size: usize,
    busy: Duration,
}

impl NcclGroup {
    /// The NCCL communicator of the processes of MPI group `group`, ranked as they are there,
    /// on GPU `local_rank` of this node. Every process of the group must call this together.
    /// Rank 0 of the group makes NCCL's unique id and broadcasts its 128 bytes over MPI: the
    /// id must reach every rank before any of them can join the communicator. After an error
    /// the other ranks may still be waiting in NCCL for this one: abort the job
    /// ([`MpiWorld::abort`](super::mpi::MpiWorld::abort)).
    pub fn over_mpi(group: &MpiGroup, local_rank: usize) -> Result<Self, CollectiveError> {
        let (rank, size) = (group.rank(), group.size());
        let failed = |what: &str, e: String| {
            CollectiveError(format!("NCCL {what} failed on rank {rank} of {size}: {e}"))
        };
        let mut bytes = [0u8; 128];
        // Every rank takes part in the broadcast, even when rank 0 could not make an id: an
        // all-zero id tells the others to give up rather than wait for rank 0 forever.
        let made = if rank == 0 {
            Id::new().map(|id| {
                for (b, c) in bytes.iter_mut().zip(id.internal()) {
                    *b = *c as u8;
                }
            })
        } else {
            Ok(())
        };
        group.broadcast_bytes(&mut bytes, 0);
        made.map_err(|e| failed("making the unique id", nccl(e)))?;
        if bytes.iter().all(|&b| b == 0) {
            return Err(failed("making the unique id", "rank 0 has none".into()));
        }
        let id = Id::uninit(bytes.map(|b| b as std::ffi::c_char));
        let device = CudaDevice::new(local_rank)
            .map_err(|e| failed(&format!("opening GPU {local_rank}"), e.to_string()))?;
        device
            .bind_to_thread()
            .map_err(|e| failed("binding the GPU", e.to_string()))?;
        let comm = Comm::from_rank(device.clone(), rank, size, id)
            .map_err(|e| failed("joining the communicator", nccl(e)))?;
        Ok(NcclGroup {
            comm: Nccl(comm),
            device,
            rank,
            size,
            busy: Duration::ZERO,
        })
    }

    /// Runs `op` on this thread with the GPU current, timing it; its errors name `what` and
    /// this rank.
    fn timed<T>(
        &mut self,
        what: &str,
        op: impl FnOnce(&Comm, &Arc<CudaDevice>) -> Result<T, Failure>,
    ) -> Result<T, CollectiveError> {
        let start = Instant::now();
        let out = self
            .device
            .bind_to_thread()
            .map_err(Failure::Cuda)
            .and_then(|()| op(&self.comm.0, &self.device));
        self.busy += start.elapsed();
        out.map_err(|e| {
            let e = match e {
                Failure::Cuda(e) => e.to_string(),
                Failure::Nccl(e) => nccl(e),
            };
            CollectiveError(format!(
                "NCCL {what} failed on rank {} of {}: {e}",
                self.rank, self.size
            ))
        })
    }
}

/// What went wrong on the GPU: a copy or allocation, or NCCL's operation.
enum Failure {
    Cuda(DriverError),
    Nccl(NcclError),
}

impl From<DriverError> for Failure {
    fn from(e: DriverError) -> Self {
        Failure::Cuda(e)
    }
}

impl From<NcclError> for Failure {
    fn from(e: NcclError) -> Self {
        Failure::Nccl(e)
    }
}

/// NCCL's error code (cudarc's `NcclError` prints no more than its name).
fn nccl(e: NcclError) -> String {
    format!("{:?}", e.0)
}

/// `buf` on the device, padded with zeros to `len`.
fn staged(dev: &Arc<CudaDevice>, buf: &[f32], len: usize) -> Result<CudaSlice<f32>, Failure> {
    let mut padded = buf.to_vec();
    padded.resize(len, 0.0);
    Ok(dev.htod_sync_copy(&padded)?)
}

impl Collective for NcclGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn busy(&self) -> Duration {
        self.busy
    }

    // Every device passes buffers of the same length, so an empty one is empty everywhere and
    // every device skips the operation (CUDA allocates nothing of length zero).

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        if buf.is_empty() {
            return Ok(());
        }
        self.timed("all-reduce", |comm, dev| {
            let send = dev.htod_sync_copy(buf)?;
            let mut recv = dev.alloc_zeros::<f32>(buf.len())?;
            comm.all_reduce(&send, &mut recv, &ReduceOp::Sum)?;
            Ok(dev.dtoh_sync_copy_into(&recv, buf)?)
        })
    }

    fn reduce_scatter_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        if buf.is_empty() {
            return Ok(());
        }
        // NCCL's blocks are of equal length: padded to ⌈len/size⌉, block r is `block_shard`'s.
        let (size, mine) = (self.size, self.shard(buf.len()));
        let block = block_len(buf.len(), size);
        self.timed("reduce-scatter", |comm, dev| {
            let send = staged(dev, buf, block * size)?;
            let mut recv = dev.alloc_zeros::<f32>(block)?;
            comm.reduce_scatter(&send, &mut recv, &ReduceOp::Sum)?;
            let out = dev.dtoh_sync_copy(&recv)?;
            let n = mine.len();
            buf[mine].copy_from_slice(&out[..n]);
            Ok(())
        })
    }

    fn all_gather(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        if buf.is_empty() {
            return Ok(());
        }
        let (size, mine) = (self.size, self.shard(buf.len()));
        let block = block_len(buf.len(), size);
        self.timed("all-gather", |comm, dev| {
            let send = staged(dev, &buf[mine], block)?;
            let mut recv = dev.alloc_zeros::<f32>(block * size)?;
            comm.all_gather(&send, &mut recv)?;
            let out = dev.dtoh_sync_copy(&recv)?;
            let len = buf.len();
            buf.copy_from_slice(&out[..len]);
            Ok(())
        })
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        if buf.is_empty() {
            return Ok(());
        }
        let rank = self.rank;
        self.timed("broadcast", |comm, dev| {
            // Only the root's send buffer is read.
            let send = if rank == root {
                Some(dev.htod_sync_copy(buf)?)
            } else {
                None
            };
            let mut recv = dev.alloc_zeros::<f32>(buf.len())?;
            comm.broadcast(&send, &mut recv, root as i32)?;
            Ok(dev.dtoh_sync_copy_into(&recv, buf)?)
        })
    }
}
