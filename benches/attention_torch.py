#!/usr/bin/env python3
"""PyTorch twin of `phasekit bench attention`: self-attention of random inputs through each of
torch's scaled_dot_product_attention backends, forward and forward + backward (the gradients of
q, k and v), with the same sizes, dtype and FLOP count as phasekit's table.

    python3 benches/attention_torch.py --device cuda --dtype bf16 --tokens 4096,16384 --heads 40,24

FLOPs: forward 4·B·H·S²·D (QKᵀ and PV), forward + backward 3.5× that (the backward's five
products; FlashAttention's convention). Times are medians of --repeats runs after one warm-up
(CUDA events on the GPU, wall clock on the CPU). A backend that refuses a size or runs out of
memory gets an "error" instead of times. Prints one JSON line (phasekit reads it).
"""
import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

BACKENDS = {
    "cudnn": SDPBackend.CUDNN_ATTENTION,
    "flash": SDPBackend.FLASH_ATTENTION,
    "efficient": SDPBackend.EFFICIENT_ATTENTION,
    "math": SDPBackend.MATH,
}
DTYPES = {"bf16": torch.bfloat16, "f16": torch.float16, "f32": torch.float32}


def timed(fn, dev, repeats):
    fn()  # warm-up (kernel selection, workspace allocation)
    times = []
    for _ in range(repeats):
        if dev.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def one(backend, tokens, heads, d, dt, dev, repeats):
    torch.manual_seed(0)
    # torch's layout is [B, H, S, D].
    q, k, v = (torch.randn(1, heads, tokens, d, device=dev, dtype=dt, requires_grad=True) for _ in range(3))
    g = torch.randn(1, heads, tokens, d, device=dev, dtype=dt)

    def fwd():
        with torch.no_grad():
            F.scaled_dot_product_attention(q, k, v)

    def fwd_bwd():
        o = F.scaled_dot_product_attention(q, k, v)
        torch.autograd.grad(o, (q, k, v), g)

    with sdpa_kernel([BACKENDS[backend]]):
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        fwd_ms = timed(fwd, dev, repeats)
        fwd_bwd_ms = timed(fwd_bwd, dev, repeats)
        peak = torch.cuda.max_memory_allocated() if dev.type == "cuda" else None
    flops = 4.0 * heads * tokens * tokens * d
    return {
        "impl": f"torch {backend}",
        "tokens": tokens,
        "heads": heads,
        "fwd_ms": fwd_ms,
        "fwd_bwd_ms": fwd_bwd_ms,
        "fwd_tflops": flops / fwd_ms / 1e9,
        "fwd_bwd_tflops": 3.5 * flops / fwd_bwd_ms / 1e9,
        "peak_bytes": peak,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bf16", choices=sorted(DTYPES))
    ap.add_argument("--tokens", default="4096")
    ap.add_argument("--heads", default="40")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--backends", default="cudnn,flash,efficient,math")
    ap.add_argument("--math-max-tokens", type=int, default=8192, help="skip the math backend (S² memory) above this")
    a = ap.parse_args()
    dev = torch.device(a.device)
    if dev.type == "cpu":
        torch.set_num_threads(torch.get_num_threads())
    rows = []
    for heads in [int(h) for h in a.heads.split(",")]:
        for tokens in [int(t) for t in a.tokens.split(",")]:
            for backend in a.backends.split(","):
                if backend == "math" and tokens > a.math_max_tokens:
                    rows.append({"impl": "torch math", "tokens": tokens, "heads": heads, "error": f"skipped above {a.math_max_tokens} tokens (S² memory)"})
                    continue
                try:
                    rows.append(one(backend, tokens, heads, a.head_dim, DTYPES[a.dtype], dev, a.repeats))
                except Exception as e:  # a backend that does not take this size, dtype or device
                    msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
                    rows.append({"impl": f"torch {backend}", "tokens": tokens, "heads": heads, "error": msg})
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
    info = {"torch": torch.__version__, "device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu", "threads": torch.get_num_threads()}
    print(json.dumps({**info, "rows": rows}))


if __name__ == "__main__":
    main()
