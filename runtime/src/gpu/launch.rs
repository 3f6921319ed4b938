//! Running a kernel: device buffers that know their length, the [`Launcher`] that runs a
//! kernel by name (the CUDA driver; the host emulation in tests), and one call per kernel that
//! checks its buffers against the shape it is given and picks its grid, so that a wrong size
//! is an error, never a write out of bounds.

use super::GpuError;
use crate::exec::precision::Format;
use std::ffi::c_void;
use std::marker::PhantomData;

/// `len` elements of `T` at an address of the device kernels run on (a host address under the
/// emulation), borrowed for `'a` from what holds them (the device that made it).
#[derive(Debug)]
pub struct Buffer<'a, T> {
    address: u64,
    len: usize,
    element: PhantomData<&'a [T]>,
}

impl<T> Clone for Buffer<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Buffer<'_, T> {}

impl<T> Buffer<'_, T> {
    /// # Safety
    /// `address` holds `len` elements of `T` on the device kernels run on, for as long as the
    /// buffer (its lifetime) lasts.
    pub unsafe fn from_raw(address: u64, len: usize) -> Self {
        Buffer {
            address,
            len,
            element: PhantomData,
        }
    }

    /// Where the values start on the device.
    pub fn address(&self) -> u64 {
        self.address
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Elements `start..start + len` of the buffer, if it holds them.
    pub fn range(&self, start: usize, len: usize) -> Option<Self> {
        let end = start.checked_add(len)?;
        (end <= self.len).then(|| Buffer {
            address: self.address + (start * std::mem::size_of::<T>()) as u64,
            len,
            element: PhantomData,
        })
    }
}

/// An optional buffer's address as a kernel reads it: 0 for none.
fn address_of<T>(buffer: Option<Buffer<'_, T>>) -> u64 {
    buffer.map_or(0, |b| b.address)
}

/// A launch's grid (blocks along x, y, z) and threads per block.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Grid {
    pub blocks: [u32; 3],
    pub threads: u32,
}

/// What runs Kiln's kernels by name.
pub trait Launcher {
    /// Runs `kernel` over `grid`.
    ///
    /// # Safety
    /// `args` point at values of the kernel's parameters, in order and of their C types, and
    /// every address among them holds what the kernel reads and writes over this grid.
    unsafe fn launch(
        &self,
        kernel: &'static str,
        grid: Grid,
        args: &mut [*mut c_void],
    ) -> Result<(), GpuError>;
}

/// Launches `kernel` with the named locals as its arguments (each taken by address, as
/// cuLaunchKernel reads them). Only for the typed calls (`Kernels`), which check every buffer
/// first.
macro_rules! launch {
    ($launcher:expr, $kernel:literal, $grid:expr; $($arg:ident),* $(,)?) => {{
        $(let mut $arg = $arg;)*
        let mut args = [$(&mut $arg as *mut _ as *mut c_void),*];
        // SAFETY: the caller checked each buffer's length against the shape the kernel reads.
        unsafe { $launcher.launch($kernel, $grid, &mut args) }
    }};
}

/// The activations the elementwise kernels compute (`elementwise.cu`'s codes).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Activation {
    GeluTanh = 0,
    GeluErf = 1,
    Silu = 2,
}

/// The number format's code in `common.cuh`.
fn format_code(format: Format) -> i32 {
    match format {
        Format::F32 => 0,
        Format::Bf16 => 1,
        Format::F16 => 2,
    }
}

/// What attention's kernels read of its geometry (`AttentionShape` in `attention.cu`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AttentionShape {
    pub batch: u32,
    /// Queries per row.
    pub s: u32,
    /// Keys per row: the queries' own and, before them, `s_kv - s` prefix keys.
    pub s_kv: u32,
    pub heads: u32,
    pub kv_heads: u32,
    /// Head width.
    pub d: u32,
    pub causal: bool,
}

/// `AttentionShape` as the kernels take it.
#[repr(C)]
#[derive(Clone, Copy)]
struct KernelShape {
    s: u32,
    skv: u32,
    heads: u32,
    kv_heads: u32,
    d: u32,
    causal: i32,
}

/// How dropout draws its mask (on attention's probabilities, or any value): each batch row's
/// key (`rng::Key` of the node and the row's global index) and where this device's share
/// starts in the row's elements (for attention, its first head's).
#[derive(Clone, Copy, Debug)]
pub struct DropoutDraw<'a> {
    pub row_keys: Buffer<'a, u64>,
    /// p of 2^64: an element is kept where its bits reach it.
    pub threshold: u64,
    /// The row's first element this device holds (attention: `first head · s · s_kv`).
    pub offset: u64,
    /// 1/(1 − p).
    pub scale: f32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct KernelDropout {
    row_keys: u64,
    threshold: u64,
    offset: u64,
    scale: f32,
}

/// Attention's tensors: q `[b, s, heads·d]`, k and v `[b, s_kv, kv_heads·d]`, `key_keep`
/// `[b, s_kv]` (1 where a key may be attended to; none: every key), y `[b, s, heads·d]`,
/// `stats` `[b, heads, s, 2]` (kept for the backward).
#[derive(Clone, Copy, Debug)]
pub struct AttentionTensors<'a> {
    pub q: Buffer<'a, f32>,
    pub k: Buffer<'a, f32>,
    pub v: Buffer<'a, f32>,
    pub key_keep: Option<Buffer<'a, f32>>,
    pub y: Buffer<'a, f32>,
    pub stats: Buffer<'a, f32>,
}

impl AttentionTensors<'_> {
    /// The addresses the kernels take, in their order: q, k, v, key_keep (0: none), y, stats.
    fn addresses(&self) -> [u64; 6] {
        [
            self.q.address,
            self.k.address,
            self.v.address,
            address_of(self.key_keep),
            self.y.address,
            self.stats.address,
        ]
    }
}

/// Attention's gradients: dy in; dq, dk, dv added to; `delta` `[b, heads, s]` is scratch.
#[derive(Clone, Copy, Debug)]
pub struct AttentionGradients<'a> {
    pub dy: Buffer<'a, f32>,
    pub dq: Buffer<'a, f32>,
    pub dk: Buffer<'a, f32>,
    pub dv: Buffer<'a, f32>,
    pub delta: Buffer<'a, f32>,
}

/// The rows a log-softmax at a target reads: `logits` `[b, seq, width]` (this device's
/// `width` columns of the vocabulary, from column `first` on), target row i at position
/// i % `positions` of sequence i / `positions` (a loss reads the first `positions` of each
/// sequence; token log-probabilities read all `seq`).
#[derive(Clone, Copy, Debug)]
pub struct TargetRows<'a> {
    pub logits: Buffer<'a, f32>,
    pub positions: usize,
    pub seq: usize,
    pub width: usize,
    pub first: i64,
}

impl TargetRows<'_> {
    /// What both target kernels take of the rows, in their order (after `check`, which
    /// narrowed each count): logits, rows, positions, seq, width, first column.
    fn kernel_args(&self, n: usize) -> (u64, u32, u32, u32, u32, i64) {
        let count = |x: usize| x as u32;
        (
            self.logits.address,
            count(n),
            count(self.positions),
            count(self.seq),
            count(self.width),
            self.first,
        )
    }

    /// The number of target rows, checked to lie within the logits, and the kernels' grid.
    fn check(&self, targets: Buffer<'_, i64>) -> Result<(usize, Grid), GpuError> {
        let n = targets.len;
        let TargetRows {
            positions,
            seq,
            width,
            ..
        } = *self;
        // The element just past the last row read.
        let end = (positions >= 1 && positions <= seq && width >= 1)
            .then(|| {
                let last = n.saturating_sub(1);
                ((last / positions).checked_mul(seq)? + last % positions + 1).checked_mul(width)
            })
            .flatten();
        let whole_rows = seq
            .checked_mul(width)
            .is_some_and(|row| row > 0 && self.logits.len.is_multiple_of(row));
        if !(end.is_some_and(|end| end <= self.logits.len) && whole_rows) {
            return Err(GpuError(format!(
                "{n} target rows over {positions} of {seq} positions of {width} columns in {} logits",
                self.logits.len
            )));
        }
        // The kernels take these as 32-bit counts.
        narrow("seq", seq)?;
        narrow("width", width)?;
        Ok((
            n,
            Grid {
                blocks: [blocks_along_x("target rows", n.max(1))?, 1, 1],
                threads: row_threads(width),
            },
        ))
    }
}

/// Widest head the attention kernels' shared tiles hold. This and the next three are the
/// kernels' too: `source::Source::program` defines them for the compiler.
pub const ATTENTION_MAX_HEAD_DIM: u32 = 128;
/// Query rows per block of the query-side attention kernels (a warp each), keys per tile.
pub(super) const ATTENTION_QUERIES: u32 = 4;
pub(super) const ATTENTION_KEYS: u32 = 32;
/// Rows per block of `norm_backward`, each block writing one partial sum per column.
pub(super) const NORM_ROWS_PER_BLOCK: usize = 32;
/// A CUDA grid's limit along y and z.
const GRID_YZ_LIMIT: u32 = 65_535;

/// The typed calls of Kiln's kernels on a launcher.
pub struct Kernels<'a, L: Launcher + ?Sized>(pub &'a L);

pub(super) fn check(what: &str, len: usize, expected: usize) -> Result<(), GpuError> {
    if len == expected {
        Ok(())
    } else {
        Err(GpuError(format!(
            "{what} holds {len} values where the kernel reads {expected}"
        )))
    }
}

pub(super) fn narrow(what: &str, n: usize) -> Result<u32, GpuError> {
    u32::try_from(n).map_err(|_| GpuError(format!("{what} = {n} exceeds a kernel's 32-bit index")))
}

/// A grid's blocks along x: CUDA takes up to 2^31 − 1.
fn blocks_along_x(what: &str, n: usize) -> Result<u32, GpuError> {
    match u32::try_from(n) {
        Ok(blocks) if blocks <= i32::MAX as u32 => Ok(blocks),
        _ => Err(GpuError(format!(
            "{what} = {n} needs more blocks than a grid holds (2^31 - 1)"
        ))),
    }
}

/// The product of a tensor's extents, or an error where it overflows.
fn elements(what: &str, extents: &[usize]) -> Result<usize, GpuError> {
    extents
        .iter()
        .try_fold(1usize, |n, &e| n.checked_mul(e))
        .ok_or_else(|| GpuError(format!("{what} of extents {extents:?} overflows")))
}

/// An elementwise kernel's grid: grid-stride loops, so a bounded grid covers any length.
pub(super) fn elementwise_grid(n: usize) -> Grid {
    const THREADS: usize = 256;
    Grid {
        blocks: [n.div_ceil(THREADS).clamp(1, 4096) as u32, 1, 1],
        threads: THREADS as u32,
    }
}

/// Threads of a kernel with one block per row: whole warps, up to 256, no more than the row
/// has columns for.
fn row_threads(width: usize) -> u32 {
    width.next_multiple_of(32).clamp(32, 256) as u32
}

impl<L: Launcher + ?Sized> Kernels<'_, L> {
    /// y = x rounded to `format` (in f32).
    pub fn round_to_format(
        &self,
        x: Buffer<'_, f32>,
        y: Buffer<'_, f32>,
        format: Format,
    ) -> Result<(), GpuError> {
        check("the rounded values", y.len, x.len)?;
        let grid = elementwise_grid(x.len);
        let (x, y, n, format) = (x.address, y.address, x.len as u64, format_code(format));
        launch!(self.0, "round_to_format", grid; x, y, n, format)
    }

    /// y = act(x).
    pub fn activation_forward(
        &self,
        x: Buffer<'_, f32>,
        y: Buffer<'_, f32>,
        act: Activation,
    ) -> Result<(), GpuError> {
        check("the activation's output", y.len, x.len)?;
        let grid = elementwise_grid(x.len);
        let (x, y, n, kind) = (x.address, y.address, x.len as u64, act as i32);
        launch!(self.0, "activation_forward", grid; x, y, n, kind)
    }

    /// dx += dy · act'(x).
    pub fn activation_backward(
        &self,
        x: Buffer<'_, f32>,
        dy: Buffer<'_, f32>,
        dx: Buffer<'_, f32>,
        act: Activation,
    ) -> Result<(), GpuError> {
        check("the activation's upstream gradient", dy.len, x.len)?;
        check("the activation's input gradient", dx.len, x.len)?;
        let grid = elementwise_grid(x.len);
        let (x, dy, dx, n, kind) = (x.address, dy.address, dx.address, x.len as u64, act as i32);
        launch!(self.0, "activation_backward", grid; x, dy, dx, n, kind)
    }

    /// Layer norm (`centred`, with an optional bias) or RMS norm over rows of `width`:
    /// y = (x − mean)/√(var + eps)·w (+ b); `stats` `[rows, 2]` keeps (mean, 1/σ).
    #[allow(clippy::too_many_arguments)]
    pub fn norm_forward(
        &self,
        x: Buffer<'_, f32>,
        w: Buffer<'_, f32>,
        b: Option<Buffer<'_, f32>>,
        y: Buffer<'_, f32>,
        stats: Buffer<'_, f32>,
        width: usize,
        eps: f32,
        centred: bool,
    ) -> Result<(), GpuError> {
        let rows = norm_rows(x, width)?;
        check("the norm's weight", w.len, width)?;
        if let Some(b) = b {
            check("the norm's bias", b.len, width)?;
        }
        check("the norm's output", y.len, x.len)?;
        check("the norm's statistics", stats.len, 2 * rows)?;
        let grid = Grid {
            blocks: [blocks_along_x("rows", rows)?, 1, 1],
            threads: row_threads(width),
        };
        let (x, w, b, y, stats) = (
            x.address,
            w.address,
            address_of(b),
            y.address,
            stats.address,
        );
        let (rows, width, centred) = (
            narrow("rows", rows)?,
            narrow("width", width)?,
            i32::from(centred),
        );
        launch!(self.0, "norm_forward", grid; x, w, b, y, stats, rows, width, eps, centred)
    }

    /// The norm's backward: dx += ∂/∂x, and the weight's and bias's gradients added to `dw`,
    /// `db` where given (summed over rows in a fixed order through `scratch`).
    #[allow(clippy::too_many_arguments)]
    pub fn norm_backward(
        &self,
        x: Buffer<'_, f32>,
        w: Buffer<'_, f32>,
        stats: Buffer<'_, f32>,
        dy: Buffer<'_, f32>,
        dx: Buffer<'_, f32>,
        dw: Option<Buffer<'_, f32>>,
        db: Option<Buffer<'_, f32>>,
        scratch: Buffer<'_, f32>,
        width: usize,
        centred: bool,
    ) -> Result<(), GpuError> {
        let rows = norm_rows(x, width)?;
        check("the norm's weight", w.len, width)?;
        check("the norm's statistics", stats.len, 2 * rows)?;
        check("the norm's upstream gradient", dy.len, x.len)?;
        check("the norm's input gradient", dx.len, x.len)?;
        check(
            "the norm's scratch",
            scratch.len,
            norm_backward_scratch(rows, width),
        )?;
        for grad in [dw, db].into_iter().flatten() {
            check("a norm parameter's gradient", grad.len, width)?;
        }
        let blocks = blocks_along_x("row blocks", rows.div_ceil(NORM_ROWS_PER_BLOCK))?;
        let grid = Grid {
            blocks: [blocks, 1, 1],
            threads: row_threads(width),
        };
        let partial = scratch.address;
        {
            let (x, w, stats, dy, dx) =
                (x.address, w.address, stats.address, dy.address, dx.address);
            let (rows, width, centred) = (
                narrow("rows", rows)?,
                narrow("width", width)?,
                i32::from(centred),
            );
            launch!(self.0, "norm_backward", grid; x, w, stats, dy, dx, partial, rows, width, centred)?;
        }
        // The partials are [blocks, 2, width]: the weight's half first, then the bias's.
        for (half, grad) in [dw, db].into_iter().enumerate() {
            let Some(grad) = grad else { continue };
            let grid = Grid {
                blocks: [width.div_ceil(256) as u32, 1, 1],
                threads: 256,
            };
            let partial = partial + (half * width * std::mem::size_of::<f32>()) as u64;
            let (out, width, stride) = (grad.address, width as u32, 2 * width as u64);
            launch!(self.0, "column_sums", grid; partial, out, blocks, width, stride)?;
        }
        Ok(())
    }

    /// Per target row i: `lse[i]` = log Σ exp of its logits, `picked[i]` = the target's logit
    /// where it is among this device's columns, else 0 (a negative target: no target, the row
    /// not read).
    pub fn softmax_statistics(
        &self,
        rows: TargetRows<'_>,
        targets: Buffer<'_, i64>,
        lse: Buffer<'_, f32>,
        picked: Buffer<'_, f32>,
    ) -> Result<(), GpuError> {
        let (n, grid) = rows.check(targets)?;
        check("the log Σ exp per row", lse.len, n)?;
        check("the target logits", picked.len, n)?;
        let (logits, n, positions, seq, width, first) = rows.kernel_args(n);
        let (targets, lse, picked) = (targets.address, lse.address, picked.address);
        launch!(self.0, "softmax_statistics", grid; logits, targets, lse, picked, n, positions, seq, width, first)
    }

    /// grad[row i] += coef[i]·(softmax(row i) − onehot(target i)) for every row with a target,
    /// `lse` the rows' log Σ exp over the whole vocabulary.
    pub fn softmax_target_backward(
        &self,
        rows: TargetRows<'_>,
        targets: Buffer<'_, i64>,
        lse: Buffer<'_, f32>,
        coef: Buffer<'_, f32>,
        grad: Buffer<'_, f32>,
    ) -> Result<(), GpuError> {
        let (n, grid) = rows.check(targets)?;
        check("the log Σ exp per row", lse.len, n)?;
        check("the coefficient per row", coef.len, n)?;
        check("the logits' gradient", grad.len, rows.logits.len)?;
        let (logits, n, positions, seq, width, first) = rows.kernel_args(n);
        let (targets, lse, coef, grad) = (targets.address, lse.address, coef.address, grad.address);
        launch!(self.0, "softmax_target_backward", grid; logits, targets, lse, coef, grad, n, positions, seq, width, first)
    }

    /// One AdamW step over a flat parameter (`train::optim::step`'s arithmetic): `step`
    /// counts from 1.
    #[allow(clippy::too_many_arguments)]
    pub fn adamw_step(
        &self,
        param: Buffer<'_, f32>,
        m: Buffer<'_, f32>,
        v: Buffer<'_, f32>,
        grad: Buffer<'_, f32>,
        lr: f64,
        (beta1, beta2): (f64, f64),
        eps: f64,
        weight_decay: f64,
        step: u64,
    ) -> Result<(), GpuError> {
        for (what, b) in [
            ("first moment", m),
            ("second moment", v),
            ("gradient", grad),
        ] {
            check(what, b.len, param.len)?;
        }
        let grid = elementwise_grid(param.len);
        let exponent = i32::try_from(step).unwrap_or(i32::MAX);
        let (correction1, correction2) = (1.0 - beta1.powi(exponent), 1.0 - beta2.powi(exponent));
        let (p, m, v, g, n) = (
            param.address,
            m.address,
            v.address,
            grad.address,
            param.len as u64,
        );
        let (beta1, beta2, lr32, decay) = (
            beta1 as f32,
            beta2 as f32,
            lr as f32,
            (lr * weight_decay) as f32,
        );
        launch!(self.0, "adamw_step", grid; p, m, v, g, n, beta1, beta2, correction1, correction2, lr32, decay, eps)
    }

    /// The attention core's forward: y and the per-row statistics of `tensors`.
    pub fn attention_forward(
        &self,
        shape: AttentionShape,
        tensors: AttentionTensors<'_>,
        dropout: Option<DropoutDraw<'_>>,
    ) -> Result<(), GpuError> {
        let (kernel_shape, drop) = check_attention(shape, &tensors, dropout)?;
        let grid = query_grid(shape);
        let [q, k, v, keep, y, stats] = tensors.addresses();
        launch!(self.0, "attention_forward", grid; q, k, v, keep, y, stats, kernel_shape, drop)
    }

    /// The attention core's backward from the forward's `tensors` (y and stats as it left
    /// them): dq, dk and dv added to.
    pub fn attention_backward(
        &self,
        shape: AttentionShape,
        tensors: AttentionTensors<'_>,
        grads: AttentionGradients<'_>,
        dropout: Option<DropoutDraw<'_>>,
    ) -> Result<(), GpuError> {
        let (kernel_shape, drop) = check_attention(shape, &tensors, dropout)?;
        check("attention's upstream gradient", grads.dy.len, tensors.y.len)?;
        check("the queries' gradient", grads.dq.len, tensors.q.len)?;
        check("the keys' gradient", grads.dk.len, tensors.k.len)?;
        check("the values' gradient", grads.dv.len, tensors.v.len)?;
        check(
            "attention's Δ per row",
            grads.delta.len,
            tensors.stats.len / 2,
        )?;
        let [q, k, v, keep, y, stats] = tensors.addresses();
        let (dy, dq, dk, dv, delta) = (
            grads.dy.address,
            grads.dq.address,
            grads.dk.address,
            grads.dv.address,
            grads.delta.address,
        );
        // The query side first: it writes Δ, which the key side reads.
        let grid = query_grid(shape);
        launch!(self.0, "attention_backward_query", grid; q, k, v, keep, y, dy, stats, dq, delta, kernel_shape, drop)?;
        let grid = Grid {
            blocks: [
                shape.s_kv.div_ceil(ATTENTION_KEYS),
                shape.kv_heads,
                shape.batch,
            ],
            threads: 4 * ATTENTION_KEYS,
        };
        launch!(self.0, "attention_backward_key_value", grid; q, k, v, keep, dy, stats, delta, dk, dv, kernel_shape, drop)
    }
}

/// The scratch values the norm's backward needs for `rows` rows of `width`.
pub fn norm_backward_scratch(rows: usize, width: usize) -> usize {
    rows.div_ceil(NORM_ROWS_PER_BLOCK) * 2 * width
}

fn norm_rows(x: Buffer<'_, f32>, width: usize) -> Result<usize, GpuError> {
    if width == 0 || !x.len.is_multiple_of(width) || x.len == 0 {
        return Err(GpuError(format!(
            "a norm over rows of {width} of {} values",
            x.len
        )));
    }
    Ok(x.len / width)
}

fn query_grid(shape: AttentionShape) -> Grid {
    Grid {
        blocks: [
            shape.s.div_ceil(ATTENTION_QUERIES),
            shape.heads,
            shape.batch,
        ],
        threads: ATTENTION_QUERIES * 32,
    }
}

fn check_attention(
    shape: AttentionShape,
    t: &AttentionTensors<'_>,
    dropout: Option<DropoutDraw<'_>>,
) -> Result<(KernelShape, KernelDropout), GpuError> {
    let AttentionShape {
        batch,
        s,
        s_kv,
        heads,
        kv_heads,
        d,
        causal,
    } = shape;
    if batch == 0
        || s == 0
        || s_kv < s
        || heads == 0
        || kv_heads == 0
        || heads % kv_heads != 0
        || d == 0
    {
        return Err(GpuError(format!(
            "attention of {s} queries over {s_kv} keys, {heads} heads over {kv_heads} key/value heads of width {d}, batch {batch}"
        )));
    }
    if d > ATTENTION_MAX_HEAD_DIM {
        return Err(GpuError(format!(
            "attention heads of width {d}: the GPU kernels hold heads up to {ATTENTION_MAX_HEAD_DIM} wide"
        )));
    }
    if heads > GRID_YZ_LIMIT || batch > GRID_YZ_LIMIT {
        return Err(GpuError(format!(
            "attention over {heads} heads and a batch of {batch}: a grid holds {GRID_YZ_LIMIT} along each"
        )));
    }
    let (b, s_, skv, h, kvh, d_) = (
        batch as usize,
        s as usize,
        s_kv as usize,
        heads as usize,
        kv_heads as usize,
        d as usize,
    );
    let queries = elements("the queries", &[b, s_, h, d_])?;
    let keys = elements("the keys", &[b, skv, kvh, d_])?;
    check("the queries", t.q.len, queries)?;
    check("the keys", t.k.len, keys)?;
    check("the values", t.v.len, keys)?;
    if let Some(keep) = t.key_keep {
        check(
            "the key mask",
            keep.len,
            elements("the key mask", &[b, skv])?,
        )?;
    }
    check("attention's output", t.y.len, queries)?;
    check(
        "attention's statistics",
        t.stats.len,
        elements("attention's statistics", &[b, h, s_, 2])?,
    )?;
    if let Some(drop) = dropout {
        check("the dropout keys", drop.row_keys.len, b)?;
    }
    let kernel_shape = KernelShape {
        s,
        skv: s_kv,
        heads,
        kv_heads,
        d,
        causal: i32::from(causal),
    };
    let drop = match dropout {
        Some(drop) => KernelDropout {
            row_keys: drop.row_keys.address,
            threshold: drop.threshold,
            offset: drop.offset,
            scale: drop.scale,
        },
        None => KernelDropout {
            row_keys: 0,
            threshold: 0,
            offset: 0,
            scale: 1.0,
        },
    };
    Ok((kernel_shape, drop))
}
