//! The runtime's host-side tensor: what checkpoints hold, devices exchange and the executor
//! takes its parameters from.

use kiln_compiler::graph::Param;

/// A tensor in host memory, row-major, as f32 (what the CPU executor computes in).
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// A parameter's shape as host tensors index it.
pub fn param_shape(p: &Param) -> Vec<usize> {
    p.shape.iter().map(|&d| d as usize).collect()
}

impl HostTensor {
    /// A rank-0 tensor.
    pub fn scalar(value: f32) -> Self {
        HostTensor {
            shape: Vec::new(),
            data: vec![value],
        }
    }

    /// Bytes it holds on the heap.
    pub fn heap_bytes(&self) -> usize {
        self.data.capacity() * std::mem::size_of::<f32>()
            + self.shape.capacity() * std::mem::size_of::<usize>()
    }

    /// No value: a parameter this device does not hold.
    pub fn absent() -> Self {
        HostTensor {
            shape: Vec::new(),
            data: Vec::new(),
        }
    }
}
