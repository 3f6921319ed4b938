//! Collectives between the devices of a mesh. [`Collective`] is the interface the executor
//! programs against (an NCCL backend implements the same operations for GPUs); [`CpuRing`] is
//! the in-process implementation: one thread per device, tensors copied between them through
//! channels along a ring, as NCCL's ring algorithms move them.
//!
//! A device that fails drops its channels, so its neighbours' next send or receive fails
//! instead of waiting forever, and the failure travels around the ring.

use std::sync::mpsc::{channel, Receiver, Sender};

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
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError>;
    /// Every device ends with device `root`'s buffer.
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<(), CollectiveError>;
}

/// One device's end of a ring of `size` devices.
pub struct CpuRing {
    rank: usize,
    size: usize,
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
            to_next: senders[(rank + 1) % size]
                .take()
                .expect("one sender per device"),
            from_prev,
        })
        .collect()
}

impl CpuRing {
    fn send(&self, data: &[f32]) -> Result<(), CollectiveError> {
        self.to_next
            .send(data.to_vec())
            .map_err(|_| self.peer_gone())
    }

    fn recv(&self, len: usize) -> Result<Vec<f32>, CollectiveError> {
        let data = self.from_prev.recv().map_err(|_| self.peer_gone())?;
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

    /// The `size` chunks a buffer of `len` values is cut into (as even as possible).
    fn chunk(&self, len: usize, i: usize) -> std::ops::Range<usize> {
        let i = i % self.size;
        let (base, extra) = (len / self.size, len % self.size);
        let start = i * base + i.min(extra);
        start..start + base + usize::from(i < extra)
    }
}

impl Collective for CpuRing {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    /// Ring all-reduce: a reduce-scatter (after `size − 1` steps device r holds the full sum of
    /// chunk r + 1) and an all-gather passing the summed chunks on; each device sends and
    /// receives 2·(size − 1)/size of the buffer.
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<(), CollectiveError> {
        let (n, r) = (self.size, self.rank);
        for step in 0..n - 1 {
            let out = self.chunk(buf.len(), r + n - step);
            self.send(&buf[out])?;
            let inc = self.chunk(buf.len(), r + n - step - 1);
            let got = self.recv(inc.len())?;
            buf[inc].iter_mut().zip(got).for_each(|(a, b)| *a += b);
        }
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
