//! Matrix products on the device: cuBLAS on a GPU, a host loop under the emulation. Kiln's
//! tensors are row-major; [`Product`] describes one in those terms (each operand a
//! sub-matrix of a buffer, with its own row stride), and checks that it stays inside its
//! buffers before anything runs.

use super::launch::Buffer;
use super::GpuError;

/// One operand: `rows × cols` of a row-major matrix whose rows are `stride` apart, from
/// element `offset` of its buffer, read as stored or transposed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Operand {
    pub offset: usize,
    pub stride: usize,
    pub transposed: bool,
}

impl Operand {
    /// A whole matrix as stored, rows `stride` wide.
    pub fn plain(stride: usize) -> Self {
        Operand {
            offset: 0,
            stride,
            transposed: false,
        }
    }

    /// A whole matrix read transposed, its stored rows `stride` wide.
    pub fn transposed(stride: usize) -> Self {
        Operand {
            transposed: true,
            ..Operand::plain(stride)
        }
    }
}

/// `C[m, n] (+)= op(A)[m, k] · op(B)[k, n]`: the product's sizes, its operands, and whether
/// it adds to what C holds (gradients add up) or overwrites it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Product {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: Operand,
    pub b: Operand,
    pub c: Operand,
    pub accumulate: bool,
}

impl Product {
    /// Checks that every operand lies inside its buffer, and that the sizes fit cuBLAS's
    /// 32-bit arguments.
    pub fn check(
        &self,
        a: Buffer<'_, f32>,
        b: Buffer<'_, f32>,
        c: Buffer<'_, f32>,
    ) -> Result<(), GpuError> {
        let Product { m, n, k, .. } = *self;
        if self.c.transposed {
            return Err(GpuError("a product's result is written as stored".into()));
        }
        if m == 0 || n == 0 || k == 0 {
            return Err(GpuError(format!("an empty {m}×{k}·{k}×{n} product")));
        }
        // Stored (not logical) shapes: a transposed operand is stored the other way round.
        let stored = |op: Operand, rows: usize, cols: usize| match op.transposed {
            true => (cols, rows),
            false => (rows, cols),
        };
        for (what, op, (rows, cols), buffer) in [
            ("A", self.a, stored(self.a, m, k), a),
            ("B", self.b, stored(self.b, k, n), b),
            ("C", self.c, (m, n), c),
        ] {
            let end = (rows - 1)
                .checked_mul(op.stride)
                .and_then(|x| x.checked_add(cols))
                .and_then(|x| x.checked_add(op.offset));
            let fits = op.stride >= cols
                && end.is_some_and(|end| end <= buffer.len())
                && [rows, cols, op.stride]
                    .iter()
                    .all(|&x| i32::try_from(x).is_ok());
            if !fits {
                return Err(GpuError(format!(
                    "operand {what} of a {m}×{k}·{k}×{n} product: {rows}×{cols} with rows {} apart from element {} of {}",
                    op.stride,
                    op.offset,
                    buffer.len()
                )));
            }
        }
        Ok(())
    }
}

/// What computes matrix products on the device its buffers live on.
pub trait Gemm {
    /// Computes `product` after checking it (`Product::check`).
    fn gemm(
        &self,
        product: Product,
        a: Buffer<'_, f32>,
        b: Buffer<'_, f32>,
        c: Buffer<'_, f32>,
    ) -> Result<(), GpuError>;
}
