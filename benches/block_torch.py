#!/usr/bin/env python3
"""PyTorch eager twin of `phasekit bench block`: one full-width Wan2.2 / Qwen-Image block,
forward + backward of every parameter, random weights, same shapes and the same FLOP count
(matmuls only: linear 2·rows·in·out, attention 4·Sq·Sk·dim, backward = 2× forward).

    python3 benches/block_torch.py --model wan --tokens 4096 --text-tokens 512 --dtype bf16 --device cuda

Prints one JSON line: seconds (best of --repeats after a warm-up), gflops, and the peak memory
(`peak_bytes`: torch.cuda.max_memory_allocated over the timed runs on CUDA, the process's peak
RSS on the CPU; `peak_kind` says which). Attention uses
torch's scaled_dot_product_attention, as diffusers does.

With --breakdown it prints instead the stages of `phasekit bench block --breakdown` (the same
names, inputs and shapes; each stage's forward, then the backward of the sum of its outputs,
medians over the repeats after a warm-up, synchronised) and the whole block, as one JSON line
that `phasekit bench block --breakdown --against FILE` reads.
"""
import argparse, json, resource, time

import torch
import torch.nn.functional as F


def lin(i, o, dev, dt):
    w = torch.nn.Linear(i, o, device=dev, dtype=dt)
    torch.nn.init.normal_(w.weight, std=i ** -0.5)
    return w


def rms(x, w, eps=1e-6):
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps) * w.float()).to(x.dtype)


def rope(x, cos, sin):
    # x [B, S, H, D], interleaved pairs
    xf = x.float().unflatten(-1, (-1, 2))
    a, b = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.stack([a * c - b * s, a * s + b * c], -1).flatten(-2).to(x.dtype)


def attention(q, k, v):
    # [B, S, H, D] -> sdpa on [B, H, S, D]
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return o.transpose(1, 2).flatten(2)


class WanBlock(torch.nn.Module):
    def __init__(self, d, heads, ffn, dev, dt):
        super().__init__()
        self.h = heads
        self.q1, self.k1, self.v1, self.o1 = (lin(d, d, dev, dt) for _ in range(4))
        self.q2, self.k2, self.v2, self.o2 = (lin(d, d, dev, dt) for _ in range(4))
        self.nq1, self.nk1, self.nq2, self.nk2 = (torch.nn.Parameter(torch.ones(d, device=dev, dtype=dt)) for _ in range(4))
        self.norm2 = torch.nn.LayerNorm(d, eps=1e-6, device=dev, dtype=dt)
        self.f1, self.f2 = lin(d, ffn, dev, dt), lin(ffn, d, dev, dt)
        self.sst = torch.nn.Parameter(torch.randn(1, 6, d, device=dev, dtype=dt) * 0.02)

    def forward(self, x, enc, tproj, cos, sin):
        b, s, d = x.shape
        h = self.h
        sh, sc, g, csh, csc, cg = (self.sst + tproj).float().chunk(6, 1)
        n = F.layer_norm(x.float(), (d,), eps=1e-6) * (1 + sc) + sh
        n = n.to(x.dtype)
        q = rms(self.q1(n), self.nq1).unflatten(-1, (h, -1))
        k = rms(self.k1(n), self.nk1).unflatten(-1, (h, -1))
        v = self.v1(n).unflatten(-1, (h, -1))
        a = self.o1(attention(rope(q, cos, sin), rope(k, cos, sin), v))
        x = (x.float() + a.float() * g).to(x.dtype)
        n = self.norm2(x.float()).to(x.dtype) if self.norm2.weight.dtype == torch.float32 else self.norm2(x)
        q = rms(self.q2(n), self.nq2).unflatten(-1, (h, -1))
        k = rms(self.k2(enc), self.nk2).unflatten(-1, (h, -1))
        v = self.v2(enc).unflatten(-1, (h, -1))
        x = x + self.o2(attention(q, k, v))
        n = (F.layer_norm(x.float(), (d,), eps=1e-6) * (1 + csc) + csh).to(x.dtype)
        f = self.f2(F.gelu(self.f1(n), approximate="tanh"))
        return (x.float() + f.float() * cg).to(x.dtype)


class QwenBlock(torch.nn.Module):
    def __init__(self, d, heads, dev, dt):
        super().__init__()
        self.h = heads
        hd = d // heads
        self.img_mod, self.txt_mod = lin(d, 6 * d, dev, dt), lin(d, 6 * d, dev, dt)
        self.q, self.k, self.v, self.o = (lin(d, d, dev, dt) for _ in range(4))
        self.aq, self.ak, self.av, self.ao = (lin(d, d, dev, dt) for _ in range(4))
        self.nq, self.nk, self.naq, self.nak = (torch.nn.Parameter(torch.ones(hd, device=dev, dtype=dt)) for _ in range(4))
        self.im1, self.im2 = lin(d, 4 * d, dev, dt), lin(4 * d, d, dev, dt)
        self.tm1, self.tm2 = lin(d, 4 * d, dev, dt), lin(4 * d, d, dev, dt)

    def forward(self, img, txt, temb, icos, isin, tcos, tsin):
        d = img.shape[-1]
        h = self.h
        im = self.img_mod(F.silu(temb)).float().chunk(6, -1)
        tm = self.txt_mod(F.silu(temb)).float().chunk(6, -1)

        def mod(x, sh, sc):
            return (F.layer_norm(x.float(), (d,), eps=1e-6) * (1 + sc[:, None]) + sh[:, None]).to(x.dtype)

        ni, nt = mod(img, im[0], im[1]), mod(txt, tm[0], tm[1])
        q = rope(rms(self.q(ni).unflatten(-1, (h, -1)), self.nq), icos, isin)
        k = rope(rms(self.k(ni).unflatten(-1, (h, -1)), self.nk), icos, isin)
        v = self.v(ni).unflatten(-1, (h, -1))
        aq = rope(rms(self.aq(nt).unflatten(-1, (h, -1)), self.naq), tcos, tsin)
        ak = rope(rms(self.ak(nt).unflatten(-1, (h, -1)), self.nak), tcos, tsin)
        av = self.av(nt).unflatten(-1, (h, -1))
        o = attention(torch.cat([aq, q], 1), torch.cat([ak, k], 1), torch.cat([av, v], 1))
        l = txt.shape[1]
        oi, ot = self.o(o[:, l:]), self.ao(o[:, :l])
        img = (img.float() + oi.float() * im[2][:, None]).to(img.dtype)
        txt = (txt.float() + ot.float() * tm[2][:, None]).to(txt.dtype)
        fi = self.im2(F.gelu(self.im1(mod(img, im[3], im[4])), approximate="tanh"))
        ft = self.tm2(F.gelu(self.tm1(mod(txt, tm[3], tm[4])), approximate="tanh"))
        img = (img.float() + fi.float() * im[5][:, None]).to(img.dtype)
        txt = (txt.float() + ft.float() * tm[5][:, None]).to(txt.dtype)
        return img, txt


def lf(rows, i, o):
    return 2.0 * rows * i * o


def af(sq, sk, d):
    return 4.0 * sq * sk * d


def median(v):
    v = sorted(v)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2


def timed(f, repeats, sync):
    """Median forward and backward ms of f() (a list of outputs, summed for the backward)."""
    def once():
        sync()
        s = time.perf_counter()
        outs = f()
        if not outs:  # a stage PyTorch does not have (no copy there)
            return 0.0, 0.0
        sync()
        fwd = (time.perf_counter() - s) * 1e3
        loss = sum(o.float().sum() for o in outs)
        sync()
        s = time.perf_counter()
        loss.backward()
        sync()
        return fwd, (time.perf_counter() - s) * 1e3
    once()
    runs = [once() for _ in range(max(repeats, 3))]
    return median([r[0] for r in runs]), median([r[1] for r in runs])


def breakdown(a, blk, args, dev, dt, sync):
    t, l = a.tokens, a.text_tokens
    r = lambda *shape: torch.randn(*shape, device=dev, dtype=dt).requires_grad_(True)
    stages = []

    def stage(name, f):
        fw, bw = timed(f, a.repeats, sync)
        stages.append({"name": name, "forward_ms": fw, "backward_ms": bw})

    eps = 1e-6
    if a.model == "wan":
        h = a.heads or 40
        d, f = 128 * h, 13824 * h // 40
        hd = d // h
        x, enc, hh, ff = r(1, t, d), r(1, l, d), r(1, t, d), r(1, t, f)
        m = torch.randn(1, 6, d, device=dev, requires_grad=True)
        q, k, v = r(1, t, h, hd), r(1, t, h, hd), r(1, t, h, hd)
        kc, vc = r(1, l, h, hd), r(1, l, h, hd)
        cos, sin = args[3], args[4]

        def mod(x, sh, sc):
            return (F.layer_norm(x.float(), (d,), eps=eps) * (1 + sc) + sh).to(x.dtype)

        stage("norm + modulation", lambda: [mod(x, m[:, 0:1], m[:, 1:2]), mod(x, m[:, 3:4], m[:, 4:5]), blk.norm2(x)])
        stage("qkv projections", lambda: [blk.q1(hh), blk.k1(hh), blk.v1(hh), blk.q2(hh), blk.k2(enc), blk.v2(enc)])
        stage("q/k norms", lambda: [rms(hh, blk.nq1), rms(hh, blk.nk1), rms(hh, blk.nq2), rms(enc, blk.nk2)])
        stage("rope", lambda: [rope(q, cos, sin), rope(k, cos, sin)])
        stage("attention", lambda: [attention(q, k, v), attention(q, kc, vc)])
        stage("output projections", lambda: [blk.o1(hh), blk.o2(hh)])
        stage("ffn linears", lambda: [blk.f1(hh), blk.f2(ff)])
        stage("gelu", lambda: [F.gelu(ff, approximate="tanh")])
        stage("gated residuals", lambda: [(x.float() + hh.float() * m[:, 2:3]).to(dt), (x.float() + hh.float() * m[:, 5:6]).to(dt), x + hh])
        stage("layout copies", lambda: [])
    else:
        h, hd = a.heads or 24, 128
        d = h * hd
        n = t + l
        iv, tv, temb = r(1, t, d), r(1, l, d), r(1, d)
        im, tm = torch.randn(1, 6 * d, device=dev, requires_grad=True), torch.randn(1, 6 * d, device=dev, requires_grad=True)
        ih, th = r(1, t, h, hd), r(1, l, h, hd)
        q, k, v = r(1, n, h, hd), r(1, n, h, hd), r(1, n, h, hd)
        imlp, tmlp = r(1, t, 4 * d), r(1, l, 4 * d)
        icos, isin, tcos, tsin = args[3:7]
        part = lambda m, i: m[:, i * d:(i + 1) * d]

        def mod(x, sh, sc):
            return (F.layer_norm(x.float(), (d,), eps=eps) * (1 + sc[:, None]) + sh[:, None]).to(x.dtype)

        stage("modulation linears", lambda: [blk.img_mod(F.silu(temb)), blk.txt_mod(F.silu(temb))])
        stage("norm + modulation", lambda: [mod(iv, part(im, 0), part(im, 1)), mod(tv, part(tm, 0), part(tm, 1)),
                                            mod(iv, part(im, 3), part(im, 4)), mod(tv, part(tm, 3), part(tm, 4))])
        stage("qkv projections", lambda: [blk.q(iv), blk.k(iv), blk.v(iv), blk.aq(tv), blk.ak(tv), blk.av(tv)])
        stage("q/k norms", lambda: [rms(ih, blk.nq), rms(ih, blk.nk), rms(th, blk.naq), rms(th, blk.nak)])
        stage("rope", lambda: [rope(ih, icos, isin), rope(ih, icos, isin), rope(th, tcos, tsin), rope(th, tcos, tsin)])
        stage("layout copies", lambda: [torch.cat([th, ih], 1) for _ in range(3)])
        stage("attention", lambda: [attention(q, k, v)])
        stage("output projections", lambda: [blk.o(iv), blk.ao(tv)])
        stage("mlp linears", lambda: [blk.im1(iv), blk.im2(imlp), blk.tm1(tv), blk.tm2(tmlp)])
        stage("gelu", lambda: [F.gelu(imlp, approximate="tanh"), F.gelu(tmlp, approximate="tanh")])
        stage("gated residuals", lambda: [(iv.float() + iv.float() * part(im, 2)[:, None]).to(dt), (tv.float() + tv.float() * part(tm, 2)[:, None]).to(dt),
                                          (iv.float() + iv.float() * part(im, 5)[:, None]).to(dt), (tv.float() + tv.float() * part(tm, 5)[:, None]).to(dt)])
    first = args[0].detach().requires_grad_(True)
    whole = (first,) + tuple(args[1:])
    out = (lambda: [blk(*whole)]) if a.model == "wan" else (lambda: list(blk(*whole)))
    fw, bw = timed(out, a.repeats, sync)
    return {"model": a.model, "device": a.device, "dtype": a.dtype, "tokens": t, "text_tokens": l, "stages": stages,
            "block": {"name": "block", "forward_ms": fw, "backward_ms": bw}, "torch": torch.__version__}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=["wan", "qwen"], required=True)
    p.add_argument("--tokens", type=int, default=256)
    p.add_argument("--text-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--dtype", choices=["f32", "bf16"], default="bf16")
    p.add_argument("--device", default="cuda")
    p.add_argument("--heads", type=int, default=None, help="attention heads of 128 (default: the model's; the FFN keeps its ratio)")
    p.add_argument("--breakdown", action="store_true", help="time each stage of the block (as phasekit bench block --breakdown)")
    a = p.parse_args()
    dev, dt = torch.device(a.device), {"f32": torch.float32, "bf16": torch.bfloat16}[a.dtype]
    torch.backends.cuda.matmul.allow_tf32 = False
    t, l = a.tokens, a.text_tokens
    torch.manual_seed(0)
    if a.model == "wan":
        heads = a.heads or 40
        d, ffn = 128 * heads, 13824 * heads // 40
        blk = WanBlock(d, heads, ffn, dev, dt)
        x = torch.randn(1, t, d, device=dev, dtype=dt)
        enc = torch.randn(1, l, d, device=dev, dtype=dt)
        tproj = torch.randn(1, 6, d, device=dev, dtype=dt) * 0.1
        ang = torch.rand(t, 64, device=dev)
        args = (x, enc, tproj, ang.cos(), ang.sin())
        fwd = 6 * lf(t, d, d) + 2 * lf(l, d, d) + af(t, t, d) + af(t, l, d) + 2 * lf(t, d, ffn)

        def step():
            blk(*args).float().sum().backward()
    else:
        heads = a.heads or 24
        d = 128 * heads
        blk = QwenBlock(d, heads, dev, dt)
        img = torch.randn(1, t, d, device=dev, dtype=dt)
        txt = torch.randn(1, l, d, device=dev, dtype=dt)
        temb = torch.randn(1, d, device=dev, dtype=dt)
        ai, at = torch.rand(t, 64, device=dev), torch.rand(l, 64, device=dev)
        args = (img, txt, temb, ai.cos(), ai.sin(), at.cos(), at.sin())
        n = t + l
        fwd = 2 * lf(1, d, 6 * d) + 4 * lf(n, d, d) + af(n, n, d) + 2 * lf(n, d, 4 * d)

        def step():
            i, x = blk(*args)
            (i.float().sum() + x.float().sum()).backward()

    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    if a.breakdown:
        print(json.dumps(breakdown(a, blk, args, dev, dt, sync)))
        return
    step()
    sync()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    best = float("inf")
    for _ in range(a.repeats):
        blk.zero_grad(set_to_none=True)
        s = time.perf_counter()
        step()
        sync()
        best = min(best, time.perf_counter() - s)
    total = 3 * fwd
    if dev.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(dev), "cuda_max_memory_allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak_rss"
    print(json.dumps({"model": a.model, "tokens": t, "text_tokens": l, "dtype": a.dtype, "device": a.device,
                      "torch": torch.__version__, "seconds": best, "gflop": total / 1e9, "gflops": total / best / 1e9,
                      "peak_bytes": peak, "peak_kind": kind}))


if __name__ == "__main__":
    main()
