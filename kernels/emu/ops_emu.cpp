// The element-wise kernels (norm.cu, rope.cu, gated.cu, gelu.cu) as a shared library for the CPU:
// src/ops/fused.rs loads it (dlopen) and launches a kernel by name with CUDA's argument
// convention, so the same host code (parameters, grids, argument order) and the same kernel
// source run on CPU tensors through the emulator (emu.h). tests/ops_elementwise.rs builds it:
//     c++ -std=c++17 -O2 -shared -fPIC -I kernels kernels/emu/ops_emu.cpp -o libpk_emu.so
#include "../gated.cu"
#include "../gelu.cu"
#include "../norm.cu"
#include "../rope.cu"

// Runs kernel `name` over grid (gx, gy, gz) with `block` threads and `smem` bytes of dynamic shared
// memory; args[i] points to the value of argument i. schedule: 0 warps in step, 1 each warp alone
// up to its next barrier (first to last), 2 the same last to first. Returns 0, or 1 for an
// unknown kernel. Not thread-safe (the emulator has one global state): the caller serialises.
extern "C" int pk_emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned block, unsigned long smem,
                             void** args, int schedule) {
    auto it = pk_emu::table().find(name);
    if (it == pk_emu::table().end()) return 1;
    emu::launch(dim3{gx, gy, gz}, dim3{block, 1, 1}, smem, it->second(args), (emu::Schedule)schedule);
    return 0;
}

// Number of registered kernels (a check that the library is the one expected).
extern "C" int pk_emu_kernels() { return (int)pk_emu::table().size(); }
