// Gated residual add, for phasekit::ops::gated (src/ops/gated.rs): out = x + y·gate, in x's type,
// for x, y [rows, d] (contiguous; y may have another type than x) and gate f32 [M, d], row r
// taking gate row r / group (group = 0: no gate, out = x + y).
//
//   gated_fwd   one thread per V elements.
//   gated_dy    ∂y = ∂out·gate, in y's type (∂x = ∂out needs no kernel).
//   gated_cols  ∂gate without atomics: thread = column, block = (gate row m, chunk of rows),
//               partial sums Σ ∂out·y written to part [M, chunks, d]; the host sums the chunks.
#include "ew.cuh"

// Mirrored by `GatedParams` in src/ops/gated.rs.
struct GatedParams {
    long long rows;
    long long group;  // rows per gate row; 0 = no gate
    long long chunk;  // gated_cols: rows per chunk
    int d;
    int chunks;       // gated_cols: chunks per gate row
};
static_assert(sizeof(GatedParams) == 32, "GatedParams must match src/ops/gated.rs");

namespace gated {

constexpr int THREADS = 256;

template <class TX, class TY, int V>
PK_DEV void fwd(const typename TX::S* __restrict__ x, const typename TY::S* __restrict__ y, const float* __restrict__ gate,
                typename TX::S* __restrict__ out, const GatedParams& p) {
    const long long i = ((long long)blockIdx.x * THREADS + threadIdx.x) * V;
    if (i >= p.rows * p.d) return;
    float a[V], b[V];
    ew::load<TX, V>(x + i, a);
    ew::load<TY, V>(y + i, b);
    if (p.group) {
        const long long row = i / p.d;
        const float* g = gate + (row / p.group) * p.d + (i - row * p.d);
        PK_UNROLL
        for (int j = 0; j < V; ++j) a[j] += b[j] * g[j];
    } else {
        PK_UNROLL
        for (int j = 0; j < V; ++j) a[j] += b[j];
    }
    ew::store<TX, V>(out + i, a);
}

template <class TG, class TY, int V>
PK_DEV void dy(const typename TG::S* __restrict__ dout, const float* __restrict__ gate, typename TY::S* __restrict__ dyo,
               const GatedParams& p) {
    const long long i = ((long long)blockIdx.x * THREADS + threadIdx.x) * V;
    if (i >= p.rows * p.d) return;
    float a[V];
    ew::load<TG, V>(dout + i, a);
    const long long row = i / p.d;
    const float* g = gate + (row / p.group) * p.d + (i - row * p.d);
    PK_UNROLL
    for (int j = 0; j < V; ++j) a[j] *= g[j];
    ew::store<TY, V>(dyo + i, a);
}

template <class TG, class TY>
PK_DEV void cols(const typename TG::S* __restrict__ dout, const typename TY::S* __restrict__ y, float* __restrict__ part,
                 const GatedParams& p) {
    const int c = blockIdx.y * THREADS + threadIdx.x;
    if (c >= p.d) return;
    const long long m = blockIdx.x / p.chunks, k = blockIdx.x % p.chunks;
    const long long r0 = m * p.group + k * p.chunk;
    const long long r1 = r0 + p.chunk < (m + 1) * p.group ? r0 + p.chunk : (m + 1) * p.group;
    float s = 0.f;
    for (long long r = r0; r < r1; ++r) s += TG::ld(dout[r * p.d + c]) * TY::ld(y[r * p.d + c]);
    part[(m * p.chunks + k) * p.d + c] = s;
}

}  // namespace gated

#define PK_GATED_IO(X_NAME, TX, Y_NAME, TY)                                                                         \
    PK_KERNEL(gated::THREADS)                                                                                       \
    gated_fwd_##X_NAME##_##Y_NAME##_v1(const TX::S* x, const TY::S* y, const float* gate, TX::S* out,               \
                                       GatedParams p) {                                                             \
        gated::fwd<TX, TY, 1>(x, y, gate, out, p);                                                                  \
    }                                                                                                               \
    PK_EXPORT(gated_fwd_##X_NAME##_##Y_NAME##_v1)                                                                   \
    PK_KERNEL(gated::THREADS)                                                                                       \
    gated_fwd_##X_NAME##_##Y_NAME##_v8(const TX::S* x, const TY::S* y, const float* gate, TX::S* out,               \
                                       GatedParams p) {                                                             \
        gated::fwd<TX, TY, 8>(x, y, gate, out, p);                                                                  \
    }                                                                                                               \
    PK_EXPORT(gated_fwd_##X_NAME##_##Y_NAME##_v8)                                                                   \
    PK_KERNEL(gated::THREADS)                                                                                       \
    gated_dy_##X_NAME##_##Y_NAME##_v1(const TX::S* dout, const float* gate, TY::S* dyo, GatedParams p) {            \
        gated::dy<TX, TY, 1>(dout, gate, dyo, p);                                                                   \
    }                                                                                                               \
    PK_EXPORT(gated_dy_##X_NAME##_##Y_NAME##_v1)                                                                    \
    PK_KERNEL(gated::THREADS)                                                                                       \
    gated_dy_##X_NAME##_##Y_NAME##_v8(const TX::S* dout, const float* gate, TY::S* dyo, GatedParams p) {            \
        gated::dy<TX, TY, 8>(dout, gate, dyo, p);                                                                   \
    }                                                                                                               \
    PK_EXPORT(gated_dy_##X_NAME##_##Y_NAME##_v8)                                                                    \
    PK_KERNEL(gated::THREADS)                                                                                       \
    gated_cols_##X_NAME##_##Y_NAME(const TX::S* dout, const TY::S* y, float* part, GatedParams p) {                 \
        gated::cols<TX, TY>(dout, y, part, p);                                                                      \
    }                                                                                                               \
    PK_EXPORT(gated_cols_##X_NAME##_##Y_NAME)

#define PK_GATED_X(X_NAME, TX)             \
    PK_GATED_IO(X_NAME, TX, f32, ew::F32)  \
    PK_GATED_IO(X_NAME, TX, bf16, ew::BF16) \
    PK_GATED_IO(X_NAME, TX, f16, ew::F16)

PK_GATED_X(f32, ew::F32)
PK_GATED_X(bf16, ew::BF16)
PK_GATED_X(f16, ew::F16)
