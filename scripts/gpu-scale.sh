#!/usr/bin/env bash
# Real-scale memory checks on one GPU (issue "Train the real teachers within one GPU"), in one
# call of under 8 minutes, building nothing:
#     scripts/check-cuda.sh build --release --features nccl    # here, then strip + carry the binary
#     PHASEKIT=path/to/phasekit scripts/gpu-scale.sh OUT_DIR    # on the GPU machine
# 1. the fused attention against the portable op (values and gradients; `bench attention --check`);
# 2. one Phased DMD update (TTUR fake updates + one generator update) of Wan2.2 T2V-A14B (a
#    random-valued full-size replica, hard-linked under a second name so that both experts are
#    loaded), LoRA generator + LoRA fake, batch 1, at 480p x 81
#    and 720p x 81, and of Qwen-Image at 1328 x 1328: for each, `train --plan` (predicted peak
#    per part), then the run itself (seconds per update, the CUDA pool's peak per phase) or the
#    plan's refusal (exit 9, the run is not started), and the measured peak against the plan;
#    a resolution the plan says fits is run too, so that plan and measurement meet at least once;
#    and `bench train` (seconds per part of an update) at the A14B size that fits;
# 3. `bench block` at 16 384, 32 760 and 75 600 tokens beside benches/block_torch.py (time, peak);
# and prints a table. Results go to OUT_DIR/gpu-scale.jsonl. The replicas need disk: 28.6 GB
# (A14B, bf16) and 40.9 GB (Qwen-Image), written one after the other into OUT_DIR/replicas and
# deleted; DEVICE=cpu TOKENS="256 512" tries the script without a GPU on tiny sizes.
set -uo pipefail
B="${PHASEKIT:-target-cuda/release/phasekit}"
DEV="${DEVICE:-cuda}"
OUT="${1:-gpu-scale-out}"
mkdir -p "$OUT/replicas"
log="$OUT/gpu-scale.jsonl"
: > "$log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | tee "$OUT/gpu.txt"
note() { echo "{\"check\":\"note\",\"text\":\"$1\"}" >> "$log"; echo "$1" >&2; }
stamp() { date +%s.%N; }
T0=$(stamp)
left() { python3 -c "import sys; print(int(480 - (float(sys.argv[1]) - float(sys.argv[2]))))" "$(stamp)" "$T0"; }

# 1. fused attention vs the portable op.
timeout 90 "$B" --json bench attention --device "$DEV" --check > "$OUT/attention-check.json" 2> "$OUT/attention-check.err" \
    && python3 -c "import json,sys; r=json.load(open(sys.argv[1])); print(json.dumps({'check':'attention','ok':all(c.get('pass') for c in r),'cases':r}))" "$OUT/attention-check.json" >> "$log" \
    || echo '{"check":"attention","failed":true}' >> "$log"

# 2. training at scale.
recipe() { # name model experts-lines resolution
    cat > "$OUT/$1.toml" <<EOF
name = "$1"
model = "$2"
seed = 1
[teacher]
guidance = 4.0
[schedule]
steps = 4
shift = 5.0
phases = [2, 4]
sgts = true
[train]
updates_per_phase = 1
batch = 1
ttur = 1
checkpoint_every = 0
log_every = 1
[transformer]
$3
embeddings = "random:1"
lora_rank = 64
lora_alpha = 8.0
fake = "lora"
fake_lora_rank = 64
fake_lora_alpha = 64.0
dtype = "bf16"
resolution_space = "pixel"
resolutions = [$4]
EOF
    echo "$OUT/$1.toml"
}
run_one() { # recipe-file label
    local r="$1" label="$2"
    "$B" --json train --device "$DEV" --recipe "$r" --out "$OUT/run-$label" --plan > "$OUT/plan-$label.json" 2>/dev/null
    local budget; budget=$(left)
    if [ "$budget" -lt 30 ]; then note "skipped $label: out of time"; return; fi
    rm -rf "$OUT/run-$label"
    local t0; t0=$(stamp)
    timeout "$budget" "$B" --json train --device "$DEV" --recipe "$r" --out "$OUT/run-$label" --eval-samples 0 > "$OUT/train-$label.json" 2> "$OUT/train-$label.err"
    local rc=$?
    python3 - "$label" "$rc" "$t0" "$(stamp)" "$OUT/plan-$label.json" "$OUT/train-$label.json" "$OUT/train-$label.err" >> "$log" <<'PY'
import json, sys
label, rc, t0, t1, planf, trainf, errf = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4]), *sys.argv[5:]
row = {"check": "train", "label": label, "exit": rc, "seconds": t1 - t0}
try:
    plan = json.load(open(planf))["plan"]
    row["plan_fits"] = plan["fits"]
    row["plan_peak_bytes"] = [e["device_bytes"] for e in plan["entries"]]
    row["plan_parts"] = {p["name"]: p["bytes"] for p in plan["entries"][plan["peak"]]["parts"]}
except Exception as e:
    row["plan_error"] = str(e)
try:
    s = json.load(open(trainf))
    if s.get("ok"):
        mem = s["summary"]["memory"]
        # the CUDA pool's peak on a GPU, the process's peak RSS on the CPU
        row["measured_peak_bytes"] = [m.get("device_peak_bytes") or m.get("peak_rss_bytes") for m in mem]
        row["device_used_bytes"] = [m.get("device_used_bytes") for m in mem]
        row["updates"] = s["summary"]["global_step"]
    else:
        row["error"] = s.get("error")
except Exception:
    row["error"] = open(errf).read().strip()[-400:]
print(json.dumps(row))
PY
    rm -rf "$OUT/run-$label"
}
replica() { # model file
    "$B" bench replica "$1" "$2" --dtype bf16 --random --seed 1 2>/dev/null \
        || { note "bench replica --random unavailable: sparse zeros instead (faster than real data)"; "$B" bench replica "$1" "$2" --dtype bf16; }
}
if [ "$DEV" = cpu ]; then
    # Without a GPU: the tiny fixtures at small sizes, to try the script itself.
    W="$PWD/tests/fixtures/wan22_t2v_tiny/diffusers"
    r=$(recipe wan-tiny wan2.2-t2v-a14b "experts = [\"$W\", \"$W\"]
expert_boundary = 0.875
phase1_t_range = [0.875, 1.0]" "[5, 32, 32]"); run_one "$r" wan-tiny
else
    A="$OUT/replicas/wan-t2v-a14b.safetensors"
    replica wan-t2v-a14b "$A"
    # The low-noise expert: the same bytes under a second name (a hard link: no disk), which the
    # trainer loads as a second model, so the device holds both experts' weights.
    ln -f "$A" "$OUT/replicas/wan-t2v-a14b-low.safetensors"
    EX="experts = [\"$A\", \"$OUT/replicas/wan-t2v-a14b-low.safetensors\"]
expert_boundary = 0.875
phase1_t_range = [0.875, 1.0]"
    run_one "$(recipe a14b-480p wan2.2-t2v-a14b "$EX" "[81, 480, 832]")" a14b-480p
    run_one "$(recipe a14b-720p wan2.2-t2v-a14b "$EX" "[81, 720, 1280]")" a14b-720p
    run_one "$(recipe a14b-480p-17f wan2.2-t2v-a14b "$EX" "[17, 480, 832]")" a14b-480p-17f
    # Where an update's time goes, at the size that fits (issue "PyTorch's speed on the GPU").
    if [ "$(left)" -gt 60 ]; then
        timeout "$(left)" "$B" --json bench train --device "$DEV" --recipe "$OUT/a14b-480p-17f.toml" \
            | python3 -c "import json,sys; r=json.load(sys.stdin); r['check']='bench-train'; print(json.dumps(r))" >> "$log" \
            || echo '{"check":"bench-train","failed":true}' >> "$log"
    fi
    rm -f "$A" "$OUT/replicas/wan-t2v-a14b-low.safetensors"
    Q="$OUT/replicas/qwen-image.safetensors"
    replica qwen-image "$Q"
    run_one "$(recipe qwen-1328 qwen-image "checkpoint = \"$Q\"" "[1, 1328, 1328]")" qwen-1328
    run_one "$(recipe qwen-512 qwen-image "checkpoint = \"$Q\"" "[1, 512, 512]")" qwen-512
    rm -f "$Q"
fi

# 3. one block's peak at long sequences, beside PyTorch eager.
TOKENS="${TOKENS:-16384 32760 75600}"
for m in wan qwen; do
    for t in $TOKENS; do
        budget=$(left); [ "$budget" -lt 20 ] && { note "skipped bench block $m $t: out of time"; continue; }
        timeout "$budget" "$B" --json bench block --device "$DEV" --dtype bf16 --model "$m" --tokens "$t" --text-tokens 512 --repeats 2 \
            | python3 -c "import json,sys; r=json.load(sys.stdin); r['check']='block-phasekit'; print(json.dumps(r))" >> "$log" \
            || echo "{\"check\":\"block-phasekit\",\"model\":\"$m\",\"tokens\":$t,\"failed\":true}" >> "$log"
        timeout "$(left)" python3 benches/block_torch.py --device "$DEV" --dtype bf16 --model "$m" --tokens "$t" --text-tokens 512 --repeats 2 \
            | python3 -c "import json,sys; r=json.loads(sys.stdin.read().strip().splitlines()[-1]); r['check']='block-torch'; print(json.dumps(r))" >> "$log" \
            || echo "{\"check\":\"block-torch\",\"model\":\"$m\",\"tokens\":$t,\"failed\":true}" >> "$log"
    done
done

python3 - "$log" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
gib = lambda b: "-" if b is None else f"{b / 2**30:.1f} GiB"
print("\n| check | case | result | plan peak | measured peak | plan error | time |")
print("|---|---|---|---|---|---|---|")
for r in rows:
    c = r["check"]
    if c == "train":
        plan = max(r.get("plan_peak_bytes") or [0]) or None
        meas = [m for m in (r.get("measured_peak_bytes") or []) if m]
        m = max(meas) if meas else None
        err = f"{100 * (plan - m) / m:+.1f} %" if plan and m else "-"
        res = "refused by the plan (exit 9)" if r["exit"] == 9 and not meas else ("ok" if r["exit"] == 0 else f"exit {r['exit']}: {str(r.get('error'))[:60]}")
        per = f"{r['seconds'] / max(r.get('updates') or 1, 1):.1f} s/update" if r["exit"] == 0 else "-"
        print(f"| train | {r['label']} | {res} | {gib(plan)} | {gib(m)} | {err} | {per} |")
    elif c.startswith("block"):
        peak = r.get("peak_device_bytes") or r.get("peak_bytes") or r.get("max_memory_allocated")
        t = r.get("seconds") or r.get("ms", 0) / 1000
        print(f"| {c} | {r.get('model')} {r.get('tokens')} tokens | {'failed' if r.get('failed') else 'ok'} | - | {gib(peak)} | - | {t if t else '-'} |")
    elif c == "bench-train":
        parts = ", ".join(f"{p['part']} {p['per_update']:.2f}" for p in r.get("parts", []))
        print(f"| bench train | A14B 17 x 480 x 832, s per update: {parts} | {'failed' if r.get('failed') else 'ok'} | - | - | - | {r.get('seconds_per_update', '-')} |")
    elif c == "attention":
        print(f"| attention | fused vs portable | {'failed' if r.get('failed') else ('ok' if r.get('ok') else 'MISMATCH')} | - | - | - | - |")
    else:
        print(f"| note | {r.get('text')} | | | | | |")
PY
