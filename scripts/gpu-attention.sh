#!/usr/bin/env bash
# The attention op on a GPU machine, in one call that builds nothing there (< 8 minutes on one
# H200 with the defaults). Build the binary elsewhere and pass it:
#     scripts/check-cuda.sh build --release --features cuda
#     PHASEKIT=target-cuda/release/phasekit scripts/gpu-attention.sh OUT_DIR
# 1. check: every path this GPU has (the fused kernels for bf16/f16, the chunked portable path)
#    against the cpu path on CPU copies of the same random inputs: output and gradients of q, k, v;
#    self, cross and joint attention with a mask (one batch fully masked); bf16, f16, f32.
# 2. timings: self-attention forward and forward + backward, the op as the models call it
#    (fused) against PyTorch's SDPA backends (cudnn, flash, efficient, math) at TOKENS × HEADS,
#    then the chunked portable path at the smallest size.
# Environment: PHASEKIT (default target-cuda/release/phasekit), DEVICE (cuda; DEVICE=cpu with
# TOKENS=256,512 HEADS=2 tries the script on a CPU machine), TOKENS (4096,16384,32760),
# HEADS (40,24: Wan2.2, Qwen-Image), HEAD_DIM (128), DTYPE (bf16), REPEATS (5),
# CHECK_TOKENS (1000).
# Writes OUT_DIR/env.txt, check.txt, bench.txt, portable.txt and prints them; exits 1 if the
# check failed or a step did not finish.
set -uo pipefail
out="${1:?usage: PHASEKIT=/path/to/phasekit scripts/gpu-attention.sh OUT_DIR}"
bin="${PHASEKIT:-target-cuda/release/phasekit}"
dev="${DEVICE:-cuda}"
tokens="${TOKENS:-4096,16384,32760}"
heads="${HEADS:-40,24}"
hd="${HEAD_DIM:-128}"
dtype="${DTYPE:-bf16}"
repeats="${REPEATS:-5}"
check_tokens="${CHECK_TOKENS:-1000}"
mkdir -p "$out"
status=0

{
    date -u +"%Y-%m-%dT%H:%M:%SZ"
    "$bin" --version
    if [ "$dev" != cpu ]; then nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; fi
    python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())'
} > "$out/env.txt" 2>&1

step() {  # step NAME SECONDS ARGS...: run the binary with a time limit, output to OUT_DIR/NAME.txt
    local name="$1" limit="$2"
    shift 2
    echo "== $name: phasekit $*" >&2
    timeout "$limit" "$bin" "$@" > "$out/$name.txt" 2>&1
    local rc=$?
    if [ $rc -ne 0 ]; then
        echo "(exit $rc$([ $rc -eq 124 ] && echo ", stopped after ${limit} s"))" >> "$out/$name.txt"
        status=1
    fi
}

step check 150 bench attention --check --device "$dev" --check-tokens "$check_tokens"
step bench 240 bench attention --device "$dev" --dtype "$dtype" --tokens "$tokens" --heads "$heads" \
    --head-dim "$hd" --paths auto --repeats "$repeats"
step portable 60 bench attention --device "$dev" --dtype "$dtype" --tokens "${tokens%%,*}" --heads "${heads%%,*}" \
    --head-dim "$hd" --paths chunked --repeats 2 --no-python

for f in env check bench portable; do
    echo "---- $f"
    cat "$out/$f.txt"
done
exit $status
