// Rotary position embedding on interleaved pairs, for phasekit::ops::rope (src/ops/rope.rs):
// for x [B, S, H, D] (any strides for B, S and H, contiguous D) and per-token tables cos, sin
// f32 [S, D/2] (Wan's 3-D tables and Qwen-Image's alike, src/model/rope.rs),
//
//   y[2i]   = x[2i]·cos − x[2i+1]·sin·σ
//   y[2i+1] = x[2i]·sin·σ + x[2i+1]·cos
//
// with σ = +1 forward; the backward pass is the same kernel on ∂y with σ = −1 (the rotation's
// transpose is the rotation by the opposite angle). y is contiguous [B, S, H, D] in x's type.
// One thread per V elements (V/2 pairs): V = 8 with 16-byte accesses when every row is aligned,
// else V = 2.
#include "ew.cuh"

// Mirrored by `RopeParams` in src/ops/rope.rs.
struct RopeParams {
    long long sb, ss, sh;  // input strides in elements
    long long rows;        // B·S·H
    int s, h, d;           // tokens, heads, head size
    float sign;            // +1 forward, −1 backward
};
static_assert(sizeof(RopeParams) == 48, "RopeParams must match src/ops/rope.rs");

namespace rope {

constexpr int THREADS = 256;

template <class T, int V>
PK_DEV void apply(const typename T::S* __restrict__ x, const float* __restrict__ cos_t, const float* __restrict__ sin_t,
                  typename T::S* __restrict__ y, const RopeParams& p) {
    const long long per_row = p.d / V;
    const long long i = (long long)blockIdx.x * THREADS + threadIdx.x;
    if (i >= p.rows * per_row) return;
    const long long row = i / per_row;
    const int c = (int)(i % per_row) * V;
    const long long hh = row % p.h, t = (row / p.h) % p.s, b = row / ((long long)p.h * p.s);
    float f[V];
    ew::load<T, V>(x + b * p.sb + t * p.ss + hh * p.sh + c, f);
    const float* ct = cos_t + t * (p.d / 2) + c / 2;
    const float* st = sin_t + t * (p.d / 2) + c / 2;
    PK_UNROLL
    for (int j = 0; j < V / 2; ++j) {
        const float a = f[2 * j], bb = f[2 * j + 1], co = ct[j], si = st[j] * p.sign;
        f[2 * j] = a * co - bb * si;
        f[2 * j + 1] = a * si + bb * co;
    }
    ew::store<T, V>(y + row * p.d + c, f);
}

}  // namespace rope

#define PK_ROPE(NAME, T, V)                                                                                         \
    PK_KERNEL(rope::THREADS)                                                                                        \
    rope_##NAME##_v##V(const T::S* x, const float* cos_t, const float* sin_t, T::S* y, RopeParams p) {              \
        rope::apply<T, V>(x, cos_t, sin_t, y, p);                                                                   \
    }                                                                                                               \
    PK_EXPORT(rope_##NAME##_v##V)

PK_ROPE(f32, ew::F32, 2)
PK_ROPE(f32, ew::F32, 8)
PK_ROPE(bf16, ew::BF16, 2)
PK_ROPE(bf16, ew::BF16, 8)
PK_ROPE(f16, ew::F16, 2)
PK_ROPE(f16, ew::F16, 8)
