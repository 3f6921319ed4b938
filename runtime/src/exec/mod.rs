//! The CPU executor: interprets the operator graph with dfdx on the CPU (GPUs run the graph
//! through `gpu::step`). Values live in a table of tape-less tensors (one per node); a single
//! gradient tape is threaded through the ops in topological order (put on the left operand,
//! split off the result), and `backward` on the loss yields gradients for every parameter the
//! ops touched.
//!
//! The core: `batch` (what a step feeds the graph), `value` (values passed between segments,
//! the parameters a device holds), `interpreter` (the values table and the tape threaded
//! through the ops), `segment` (a part of the graph run forward, then backward), `dropout`
//! (where masks are drawn from), `precision` (the number format a run computes in). `ops`
//! computes each op, one module per family of ops, on the CPU `kernels` or dfdx's ops;
//! `prompt` is the prompt PEFT saves for virtual tokens.

mod batch;
mod dropout;
mod interpreter;
pub(crate) mod kernels;
mod ops;
pub mod precision;
pub mod prompt;
mod segment;
mod value;

pub use batch::Batch;
pub use dropout::DropoutKey;
pub(crate) use dropout::{dropout_scale, dropout_threshold};
pub(crate) use ops::input::integer_input;
pub use ops::loss::label_counts;
pub(crate) use ops::loss::position_targets;
pub use segment::{forward_backward, Outcome, Segment, SegmentGrads};
pub use value::{Params, Value};

use dfdx::prelude::*;
use std::collections::BTreeMap;
use std::fmt;

/// The device the executor computes on.
pub type Dev = Cpu;

type Tape = OwnedTape<f32, Dev>;
type T0 = Tensor<(), f32, Dev>;
type T1 = Tensor<(usize,), f32, Dev>;
type T2 = Tensor<(usize, usize), f32, Dev>;
type T3 = Tensor<(usize, usize, usize), f32, Dev>;
type T3Taped = Tensor<(usize, usize, usize), f32, Dev, Tape>;

#[derive(Debug)]
pub struct ExecError(pub String);

impl fmt::Display for ExecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ExecError {}

fn err<T>(message: impl Into<String>) -> Result<T, ExecError> {
    Err(ExecError(message.into()))
}

/// Figures a loss reports beside its value, by name (PPO: its policy and value losses and how
/// often each was clipped).
pub type Stats = BTreeMap<&'static str, f32>;

/// Every figure a loss may report beside its value (PPO's parts of its loss and clip
/// fractions), so that processes can exchange them by position.
pub const STAT_NAMES: [&str; 5] = [
    "policy_loss",
    "value_loss",
    "clip_fraction",
    "value_clip_fraction",
    "approx_kl",
];
