#!/usr/bin/env python3
"""PyTorch (CPU, eager) twin of the toy update that `phasekit bench toy-step` times.

    python3 benches/toy_torch.py --updates 200 --warmup 10

The same computation as phasekit's toy trainer on the bench settings (`bench train-toy` method
`phased4`, src/train/{denoiser,dmd,mixture,optim}.rs):

- denoiser: MLP `v = MLP([x, sin(1000σ·f), cos(1000σ·f), E[c]])`, f_i = exp(−ln(10⁴)·i/F),
  `depth` hidden layers of `width` with SiLU, class embedding of `classes + 1` rows (the last
  is the null class); weights N(0, 1/fan_in), zero biases, embedding N(0, 1);
- real score: the exact velocity of the 2-D class-conditional Gaussian mixture (8 modes on a ring
  of radius 2, std 0.2, mode k of class k mod 2), closed form in float64 as phasekit computes it;
- Phased DMD, one phase per step (4 steps, 4 phases, shift 1, nested re-noise, no SGTS):
  the generator and the fake score start from the teacher at each phase, earlier phases'
  generators are frozen experts that roll the noise out to the phase start;
- per generator update: `ttur` fake updates (rollout without gradient, re-noise
  t ~ U(s, 1], subinterval target ((1−s)²t + (1−t)s²)/((1−s)²σ_{t|s})·ε − x_s/(1−s) weighted by
  clamp(1/σ²_{t|s}, 0, 10)·σ²_{t|s}), then one generator update (one Euler jump with gradient to
  the boundary, re-noise, exact and fake velocities, DMD2's normaliser mean|x̂₀ − x̂₀_real|
  clamped at 1e-4, loss ½‖x_s − sg(x_s − g)‖²);
- AdamW β = (0, 0.999), ε = 1e-8, no weight decay, global gradient-norm clip 1.

Runs on one thread (phasekit's toy runs candle's kernels on one thread). The teacher is a fresh
random MLP (phasekit's is pretrained; the values do not change the work done). Prints one JSON
line: ms per generator update (with its fake updates), median over the updates after
`--warmup`, and the mean.
"""
import argparse, copy, json, math, time

import torch
import torch.nn.functional as F


class Mlp(torch.nn.Module):
    def __init__(self, dim, classes, width, depth, time_freqs, class_dim, gen):
        super().__init__()
        self.embed = torch.nn.Parameter(torch.randn(classes + 1, class_dim, generator=gen))
        fan_in = dim + 2 * time_freqs + class_dim
        self.layers = torch.nn.ModuleList()
        for i in range(depth + 1):
            out = dim if i == depth else width
            lin = torch.nn.Linear(fan_in, out)
            with torch.no_grad():
                lin.weight.copy_(torch.randn(out, fan_in, generator=gen) / math.sqrt(fan_in))
                lin.bias.zero_()
            self.layers.append(lin)
            fan_in = out
        f = [math.exp(-math.log(10000.0) * i / time_freqs) for i in range(time_freqs)]
        self.register_buffer("freqs", torch.tensor(f, dtype=torch.float32)[None, :])

    def forward(self, x, sigma, c):
        arg = (sigma[:, None] * 1000.0) * self.freqs
        h = torch.cat([x, arg.sin(), arg.cos(), self.embed[c]], -1)
        for i, lin in enumerate(self.layers):
            h = lin(h)
            if i + 1 < len(self.layers):
                h = F.silu(h)
        return h


class ExactMixture:
    """v(x, σ, c) = E[ε − x₀ | x_σ = x, c] of Σ_k π_k N(μ_k, s_k² I), in float64."""

    def __init__(self, dim, modes, radius, std, classes):
        a = torch.arange(modes, dtype=torch.float64) * (2 * math.pi / modes)
        self.means = torch.zeros(modes, dim, dtype=torch.float64)
        self.means[:, 0], self.means[:, 1] = radius * a.cos(), radius * a.sin()
        self.s2 = torch.full((modes,), std * std, dtype=torch.float64)
        self.logw = torch.full((modes,), -math.log(modes), dtype=torch.float64)
        self.mode_class = torch.arange(modes) % classes
        self.classes, self.dim = classes, dim
        self.class_weights = torch.stack([self.logw.exp()[self.mode_class == k].sum() for k in range(classes)])

    @torch.no_grad()
    def velocity(self, x, sigma, c):
        x, s = x.double(), sigma.double()[:, None]  # [n, d], [n, 1]
        a = 1.0 - s
        tau2 = a * a * self.s2 + s * s  # [n, K]
        dev = x[:, None, :] - a[:, :, None] * self.means  # [n, K, d]
        logr = self.logw - 0.5 * self.dim * tau2.log() - 0.5 * dev.pow(2).sum(-1) / tau2
        other = (c[:, None] < self.classes) & (self.mode_class[None, :] != c[:, None])
        r = torch.softmax(logr.masked_fill(other, float("-inf")), -1)  # [n, K]
        e_eps = (s / tau2)[:, :, None] * dev
        e_x0 = self.means + (a * self.s2 / tau2)[:, :, None] * dev
        return (r[:, :, None] * (e_eps - e_x0)).sum(1).float()


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--updates", type=int, default=200, help="generator updates in all (split evenly over the phases)")
    p.add_argument("--warmup", type=int, default=10, help="first updates left out of the median")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--ttur", type=int, default=5)
    p.add_argument("--steps", type=int, default=4, help="steps, one phase each")
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--time-freqs", type=int, default=8)
    p.add_argument("--class-dim", type=int, default=8)
    p.add_argument("--gen-lr", type=float, default=2e-4)
    p.add_argument("--fake-lr", type=float, default=4e-4)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--clamp-max", type=float, default=10.0)
    p.add_argument("--norm-min", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    try:
        torch.set_num_interop_threads(a.threads)
    except RuntimeError:
        pass
    torch.manual_seed(a.seed)
    gen_rng = torch.Generator().manual_seed(a.seed)
    dim, classes, n = 2, 2, a.batch
    mix = ExactMixture(dim, 8, 2.0, 0.2, classes)
    teacher = Mlp(dim, classes, a.width, a.depth, a.time_freqs, a.class_dim, gen_rng)
    sig = [1.0 - i / a.steps for i in range(a.steps + 1)]  # shift 1: linspace(1, 0, N+1)
    per_phase = max(1, a.updates // a.steps)
    adamw = dict(betas=(0.0, 0.999), eps=1e-8, weight_decay=0.0)

    def classes_batch():
        return torch.multinomial(mix.class_weights, n, replacement=True)

    def generate(p, model, experts, c):
        # Frozen experts from noise to t_p, then one Euler jump with `model` to s = t_{p+1}.
        x = torch.randn(n, dim)
        with torch.no_grad():
            for i in range(p):
                x = x + (sig[i + 1] - sig[i]) * experts[i](x, torch.full((n,), sig[i]), c)
        tj, s = sig[p], sig[p + 1]
        v = model(x, torch.full((n,), tj), c)
        return x + (s - tj) * v, x - tj * v

    def renoise(s, xs):
        t = s + (1.0 - s) * (1.0 - torch.rand(n, dtype=torch.float64))  # U(s, 1]
        al = (1.0 - t) / (1.0 - s)
        sg = (t * t - al * al * s * s).clamp_min(0.0).sqrt()
        eps = torch.randn(n, dim)
        xt = xs * al.float()[:, None] + eps * sg.float()[:, None]
        return xt, eps, t, sg

    times = []
    experts = []
    for p in range(a.steps):
        s = sig[p + 1]
        gen, fake = copy.deepcopy(teacher), copy.deepcopy(teacher)
        gen_opt = torch.optim.AdamW(gen.parameters(), lr=a.gen_lr, **adamw)
        fake_opt = torch.optim.AdamW(fake.parameters(), lr=a.fake_lr, **adamw)
        for _ in range(per_phase):
            t0 = time.perf_counter()
            for _ in range(a.ttur):
                c = classes_batch()
                with torch.no_grad():
                    xs, _ = generate(p, gen, experts, c)
                xt, eps, t, sg = renoise(s, xs)
                coef = ((1 - s) ** 2 * t + (1 - t) * s * s) / ((1 - s) ** 2 * sg.clamp_min(1e-12))
                w = (1.0 / (sg * sg)).clamp(max=a.clamp_max) * sg * sg
                target = eps * coef.float()[:, None] - xs / (1.0 - s)
                pred = fake(xt, t.float(), c)
                loss = ((pred - target).pow(2).mean(1) * w.float()).mean()
                fake_opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(fake.parameters(), a.grad_clip)
                fake_opt.step()
            c = classes_batch()
            xs, x0 = generate(p, gen, experts, c)
            xs_sg = xs.detach()
            xt, _, t, _ = renoise(s, xs_sg)
            tf = t.float()
            with torch.no_grad():
                vt = mix.velocity(xt, tf, c)
                vf = fake(xt, tf, c)
                x0t = xt - vt * tf[:, None]
                x0f = xt - vf * tf[:, None]
                norm = (x0.detach() - x0t).abs().mean(1, keepdim=True).clamp_min(a.norm_min)
                target = xs_sg - (x0f - x0t) / norm
            loss = 0.5 * (xs - target).pow(2).sum(1).mean()
            gen_opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(gen.parameters(), a.grad_clip)
            gen_opt.step()
            if not math.isfinite(loss.item()):
                raise SystemExit(f"phase {p}: generator loss is not finite")
            times.append(time.perf_counter() - t0)
        g = copy.deepcopy(gen)
        g.requires_grad_(False)
        experts.append(g)
    timed = times[a.warmup:] if len(times) > a.warmup else times
    ms = sorted(1e3 * x for x in timed)
    median = ms[len(ms) // 2] if len(ms) % 2 else 0.5 * (ms[len(ms) // 2 - 1] + ms[len(ms) // 2])
    print(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(), "batch": n, "ttur": a.ttur,
                      "steps": a.steps, "updates": len(times), "timed": len(timed),
                      "ms_per_update_median": median, "ms_per_update_mean": sum(ms) / len(ms)}))


if __name__ == "__main__":
    main()
