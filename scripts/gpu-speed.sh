#!/usr/bin/env bash
# Block speed on a GPU machine against PyTorch eager, in one call that builds nothing there
# (budget < 8 minutes on one H200 with the defaults). Build the binary elsewhere and pass it:
#     scripts/check-cuda.sh build --release --features cuda
#     PHASEKIT=target-cuda/release/phasekit scripts/gpu-speed.sh OUT_DIR
# 1. checks first: the fused element-wise ops (norm + modulation, q/k RMSNorm, affine LayerNorm,
#    gated residual, GELU-tanh, RoPE) as the models run them on this device against the candle
#    composition on CPU copies (values and gradients, f32/bf16/f16), and the attention op's paths;
# 2. the element-wise ops timed, fused against composed, at Wan2.2's and Qwen-Image's widths;
# 3. one block forward + backward (bf16) at Wan2.2 4096 and WAN_TOKENS, Qwen-Image 4096 and
#    QWEN_TOKENS: phasekit as the models run (fused element-wise ops), phasekit with the composed
#    element-wise ops (PHASEKIT_ELEMENTWISE=composed, at the first size), and PyTorch eager
#    (benches/block_torch.py, with its peak memory); a table of times and ratios at the end.
# 4. the stage-by-stage breakdown (`bench block --breakdown`) of each model's first size, beside
#    `benches/block_torch.py --breakdown` (forward and backward per stage, and the ratio).
# `bench train` (one Phased DMD update at a real resolution, per part) is in scripts/gpu-scale.sh.
# Environment: PHASEKIT (default target-cuda/release/phasekit), DEVICE (cuda; DEVICE=cpu with
# SIZES="wan:64 qwen:64" TEXT=16 EW_TOKENS=64 REPEATS=1 tries the script on a CPU machine),
# SIZES (default "wan:4096 wan:32760 qwen:4096 qwen:16384"), TEXT (text tokens, 512),
# EW_TOKENS (element-wise timing tokens, 32760), REPEATS (3), CHECK_TOKENS (1000), BUDGET (450 s).
# Writes OUT_DIR/*.txt and *.json and prints them; exits 1 if a check failed or a step did not
# finish.
set -uo pipefail
out="${1:?usage: PHASEKIT=/path/to/phasekit scripts/gpu-speed.sh OUT_DIR}"
bin="${PHASEKIT:-target-cuda/release/phasekit}"
dev="${DEVICE:-cuda}"
sizes="${SIZES:-wan:4096 wan:32760 qwen:4096 qwen:16384}"
text="${TEXT:-512}"
ew_tokens="${EW_TOKENS:-32760}"
repeats="${REPEATS:-3}"
check_tokens="${CHECK_TOKENS:-1000}"
here="$(cd "$(dirname "$0")/.." && pwd)"
mkdir -p "$out"
status=0

{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    "$bin" --version
    git -C "$here" rev-parse HEAD 2>/dev/null
    if [ "$dev" != cpu ]; then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; fi
    python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())'
} > "$out/env.txt" 2>&1

# The whole script stays within BUDGET seconds (default 450: one device call of at most 8
# minutes with room for the start): each step gets at most what is left, and a step with under
# 10 s left is skipped and said so.
budget="${BUDGET:-450}"
t_start=$(date +%s)
step() {  # step NAME SECONDS CMD...: run CMD with a time limit, output to OUT_DIR/NAME
    local name="$1" limit="$2"
    shift 2
    local left=$(( budget - ($(date +%s) - t_start) ))
    if [ "$left" -lt 10 ]; then
        echo "(skipped: the script's ${budget} s budget is spent)" > "$out/$name.err"
        status=1
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name: $*" >&2
    timeout "$limit" "$@" > "$out/$name" 2> "$out/$name.err"
    local rc=$?
    if [ $rc -ne 0 ]; then
        echo "(exit $rc$([ $rc -eq 124 ] && echo ", stopped after ${limit} s"))" >> "$out/$name.err"
        status=1
    fi
}

# 1. Checks.
step check-elementwise.txt 60 "$bin" bench elementwise --check --device "$dev"
step check-attention.txt 90 "$bin" bench attention --check --device "$dev" --check-tokens "$check_tokens"

# 2. Element-wise ops, fused vs composed.
step elementwise-wan.txt 45 "$bin" bench elementwise --device "$dev" --dtype bf16 --tokens "$ew_tokens" --dim 5120 --repeats "$repeats"
step elementwise-qwen.txt 45 "$bin" bench elementwise --device "$dev" --dtype bf16 --tokens "$ew_tokens" --dim 3072 --repeats "$repeats"

# 3. Blocks.
seen=""
for s in $sizes; do
    m="${s%%:*}" t="${s##*:}"
    common=(--model "$m" --tokens "$t" --text-tokens "$text" --dtype bf16 --device "$dev" --repeats "$repeats")
    step "block-$m-$t.json" 90 "$bin" --json bench block "${common[@]}"
    case " $seen " in
        *" $m "*) ;;
        *)  # the first size of each model also with the composed element-wise ops
            seen="$seen $m"
            step "block-$m-$t-composed.json" 90 env PHASEKIT_ELEMENTWISE=composed "$bin" --json bench block "${common[@]}" ;;
    esac
    step "torch-$m-$t.json" 60 python3 "$here/benches/block_torch.py" "${common[@]}"
done

# 4. Stage by stage, each model's first size.
done_bd=""
for s in $sizes; do
    m="${s%%:*}" t="${s##*:}"
    case " $done_bd " in *" $m "*) continue ;; esac
    done_bd="$done_bd $m"
    common=(--model "$m" --tokens "$t" --text-tokens "$text" --dtype bf16 --device "$dev" --repeats "$repeats")
    step "breakdown-torch-$m-$t.json" 60 python3 "$here/benches/block_torch.py" "${common[@]}" --breakdown
    step "breakdown-$m-$t.txt" 90 "$bin" bench block "${common[@]}" --breakdown --against "$out/breakdown-torch-$m-$t.json"
done

for f in env.txt check-elementwise.txt check-attention.txt elementwise-wan.txt elementwise-qwen.txt $(cd "$out" && ls breakdown-*.txt 2>/dev/null); do
    echo "---- $f"
    cat "$out/$f" "$out/$f.err" 2>/dev/null
done
python3 - "$out" $sizes <<'EOF'
import json, os, sys
out, sizes = sys.argv[1], sys.argv[2:]
def load(name):
    p = os.path.join(out, name)
    try:
        with open(p) as f:
            return json.loads(f.read().strip().splitlines()[-1])
    except Exception:
        return None
print("---- block forward + backward, bf16 (seconds; ratio = PyTorch time / phasekit time, >= 0.8 is the target)")
print(f"{'block':<6} {'tokens':>7} {'phasekit':>10} {'composed':>10} {'pytorch':>10} {'ratio':>7} {'torch peak GiB':>15}")
for s in sizes:
    m, t = s.split(":")
    pk, co, th = load(f"block-{m}-{t}.json"), load(f"block-{m}-{t}-composed.json"), load(f"torch-{m}-{t}.json")
    f = lambda r: f"{r['seconds']:.4f}" if r and "seconds" in r else "-"
    ratio = f"{th['seconds'] / pk['seconds']:.2f}x" if pk and th and "seconds" in pk and "seconds" in th else "-"
    peak = f"{th['peak_bytes'] / 2**30:.2f}" if th and "peak_bytes" in th else "-"
    print(f"{m:<6} {t:>7} {f(pk):>10} {f(co):>10} {f(th):>10} {ratio:>7} {peak:>15}")
EOF
exit $status
