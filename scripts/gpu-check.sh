#!/usr/bin/env bash
# The GPU checks, run on a CUDA machine from the repository root with a CUDA build of phasekit:
#     scripts/check-cuda.sh build --release --features cuda
#     PHASEKIT=target-cuda/release/phasekit scripts/gpu-check.sh [OUT_DIR]
# 1. model parity on the GPU: forward on the tiny Wan2.2 (both layouts), Wan2.2 TI2V (per-token timesteps), I2V-A14B-shaped
#    (36 channels in) and Qwen-Image fixtures; tiny training runs (T2V, I2V, Qwen-Image)
#    in f32 and bf16, relative L2 against diffusers' output;
# 2. one full-width block forward+backward in bf16 (Wan2.2 5120/40 heads, Qwen-Image 3072/24
#    heads) with `phasekit bench block` and with the PyTorch eager twin benches/block_torch.py
#    on the same GPU, and the ratio.
# Writes gpu-check.json into OUT_DIR (default .) and prints a summary.
set -uo pipefail
B="${PHASEKIT:-target-cuda/release/phasekit}"
DEV="${DEVICE:-cuda}"   # DEVICE=cpu BENCH=0 tries the script without a GPU
BENCH="${BENCH:-1}"
OUT="${1:-.}"
F=tests/fixtures
mkdir -p "$OUT"
log="$OUT/gpu-check.jsonl"
: > "$log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"
PARITY="${PARITY:-1}"; TRAIN="${TRAIN:-1}"
for dt in f32 bf16; do
    [ "$PARITY" = 1 ] || break
    for m in wan22_t2v_tiny/diffusers wan22_t2v_tiny/original wan22_ti2v_tiny/diffusers wan22_i2v_tiny/diffusers qwen_image_tiny/diffusers; do
        fx="${m%%/*}"
        "$B" --json forward --device "$DEV" --dtype "$dt" --model "$F/$m" --inputs "$F/$fx/forward.safetensors" --out "$OUT/fwd.safetensors" \
            | python3 -c "import json,sys; r=json.load(sys.stdin)['report']; r['fixture']='$m'; r['check']='parity'; print(json.dumps(r))" >> "$log" \
            || echo "{\"check\":\"parity\",\"fixture\":\"$m\",\"dtype\":\"$dt\",\"failed\":true}" >> "$log"
    done
done
rm -f "$OUT/fwd.safetensors"
# 2. a tiny Wan2.2 Phased DMD run (2 phases, LoRA generator, routed fakes) on the GPU, then
#    assembled and verified like any run.
for rec in wan2.2-tiny-2phase wan2.2-i2v-tiny-2phase qwen-image-tiny; do
    [ "$TRAIN" = 1 ] || break
    rm -rf "/tmp/run-$rec" "/tmp/moe-$rec.safetensors"
    "$B" --json train --device "$DEV" --recipe "recipes/$rec.toml" --out "/tmp/run-$rec" \
        | python3 -c "import json,sys; r=json.load(sys.stdin); r['check']='train'; r['recipe']='$rec'; print(json.dumps(r))" >> "$log" \
        || echo "{\"check\":\"train\",\"recipe\":\"$rec\",\"failed\":true}" >> "$log"
done
if [ "$TRAIN" = 1 ]; then
    rm -f /tmp/moe-wan.safetensors
    "$B" assemble --run /tmp/run-wan2.2-tiny-2phase -o /tmp/moe-wan.safetensors --quiet && "$B" verify /tmp/moe-wan.safetensors --quiet \
        && echo '{"check":"assemble+verify","ok":true}' >> "$log" || echo '{"check":"assemble+verify","failed":true}' >> "$log"
fi
for spec in "wan 4096 512" "qwen 4096 512" "wan 1024 256" "qwen 1024 256"; do
    [ "$BENCH" = 1 ] || break
    set -- $spec
    "$B" --json bench block --device cuda --dtype bf16 --model "$1" --tokens "$2" --text-tokens "$3" --repeats 5 \
        | python3 -c "import json,sys; r=json.load(sys.stdin); r['check']='bench-phasekit'; print(json.dumps(r))" >> "$log" \
        || echo "{\"check\":\"bench-phasekit\",\"model\":\"$1\",\"failed\":true}" >> "$log"
    python3 benches/block_torch.py --device cuda --dtype bf16 --model "$1" --tokens "$2" --text-tokens "$3" --repeats 5 \
        | python3 -c "import json,sys; r=json.loads(sys.stdin.read().strip().splitlines()[-1]); r['check']='bench-torch'; print(json.dumps(r))" >> "$log" \
        || echo "{\"check\":\"bench-torch\",\"model\":\"$1\",\"failed\":true}" >> "$log"
done
python3 - "$log" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
for r in rows:
    if r["check"] == "parity":
        print(f"parity {r.get('fixture')} {r.get('dtype')}: " + ("FAILED" if r.get("failed") else f"rel L2 {r['rel_l2']:.3e} on {r['device']}"))
    if r["check"] in ("train", "assemble+verify"):
        print(r["check"], r.get("recipe", ""), "FAILED" if r.get("failed") else json.dumps(r.get("summary", r))[:300])
pk = {(r["model"], r["tokens"]): r for r in rows if r["check"] == "bench-phasekit" and "seconds" in r}
pt = {(r["model"], r["tokens"]): r for r in rows if r["check"] == "bench-torch" and "seconds" in r}
for k in sorted(set(pk) | set(pt)):
    a, b = pk.get(k), pt.get(k)
    line = f"block {k[0]} {k[1]} tokens bf16: phasekit " + (f"{a['seconds']*1e3:.1f} ms {a['gflops']:.0f} GFLOP/s" if a else "FAILED")
    line += "; torch " + (f"{b['seconds']*1e3:.1f} ms {b['gflops']:.0f} GFLOP/s" if b else "FAILED")
    if a and b:
        line += f"; ratio phasekit/torch speed {b['seconds']/a['seconds']:.2f}x"
    print(line)
PY
