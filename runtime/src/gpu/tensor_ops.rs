//! The typed calls of `tensor.cu`'s kernels (gathers and their sums back, column ranges, sums
//! and products with broadcasting, the rotary embedding, dropout's factors), each checking its
//! buffers as `launch`'s calls do; and [`RowIndex`], the ids of an embedding lookup checked
//! against the table before they reach the device.

use super::launch::{
    check, elementwise_grid, narrow, Buffer, DropoutDraw, Grid, Kernels, Launcher,
};
use super::memory::{Memory, Owned};
use super::GpuError;
use std::ffi::c_void;

/// The ids of a lookup of `table_rows` rows, on the device, with the positions that read
/// each row grouped by row (ascending positions within a row), for the backward to sum them
/// in a fixed order.
pub struct RowIndex<'m, M: Memory + ?Sized> {
    ids: Owned<'m, M, i64>,
    /// Positions sorted by the row they read; `starts[u]..starts[u + 1]` read `rows[u]`.
    order: Owned<'m, M, i64>,
    starts: Owned<'m, M, i64>,
    rows: Owned<'m, M, i64>,
    table_rows: usize,
}

impl<'m, M: Memory + ?Sized> RowIndex<'m, M> {
    /// `ids`, each checked to name one of `table_rows` rows.
    pub fn new(memory: &'m M, ids: &[i64], table_rows: usize) -> Result<Self, GpuError> {
        if let Some(bad) = ids
            .iter()
            .find(|&&id| usize::try_from(id).map_or(true, |id| id >= table_rows))
        {
            return Err(GpuError(format!(
                "id {bad} is outside a table of {table_rows} rows"
            )));
        }
        let mut order: Vec<i64> = (0..ids.len() as i64).collect();
        // Stable: positions reading one row stay ascending.
        order.sort_by_key(|&p| ids[p as usize]);
        let mut starts = Vec::new();
        let mut rows = Vec::new();
        for (at, &p) in order.iter().enumerate() {
            let row = ids[p as usize];
            if rows.last() != Some(&row) {
                rows.push(row);
                starts.push(at as i64);
            }
        }
        starts.push(order.len() as i64);
        Ok(RowIndex {
            ids: Owned::upload(memory, ids)?,
            order: Owned::upload(memory, &order)?,
            starts: Owned::upload(memory, &starts)?,
            rows: Owned::upload(memory, &rows)?,
            table_rows,
        })
    }

    /// How many ids.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// A range of columns copied between two row-major tensors of `rows` rows: `cols` columns
/// from column `src_at` of rows `src_stride` wide to column `dst_at` of rows `dst_stride`
/// wide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Columns {
    pub rows: usize,
    pub cols: usize,
    pub src_stride: usize,
    pub src_at: usize,
    pub dst_stride: usize,
    pub dst_at: usize,
}

/// The rotary embedding's geometry: x is `[rows, seq, heads, d]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RotaryShape {
    pub seq: usize,
    pub heads: usize,
    pub d: usize,
}

/// Which way the rotary embedding turns: the forward's, or back (its transpose).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Turn {
    Forward,
    Back,
}

impl<L: Launcher + ?Sized> Kernels<'_, L> {
    /// out[i, :] = table[ids[i], :], rows of `width`.
    pub fn gather_rows<M: Memory + ?Sized>(
        &self,
        table: Buffer<'_, f32>,
        index: &RowIndex<'_, M>,
        out: Buffer<'_, f32>,
        width: usize,
    ) -> Result<(), GpuError> {
        let n = index.len();
        check_table(table, index, width)?;
        check("the gathered rows", out.len(), n * width)?;
        let grid = elementwise_grid(out.len());
        let (table, ids, out, n, width) = (
            table.address(),
            index.ids.buffer().address(),
            out.address(),
            n as u64,
            narrow("the rows' width", width)?,
        );
        launch!(self.0, "gather_rows", grid; table, ids, out, n, width)
    }

    /// The gather's backward: dtable[ids[i], :] += dy[i, :], each table row's sum in order.
    pub fn scatter_rows<M: Memory + ?Sized>(
        &self,
        dy: Buffer<'_, f32>,
        index: &RowIndex<'_, M>,
        dtable: Buffer<'_, f32>,
        width: usize,
    ) -> Result<(), GpuError> {
        check_table(dtable, index, width)?;
        check("the rows' gradient", dy.len(), index.len() * width)?;
        let unique = index.rows.len();
        let grid = elementwise_grid(unique * width);
        let (dy, order, starts, rows, dtable, unique, width) = (
            dy.address(),
            index.order.buffer().address(),
            index.starts.buffer().address(),
            index.rows.buffer().address(),
            dtable.address(),
            unique as u64,
            narrow("the rows' width", width)?,
        );
        launch!(self.0, "scatter_rows", grid; dy, order, starts, rows, dtable, unique, width)
    }

    /// dst's `columns` += src's.
    pub fn add_columns(
        &self,
        src: Buffer<'_, f32>,
        dst: Buffer<'_, f32>,
        columns: Columns,
    ) -> Result<(), GpuError> {
        let Columns {
            rows,
            cols,
            src_stride,
            src_at,
            dst_stride,
            dst_at,
        } = columns;
        for (what, buffer, stride, at) in [
            ("source", src, src_stride, src_at),
            ("destination", dst, dst_stride, dst_at),
        ] {
            let fits = at.checked_add(cols).is_some_and(|end| end <= stride)
                && rows
                    .checked_mul(stride)
                    .is_some_and(|len| len == buffer.len());
            if !fits {
                return Err(GpuError(format!(
                    "columns {at}..{} of {rows} rows {stride} wide in a {what} of {}",
                    at.saturating_add(cols),
                    buffer.len()
                )));
            }
        }
        let grid = elementwise_grid(rows * cols);
        let (src, dst, rows, cols) = (
            src.address(),
            dst.address(),
            rows as u64,
            narrow("columns", cols)?,
        );
        let (src_stride, src_at, dst_stride, dst_at) = (
            src_stride as u64,
            src_at as u64,
            dst_stride as u64,
            dst_at as u64,
        );
        launch!(self.0, "add_columns", grid; src, dst, rows, cols, src_stride, src_at, dst_stride, dst_at)
    }

    /// y += alpha·x, x repeated along y (a vector added to every row).
    pub fn add_scaled(
        &self,
        x: Buffer<'_, f32>,
        y: Buffer<'_, f32>,
        alpha: f32,
    ) -> Result<(), GpuError> {
        check_period("x", x.len(), y.len())?;
        let grid = elementwise_grid(y.len());
        let (x, y, n, period) = (x.address(), y.address(), y.len() as u64, x.len() as u64);
        launch!(self.0, "add_scaled", grid; x, y, n, period, alpha)
    }

    /// y += a·b elementwise, b repeated along a (every row times a vector).
    pub fn add_product(
        &self,
        a: Buffer<'_, f32>,
        b: Buffer<'_, f32>,
        y: Buffer<'_, f32>,
    ) -> Result<(), GpuError> {
        check("the product's output", y.len(), a.len())?;
        check_period("b", b.len(), a.len())?;
        let grid = elementwise_grid(a.len());
        let (a, b, y, n, period) = (
            a.address(),
            b.address(),
            y.address(),
            a.len() as u64,
            b.len() as u64,
        );
        launch!(self.0, "add_product", grid; a, b, y, n, period)
    }

    /// y += x turned by the rotary embedding (`Turn::Back`: by its transpose), `cos` and
    /// `sin` `[seq, d/2]`.
    pub fn rotary(
        &self,
        x: Buffer<'_, f32>,
        cos: Buffer<'_, f32>,
        sin: Buffer<'_, f32>,
        y: Buffer<'_, f32>,
        shape: RotaryShape,
        turn: Turn,
    ) -> Result<(), GpuError> {
        let RotaryShape { seq, heads, d } = shape;
        let row = seq * heads * d;
        if d == 0 || !d.is_multiple_of(2) || row == 0 || !x.len().is_multiple_of(row) {
            return Err(GpuError(format!(
                "a rotary embedding over {} values in positions of {seq}, {heads} heads of width {d}",
                x.len()
            )));
        }
        let half = d / 2;
        check("the rotary output", y.len(), x.len())?;
        check("the rotary cosines", cos.len(), seq * half)?;
        check("the rotary sines", sin.len(), seq * half)?;
        let pairs = x.len() / 2;
        let grid = elementwise_grid(pairs);
        let sign = match turn {
            Turn::Forward => 1.0f32,
            Turn::Back => -1.0,
        };
        let (x, cos, sin, y, pairs) = (
            x.address(),
            cos.address(),
            sin.address(),
            y.address(),
            pairs as u64,
        );
        let (seq, heads, half) = (
            narrow("positions", seq)?,
            narrow("heads", heads)?,
            narrow("the head width", half)?,
        );
        launch!(self.0, "rotary", grid; x, cos, sin, y, pairs, seq, heads, half, sign)
    }

    /// out `[rows, len]` = the inverted-dropout factors of elements `offset..offset + len` of
    /// each row, drawn from `dropout.row_keys` as the CPU draws them.
    pub fn dropout_factors(
        &self,
        dropout: DropoutDraw<'_>,
        out: Buffer<'_, f32>,
        len: usize,
    ) -> Result<(), GpuError> {
        let rows = dropout.row_keys.len();
        check("the dropout factors", out.len(), rows * len)?;
        let grid = elementwise_grid(out.len());
        let (keys, out, rows, len) = (
            dropout.row_keys.address(),
            out.address(),
            rows as u64,
            len as u64,
        );
        let (offset, threshold, scale) = (dropout.offset, dropout.threshold, dropout.scale);
        launch!(self.0, "dropout_factors", grid; keys, out, rows, len, offset, threshold, scale)
    }

    /// out[c] += Σ over rows of x[row, c] (a bias's gradient), in a fixed order: each group of
    /// `COLUMN_ROWS_PER_BLOCK` rows summed into `scratch` (`column_sums_scratch` values) by a
    /// block of its own, then the groups in order.
    pub fn column_sums(
        &self,
        x: Buffer<'_, f32>,
        out: Buffer<'_, f32>,
        scratch: Buffer<'_, f32>,
    ) -> Result<(), GpuError> {
        let width = out.len();
        if width == 0 || !x.len().is_multiple_of(width) {
            return Err(GpuError(format!(
                "column sums of {} values into {width} columns",
                x.len()
            )));
        }
        let rows = x.len() / width;
        let groups = rows.div_ceil(COLUMN_ROWS_PER_BLOCK);
        check(
            "the column sums' scratch",
            scratch.len(),
            column_sums_scratch(rows, width),
        )?;
        let column_blocks = narrow("column blocks", width.div_ceil(256))?;
        let grid = Grid {
            blocks: [column_blocks, narrow("row groups", groups)?, 1],
            threads: 256,
        };
        if groups > 65_535 {
            return Err(GpuError(format!(
                "column sums over {rows} rows: too many for a grid"
            )));
        }
        let (x, partial, rows64, width32, per_block) = (
            x.address(),
            scratch.address(),
            rows as u64,
            narrow("columns", width)?,
            COLUMN_ROWS_PER_BLOCK as u32,
        );
        launch!(self.0, "column_partials", grid; x, partial, rows64, width32, per_block)?;
        let grid = Grid {
            blocks: [column_blocks, 1, 1],
            threads: 256,
        };
        let (out, blocks, stride) = (out.address(), groups as u32, width as u64);
        launch!(self.0, "column_sums", grid; partial, out, blocks, width32, stride)
    }
}

/// Rows each block of `column_sums`' first pass sums.
const COLUMN_ROWS_PER_BLOCK: usize = 64;

/// The scratch values `Kernels::column_sums` needs for `rows` rows of `width`.
pub fn column_sums_scratch(rows: usize, width: usize) -> usize {
    rows.div_ceil(COLUMN_ROWS_PER_BLOCK) * width
}

/// A table of the rows the ids were checked against, rows of `width`.
fn check_table<M: Memory + ?Sized>(
    table: Buffer<'_, f32>,
    index: &RowIndex<'_, M>,
    width: usize,
) -> Result<(), GpuError> {
    let rows = index.table_rows;
    if width == 0 || rows.checked_mul(width) != Some(table.len()) {
        return Err(GpuError(format!(
            "a table of {} values for ids of {rows} rows of {width}",
            table.len()
        )));
    }
    Ok(())
}

/// A repeated operand covers the other a whole number of times.
fn check_period(what: &str, period: usize, n: usize) -> Result<(), GpuError> {
    if period == 0 || !n.is_multiple_of(period) {
        return Err(GpuError(format!(
            "{what} of {period} values repeated over {n}"
        )));
    }
    Ok(())
}
