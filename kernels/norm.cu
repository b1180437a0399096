// LayerNorm / RMSNorm with optional affine weight (and bias) and modulation, forward and backward,
// for phasekit::ops::norm (src/ops/norm.rs):
//
//   x̂ = (x − μ)·r (LayerNorm) or x·r (RMSNorm), r = 1/√(var + ε) over the d elements of a row
//   z = x̂·w + b          (affine 1: weight only; 2: weight and bias; 0: z = x̂)
//   y = z·(1 + scale) + shift   (modulation row m = row / group; none when group = 0)
//
// Rows are contiguous (row stride d). aff is f32 [affine, d] (w, then b); mod is f32 [M, 2, d]
// (shift, then scale) with M = rows / group; stats is f32 [rows, 2] (μ, r), written by the forward
// pass and read by the backward pass, which recomputes x̂ from x instead of keeping it.
//
//   norm_fwd   one warp per row (4 rows per block of 128 threads): μ, then Σ(x − μ)², then y;
//              three passes over the row (the later ones from L1/L2), no shared memory.
//   norm_bwd   one warp per row: g = ∂y·(1 + scale)·w, then ∂x = r·(g − mean(g) − x̂·mean(g·x̂))
//              (RMSNorm: without the mean(g) term).
//   norm_cols  the reductions over rows, without atomics: thread = column, block = (modulation
//              row m, chunk of `chunk` rows), partial sums written to part [4, M, chunks, d]:
//              plane 0 ∂shift = Σ ∂y, 1 ∂scale = Σ ∂y·z, 2 ∂w = Σ ∂y·(1 + scale)·x̂,
//              3 ∂b = Σ ∂y·(1 + scale). The host sums the chunks (and, for w and b, the m).
#include "ew.cuh"

// Mirrored by `NormParams` in src/ops/norm.rs.
struct NormParams {
    long long rows;   // N
    long long group;  // rows per modulation row; 0 = no modulation
    long long chunk;  // norm_cols: rows per chunk
    int d;            // row length
    int kind;         // 0 LayerNorm, 1 RMSNorm
    int affine;       // 0, 1 (weight) or 2 (weight and bias)
    int chunks;       // norm_cols: chunks per modulation row (or over all rows)
    float eps;
    int want;         // norm_cols: bit 0 shift and scale, bit 1 weight (and bias)
};
static_assert(sizeof(NormParams) == 48, "NormParams must match src/ops/norm.rs");

namespace nrm {

constexpr int THREADS = 128;
constexpr int ROWS = THREADS / 32;

template <class TI, class TO, int V>
PK_DEV void fwd(const typename TI::S* __restrict__ x, const float* __restrict__ aff, const float* __restrict__ mod,
                typename TO::S* __restrict__ y, float* __restrict__ stats, const NormParams& p) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * ROWS + (threadIdx.x >> 5);
    if (row >= p.rows) return;  // the whole warp leaves together
    const int d = p.d;
    const typename TI::S* xr = x + row * d;
    float mean = 0.f;
    if (p.kind == 0) {
        float s = 0.f;
        for (int c = lane * V; c < d; c += 32 * V) {
            float f[V];
            ew::load<TI, V>(xr + c, f);
            PK_UNROLL
            for (int i = 0; i < V; ++i) s += f[i];
        }
        mean = ew::warp_sum(s) / (float)d;
    }
    float ss = 0.f;
    for (int c = lane * V; c < d; c += 32 * V) {
        float f[V];
        ew::load<TI, V>(xr + c, f);
        PK_UNROLL
        for (int i = 0; i < V; ++i) {
            const float v = f[i] - mean;
            ss += v * v;
        }
    }
    const float r = 1.f / sqrtf(ew::warp_sum(ss) / (float)d + p.eps);
    const float* shift = p.group ? mod + (row / p.group) * 2 * d : nullptr;
    typename TO::S* yr = y + row * d;
    for (int c = lane * V; c < d; c += 32 * V) {
        float f[V];
        ew::load<TI, V>(xr + c, f);
        PK_UNROLL
        for (int i = 0; i < V; ++i) {
            float z = (f[i] - mean) * r;
            if (p.affine) z *= aff[c + i];
            if (p.affine == 2) z += aff[d + c + i];
            if (shift) z = z * (1.f + shift[d + c + i]) + shift[c + i];
            f[i] = z;
        }
        ew::store<TO, V>(yr + c, f);
    }
    if (lane == 0) {
        stats[2 * row] = mean;
        stats[2 * row + 1] = r;
    }
}

template <class TI, class TO, int V>
PK_DEV void bwd(const typename TI::S* __restrict__ x, const float* __restrict__ aff, const float* __restrict__ mod,
                const float* __restrict__ stats, const typename TO::S* __restrict__ dy, typename TI::S* __restrict__ dx,
                const NormParams& p) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * ROWS + (threadIdx.x >> 5);
    if (row >= p.rows) return;
    const int d = p.d;
    const typename TI::S* xr = x + row * d;
    const typename TO::S* gr = dy + row * d;
    const float mean = stats[2 * row], r = stats[2 * row + 1];
    const float* scale = p.group ? mod + (row / p.group) * 2 * d + d : nullptr;
    float a = 0.f, b = 0.f;  // Σ g, Σ g·x̂
    for (int c = lane * V; c < d; c += 32 * V) {
        float f[V], g[V];
        ew::load<TI, V>(xr + c, f);
        ew::load<TO, V>(gr + c, g);
        PK_UNROLL
        for (int i = 0; i < V; ++i) {
            float gi = g[i];
            if (scale) gi *= 1.f + scale[c + i];
            if (p.affine) gi *= aff[c + i];
            a += gi;
            b += gi * ((f[i] - mean) * r);
        }
    }
    a = p.kind == 0 ? ew::warp_sum(a) / (float)d : 0.f;
    b = ew::warp_sum(b) / (float)d;
    typename TI::S* dr = dx + row * d;
    for (int c = lane * V; c < d; c += 32 * V) {
        float f[V], g[V];
        ew::load<TI, V>(xr + c, f);
        ew::load<TO, V>(gr + c, g);
        PK_UNROLL
        for (int i = 0; i < V; ++i) {
            float gi = g[i];
            if (scale) gi *= 1.f + scale[c + i];
            if (p.affine) gi *= aff[c + i];
            f[i] = r * (gi - a - (f[i] - mean) * r * b);
        }
        ew::store<TI, V>(dr + c, f);
    }
}

template <class TI, class TO>
PK_DEV void cols(const typename TI::S* __restrict__ x, const float* __restrict__ aff, const float* __restrict__ mod,
                 const float* __restrict__ stats, const typename TO::S* __restrict__ dy, float* __restrict__ part,
                 const NormParams& p) {
    const int c = blockIdx.y * THREADS + threadIdx.x;
    if (c >= p.d) return;
    const int d = p.d;
    const long long per = p.group ? p.group : p.rows;  // rows per modulation row
    const long long m = blockIdx.x / p.chunks, k = blockIdx.x % p.chunks;
    const long long r0 = m * per + k * p.chunk;
    const long long r1 = r0 + p.chunk < (m + 1) * per ? r0 + p.chunk : (m + 1) * per;
    const float w = p.affine ? aff[c] : 1.f, bias = p.affine == 2 ? aff[d + c] : 0.f;
    const float s1 = p.group ? 1.f + mod[m * 2 * d + d + c] : 1.f;
    float a_sh = 0.f, a_sc = 0.f, a_w = 0.f, a_b = 0.f;
    for (long long rr = r0; rr < r1; ++rr) {
        const float xh = (TI::ld(x[rr * d + c]) - stats[2 * rr]) * stats[2 * rr + 1];
        const float g = TO::ld(dy[rr * d + c]);
        a_sh += g;
        a_sc += g * (xh * w + bias);
        a_w += g * s1 * xh;
        a_b += g * s1;
    }
    const long long planes = (p.group ? p.rows / p.group : 1) * p.chunks * d;
    const long long at = (m * p.chunks + k) * d + c;
    if (p.want & 1) {
        part[at] = a_sh;
        part[planes + at] = a_sc;
    }
    if (p.want & 2) {
        part[2 * planes + at] = a_w;
        part[3 * planes + at] = a_b;
    }
}

}  // namespace nrm

#define PK_NORM_IO(TI_NAME, TI, TO_NAME, TO)                                                                             \
    PK_KERNEL(nrm::THREADS)                                                                                            \
    norm_fwd_##TI_NAME##_##TO_NAME##_v1(const TI::S* x, const float* aff, const float* mod, TO::S* y, float* stats,     \
                                        NormParams p) {                                                                \
        nrm::fwd<TI, TO, 1>(x, aff, mod, y, stats, p);                                                                 \
    }                                                                                                                  \
    PK_EXPORT(norm_fwd_##TI_NAME##_##TO_NAME##_v1)                                                                     \
    PK_KERNEL(nrm::THREADS)                                                                                            \
    norm_fwd_##TI_NAME##_##TO_NAME##_v8(const TI::S* x, const float* aff, const float* mod, TO::S* y, float* stats,     \
                                        NormParams p) {                                                                \
        nrm::fwd<TI, TO, 8>(x, aff, mod, y, stats, p);                                                                 \
    }                                                                                                                  \
    PK_EXPORT(norm_fwd_##TI_NAME##_##TO_NAME##_v8)                                                                     \
    PK_KERNEL(nrm::THREADS)                                                                                            \
    norm_bwd_##TI_NAME##_##TO_NAME##_v1(const TI::S* x, const float* aff, const float* mod, const float* stats,         \
                                        const TO::S* dy, TI::S* dx, NormParams p) {                                    \
        nrm::bwd<TI, TO, 1>(x, aff, mod, stats, dy, dx, p);                                                            \
    }                                                                                                                  \
    PK_EXPORT(norm_bwd_##TI_NAME##_##TO_NAME##_v1)                                                                     \
    PK_KERNEL(nrm::THREADS)                                                                                            \
    norm_bwd_##TI_NAME##_##TO_NAME##_v8(const TI::S* x, const float* aff, const float* mod, const float* stats,         \
                                        const TO::S* dy, TI::S* dx, NormParams p) {                                    \
        nrm::bwd<TI, TO, 8>(x, aff, mod, stats, dy, dx, p);                                                            \
    }                                                                                                                  \
    PK_EXPORT(norm_bwd_##TI_NAME##_##TO_NAME##_v8)                                                                     \
    PK_KERNEL(nrm::THREADS)                                                                                            \
    norm_cols_##TI_NAME##_##TO_NAME(const TI::S* x, const float* aff, const float* mod, const float* stats,             \
                                    const TO::S* dy, float* part, NormParams p) {                                      \
        nrm::cols<TI, TO>(x, aff, mod, stats, dy, part, p);                                                            \
    }                                                                                                                  \
    PK_EXPORT(norm_cols_##TI_NAME##_##TO_NAME)

#define PK_NORM_IN(TI_NAME, TI)        \
    PK_NORM_IO(TI_NAME, TI, f32, ew::F32) \
    PK_NORM_IO(TI_NAME, TI, bf16, ew::BF16) \
    PK_NORM_IO(TI_NAME, TI, f16, ew::F16)

PK_NORM_IN(f32, ew::F32)
PK_NORM_IN(bf16, ew::BF16)
PK_NORM_IN(f16, ew::F16)
