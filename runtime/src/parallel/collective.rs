//! Collectives between the devices of a mesh. [`Collective`] is the interface the executor
//! programs against (an NCCL backend implements the same operations for GPUs); [`CpuRing`] is
//! the in-process implementation: one thread per device, tensors copied between them through
//! channels along a ring, as NCCL's ring algorithms move them.
//!
//! A device that fails drops its channels, so its neighbours' next send or receive fails
//! instead of waiting forever, and the failure travels around the ring.
//!
//! [`Mailbox`] is the point-to-point half (pipeline stages sending activations and gradients):
//! tagged messages, received by tag whatever order they arrive in.

use crate::memory;
use crate::tensor::HostTensor;
use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    /// Every device ends with the element-wise sum of all devices' buffers.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        self.reduce_scatter_sum(buf)?;
        self.all_gather(buf)
    }
    /// The part of a buffer of `len` values this device owns after a reduce-scatter.
    fn shard(&self, len: usize) -> Range<usize> {
        self.shard_of(len, self.rank())
    }
    /// The part of a buffer of `len` values device `rank` of the group owns.
    fn shard_of(&self, len: usize, rank: usize) -> Range<usize>;
    /// This device's shard of `buf` becomes the sum of every device's shard; the rest of `buf`
    /// is left partially reduced.
    fn reduce_scatter_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError>;
    /// Every device ends with each device's shard of its own buffer.
    fn all_gather(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError>;
    /// Every device ends with device `root`'s buffer.
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CollectiveError>;
}

/// One device's end of a ring of `size` devices.
pub struct CpuRing {
    rank: usize,
    size: usize,
    /// Time spent sending and waiting to receive, for the benchmark's collective overhead.
    busy: Duration,
    to_next: Sender<Vec<f32>>,
    from_prev: Receiver<Vec<f32>>,
}

/// The ring's devices, in rank order; give each to its own thread.
pub fn cpu_ring(size: usize) -> Vec<CpuRing> {
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..size).map(|_| channel()).unzip();
    // Device r sends into channel r + 1 and receives from channel r.
    let mut senders: Vec<Option<Sender<Vec<f32>>>> = senders.into_iter().map(Some).collect();
    receivers
        .into_iter()
        .enumerate()
        .map(|(rank, from_prev)| CpuRing {
            rank,
            size,
            busy: Duration::ZERO,
            to_next: senders[(rank + 1) % size]
                .take()
                .expect("one sender per device"),
            from_prev,
        })
        .collect()
}

impl CpuRing {
    /// Time this device has spent in the ring's transfers (including waiting for its peers).
    pub fn busy(&self) -> Duration {
        self.busy
    }

    fn send(&mut self, data: &[f32]) -> Result<(), CollectiveError> {
        let start = Instant::now();
        let message = data.to_vec();
        let bytes = message.capacity() * std::mem::size_of::<f32>();
        let sent = self.to_next.send(message);
        self.busy += start.elapsed();
        sent.map_err(|_| self.peer_gone())?;
        memory::hand_over(bytes);
        Ok(())
    }

    fn recv(&mut self, len: usize) -> Result<Vec<f32>, CollectiveError> {
        let start = Instant::now();
        let got = self.from_prev.recv();
        self.busy += start.elapsed();
        let data = got.map_err(|_| self.peer_gone())?;
        memory::take_over(data.capacity() * std::mem::size_of::<f32>());
        if data.len() != len {
            return Err(CollectiveError(format!(
                "device {} expected {len} values from its neighbour and got {}",
                self.rank,
                data.len()
            )));
        }
        Ok(data)
    }

    fn peer_gone(&self) -> CollectiveError {
        CollectiveError(format!(
            "device {}: a neighbouring device stopped during a collective",
            self.rank
        ))
    }

    fn chunk(&self, len: usize, i: usize) -> Range<usize> {
        ring_chunk(len, self.size, i)
    }
}

/// Chunk `i` (mod `size`) of the `size` chunks a buffer of `len` values is cut into (as even as
/// possible).
fn ring_chunk(len: usize, size: usize, i: usize) -> Range<usize> {
    let i = i % size;
    let (base, extra) = (len / size, len % size);
    let start = i * base + i.min(extra);
    start..start + base + usize::from(i < extra)
}

/// The shard of a buffer of `len` values that device `rank` of a ring of `size` owns after a
/// reduce-scatter ([`Collective::shard`]), for those who lay out state outside the ring.
pub fn ring_shard(len: usize, size: usize, rank: usize) -> Range<usize> {
    ring_chunk(len, size, rank + 1)
}

impl Collective for CpuRing {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    /// After the ring reduce-scatter device r holds the full sum of chunk r + 1.
    fn shard_of(&self, len: usize, rank: usize) -> Range<usize> {
        ring_shard(len, self.size, rank)
    }

    /// `size − 1` steps, each sending one chunk to the next device and adding the one received
    /// from the previous: (size − 1)/size of the buffer out and in per device.
    fn reduce_scatter_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        let (n, r) = (self.size, self.rank);
        for step in 0..n - 1 {
            let out = self.chunk(buf.len(), r + n - step);
            self.send(&buf[out])?;
            let inc = self.chunk(buf.len(), r + n - step - 1);
            let got = self.recv(inc.len())?;
            buf[inc].iter_mut().zip(got).for_each(|(a, b)| *a += b);
        }
        Ok(())
    }

    /// The summed chunks passed on around the ring; with the reduce-scatter, a ring all-reduce
    /// (2·(size − 1)/size of the buffer out and in per device).
    fn all_gather(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        let (n, r) = (self.size, self.rank);
        for step in 0..n - 1 {
            let out = self.chunk(buf.len(), r + 1 + n - step);
            self.send(&buf[out])?;
            let inc = self.chunk(buf.len(), r + n - step);
            let got = self.recv(inc.len())?;
            buf[inc].copy_from_slice(&got);
        }
        Ok(())
    }

    /// Passed along the ring from `root`; the device before `root` is the last to receive.
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CollectiveError> {
        if self.size == 1 {
            return Ok(());
        }
        if self.rank != root {
            let got = self.recv(buf.len())?;
            buf.copy_from_slice(&got);
        }
        if (self.rank + 1) % self.size != root {
            self.send(buf)?;
        }
        Ok(())
    }
}

/// What a point-to-point message carries: activations forward, gradients backward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Payload {
    Activation,
    Gradient,
}

/// Identifies a message: which value (`node`) of which microbatch, between which virtual
/// pipeline stages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Tag {
    pub payload: Payload,
    pub microbatch: usize,
    pub node: usize,
    /// The virtual stages it goes between.
    pub from: usize,
    pub to: usize,
    /// The device that sent it (a device may receive one value from several).
    pub sender: usize,
}

/// One device's point-to-point endpoint to every device of the mesh (stage boundaries). Sends never block; a receive waits for its tag, keeping messages that arrive
/// early, and gives up when any device of the mesh has raised the `failed` flag (every device
/// does when it fails or panics).
pub struct Mailbox {
    rank: usize,
    peers: Vec<Sender<(Tag, HostTensor)>>,
    inbox: Receiver<(Tag, HostTensor)>,
    early: BTreeMap<Tag, HostTensor>,
    failed: Arc<AtomicBool>,
    busy: Duration,
}

/// The group's mailboxes, in rank order; `failed` is raised by any device that stops.
pub fn mailboxes(size: usize, failed: &Arc<AtomicBool>) -> Vec<Mailbox> {
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..size).map(|_| channel()).unzip();
    receivers
        .into_iter()
        .enumerate()
        .map(|(rank, inbox)| Mailbox {
            rank,
            peers: senders.clone(),
            inbox,
            early: BTreeMap::new(),
            failed: Arc::clone(failed),
            busy: Duration::ZERO,
        })
        .collect()
}

impl Mailbox {
    pub fn send(&self, to: usize, tag: Tag, value: HostTensor) -> Result<(), CollectiveError> {
        let bytes = value.heap_bytes();
        self.peers[to].send((tag, value)).map_err(|_| {
            CollectiveError(format!(
                "device {}: peer device {to} stopped before receiving",
                self.rank
            ))
        })?;
        memory::hand_over(bytes);
        Ok(())
    }

    /// Time this device has spent waiting for messages.
    pub fn busy(&self) -> Duration {
        self.busy
    }

    pub fn recv(&mut self, tag: Tag) -> Result<HostTensor, CollectiveError> {
        if let Some(v) = self.early.remove(&tag) {
            return Ok(v);
        }
        let start = Instant::now();
        let got = self.wait_for(tag);
        self.busy += start.elapsed();
        got
    }

    fn wait_for(&mut self, tag: Tag) -> Result<HostTensor, CollectiveError> {
        loop {
            if self.failed.load(Ordering::SeqCst) {
                return Err(CollectiveError(format!(
                    "device {}: another device failed while this one waited for {tag:?}",
                    self.rank
                )));
            }
            match self.inbox.recv_timeout(Duration::from_millis(20)) {
                Ok((t, v)) => {
                    memory::take_over(v.heap_bytes());
                    if t == tag {
                        return Ok(v);
                    }
                    self.early.insert(t, v);
                }
                Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => {
                    return Err(CollectiveError(format!(
                        "device {}: its pipeline peers stopped",
                        self.rank
                    )))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn all_reduce(size: usize, len: usize) -> Vec<Vec<f32>> {
        std::thread::scope(|s| {
            let handles: Vec<_> = cpu_ring(size)
                .into_iter()
                .map(|mut ring| {
                    s.spawn(move || {
                        let r = ring.rank() as f32;
                        let mut buf: Vec<f32> = (0..len).map(|i| r * 1000.0 + i as f32).collect();
                        ring.all_reduce_sum(&mut buf).unwrap();
                        buf
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        })
    }

    #[test]
    fn every_device_gets_the_sum() {
        for (size, len) in [(1, 5), (2, 7), (3, 10), (4, 3), (5, 2)] {
            let expected: Vec<f32> = (0..len)
                .map(|i| (0..size).map(|r| r as f32 * 1000.0 + i as f32).sum())
                .collect();
            for (rank, got) in all_reduce(size, len).into_iter().enumerate() {
                assert_eq!(got, expected, "size {size}, len {len}, device {rank}");
            }
        }
    }

    #[test]
    fn reduce_scatter_then_all_gather_is_an_all_reduce_and_shards_cover_the_buffer() {
        let (size, len) = (3, 10);
        let got: Vec<(Range<usize>, Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
            let handles: Vec<_> = cpu_ring(size)
                .into_iter()
                .map(|mut ring| {
                    s.spawn(move || {
                        let r = ring.rank() as f32;
                        let mut buf: Vec<f32> = (0..len).map(|i| r * 100.0 + i as f32).collect();
                        ring.reduce_scatter_sum(&mut buf).unwrap();
                        let shard = ring.shard(len);
                        let scattered = buf[shard.clone()].to_vec();
                        ring.all_gather(&mut buf).unwrap();
                        (shard, scattered, buf)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let sum: Vec<f32> = (0..len).map(|i| 300.0 + 3.0 * i as f32).collect();
        let mut covered = vec![0; len];
        for (shard, scattered, all) in got {
            assert_eq!(scattered, sum[shard.clone()].to_vec());
            assert_eq!(all, sum);
            shard.for_each(|i| covered[i] += 1);
        }
        assert_eq!(covered, vec![1; len]);
    }

    #[test]
    fn mailbox_receives_by_tag_in_any_order() {
        let failed = Arc::new(AtomicBool::new(false));
        let mut boxes = mailboxes(2, &failed);
        let tag = |microbatch| Tag {
            payload: Payload::Activation,
            microbatch,
            node: 7,
            from: 0,
            to: 1,
            sender: 0,
        };
        boxes[0].send(1, tag(0), HostTensor::scalar(0.0)).unwrap();
        boxes[0].send(1, tag(1), HostTensor::scalar(1.0)).unwrap();
        assert_eq!(boxes[1].recv(tag(1)).unwrap().data, vec![1.0]);
        assert_eq!(boxes[1].recv(tag(0)).unwrap().data, vec![0.0]);
        failed.store(true, Ordering::SeqCst);
        assert!(
            boxes[1].recv(tag(2)).is_err(),
            "a failed mesh must not hang a receive"
        );
    }

    #[test]
    fn broadcast_copies_the_root_buffer_everywhere() {
        for root in 0..3 {
            let got: Vec<Vec<f32>> = std::thread::scope(|s| {
                let handles: Vec<_> = cpu_ring(3)
                    .into_iter()
                    .map(|mut ring| {
                        s.spawn(move || {
                            let mut buf = vec![ring.rank() as f32; 4];
                            ring.broadcast(&mut buf, root).unwrap();
                            buf
                        })
                    })
                    .collect();
                handles.into_iter().map(|h| h.join().unwrap()).collect()
            });
            assert!(
                got.iter().all(|b| *b == vec![root as f32; 4]),
                "root {root}: {got:?}"
            );
        }
    }

    #[test]
    fn a_device_that_stops_fails_its_neighbours_instead_of_hanging() {
        let results: Vec<Result<(), CollectiveError>> = std::thread::scope(|s| {
            let handles: Vec<_> = cpu_ring(3)
                .into_iter()
                .map(|mut ring| {
                    s.spawn(move || {
                        if ring.rank() == 1 {
                            return Err(CollectiveError("device 1 failed".into()));
                        }
                        ring.all_reduce_sum(&mut [1.0; 6])
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert!(results.iter().all(Result::is_err));
    }
}
