// Shared pieces of phasekit's element-wise kernels (norm.cu, rope.cu, gated.cu, gelu.cu; the ops
// in src/ops/{norm,rope,gated,gelu}.rs): storage types that are read and written as f32, 16-byte
// vector loads, the warp sum, and, in the CPU build, the registry through which
// src/ops/fused.rs launches the very same kernels in the emulator (kernels/emu/ops_emu.cpp).
//
// Every kernel here computes in f32 whatever its storage types (f32, bf16, f16) and rounds once,
// when it stores. Kernels are named `<op>_<kind>_<types>[_v<V>]` and take pointers first, then
// one parameter struct by value, mirrored by a #[repr(C)] struct on the Rust side (both sides
// assert its size).
#pragma once

#include "common.cuh"

#if defined(__CUDACC__)
#define PK_EXPORT(name)
#else
#include "emu/registry.h"
// Registers a kernel under its name for pk_emu_launch (kernels/emu/ops_emu.cpp).
#define PK_EXPORT(name) static const bool pk_registered_##name = pk_emu::add(#name, &name);
#endif

namespace ew {

// Storage types: S is what a tensor holds, ld/st convert to and from f32 (st rounds to nearest
// even).
struct F32 {
    typedef float S;
    static PK_DEV float ld(float x) { return x; }
    static PK_DEV float st(float f) { return f; }
};
struct BF16 {
    typedef uint16_t S;
    static PK_DEV float ld(uint16_t x) { return ::Bf16::to_f32(x); }
    static PK_DEV uint16_t st(float f) { return ::Bf16::from_f32(f); }
};
struct F16 {
    typedef uint16_t S;
    static PK_DEV float ld(uint16_t x) { return ::F16::to_f32(x); }
    static PK_DEV uint16_t st(float f) { return ::F16::from_f32(f); }
};

// V consecutive elements from p. With V = 8 the host guarantees 16-byte alignment (element offset
// and row length multiples of 8), and the elements come in 16-byte loads (one for 16-bit types,
// two for f32); otherwise one element at a time.
template <class T, int V>
PK_DEV void load(const typename T::S* p, float* f) {
    typedef typename T::S S;
    if constexpr (V == 8) {
        constexpr int W = (int)(16 / sizeof(S));  // elements per 16-byte load
        PK_UNROLL
        for (int j = 0; j < V / W; ++j) {
            union {
                pk_vec16 v;
                S s[W];
            } u;
            u.v = pk_ld16(p + j * W);
            PK_UNROLL
            for (int i = 0; i < W; ++i) f[j * W + i] = T::ld(u.s[i]);
        }
    } else {
        PK_UNROLL
        for (int i = 0; i < V; ++i) f[i] = T::ld(p[i]);
    }
}

template <class T, int V>
PK_DEV void store(typename T::S* p, const float* f) {
    typedef typename T::S S;
    if constexpr (V == 8) {
        constexpr int W = (int)(16 / sizeof(S));
        PK_UNROLL
        for (int j = 0; j < V / W; ++j) {
            union {
                pk_vec16 v;
                S s[W];
            } u;
            PK_UNROLL
            for (int i = 0; i < W; ++i) u.s[i] = T::st(f[j * W + i]);
            pk_st16(p + j * W, u.v);
        }
    } else {
        PK_UNROLL
        for (int i = 0; i < V; ++i) p[i] = T::st(f[i]);
    }
}

// Sum over the 32 lanes of a warp; every lane gets the total (the same bits on every lane).
PK_DEV float warp_sum(float v) {
    PK_UNROLL
    for (int m = 16; m > 0; m >>= 1) v += pk_shfl_xor(v, m);
    return v;
}

}  // namespace ew
