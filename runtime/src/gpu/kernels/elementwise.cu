// Elementwise kernels: rounding to the run's number format, and the activations with their
// derivatives (`exec::kernels::activation`), each one pass over memory. Grid-stride loops, so
// any grid covers any length.

// Activations (`Activation` in `gpu::launch`).
#define KILN_GELU_TANH 0
#define KILN_GELU_ERF 1
#define KILN_SILU 2

#define KILN_GELU_C 0.7978845608f  // sqrt(2/pi)
#define KILN_GELU_K 0.044715f
#define KILN_NORMAL_DENSITY 0.3989422804f  // 1/sqrt(2 pi)

__device__ __forceinline__ float activation_value(float x, int kind) {
    switch (kind) {
        case KILN_GELU_TANH: return 0.5f * x * (1.0f + tanhf(KILN_GELU_C * (x + KILN_GELU_K * x * x * x)));
        case KILN_GELU_ERF: return 0.5f * x * (1.0f + erff(x * 0.7071067812f));
        default: return x / (1.0f + expf(-x));
    }
}

__device__ __forceinline__ float activation_derivative(float x, int kind) {
    switch (kind) {
        case KILN_GELU_TANH: {
            const float t = tanhf(KILN_GELU_C * (x + KILN_GELU_K * x * x * x));
            const float du = KILN_GELU_C * (1.0f + 3.0f * KILN_GELU_K * x * x);
            return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du;
        }
        case KILN_GELU_ERF:
            return 0.5f * (1.0f + erff(x * 0.7071067812f)) + x * KILN_NORMAL_DENSITY * expf(-0.5f * x * x);
        default: {
            const float sigmoid = 1.0f / (1.0f + expf(-x));
            return sigmoid * (1.0f + x * (1.0f - sigmoid));
        }
    }
}

// y = x rounded to `format` (in f32).
extern "C" __global__ void round_to_format(const float* __restrict__ x, float* __restrict__ y, u64 n, int format) {
    KILN_GRID_STRIDE(i, n) y[i] = round_to(x[i], format);
}

// y = act(x).
extern "C" __global__ void activation_forward(const float* __restrict__ x, float* __restrict__ y, u64 n, int kind) {
    KILN_GRID_STRIDE(i, n) y[i] = activation_value(x[i], kind);
}

// dx += dy · act'(x): the derivative recomputed from the input, nothing kept.
extern "C" __global__ void activation_backward(const float* __restrict__ x, const float* __restrict__ dy,
                                               float* __restrict__ dx, u64 n, int kind) {
    KILN_GRID_STRIDE(i, n) dx[i] += dy[i] * activation_derivative(x[i], kind);
}
