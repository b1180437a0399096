// Runs kernels/attention.cu on the CPU through the emulator (emu.h) and checks every kernel
// against attention computed here in double precision (the whole score matrix). Built and run by
// tests/kernel_emulation.rs (and by hand: see README.md). Exit 0 when every check passes.
//
// Each case: random bf16 or f16 inputs (the reference uses the same rounded values), strided
// layouts like the ones the Rust side passes, key masks with fully masked rows, sizes that are not
// multiples of any tile. Checks: rel L2 of O, lse, dQ, dK, dV against the reference; every output
// element written (outputs are poisoned with NaN first); fully masked rows give O = 0, lse = +∞
// and dQ = 0; and the results are bit-identical under the emulator's three schedules (warps in step, or
// each warp alone up to the next barrier, first to last and last to first).
#include "../attention.cu"

#include <string>

namespace {

struct Rng {
    uint64_t s;
    double next() {  // [-1, 1)
        s ^= s << 13;
        s ^= s >> 7;
        s ^= s << 17;
        return (double)(s >> 11) / (double)(1ull << 53) * 2.0 - 1.0;
    }
};

// A [B, S, H, D] tensor stored with some element strides.
struct Strided {
    std::vector<uint16_t> mem;
    long long sb, ss, sh, off;
    const uint16_t* base() const { return mem.data() + off; }
    size_t at(int b, int s, int h, int d) const { return (size_t)(off + b * sb + s * ss + h * sh + d); }
};

// Layouts: 0 contiguous [B, S, H, D]; 1 stored [B, H, S, D]; 2 inside a fused [B, S, 3, H, D]
// projection output (slot 1), with a 64-element offset.
Strided make(int layout, int B, int S, int H, int D) {
    Strided t;
    if (layout == 0) t = {std::vector<uint16_t>((size_t)B * S * H * D), (long long)S * H * D, (long long)H * D, D, 0};
    else if (layout == 1) t = {std::vector<uint16_t>((size_t)B * S * H * D), (long long)S * H * D, D, (long long)S * D, 0};
    else t = {std::vector<uint16_t>((size_t)B * S * 3 * H * D + 64), (long long)S * 3 * H * D, 3LL * H * D, D, 64 + (long long)H * D};
    for (auto& x : t.mem) x = 0x7fc0;  // NaN in bf16; padding must never be read into results
    return t;
}

struct Case {
    const char* name;
    bool f16;
    int D, B, H, Sq, Sk;
    int mask;  // 0 none; 1 partial + a batch with every key dropped; 2 Qwen-like prompt padding
    int lq, lk;  // layouts of q and of k/v/dO
};

template <class T>
struct Run {
    std::vector<uint16_t> o, dq, dk, dv;
    std::vector<float> lse;
};

template <class T, int D>
Run<T> run_kernels(const Case& c, const Strided& q, const Strided& k, const Strided& v, const Strided& g,
                   const std::vector<float>& bias, emu::Schedule sched) {
    AttnParams p{};
    p.q_sb = q.sb, p.q_ss = q.ss, p.q_sh = q.sh;
    p.k_sb = k.sb, p.k_ss = k.ss, p.k_sh = k.sh;
    p.v_sb = v.sb, p.v_ss = v.ss, p.v_sh = v.sh;
    p.o_sb = (long long)c.Sq * c.H * D, p.o_ss = (long long)c.H * D, p.o_sh = D;
    p.g_sb = g.sb, p.g_ss = g.ss, p.g_sh = g.sh;
    p.bias_sb = c.Sk;
    p.b = c.B, p.h = c.H, p.sq = c.Sq, p.sk = c.Sk;
    p.has_bias = c.mask != 0;
    p.scale = (float)(1.0 / std::sqrt((double)D));
    p.scale_log2 = p.scale * 1.4426950408889634f;
    const uint16_t poison = T::from_f32(NAN);
    Run<T> r;
    r.o.assign((size_t)c.B * c.Sq * c.H * D, poison);
    r.dq.assign((size_t)c.B * c.Sq * c.H * D, poison);
    r.dk.assign((size_t)c.B * c.Sk * c.H * D, poison);
    r.dv.assign((size_t)c.B * c.Sk * c.H * D, poison);
    r.lse.assign((size_t)c.B * c.H * c.Sq, NAN);
    std::vector<float> delta((size_t)c.B * c.H * c.Sq, NAN);
    const float* bp = c.mask ? bias.data() : nullptr;
    const dim3 block{attn::THREADS, 1, 1};
    const unsigned qt = (c.Sq + 63) / 64, kt = (c.Sk + 63) / 64;
    emu::launch(dim3{qt, (unsigned)c.H, (unsigned)c.B}, block, attn::fwd_smem<D>(), [&] {
        attn::fwd<T, D>(q.base(), k.base(), v.base(), bp, r.o.data(), r.lse.data(), p);
    }, sched);
    const unsigned rows = (unsigned)((c.B * c.H * c.Sq + 3) / 4);
    emu::launch(dim3{rows, 1, 1}, block, 0, [&] { attn::bwd_delta<T, D>(r.o.data(), g.base(), delta.data(), p); }, sched);
    emu::launch(dim3{qt, (unsigned)c.H, (unsigned)c.B}, block, attn::dq_smem<D>(), [&] {
        attn::bwd_dq<T, D>(q.base(), k.base(), v.base(), bp, g.base(), r.lse.data(), delta.data(), r.dq.data(), p);
    }, sched);
    emu::launch(dim3{kt, (unsigned)c.H, (unsigned)c.B}, block, attn::dkdv_smem<D>(), [&] {
        attn::bwd_dkdv<T, D>(q.base(), k.base(), v.base(), bp, g.base(), r.lse.data(), delta.data(), r.dk.data(), r.dv.data(), p);
    }, sched);
    return r;
}

double rel_l2(const std::vector<double>& got, const std::vector<double>& want) {
    double n = 0, d = 0;
    for (size_t i = 0; i < got.size(); ++i) {
        if (!std::isfinite(got[i])) return INFINITY;
        n += (got[i] - want[i]) * (got[i] - want[i]);
        d += want[i] * want[i];
    }
    return std::sqrt(n / std::fmax(d, 1e-4 * (double)want.size()));
}

template <class T, int D>
bool check(const Case& c, uint64_t seed) {
    const int B = c.B, H = c.H, Sq = c.Sq, Sk = c.Sk;
    Rng rng{seed * 0x9e3779b97f4a7c15ull + 1};
    Strided q = make(c.lq, B, Sq, H, D), k = make(c.lk, B, Sk, H, D), v = make(c.lk, B, Sk, H, D), g = make(c.lk, B, Sq, H, D);
    // Values as the kernels see them (rounded to T), in [B, S, H, D] order.
    std::vector<double> Q((size_t)B * Sq * H * D), K((size_t)B * Sk * H * D), V(K.size()), G(Q.size());
    auto fill = [&](Strided& t, std::vector<double>& x, int S, double mul, double add) {
        for (int b = 0; b < B; ++b)
            for (int s = 0; s < S; ++s)
                for (int h = 0; h < H; ++h)
                    for (int d = 0; d < D; ++d) {
                        const uint16_t e = T::from_f32((float)(rng.next() * mul + add));
                        t.mem[t.at(b, s, h, d)] = e;
                        x[(((size_t)b * S + s) * H + h) * D + d] = T::to_f32(e);
                    }
    };
    fill(q, Q, Sq, 1.5, 0.0);
    fill(k, K, Sk, 1.5, 0.0);
    fill(v, V, Sk, 1.0, 0.3);
    fill(g, G, Sq, 1.0, 0.0);
    std::vector<char> keep((size_t)B * Sk, 1);
    for (int b = 0; b < B; ++b)
        for (int j = 0; j < Sk; ++j) {
            if (c.mask == 1) keep[(size_t)b * Sk + j] = b == B - 1 ? 0 : (j % 5 != 2);
            if (c.mask == 2) keep[(size_t)b * Sk + j] = j >= 40 || j < 40 - 7 * (b + 1);
        }
    std::vector<float> bias((size_t)B * Sk);
    for (size_t i = 0; i < bias.size(); ++i) bias[i] = keep[i] ? 0.f : -INFINITY;

    // Reference in double precision.
    const double scale = 1.0 / std::sqrt((double)D);
    std::vector<double> O(Q.size(), 0.0), L((size_t)B * H * Sq), dQ(Q.size(), 0.0), dK(K.size(), 0.0), dV(K.size(), 0.0);
    auto ix = [&](int S, int b, int s, int h) { return (((size_t)b * S + s) * H + h) * D; };
    std::vector<double> P(Sk), S_(Sk), dP(Sk);
    for (int b = 0; b < B; ++b)
        for (int h = 0; h < H; ++h)
            for (int i = 0; i < Sq; ++i) {
                double m = -INFINITY;
                for (int j = 0; j < Sk; ++j) {
                    double s = -INFINITY;
                    if (keep[(size_t)b * Sk + j]) {
                        s = 0;
                        for (int d = 0; d < D; ++d) s += Q[ix(Sq, b, i, h) + d] * K[ix(Sk, b, j, h) + d];
                        s *= scale;
                    }
                    S_[j] = s;
                    m = std::fmax(m, s);
                }
                const size_t li = ((size_t)b * H + h) * Sq + i;
                if (m == -INFINITY) {
                    L[li] = INFINITY;
                    continue;
                }
                double z = 0;
                for (int j = 0; j < Sk; ++j) z += std::exp(S_[j] - m);
                L[li] = m + std::log(z);
                double pdp = 0;
                for (int j = 0; j < Sk; ++j) {
                    P[j] = std::exp(S_[j] - m) / z;
                    dP[j] = 0;
                    for (int d = 0; d < D; ++d) {
                        O[ix(Sq, b, i, h) + d] += P[j] * V[ix(Sk, b, j, h) + d];
                        dV[ix(Sk, b, j, h) + d] += P[j] * G[ix(Sq, b, i, h) + d];
                        dP[j] += G[ix(Sq, b, i, h) + d] * V[ix(Sk, b, j, h) + d];
                    }
                    pdp += P[j] * dP[j];
                }
                for (int j = 0; j < Sk; ++j) {
                    const double ds = P[j] * (dP[j] - pdp);
                    for (int d = 0; d < D; ++d) {
                        dQ[ix(Sq, b, i, h) + d] += ds * K[ix(Sk, b, j, h) + d] * scale;
                        dK[ix(Sk, b, j, h) + d] += ds * Q[ix(Sq, b, i, h) + d] * scale;
                    }
                }
            }

    const Run<T> r = run_kernels<T, D>(c, q, k, v, g, bias, emu::Schedule::Lockstep);
    bool ok = true;
    for (emu::Schedule other : {emu::Schedule::WarpsUp, emu::Schedule::WarpsDown}) {
        const Run<T> rr = run_kernels<T, D>(c, q, k, v, g, bias, other);
        if (!(r.o == rr.o && r.dq == rr.dq && r.dk == rr.dk && r.dv == rr.dv &&
              std::memcmp(r.lse.data(), rr.lse.data(), r.lse.size() * sizeof(float)) == 0)) {
            std::printf("  %s: results differ between schedules (a race)\n", c.name);
            ok = false;
        }
    }

    auto dec = [](const std::vector<uint16_t>& x) {
        std::vector<double> y(x.size());
        for (size_t i = 0; i < x.size(); ++i) y[i] = T::to_f32(x[i]);
        return y;
    };
    std::vector<double> lse_got(r.lse.size()), lse_fin(r.lse.size()), L_fin(L.size());
    bool inf_ok = true;
    for (size_t i = 0; i < L.size(); ++i) {
        lse_got[i] = r.lse[i];
        if (std::isinf(L[i]) != std::isinf((double)r.lse[i]) || std::isnan(r.lse[i])) inf_ok = false;
        lse_fin[i] = std::isfinite(lse_got[i]) ? lse_got[i] : 0.0;
        L_fin[i] = std::isfinite(L[i]) ? L[i] : 0.0;
    }
    if (!inf_ok) std::printf("  %s: +inf log-sum-exp rows differ from the reference\n", c.name);
    ok = ok && inf_ok;
    const double e[5] = {rel_l2(dec(r.o), O), rel_l2(lse_fin, L_fin), rel_l2(dec(r.dq), dQ), rel_l2(dec(r.dk), dK), rel_l2(dec(r.dv), dV)};
    // bf16 rounds to 2^-9 (relative), f16 to 2^-12; products of rounded P and dS add about as
    // much again. lse is computed in f32.
    const double bound = c.f16 ? 2e-3 : 1e-2;
    const double bounds[5] = {bound, 1e-5, bound, bound, bound};
    const char* names[5] = {"o", "lse", "dq", "dk", "dv"};
    std::printf("%-28s", c.name);
    for (int i = 0; i < 5; ++i) {
        std::printf(" %s %.1e", names[i], e[i]);
        if (!(e[i] <= bounds[i])) {
            std::printf(" (> %.0e)", bounds[i]);
            ok = false;
        }
    }
    std::printf("\n");
    if (c.mask == 1) {  // the last batch has every key dropped
        for (int i = 0; i < Sq; ++i)
            for (int h = 0; h < H; ++h)
                for (int d = 0; d < D; ++d) {
                    const size_t at = ix(Sq, B - 1, i, h) + d;
                    if (r.o[at] != 0 || r.dq[at] != 0) {
                        std::printf("  %s: fully masked row not zero\n", c.name);
                        return false;
                    }
                }
    }
    return ok;
}

}  // namespace

int main(int argc, char** argv) {
    // name, f16, D, B, H, Sq, Sk, mask, q layout, k/v/dO layout
    const Case cases[] = {
        {"self bf16 d64", false, 64, 1, 2, 130, 130, 0, 0, 0},
        {"self bf16 d128 [B,H,S,D] q", false, 128, 1, 1, 80, 80, 0, 1, 0},
        {"cross+mask bf16 d128", false, 128, 2, 1, 70, 100, 1, 0, 2},
        {"joint qwen-mask f16 d64", true, 64, 2, 2, 72, 72, 2, 2, 2},
        {"cross f16 d128", true, 128, 1, 1, 40, 1, 0, 0, 1},
    };
    const std::string only = argc > 1 ? argv[1] : "";
    bool ok = true;
    uint64_t seed = 1;
    for (const Case& c : cases) {
        if (!only.empty() && only != c.name) continue;
        bool r;
        if (c.f16) r = c.D == 64 ? check<F16, 64>(c, seed) : check<F16, 128>(c, seed);
        else r = c.D == 64 ? check<Bf16, 64>(c, seed) : check<Bf16, 128>(c, seed);
        ok = ok && r;
        ++seed;
    }
    std::printf("%s\n", ok ? "all kernel checks passed" : "KERNEL CHECKS FAILED");
    return ok ? 0 : 1;
}
