#!/usr/bin/env bash
# Run every command that writes a checkpoint (convert, assemble, export, pack/unpack, lora
# merge/extract/convert, forward, bench replica) on the same inputs and print the sha256 of every
# file it wrote, one `<sha256>  <path>` line each, sorted.
#
# For refactors that must not change a single output byte: run it with the binary before and the
# binary after the change and diff the two lists.
#
#   scripts/output-digests.sh BIN_BEFORE /tmp/d1 > before.txt
#   scripts/output-digests.sh BIN_AFTER  /tmp/d2 > after.txt
#   diff before.txt after.txt && echo same bytes
#
# Inputs: the tiny fixtures under tests/fixtures/, and one larger random-valued bf16 checkpoint
# (Wan2.2 original names, about 190 MB) made here with numpy (seed 0; the first line of the output
# is its digest). The large input is what drives
# the layouts for big outputs (source order, page-congruent header padding, `padding.<k>`
# tensors). WORK is removed first and holds about 2 GB while the script runs (sparse replicas
# cost no disk).
set -euo pipefail
BIN=$(realpath "$1")
WORK=$2
ROOT=$(cd "$(dirname "$0")/.." && pwd)
FX=$ROOT/tests/fixtures
rm -rf "$WORK"
mkdir -p "$WORK/in" "$WORK/out"
IN=$WORK/in
O=$WORK/out
pk() { "$BIN" --quiet "$@" >/dev/null; }

# The large input: a Wan2.2-shaped model (original names, dim 1024, 6 layers) of random bf16
# values, written here byte by byte (about 190 MB).
python3 - "$IN/large.safetensors" <<'PY'
import json, struct, sys
import numpy as np
dim, ffn, layers, text = 1024, 2816, 6, 4096
t = [("patch_embedding.weight", [dim, 16, 1, 2, 2]), ("patch_embedding.bias", [dim])]
def lin(n, o, i):
    t.extend([(n + ".weight", [o, i]), (n + ".bias", [o])])
lin("text_embedding.0", dim, text); lin("text_embedding.2", dim, dim)
lin("time_embedding.0", dim, 256); lin("time_embedding.2", dim, dim); lin("time_projection.1", 6 * dim, dim)
for b in range(layers):
    p = f"blocks.{b}."
    t.append((p + "modulation", [1, 6, dim]))
    for a in ("self_attn", "cross_attn"):
        for m in "qkvo":
            lin(p + a + "." + m, dim, dim)
        t.extend([(p + a + ".norm_q.weight", [dim]), (p + a + ".norm_k.weight", [dim])])
    t.extend([(p + "norm3.weight", [dim]), (p + "norm3.bias", [dim])])
    lin(p + "ffn.0", ffn, dim); lin(p + "ffn.2", dim, ffn)
lin("head.head", 64, dim); t.append(("head.modulation", [1, 2, dim]))
rng = np.random.default_rng(0)
header, off = {"__metadata__": {"format": "pt"}}, 0
for n, s in t:
    size = int(np.prod(s)) * 2
    header[n] = {"dtype": "BF16", "shape": s, "data_offsets": [off, off + size]}
    off += size
h = json.dumps(header, separators=(",", ":")).encode()
h += b" " * (-len(h) % 8)
with open(sys.argv[1], "wb") as f:
    f.write(struct.pack("<Q", len(h)) + h)
    for n, s in t:
        v = (rng.standard_normal(int(np.prod(s)), dtype=np.float32) * 0.02).view(np.uint32)
        f.write((v >> 16).astype("<u2").tobytes())
PY
# A multi-model folder (Wan2.2 repo shape) and a fine-tuned copy of the tiny model (f16 round trip).
mkdir -p "$IN/repo"
cp -r "$FX/wan22_t2v_tiny/original" "$IN/repo/high_noise_model"
cp -r "$FX/wan22_t2v_tiny/original" "$IN/repo/low_noise_model"
T2V=$FX/wan22_t2v_tiny/diffusers
pk convert "$T2V" "$IN/t2v-f16.safetensors" --dtype f16
pk convert "$IN/t2v-f16.safetensors" "$IN/tuned.safetensors" --dtype f32
pk convert "$IN/tuned.safetensors" "$IN/tuned-orig.safetensors" --layout original
pk convert "$IN/large.safetensors" "$IN/large-f16.safetensors" --dtype f16 --no-sync
ORIG=$FX/wan22_t2v_tiny/original

# convert
pk convert "$FX/wan22_t2v_tiny/original" "$O/c-diffusers" --layout diffusers --sha256
pk convert "$T2V" "$O/c-comfy.safetensors" --layout comfy --comfy-prefix
pk convert "$T2V" "$O/c-bf16.safetensors" --dtype bf16 --drop-metadata
pk convert "$T2V" "$O/c-fp8.safetensors" --dtype fp8-e4m3
pk convert "$T2V" "$O/c-fp8ws.safetensors" --dtype fp8-e5m2 --fp8-scale weight-scale
pk convert "$O/c-fp8.safetensors" "$O/c-fp8-back.safetensors" --dtype f32
pk convert "$T2V" "$O/c-sharded" --shard-size 40KB --sha256
pk convert "$T2V" "$O/c-sharded.safetensors" --shard-size 40KB
pk convert "$T2V" "$O/c-q8.gguf" --quant Q8_0 --sha256
pk convert "$O/c-q8.gguf" "$O/c-from-gguf.safetensors"
pk convert "$FX/qwen_image_tiny/diffusers" "$O/c-qwen-comfy.safetensors" --layout comfy
pk convert "$FX/qwen_image_tiny/diffusers" "$O/c-qwen-q4k.gguf" --quant Q4_K
pk convert "$IN/repo" "$O/c-repo" --layout diffusers
pk convert "$IN/large.safetensors" "$O/c-large-layout.safetensors" --layout diffusers
pk convert "$IN/large.safetensors" "$O/c-large-keep.safetensors" --no-sync
pk convert "$IN/large.safetensors" "$O/c-large-sha.safetensors" --layout comfy --sha256
pk convert "$IN/large.safetensors" "$O/c-large-f16.safetensors" --dtype f16
pk convert "$IN/large.safetensors" "$O/c-large-shards" --layout diffusers --shard-size 60MB

# lora
pk lora extract "$T2V" "$IN/tuned.safetensors" --rank 4 -o "$O/l-kohya.safetensors" --prefix
pk lora extract "$T2V" "$IN/tuned.safetensors" --rank 3 -o "$O/l-peft.safetensors" --style peft --dtype bf16
pk lora convert "$O/l-kohya.safetensors" -o "$O/l-k2p.safetensors" --style peft
pk lora convert "$O/l-peft.safetensors" -o "$O/l-p2k.safetensors" --style kohya
pk lora merge "$T2V" "$O/l-kohya.safetensors" -o "$O/l-merged.safetensors"
pk lora merge "$T2V" "$O/l-kohya.safetensors" "$O/l-peft.safetensors" --strength 0.5 --strength -1 --dtype bf16 -o "$O/l-merged-dir"

# assemble, export, pack
pk assemble --expert "$T2V" --sigma-range 0.5:1 --expert "$IN/tuned.safetensors" --sigma-range 0:0.5 --steps 4 --shift 5 -o "$O/a-full.safetensors"
pk assemble --expert "$O/l-kohya.safetensors" --sigma-range 0.875:1 --expert "$ORIG" --sigma-range 0:0.875 --base "$ORIG" --steps 4 --shift 3 -o "$O/a-lora.safetensors"
pk assemble --expert "$O/l-kohya.safetensors" --sigma-range 0.875:1 --expert "$O/l-p2k.safetensors" --sigma-range 0:0.875 --base "$ORIG" --steps 4 --shift 3 --merge-lora --dtype bf16 -o "$O/a-merged.safetensors"
pk assemble --expert "$O/l-kohya.safetensors" --sigma-range 0.5:1 --expert "$O/l-kohya.safetensors" --sigma-range 0:0.5 --expert-base "$ORIG" --expert-base "$IN/tuned-orig.safetensors" --steps 4 --shift 3 -o "$O/a-twobases.safetensors"
pk assemble --expert "$T2V" --sigma-range 0.5:1 --expert "$IN/tuned.safetensors" --sigma-range 0:0.5 --steps 4 --shift 5 --shard-size 100KB -o "$O/a-sharded.safetensors"
pk assemble --expert "$IN/large.safetensors" --sigma-range 0.5:1 --expert "$IN/large-f16.safetensors" --sigma-range 0:0.5 --steps 4 --shift 5 -o "$O/a-large.safetensors"
pk assemble --expert "$IN/large.safetensors" --sigma-range 0.5:1 --expert "$IN/large-f16.safetensors" --sigma-range 0:0.5 --steps 4 --shift 5 --no-sync --no-sidecar --shard-size 150MB -o "$O/a-large-sharded.safetensors"
pk assemble --expert "$IN/large.safetensors" --sigma-range 0.5:1 --expert "$IN/large-f16.safetensors" --sigma-range 0:0.5 --steps 4 --shift 5 --dtype bf16 -o "$O/a-large-bf16.safetensors"
pk export "$O/a-full.safetensors" --to comfy -o "$O/e-comfy" --comfy-prefix
pk export "$O/a-full.safetensors" --to diffusers -o "$O/e-diffusers" --dtype bf16
pk export "$O/a-twobases.safetensors" --to lora -o "$O/e-lora"
pk export "$O/a-lora.safetensors" --to comfy -o "$O/e-lora-comfy"
pk export "$O/a-full.safetensors" --to gguf --quant Q8_0 -o "$O/e-gguf"
pk export "$O/a-large.safetensors" --to comfy -o "$O/e-large-comfy" --no-sidecar
pk pack "$O/a-full.safetensors" -o "$O/p-full.pk"
pk unpack "$O/p-full.pk" -o "$O/p-full.safetensors"
pk pack "$O/a-large.safetensors" -o "$O/p-large.pk" --level 1
pk unpack "$O/p-large.pk" -o "$O/p-large.safetensors"

# forward, bench replica
pk forward --model "$T2V" --inputs "$FX/wan22_t2v_tiny/forward.safetensors" --out "$O/f-wan.safetensors"
pk bench replica wan-ti2v5b "$O/r-ti2v.safetensors" --dtype f16

sha256sum "$IN/large.safetensors" | sed "s|$WORK/||"
(cd "$WORK" && find out -type f | LC_ALL=C sort | xargs sha256sum)
rm -rf "$WORK"
