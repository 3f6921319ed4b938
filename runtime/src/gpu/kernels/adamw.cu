// AdamW over one flat parameter (`train::optim::step`'s arithmetic, to the rounding of fused
// multiply-adds): moments in f32, the bias-corrected ratio in f64, decoupled weight decay on
// the weight.
extern "C" __global__ void adamw_step(float* __restrict__ p, float* __restrict__ m, float* __restrict__ v,
                                      const float* __restrict__ g, u64 n, float beta1, float beta2,
                                      double correction1, double correction2, float lr, float decay, double eps) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        const float gi = g[i];
        const float mi = beta1 * m[i] + (1.0f - beta1) * gi;
        const float vi = beta2 * v[i] + (1.0f - beta2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        const double ratio = ((double)mi / correction1) / (sqrt((double)vi / correction2) + eps);
        float pi = p[i];
        pi -= decay * pi;
        pi -= lr * (float)ratio;
        p[i] = pi;
    }
}
