//! One process per device over MPI (rsmpi over the system's Open MPI or MPICH): the job that
//! `mpirun` or `srun` started, its groups as MPI sub-communicators, and pipeline messages as
//! MPI point-to-point messages.
//!
//! MPI is initialised with `MPI_THREAD_MULTIPLE`: a device's step runs on its own thread, and
//! each process keeps one more, its postman, always receiving pipeline messages into the
//! device's inbox. Because every message is received as soon as it arrives, a blocking send
//! never waits on a receiver that is itself busy sending (two stages exchanging activations and
//! gradients would otherwise deadlock on messages too large for MPI's eager protocol).

use super::launch::Launch;
use super::mailbox::{Mailbox, Post, Tag};
use super::{block_len, Collective, CollectiveError, Payload};
use crate::tensor::HostTensor;
use mpi::collective::SystemOperation;
use mpi::environment::{Threading, Universe};
use mpi::point_to_point::{Destination, MatchedReceiveVec, Source};
use mpi::topology::{Color, Communicator, SimpleCommunicator};
use mpi::traits::*;
use std::sync::atomic::AtomicBool;
use std::sync::mpsc::{channel, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A communicator handed between threads. Sound because MPI was initialised with
/// `MPI_THREAD_MULTIPLE`: any thread may call MPI on any communicator.
struct Comm(SimpleCommunicator);

unsafe impl Send for Comm {}
unsafe impl Sync for Comm {}

/// This process's membership of an MPI job; MPI is finalised when it is dropped.
pub struct MpiWorld {
    world: SimpleCommunicator,
    // Dropped last: `MPI_Finalize`.
    _universe: Universe,
}

impl MpiWorld {
    /// Joins the job `launch` describes; refused when MPI does not see the launcher's processes
    /// (a job whose processes started without an MPI launcher, such as torchrun's) or cannot
    /// serve threads.
    pub fn init(launch: &Launch) -> Result<Self, String> {
        let (universe, provided) = mpi::initialize_with_threading(Threading::Multiple)
            .ok_or("MPI was initialised twice in one process")?;
        let world = universe.world();
        if provided != Threading::Multiple {
            return Err(format!(
                "the MPI library serves threads at level {provided:?}; Kiln's processes need MPI_THREAD_MULTIPLE (Open MPI and MPICH provide it)"
            ));
        }
        let size = world.size() as usize;
        if size != launch.world {
            let launcher = launch
                .launcher
                .map_or("the launcher".into(), |l| l.to_string());
            return Err(format!(
                "{launcher} started {} processes but MPI sees a job of {size}: start kiln's processes with `mpirun -np {0}` or `srun -n {0}` (torchrun's processes share no MPI job; on CPUs they need one)",
                launch.world
            ));
        }
        Ok(MpiWorld {
            world,
            _universe: universe,
        })
    }

    pub fn rank(&self) -> usize {
        self.world.rank() as usize
    }

    pub fn size(&self) -> usize {
        self.world.size() as usize
    }

    /// The group of the processes that pass the same `color`, ranked by `key`. Every process
    /// of the job must call this, in the same order as the others.
    pub fn group(&self, color: usize, key: usize) -> MpiGroup {
        let comm = self
            .world
            .split_by_color_with_key(Color::with_value(color as i32), key as i32)
            .expect("a process with a colour belongs to its group");
        MpiGroup {
            rank: comm.rank() as usize,
            size: comm.size() as usize,
            comm: Comm(comm),
            busy: Duration::ZERO,
            padded: Vec::new(),
        }
    }

    /// This process's device's mailbox to the devices of every process (`failed`: raised when
    /// this process's device fails). Every process of the job must call this, in the same order.
    pub fn mailbox(&self, failed: &Arc<AtomicBool>) -> Mailbox {
        let comm = Arc::new(Comm(self.world.duplicate()));
        let rank = self.rank();
        let (deliver, inbox) = channel();
        let postman = {
            let comm = Arc::clone(&comm);
            std::thread::spawn(move || deliver_messages(&comm.0, &deliver))
        };
        let post = MpiPost {
            comm,
            rank,
            postman: Some(postman),
        };
        Mailbox::new(rank, Box::new(post), inbox, failed)
    }

    /// Ends every process of the job: this one failed, and the others would wait for it.
    pub fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}

/// A data, tensor or pipeline group as an MPI communicator.
pub struct MpiGroup {
    comm: Comm,
    rank: usize,
    size: usize,
    busy: Duration,
    /// Scratch for reduce-scatter and all-gather, whose blocks MPI wants of equal length.
    padded: Vec<f32>,
}

impl MpiGroup {
    /// Every process of the group ends with process `root`'s `bytes` (NCCL's unique id).
    #[cfg(feature = "nccl")]
    pub(crate) fn broadcast_bytes(&self, bytes: &mut [u8], root: usize) {
        self.comm
            .0
            .process_at_rank(root as i32)
            .broadcast_into(bytes);
    }

    fn timed<T>(&mut self, op: impl FnOnce(&SimpleCommunicator, &mut Vec<f32>) -> T) -> T {
        let start = Instant::now();
        let out = op(&self.comm.0, &mut self.padded);
        self.busy += start.elapsed();
        out
    }
}

impl Collective for MpiGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn busy(&self) -> Duration {
        self.busy
    }

    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        // Sent from the group's reused scratch: a fresh copy per call costs page faults.
        self.timed(|comm, send| {
            send.clear();
            send.extend_from_slice(buf);
            comm.all_reduce_into(&send[..], buf, SystemOperation::sum());
        });
        Ok(())
    }

    fn reduce_scatter_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        let (size, mine) = (self.size, self.shard(buf.len()));
        let block = block_len(buf.len(), size);
        self.timed(|comm, padded| {
            padded.clear();
            padded.extend_from_slice(buf);
            padded.resize(block * size, 0.0);
            let mut out = vec![0.0f32; block];
            comm.reduce_scatter_block_into(&padded[..], &mut out[..], SystemOperation::sum());
            let n = mine.len();
            buf[mine].copy_from_slice(&out[..n]);
        });
        Ok(())
    }

    fn all_gather(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        let (size, mine) = (self.size, self.shard(buf.len()));
        let block = block_len(buf.len(), size);
        self.timed(|comm, padded| {
            let mut own = buf[mine].to_vec();
            own.resize(block, 0.0);
            padded.clear();
            padded.resize(block * size, 0.0);
            comm.all_gather_into(&own[..], &mut padded[..]);
            let len = buf.len();
            buf.copy_from_slice(&padded[..len]);
        });
        Ok(())
    }

    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        self.timed(|comm, _| comm.process_at_rank(root as i32).broadcast_into(buf));
        Ok(())
    }
}

/// The MPI tag of pipeline messages; Kiln's own [`Tag`] travels inside them.
const MESSAGE: i32 = 1;
/// Sent by a process to its own postman when its mailbox closes.
const STOP: i32 = 2;

/// A device's outgoing pipeline messages, and the postman receiving its incoming ones.
struct MpiPost {
    comm: Arc<Comm>,
    rank: usize,
    postman: Option<JoinHandle<()>>,
}

impl Post for MpiPost {
    fn post(&self, to: usize, tag: Tag, value: HostTensor) -> Result<(), String> {
        let bytes = encode(tag, &value);
        self.comm
            .0
            .process_at_rank(to as i32)
            .send_with_tag(&bytes[..], MESSAGE);
        Ok(())
    }
}

impl Drop for MpiPost {
    fn drop(&mut self) {
        let empty: [u8; 0] = [];
        self.comm
            .0
            .process_at_rank(self.rank as i32)
            .send_with_tag(&empty[..], STOP);
        if let Some(postman) = self.postman.take() {
            postman.join().ok();
        }
    }
}

/// The postman: receives every pipeline message sent to this process, in arrival order, until
/// its own process says stop. It polls rather than blocks in a probe, because a blocking probe
/// spins MPI's progress engine and would take a core from the device's computation; it sleeps
/// between polls, longer the longer nothing arrives (up to `IDLE_POLL`).
fn deliver_messages(comm: &SimpleCommunicator, deliver: &Sender<(Tag, HostTensor)>) {
    let mut idle = Duration::ZERO;
    loop {
        let Some(probed) = comm.any_process().immediate_matched_probe() else {
            idle = (idle * 2).clamp(Duration::from_micros(20), IDLE_POLL);
            std::thread::sleep(idle);
            continue;
        };
        idle = Duration::ZERO;
        let stop = probed.1.tag() == STOP;
        let (bytes, _) = probed.matched_receive_vec::<u8>();
        if stop {
            return;
        }
        // A mailbox already closed has nobody left to deliver to.
        if let Some(decoded) = decode(&bytes) {
            deliver.send(decoded).ok();
        }
    }
}

/// The longest the postman sleeps between polls: small beside a pipeline stage's compute.
const IDLE_POLL: Duration = Duration::from_micros(500);

/// A message as bytes: the tag's six fields, the shape's length and dimensions (u64, little
/// endian), then the values (f32).
fn encode(tag: Tag, value: &HostTensor) -> Vec<u8> {
    let payload = match tag.payload {
        Payload::Activation => 0,
        Payload::Gradient => 1,
    };
    let header = [
        payload,
        tag.microbatch,
        tag.node,
        tag.from,
        tag.to,
        tag.sender,
        value.shape.len(),
    ];
    let mut bytes =
        Vec::with_capacity(8 * (header.len() + value.shape.len()) + 4 * value.data.len());
    for n in header.into_iter().chain(value.shape.iter().copied()) {
        bytes.extend_from_slice(&(n as u64).to_le_bytes());
    }
    for x in &value.data {
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    bytes
}

fn decode(bytes: &[u8]) -> Option<(Tag, HostTensor)> {
    let word = |i: usize| -> Option<usize> {
        let b = bytes.get(8 * i..8 * i + 8)?;
        Some(u64::from_le_bytes(b.try_into().ok()?) as usize)
    };
    let payload = match word(0)? {
        0 => Payload::Activation,
        _ => Payload::Gradient,
    };
    let tag = Tag {
        payload,
        microbatch: word(1)?,
        node: word(2)?,
        from: word(3)?,
        to: word(4)?,
        sender: word(5)?,
    };
    let dims = word(6)?;
    let shape = (0..dims).map(|d| word(7 + d)).collect::<Option<Vec<_>>>()?;
    let data = bytes
        .get(8 * (7 + dims)..)?
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Some((tag, HostTensor { shape, data }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_message_reads_back_as_it_was_sent() {
        let tag = Tag {
            payload: Payload::Gradient,
            microbatch: 3,
            node: 41,
            from: 2,
            to: 1,
            sender: 5,
        };
        let value = HostTensor {
            shape: vec![2, 3],
            data: vec![1.0, -2.5, 3.25, f32::MIN_POSITIVE, 0.0, 7.0],
        };
        let (t, v) = decode(&encode(tag, &value)).unwrap();
        assert_eq!(t, tag);
        assert_eq!(v.shape, value.shape);
        assert_eq!(v.data, value.data);
    }
}
