// Layer norm and RMS norm over the last axis, one kernel pair for both: RMS norm is layer norm
// without centring or bias (`centred` = 0). One block per row; the statistics (mean, 1/sigma) are
// kept per row for the backward. Parameter gradients are summed without atomics: each block
// writes its rows' partial sums, and `column_sums` adds the blocks' partials in block order, so
// the result does not depend on scheduling.

// KILN_NORM_ROWS_PER_BLOCK, the rows a block of the backward takes, comes from `gpu::launch`.

// y = (x - mean)/sqrt(var + eps)·w (+ b); var is biased, as PyTorch's. `stats` is [rows, 2].
extern "C" __global__ void norm_forward(const float* __restrict__ x, const float* __restrict__ w,
                                        const float* __restrict__ b, float* __restrict__ y,
                                        float* __restrict__ stats, u32 rows, u32 width, float eps,
                                        int centred) {
    __shared__ float scratch[KILN_WARP];
    const u64 row = blockIdx.x;
    if (row >= rows) return;
    const float* xr = x + row * width;
    float* yr = y + row * width;
    float mean = 0.0f;
    if (centred) {
        float s = 0.0f;
        for (u32 j = threadIdx.x; j < width; j += blockDim.x) s += xr[j];
        mean = block_sum(s, scratch) / (float)width;
    }
    float squares = 0.0f;
    for (u32 j = threadIdx.x; j < width; j += blockDim.x) {
        const float c = xr[j] - mean;
        squares += c * c;
    }
    const float inv = 1.0f / sqrtf(block_sum(squares, scratch) / (float)width + eps);
    for (u32 j = threadIdx.x; j < width; j += blockDim.x) {
        float v = (xr[j] - mean) * inv * w[j];
        if (b) v += b[j];
        yr[j] = v;
    }
    if (threadIdx.x == 0) {
        stats[2 * row] = mean;
        stats[2 * row + 1] = inv;
    }
}

// dx += inv·(g - mean(g) - x̂·mean(g·x̂)) with g = dy·w (RMS norm: without mean(g)); and the
// block's partial sums of dy·x̂ (for w) and dy (for b) per column: `partial` is
// [gridDim.x, 2, width].
extern "C" __global__ void norm_backward(const float* __restrict__ x, const float* __restrict__ w,
                                         const float* __restrict__ stats, const float* __restrict__ dy,
                                         float* __restrict__ dx, float* __restrict__ partial, u32 rows,
                                         u32 width, int centred) {
    __shared__ float scratch[KILN_WARP];
    float* partial_w = partial + (u64)blockIdx.x * 2 * width;
    float* partial_b = partial_w + width;
    for (u32 j = threadIdx.x; j < width; j += blockDim.x) {
        partial_w[j] = 0.0f;
        partial_b[j] = 0.0f;
    }
    const u32 first = blockIdx.x * KILN_NORM_ROWS_PER_BLOCK;
    for (u32 row = first; row < rows && row < first + KILN_NORM_ROWS_PER_BLOCK; ++row) {
        const u64 at = (u64)row * width;
        const float mean = stats[2 * (u64)row], inv = stats[2 * (u64)row + 1];
        float sum_g = 0.0f, sum_gx = 0.0f;
        for (u32 j = threadIdx.x; j < width; j += blockDim.x) {
            const float g = dy[at + j] * w[j];
            sum_g += g;
            sum_gx += g * (x[at + j] - mean) * inv;
        }
        const float mean_g = centred ? block_sum(sum_g, scratch) / (float)width : 0.0f;
        const float mean_gx = block_sum(sum_gx, scratch) / (float)width;
        for (u32 j = threadIdx.x; j < width; j += blockDim.x) {
            const float xhat = (x[at + j] - mean) * inv;
            const float d = dy[at + j];
            dx[at + j] += inv * (d * w[j] - mean_g - xhat * mean_gx);
            partial_w[j] += d * xhat;
            partial_b[j] += d;
        }
    }
}

// out[c] += Σ over blocks of partial[block, c], in block order; `partial` is [blocks, width],
// read with a row stride of `stride` (to take one half of `norm_backward`'s partials).
extern "C" __global__ void column_sums(const float* __restrict__ partial, float* __restrict__ out, u32 blocks,
                                       u32 width, u64 stride) {
    const u32 c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= width) return;
    float s = 0.0f;
    for (u32 blk = 0; blk < blocks; ++blk) s += partial[blk * stride + c];
    out[c] += s;
}
