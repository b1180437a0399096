#!/usr/bin/env python3
"""Reference side of tests/quant_reference.rs: run gguf-py (and, optionally, ggml's C
reference quantisers) on files the Rust test wrote, and write the results back.

usage: quant_oracle.py DIR [--ggml-lib PATH]

DIR/jobs.json is a list of jobs:
  {"op": "quantize" | "dequantize" | "ggml_quantize" | "ggml_dequantize",
   "type": "Q4_0", "cols": 512, "input": "in.bin", "output": "out.bin"}
quantize:   f32 rows of `cols` values  -> gguf.quants.quantize(rows, type) bytes
dequantize: blocks, `cols` values/row  -> gguf.quants.dequantize(rows, type) as f32
ggml_*:     the same through quantize_row_<t>_ref / dequantize_row_<t> of a shared library
            built from ggml's src/ggml-quants.c (see docs/gguf.md, "Checking the K-quants").
Writes DIR/status.json: {output: "ok" | "unsupported: <why>"}.
"""
import ctypes
import json
import sys
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize, quantize


def main() -> None:
    d = Path(sys.argv[1])
    lib = None
    if len(sys.argv) > 3 and sys.argv[2] == "--ggml-lib":
        lib = ctypes.CDLL(sys.argv[3])
    status = {}
    for job in json.loads((d / "jobs.json").read_text()):
        t = GGMLQuantizationType[job["type"]]
        block, size = GGML_QUANT_SIZES[t]
        cols = job["cols"]
        src, dst = d / job["input"], d / job["output"]
        op = job["op"]
        try:
            if op == "quantize":
                x = np.fromfile(src, dtype=np.float32).reshape(-1, cols)
                with np.errstate(all="ignore"):
                    out = quantize(x, t)
                np.ascontiguousarray(out).view(np.uint8).tofile(dst)
            elif op == "dequantize":
                raw = np.fromfile(src, dtype=np.uint8).reshape(-1, cols // block * size)
                with np.errstate(all="ignore"):
                    out = dequantize(raw, t)
                np.ascontiguousarray(out, dtype=np.float32).tofile(dst)
            elif op in ("ggml_quantize", "ggml_dequantize"):
                if lib is None:
                    raise NotImplementedError("no --ggml-lib given")
                name = t.name[0].lower() + t.name[1:]  # q4_0, q4_K
                if op == "ggml_quantize":
                    x = np.ascontiguousarray(np.fromfile(src, dtype=np.float32))
                    out = np.zeros(x.size // block * size, dtype=np.uint8)
                    fn = getattr(lib, f"quantize_row_{name}_ref")
                    fn(x.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(x.size))
                else:
                    raw = np.ascontiguousarray(np.fromfile(src, dtype=np.uint8))
                    out = np.zeros(raw.size // size * block, dtype=np.float32)
                    fn = getattr(lib, f"dequantize_row_{name}")
                    fn(raw.ctypes.data_as(ctypes.c_void_p), out.ctypes.data_as(ctypes.c_void_p), ctypes.c_int64(out.size))
                out.tofile(dst)
            else:
                raise ValueError(f"unknown op {op}")
            status[job["output"]] = "ok"
        except (NotImplementedError, AttributeError) as e:
            status[job["output"]] = f"unsupported: {e}"
    (d / "status.json").write_text(json.dumps(status))


if __name__ == "__main__":
    main()
