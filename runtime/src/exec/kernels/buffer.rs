//! Reading and writing dfdx's CPU buffers from the kernels: row-major views of tensors,
//! gradient accumulation, instruction-set dispatch for elementwise loops, and the fixed-order
//! reductions that keep a step bit-reproducible.

use super::{Taped, CHUNK};
use dfdx::prelude::*;
use dfdx::tensor::{Cpu, CpuError, Gradients};
use rayon::prelude::*;
use std::borrow::Cow;

/// The elements of `t` in row-major order: borrowed when its layout already is, copied when it
/// is a strided view. dfdx has no slice accessor; indexing gives element offsets, hence strides.
pub(super) fn elements<S: Shape>(t: &Tensor<S, f32, Cpu>) -> Cow<'_, [f32]> {
    let n = t.shape().num_elements();
    if n == 0 {
        return Cow::Borrowed(&[]);
    }
    let dims = t.shape().concrete();
    let zero = S::Concrete::default();
    let base: *const f32 = &t[zero];
    let mut expected = 1usize;
    for axis in (0..S::NUM_DIMS).rev() {
        if dims[axis] > 1 {
            let mut unit = zero;
            unit[axis] = 1;
            // SAFETY: both elements lie in the tensor's one buffer.
            let stride = unsafe { (&t[unit] as *const f32).offset_from(base) };
            if stride != expected as isize {
                return Cow::Owned(t.as_vec());
            }
        }
        expected *= dims[axis];
    }
    // SAFETY: with row-major strides the elements are offsets 0..n from element zero, all inside
    // the buffer (the last one's offset is n − 1); `t` keeps the buffer alive and unchanged for
    // the borrow.
    Cow::Borrowed(unsafe { std::slice::from_raw_parts(base, n) })
}

/// `t` in row-major layout: itself when it already is, else a copy recorded on the tape, so the
/// gradient buffer of what the kernels read is row-major too.
pub(super) fn row_major<S: Shape>(t: Taped<S>) -> Taped<S> {
    let shape = *t.shape();
    t.reshape_like(&shape)
}

/// An elementwise op recorded on the tape: its result chunk by chunk from `x`'s
/// (`forward(y, x, start)` adds into a zeroed `y`; `start` is the chunk's first element), and in
/// the backward each chunk of the result's gradient added into `x`'s (`backward(gx, dy,
/// start)`), in parallel.
pub(super) fn elementwise<S: Shape>(
    x: Taped<S>,
    forward: impl Fn(&mut [f32], &[f32], usize) + Sync,
    backward: impl Fn(&mut [f32], &[f32], usize) + Send + Sync + 'static,
) -> Taped<S> {
    let (x, mut tape) = row_major(x).split_tape();
    let shape = *x.shape();
    let mut y = vec![0.0f32; shape.num_elements()];
    {
        let xs = elements(&x);
        y.par_chunks_mut(CHUNK)
            .zip(xs.par_chunks(CHUNK))
            .enumerate()
            .for_each(|(c, (y, x))| forward(y, x, c * CHUNK));
    }
    let out = x.device().tensor_from_vec(y, shape);
    let result = out.clone();
    let (out, x) = (out.ghost(), x.ghost());
    tape.add_backward_op(move |grads| {
        let dy = std::mem::take(&mut **grads.get_or_alloc_mut(&out)?);
        let gx = grads.get_or_alloc_mut(&x)?;
        gx.par_chunks_mut(CHUNK)
            .zip(dy.par_chunks(CHUNK))
            .enumerate()
            .for_each(|(c, (g, dy))| backward(g, dy, c * CHUNK));
        **grads.get_or_alloc_mut(&out)? = dy;
        Ok(())
    });
    result.put_tape(tape)
}

/// Adds `g` into `t`'s gradient.
pub(super) fn add_grad<S: Shape>(
    grads: &mut Gradients<f32, Cpu>,
    t: &Tensor<S, f32, Cpu>,
    g: &[f32],
) -> Result<(), CpuError> {
    let acc = grads.get_or_alloc_mut(t)?;
    acc.par_chunks_mut(CHUNK)
        .zip(g.par_chunks(CHUNK))
        .for_each(|(a, g)| vectorized(|| a.iter_mut().zip(g).for_each(|(a, g)| *a += g)));
    Ok(())
}

/// Runs `f` compiled for the best instruction set this CPU has (AVX-512, AVX2 or baseline), so
/// that plain loops inside it vectorize at that width.
#[inline(always)]
pub(super) fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    pulp::Arch::new().dispatch(f)
}

/// A raw pointer that parallel tasks share to write disjoint parts of one buffer.
#[derive(Clone, Copy)]
pub(super) struct Shared(pub(super) *mut f32);
// SAFETY: every user writes through it only to elements no other task touches.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

/// Sums of the columns of a row-major `rows × cols` matrix, in a fixed order.
pub(super) fn column_sums(data: &[f32], cols: usize) -> Vec<f32> {
    let rows_per_task = (CHUNK / cols.max(1)).max(1);
    let blocks = data.len().div_ceil(rows_per_task * cols);
    let mut partial = vec![0.0f32; blocks * cols];
    partial
        .par_chunks_mut(cols)
        .zip(data.par_chunks(rows_per_task * cols))
        .for_each(|(sums, block)| {
            vectorized(|| {
                for row in block.chunks(cols) {
                    sums.iter_mut().zip(row).for_each(|(s, x)| *s += x);
                }
            })
        });
    sum_blocks(&partial, cols)
}

/// The sum of consecutive blocks of `width`, in order. Partial results live in one buffer the
/// calling (device) thread allocates: memory is counted per thread (`memory`), and a buffer
/// allocated by a worker but freed by the device would go uncounted, then subtracted.
pub(super) fn sum_blocks(partial: &[f32], width: usize) -> Vec<f32> {
    let mut sums = vec![0.0f32; width];
    for block in partial.chunks(width) {
        sums.iter_mut().zip(block).for_each(|(s, x)| *s += x);
    }
    sums
}
