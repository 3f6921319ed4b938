//! CPU kernels for the executor's hot operators, recorded on dfdx's tape like dfdx's own ops:
//! dense products on gemm's AVX-512 path (dfdx 0.13's gemm stops at AVX2: 2.8x fewer FLOP/s on
//! this machine's cores), and fused, multithreaded attention, layer norm, tanh-GELU,
//! cross-entropy and token log-probabilities (dfdx runs each as a chain of single-threaded
//! elementwise kernels that each allocate a result). Reductions are summed in a fixed order, so
//! a step is bit-reproducible.
//! The CUDA build uses dfdx's ops instead.
//!
//! By family, each with its tests against the same computation in dfdx's ops: `linear`,
//! `attention`, `norm`, `activation`, `dropout`, `cross_entropy` (with token log-probabilities),
//! `round` (to the run's number format);
//! beneath them `buffer` (dfdx's buffers, fixed-order sums), `product` (gemm) and `math`
//! (vectorizable exp, tanh, erf).

mod activation;
mod attention;
mod buffer;
mod cross_entropy;
mod dropout;
mod linear;
mod math;
mod norm;
mod product;
mod round;
pub(crate) mod testing;

pub use activation::{activation, Activation};
pub use attention::{attention, Heads};
pub use cross_entropy::{cross_entropy, token_log_probs};
pub use dropout::dropout;
pub use linear::{columns, linear, Vector, Weight};
pub use norm::{norm, Centring};
pub use round::rounded;

use dfdx::prelude::*;
use dfdx::tensor::Cpu;

type Tape = OwnedTape<f32, Cpu>;
type Taped<S> = Tensor<S, f32, Cpu, Tape>;
type R3 = (usize, usize, usize);

/// Elements per parallel task in elementwise loops: large enough to amortise scheduling.
const CHUNK: usize = 1 << 14;
