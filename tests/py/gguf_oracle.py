#!/usr/bin/env python3
"""Reference side of tests/gguf_gguf_py.rs: gguf-py's GGUFWriter and GGUFReader.

usage:
  gguf_oracle.py write OUT.gguf   write a sample file with GGUFWriter, then describe it
  gguf_oracle.py read IN.gguf     describe a file as GGUFReader sees it

The description (JSON on stdout):
  {"version", "alignment", "data_offset",
   "fields": {key: {"types": [type names], "value": ReaderField.contents()}},
   "tensors": [{"name", "type", "shape" (torch order), "offset" (absolute), "n_bytes", "sha256"}]}
Nested arrays come out flattened (gguf-py's contents() gives their leaves) and an empty
array's types list is just ["ARRAY"], as gguf-py reports them.
"""
import hashlib
import json
import sys

import numpy as np
import gguf
from gguf import GGMLQuantizationType as Q, GGUFValueType as V


def describe(path: str) -> dict:
    r = gguf.GGUFReader(path)
    fields = {}
    for name, f in r.fields.items():
        if name.startswith("GGUF."):
            continue
        fields[name] = {"types": [t.name for t in f.types], "value": f.contents()}
    tensors = []
    for t in r.tensors:
        raw = bytes(r.data[t.data_offset:t.data_offset + t.n_bytes])
        tensors.append({
            "name": t.name,
            "type": t.tensor_type.name,
            "shape": [int(d) for d in reversed(t.shape.tolist())],
            "offset": int(t.data_offset),
            "n_bytes": int(t.n_bytes),
            "sha256": hashlib.sha256(raw).hexdigest(),
        })
    return {
        "version": int(r.fields["GGUF.version"].parts[0][0]),
        "alignment": int(r.alignment),
        "data_offset": int(r.data_offset),
        "fields": fields,
        "tensors": tensors,
    }


def write_sample(path: str) -> None:
    w = gguf.GGUFWriter(path, "wan")
    w.add_custom_alignment(64)
    w.add_uint8("t.u8", 200)
    w.add_int8("t.i8", -5)
    w.add_uint16("t.u16", 65535)
    w.add_int16("t.i16", -32768)
    w.add_uint32("t.u32", 4000000000)
    w.add_int32("t.i32", -7)
    w.add_float32("t.f32", 0.1)
    w.add_uint64("t.u64", 2**64 - 1)
    w.add_int64("t.i64", -(2**63))
    w.add_float64("t.f64", 1e-300)
    w.add_bool("t.bool", True)
    w.add_string("t.str", "héllo, wörld")
    w.add_array("t.arr_i32", [1, -2, 3])
    w.add_array("t.arr_str", ["a", "", "ccc"])
    w.add_array("t.arr_f32", [0.5, -1.25])
    w.add_array("t.nested", [[1, 2], [3]])
    w.add_key_value("t.arr_u64", [1, 2**63], V.ARRAY, sub_type=V.UINT64)
    w.add_key_value("comfy.gguf.orig_shape.blocks.0.ffn.0.weight", [3, 256], V.ARRAY, sub_type=V.INT32)
    w.add_file_type(32)
    w.add_quantization_version(2)
    rng = np.random.default_rng(1)
    # The 5-D Wan patch embedding as fix_5d_tensors.py writes it: F32, torch shape.
    w.add_tensor("patch_embedding.weight", rng.standard_normal((8, 4, 1, 2, 2)).astype(np.float32))
    x = rng.standard_normal((3, 256)).astype(np.float32)
    w.add_tensor("blocks.0.ffn.0.weight", gguf.quants.quantize(x, Q.BF16), raw_dtype=Q.BF16)
    w.add_tensor("blocks.0.ffn.2.weight", gguf.quants.quantize(x, Q.Q8_0), raw_dtype=Q.Q8_0)
    w.add_tensor("blocks.0.ffn.2.bias", rng.standard_normal(5).astype(np.float16))
    w.add_tensor("head.modulation", rng.standard_normal((1, 2, 6)).astype(np.float32))
    w.add_tensor("ids", np.arange(7, dtype=np.int32))
    w.add_tensor("f64", np.arange(3, dtype=np.float64))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def main() -> None:
    mode, path = sys.argv[1], sys.argv[2]
    if mode == "write":
        write_sample(path)
    elif mode != "read":
        raise SystemExit(f"unknown mode {mode}")
    json.dump(describe(path), sys.stdout)


if __name__ == "__main__":
    main()
