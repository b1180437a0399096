// Fused attention, forward and backward, for phasekit::ops::attention (src/ops/attention.rs).
//
// A FlashAttention-2-style design on mma.sync.m16n8k16 (bf16 or f16 operands, f32 accumulators;
// sm_80 and newer, so it runs on Ampere and Hopper alike):
//   attn_fwd       one block = 64 queries of one (batch, head), 4 warps × 16 query rows; loops
//                  over 64-key tiles with the online softmax; writes O and the log-sum-exp.
//   attn_bwd_delta Δ = rowsum(dO ∘ O), one warp per query row.
//   attn_bwd_dq    one block = 64 queries; loops over 32-key tiles, recomputes P from the lse,
//                  dP = dO·Vᵀ, dS = P ∘ (dP − Δ), accumulates dQ = scale·dS·K in registers.
//   attn_bwd_dkdv  one block = 64 keys, 4 warps × 16 key rows; loops over 32-query tiles,
//                  computes Sᵀ and dPᵀ directly (keys as rows), accumulates dV = Pᵀ·dO and
//                  dK = scale·dSᵀ·Q in registers.
// dQ and dK/dV are separate kernels that each own their outputs: no atomics, deterministic
// results, at the price of computing S and dP twice in the backward pass (docs/ops.md).
//
// Layouts: q, k, v, O (as read back) and dO are [B, S, H, D] with any strides for B, S and H
// (in elements; the host checks 16-byte alignment of every row) and contiguous D. The outputs
// O, dQ, dK, dV are contiguous [B, S, H, D]; lse and Δ are f32 [B, H, Sq]. The optional bias is
// f32 [B, Sk] (row stride bias_sb): 0 keeps a key, −∞ drops it.
//
// A row with every key dropped gets O = 0 and lse = +∞, and then P = exp(S − lse) = 0 in the
// backward: no NaN anywhere, zero gradients. Keys past Sk are dropped the same way; query rows
// past Sq compute on zero-filled tiles and are not stored.
//
// Shared memory rows are padded by 8 elements (16 bytes) so that the 32-bit fragment loads of a
// warp hit 32 different banks (row pitch (D + 8)·2 bytes = 4 banks mod 32 per row, and the 8
// rows × 4 column pairs of a fragment cover all 32).
#include "common.cuh"

// Kernel parameters, passed by value; mirrored by `AttnParams` in src/ops/attention/cuda.rs
// (same order, same sizes; both sides assert the size).
struct AttnParams {
    long long q_sb, q_ss, q_sh;
    long long k_sb, k_ss, k_sh;
    long long v_sb, v_ss, v_sh;
    long long o_sb, o_ss, o_sh;  // O as read by attn_bwd_delta
    long long g_sb, g_ss, g_sh;  // dO
    long long bias_sb;
    int b, h, sq, sk;
    int has_bias, pad0;
    float scale;       // 1/√D
    float scale_log2;  // scale · log2(e): scores are kept in base-2 units
};
static_assert(sizeof(AttnParams) == 160, "AttnParams must match src/ops/attention/cuda.rs");

namespace attn {

constexpr int THREADS = 128;
constexpr int PAD = 8;
constexpr float LOG2E = 1.4426950408889634f;
constexpr float LN2 = 0.6931471805599453f;

// Dynamic shared memory of each kernel, in bytes (the host computes the same numbers).
template <int D>
constexpr int fwd_smem() { return 2 * 64 * (D + PAD) * 2; }
template <int D>
constexpr int dq_smem() { return 64 * (D + PAD) * 2; }
template <int D>
constexpr int dkdv_smem() { return (2 * 64 + 2 * 32) * (D + PAD) * 2 + 2 * 32 * 4; }

// Copy `rows` rows of D elements starting at `g` (row stride `stride`) into shared memory (row
// pitch D + PAD); rows at or past `valid` are zero-filled. 16-byte accesses.
template <int D>
PK_DEV void load_rows(uint16_t* sm, const uint16_t* g, long long stride, int valid, int rows) {
    constexpr int CH = D / 8;
    for (int idx = threadIdx.x; idx < rows * CH; idx += THREADS) {
        const int r = idx / CH, c = idx % CH;
        pk_vec16 v = {0u, 0u, 0u, 0u};
        if (r < valid) v = pk_ld16(g + (long long)r * stride + c * 8);
        pk_st16(sm + r * (D + PAD) + c * 8, v);
    }
}

// A fragment (16×16, row-major) of rows r0.. and columns k0.. of a shared tile with pitch LD:
// a[0] = (g, 2t..2t+1), a[1] = (g+8, 2t..), a[2] = (g, 2t+8..), a[3] = (g+8, 2t+8..).
template <int LD>
PK_DEV void frag_a(uint32_t a[4], const uint16_t* sm, int r0, int k0, int g, int t) {
    a[0] = pk_ld32(sm + (r0 + g) * LD + k0 + 2 * t);
    a[1] = pk_ld32(sm + (r0 + g + 8) * LD + k0 + 2 * t);
    a[2] = pk_ld32(sm + (r0 + g) * LD + k0 + 8 + 2 * t);
    a[3] = pk_ld32(sm + (r0 + g + 8) * LD + k0 + 8 + 2 * t);
}

// B fragment (16×8) with B(κ, ν) = sm[(n0 + ν)·LD + k0 + κ]: tile rows are B's columns, so
// each register is one 32-bit load: b[0] = (κ 2t..2t+1, ν g), b[1] = (κ 2t+8.., ν g).
template <int LD>
PK_DEV void frag_b_rows(uint32_t b[2], const uint16_t* sm, int n0, int k0, int g, int t) {
    b[0] = pk_ld32(sm + (n0 + g) * LD + k0 + 2 * t);
    b[1] = pk_ld32(sm + (n0 + g) * LD + k0 + 8 + 2 * t);
}

// B fragment with B(κ, ν) = sm[(k0 + κ)·LD + n0 + ν]: tile rows are B's rows, two 16-bit
// loads per register.
template <int LD>
PK_DEV void frag_b_cols(uint32_t b[2], const uint16_t* sm, int k0, int n0, int g, int t) {
    b[0] = pk_pair(sm[(k0 + 2 * t) * LD + n0 + g], sm[(k0 + 2 * t + 1) * LD + n0 + g]);
    b[1] = pk_pair(sm[(k0 + 2 * t + 8) * LD + n0 + g], sm[(k0 + 2 * t + 9) * LD + n0 + g]);
}

// Accumulator tiles c[2j], c[2j+1] (16×8 each, f32) as the A fragment of columns 16j..16j+15.
template <class T>
PK_DEV void c_to_a(uint32_t a[4], const float c0[4], const float c1[4]) {
    a[0] = T::pack(c0[0], c0[1]);
    a[1] = T::pack(c0[2], c0[3]);
    a[2] = T::pack(c1[0], c1[1]);
    a[3] = T::pack(c1[2], c1[3]);
}

template <class T, int D>
PK_DEV void fwd(const uint16_t* __restrict__ q, const uint16_t* __restrict__ k, const uint16_t* __restrict__ v,
                const float* __restrict__ bias, uint16_t* __restrict__ o, float* __restrict__ lse, const AttnParams& p) {
    constexpr int BQ = 64, BK = 64, LD = D + PAD, KD = D / 16, ND = D / 8, NK = BK / 8;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int bi = blockIdx.z, hi = blockIdx.y, q0 = blockIdx.x * BQ;
    uint16_t* sK = reinterpret_cast<uint16_t*>(pk_smem());
    uint16_t* sV = sK + BK * LD;
    const uint16_t* qb = q + bi * p.q_sb + hi * p.q_sh;
    const uint16_t* kb = k + bi * p.k_sb + hi * p.k_sh;
    const uint16_t* vb = v + bi * p.v_sb + hi * p.v_sh;
    const float* bb = p.has_bias ? bias + bi * p.bias_sb : nullptr;

    // The query tile passes through sK into registers, where it stays.
    load_rows<D>(sK, qb + q0 * p.q_ss, p.q_ss, pk_min(BQ, p.sq - q0), BQ);
    __syncthreads();
    uint32_t qa[KD][4];
    PK_UNROLL
    for (int kk = 0; kk < KD; ++kk) frag_a<LD>(qa[kk], sK, warp * 16, kk * 16, g, t);
    __syncthreads();

    float acc[ND][4];
    PK_UNROLL
    for (int nd = 0; nd < ND; ++nd) acc[nd][0] = acc[nd][1] = acc[nd][2] = acc[nd][3] = 0.f;
    // Running max (base-2 units) and this thread's part of the running sum, for rows g and g+8.
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};

    for (int k0 = 0; k0 < p.sk; k0 += BK) {
        const int nk = pk_min(BK, p.sk - k0);
        load_rows<D>(sK, kb + k0 * p.k_ss, p.k_ss, nk, BK);
        load_rows<D>(sV, vb + k0 * p.v_ss, p.v_ss, nk, BK);
        __syncthreads();

        float s[NK][4];
        PK_UNROLL
        for (int n = 0; n < NK; ++n) {
            s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
            PK_UNROLL
            for (int kk = 0; kk < KD; ++kk) {
                uint32_t bf[2];
                frag_b_rows<LD>(bf, sK, n * 8, kk * 16, g, t);
                T::mma(s[n], qa[kk], bf);
            }
        }
        float mx[2] = {m[0], m[1]};
        PK_UNROLL
        for (int n = 0; n < NK; ++n) {
            PK_UNROLL
            for (int e = 0; e < 4; ++e) {
                const int j = k0 + n * 8 + 2 * t + (e & 1);
                float x = s[n][e] * p.scale_log2;
                if (j >= p.sk) x = -INFINITY;
                else if (bb) x += bb[j];
                s[n][e] = x;
                mx[e >> 1] = fmaxf(mx[e >> 1], x);
            }
        }
        float mu[2], alpha[2], rs[2] = {0.f, 0.f};
        PK_UNROLL
        for (int r = 0; r < 2; ++r) {
            // The four threads of a quad hold one row between them.
            mx[r] = fmaxf(mx[r], pk_shfl_xor(mx[r], 1));
            mx[r] = fmaxf(mx[r], pk_shfl_xor(mx[r], 2));
            // No kept key so far: subtract 0, so that exp2(−∞ − 0) = 0 instead of NaN.
            mu[r] = mx[r] == -INFINITY ? 0.f : mx[r];
            alpha[r] = exp2f(m[r] - mu[r]);
            m[r] = mx[r];
        }
        PK_UNROLL
        for (int n = 0; n < NK; ++n) {
            PK_UNROLL
            for (int e = 0; e < 4; ++e) {
                s[n][e] = exp2f(s[n][e] - mu[e >> 1]);
                rs[e >> 1] += s[n][e];
            }
        }
        PK_UNROLL
        for (int r = 0; r < 2; ++r) l[r] = l[r] * alpha[r] + rs[r];
        PK_UNROLL
        for (int nd = 0; nd < ND; ++nd) {
            acc[nd][0] *= alpha[0];
            acc[nd][1] *= alpha[0];
            acc[nd][2] *= alpha[1];
            acc[nd][3] *= alpha[1];
        }
        PK_UNROLL
        for (int jj = 0; jj < BK / 16; ++jj) {
            uint32_t pa[4];
            c_to_a<T>(pa, s[2 * jj], s[2 * jj + 1]);
            PK_UNROLL
            for (int nd = 0; nd < ND; ++nd) {
                uint32_t bf[2];
                frag_b_cols<LD>(bf, sV, jj * 16, nd * 8, g, t);
                T::mma(acc[nd], pa, bf);
            }
        }
        __syncthreads();
    }

    PK_UNROLL
    for (int r = 0; r < 2; ++r) {
        l[r] += pk_shfl_xor(l[r], 1);
        l[r] += pk_shfl_xor(l[r], 2);
        const int i = q0 + warp * 16 + g + 8 * r;
        if (i < p.sq) {
            const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
            uint16_t* orow = o + (((long long)bi * p.sq + i) * p.h + hi) * D;
            PK_UNROLL
            for (int nd = 0; nd < ND; ++nd) pk_st32(orow + nd * 8 + 2 * t, T::pack(acc[nd][2 * r] * inv, acc[nd][2 * r + 1] * inv));
            if (t == 0) lse[((long long)bi * p.h + hi) * p.sq + i] = l[r] > 0.f ? m[r] * LN2 + logf(l[r]) : INFINITY;
        }
    }
}

template <class T, int D>
PK_DEV void bwd_delta(const uint16_t* __restrict__ o, const uint16_t* __restrict__ g, float* __restrict__ delta, const AttnParams& p) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * (THREADS / 32) + warp;  // (b·H + h)·Sq + i
    if (row >= (long long)p.b * p.h * p.sq) return;  // the whole warp leaves together
    const int i = (int)(row % p.sq);
    const long long bh = row / p.sq;
    const int hi = (int)(bh % p.h), bi = (int)(bh / p.h);
    const uint16_t* orow = o + bi * p.o_sb + i * p.o_ss + hi * p.o_sh;
    const uint16_t* grow = g + bi * p.g_sb + i * p.g_ss + hi * p.g_sh;
    float s = 0.f;
    for (int c = lane; c < D; c += 32) s += T::to_f32(orow[c]) * T::to_f32(grow[c]);
    PK_UNROLL
    for (int mask = 16; mask > 0; mask >>= 1) s += pk_shfl_xor(s, mask);
    if (lane == 0) delta[row] = s;
}

template <class T, int D>
PK_DEV void bwd_dq(const uint16_t* __restrict__ q, const uint16_t* __restrict__ k, const uint16_t* __restrict__ v,
                   const float* __restrict__ bias, const uint16_t* __restrict__ gr, const float* __restrict__ lse,
                   const float* __restrict__ delta, uint16_t* __restrict__ dq, const AttnParams& p) {
    constexpr int BQ = 64, BK = 32, LD = D + PAD, KD = D / 16, ND = D / 8, NK = BK / 8;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int bi = blockIdx.z, hi = blockIdx.y, q0 = blockIdx.x * BQ;
    uint16_t* sK = reinterpret_cast<uint16_t*>(pk_smem());  // also the staging area of Q and dO
    uint16_t* sV = sK + BK * LD;
    const uint16_t* qb = q + bi * p.q_sb + hi * p.q_sh;
    const uint16_t* kb = k + bi * p.k_sb + hi * p.k_sh;
    const uint16_t* vb = v + bi * p.v_sb + hi * p.v_sh;
    const uint16_t* gb = gr + bi * p.g_sb + hi * p.g_sh;
    const float* bb = p.has_bias ? bias + bi * p.bias_sb : nullptr;
    const int valid = pk_min(BQ, p.sq - q0);

    uint32_t qa[KD][4], ga[KD][4];
    load_rows<D>(sK, qb + q0 * p.q_ss, p.q_ss, valid, BQ);
    __syncthreads();
    PK_UNROLL
    for (int kk = 0; kk < KD; ++kk) frag_a<LD>(qa[kk], sK, warp * 16, kk * 16, g, t);
    __syncthreads();
    load_rows<D>(sK, gb + q0 * p.g_ss, p.g_ss, valid, BQ);
    __syncthreads();
    PK_UNROLL
    for (int kk = 0; kk < KD; ++kk) frag_a<LD>(ga[kk], sK, warp * 16, kk * 16, g, t);
    __syncthreads();

    const long long rows = ((long long)bi * p.h + hi) * p.sq;
    float lse2[2], dl[2];
    PK_UNROLL
    for (int r = 0; r < 2; ++r) {
        const int i = q0 + warp * 16 + g + 8 * r;
        lse2[r] = i < p.sq ? lse[rows + i] * LOG2E : INFINITY;  // +∞: P = 0
        dl[r] = i < p.sq ? delta[rows + i] : 0.f;
    }
    float dqa[ND][4];
    PK_UNROLL
    for (int nd = 0; nd < ND; ++nd) dqa[nd][0] = dqa[nd][1] = dqa[nd][2] = dqa[nd][3] = 0.f;

    for (int k0 = 0; k0 < p.sk; k0 += BK) {
        const int nk = pk_min(BK, p.sk - k0);
        load_rows<D>(sK, kb + k0 * p.k_ss, p.k_ss, nk, BK);
        load_rows<D>(sV, vb + k0 * p.v_ss, p.v_ss, nk, BK);
        __syncthreads();
        float s[NK][4], dp[NK][4];
        PK_UNROLL
        for (int n = 0; n < NK; ++n) {
            s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
            dp[n][0] = dp[n][1] = dp[n][2] = dp[n][3] = 0.f;
            PK_UNROLL
            for (int kk = 0; kk < KD; ++kk) {
                uint32_t bf[2];
                frag_b_rows<LD>(bf, sK, n * 8, kk * 16, g, t);
                T::mma(s[n], qa[kk], bf);
                frag_b_rows<LD>(bf, sV, n * 8, kk * 16, g, t);
                T::mma(dp[n], ga[kk], bf);
            }
        }
        PK_UNROLL
        for (int n = 0; n < NK; ++n) {
            PK_UNROLL
            for (int e = 0; e < 4; ++e) {
                const int j = k0 + n * 8 + 2 * t + (e & 1);
                float x = s[n][e] * p.scale_log2;
                if (j >= p.sk) x = -INFINITY;
                else if (bb) x += bb[j];
                const float pr = exp2f(x - lse2[e >> 1]);
                s[n][e] = pr * (dp[n][e] - dl[e >> 1]);  // dS
            }
        }
        PK_UNROLL
        for (int jj = 0; jj < BK / 16; ++jj) {
            uint32_t da[4];
            c_to_a<T>(da, s[2 * jj], s[2 * jj + 1]);
            PK_UNROLL
            for (int nd = 0; nd < ND; ++nd) {
                uint32_t bf[2];
                frag_b_cols<LD>(bf, sK, jj * 16, nd * 8, g, t);
                T::mma(dqa[nd], da, bf);
            }
        }
        __syncthreads();
    }

    PK_UNROLL
    for (int r = 0; r < 2; ++r) {
        const int i = q0 + warp * 16 + g + 8 * r;
        if (i < p.sq) {
            uint16_t* row = dq + (((long long)bi * p.sq + i) * p.h + hi) * D;
            PK_UNROLL
            for (int nd = 0; nd < ND; ++nd) pk_st32(row + nd * 8 + 2 * t, T::pack(dqa[nd][2 * r] * p.scale, dqa[nd][2 * r + 1] * p.scale));
        }
    }
}

template <class T, int D>
PK_DEV void bwd_dkdv(const uint16_t* __restrict__ q, const uint16_t* __restrict__ k, const uint16_t* __restrict__ v,
                     const float* __restrict__ bias, const uint16_t* __restrict__ gr, const float* __restrict__ lse,
                     const float* __restrict__ delta, uint16_t* __restrict__ dk, uint16_t* __restrict__ dv, const AttnParams& p) {
    constexpr int BK = 64, BQ = 32, LD = D + PAD, KD = D / 16, ND = D / 8, NQ = BQ / 8;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    const int bi = blockIdx.z, hi = blockIdx.y, k0 = blockIdx.x * BK;
    uint16_t* sK = reinterpret_cast<uint16_t*>(pk_smem());
    uint16_t* sV = sK + BK * LD;
    uint16_t* sQ = sV + BK * LD;
    uint16_t* sG = sQ + BQ * LD;
    float* sL = reinterpret_cast<float*>(sG + BQ * LD);  // lse · log2(e) of the query tile
    float* sD = sL + BQ;                                 // Δ of the query tile
    const uint16_t* qb = q + bi * p.q_sb + hi * p.q_sh;
    const uint16_t* kb = k + bi * p.k_sb + hi * p.k_sh;
    const uint16_t* vb = v + bi * p.v_sb + hi * p.v_sh;
    const uint16_t* gb = gr + bi * p.g_sb + hi * p.g_sh;
    const float* bb = p.has_bias ? bias + bi * p.bias_sb : nullptr;
    const long long rows = ((long long)bi * p.h + hi) * p.sq;
    const int kr = warp * 16;  // this warp's key rows in the tile

    load_rows<D>(sK, kb + k0 * p.k_ss, p.k_ss, pk_min(BK, p.sk - k0), BK);
    load_rows<D>(sV, vb + k0 * p.v_ss, p.v_ss, pk_min(BK, p.sk - k0), BK);
    float kbias[2];
    PK_UNROLL
    for (int r = 0; r < 2; ++r) {
        const int j = k0 + kr + g + 8 * r;
        kbias[r] = j >= p.sk ? -INFINITY : (bb ? bb[j] : 0.f);
    }
    float dka[ND][4], dva[ND][4];
    PK_UNROLL
    for (int nd = 0; nd < ND; ++nd) {
        dka[nd][0] = dka[nd][1] = dka[nd][2] = dka[nd][3] = 0.f;
        dva[nd][0] = dva[nd][1] = dva[nd][2] = dva[nd][3] = 0.f;
    }

    for (int q0 = 0; q0 < p.sq; q0 += BQ) {
        __syncthreads();  // the previous tile's readers are done
        const int valid = pk_min(BQ, p.sq - q0);
        load_rows<D>(sQ, qb + q0 * p.q_ss, p.q_ss, valid, BQ);
        load_rows<D>(sG, gb + q0 * p.g_ss, p.g_ss, valid, BQ);
        if (threadIdx.x < BQ) {
            const int i = q0 + threadIdx.x;
            sL[threadIdx.x] = i < p.sq ? lse[rows + i] * LOG2E : INFINITY;
            sD[threadIdx.x] = i < p.sq ? delta[rows + i] : 0.f;
        }
        __syncthreads();
        // Sᵀ = K·Qᵀ and dPᵀ = V·dOᵀ for this warp's 16 keys × the tile's 32 queries.
        float st[NQ][4], dpt[NQ][4];
        PK_UNROLL
        for (int n = 0; n < NQ; ++n) st[n][0] = st[n][1] = st[n][2] = st[n][3] = dpt[n][0] = dpt[n][1] = dpt[n][2] = dpt[n][3] = 0.f;
        PK_UNROLL
        for (int kk = 0; kk < KD; ++kk) {
            uint32_t ak[4], av[4];
            frag_a<LD>(ak, sK, kr, kk * 16, g, t);
            frag_a<LD>(av, sV, kr, kk * 16, g, t);
            PK_UNROLL
            for (int n = 0; n < NQ; ++n) {
                uint32_t bf[2];
                frag_b_rows<LD>(bf, sQ, n * 8, kk * 16, g, t);
                T::mma(st[n], ak, bf);
                frag_b_rows<LD>(bf, sG, n * 8, kk * 16, g, t);
                T::mma(dpt[n], av, bf);
            }
        }
        PK_UNROLL
        for (int n = 0; n < NQ; ++n) {
            PK_UNROLL
            for (int e = 0; e < 4; ++e) {
                const int qi = n * 8 + 2 * t + (e & 1);
                const float pr = exp2f(st[n][e] * p.scale_log2 + kbias[e >> 1] - sL[qi]);
                st[n][e] = pr;                          // Pᵀ
                dpt[n][e] = pr * (dpt[n][e] - sD[qi]);  // dSᵀ
            }
        }
        // dV += Pᵀ·dO, dK += dSᵀ·Q (B operands read down the columns of the query tiles).
        PK_UNROLL
        for (int jj = 0; jj < BQ / 16; ++jj) {
            uint32_t pa[4], da[4];
            c_to_a<T>(pa, st[2 * jj], st[2 * jj + 1]);
            c_to_a<T>(da, dpt[2 * jj], dpt[2 * jj + 1]);
            PK_UNROLL
            for (int nd = 0; nd < ND; ++nd) {
                uint32_t bf[2];
                frag_b_cols<LD>(bf, sG, jj * 16, nd * 8, g, t);
                T::mma(dva[nd], pa, bf);
                frag_b_cols<LD>(bf, sQ, jj * 16, nd * 8, g, t);
                T::mma(dka[nd], da, bf);
            }
        }
    }

    PK_UNROLL
    for (int r = 0; r < 2; ++r) {
        const int j = k0 + kr + g + 8 * r;
        if (j < p.sk) {
            const long long off = (((long long)bi * p.sk + j) * p.h + hi) * D;
            PK_UNROLL
            for (int nd = 0; nd < ND; ++nd) {
                pk_st32(dk + off + nd * 8 + 2 * t, T::pack(dka[nd][2 * r] * p.scale, dka[nd][2 * r + 1] * p.scale));
                pk_st32(dv + off + nd * 8 + 2 * t, T::pack(dva[nd][2 * r], dva[nd][2 * r + 1]));
            }
        }
    }
}

}  // namespace attn

// Entry points, one set per (element type, head size): attn_fwd_bf16_d128 and so on.
#define PK_ATTENTION_KERNELS(T, NAME, D)                                                                                   \
    PK_KERNEL(attn::THREADS)                                                                                             \
    attn_fwd_##NAME##_d##D(const uint16_t* q, const uint16_t* k, const uint16_t* v, const float* bias, uint16_t* o,     \
                           float* lse, AttnParams p) {                                                                   \
        attn::fwd<T, D>(q, k, v, bias, o, lse, p);                                                                       \
    }                                                                                                                    \
    PK_KERNEL(attn::THREADS) attn_bwd_delta_##NAME##_d##D(const uint16_t* o, const uint16_t* g, float* delta, AttnParams p) { \
        attn::bwd_delta<T, D>(o, g, delta, p);                                                                           \
    }                                                                                                                    \
    PK_KERNEL(attn::THREADS)                                                                                             \
    attn_bwd_dq_##NAME##_d##D(const uint16_t* q, const uint16_t* k, const uint16_t* v, const float* bias,               \
                              const uint16_t* g, const float* lse, const float* delta, uint16_t* dq, AttnParams p) {    \
        attn::bwd_dq<T, D>(q, k, v, bias, g, lse, delta, dq, p);                                                         \
    }                                                                                                                    \
    PK_KERNEL(attn::THREADS)                                                                                             \
    attn_bwd_dkdv_##NAME##_d##D(const uint16_t* q, const uint16_t* k, const uint16_t* v, const float* bias,             \
                                const uint16_t* g, const float* lse, const float* delta, uint16_t* dk, uint16_t* dv,    \
                                AttnParams p) {                                                                          \
        attn::bwd_dkdv<T, D>(q, k, v, bias, g, lse, delta, dk, dv, p);                                                   \
    }

PK_ATTENTION_KERNELS(Bf16, bf16, 64)
PK_ATTENTION_KERNELS(Bf16, bf16, 128)
PK_ATTENTION_KERNELS(F16, f16, 64)
PK_ATTENTION_KERNELS(F16, f16, 128)
