//! The in-process collective: one thread per device, tensors copied between them through
//! channels along a ring, as NCCL's ring algorithms move them.
//!
//! A device that fails drops its channels, so its neighbours' next send or receive fails
//! instead of waiting forever, and the failure travels around the ring.

use super::{block_shard, Collective, CollectiveError};
use crate::memory;
use std::ops::Range;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::time::{Duration, Instant};

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

    /// Block `i` (mod `size`) of the buffer: the ring moves the blocks every backend owns.
    fn chunk(&self, len: usize, i: usize) -> Range<usize> {
        block_shard(len, self.size, i % self.size)
    }
}

impl Collective for CpuRing {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    fn busy(&self) -> Duration {
        self.busy
    }

    /// `size − 1` steps, each sending one block to the next device and adding the one received
    /// from the previous: (size − 1)/size of the buffer out and in per device. At step s device
    /// r sends block r − s − 1, so that the last block it completes is its own, block r.
    fn reduce_scatter_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        let (n, r) = (self.size, self.rank);
        for step in 0..n - 1 {
            let out = self.chunk(buf.len(), r + n - step - 1);
            self.send(&buf[out])?;
            let inc = self.chunk(buf.len(), r + n - step - 2);
            let got = self.recv(inc.len())?;
            buf[inc].iter_mut().zip(got).for_each(|(a, b)| *a += b);
        }
        Ok(())
    }

    /// The summed blocks passed on around the ring; with the reduce-scatter, a ring all-reduce
    /// (2·(size − 1)/size of the buffer out and in per device).
    fn all_gather(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        let (n, r) = (self.size, self.rank);
        for step in 0..n - 1 {
            let out = self.chunk(buf.len(), r + n - step);
            self.send(&buf[out])?;
            let inc = self.chunk(buf.len(), r + n - step - 1);
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
        for (rank, (shard, scattered, all)) in got.into_iter().enumerate() {
            assert_eq!(shard, block_shard(len, size, rank), "device r owns block r");
            assert_eq!(scattered, sum[shard.clone()].to_vec());
            assert_eq!(all, sum);
            shard.for_each(|i| covered[i] += 1);
        }
        assert_eq!(covered, vec![1; len]);
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
