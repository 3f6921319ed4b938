//! Kiln's kernels for NVIDIA GPUs, the fused operators of the CPU's `exec::kernels` written in
//! CUDA C: attention in FlashAttention's manner (causal, padding and prefix masks, grouped-query
//! heads, dropout drawn in the kernel as the CPU draws it), layer and RMS norm, the
//! activations, log-softmax at a target (cross-entropy and token log-probabilities), rounding
//! to the run's number format, and AdamW.
//!
//! They are compiled at run time by NVRTC (loaded as a library, so one binary builds without
//! the CUDA toolkit and compiles for whatever GPU it finds), and run where no GPU is under a
//! host emulation of CUDA's threads (`emulation.h`), so that each is tested against the CPU
//! path in every test run (`parity`, which `kiln gpu-check` runs on a GPU). By concern:
//! `source` (the CUDA C and what each file defines), `nvrtc` (compiling it to PTX), `launch`
//! (device buffers, the `Launcher` that runs a kernel by name, and one typed call per kernel
//! that checks its buffers and picks its grid), `memory` (buffers made on and read back from a
//! device), `cuda` (the driver: a GPU that launches the kernels and holds their buffers).

pub mod cuda;
pub mod gemm;
#[macro_use]
pub mod launch;
pub mod memory;
pub mod nvrtc;
pub mod parity;
pub mod source;
pub mod step;
pub mod tensor_ops;

#[cfg(test)]
pub(crate) mod emulator;
#[cfg(test)]
mod tests;

use crate::exec::precision::Format;
use crate::exec::{Batch, ExecError};
use crate::tensor::HostTensor;
use kiln_compiler::graph::Graph;
use std::fmt;

/// A device Kiln computes on: it launches the kernels, holds their buffers and multiplies
/// matrices (a GPU, or the host emulation in tests).
pub trait Device: launch::Launcher + memory::Memory + gemm::Gemm {}

impl<D: launch::Launcher + memory::Memory + gemm::Gemm> Device for D {}

/// Why a GPU operation failed: a compile log, a driver error, buffers that do not fit a
/// kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuError(pub String);

impl fmt::Display for GpuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for GpuError {}

/// What a mesh device runs its steps on when it is not the CPU executor: a GPU, or in tests the
/// host emulation of one.
pub enum Accelerator {
    Cuda(cuda::CudaDevice),
    #[cfg(test)]
    Emulated(&'static emulator::Emulator),
}

impl Accelerator {
    /// Microbatches' forward and backward over the whole graph, their gradients summed
    /// (`step::forward_backward`).
    pub fn forward_backward(
        &self,
        g: &Graph,
        values: &[HostTensor],
        batches: &[Batch],
        format: Format,
        upstream: f32,
    ) -> Result<step::Microbatches, ExecError> {
        match self {
            Accelerator::Cuda(d) => step::forward_backward(d, g, values, batches, format, upstream),
            #[cfg(test)]
            Accelerator::Emulated(d) => {
                step::forward_backward(*d, g, values, batches, format, upstream)
            }
        }
    }

    /// Each batch's loss, forward only (`step::losses`: evaluation).
    pub fn losses(
        &self,
        g: &Graph,
        values: &[HostTensor],
        batches: &[Batch],
        format: Format,
    ) -> Result<Vec<f32>, ExecError> {
        match self {
            Accelerator::Cuda(d) => step::losses(d, g, values, batches, format),
            #[cfg(test)]
            Accelerator::Emulated(d) => step::losses(*d, g, values, batches, format),
        }
    }

    /// The device, for reports.
    pub fn describe(&self) -> String {
        match self {
            Accelerator::Cuda(d) => format!(
                "{} (compute capability {}.{})",
                d.name, d.capability.0, d.capability.1
            ),
            #[cfg(test)]
            Accelerator::Emulated(_) => "the host emulation of a GPU".into(),
        }
    }
}
