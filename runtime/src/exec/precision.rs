//! The number format a run computes in (`train.precision`), as a GPU run in mixed precision
//! rounds, so that the CPU executes it too and its numerics are tested where no GPU is:
//! Megatron-style bf16 or fp16 — the working copy of every parameter is rounded from its f32
//! master each step; each matrix product (linear layers, attention) reads rounded operands and
//! yields a rounded result, and what flows back into them is rounded likewise; norms, softmax,
//! the loss, parameter gradients (summed over microbatches and devices), the optimizer and its
//! master weights stay f32. TF32 changes only the inputs of tensor-core products, to 10-bit
//! mantissas; the CPU computes those in f32.

use kiln_compiler::spec::Precision;
use rayon::prelude::*;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Format {
    #[default]
    F32,
    Bf16,
    F16,
}

impl Format {
    /// The format a run of `precision` computes in.
    pub fn of(precision: Precision) -> Format {
        match precision {
            Precision::F32 | Precision::Tf32 => Format::F32,
            Precision::Bf16 => Format::Bf16,
            Precision::F16 => Format::F16,
        }
    }

    /// `x` in this format (nearest, ties to even; past fp16's range, infinite), as f32.
    pub fn round(self, x: f32) -> f32 {
        match self {
            Format::F32 => x,
            Format::Bf16 => half::bf16::from_f32(x).to_f32(),
            Format::F16 => half::f16::from_f32(x).to_f32(),
        }
    }

    /// Rounds every value of `xs` in place.
    pub fn round_all(self, xs: &mut [f32]) {
        if self != Format::F32 {
            xs.par_chunks_mut(1 << 14)
                .for_each(|chunk| chunk.iter_mut().for_each(|x| *x = self.round(*x)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rounds_to_nearest_even_and_fp16_overflows() {
        // bf16 keeps 8 significant bits: 1 + 2^-8 is a tie between 1 and 1 + 2^-7.
        assert_eq!(Format::Bf16.round(1.0 + 2f32.powi(-8)), 1.0);
        assert_eq!(
            Format::Bf16.round(1.0 + 3.0 * 2f32.powi(-8)),
            1.0 + 2f32.powi(-6)
        );
        assert_eq!(Format::F16.round(1.0 + 2f32.powi(-11)), 1.0);
        assert_eq!(Format::F16.round(70000.0), f32::INFINITY);
        assert_eq!(Format::Bf16.round(70000.0), 70144.0);
        assert_eq!(Format::F32.round(0.1), 0.1);
    }
}
