// What every kernel shares: warp and block reductions in a fixed order (a step gives the same
// bits each time it runs on a GPU; not the CPU's bits, since the GPU sums in other orders and
// fuses multiply-adds), rounding to the run's number format, attention's mask value, and Kiln's
// counter-based random bits (`rng.rs`), so that a GPU draws the same dropout masks as the CPU.
//
// Kernels are `extern "C"` (unmangled names for the driver) and take 64-bit element counts
// where a tensor can pass 2^31 elements. Blocks are a multiple of 32 threads: the warp
// reductions assume full warps.

#define KILN_WARP 32
#define KILN_FULL_MASK 0xffffffffu

// HF's mask value: the most negative finite f32, so that a row with every key masked stays
// finite (its probabilities are uniform, as with an additive mask of it).
#define KILN_MASKED (-3.40282347e+38f)

// Number formats (`exec::precision::Format`).
#define KILN_FORMAT_F32 0
#define KILN_FORMAT_BF16 1
#define KILN_FORMAT_F16 2

typedef unsigned long long u64;
typedef unsigned int u32;

// Element i of n, for every i, whatever the grid: a grid-stride loop.
#define KILN_GRID_STRIDE(i, n) \
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (u64)gridDim.x * blockDim.x)

// NVRTC has no <math.h>, so no INFINITY.
#define KILN_INFINITY __uint_as_float(0x7f800000u)

// The sum over a warp. An xor butterfly leaves every lane the same value: at each level both
// lanes of a pair add the same two numbers.
__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = KILN_WARP / 2; offset > 0; offset >>= 1)
        v += __shfl_xor_sync(KILN_FULL_MASK, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int offset = KILN_WARP / 2; offset > 0; offset >>= 1)
        v = fmaxf(v, __shfl_xor_sync(KILN_FULL_MASK, v, offset));
    return v;
}

// The reductions `block_reduce` takes: over a warp, and the value of no elements.
struct KilnSum {
    __device__ float warp(float v) const { return warp_sum(v); }
    __device__ float identity() const { return 0.0f; }
};

struct KilnMax {
    __device__ float warp(float v) const { return warp_max(v); }
    __device__ float identity() const { return -KILN_INFINITY; }
};

// One value per thread reduced over the block (1-D, a multiple of 32 threads) in a fixed order,
// returned to every thread: each warp's result, then the warps' results by the first warp's
// lanes. `scratch` is 32 floats of shared memory, free again on return.
template <class Op>
__device__ float block_reduce(float v, float* scratch, Op op) {
    const int lane = threadIdx.x % KILN_WARP, warp = threadIdx.x / KILN_WARP;
    v = op.warp(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    const int warps = blockDim.x / KILN_WARP;
    float total = lane < warps ? scratch[lane] : op.identity();
    total = op.warp(total);
    __syncthreads();
    return total;
}

__device__ float block_sum(float v, float* scratch) { return block_reduce(v, scratch, KilnSum()); }
__device__ float block_max(float v, float* scratch) { return block_reduce(v, scratch, KilnMax()); }

// `x` rounded to bf16 (nearest, ties to even), as f32; a NaN is quieted and keeps its top
// mantissa bits, as the `half` crate converts it (so a NaN stays one in bf16).
__device__ __forceinline__ float round_bf16(float x) {
    u32 bits = __float_as_uint(x);
    if ((bits & 0x7fffffffu) > 0x7f800000u) return __uint_as_float((bits | 0x00400000u) & 0xffff0000u);
    bits += 0x7fffu + ((bits >> 16) & 1u);
    return __uint_as_float(bits & 0xffff0000u);
}

// `x` rounded to fp16 (nearest, ties to even; from 65520 on, infinite), as f32; a NaN as
// `half` converts it. Scaling by a power of two is exact, so `rintf` rounds at fp16's quantum
// of the binade.
__device__ __forceinline__ float round_f16(float x) {
    const float magnitude = fabsf(x);
    if (!(magnitude == magnitude)) return __uint_as_float((__float_as_uint(x) | 0x00400000u) & 0xffffe000u);
    if (magnitude >= 65520.0f) return copysignf(KILN_INFINITY, x);
    // Below 2^-14 fp16 is subnormal: a fixed quantum of 2^-24.
    int exponent = -14;
    if (magnitude >= 6.103515625e-05f) exponent = (int)((__float_as_uint(magnitude) >> 23) & 0xffu) - 127;
    const float quantum = ldexpf(1.0f, exponent - 10);
    return copysignf(rintf(magnitude / quantum) * quantum, x);
}

__device__ __forceinline__ float round_to(float x, int format) {
    switch (format) {
        case KILN_FORMAT_BF16: return round_bf16(x);
        case KILN_FORMAT_F16: return round_f16(x);
        default: return x;
    }
}

__device__ __forceinline__ u32 rotate_left(u32 x, u32 r) { return (x << r) | (x >> (32u - r)); }

// Threefry-2x32 with 20 rounds, as `rng::threefry2x32`: the 64 bits at `counter` of the stream
// of `key` (each as high and low halves).
__device__ u64 key_bits(u64 key, u64 counter) {
    const u32 ks0 = (u32)(key >> 32), ks1 = (u32)key, ks2 = ks0 ^ ks1 ^ 0x1BD11BDAu;
    const u32 ks[3] = {ks0, ks1, ks2};
    u32 x0 = (u32)(counter >> 32) + ks0, x1 = (u32)counter + ks1;
    const u32 rotations[2][4] = {{13, 15, 26, 6}, {17, 29, 16, 24}};
    for (u32 group = 0; group < 5; ++group) {
        for (int r = 0; r < 4; ++r) {
            x0 += x1;
            x1 = rotate_left(x1, rotations[group % 2][r]) ^ x0;
        }
        x0 += ks[(group + 1) % 3];
        x1 += ks[(group + 2) % 3] + group + 1;
    }
    return ((u64)x0 << 32) | (u64)x1;
}

// Inverted dropout's factor for element `counter` of a row whose key is `row_key`: 0, or
// `scale` (1/(1-p)) where the element's bits reach `threshold` (p of 2^64).
__device__ __forceinline__ float dropout_factor(u64 row_key, u64 counter, u64 threshold, float scale) {
    return key_bits(row_key, counter) >= threshold ? scale : 0.0f;
}
