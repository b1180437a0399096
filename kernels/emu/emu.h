// A CPU emulator for phasekit's CUDA kernels: compiles the same kernel source as plain C++ and
// runs every thread of a block as a fiber (ucontext), switching only at __syncthreads and at
// warp-collective operations (shuffles, mma.sync). See kernels/emu/README.md for what it checks
// and what it cannot.
//
// - __syncthreads releases only when every thread of the block has reached it; a thread that
//   returns while others wait, or a warp collective that not all 32 lanes reach (with the same
//   operation), is reported as an error.
// - Warp collectives exchange each lane's registers through a per-warp buffer; mma.m16n8k16 is
//   computed from the fragments of all 32 lanes, following the PTX ISA's fragment layouts.
// - Shared memory is a fresh allocation of exactly the launch's dynamic size, filled with 0xFF
//   bytes (NaN as f32, bf16 and f16) before each block; global memory is the host's.
// - Three schedules (Schedule below): warps in step, or each warp running alone as far as the
//   next __syncthreads, lowest or highest first. A kernel that reads shared memory another warp
//   writes without a barrier in between sees different data under different schedules.
#pragma once

#include <ucontext.h>

#include <math.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>


struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};

#define __syncthreads() emu::syncthreads()
#define __restrict__
#define threadIdx (emu::me().tid)
#define blockIdx (emu::state().bidx)
#define blockDim (emu::state().block)
#define gridDim (emu::state().grid)

namespace emu {

enum class At { Running, Sync, Warp, Done };

struct Fiber {
    ucontext_t ctx;
    std::unique_ptr<char[]> stack;
    dim3 tid;
    At at = At::Running;
    int op = 0;          // which collective a lane waits at
    unsigned count = 0;  // collectives this lane has completed
};

// Payload of one lane in one collective.
struct Slot {
    alignas(16) unsigned char bytes[32];
};

struct State {
    dim3 grid, block, bidx;
    std::vector<Fiber> fibers;
    Fiber* cur = nullptr;
    ucontext_t sched;
    std::unique_ptr<unsigned char[]> smem;
    std::function<void()> body;
    std::vector<Slot> slots;  // [warp][parity][lane]
};

inline State& state() {
    static State s;
    return s;
}
inline Fiber& me() { return *state().cur; }
inline unsigned char* smem() { return state().smem.get(); }
inline void copy_bytes(void* d, const void* s, size_t n) { std::memcpy(d, s, n); }

[[noreturn]] inline void fail(const char* what) {
    std::fprintf(stderr, "emu: %s (block %u,%u,%u)\n", what, state().bidx.x, state().bidx.y, state().bidx.z);
    std::exit(2);
}

inline void yield(At at, int op) {
    Fiber& f = me();
    f.at = at;
    f.op = op;
    swapcontext(&f.ctx, &state().sched);
}

inline void syncthreads() { yield(At::Sync, 0); }

inline int lane_of(const Fiber& f) { return (int)(f.tid.x % 32); }
inline int warp_of(const Fiber& f) { return (int)(f.tid.x / 32); }
inline Slot* warp_slots(int warp, unsigned parity) { return &state().slots[((size_t)warp * 2 + parity) * 32]; }

// One warp collective: publish `n` bytes, wait for the 32 lanes, return the warp's 32 slots.
// Two buffers alternate, so a lane can publish collective k+1 while slower lanes still read k
// (none can reach k+2 before every lane has arrived at k+1, i.e. finished reading k).
inline const Slot* exchange(const void* payload, size_t n, int op) {
    Fiber& f = me();
    const unsigned parity = f.count & 1;
    Slot* s = warp_slots(warp_of(f), parity);
    std::memcpy(s[lane_of(f)].bytes, payload, n);
    yield(At::Warp, op);
    f.count++;
    return s;
}

enum Op { OpShfl = 1, OpMma = 2 };

inline float shfl_xor(float v, int mask) {
    const Slot* s = exchange(&v, sizeof v, OpShfl * 64 + mask);
    float r;
    std::memcpy(&r, s[lane_of(me()) ^ mask].bytes, sizeof r);
    return r;
}

// mma.sync.aligned.m16n8k16.row.col.f32.{bf16,f16}.{bf16,f16}.f32, with C = D.
// Fragments (PTX ISA 9.7.14.5.8): group g = lane / 4, t = lane % 4;
//   A: a_i (i = 0..7, two per register, low half first): row g for i ∈ {0,1,4,5}, g + 8 otherwise;
//      column 2t + (i & 1), + 8 for i ≥ 4;
//   B: b_i (i = 0..3): row 2t + (i & 1), + 8 for i ≥ 2; column g;
//   C/D: c_i (i = 0..3): row g for i < 2, g + 8 otherwise; column 2t + (i & 1).
inline void mma_m16n8k16(float d[4], const uint32_t a[4], const uint32_t b[2], float (*to_f32)(uint16_t)) {
    uint32_t mine[6] = {a[0], a[1], a[2], a[3], b[0], b[1]};
    const Slot* s = exchange(mine, sizeof mine, OpMma);
    float A[16][16], B[16][8];
    for (int lane = 0; lane < 32; ++lane) {
        uint32_t r[6];
        std::memcpy(r, s[lane].bytes, sizeof r);
        const int g = lane / 4, t = lane % 4;
        for (int i = 0; i < 8; ++i) {
            const uint16_t h = (uint16_t)(r[i / 2] >> (16 * (i & 1)));
            const int row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
            const int col = 2 * t + (i & 1) + (i >= 4 ? 8 : 0);
            A[row][col] = to_f32(h);
        }
        for (int i = 0; i < 4; ++i) {
            const uint16_t h = (uint16_t)(r[4 + i / 2] >> (16 * (i & 1)));
            B[2 * t + (i & 1) + (i >= 2 ? 8 : 0)][g] = to_f32(h);
        }
    }
    const int lane = lane_of(me()), g = lane / 4, t = lane % 4;
    for (int i = 0; i < 4; ++i) {
        const int row = i < 2 ? g : g + 8, col = 2 * t + (i & 1);
        float acc = d[i];
        for (int kk = 0; kk < 16; ++kk) acc += A[row][kk] * B[kk][col];
        d[i] = acc;
    }
}

inline float bits_f32(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // quiet NaN
    u += 0x7fffu + ((u >> 16) & 1u);                                             // round to nearest even
    return (uint16_t)(u >> 16);
}
inline float f16_to_f32(uint16_t x) {
    _Float16 h;
    std::memcpy(&h, &x, 2);
    return (float)h;
}
inline uint16_t f32_to_f16(float f) {
    const _Float16 h = (_Float16)f;  // IEEE conversion, round to nearest even
    uint16_t x;
    std::memcpy(&x, &h, 2);
    return x;
}

inline void trampoline() {
    state().body();
    me().at = At::Done;
    swapcontext(&me().ctx, &state().sched);
}

// How the fibers of a block take turns.
enum class Schedule {
    // Every thread runs to its next switch point, in thread order; then complete warp
    // collectives are released. Warps advance in step.
    Lockstep,
    // Warp 0 runs alone until it waits at __syncthreads (its collectives released as soon as
    // its 32 lanes arrive), then warp 1, and so on: warps drift as far apart as the barriers
    // allow, so a missing __syncthreads shows up as a different result than under Lockstep.
    WarpsUp,
    // The same, last warp first.
    WarpsDown,
};

inline bool release_warp(Fiber* lanes) {
    for (int l = 0; l < 32; ++l)
        if (lanes[l].at != At::Warp) return false;
    for (int l = 1; l < 32; ++l)
        if (lanes[l].op != lanes[0].op || lanes[l].count != lanes[0].count) fail("lanes of a warp met at different collectives");
    for (int l = 0; l < 32; ++l) lanes[l].at = At::Running;
    return true;
}

inline void resume(Fiber& f) {
    state().cur = &f;
    swapcontext(&state().sched, &f.ctx);
}

// Run `kernel` (a callable that runs one thread's kernel body) over the grid.
template <class F>
void launch(dim3 grid, dim3 block, size_t smem_bytes, F kernel, Schedule schedule = Schedule::Lockstep) {
    State& st = state();
    const unsigned n = block.x * block.y * block.z, warps = n / 32;
    if (block.y != 1 || block.z != 1 || n % 32 != 0) fail("only 1-D blocks of whole warps are emulated");
    st.grid = grid;
    st.block = block;
    st.body = kernel;
    for (unsigned z = 0; z < grid.z; ++z)
        for (unsigned y = 0; y < grid.y; ++y)
            for (unsigned x = 0; x < grid.x; ++x) {
                st.bidx = dim3{x, y, z};
                st.smem.reset(new unsigned char[smem_bytes ? smem_bytes : 1]);
                std::memset(st.smem.get(), 0xFF, smem_bytes);
                st.slots.assign((size_t)warps * 2 * 32, Slot{});
                st.fibers.clear();
                st.fibers.resize(n);
                for (unsigned i = 0; i < n; ++i) {
                    Fiber& f = st.fibers[i];
                    f.tid = dim3{i, 0, 0};
                    f.stack.reset(new char[1 << 16]);
                    getcontext(&f.ctx);
                    f.ctx.uc_stack.ss_sp = f.stack.get();
                    f.ctx.uc_stack.ss_size = 1 << 16;
                    f.ctx.uc_link = nullptr;
                    makecontext(&f.ctx, trampoline, 0);
                }
                for (;;) {
                    bool released = false;
                    if (schedule == Schedule::Lockstep) {
                        for (unsigned k = 0; k < n; ++k)
                            if (st.fibers[k].at == At::Running) resume(st.fibers[k]);
                        for (unsigned w = 0; w < warps; ++w) released |= release_warp(&st.fibers[w * 32]);
                    } else {
                        for (unsigned k = 0; k < warps; ++k) {
                            Fiber* lanes = &st.fibers[(schedule == Schedule::WarpsUp ? k : warps - 1 - k) * 32];
                            do {
                                for (int l = 0; l < 32; ++l)
                                    if (lanes[l].at == At::Running) resume(lanes[l]);
                            } while (release_warp(lanes));
                        }
                    }
                    if (released) continue;
                    unsigned done = 0, sync = 0;
                    for (auto& f : st.fibers) {
                        done += f.at == At::Done;
                        sync += f.at == At::Sync;
                    }
                    if (done == n) break;
                    if (sync == n) {
                        for (auto& f : st.fibers) f.at = At::Running;
                        continue;
                    }
                    if (sync > 0 && sync + done == n) fail("__syncthreads not reached by every thread (some returned)");
                    fail("deadlock: a warp collective not reached by all 32 lanes, or mixed with __syncthreads");
                }
            }
    st.cur = nullptr;
}

}  // namespace emu
