// Moving and combining tensors: embedding rows gathered and their gradients summed back per row,
// column ranges copied (slices, concatenations, fused projections), sums and products with
// broadcasting over rows, LLaMA's rotary embedding, dropout's factors, and the first pass of a
// column sum. Every kernel but
// `gather_rows` and `dropout_factors` adds to its output, as gradients add up.
// Grid-stride loops, so any grid covers any length.

// out[i, :] = table[ids[i], :] for `n` ids, rows of `width` (the host checked every id).
extern "C" __global__ void gather_rows(const float* __restrict__ table, const long long* __restrict__ ids,
                                       float* __restrict__ out, u64 n, u32 width) {
    KILN_GRID_STRIDE(e, n * width) {
        const u64 i = e / width, c = e % width;
        out[e] = table[(u64)ids[i] * width + c];
    }
}

// The gather's backward without atomics: table row rows[u] gets the sum of the upstream rows
// order[starts[u]] .. order[starts[u + 1] - 1], in that order (the host sorted the positions by
// the row they read), so the sum does not depend on scheduling.
extern "C" __global__ void scatter_rows(const float* __restrict__ dy, const long long* __restrict__ order,
                                        const long long* __restrict__ starts, const long long* __restrict__ rows,
                                        float* __restrict__ dtable, u64 unique, u32 width) {
    KILN_GRID_STRIDE(e, unique * width) {
        const u64 u = e / width, c = e % width;
        float s = 0.0f;
        for (long long p = starts[u]; p < starts[u + 1]; ++p) s += dy[(u64)order[p] * width + c];
        dtable[(u64)rows[u] * width + c] += s;
    }
}

// dst[r, dst_at + c] += src[r, src_at + c] for `rows` rows of `cols` columns, rows of src and
// dst `src_stride` and `dst_stride` apart.
extern "C" __global__ void add_columns(const float* __restrict__ src, float* __restrict__ dst, u64 rows, u32 cols,
                                       u64 src_stride, u64 src_at, u64 dst_stride, u64 dst_at) {
    KILN_GRID_STRIDE(e, rows * cols) {
        const u64 r = e / cols, c = e % cols;
        dst[r * dst_stride + dst_at + c] += src[r * src_stride + src_at + c];
    }
}

// y[i] += alpha · x[i % period] for i < n: a sum, a scaled sum, or a vector added to every row
// (a bias; `period` its width).
extern "C" __global__ void add_scaled(const float* __restrict__ x, float* __restrict__ y, u64 n, u64 period,
                                      float alpha) {
    KILN_GRID_STRIDE(i, n) y[i] += alpha * x[i % period];
}

// y[i] += a[i] · b[i % period] for i < n: an elementwise product, or each row times a vector.
extern "C" __global__ void add_product(const float* __restrict__ a, const float* __restrict__ b,
                                       float* __restrict__ y, u64 n, u64 period) {
    KILN_GRID_STRIDE(i, n) y[i] += a[i] * b[i % period];
}

// LLaMA's rotary embedding over x [rows, seq, heads, d] (`exec::ops::attention::rotary`):
// y[j] += x[j]·cos − x[j + d/2]·sin and y[j + d/2] += x[j + d/2]·cos + x[j]·sin at each
// position, cos and sin [seq, d/2] from the host. `sign` = −1 turns the other way: the
// backward, whose rotation is the transpose.
extern "C" __global__ void rotary(const float* __restrict__ x, const float* __restrict__ cos_table,
                                  const float* __restrict__ sin_table, float* __restrict__ y, u64 pairs,
                                  u32 seq, u32 heads, u32 half, float sign) {
    KILN_GRID_STRIDE(e, pairs) {
        const u64 j = e % half, head_row = e / half;
        const u64 position = (head_row / heads) % seq;
        const u64 first = head_row * 2 * half + j, second = first + half;
        const float c = cos_table[position * half + j], s = sign * sin_table[position * half + j];
        const float a = x[first], b = x[second];
        y[first] += a * c - b * s;
        y[second] += b * c + a * s;
    }
}

// partial[g, c] = the sum of x[r, c] over the `per_block` rows r of group g (blockIdx.y), in row
// order: the first pass of a column sum in a fixed order (`column_sums` adds the groups).
extern "C" __global__ void column_partials(const float* __restrict__ x, float* __restrict__ partial, u64 rows,
                                           u32 width, u32 per_block) {
    const u32 c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= width) return;
    const u64 first = (u64)blockIdx.y * per_block;
    const u64 end = first + per_block < rows ? first + per_block : rows;
    float s = 0.0f;
    for (u64 r = first; r < end; ++r) s += x[r * width + c];
    partial[(u64)blockIdx.y * width + c] = s;
}

// out[r, i] = inverted dropout's factor of element offset + i of row r (0 or `scale`), drawn
// from the row's key as the CPU draws it.
extern "C" __global__ void dropout_factors(const u64* __restrict__ row_keys, float* __restrict__ out, u64 rows,
                                           u64 len, u64 offset, u64 threshold, float scale) {
    KILN_GRID_STRIDE(e, rows * len) {
        out[e] = dropout_factor(row_keys[e / len], offset + e % len, threshold, scale);
    }
}
