// GELU with the tanh approximation (torch `approximate="tanh"`, the FFN activation of Wan2.2 and
// Qwen-Image), for phasekit::ops::gelu (src/ops/gelu.rs), on contiguous tensors:
//
//   u = k·(x + 0.044715·x³), k = √(2/π), t = tanh(u)
//   y = ½·x·(1 + t)
//   ∂x = ∂y·(½·(1 + t) + ½·x·(1 − t²)·k·(1 + 3·0.044715·x²))
//
// gelu_fwd writes y, gelu_bwd writes ∂x from x and ∂y (nothing but x is kept for the backward
// pass). One thread per V elements.
#include "ew.cuh"

// Mirrored by `GeluParams` in src/ops/gelu.rs.
struct GeluParams {
    long long n;
    long long pad;
};
static_assert(sizeof(GeluParams) == 16, "GeluParams must match src/ops/gelu.rs");

namespace gelu {

constexpr int THREADS = 256;
constexpr float K = 0.7978845608028654f;  // √(2/π)
constexpr float A = 0.044715f;

template <class T, int V>
PK_DEV void fwd(const typename T::S* __restrict__ x, typename T::S* __restrict__ y, const GeluParams& p) {
    const long long i = ((long long)blockIdx.x * THREADS + threadIdx.x) * V;
    if (i >= p.n) return;
    float f[V];
    ew::load<T, V>(x + i, f);
    PK_UNROLL
    for (int j = 0; j < V; ++j) {
        const float v = f[j];
        f[j] = 0.5f * v * (1.f + tanhf(K * (v + A * v * v * v)));
    }
    ew::store<T, V>(y + i, f);
}

template <class T, int V>
PK_DEV void bwd(const typename T::S* __restrict__ x, const typename T::S* __restrict__ dy, typename T::S* __restrict__ dx,
                const GeluParams& p) {
    const long long i = ((long long)blockIdx.x * THREADS + threadIdx.x) * V;
    if (i >= p.n) return;
    float f[V], g[V];
    ew::load<T, V>(x + i, f);
    ew::load<T, V>(dy + i, g);
    PK_UNROLL
    for (int j = 0; j < V; ++j) {
        const float v = f[j], t = tanhf(K * (v + A * v * v * v));
        f[j] = g[j] * (0.5f * (1.f + t) + 0.5f * v * (1.f - t * t) * K * (1.f + 3.f * A * v * v));
    }
    ew::store<T, V>(dx + i, f);
}

}  // namespace gelu

#define PK_GELU(NAME, T, V)                                                                                         \
    PK_KERNEL(gelu::THREADS) gelu_fwd_##NAME##_v##V(const T::S* x, T::S* y, GeluParams p) {                         \
        gelu::fwd<T, V>(x, y, p);                                                                                   \
    }                                                                                                               \
    PK_EXPORT(gelu_fwd_##NAME##_v##V)                                                                               \
    PK_KERNEL(gelu::THREADS) gelu_bwd_##NAME##_v##V(const T::S* x, const T::S* dy, T::S* dx, GeluParams p) {        \
        gelu::bwd<T, V>(x, dy, dx, p);                                                                              \
    }                                                                                                               \
    PK_EXPORT(gelu_bwd_##NAME##_v##V)

PK_GELU(f32, ew::F32, 1)
PK_GELU(f32, ew::F32, 8)
PK_GELU(bf16, ew::BF16, 1)
PK_GELU(bf16, ew::BF16, 8)
PK_GELU(f16, ew::F16, 1)
PK_GELU(f16, ew::F16, 8)
