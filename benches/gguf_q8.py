# The baseline of `phasekit bench io`'s "Q8_0 GGUF export" line: the PyPI `gguf` package
# quantizes the same bf16 checkpoint to Q8_0 and writes a GGUF file (no fsync, like
# `convert --no-sync`). Prints the seconds it took. The bench runs it as
#   python3 gguf_q8.py INPUT.safetensors OUTPUT.gguf
# (it is embedded in the binary with include_str!, src/bench/io.rs).
import sys, time, numpy as np, gguf
import json, struct
src, dst = sys.argv[1], sys.argv[2]
t = time.time()
w = gguf.GGUFWriter(dst, "wan")
# numpy has no bfloat16: read the raw bf16 bits from a memmap and widen them to f32.
with open(src, "rb") as fh:
    n = struct.unpack("<Q", fh.read(8))[0]
    hdr = json.loads(fh.read(n))
    base = 8 + n
    mm = np.memmap(src, dtype=np.uint8, mode="r")
    for k, v in hdr.items():
        if k == "__metadata__":
            continue
        b, e = v["data_offsets"]
        bits = mm[base + b: base + e].view(np.uint16).astype(np.uint32) << 16
        a = bits.view(np.float32).reshape(v["shape"])
        if a.ndim == 2 and a.shape[-1] % 32 == 0:
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(k, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(k, a)
w.write_header_to_file()
w.write_kv_data_to_file()
w.write_tensors_to_file()
w.close()
print(time.time() - t)
