// The attention core in FlashAttention's manner (Dao et al. 2022; FlashAttention-2's split of
// the backward): scores are computed a tile of keys at a time into an online softmax, never
// materialised, for q [b, s, heads·d] and k, v [b, s_kv, kv_heads·d] (grouped-query heads read
// key/value head `head / (heads / kv_heads)`). The same semantics as `exec::kernels::attention`
// with its additive mask: key j is masked for query i where causal and j > i + past (keys
// before the queries' own, prefixes, are `past` = s_kv - s), or where `key_keep[b, j]` is 0
// (padding); a masked score is KILN_MASKED, so a row whose every key is masked is uniform over
// all keys, and gradients flow through masked scores as through an added mask. Dropout's
// factors are drawn in the kernel from the row's key, as the CPU draws them.
//
// Per query row the forward keeps (running max m, 1/Σ exp) in `stats` [b, heads, s, 2]. The
// backward runs two kernels, each summing in a fixed order (no atomics): one per query tile
// for dq (and Δ = dO·O per row), one per key tile for dk and dv.

// KILN_ATTN_KEYS (keys per tile: one per lane), KILN_ATTN_QUERIES (query rows per block of the
// query-side kernels: one per warp) and KILN_ATTN_MAX_DIM (the head width the shared tiles
// hold) come from `gpu::launch`, which launches these kernels.
#define KILN_ATTN_SLOTS (KILN_ATTN_MAX_DIM / KILN_WARP)

struct AttentionShape {
    u32 s, skv, heads, kv_heads, d;
    int causal;
};

// Dropout inside attention: `row_keys[b]` is null when off.
struct DropoutDraw {
    const u64* row_keys;
    u64 threshold, offset;
    float scale;
};

__device__ __forceinline__ bool attention_key_visible(const float* key_keep, AttentionShape a, u32 r, u32 i,
                                                      u32 j) {
    if (a.causal && j > i + (a.skv - a.s)) return false;
    return !key_keep || key_keep[(u64)r * a.skv + j] != 0.0f;
}

__device__ __forceinline__ float attention_drop(DropoutDraw drop, AttentionShape a, u32 r, u32 head, u32 i,
                                                u32 j) {
    if (!drop.row_keys) return 1.0f;
    const u64 counter = drop.offset + ((u64)head * a.s + i) * a.skv + j;
    return dropout_factor(drop.row_keys[r], counter, drop.threshold, drop.scale);
}

// Tiles of keys the block's queries must read: under a causal mask, the ones up to the last
// query's diagonal. Later tiles hold masked keys only, which add exactly nothing to a row that
// saw a visible key; a row that saw none needs them (it is uniform over all keys).
__device__ __forceinline__ u32 attention_tiles_seen(AttentionShape a, u32 last_query) {
    const u32 tiles = (a.skv + KILN_ATTN_KEYS - 1) / KILN_ATTN_KEYS;
    if (!a.causal) return tiles;
    const u32 seen = (last_query + (a.skv - a.s)) / KILN_ATTN_KEYS + 1;
    return seen < tiles ? seen : tiles;
}

// Loads keys [t·32, t·32 + 32) of key/value head `g` of batch row `r` into shared tiles (zeros
// past the end).
__device__ __forceinline__ void attention_load_tile(const float* k, const float* v,
                                                    float ks[KILN_ATTN_KEYS][KILN_ATTN_MAX_DIM + 1],
                                                    float vs[KILN_ATTN_KEYS][KILN_ATTN_MAX_DIM + 1],
                                                    AttentionShape a, u32 r, u32 g, u32 t) {
    for (u32 idx = threadIdx.x; idx < KILN_ATTN_KEYS * a.d; idx += blockDim.x) {
        const u32 jj = idx / a.d, c = idx % a.d, j = t * KILN_ATTN_KEYS + jj;
        float kv = 0.0f, vv = 0.0f;
        if (j < a.skv) {
            const u64 at = ((u64)r * a.skv + j) * a.kv_heads * a.d + (u64)g * a.d + c;
            kv = k[at];
            vv = v[at];
        }
        ks[jj][c] = kv;
        vs[jj][c] = vv;
    }
}

__device__ __forceinline__ float attention_dot(const float* x, const float* y, u32 d) {
    float dot = 0.0f;
    for (u32 c = 0; c < d; ++c) dot += x[c] * y[c];
    return dot;
}

// Key j's score for query i: q·k scaled, or KILN_MASKED where the mask hides the key.
__device__ __forceinline__ float attention_score(const float* key_keep, AttentionShape a, u32 r, u32 i, u32 j,
                                                 const float* q, const float* k) {
    return attention_key_visible(key_keep, a, r, i, j) ? attention_dot(q, k, a.d) * (1.0f / sqrtf((float)a.d))
                                                       : KILN_MASKED;
}

// Where a warp of a query-side kernel works (grid (ceil(s/4), heads, b), a warp per query row):
// its batch row, head, key/value head and query row, and the tiles of keys its block reads.
struct AttentionQuery {
    u32 warp, lane, r, head, g, i;
    bool active;  // the block's last warps may have no query row
    u64 at;       // the row's first element in q, y and dy
    u32 tiles, seen;
};

__device__ AttentionQuery attention_query(AttentionShape a) {
    AttentionQuery w;
    w.warp = threadIdx.x / KILN_WARP;
    w.lane = threadIdx.x % KILN_WARP;
    w.r = blockIdx.z;
    w.head = blockIdx.y;
    w.g = w.head / (a.heads / a.kv_heads);
    const u32 first = blockIdx.x * KILN_ATTN_QUERIES;
    w.i = first + w.warp;
    w.active = w.i < a.s;
    w.at = (((u64)w.r * a.s + w.i) * a.heads + w.head) * a.d;
    w.tiles = (a.skv + KILN_ATTN_KEYS - 1) / KILN_ATTN_KEYS;
    w.seen = attention_tiles_seen(a, first + KILN_ATTN_QUERIES <= a.s ? first + KILN_ATTN_QUERIES - 1 : a.s - 1);
    return w;
}

// Loads tile t of keys and values for the block, or says the block is done: past the tiles its
// queries see, unless one of its rows has seen no visible key yet (`unseen`).
__device__ bool attention_next_tile(const float* k, const float* v, float ks[KILN_ATTN_KEYS][KILN_ATTN_MAX_DIM + 1],
                                    float vs[KILN_ATTN_KEYS][KILN_ATTN_MAX_DIM + 1], AttentionShape a,
                                    AttentionQuery w, u32 t, bool unseen) {
    if (t >= w.seen && !__syncthreads_or(unseen)) return false;
    __syncthreads();
    attention_load_tile(k, v, ks, vs, a, w.r, w.g, t);
    __syncthreads();
    return true;
}

// Grid (ceil(s/4), heads, b), 128 threads: one warp per query row, one lane per key of a tile.
extern "C" __global__ void attention_forward(const float* __restrict__ q, const float* __restrict__ k,
                                             const float* __restrict__ v, const float* __restrict__ key_keep,
                                             float* __restrict__ y, float* __restrict__ stats, AttentionShape a,
                                             DropoutDraw drop) {
    __shared__ float ks[KILN_ATTN_KEYS][KILN_ATTN_MAX_DIM + 1];
    __shared__ float vs[KILN_ATTN_KEYS][KILN_ATTN_MAX_DIM + 1];
    __shared__ float qs[KILN_ATTN_QUERIES][KILN_ATTN_MAX_DIM];
    const AttentionQuery w = attention_query(a);
    const u32 lane = w.lane, i = w.i, r = w.r, head = w.head;
    for (u32 c = lane; c < a.d; c += KILN_WARP) qs[w.warp][c] = w.active ? q[w.at + c] : 0.0f;
    float acc[KILN_ATTN_SLOTS];
    for (u32 u = 0; u < KILN_ATTN_SLOTS; ++u) acc[u] = 0.0f;
    float m = -KILN_INFINITY, l = 0.0f;
    for (u32 t = 0; t < w.tiles && attention_next_tile(k, v, ks, vs, a, w, t, w.active && m == KILN_MASKED); ++t) {
        if (!w.active) continue;
        const u32 j = t * KILN_ATTN_KEYS + lane;
        // No such key: no weight at all.
        const float score = j < a.skv ? attention_score(key_keep, a, r, i, j, qs[w.warp], ks[lane]) : -KILN_INFINITY;
        // Finite: a tile holds at least one key, and a masked one scores KILN_MASKED.
        const float m_next = fmaxf(m, warp_max(score));
        const float rescale = expf(m - m_next);
        const float p = expf(score - m_next);
        l = l * rescale + warp_sum(p);
        const float kept = j < a.skv ? p * attention_drop(drop, a, r, head, i, j) : 0.0f;
        for (u32 u = 0; u < KILN_ATTN_SLOTS; ++u) acc[u] *= rescale;
        for (u32 jj = 0; jj < KILN_ATTN_KEYS; ++jj) {
            const float pj = __shfl_sync(KILN_FULL_MASK, kept, jj);
            for (u32 u = 0; u < KILN_ATTN_SLOTS; ++u) {
                const u32 c = lane + u * KILN_WARP;
                if (c < a.d) acc[u] += pj * vs[jj][c];
            }
        }
        m = m_next;
    }
    if (!w.active) return;
    const float inv = 1.0f / l;
    for (u32 u = 0; u < KILN_ATTN_SLOTS; ++u) {
        const u32 c = lane + u * KILN_WARP;
        if (c < a.d) y[w.at + c] = acc[u] * inv;
    }
    if (lane == 0) {
        const u64 at = (((u64)r * a.heads + head) * a.s + i) * 2;
        stats[at] = m;
        stats[at + 1] = inv;
    }
}

// dq += scale·Σ_j dS_ij·k_j with dS = P∘(dP̃∘M - Δ), dP̃ = dO·vᵀ, Δ_i = dO_i·O_i (written to
// `delta` [b, heads, s] for the key-side kernel). Grid and block as the forward's.
extern "C" __global__ void attention_backward_query(const float* __restrict__ q, const float* __restrict__ k,
                                                    const float* __restrict__ v,
                                                    const float* __restrict__ key_keep, const float* __restrict__ y,
                                                    const float* __restrict__ dy, const float* __restrict__ stats,
                                                    float* __restrict__ dq, float* __restrict__ delta,
                                                    AttentionShape a, DropoutDraw drop) {
    __shared__ float ks[KILN_ATTN_KEYS][KILN_ATTN_MAX_DIM + 1];
    __shared__ float vs[KILN_ATTN_KEYS][KILN_ATTN_MAX_DIM + 1];
    __shared__ float qs[KILN_ATTN_QUERIES][KILN_ATTN_MAX_DIM];
    __shared__ float dys[KILN_ATTN_QUERIES][KILN_ATTN_MAX_DIM];
    const AttentionQuery w = attention_query(a);
    const u32 lane = w.lane, i = w.i, r = w.r, head = w.head;
    float dot = 0.0f;
    for (u32 c = lane; c < a.d; c += KILN_WARP) {
        qs[w.warp][c] = w.active ? q[w.at + c] : 0.0f;
        dys[w.warp][c] = w.active ? dy[w.at + c] : 0.0f;
        if (w.active) dot += dy[w.at + c] * y[w.at + c];
    }
    const float row_delta = warp_sum(dot);
    const u64 row = ((u64)r * a.heads + head) * a.s + i;
    const float m = w.active ? stats[2 * row] : 0.0f, inv = w.active ? stats[2 * row + 1] : 0.0f;
    if (w.active && lane == 0) delta[row] = row_delta;
    float acc[KILN_ATTN_SLOTS];
    for (u32 u = 0; u < KILN_ATTN_SLOTS; ++u) acc[u] = 0.0f;
    for (u32 t = 0; t < w.tiles && attention_next_tile(k, v, ks, vs, a, w, t, w.active && m == KILN_MASKED); ++t) {
        if (!w.active) continue;
        const u32 j = t * KILN_ATTN_KEYS + lane;
        float ds = 0.0f;
        if (j < a.skv) {
            const float score = attention_score(key_keep, a, r, i, j, qs[w.warp], ks[lane]);
            const float p = expf(score - m) * inv;
            const float dp = attention_dot(dys[w.warp], vs[lane], a.d) * attention_drop(drop, a, r, head, i, j);
            ds = p * (dp - row_delta);
        }
        for (u32 jj = 0; jj < KILN_ATTN_KEYS; ++jj) {
            const float dsj = __shfl_sync(KILN_FULL_MASK, ds, jj);
            for (u32 u = 0; u < KILN_ATTN_SLOTS; ++u) {
                const u32 c = lane + u * KILN_WARP;
                if (c < a.d) acc[u] += dsj * ks[jj][c];
            }
        }
    }
    if (!w.active) return;
    const float scale = 1.0f / sqrtf((float)a.d);
    for (u32 u = 0; u < KILN_ATTN_SLOTS; ++u) {
        const u32 c = lane + u * KILN_WARP;
        if (c < a.d) dq[w.at + c] += acc[u] * scale;
    }
}

// Threads per block of the key-side kernel: four per key of a tile, each holding a quarter of
// the key's columns of dk and dv.
#define KILN_ATTN_KEY_THREADS (4 * KILN_ATTN_KEYS)
#define KILN_ATTN_KEY_SLOTS (KILN_ATTN_MAX_DIM / 4)

// dv += Σ_i (P∘M)_ij·dO_i and dk += scale·Σ_i dS_ij·q_i over every query row of the group's
// heads. Grid (ceil(s_kv/32), kv_heads, b), 128 threads.
extern "C" __global__ void attention_backward_key_value(
    const float* __restrict__ q, const float* __restrict__ k, const float* __restrict__ v,
    const float* __restrict__ key_keep, const float* __restrict__ dy, const float* __restrict__ stats,
    const float* __restrict__ delta, float* __restrict__ dk, float* __restrict__ dv, AttentionShape a,
    DropoutDraw drop) {
    __shared__ float ks[KILN_ATTN_KEYS][KILN_ATTN_MAX_DIM + 1];
    __shared__ float vs[KILN_ATTN_KEYS][KILN_ATTN_MAX_DIM + 1];
    __shared__ float qrow[KILN_ATTN_MAX_DIM];
    __shared__ float dyrow[KILN_ATTN_MAX_DIM];
    const u32 r = blockIdx.z, g = blockIdx.y, t = blockIdx.x;
    const u32 jj = threadIdx.x / 4, part = threadIdx.x % 4, j = t * KILN_ATTN_KEYS + jj;
    const u32 first_key = t * KILN_ATTN_KEYS, group = a.heads / a.kv_heads;
    const float scale = 1.0f / sqrtf((float)a.d);
    attention_load_tile(k, v, ks, vs, a, r, g, t);
    float dk_acc[KILN_ATTN_KEY_SLOTS], dv_acc[KILN_ATTN_KEY_SLOTS];
    for (u32 u = 0; u < KILN_ATTN_KEY_SLOTS; ++u) dk_acc[u] = dv_acc[u] = 0.0f;
    for (u32 head = g * group; head < (g + 1) * group; ++head) {
        for (u32 i = 0; i < a.s; ++i) {
            const u64 row = ((u64)r * a.heads + head) * a.s + i;
            const float m = stats[2 * row];
            // Every key of the tile is in this row's future: it saw none of them, unless it
            // saw no visible key at all.
            if (a.causal && i + (a.skv - a.s) < first_key && m != KILN_MASKED) continue;
            __syncthreads();
            const u64 q_at = (((u64)r * a.s + i) * a.heads + head) * a.d;
            for (u32 c = threadIdx.x; c < a.d; c += blockDim.x) {
                qrow[c] = q[q_at + c];
                dyrow[c] = dy[q_at + c];
            }
            __syncthreads();
            float qk = 0.0f, dp = 0.0f;
            for (u32 c = part; c < a.d; c += 4) {
                qk += qrow[c] * ks[jj][c];
                dp += dyrow[c] * vs[jj][c];
            }
            // The key's four threads are neighbouring lanes: an xor butterfly over them.
            qk += __shfl_xor_sync(KILN_FULL_MASK, qk, 1);
            qk += __shfl_xor_sync(KILN_FULL_MASK, qk, 2);
            dp += __shfl_xor_sync(KILN_FULL_MASK, dp, 1);
            dp += __shfl_xor_sync(KILN_FULL_MASK, dp, 2);
            if (j >= a.skv) continue;
            const float score = attention_key_visible(key_keep, a, r, i, j) ? qk * scale : KILN_MASKED;
            const float p = expf(score - m) * stats[2 * row + 1];
            const float factor = attention_drop(drop, a, r, head, i, j);
            const float kept = p * factor, ds = p * (dp * factor - delta[row]);
            for (u32 u = 0; u < KILN_ATTN_KEY_SLOTS; ++u) {
                const u32 c = part + 4 * u;
                if (c < a.d) {
                    dv_acc[u] += kept * dyrow[c];
                    dk_acc[u] += ds * qrow[c];
                }
            }
        }
    }
    if (j >= a.skv) return;
    const u64 at = ((u64)r * a.skv + j) * a.kv_heads * a.d + (u64)g * a.d;
    for (u32 u = 0; u < KILN_ATTN_KEY_SLOTS; ++u) {
        const u32 c = part + 4 * u;
        if (c < a.d) {
            dk[at + c] += dk_acc[u] * scale;
            dv[at + c] += dv_acc[u];
        }
    }
}
