//! The point-to-point half: pipeline stages sending activations and gradients. Messages are
//! tagged and received by tag, whatever order they arrive in. Every backend delivers into the
//! same inbox (a channel), so the receiving side is one piece of code; how a message leaves is
//! the backend's [`Post`].

use super::CollectiveError;
use crate::memory;
use crate::tensor::HostTensor;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

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

/// How a device's messages leave it: into another thread's inbox, or over MPI to another
/// process (whose receiving thread puts them in that process's inbox).
pub trait Post: Send {
    fn post(&self, to: usize, tag: Tag, value: HostTensor) -> Result<(), String>;
}

/// One device's point-to-point endpoint to every device of the mesh. Sends never wait for the
/// receiver; a receive waits for its tag, keeping messages that arrive early, and gives up when
/// any device of this process has raised the `failed` flag (every device does when it fails or
/// panics; a process that fails ends the whole job, which its launcher sees to).
pub struct Mailbox {
    rank: usize,
    post: Box<dyn Post>,
    inbox: Receiver<(Tag, HostTensor)>,
    early: BTreeMap<Tag, HostTensor>,
    failed: Arc<AtomicBool>,
    busy: Duration,
}

/// In-process delivery: straight into the receiving thread's inbox.
struct Channels(Vec<Sender<(Tag, HostTensor)>>);

impl Post for Channels {
    fn post(&self, to: usize, tag: Tag, value: HostTensor) -> Result<(), String> {
        let bytes = value.heap_bytes();
        self.0[to]
            .send((tag, value))
            .map_err(|_| format!("peer device {to} stopped before receiving"))?;
        memory::hand_over(bytes);
        Ok(())
    }
}

/// The mailboxes of devices that are threads of one process, in rank order; `failed` is raised
/// by any device that stops.
pub fn mailboxes(size: usize, failed: &Arc<AtomicBool>) -> Vec<Mailbox> {
    let (senders, receivers): (Vec<_>, Vec<_>) = (0..size).map(|_| channel()).unzip();
    receivers
        .into_iter()
        .enumerate()
        .map(|(rank, inbox)| Mailbox::new(rank, Box::new(Channels(senders.clone())), inbox, failed))
        .collect()
}

impl Mailbox {
    /// Device `rank`'s mailbox: messages leave through `post` and arrive in `inbox`.
    pub fn new(
        rank: usize,
        post: Box<dyn Post>,
        inbox: Receiver<(Tag, HostTensor)>,
        failed: &Arc<AtomicBool>,
    ) -> Self {
        Mailbox {
            rank,
            post,
            inbox,
            early: BTreeMap::new(),
            failed: Arc::clone(failed),
            busy: Duration::ZERO,
        }
    }

    pub fn send(&self, to: usize, tag: Tag, value: HostTensor) -> Result<(), CollectiveError> {
        self.post
            .post(to, tag, value)
            .map_err(|e| CollectiveError(format!("device {}: {e}", self.rank)))
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
}
