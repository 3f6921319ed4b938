// Log-softmax at a target per row, over all or a tensor-parallel rank's columns of the
// vocabulary (`exec::kernels::cross_entropy`): one block per row reads the row twice (its
// maximum, then Σ exp), with no [rows, vocab] intermediate. Cross-entropy losses and token
// log-probabilities are both `picked - lse` per row; their backward adds coef·(softmax - onehot)
// to the logits' gradient.

// Target row i reads the logits of position i % positions of sequence i / positions, of
// `seq` positions each: a loss reads the first `positions` of each sequence, token
// log-probabilities all of them.
__device__ __forceinline__ u64 target_row_start(u32 i, u32 positions, u32 seq, u32 width) {
    return ((u64)(i / positions) * seq + i % positions) * width;
}

// Per target row i (`targets[i]` < 0: no target, not read): lse[i] = log Σ exp over this rank's `width` columns, and picked[i] = the target's
// logit where the target is among them (columns from `first` on), else 0.
extern "C" __global__ void softmax_statistics(const float* __restrict__ logits, const long long* __restrict__ targets,
                                              float* __restrict__ lse, float* __restrict__ picked, u32 rows,
                                              u32 positions, u32 seq, u32 width, long long first) {
    __shared__ float scratch[KILN_WARP];
    const u32 i = blockIdx.x;
    if (i >= rows) return;
    if (targets[i] < 0) {
        if (threadIdx.x == 0) lse[i] = picked[i] = 0.0f;
        return;
    }
    const float* row = logits + target_row_start(i, positions, seq, width);
    float m = -KILN_INFINITY;
    for (u32 j = threadIdx.x; j < width; j += blockDim.x) m = fmaxf(m, row[j]);
    m = block_max(m, scratch);
    float s = 0.0f;
    for (u32 j = threadIdx.x; j < width; j += blockDim.x) s += expf(row[j] - m);
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) {
        lse[i] = m + logf(s);
        const long long local = targets[i] - first;
        picked[i] = local >= 0 && local < (long long)width ? row[local] : 0.0f;
    }
}

// grad[row i's logit j] += coef[i]·(softmax_j - [j is the target]) for every row with a target;
// `lse` is the log Σ exp over the whole vocabulary (every rank's columns).
extern "C" __global__ void softmax_target_backward(const float* __restrict__ logits,
                                                   const long long* __restrict__ targets,
                                                   const float* __restrict__ lse, const float* __restrict__ coef,
                                                   float* __restrict__ grad, u32 rows, u32 positions, u32 seq,
                                                   u32 width, long long first) {
    const u32 i = blockIdx.x;
    if (i >= rows || targets[i] < 0) return;
    const u64 start = target_row_start(i, positions, seq, width);
    const float* row = logits + start;
    float* g = grad + start;
    const float c = coef[i], l = lse[i];
    const long long local = targets[i] - first;
    for (u32 j = threadIdx.x; j < width; j += blockDim.x) {
        float d = c * expf(row[j] - l);
        if ((long long)j == local) d -= c;
        g[j] += d;
    }
}
