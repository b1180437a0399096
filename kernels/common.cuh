// Shared helpers for phasekit's CUDA kernels (compiled to PTX by build.rs), written so that the
// same source also compiles as plain C++ against kernels/emu/emu.h, which runs a kernel's
// threads as fibers on the CPU (kernels/emu/README.md). Everything that differs between the two
// lives here: the tensor-core instruction, warp shuffles, shared memory, vector loads and the
// 16-bit float conversions.
#pragma once

#include <stdint.h>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define PK_DEV __device__ __forceinline__
#define PK_KERNEL(threads) extern "C" __global__ void __launch_bounds__(threads)
#define PK_UNROLL _Pragma("unroll")
typedef uint4 pk_vec16;
#else
#include "emu/emu.h"
#define PK_DEV inline
#define PK_KERNEL(threads) inline void
#define PK_UNROLL
struct alignas(16) pk_vec16 {
    uint32_t x, y, z, w;
};
#endif

#ifndef INFINITY
#define INFINITY __builtin_huge_valf()
#endif

// Dynamic shared memory of the running block (16-byte aligned).
PK_DEV unsigned char* pk_smem() {
#if defined(__CUDACC__)
    extern __shared__ __align__(16) unsigned char pk_dyn_smem[];
    return pk_dyn_smem;
#else
    return emu::smem();
#endif
}

PK_DEV float pk_shfl_xor(float v, int mask) {
#if defined(__CUDACC__)
    return __shfl_xor_sync(0xffffffffu, v, mask);
#else
    return emu::shfl_xor(v, mask);
#endif
}

// 16-byte and 4-byte accesses (the emulator copies bytes: no aliasing assumptions).
PK_DEV pk_vec16 pk_ld16(const void* p) {
#if defined(__CUDACC__)
    return *reinterpret_cast<const uint4*>(p);
#else
    pk_vec16 v;
    emu::copy_bytes(&v, p, 16);
    return v;
#endif
}
PK_DEV void pk_st16(void* p, pk_vec16 v) {
#if defined(__CUDACC__)
    *reinterpret_cast<uint4*>(p) = v;
#else
    emu::copy_bytes(p, &v, 16);
#endif
}
PK_DEV uint32_t pk_ld32(const uint16_t* p) {
#if defined(__CUDACC__)
    return *reinterpret_cast<const uint32_t*>(p);
#else
    uint32_t v;
    emu::copy_bytes(&v, p, 4);
    return v;
#endif
}
PK_DEV void pk_st32(uint16_t* p, uint32_t v) {
#if defined(__CUDACC__)
    *reinterpret_cast<uint32_t*>(p) = v;
#else
    emu::copy_bytes(p, &v, 4);
#endif
}

// Two 16-bit elements in one 32-bit register, the lower index in the low half (the order
// mma.sync expects: "elements low to high").
PK_DEV uint32_t pk_pair(uint16_t lo, uint16_t hi) { return (uint32_t)lo | ((uint32_t)hi << 16); }

// bf16: the upper half of an f32. Conversion to bf16 rounds to nearest even.
struct Bf16 {
    static PK_DEV float to_f32(uint16_t x) {
#if defined(__CUDACC__)
        return __uint_as_float((uint32_t)x << 16);
#else
        return emu::bits_f32((uint32_t)x << 16);
#endif
    }
    static PK_DEV uint16_t from_f32(float f) {
#if defined(__CUDACC__)
        return __bfloat16_as_ushort(__float2bfloat16_rn(f));
#else
        return emu::f32_to_bf16(f);
#endif
    }
    static PK_DEV uint32_t pack(float lo, float hi) {
#if defined(__CUDACC__)
        __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x = lo (low half), .y = hi
        return *reinterpret_cast<uint32_t*>(&v);
#else
        return pk_pair(emu::f32_to_bf16(lo), emu::f32_to_bf16(hi));
#endif
    }
    // D = A·B + D for a 16×8×16 tile: A 16×16 row-major fragment (4 regs), B 16×8 "col"
    // fragment (2 regs), D 16×8 f32 (4 regs); fragment layouts: PTX ISA, "Matrix Fragments for
    // mma.m16n8k16 with floating point type".
    static PK_DEV void mma(float d[4], const uint32_t a[4], const uint32_t b[2]) {
#if defined(__CUDACC__)
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
        emu::mma_m16n8k16(d, a, b, &Bf16::to_f32);
#endif
    }
};

// IEEE half. Conversion to f16 rounds to nearest even.
struct F16 {
    static PK_DEV float to_f32(uint16_t x) {
#if defined(__CUDACC__)
        return __half2float(__ushort_as_half(x));
#else
        return emu::f16_to_f32(x);
#endif
    }
    static PK_DEV uint16_t from_f32(float f) {
#if defined(__CUDACC__)
        return __half_as_ushort(__float2half_rn(f));
#else
        return emu::f32_to_f16(f);
#endif
    }
    static PK_DEV uint32_t pack(float lo, float hi) {
#if defined(__CUDACC__)
        __half2 v = __floats2half2_rn(lo, hi);  // .x = lo (low half), .y = hi
        return *reinterpret_cast<uint32_t*>(&v);
#else
        return pk_pair(emu::f32_to_f16(lo), emu::f32_to_f16(hi));
#endif
    }
    static PK_DEV void mma(float d[4], const uint32_t a[4], const uint32_t b[2]) {
#if defined(__CUDACC__)
        asm volatile(
            "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
            "{%0,%1,%2,%3};\n"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
        emu::mma_m16n8k16(d, a, b, &F16::to_f32);
#endif
    }
};

PK_DEV int pk_min(int a, int b) { return a < b ? a : b; }
