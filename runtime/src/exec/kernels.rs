//! CPU kernels for the executor's hot operators, recorded on dfdx's tape like dfdx's own ops:
//! dense products on gemm's AVX-512 path (dfdx 0.13's gemm stops at AVX2: 2.8x fewer FLOP/s on
//! this machine's cores), and fused, multithreaded attention, layer norm, tanh-GELU,
//! cross-entropy and token log-probabilities (dfdx runs each as a chain of single-threaded
//! elementwise kernels that each allocate a result). Reductions are summed in a fixed order, so
//! a step is bit-reproducible.
//! The CUDA build uses dfdx's ops instead.

use crate::parallel::collective::Collective;
use crate::parallel::tensor_parallel::VocabShard;
use dfdx::prelude::*;
use dfdx::tensor::{Cpu, CpuError, Gradients, Tape as _};
use rayon::prelude::*;
use std::borrow::Cow;

type Tape = OwnedTape<f32, Cpu>;
type Taped<S> = Tensor<S, f32, Cpu, Tape>;
type R3 = (usize, usize, usize);

/// Elements per parallel task in elementwise loops: large enough to amortise scheduling.
const CHUNK: usize = 1 << 14;

// ---------------------------------------------------------------------------------------------
// Reading and writing dfdx's buffers.

/// The elements of `t` in row-major order: borrowed when its layout already is, copied when it
/// is a strided view. dfdx has no slice accessor; indexing gives element offsets, hence strides.
fn elements<S: Shape>(t: &Tensor<S, f32, Cpu>) -> Cow<'_, [f32]> {
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
fn row_major<S: Shape>(t: Taped<S>) -> Taped<S> {
    let shape = *t.shape();
    t.reshape_like(&shape)
}

/// Adds `g` into `t`'s gradient.
fn add_grad<S: Shape>(
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
fn vectorized<R>(f: impl FnOnce() -> R) -> R {
    pulp::Arch::new().dispatch(f)
}

/// A raw pointer that parallel tasks share to write disjoint parts of one buffer.
#[derive(Clone, Copy)]
struct Shared(*mut f32);
// SAFETY: every user writes through it only to elements no other task touches.
unsafe impl Send for Shared {}
unsafe impl Sync for Shared {}

// ---------------------------------------------------------------------------------------------
// Matrix products.

/// A strided matrix: element (i, j) at `ptr + i·rs + j·cs`.
#[derive(Clone, Copy)]
struct Mat {
    ptr: *const f32,
    rows: usize,
    cols: usize,
    rs: isize,
    cs: isize,
}

impl Mat {
    /// Row-major `rows × cols` at the start of `data`, rows `stride` apart.
    fn at(data: &[f32], rows: usize, cols: usize, stride: usize) -> Mat {
        // The products index through raw pointers: this is what keeps them inside `data`.
        assert!(rows == 0 || (rows - 1) * stride + cols <= data.len());
        Mat {
            ptr: data.as_ptr(),
            rows,
            cols,
            rs: stride as isize,
            cs: 1,
        }
    }
    fn rows(data: &[f32], rows: usize, cols: usize) -> Mat {
        Mat::at(data, rows, cols, cols)
    }
    fn t(self) -> Mat {
        Mat {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }
}

/// `dst = (accumulate ? dst : 0) + scale · a·b` for a row-major `dst` with rows `dst_stride`
/// apart.
///
/// # Safety
/// `a` and `b` must describe readable memory, `dst` writable memory for `a.rows × b.cols`
/// elements at that stride that nothing else accesses during the call.
#[allow(clippy::too_many_arguments)]
unsafe fn product(
    dst: *mut f32,
    dst_stride: usize,
    a: Mat,
    b: Mat,
    accumulate: bool,
    scale: f32,
    parallel: bool,
) {
    debug_assert_eq!(a.cols, b.rows);
    let parallelism = if parallel {
        gemm::Parallelism::Rayon(0)
    } else {
        gemm::Parallelism::None
    };
    gemm::gemm(
        a.rows,
        b.cols,
        a.cols,
        dst,
        1,
        dst_stride as isize,
        accumulate,
        a.ptr,
        a.cs,
        a.rs,
        b.ptr,
        b.cs,
        b.rs,
        1.0,
        scale,
        false,
        false,
        false,
        parallelism,
    );
}

/// Sums of the columns of a row-major `rows × cols` matrix, in a fixed order.
fn column_sums(data: &[f32], cols: usize) -> Vec<f32> {
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
fn sum_blocks(partial: &[f32], width: usize) -> Vec<f32> {
    let mut sums = vec![0.0f32; width];
    for block in partial.chunks(width) {
        sums.iter_mut().zip(block).for_each(|(s, x)| *s += x);
    }
    sums
}

/// The weight of a linear layer as stored: `[in, out]` (GPT-2's Conv1D) or `[out, in]`.
pub struct Weight {
    pub w: Tensor<(usize, usize), f32, Cpu>,
    pub out_in: bool,
    pub trainable: bool,
}

/// A parameter vector (bias, norm weight) and whether it is trained (gets a gradient).
pub struct Vector {
    pub v: Tensor<(usize,), f32, Cpu>,
    pub trainable: bool,
}

/// `x·W (+ bias)` over the last axis of `x` `[b, s, in]`, for the outputs `outputs` (all when
/// `None`): a range of a fused weight (GPT-2's c_attn read as q, k, v) is computed alone, from
/// that block of the weight, with no full product to slice.
pub fn linear(
    x: Taped<R3>,
    weight: Weight,
    bias: Option<Vector>,
    outputs: Option<(usize, usize)>,
) -> Result<Taped<R3>, String> {
    let (x, mut tape) = row_major(x).split_tape();
    let (b, s, k) = *x.shape();
    let (rows, cols) = *weight.w.shape();
    let (w_in, all) = if weight.out_in {
        (cols, rows)
    } else {
        (rows, cols)
    };
    if w_in != k {
        return Err(format!(
            "an input of width {k} meets a weight of [{rows}, {cols}]"
        ));
    }
    let (first, end) = outputs.unwrap_or((0, all));
    if first >= end || end > all {
        return Err(format!("outputs {first}..{end} of a weight with {all}"));
    }
    let (m, n) = (b * s, end - first);
    // Where output `first` starts in the weight (and its gradient), as stored.
    let offset = if weight.out_in { first * cols } else { first };
    // The used block of W as the [in, out] matrix of the product, whichever way it is stored.
    let as_in_out = move |w: &[f32]| {
        if weight.out_in {
            Mat::at(&w[offset..], n, cols, cols).t()
        } else {
            Mat::at(&w[offset..], rows, n, cols)
        }
    };
    let mut y = match &bias {
        Some(bias) => {
            let bias = elements(&bias.v);
            if bias.len() != all {
                return Err(format!("a bias of {} for {all} outputs", bias.len()));
            }
            let bias = &bias[first..end];
            let mut y = vec![0.0f32; m * n];
            y.par_chunks_mut(n)
                .for_each(|row| row.copy_from_slice(bias));
            y
        }
        None => vec![0.0f32; m * n],
    };
    {
        let xs = elements(&x);
        let ws = elements(&weight.w);
        // SAFETY: `y` is m × n; `xs` m × k; `ws` holds the k × n weight.
        unsafe {
            product(
                y.as_mut_ptr(),
                n,
                Mat::rows(&xs, m, k),
                as_in_out(&ws),
                bias.is_some(),
                1.0,
                true,
            )
        };
    }
    let out = x.device().tensor_from_vec(y, (b, s, n));
    let result = out.clone();
    // Its gradient's place, not its values: nothing keeps an output alive for its gradient.
    let out = out.ghost();
    // The input's values only for the weight's gradient: a frozen weight's input is not kept.
    let x_grad = x.ghost();
    let x = weight.trainable.then_some(x);
    tape.add_backward_op(move |grads| {
        let dy = std::mem::take(&mut **grads.get_or_alloc_mut(&out)?);
        let ws = elements(&weight.w);
        let dy_mat = Mat::rows(&dy, m, n);
        let gx = grads.get_or_alloc_mut(&x_grad)?;
        // SAFETY: shapes as in the forward product; gradients are row-major like their tensors.
        unsafe {
            product(
                gx.as_mut_ptr(),
                k,
                dy_mat,
                as_in_out(&ws).t(),
                true,
                1.0,
                true,
            )
        };
        if let Some(x) = &x {
            let xs = elements(x);
            let gw = grads.get_or_alloc_mut(&weight.w)?;
            let x_mat = Mat::rows(&xs, m, k);
            let dst = gw[offset..].as_mut_ptr();
            // SAFETY: the weight's gradient is rows × cols like the weight; the used block
            // starts at `offset` with rows `cols` apart.
            unsafe {
                if weight.out_in {
                    product(dst, cols, dy_mat.t(), x_mat, true, 1.0, true)
                } else {
                    product(dst, cols, x_mat.t(), dy_mat, true, 1.0, true)
                }
            }
        }
        if let Some(bias) = bias.as_ref().filter(|b| b.trainable) {
            let gb = grads.get_or_alloc_mut(&bias.v)?;
            let sums = column_sums(&dy, n);
            gb[first..end]
                .iter_mut()
                .zip(&sums)
                .for_each(|(g, s)| *g += s);
        }
        **grads.get_or_alloc_mut(&out)? = dy;
        Ok(())
    });
    Ok(result.put_tape(tape))
}

/// Features `start..end` of `x` `[b, s, n]` (GPT-2's q, k and v from the fused c_attn output):
/// a copy per row forward, an add into the range backward (dfdx's slice walks indices one
/// element at a time).
pub fn columns(x: Taped<R3>, start: usize, end: usize) -> Result<Taped<R3>, String> {
    let (x, mut tape) = row_major(x).split_tape();
    let (b, s, n) = *x.shape();
    if start >= end || end > n {
        return Err(format!("features {start}..{end} of a tensor with {n}"));
    }
    let width = end - start;
    let mut y = vec![0.0f32; b * s * width];
    {
        let xs = elements(&x);
        y.par_chunks_mut(width)
            .zip(xs.par_chunks(n))
            .for_each(|(y, x)| y.copy_from_slice(&x[start..end]));
    }
    let out = x.device().tensor_from_vec(y, (b, s, width));
    let result = out.clone();
    // Its gradient's place, not its values: nothing keeps an output alive for its gradient.
    let out = out.ghost();
    let x = x.ghost();
    tape.add_backward_op(move |grads| {
        let dy = std::mem::take(&mut **grads.get_or_alloc_mut(&out)?);
        let gx = grads.get_or_alloc_mut(&x)?;
        gx.par_chunks_mut(n)
            .zip(dy.par_chunks(width))
            .for_each(|(g, dy)| {
                g[start..end].iter_mut().zip(dy).for_each(|(g, d)| *g += d);
            });
        **grads.get_or_alloc_mut(&out)? = dy;
        Ok(())
    });
    Ok(result.put_tape(tape))
}

// ---------------------------------------------------------------------------------------------
// Elementwise math, written so that loops over it vectorize.

/// e^x to about one ulp: 2^n · e^r with r = x − n·ln 2 in [−ln2/2, ln2/2] and a degree-7
/// Taylor polynomial for e^r; 0 below e^−87.3 (where f32 leaves normal numbers).
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LN2_HI: f32 = 0.693_145_75;
    const LN2_LO: f32 = 1.428_606_8e-6;
    let clamped = x.clamp(-87.3, 88.3);
    // Ties to even: one vector instruction (`round` is a library call).
    let n = (clamped * std::f32::consts::LOG2_E).round_ties_even();
    let r = clamped - n * LN2_HI - n * LN2_LO;
    let mut p = 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    let scale = f32::from_bits(((n as i32 + 127) << 23) as u32);
    if x < -87.3 {
        0.0
    } else {
        p * scale
    }
}

/// tanh(u) = 1 − 2/(e^{2u} + 1): exact to a few 1e-8 in absolute terms, which is what GELU's
/// (1 + tanh) and (1 − tanh²) need.
#[inline(always)]
fn tanh(u: f32) -> f32 {
    1.0 - 2.0 / (exp(2.0 * u.clamp(-10.0, 10.0)) + 1.0)
}

const GELU_C: f32 = 0.797_884_6; // √(2/π)
const GELU_K: f32 = 0.044_715;

/// erf(x) to 1.5e-7 (Abramowitz & Stegun 7.1.26), in absolute terms, which is what the erf
/// GELU's 1 + erf needs.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_7 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let y = 1.0 - poly * exp(-a * a);
    if x < 0.0 {
        -y
    } else {
        y
    }
}

/// The activations computed by [`activation`]: value and derivative of each.
#[derive(Clone, Copy)]
pub enum Activation {
    /// GPT-2's tanh GELU: 0.5·x·(1 + tanh(√(2/π)·(x + 0.044715·x³))).
    GeluTanh,
    /// BERT's GELU: 0.5·x·(1 + erf(x/√2)).
    GeluErf,
    /// LLaMA's SiLU: x·σ(x).
    Silu,
}

impl Activation {
    #[inline(always)]
    fn value(self, x: f32) -> f32 {
        match self {
            Activation::GeluTanh => 0.5 * x * (1.0 + tanh(GELU_C * (x + GELU_K * x * x * x))),
            Activation::GeluErf => 0.5 * x * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2)),
            Activation::Silu => x / (1.0 + exp(-x)),
        }
    }

    #[inline(always)]
    fn derivative(self, x: f32) -> f32 {
        match self {
            Activation::GeluTanh => {
                let t = tanh(GELU_C * (x + GELU_K * x * x * x));
                let du = GELU_C * (1.0 + 3.0 * GELU_K * x * x);
                0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du
            }
            Activation::GeluErf => {
                // 1/√(2π)
                const PDF: f32 = 0.398_942_3;
                0.5 * (1.0 + erf(x * std::f32::consts::FRAC_1_SQRT_2)) + x * PDF * exp(-0.5 * x * x)
            }
            Activation::Silu => {
                let sigmoid = 1.0 / (1.0 + exp(-x));
                sigmoid * (1.0 + x * (1.0 - sigmoid))
            }
        }
    }
}

/// Inverted dropout: `x · scale` where `keep`, else 0. The backward needs only the mask, one
/// byte an element (a product with a mask tensor keeps its input and a float mask).
pub fn dropout<S: Shape>(x: Taped<S>, keep: Vec<bool>, scale: f32) -> Result<Taped<S>, String> {
    let (x, mut tape) = row_major(x).split_tape();
    let shape = *x.shape();
    if keep.len() != shape.num_elements() {
        return Err(format!(
            "a dropout mask of {} for {} values",
            keep.len(),
            shape.num_elements()
        ));
    }
    let factor = move |k: bool| if k { scale } else { 0.0 };
    let mut y = vec![0.0f32; keep.len()];
    {
        let xs = elements(&x);
        y.par_chunks_mut(CHUNK)
            .zip(xs.par_chunks(CHUNK).zip(keep.par_chunks(CHUNK)))
            .for_each(|(y, (x, keep))| {
                for ((y, &x), &k) in y.iter_mut().zip(x).zip(keep) {
                    *y = x * factor(k);
                }
            });
    }
    let out = x.device().tensor_from_vec(y, shape);
    let result = out.clone();
    let (out, x) = (out.ghost(), x.ghost());
    tape.add_backward_op(move |grads| {
        let dy = std::mem::take(&mut **grads.get_or_alloc_mut(&out)?);
        let gx = grads.get_or_alloc_mut(&x)?;
        gx.par_chunks_mut(CHUNK)
            .zip(dy.par_chunks(CHUNK).zip(keep.par_chunks(CHUNK)))
            .for_each(|(g, (dy, keep))| {
                for ((g, &dy), &k) in g.iter_mut().zip(dy).zip(keep) {
                    *g += dy * factor(k);
                }
            });
        **grads.get_or_alloc_mut(&out)? = dy;
        Ok(())
    });
    Ok(result.put_tape(tape))
}

/// An activation, elementwise; the backward recomputes what it needs from the input.
pub fn activation<S: Shape>(x: Taped<S>, act: Activation) -> Taped<S> {
    // One instance per activation: a loop over a fixed function vectorizes, one that matches
    // on the activation per element does not.
    match act {
        Activation::GeluTanh => elementwise(
            x,
            |v| Activation::GeluTanh.value(v),
            |v| Activation::GeluTanh.derivative(v),
        ),
        Activation::GeluErf => elementwise(
            x,
            |v| Activation::GeluErf.value(v),
            |v| Activation::GeluErf.derivative(v),
        ),
        Activation::Silu => elementwise(
            x,
            |v| Activation::Silu.value(v),
            |v| Activation::Silu.derivative(v),
        ),
    }
}

/// `value` of every element, with `derivative` for the backward.
fn elementwise<S: Shape>(
    x: Taped<S>,
    value: impl Fn(f32) -> f32 + Copy + Send + Sync + 'static,
    derivative: impl Fn(f32) -> f32 + Copy + Send + Sync + 'static,
) -> Taped<S> {
    let (x, mut tape) = row_major(x).split_tape();
    let shape = *x.shape();
    let mut y = vec![0.0f32; shape.num_elements()];
    {
        let xs = elements(&x);
        y.par_chunks_mut(CHUNK)
            .zip(xs.par_chunks(CHUNK))
            .for_each(|(y, x)| {
                vectorized(|| {
                    for (y, &x) in y.iter_mut().zip(x) {
                        *y = value(x);
                    }
                })
            });
    }
    let out = x.device().tensor_from_vec(y, shape);
    let result = out.clone();
    // Its gradient's place, not its values: nothing keeps an output alive for its gradient.
    let out = out.ghost();
    tape.add_backward_op(move |grads| {
        let dy = std::mem::take(&mut **grads.get_or_alloc_mut(&out)?);
        let xs = elements(&x);
        let gx = grads.get_or_alloc_mut(&x)?;
        gx.par_chunks_mut(CHUNK)
            .zip(xs.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)))
            .for_each(|(gx, (x, dy))| {
                vectorized(|| {
                    for ((g, &x), &dy) in gx.iter_mut().zip(x).zip(dy) {
                        *g += dy * derivative(x);
                    }
                })
            });
        **grads.get_or_alloc_mut(&out)? = dy;
        Ok(())
    });
    result.put_tape(tape)
}

// ---------------------------------------------------------------------------------------------
// Layer norm.

/// Layer norm over the last axis: (x − mean)/√(var + eps)·w (+ b), var biased as in PyTorch.
pub fn layer_norm(
    x: Taped<R3>,
    weight: Vector,
    bias: Option<Vector>,
    eps: f32,
) -> Result<Taped<R3>, String> {
    let (x, mut tape) = row_major(x).split_tape();
    let shape = *x.shape();
    let h = shape.2;
    let rows = shape.0 * shape.1;
    if h == 0 || rows == 0 {
        return Err(format!("layer norm of a tensor of shape {shape:?}"));
    }
    let w = elements(&weight.v).into_owned();
    let b = match &bias {
        Some(b) => elements(&b.v).into_owned(),
        None => vec![0.0; h],
    };
    if w.len() != h || b.len() != h {
        return Err(format!("norm parameters of {} for width {h}", w.len()));
    }
    let mut y = vec![0.0f32; rows * h];
    // (mean, 1/σ) per row, kept for the backward.
    let mut stats = vec![0.0f32; rows * 2];
    {
        let xs = elements(&x);
        y.par_chunks_mut(h)
            .zip(xs.par_chunks(h))
            .zip(stats.par_chunks_mut(2))
            .for_each(|((y, x), stat)| {
                vectorized(|| {
                    let mean = x.iter().sum::<f32>() / h as f32;
                    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / h as f32;
                    let inv = 1.0 / (var + eps).sqrt();
                    for (((y, x), w), b) in y.iter_mut().zip(x).zip(&w).zip(&b) {
                        *y = (x - mean) * inv * w + b;
                    }
                    stat[0] = mean;
                    stat[1] = inv;
                })
            });
    }
    let out = x.device().tensor_from_vec(y, shape);
    let result = out.clone();
    // Its gradient's place, not its values: nothing keeps an output alive for its gradient.
    let out = out.ghost();
    tape.add_backward_op(move |grads| {
        let dy = std::mem::take(&mut **grads.get_or_alloc_mut(&out)?);
        let xs = elements(&x);
        let rows_per_task = (CHUNK / h).max(1);
        let gx_all = grads.get_or_alloc_mut(&x)?;
        // Per block of rows: the input gradient, and partial sums for w (first half) and b.
        let mut partial = vec![0.0f32; rows.div_ceil(rows_per_task) * 2 * h];
        gx_all
            .par_chunks_mut(rows_per_task * h)
            .zip(xs.par_chunks(rows_per_task * h))
            .zip(dy.par_chunks(rows_per_task * h))
            .zip(stats.par_chunks(rows_per_task * 2))
            .zip(partial.par_chunks_mut(2 * h))
            .for_each(|((((gx, x), dy), stats), sums)| {
                let (gw, gb) = sums.split_at_mut(h);
                vectorized(|| {
                    for (((gx, x), dy), stat) in gx
                        .chunks_mut(h)
                        .zip(x.chunks(h))
                        .zip(dy.chunks(h))
                        .zip(stats.chunks(2))
                    {
                        let (mean, inv) = (stat[0], stat[1]);
                        let mut mean_g = 0.0f32;
                        let mut mean_gx = 0.0f32;
                        for (((x, dy), w), (gw, gb)) in x
                            .iter()
                            .zip(dy)
                            .zip(&w)
                            .zip(gw.iter_mut().zip(gb.iter_mut()))
                        {
                            let xhat = (x - mean) * inv;
                            let g = dy * w;
                            mean_g += g;
                            mean_gx += g * xhat;
                            *gw += dy * xhat;
                            *gb += dy;
                        }
                        mean_g /= h as f32;
                        mean_gx /= h as f32;
                        for ((gx, x), (dy, w)) in gx.iter_mut().zip(x).zip(dy.iter().zip(&w)) {
                            let xhat = (x - mean) * inv;
                            *gx += inv * (dy * w - mean_g - xhat * mean_gx);
                        }
                    }
                });
            });
        let sums = sum_blocks(&partial, 2 * h);
        let (gw, gb) = sums.split_at(h);
        if weight.trainable {
            add_grad(grads, &weight.v, gw)?;
        }
        if let Some(b) = bias.as_ref().filter(|b| b.trainable) {
            add_grad(grads, &b.v, gb)?;
        }
        **grads.get_or_alloc_mut(&out)? = dy;
        Ok(())
    });
    Ok(result.put_tape(tape))
}

// ---------------------------------------------------------------------------------------------
// Attention.

/// The attention core's geometry: query heads, key/value heads (grouped-query attention when
/// fewer), head width.
#[derive(Clone, Copy)]
pub struct Heads {
    pub heads: usize,
    pub kv_heads: usize,
    pub dim: usize,
}

/// softmax(q·kᵀ·scale + mask)·(dropout)·v for q `[b, s, heads·d]`, k and v
/// `[b, s_kv, kv_heads·d]`, an additive mask `[b, s, s_kv]` and an optional inverted-dropout
/// mask `[b, heads, s, s_kv]`; the result is `[b, s, heads·d]`. Heads are computed in parallel
/// (one task per batch row and key/value head); the probabilities are kept for the backward.
pub fn attention(
    q: Taped<R3>,
    k: Tensor<R3, f32, Cpu>,
    v: Tensor<R3, f32, Cpu>,
    heads: Heads,
    mask: Vec<f32>,
    dropout: Option<Vec<f32>>,
) -> Result<Taped<R3>, String> {
    let Heads {
        heads: h,
        kv_heads: kvh,
        dim: d,
    } = heads;
    let (b, s, width) = *q.shape();
    let skv = k.shape().1;
    // The parallel products write through raw pointers: every extent is checked first.
    if kvh == 0 || h % kvh != 0 || d == 0 || s == 0 || skv == 0 {
        return Err(format!(
            "attention over {h} heads, {kvh} key/value heads of width {d}, {s} queries and {skv} keys"
        ));
    }
    if width != h * d || *k.shape() != (b, skv, kvh * d) || *v.shape() != *k.shape() {
        return Err(format!(
            "attention inputs q {:?}, k {:?}, v {:?} for {h} heads over {kvh} of width {d}",
            q.shape(),
            k.shape(),
            v.shape()
        ));
    }
    let plane = s * skv;
    if mask.len() != b * plane || dropout.as_ref().is_some_and(|m| m.len() != b * h * plane) {
        return Err("an attention mask of the wrong size".into());
    }
    let (q, tape) = row_major(q).split_tape();
    let (k, tape) = row_major(k.put_tape(tape)).split_tape();
    let (v, mut tape) = row_major(v.put_tape(tape)).split_tape();
    let group = h / kvh;
    let scale = 1.0 / (d as f32).sqrt();
    let mut probs = vec![0.0f32; b * h * plane];
    let mut y = vec![0.0f32; b * s * h * d];
    {
        let (qs, ks, vs) = (elements(&q), elements(&k), elements(&v));
        let out = Shared(y.as_mut_ptr());
        probs
            .par_chunks_mut(group * plane)
            .enumerate()
            .for_each(|(task, probs)| {
                let (r, g) = (task / kvh, task % kvh);
                let k_g = Mat::at(&ks[(r * skv * kvh + g) * d..], skv, d, kvh * d);
                let v_g = Mat::at(&vs[(r * skv * kvh + g) * d..], skv, d, kvh * d);
                let mut kept = vec![0.0f32; if dropout.is_some() { plane } else { 0 }];
                for (i, p) in probs.chunks_mut(plane).enumerate() {
                    let head = g * group + i;
                    let q_h = Mat::at(&qs[(r * s * h + head) * d..], s, d, h * d);
                    // SAFETY: `p` is this head's s × s_kv plane.
                    unsafe { product(p.as_mut_ptr(), skv, q_h, k_g.t(), false, scale, false) };
                    softmax_rows(p, &mask[r * plane..(r + 1) * plane], skv);
                    let used: &[f32] = match &dropout {
                        Some(drop) => {
                            let drop = &drop[(r * h + head) * plane..][..plane];
                            kept.iter_mut()
                                .zip(p.iter().zip(drop))
                                .for_each(|(k, (p, m))| *k = p * m);
                            &kept
                        }
                        None => p,
                    };
                    let dst = out;
                    // SAFETY: this head's columns of batch row r: no other task writes them.
                    unsafe {
                        product(
                            dst.0.add((r * s * h + head) * d),
                            h * d,
                            Mat::rows(used, s, skv),
                            v_g,
                            false,
                            1.0,
                            false,
                        )
                    };
                }
            });
    }
    let out = q.device().tensor_from_vec(y, (b, s, h * d));
    let result = out.clone();
    // Its gradient's place, not its values: nothing keeps an output alive for its gradient.
    let out = out.ghost();
    tape.add_backward_op(move |grads| {
        let dy = std::mem::take(&mut **grads.get_or_alloc_mut(&out)?);
        let (qs, ks, vs) = (elements(&q), elements(&k), elements(&v));
        let mut dq = vec![0.0f32; qs.len()];
        let mut dk = vec![0.0f32; ks.len()];
        let mut dv = vec![0.0f32; vs.len()];
        let (dq_out, dk_out, dv_out) = (
            Shared(dq.as_mut_ptr()),
            Shared(dk.as_mut_ptr()),
            Shared(dv.as_mut_ptr()),
        );
        (0..b * kvh).into_par_iter().for_each(|task| {
            let (r, g) = (task / kvh, task % kvh);
            let kv_at = (r * skv * kvh + g) * d;
            let k_g = Mat::at(&ks[kv_at..], skv, d, kvh * d);
            let v_g = Mat::at(&vs[kv_at..], skv, d, kvh * d);
            let mut grad = vec![0.0f32; plane];
            let mut kept = vec![0.0f32; if dropout.is_some() { plane } else { 0 }];
            for head in g * group..(g + 1) * group {
                let p = &probs[(r * h + head) * plane..][..plane];
                let drop = dropout
                    .as_ref()
                    .map(|m| &m[(r * h + head) * plane..][..plane]);
                let q_at = (r * s * h + head) * d;
                let q_h = Mat::at(&qs[q_at..], s, d, h * d);
                let dy_h = Mat::at(&dy[q_at..], s, d, h * d);
                let used: &[f32] = match drop {
                    Some(drop) => {
                        kept.iter_mut()
                            .zip(p.iter().zip(drop))
                            .for_each(|(k, (p, m))| *k = p * m);
                        &kept
                    }
                    None => p,
                };
                let (dk_g, dv_g) = (dk_out, dv_out);
                let dq_h = dq_out;
                // SAFETY: task (r, g) alone writes key/value head g of row r and the columns of
                // its query heads in row r; every operand has the shapes described.
                unsafe {
                    // d(used) = dy_h·v_gᵀ; dv_g += usedᵀ·dy_h.
                    product(grad.as_mut_ptr(), skv, dy_h, v_g.t(), false, 1.0, false);
                    product(
                        dv_g.0.add(kv_at),
                        kvh * d,
                        Mat::rows(used, s, skv).t(),
                        dy_h,
                        true,
                        1.0,
                        false,
                    );
                }
                if let Some(drop) = drop {
                    grad.iter_mut().zip(drop).for_each(|(g, m)| *g *= m);
                }
                softmax_backward_rows(&mut grad, p, skv);
                unsafe {
                    product(
                        dq_h.0.add(q_at),
                        h * d,
                        Mat::rows(&grad, s, skv),
                        k_g,
                        false,
                        scale,
                        false,
                    );
                    product(
                        dk_g.0.add(kv_at),
                        kvh * d,
                        Mat::rows(&grad, s, skv).t(),
                        q_h,
                        true,
                        scale,
                        false,
                    );
                }
            }
        });
        add_grad(grads, &q, &dq)?;
        add_grad(grads, &k, &dk)?;
        add_grad(grads, &v, &dv)?;
        **grads.get_or_alloc_mut(&out)? = dy;
        Ok(())
    });
    Ok(result.put_tape(tape))
}

/// Softmax of each row of `p` (rows of `width`) after adding `mask`, in place.
fn softmax_rows(p: &mut [f32], mask: &[f32], width: usize) {
    vectorized(|| {
        for (row, mask) in p.chunks_mut(width).zip(mask.chunks(width)) {
            row.iter_mut().zip(mask).for_each(|(x, m)| *x += m);
            let max = row.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
            let mut sum = 0.0f32;
            for x in row.iter_mut() {
                *x = exp(*x - max);
                sum += *x;
            }
            let inv = 1.0 / sum;
            row.iter_mut().for_each(|x| *x *= inv);
        }
    })
}

/// Turns the gradient with respect to softmax outputs `p` into the gradient with respect to
/// its inputs, row by row and in place: p ∘ (g − Σ g∘p).
fn softmax_backward_rows(g: &mut [f32], p: &[f32], width: usize) {
    vectorized(|| {
        for (g, p) in g.chunks_mut(width).zip(p.chunks(width)) {
            let dot: f32 = g.iter().zip(p).map(|(g, p)| g * p).sum();
            g.iter_mut().zip(p).for_each(|(g, p)| *g = p * (*g - dot));
        }
    })
}

// ---------------------------------------------------------------------------------------------
// Cross-entropy.

/// Σ weight·(−log softmax(logits)[target]) / count over rows of `logits` `[b, s, vocab]`,
/// reading the first `positions` of each sequence; `targets` and `weights` are `[b·positions]`.
///
/// With a `shard`, `logits` holds the shard's columns of the vocabulary: each rank's log Σ exp
/// and target logit per row are all-gathered (two values a row) and combined in rank order, so
/// every rank computes the same loss, and the backward needs no communication.
pub fn cross_entropy(
    logits: Taped<R3>,
    positions: usize,
    targets: Vec<usize>,
    weights: Vec<f32>,
    count: f32,
    shard: Option<VocabShard>,
) -> Result<Taped<()>, String> {
    let (b, s, width) = *logits.shape();
    let read = TargetRows {
        starts: (0..targets.len())
            .map(|i| (i / positions.max(1) * s + i % positions.max(1)) * width)
            .collect(),
        // Rows without weight are not read.
        targets: targets
            .iter()
            .zip(&weights)
            .map(|(&t, &w)| (w != 0.0).then_some(t))
            .collect(),
        ..TargetRows::over(width, shard.as_ref())
    };
    // Rows are written by parallel tasks through a raw pointer: each target must name its own
    // row and a word of the vocabulary.
    if positions == 0
        || positions > s
        || targets.len() != weights.len()
        || targets.len() > b * positions
        || targets.len() % positions != 0
        || !read.fits(&targets)
    {
        return Err(format!(
            "cross-entropy of {} targets over {positions} of {s} positions, vocabulary {} ({width} columns here)",
            targets.len(),
            read.vocab
        ));
    }
    let (logits, mut tape) = row_major(logits).split_tape();
    let (lse, picked) = read.statistics(&elements(&logits), shard)?;
    let loss = {
        let total: f64 = (0..targets.len())
            .map(|i| f64::from(weights[i] * (lse[i] - picked[i])))
            .sum();
        (total / f64::from(count)) as f32
    };
    let out = logits.device().tensor(loss);
    let result = out.clone();
    // Its gradient's place, not its values: nothing keeps an output alive for its gradient.
    let out = out.ghost();
    tape.add_backward_op(move |grads| {
        let g = grads.get_or_alloc_mut(&out)?[0] / count;
        let xs = elements(&logits);
        // Written straight into the logits' gradient: over a large vocabulary it is the
        // biggest buffer of the step, and a second one would double the head's memory.
        let acc = grads.get_or_alloc_mut(&logits)?;
        read.add_gradient(acc, &xs, &lse, |i| g * weights[i]);
        Ok(())
    });
    Ok(result.put_tape(tape))
}

/// The rows of `[.., width]` logits a log-softmax reads at a target: where each row starts and
/// its target (`None`: the row is not read), over this rank's columns of the vocabulary.
struct TargetRows {
    starts: Vec<usize>,
    targets: Vec<Option<usize>>,
    width: usize,
    /// The global vocabulary ids of the logits' columns, and the whole vocabulary.
    columns: std::ops::Range<usize>,
    vocab: usize,
}

impl TargetRows {
    /// No rows yet, over all `width` columns or a shard's.
    fn over(width: usize, shard: Option<&VocabShard>) -> TargetRows {
        TargetRows {
            starts: Vec::new(),
            targets: Vec::new(),
            width,
            columns: shard.map_or(0..width, |sh| sh.at.columns.clone()),
            vocab: shard.map_or(width, |sh| sh.at.vocab),
        }
    }

    /// Whether the columns match the logits and every target names a word of the vocabulary.
    fn fits(&self, targets: &[usize]) -> bool {
        self.columns.len() == self.width
            && self.columns.end <= self.vocab
            && targets.iter().all(|&t| t < self.vocab)
    }

    /// The target's column here, if this rank holds it.
    fn local(&self, t: usize) -> Option<usize> {
        self.columns.contains(&t).then(|| t - self.columns.start)
    }

    /// Per row, log Σ exp over the whole vocabulary and the target's logit (0 for rows not
    /// read); over a shard, combined across its group (see [`combine_shards`]).
    fn statistics(
        &self,
        xs: &[f32],
        shard: Option<VocabShard>,
    ) -> Result<(Vec<f32>, Vec<f32>), String> {
        let (lse, picked): (Vec<f32>, Vec<f32>) = self
            .targets
            .par_iter()
            .zip(&self.starts)
            .map(|(t, &at)| match t {
                Some(t) => {
                    let x = &xs[at..at + self.width];
                    let target = self.local(*t).map_or(0.0, |t| x[t]);
                    (vectorized(|| log_sum_exp(x)), target)
                }
                None => (0.0, 0.0),
            })
            .unzip();
        match shard {
            Some(shard) => combine_shards(shard.group, &lse, &picked),
            None => Ok((lse, picked)),
        }
    }

    /// `acc += coef(i) · (softmax(x) − onehot(target))` on each row read: the gradient of
    /// −coef · log softmax(x)[target], over this rank's columns.
    fn add_gradient(
        &self,
        acc: &mut [f32],
        xs: &[f32],
        lse: &[f32],
        coef: impl Fn(usize) -> f32 + Sync,
    ) {
        let shared = Shared(acc.as_mut_ptr());
        self.targets.par_iter().enumerate().for_each(|(i, t)| {
            let Some(t) = *t else { return };
            let at = self.starts[i];
            let scale = coef(i);
            let dst = shared;
            // SAFETY: each row read is written by its task alone.
            let dst = unsafe { std::slice::from_raw_parts_mut(dst.0.add(at), self.width) };
            vectorized(|| add_softmax(dst, &xs[at..at + self.width], lse[i], scale));
            if let Some(t) = self.local(t) {
                dst[t] -= scale;
            }
        });
    }
}

/// Every rank's per-row log Σ exp and target logit, all-gathered and combined in rank order
/// (the same arithmetic on every rank): the log Σ exp over the whole vocabulary, and the
/// target's logit from the rank holding it (the others hold 0).
fn combine_shards(
    group: &mut dyn Collective,
    lse: &[f32],
    picked: &[f32],
) -> Result<(Vec<f32>, Vec<f32>), String> {
    let (rows, size) = (lse.len(), group.size());
    let mut buf = vec![0.0; 2 * rows * size];
    let mine = group.shard(buf.len());
    if mine.len() != 2 * rows {
        return Err(format!(
            "a vocabulary shard of {} values, not {}",
            mine.len(),
            2 * rows
        ));
    }
    buf[mine.clone()][..rows].copy_from_slice(lse);
    buf[mine][rows..].copy_from_slice(picked);
    group.all_gather(&mut buf).map_err(|e| e.0)?;
    let shards: Vec<&[f32]> = (0..size)
        .map(|r| &buf[group.shard_of(buf.len(), r)])
        .collect();
    let lse = (0..rows)
        .map(|i| {
            let max = shards.iter().fold(f32::NEG_INFINITY, |m, sh| m.max(sh[i]));
            max + shards.iter().map(|sh| exp(sh[i] - max)).sum::<f32>().ln()
        })
        .collect();
    let picked = (0..rows)
        .map(|i| shards.iter().map(|sh| sh[rows + i]).sum())
        .collect();
    Ok((lse, picked))
}

/// log Σ exp over a row of logits.
#[inline(always)]
fn log_sum_exp(x: &[f32]) -> f32 {
    let max = x.iter().fold(f32::NEG_INFINITY, |a, &b| a.max(b));
    max + x.iter().map(|v| exp(v - max)).sum::<f32>().ln()
}

/// `dst += scale · softmax(x)`, from the row's log Σ exp: the part of a log-softmax's gradient
/// every logit gets (the target's one-hot part is the caller's).
#[inline(always)]
fn add_softmax(dst: &mut [f32], x: &[f32], lse: f32, scale: f32) {
    for (d, &x) in dst.iter_mut().zip(x) {
        *d += scale * exp(x - lse);
    }
}

// ---------------------------------------------------------------------------------------------
// Log-probabilities of taken tokens.

/// `log softmax(logits)[target]` at every position of `logits` `[b, s, vocab]` (`targets` is
/// `[b·s]`), 0 where there is no target. One pass per row, no `[b, s, vocab]` intermediate
/// (dfdx's log-softmax allocates several). With a `shard`, `logits` holds the shard's columns
/// of the vocabulary, as in [`cross_entropy`].
pub fn token_log_probs(
    logits: Taped<R3>,
    targets: Vec<Option<usize>>,
    shard: Option<VocabShard>,
) -> Result<Taped<(usize, usize)>, String> {
    let (logits, mut tape) = row_major(logits).split_tape();
    let (b, s, width) = *logits.shape();
    let named: Vec<usize> = targets.iter().flatten().copied().collect();
    let read = TargetRows {
        starts: (0..targets.len()).map(|i| i * width).collect(),
        targets,
        ..TargetRows::over(width, shard.as_ref())
    };
    if read.targets.len() != b * s || !read.fits(&named) {
        return Err(format!(
            "log-probabilities of {} tokens at {b}×{s} positions, vocabulary {} ({width} columns here)",
            read.targets.len(),
            read.vocab
        ));
    }
    let (lse, picked) = read.statistics(&elements(&logits), shard)?;
    let log_probs: Vec<f32> = read
        .targets
        .iter()
        .enumerate()
        .map(|(i, t)| t.map_or(0.0, |_| picked[i] - lse[i]))
        .collect();
    let out = logits.device().tensor_from_vec(log_probs, (b, s));
    let result = out.clone();
    // Its gradient's place, not its values: nothing keeps an output alive for its gradient.
    let out = out.ghost();
    tape.add_backward_op(move |grads| {
        let dy = std::mem::take(&mut **grads.get_or_alloc_mut(&out)?);
        let xs = elements(&logits);
        // d log p_t / d x = onehot(t) − softmax(x), written straight into the logits' gradient.
        let acc = grads.get_or_alloc_mut(&logits)?;
        read.add_gradient(acc, &xs, &lse, |i| -dy[i]);
        **grads.get_or_alloc_mut(&out)? = dy;
        Ok(())
    });
    Ok(result.put_tape(tape))
}

/// Each kernel against the same computation written with dfdx's own ops: values and the
/// gradients of every input, on shapes that exercise strided inputs, grouped-query attention,
/// prefixes, masks and dropout.
#[cfg(test)]
mod tests {
    use super::*;

    type T1 = Tensor<(usize,), f32, Cpu>;
    type T2 = Tensor<(usize, usize), f32, Cpu>;
    type T3 = Tensor<R3, f32, Cpu>;

    /// Deterministic values in [-1, 1).
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    fn t1(n: usize, seed: u64) -> T1 {
        Cpu::default().tensor_from_vec(values(n, seed), (n,))
    }
    fn t2(a: usize, b: usize, seed: u64) -> T2 {
        Cpu::default().tensor_from_vec(values(a * b, seed), (a, b))
    }
    fn t3(shape: R3, seed: u64) -> T3 {
        Cpu::default().tensor_from_vec(values(shape.0 * shape.1 * shape.2, seed), shape)
    }

    fn close(what: &str, got: &[f32], want: &[f32], tol: f32) {
        assert_eq!(got.len(), want.len(), "{what}: lengths");
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-3);
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= tol * scale,
                "{what}[{i}]: {g} vs {w} (scale {scale})"
            );
        }
    }

    /// The gradients two runs gave `t`, compared.
    fn close_grad<S: Shape>(
        what: &str,
        got: &Gradients<f32, Cpu>,
        want: &Gradients<f32, Cpu>,
        t: &Tensor<S, f32, Cpu>,
        tol: f32,
    ) {
        close(what, &got.get(t).as_vec(), &want.get(t).as_vec(), tol);
    }

    /// Σ out ∘ r for a fixed random r, so every output element has its own upstream gradient.
    fn probe<S: Shape>(out: Taped<S>, seed: u64) -> (Vec<f32>, Gradients<f32, Cpu>) {
        let value = out.as_vec();
        let shape = *out.shape();
        let r = Cpu::default().tensor_from_vec(values(shape.num_elements(), seed), shape);
        (value, (out * r).sum::<(), _>().backward())
    }

    #[test]
    fn linear_matches_matmul_for_both_layouts_with_and_without_bias() {
        for (out_in, with_bias, trainable) in [
            (false, true, true),
            (true, false, true),
            (true, true, false),
        ] {
            let (b, s, k, n) = (2, 5, 7, 3);
            let x = t3((b, s, k), 1);
            let w = if out_in { t2(n, k, 2) } else { t2(k, n, 2) };
            let bias = t1(n, 3);
            let fast = linear(
                x.clone().leaky_traced(),
                Weight {
                    w: w.clone(),
                    out_in,
                    trainable,
                },
                with_bias.then(|| Vector {
                    v: bias.clone(),
                    trainable: true,
                }),
                None,
            )
            .unwrap();
            let (fast_y, fast_g) = probe(fast, 9);
            let xt = x.clone().leaky_traced();
            let wt = w.clone().leaky_traced();
            let y = if out_in {
                xt.matmul(wt.permute::<_, Axes2<1, 0>>())
            } else {
                xt.matmul(wt)
            };
            let y = if with_bias {
                y + bias
                    .clone()
                    .leaky_traced()
                    .broadcast_like::<_, Axes2<0, 1>>(&(b, s, n))
            } else {
                y
            };
            let (ref_y, ref_g) = probe(y, 9);
            close("y", &fast_y, &ref_y, 1e-5);
            close_grad("dx", &fast_g, &ref_g, &x, 1e-5);
            if trainable {
                close_grad("dw", &fast_g, &ref_g, &w, 1e-5);
            }
            if with_bias {
                close_grad("db", &fast_g, &ref_g, &bias, 1e-5);
            }
        }
    }

    #[test]
    fn a_range_of_outputs_is_the_slice_of_the_full_product() {
        let (b, s, k, all) = (2, 3, 4, 9);
        for out_in in [false, true] {
            let x = t3((b, s, k), 40);
            let w = if out_in {
                t2(all, k, 41)
            } else {
                t2(k, all, 41)
            };
            let bias = t1(all, 42);
            let run = |range: Option<(usize, usize)>| {
                let y = linear(
                    x.clone().leaky_traced(),
                    Weight {
                        w: w.clone(),
                        out_in,
                        trainable: true,
                    },
                    Some(Vector {
                        v: bias.clone(),
                        trainable: true,
                    }),
                    range,
                )
                .unwrap();
                match range {
                    Some(_) => probe(y, 43),
                    None => probe(y.slice((.., .., 3..6)).realize::<R3>(), 43),
                }
            };
            let ((fy, fg), (ry, rg)) = (run(Some((3, 6))), run(None));
            close("y", &fy, &ry, 1e-6);
            close_grad("dx", &fg, &rg, &x, 1e-6);
            close_grad("dw", &fg, &rg, &w, 1e-6);
            close_grad("db", &fg, &rg, &bias, 1e-6);
        }
    }

    #[test]
    fn columns_match_dfdx_slices() {
        let x = t3((2, 3, 9), 50);
        let (fy, fg) = probe(columns(x.clone().leaky_traced(), 3, 7).unwrap(), 51);
        let reference = x
            .clone()
            .leaky_traced()
            .slice((.., .., 3..7))
            .realize::<R3>();
        let (ry, rg) = probe(reference, 51);
        close("y", &fy, &ry, 0.0);
        close_grad("dx", &fg, &rg, &x, 0.0);
        assert!(columns(x.leaky_traced(), 7, 10).is_err());
    }

    #[test]
    fn a_strided_input_is_read_in_its_logical_order() {
        // A transposed view: the kernel must not read the buffer in storage order.
        let x = t3((3, 4, 2), 4);
        let w = t2(4, 5, 5);
        let run = |fast: bool| {
            let xt = x.clone().leaky_traced().permute::<_, Axes3<0, 2, 1>>();
            let out = if fast {
                linear(
                    xt,
                    Weight {
                        w: w.clone(),
                        out_in: false,
                        trainable: true,
                    },
                    None,
                    None,
                )
                .unwrap()
            } else {
                xt.matmul(w.clone().leaky_traced())
            };
            probe(out, 6)
        };
        let ((fy, fg), (ry, rg)) = (run(true), run(false));
        close("y", &fy, &ry, 1e-5);
        close_grad("dx", &fg, &rg, &x, 1e-5);
    }

    #[test]
    fn activations_match_their_definitions_in_dfdx_ops() {
        // Wide inputs: the tails saturate, the middle is where the approximations work.
        let x = Cpu::default().tensor_from_vec(
            values(3 * 50 * 41, 7).iter().map(|v| v * 12.0).collect(),
            (3, 50, 41),
        );
        let silu = |x: Taped<R3>| {
            let (xs, tape) = x.split_tape();
            xs.clone().put_tape(tape).sigmoid() * xs
        };
        type Reference<'a> = &'a dyn Fn(Taped<R3>) -> Taped<R3>;
        let cases: [(Activation, Reference); 2] = [
            (Activation::GeluTanh, &|x| x.fast_gelu()),
            (Activation::Silu, &silu),
        ];
        for (act, reference) in cases {
            let (fy, fg) = probe(activation(x.clone().leaky_traced(), act), 8);
            let (ry, rg) = probe(reference(x.clone().leaky_traced()), 8);
            close("y", &fy, &ry, 2e-6);
            close_grad("dx", &fg, &rg, &x, 2e-6);
        }
    }

    #[test]
    fn erf_gelu_matches_dfdx_values_and_the_normal_density() {
        let xs = values(4000, 9);
        let x = Cpu::default().tensor_from_vec(xs.iter().map(|v| v * 8.0).collect(), (4000,));
        let (fy, fg) = probe(
            activation(x.clone().leaky_traced(), Activation::GeluErf),
            10,
        );
        let want = x.clone().accurate_gelu().as_vec();
        close("y", &fy, &want, 2e-6);
        // GELU(x) = x·Φ(x), so GELU'(x) = Φ(x) + x·φ(x) = GELU(x)/x + x·φ(x).
        let upstream = values(4000, 10);
        let got = fg.get(&x).as_vec();
        for (i, &v) in x.as_vec().iter().enumerate() {
            if v.abs() < 1e-2 {
                continue;
            }
            let (v64, gelu) = (f64::from(v), f64::from(want[i]));
            let density = (-0.5 * v64 * v64).exp() / (2.0 * std::f64::consts::PI).sqrt();
            let slope = gelu / v64 + v64 * density;
            let expected = f64::from(upstream[i]) * slope;
            assert!(
                (f64::from(got[i]) - expected).abs() < 2e-6,
                "GELU'({v}) x upstream = {}, expected {expected}",
                got[i]
            );
        }
    }

    #[test]
    fn exp_is_accurate_over_the_range_softmax_uses() {
        for i in 0..18_800 {
            let x = -100.0 + i as f32 * 0.01;
            let want = (x as f64).exp();
            let got = exp(x) as f64;
            if x < -87.3 {
                assert_eq!(got, 0.0);
            } else {
                assert!(
                    (got - want).abs() <= 3e-7 * want,
                    "exp({x}) = {got}, want {want}"
                );
            }
        }
    }

    #[test]
    fn layer_norm_matches_dfdx() {
        let shape = (2, 33, 37);
        let x = t3(shape, 10);
        let (w, b) = (t1(37, 11), t1(37, 12));
        let fast = layer_norm(
            x.clone().leaky_traced(),
            Vector {
                v: w.clone(),
                trainable: true,
            },
            Some(Vector {
                v: b.clone(),
                trainable: true,
            }),
            1e-5,
        )
        .unwrap();
        let (fy, fg) = probe(fast, 13);
        let reference = x.clone().leaky_traced().normalize::<Axis<2>>(1e-5)
            * w.clone()
                .leaky_traced()
                .broadcast_like::<_, Axes2<0, 1>>(&shape)
            + b.clone()
                .leaky_traced()
                .broadcast_like::<_, Axes2<0, 1>>(&shape);
        let (ry, rg) = probe(reference, 13);
        close("y", &fy, &ry, 1e-5);
        close_grad("dx", &fg, &rg, &x, 1e-4);
        close_grad("dw", &fg, &rg, &w, 1e-4);
        close_grad("db", &fg, &rg, &b, 1e-4);
    }

    /// The attention core written with dfdx ops, heads repeated for grouped queries.
    fn reference_attention(
        q: Taped<R3>,
        k: Taped<R3>,
        v: Taped<R3>,
        heads: Heads,
        mask: &[f32],
        dropout: Option<&[f32]>,
    ) -> Taped<R3> {
        let Heads {
            heads: h,
            kv_heads: kvh,
            dim: d,
        } = heads;
        let (b, s, _) = *q.shape();
        let skv = k.shape().1;
        let dev = Cpu::default();
        let expand = |t: Taped<R3>| {
            let t = t
                .reshape_like(&(b, skv, kvh, d))
                .permute::<_, Axes4<2, 0, 1, 3>>();
            let idx: Tensor<(usize,), usize, Cpu> =
                dev.tensor_from_vec((0..h).map(|i| i / (h / kvh)).collect(), (h,));
            let t: Taped<(usize, usize)> = t.reshape_like(&(kvh, b * skv * d)).gather(idx);
            t.reshape_like(&(h, b, skv, d))
                .permute::<_, Axes4<1, 0, 2, 3>>()
        };
        let q = q
            .reshape_like(&(b, s, h, d))
            .permute::<_, Axes4<0, 2, 1, 3>>();
        let scores = q.matmul(expand(k).permute::<_, Axes4<0, 1, 3, 2>>()) / (d as f32).sqrt();
        let mask = dev
            .tensor_from_vec(mask.to_vec(), (b, s, skv))
            .broadcast_like::<_, Axis<1>>(&(b, h, s, skv));
        let mut probs = (scores + mask).softmax::<Axis<3>>();
        if let Some(drop) = dropout {
            probs = probs * dev.tensor_from_vec(drop.to_vec(), (b, h, s, skv));
        }
        probs
            .matmul(expand(v))
            .permute::<_, Axes4<0, 2, 1, 3>>()
            .reshape_like(&(b, s, h * d))
    }

    #[test]
    fn attention_matches_dfdx_with_groups_prefixes_masks_and_dropout() {
        let heads = Heads {
            heads: 4,
            kv_heads: 2,
            dim: 3,
        };
        let (b, s, skv) = (2, 5, 7); // two keys of prefix before the sequence
        let q = t3((b, s, 12), 20);
        let k = t3((b, skv, 6), 21);
        let v = t3((b, skv, 6), 22);
        // Causal over the sequence, the prefix always visible, row 1's first token padded.
        let mut mask = vec![0.0f32; b * s * skv];
        for r in 0..b {
            for i in 0..s {
                for j in 0..skv {
                    if j > i + 2 || (r == 1 && j == 2) {
                        mask[(r * s + i) * skv + j] = f32::MIN;
                    }
                }
            }
        }
        let drop: Vec<f32> = values(b * 4 * s * skv, 23)
            .iter()
            .map(|v| if *v < -0.6 { 0.0 } else { 1.25 })
            .collect();
        for dropout in [None, Some(drop)] {
            let fast = attention(
                q.clone().leaky_traced(),
                k.clone(),
                v.clone(),
                heads,
                mask.clone(),
                dropout.clone(),
            )
            .unwrap();
            let (fy, fg) = probe(fast, 24);
            let reference = reference_attention(
                q.clone().leaky_traced(),
                k.clone().leaky_traced(),
                v.clone().leaky_traced(),
                heads,
                &mask,
                dropout.as_deref(),
            );
            let (ry, rg) = probe(reference, 24);
            close("y", &fy, &ry, 1e-5);
            close_grad("dq", &fg, &rg, &q, 1e-5);
            close_grad("dk", &fg, &rg, &k, 1e-5);
            close_grad("dv", &fg, &rg, &v, 1e-5);
        }
    }

    #[test]
    fn inconsistent_shapes_are_errors_not_out_of_bounds_accesses() {
        let heads = Heads {
            heads: 4,
            kv_heads: 2,
            dim: 3,
        };
        let q = t3((1, 5, 12), 60);
        let mask = vec![0.0; 5 * 7];
        for (k, v) in [
            ((1, 7, 6), (1, 7, 4)),
            ((1, 7, 6), (2, 7, 6)),
            ((1, 7, 5), (1, 7, 5)),
        ] {
            let run = attention(
                q.clone().leaky_traced(),
                t3(k, 61),
                t3(v, 62),
                heads,
                mask.clone(),
                None,
            );
            assert!(run.is_err(), "k {k:?}, v {v:?}");
        }
        let logits = t3((2, 3, 4), 63);
        for (positions, targets) in [(4, vec![0; 8]), (3, vec![0; 9]), (3, vec![4; 6])] {
            let weights = vec![1.0; targets.len()];
            let run = cross_entropy(
                logits.clone().leaky_traced(),
                positions,
                targets,
                weights,
                1.0,
                None,
            );
            assert!(run.is_err(), "{positions} positions");
        }
    }

    #[test]
    fn dropout_equals_a_product_with_its_mask() {
        let shape = (2, 3, 5);
        let x = t3(shape, 40);
        let keep: Vec<bool> = (0..30).map(|i| i % 3 != 1).collect();
        let scale = 1.0 / 0.9f32;
        let mask: Vec<f32> = keep.iter().map(|&k| if k { scale } else { 0.0 }).collect();
        let fast = dropout(x.clone().leaky_traced(), keep, scale).unwrap();
        let fast_values = fast.as_vec();
        let fast_grads = (fast * t3(shape, 41)).sum::<(), _>().backward();
        let reference = x.clone().leaky_traced() * Cpu::default().tensor_from_vec(mask, shape);
        let ref_values = reference.as_vec();
        let ref_grads = (reference * t3(shape, 41)).sum::<(), _>().backward();
        assert_eq!(fast_values, ref_values);
        assert_eq!(fast_grads.get(&x).as_vec(), ref_grads.get(&x).as_vec());
        assert!(dropout(x.leaky_traced(), vec![true; 29], scale).is_err());
    }

    /// Three ranks holding uneven column ranges of the vocabulary (as the tensor-parallel
    /// layout cuts 11 words) compute the loss of the whole logits, each the same, and together
    /// its gradient, with nothing but two numbers a row exchanged.
    #[test]
    fn vocabulary_parallel_cross_entropy_equals_the_whole_one() {
        use crate::parallel::collective::cpu_ring;
        use crate::parallel::tensor_parallel::VocabShard;
        use kiln_compiler::plan::sharding::VocabColumns;
        let (b, s, vocab, size) = (2, 5, 11, 3);
        let whole: Vec<f32> = values(b * s * vocab, 31).iter().map(|v| v * 6.0).collect();
        let positions = s - 1;
        let targets: Vec<usize> = (0..b * positions).map(|i| (i * 5 + 2) % vocab).collect();
        let weights: Vec<f32> = (0..b * positions)
            .map(|i| if i % 3 == 2 { 0.0 } else { 1.0 })
            .collect();
        let count: f32 = weights.iter().sum();
        let logits = Cpu::default().tensor_from_vec(whole.clone(), (b, s, vocab));
        let (ref_loss, ref_grad) = whole_cross_entropy(&logits, positions, &targets, &weights);
        let ranks: Vec<(f32, Vec<f32>, std::ops::Range<usize>)> = std::thread::scope(|scope| {
            let handles: Vec<_> = cpu_ring(size)
                .into_iter()
                .enumerate()
                .map(|(rank, mut ring)| {
                    let (whole, targets, weights) = (&whole, targets.clone(), weights.clone());
                    scope.spawn(move || {
                        let columns = rank * vocab / size..(rank + 1) * vocab / size;
                        let local: Vec<f32> = whole
                            .chunks(vocab)
                            .flat_map(|row| row[columns.clone()].to_vec())
                            .collect();
                        let logits = Cpu::default().tensor_from_vec(local, (b, s, columns.len()));
                        let at = VocabColumns {
                            columns: columns.clone(),
                            vocab,
                        };
                        let loss = cross_entropy(
                            logits.clone().leaky_traced(),
                            positions,
                            targets,
                            weights,
                            count,
                            Some(VocabShard {
                                at: &at,
                                group: &mut ring,
                            }),
                        )
                        .unwrap();
                        let value = loss.as_vec()[0];
                        (value, loss.backward().get(&logits).as_vec(), columns)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (loss, grad, columns) in &ranks {
            close("loss", &[*loss], &[ref_loss], 1e-6);
            let want: Vec<f32> = ref_grad
                .chunks(vocab)
                .flat_map(|row| row[columns.clone()].to_vec())
                .collect();
            close("gradient", grad, &want, 1e-6);
        }
    }

    #[test]
    fn cross_entropy_matches_log_softmax_with_shift_and_ignored_positions() {
        let (b, s, vocab) = (3, 6, 11);
        let logits = Cpu::default().tensor_from_vec(
            values(b * s * vocab, 30).iter().map(|v| v * 8.0).collect(),
            (b, s, vocab),
        );
        let positions = s - 1;
        let targets: Vec<usize> = (0..b * positions).map(|i| (i * 7) % vocab).collect();
        let weights: Vec<f32> = (0..b * positions)
            .map(|i| if i % 4 == 1 { 0.0 } else { 1.0 })
            .collect();
        let count: f32 = weights.iter().sum();
        let (fast_loss, fast_grad) = whole_cross_entropy(&logits, positions, &targets, &weights);
        let dev = Cpu::default();
        let picked: Taped<(usize, usize)> = logits
            .clone()
            .leaky_traced()
            .slice((.., 0..positions, ..))
            .realize::<R3>()
            .log_softmax::<Axis<2>>()
            .select(dev.tensor_from_vec(targets, (b, positions)));
        let reference = (picked * dev.tensor_from_vec(weights, (b, positions)))
            .sum::<(), _>()
            .negate()
            / count;
        let ref_loss = reference.as_vec()[0];
        let ref_grads = reference.backward();
        close("loss", &[fast_loss], &[ref_loss], 1e-6);
        close(
            "dlogits",
            &fast_grad,
            &ref_grads.get(&logits).as_vec(),
            1e-5,
        );
    }

    /// The kernel's loss over all of `logits` and its gradient.
    fn whole_cross_entropy(
        logits: &T3,
        positions: usize,
        targets: &[usize],
        weights: &[f32],
    ) -> (f32, Vec<f32>) {
        let count = weights.iter().sum();
        let loss = cross_entropy(
            logits.clone().leaky_traced(),
            positions,
            targets.to_vec(),
            weights.to_vec(),
            count,
            None,
        )
        .unwrap();
        let value = loss.as_vec()[0];
        (value, loss.backward().get(logits).as_vec())
    }

    #[test]
    fn token_log_probs_match_log_softmax_and_skip_positions_without_a_token() {
        let (b, s, vocab) = (3, 5, 13);
        let logits = t3((b, s, vocab), 31);
        let logits = Cpu::default().tensor_from_vec(
            logits.as_vec().iter().map(|v| v * 6.0).collect(),
            (b, s, vocab),
        );
        let targets: Vec<Option<usize>> = (0..b * s)
            .map(|i| (i % 3 != 0).then_some((i * 5) % vocab))
            .collect();
        let (fast, fast_g) = probe(
            token_log_probs(logits.clone().leaky_traced(), targets.clone(), None).unwrap(),
            32,
        );
        let dev = Cpu::default();
        let ids = targets.iter().map(|t| t.unwrap_or(0)).collect();
        let used = targets
            .iter()
            .map(|t| if t.is_some() { 1.0 } else { 0.0 })
            .collect();
        let picked: Taped<(usize, usize)> = logits
            .clone()
            .leaky_traced()
            .log_softmax::<Axis<2>>()
            .select(dev.tensor_from_vec(ids, (b, s)));
        let (reference, ref_g) = probe(picked * dev.tensor_from_vec(used, (b, s)), 32);
        close("log-probs", &fast, &reference, 1e-6);
        assert!(fast.iter().step_by(3).all(|&v| v == 0.0));
        close(
            "dlogits",
            &fast_g.get(&logits).as_vec(),
            &ref_g.get(&logits).as_vec(),
            1e-5,
        );
    }
}
