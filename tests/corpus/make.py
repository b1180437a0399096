#!/usr/bin/env python3
"""Write the hostile-input corpus: small broken (and a few valid) checkpoints, and what phasekit must say.

    python3 tests/corpus/make.py          # (re)write tests/corpus/files/ and tests/corpus/expected.json
    python3 tests/corpus/make.py --check  # exit 1 if the checked-in files differ from what this script writes

Standard library only. Every file is built byte by byte so that each case breaks exactly one rule.
`tests/cli_corpus.rs` runs the real binary on every case and checks, for every run in `expected.json`:
the exit code, one `phasekit: error: ` line on stderr that names the file and contains `contains`,
no panic, `--json` giving one JSON object with `error.kind`, and for `convert` that no output
or `.phasekit-tmp` file is left behind.

The expected exit codes follow the documented classes (src/error.rs, docs/cli.md), not what the
code happens to do: 3 I/O, 4 truncated (the file ends before data it declares), 5 malformed (bytes
that no valid file of the format has), 6 inconsistent (files disagree), 7 unsupported (valid input
phasekit cannot handle), 8 integrity (a hash mismatch), 9 limit (a declared size or count over a
safety cap). A case whose failure is a known phasekit bug carries `"known_bug"`: the test prints it
instead of failing.
"""

import filecmp
import hashlib
import io
import json
import os
import pickle
import shutil
import struct
import sys
import tempfile
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))

EXIT = {"io": 3, "truncated": 4, "malformed": 5, "inconsistent": 6, "unsupported": 7, "integrity": 8, "limit": 9, "ok": 0}

# ---------------------------------------------------------------------------------------------
# safetensors


def st_raw(json_bytes, data=b"", n=None):
    """A safetensors file from raw header bytes: u64 LE length, the header, the data buffer."""
    if isinstance(json_bytes, str):
        json_bytes = json_bytes.encode("utf-8")
    return struct.pack("<Q", len(json_bytes) if n is None else n) + json_bytes + data


def st(tensors, metadata=None, data=None, pad=True):
    """A safetensors file the way the official writer makes it: tensors = [(name, dtype, shape, bytes)]."""
    head = {}
    if metadata is not None:
        head["__metadata__"] = metadata
    at = 0
    buf = b""
    for name, dtype, shape, payload in tensors:
        head[name] = {"dtype": dtype, "shape": shape, "data_offsets": [at, at + len(payload)]}
        at += len(payload)
        buf += payload
    text = json.dumps(head, separators=(",", ":")).encode()
    if pad:
        text += b" " * (-len(text) % 8)
    return st_raw(text, buf if data is None else data)


def f32(*vals):
    return struct.pack("<%df" % len(vals), *vals)


def tensor_json(dtype, shape, begin, end, extra=""):
    return '{"dtype":"%s","shape":%s,"data_offsets":[%s,%s]%s}' % (dtype, json.dumps(shape), begin, end, extra)


VALID = st([("w", "F32", [2, 2], f32(1, 2, 3, 4)), ("b", "F32", [2], f32(5, 6))], {"format": "pt"})

# ---------------------------------------------------------------------------------------------
# GGUF

GGUF_MAGIC = b"GGUF"
VT = {"U8": 0, "I8": 1, "U16": 2, "I16": 3, "U32": 4, "I32": 5, "F32": 6, "BOOL": 7, "STRING": 8, "ARRAY": 9, "U64": 10, "I64": 11, "F64": 12}
GT = {"F32": 0, "F16": 1, "Q8_0": 8}


def u32(v):
    return struct.pack("<I", v)


def u64(v):
    return struct.pack("<Q", v)


def gstr(s, n=None):
    if isinstance(s, str):
        s = s.encode("utf-8")
    return u64(len(s) if n is None else n) + s


def kv(key, vtype, payload):
    """One metadata entry; payload is the encoded value."""
    return gstr(key) + u32(VT[vtype] if isinstance(vtype, str) else vtype) + payload


def kv_str(key, val):
    return kv(key, "STRING", gstr(val))


def kv_u32(key, val):
    return kv(key, "U32", u32(val))


def tinfo(name, ne, gtype, offset, n_dims=None):
    """One tensor info: ne is in ggml order (ne[0] innermost)."""
    t = GT[gtype] if isinstance(gtype, str) else gtype
    return gstr(name) + u32(len(ne) if n_dims is None else n_dims) + b"".join(u64(d) for d in ne) + u32(t) + u64(offset)


def pad_to(b, align):
    return b + b"\0" * (-len(b) % align)


def gguf(kvs, infos, data, version=3, align=32, n_tensors=None, n_kv=None, pad_end=True):
    head = GGUF_MAGIC + u32(version) + u64(len(infos) if n_tensors is None else n_tensors) + u64(len(kvs) if n_kv is None else n_kv)
    head += b"".join(kvs) + b"".join(infos)
    out = pad_to(head, align) + data
    return pad_to(out, align) if pad_end else out


ARCH = kv_str("general.architecture", "phasekit_test")
F32_8 = f32(*range(8))
GGUF_VALID = gguf([ARCH, kv_u32("general.alignment", 32)], [tinfo("w", [4, 2], "F32", 0)], F32_8)


def q8_0_block(d=1.0):
    return struct.pack("<e", d) + bytes((i - 16) & 0xFF for i in range(32))



# ---------------------------------------------------------------------------------------------
# PyTorch: torch.save zip archives and their pickles, written opcode by opcode


def zip_archive(entries, deflate=()):
    """A zip archive with fixed timestamps; entries stored (as torch.save writes them) unless
    named in `deflate` (then deflated at level 0, which is deterministic)."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in entries:
            zi = zipfile.ZipInfo(name, date_time=(1980, 1, 1, 0, 0, 0))
            zi.compress_type = zipfile.ZIP_DEFLATED if name in deflate else zipfile.ZIP_STORED
            z.writestr(zi, data, compresslevel=0 if name in deflate else None)
    return buf.getvalue()


def p_str(s):
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def p_int(v):
    return b"K" + bytes([v]) if 0 <= v < 256 else b"J" + struct.pack("<i", v)


def p_tuple(items):
    return b"(" + b"".join(items) + b"t"


def p_global(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"


def p_tensor(key, numel, size, offset=0, storage="FloatStorage"):
    """torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, OrderedDict())."""
    stride, acc = [], 1
    for d in reversed(size):
        stride.insert(0, acc)
        acc *= d
    pid = p_tuple([p_str("storage"), p_global("torch", storage), p_str(key), p_str("cpu"), p_int(numel)]) + b"Q"
    args = [pid, p_int(offset), p_tuple([p_int(x) for x in size]), p_tuple([p_int(x) for x in stride]), b"\x89", p_global("collections", "OrderedDict") + b")R"]
    return p_global("torch._utils", "_rebuild_tensor_v2") + p_tuple(args) + b"R"


def p_state_dict(items):
    """Protocol 2 `{name: value, ...}`, as torch.save writes a state dict."""
    return b"\x80\x02}(" + b"".join(p_str(k) + v for k, v in items) + b"u."


def torch_file(pkl, storages, prefix="archive", deflate=()):
    entries = [(prefix + "/data.pkl", pkl), (prefix + "/byteorder", b"little")]
    entries += [(prefix + "/data/" + k, v) for k, v in storages]
    entries.append((prefix + "/version", b"3\n"))
    return zip_archive(entries, deflate=tuple(prefix + "/" + d for d in deflate))


class Popen:
    """What an attacker pickles: unpickling calls subprocess.Popen(["id"])."""

    def __reduce__(self):
        import subprocess

        return (subprocess.Popen, (["id"],))


class System:
    def __reduce__(self):
        return (os.system, ("id",))


W_F32 = f32(1, 2, 3, 4)

# ---------------------------------------------------------------------------------------------
# cases

# Bugs that touch every case of one command: a problem of a `command` run (with `--json` when
# `json`) whose description starts with `problem` is reported as this bug instead of failing.
KNOWN_BUGS = []  # bugs on record that touch every run of one command (none today)


class Corpus:
    def __init__(self, root):
        self.root = root
        self.files = os.path.join(root, "files")
        self.cases = []

    def write(self, rel, data):
        p = os.path.join(self.files, rel)
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(data)

    def case(self, name, path, what, exit, contains="", names=None, commands=("verify", "inspect", "convert"), out="out.safetensors", runs=None, known_bug=None):
        """Register a case. `path` is relative to tests/corpus/files; every command expects `exit`."""
        runs = list(runs or [])
        for c in commands:
            args = ["convert", "{in}", "{out}"] if c == "convert" else [c, "{in}"]
            runs.append({"args": args, "exit": EXIT[exit] if isinstance(exit, str) else exit, "contains": contains})
        entry = {"name": name, "path": "files/" + path, "what": what, "names": names or os.path.basename(path.rstrip("/")), "out": out, "runs": runs}
        if known_bug:
            entry["known_bug"] = known_bug
        self.cases.append(entry)


def run(cmd, exit, contains=""):
    args = ["convert", "{in}", "{out}"] if cmd == "convert" else [cmd, "{in}"]
    return {"args": args, "exit": EXIT[exit] if isinstance(exit, str) else exit, "contains": contains}


def build(c):
    # ----- safetensors: truncation --------------------------------------------------------------
    c.write("st_empty.safetensors", b"")
    c.case("st_empty", "st_empty.safetensors", "empty file", "truncated", "too short")

    c.write("st_prefix_short.safetensors", b"\x10\x00\x00\x00\x00")
    c.case("st_prefix_short", "st_prefix_short.safetensors", "5 bytes: less than the 8-byte length prefix", "truncated", "too short")

    c.write("st_header_cut.safetensors", VALID[:40])
    c.case("st_header_cut", "st_header_cut.safetensors", "file ends inside the JSON header", "truncated", "header")

    c.write("st_header_len_gt_file.safetensors", st_raw(b'{"__metadata__":{}}', n=50_000_000))
    c.case("st_header_len_gt_file", "st_header_len_gt_file.safetensors", "header length 50 MB (under the cap) in a 27-byte file", "truncated", "50000000")

    c.write("st_data_cut.safetensors", VALID[:-5])
    c.case("st_data_cut", "st_data_cut.safetensors", "data buffer 5 bytes short", "truncated", "ends at byte")

    c.write("st_header_len_over_cap.safetensors", st_raw(b"{}      ", n=100_000_001))
    c.case("st_header_len_over_cap", "st_header_len_over_cap.safetensors", "header length 100,000,001 (> MAX_HEADER_SIZE)", "limit", "100 MB")

    c.write("st_header_len_u64_max.safetensors", st_raw(b"{}      ", n=2**64 - 1))
    c.case("st_header_len_u64_max", "st_header_len_u64_max.safetensors", "header length u64::MAX (8+N overflows)", "limit", "100 MB")

    # ----- safetensors: header bytes and JSON -----------------------------------------------------
    c.write("st_non_utf8.safetensors", st_raw(b'{"w\xff\xfe":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}'))
    c.case("st_non_utf8", "st_non_utf8.safetensors", "invalid UTF-8 in a tensor name", "malformed", "UTF-8")

    c.write("st_not_json.safetensors", st_raw(b"this is not JSON at all!"))
    c.case("st_not_json", "st_not_json.safetensors", "header is plain text", "malformed", "JSON")

    c.write("st_json_array.safetensors", st_raw(b"[1, 2, 3]       "))
    c.case("st_json_array", "st_json_array.safetensors", "header is a JSON array", "malformed", "object")

    c.write("st_json_string.safetensors", st_raw(b'"{\\"w\\": 1}"    '))
    c.case("st_json_string", "st_json_string.safetensors", "header is a JSON string holding an object", "malformed", "object")

    c.write("st_trailing_json.safetensors", st_raw(b'{"__metadata__":{"a":"b"}} {"x":1}', b""))
    c.case("st_trailing_json", "st_trailing_json.safetensors", "a second JSON value after the header object", "malformed", "trailing")

    c.write("st_nul_padding.safetensors", st_raw(b'{"__metadata__":{"a":"b"}}\0\0\0\0\0\0'))
    c.case("st_nul_padding", "st_nul_padding.safetensors", "header padded with NUL instead of spaces", "malformed", "JSON")

    dup = '{"w":%s,"w":%s}' % (tensor_json("F32", [1], 0, 4), tensor_json("F32", [1], 4, 8))
    c.write("st_duplicate_tensor.safetensors", st_raw(dup, f32(1, 2)))
    c.case("st_duplicate_tensor", "st_duplicate_tensor.safetensors", "the same tensor name twice (JSON maps keep the last)", "malformed", "duplicate")

    c.write("st_duplicate_metadata_key.safetensors", st_raw('{"__metadata__":{"k":"a","k":"b"},"w":%s}' % tensor_json("F32", [1], 0, 4), f32(1)))
    c.case("st_duplicate_metadata_key", "st_duplicate_metadata_key.safetensors", "a __metadata__ key twice", "malformed", "duplicate")

    c.write("st_duplicate_metadata.safetensors", st_raw('{"__metadata__":{"a":"1"},"__metadata__":{"b":"2"}}'))
    c.case("st_duplicate_metadata", "st_duplicate_metadata.safetensors", "__metadata__ twice", "malformed", "duplicate")

    c.write("st_metadata_int.safetensors", st_raw('{"__metadata__":{"epoch":3},"w":%s}' % tensor_json("F32", [1], 0, 4), f32(1)))
    c.case("st_metadata_int", "st_metadata_int.safetensors", "__metadata__ value is a number", "malformed", "__metadata__")

    c.write("st_metadata_nested.safetensors", st_raw('{"__metadata__":{"cfg":{"a":"b"}},"w":%s}' % tensor_json("F32", [1], 0, 4), f32(1)))
    c.case("st_metadata_nested", "st_metadata_nested.safetensors", "__metadata__ value is an object", "malformed", "__metadata__")

    c.write("st_metadata_array.safetensors", st_raw('{"__metadata__":["a","b"]}'))
    c.case("st_metadata_array", "st_metadata_array.safetensors", "__metadata__ is an array", "malformed", "__metadata__")

    deep = "[" * 20000 + "]" * 20000
    c.write("st_metadata_deep.safetensors", st_raw('{"__metadata__":%s}' % deep))
    c.case("st_metadata_deep", "st_metadata_deep.safetensors", "__metadata__ nested 20000 arrays deep (stack exhaustion)", "malformed", "__metadata__")

    c.write("st_unknown_field_deep.safetensors", st_raw('{"w":%s}' % tensor_json("F32", [1], 0, 4, ',"x":%s' % deep), f32(1)))
    c.case(
        "st_unknown_field_deep",
        "st_unknown_field_deep.safetensors",
        "unknown tensor field nested 20000 arrays deep: ignored without recursion, so accepted (the official crate rejects it only "
        "because #[serde(flatten)] buffers it and hits serde_json's recursion limit of 128)",
        "ok",
    )

    c.write("st_unknown_fields.safetensors", st_raw('{"w":%s}' % tensor_json("F32", [2], 0, 8, ',"quant":{"scheme":"none"},"note":"extra"'), f32(1, 2)))
    c.case("st_unknown_fields", "st_unknown_fields.safetensors", "extra fields in a tensor entry: accepted, like the official crate (serde without deny_unknown_fields)", "ok")

    c.write("st_missing_shape.safetensors", st_raw('{"w":{"dtype":"F32","data_offsets":[0,4]}}', f32(1)))
    c.case("st_missing_shape", "st_missing_shape.safetensors", "tensor entry without shape", "malformed", "'w'")

    c.write("st_tensor_not_object.safetensors", st_raw('{"w":[0,4]}', f32(1)))
    c.case("st_tensor_not_object", "st_tensor_not_object.safetensors", "tensor entry is an array", "malformed", "'w'")

    # ----- safetensors: offsets ------------------------------------------------------------------
    c.write("st_offset_negative.safetensors", st_raw('{"w":%s}' % tensor_json("F32", [1], -4, 0), f32(1)))
    c.case("st_offset_negative", "st_offset_negative.safetensors", "negative data offset", "malformed", "'w'")

    c.write("st_offset_float.safetensors", st_raw('{"w":%s}' % tensor_json("F32", [1], "0.0", "4.0"), f32(1)))
    c.case("st_offset_float", "st_offset_float.safetensors", "float data offsets", "malformed", "'w'")

    c.write("st_offset_u64_overflow.safetensors", st_raw('{"w":%s}' % tensor_json("F32", [1], 0, 2**64), f32(1)))
    c.case("st_offset_u64_overflow", "st_offset_u64_overflow.safetensors", "data offset 2^64 (does not fit u64)", "malformed", "'w'")

    big = 2**64 - 1
    c.write("st_offset_huge_overflow.safetensors", st_raw('{"w":%s}' % tensor_json("U8", [big], 0, big)))
    c.case("st_offset_huge_overflow", "st_offset_huge_overflow.safetensors", "consistent tensor of u64::MAX bytes: 8+N+end overflows", "malformed", "overflow")

    c.write("st_offset_huge.safetensors", st_raw('{"w":%s}' % tensor_json("U8", [2**50], 0, 2**50), b"\0" * 8))
    c.case("st_offset_huge", "st_offset_huge.safetensors", "consistent 1 PiB tensor in an 8-byte data buffer", "truncated", "ends at byte")

    c.write("st_gap.safetensors", st_raw('{"a":%s,"b":%s}' % (tensor_json("F32", [1], 0, 4), tensor_json("F32", [1], 8, 12)), f32(1, 2, 3)))
    c.case("st_gap", "st_gap.safetensors", "4-byte hole between tensors", "malformed", "gap")

    c.write("st_first_not_zero.safetensors", st_raw('{"a":%s}' % tensor_json("F32", [1], 4, 8), f32(1, 2)))
    c.case("st_first_not_zero", "st_first_not_zero.safetensors", "first tensor starts at 4", "malformed", "'a'")

    c.write("st_overlap.safetensors", st_raw('{"a":%s,"b":%s}' % (tensor_json("F32", [2], 0, 8), tensor_json("F32", [2], 4, 12)), f32(1, 2, 3)))
    c.case("st_overlap", "st_overlap.safetensors", "tensors share 4 bytes", "malformed", "overlap")

    c.write("st_same_range.safetensors", st_raw('{"a":%s,"b":%s}' % (tensor_json("F32", [1], 0, 4), tensor_json("F32", [1], 0, 4)), f32(1)))
    c.case("st_same_range", "st_same_range.safetensors", "two tensors with the same byte range", "malformed", "overlap")

    c.write("st_end_before_begin.safetensors", st_raw('{"a":%s,"b":%s}' % (tensor_json("F32", [1], 0, 4), tensor_json("F32", [0], 4, 0)), f32(1)))
    c.case("st_end_before_begin", "st_end_before_begin.safetensors", "data_offsets [4, 0]", "malformed", "'b'")

    c.write("st_size_mismatch.safetensors", st_raw('{"w":%s}' % tensor_json("F32", [2, 2], 0, 8), f32(1, 2)))
    c.case("st_size_mismatch", "st_size_mismatch.safetensors", "shape [2,2] F32 needs 16 bytes, offsets give 8", "malformed", "16 bytes")

    c.write("st_shape_overflow.safetensors", st_raw('{"w":%s}' % tensor_json("F32", [2**32, 2**32, 2], 0, 4), f32(1)))
    c.case("st_shape_overflow", "st_shape_overflow.safetensors", "shape product overflows u64", "malformed", "overflow")

    c.write("st_shape_bits_overflow.safetensors", st_raw('{"w":%s}' % tensor_json("F32", [2**62], 0, 4), f32(1)))
    c.case("st_shape_bits_overflow", "st_shape_bits_overflow.safetensors", "numel fits u64, numel x 32 bits does not", "malformed", "overflow")

    c.write("st_shape_negative.safetensors", st_raw('{"w":%s}' % tensor_json("F32", [-1], 0, 4), f32(1)))
    c.case("st_shape_negative", "st_shape_negative.safetensors", "negative dimension", "malformed", "'w'")

    c.write("st_trailing_bytes.safetensors", VALID + b"\0\0\0")
    c.case("st_trailing_bytes", "st_trailing_bytes.safetensors", "3 bytes after the last tensor", "malformed", "trailing bytes")

    c.write("st_f4_odd.safetensors", st_raw('{"w":%s}' % tensor_json("F4", [3], 0, 2), b"\x12\x34"))
    c.case("st_f4_odd", "st_f4_odd.safetensors", "F4 with 3 elements (12 bits)", "malformed", "whole bytes")

    c.write("st_f6_ok.safetensors", st_raw('{"w":%s}' % tensor_json("F6_E2M3", [4], 0, 3) + "        ", b"\x01\x02\x03"))
    c.case("st_f6_ok", "st_f6_ok.safetensors", "F6_E2M3 with 4 elements (3 bytes): valid", "ok")

    c.write("st_unknown_dtype_width.safetensors", st_raw('{"w":%s}' % tensor_json("WEIRD", [3], 0, 4), b"\0" * 4))
    c.case("st_unknown_dtype_width", "st_unknown_dtype_width.safetensors", "unknown dtype whose bit width cannot be inferred (32 bits / 3 elements)", "malformed", "WEIRD")

    c.write("st_bad_name_newline.safetensors", st_raw('{"a\\nphasekit: error: forged":%s}' % tensor_json("F32", [2], 0, 4), f32(1)))
    c.case("st_bad_name_newline", "st_bad_name_newline.safetensors", "tensor name with a newline (and a size error): the message stays one line", "malformed", "forged")

    # ----- safetensors: valid edge cases ----------------------------------------------------------
    c.write("st_zero_tensors.safetensors", st([], {"format": "pt"}))
    c.case("st_zero_tensors", "st_zero_tensors.safetensors", "valid file with no tensors", "ok")

    c.write("st_empty_object.safetensors", st_raw(b"{}"))
    c.case("st_empty_object", "st_empty_object.safetensors", "valid file: header '{}', no padding, no data", "ok")

    c.write("st_unknown_dtype.safetensors", st([("w", "F8_E3M4", [4], b"\x01\x02\x03\x04"), ("n", "NEWTYPE16", [2], b"\x05\x06\x07\x08")]))
    c.case("st_unknown_dtype", "st_unknown_dtype.safetensors", "valid file with unknown dtypes (kept as opaque, width from the name)", "ok")

    c.write("st_zero_size_dim.safetensors", st([("e", "F32", [0, 5], b""), ("s", "F32", [], f32(7))]))
    c.case("st_zero_size_dim", "st_zero_size_dim.safetensors", "valid: a [0,5] tensor (no bytes) and a scalar", "ok")

    c.write("st_valid.safetensors", VALID)
    c.case("st_valid", "st_valid.safetensors", "valid reference file", "ok")

    # ----- sharded folders -----------------------------------------------------------------------
    def shard_dir(name, shards, weight_map, total_size="auto", index=None, extra=()):
        base = name + "/"
        total = 0
        for fname, tensors in shards.items():
            blob = st(tensors, {"format": "pt"})
            c.write(base + fname, blob)
            total += sum(len(t[3]) for t in tensors)
        if index is None:
            idx = {"metadata": {"total_size": total if total_size == "auto" else total_size}, "weight_map": weight_map}
            index = json.dumps(idx, indent=2, sort_keys=True).encode()
        c.write(base + "diffusion_pytorch_model.safetensors.index.json", index)
        for rel, data in extra:
            c.write(base + rel, data)

    S1, S2 = "diffusion_pytorch_model-00001-of-00002.safetensors", "diffusion_pytorch_model-00002-of-00002.safetensors"
    A = ("a", "F32", [2], f32(1, 2))
    B = ("b", "F32", [3], f32(3, 4, 5))
    IDX = "diffusion_pytorch_model.safetensors.index.json"

    shard_dir("sh_valid", {S1: [A], S2: [B]}, {"a": S1, "b": S2})
    c.case("sh_valid", "sh_valid/", "valid two-shard folder", "ok", out="out_model")

    shard_dir("sh_missing_shard", {S1: [A]}, {"a": S1, "b": S2})
    c.case("sh_missing_shard", "sh_missing_shard/", "index names a shard file that does not exist", "inconsistent", S2, names=IDX, out="out_model")

    shard_dir("sh_index_extra_tensor", {S1: [A], S2: [B]}, {"a": S1, "b": S2, "c": S2})
    c.case("sh_index_extra_tensor", "sh_index_extra_tensor/", "index lists tensor 'c' that its shard lacks", "inconsistent", "'c'", names=IDX, out="out_model")

    shard_dir("sh_tensor_not_in_index", {S1: [A], S2: [B, ("c", "F32", [1], f32(9))]}, {"a": S1, "b": S2})
    c.case("sh_tensor_not_in_index", "sh_tensor_not_in_index/", "shard holds tensor 'c' that the index does not list", "inconsistent", "'c'", names=IDX, out="out_model")

    shard_dir("sh_tensor_in_two_shards", {S1: [A], S2: [A, B]}, {"a": S1, "b": S2})
    c.case("sh_tensor_in_two_shards", "sh_tensor_in_two_shards/", "tensor 'a' stored in both shards", "inconsistent", "'a'", names=IDX, out="out_model")

    shard_dir("sh_wrong_shard", {S1: [A], S2: [B]}, {"a": S2, "b": S2})
    c.case("sh_wrong_shard", "sh_wrong_shard/", "index says 'a' is in shard 2, it is in shard 1", "inconsistent", "'a'", names=IDX, out="out_model")

    shard_dir("sh_wrong_total_size", {S1: [A], S2: [B]}, {"a": S1, "b": S2}, total_size=21)
    c.case("sh_wrong_total_size", "sh_wrong_total_size/", "metadata.total_size 21, tensors hold 20 bytes", "inconsistent", "total_size", names=IDX, out="out_model")

    shard_dir("sh_total_size_text", {S1: [A], S2: [B]}, {"a": S1, "b": S2}, total_size="twenty")
    c.case("sh_total_size_text", "sh_total_size_text/", "metadata.total_size is a word", "malformed", "total_size", names=IDX, out="out_model")

    shard_dir("sh_index_not_json", {S1: [A]}, {}, index=b'{"weight_map": {"a": "x.safetensors",}')
    c.case("sh_index_not_json", "sh_index_not_json/", "index is not JSON (trailing comma, unclosed)", "malformed", "JSON", names=IDX, out="out_model")

    shard_dir("sh_index_array", {S1: [A]}, {}, index=b'[{"weight_map": {}}]')
    c.case("sh_index_array", "sh_index_array/", "index is a JSON array", "malformed", "object", names=IDX, out="out_model")

    shard_dir("sh_weight_map_array", {S1: [A]}, {}, index=json.dumps({"metadata": {"total_size": 8}, "weight_map": [["a", S1]]}).encode())
    c.case("sh_weight_map_array", "sh_weight_map_array/", "weight_map is an array", "malformed", "weight_map", names=IDX, out="out_model")

    shard_dir("sh_weight_map_missing", {S1: [A]}, {}, index=json.dumps({"metadata": {"total_size": 8}}).encode())
    c.case("sh_weight_map_missing", "sh_weight_map_missing/", "index without weight_map", "malformed", "weight_map", names=IDX, out="out_model")

    shard_dir("sh_weight_map_value_int", {S1: [A]}, {"a": 1})
    c.case("sh_weight_map_value_int", "sh_weight_map_value_int/", "weight_map value is a number", "malformed", "'a'", names=IDX, out="out_model")

    # The file the traversal points at exists and is valid: a reader that follows it would succeed.
    c.write("sh_path_traversal/outside.safetensors", st([A], {"format": "pt"}))
    shard_dir("sh_path_traversal/model", {}, {"a": "../outside.safetensors"})
    c.case("sh_path_traversal", "sh_path_traversal/model/", "weight_map points at ../outside.safetensors (exists, valid)", "malformed", "outside", names=IDX, out="out_model")

    shard_dir("sh_absolute_path", {}, {"a": "/etc/passwd"})
    c.case("sh_absolute_path", "sh_absolute_path/", "weight_map points at /etc/passwd", "malformed", "/etc/passwd", names=IDX, out="out_model")

    shard_dir("sh_shard_truncated", {S1: [A], S2: [B]}, {"a": S1, "b": S2})
    p = os.path.join(c.files, "sh_shard_truncated", S2)
    with open(p, "rb") as f:
        blob = f.read()
    c.write("sh_shard_truncated/" + S2, blob[:-4])
    c.case("sh_shard_truncated", "sh_shard_truncated/", "second shard is 4 bytes short: the error names the shard", "truncated", "ends at byte", names=S2, out="out_model")

    shard_dir("sh_two_indexes", {S1: [A], S2: [B]}, {"a": S1, "b": S2}, extra=[("model.safetensors.index.json", json.dumps({"weight_map": {"a": S1, "b": S2}}).encode())])
    c.case("sh_two_indexes", "sh_two_indexes/", "two *.safetensors.index.json in one folder", "inconsistent", "index", names="sh_two_indexes", out="out_model")

    c.write("multi_second_broken/high_noise_model/diffusion_pytorch_model.safetensors", VALID)
    c.write("multi_second_broken/low_noise_model/diffusion_pytorch_model.safetensors", VALID[:-5])
    c.case(
        "multi_second_broken",
        "multi_second_broken/",
        "Wan repo folder whose second expert is truncated: convert has already written the first into its temporary folder",
        "truncated",
        "ends at byte",
        names="low_noise_model",
        out="out_model",
    )

    c.write("dir_no_model/README.txt", b"no weights here\n")
    c.case("dir_no_model", "dir_no_model/", "folder without any weights file", "unsupported", "no .safetensors", out="out_model")

    c.case("missing_file", "missing_file.safetensors", "path does not exist", "io", "No such file")

    # ----- GGUF ----------------------------------------------------------------------------------
    c.write("gg_valid.gguf", GGUF_VALID)
    c.case("gg_valid", "gg_valid.gguf", "valid GGUF v3: one F32 [2,4] tensor", "ok")

    c.write("gg_v2_valid.gguf", gguf([ARCH], [tinfo("w", [4, 2], "F32", 0)], F32_8, version=2))
    c.case("gg_v2_valid", "gg_v2_valid.gguf", "valid GGUF v2", "ok")

    c.write("gg_5d_valid.gguf", gguf([ARCH], [tinfo("patch_embedding.weight", [2, 1, 1, 2, 2], "F32", 0)], F32_8))
    c.case("gg_5d_valid", "gg_5d_valid.gguf", "valid 5-D tensor (Wan patch embedding; over ggml's 4-D cap, under phasekit's 8)", "ok")

    c.write("gg_q8_0_valid.gguf", gguf([ARCH, kv_u32("general.quantization_version", 2)], [tinfo("q", [32, 2], "Q8_0", 0)], q8_0_block(0.5) + q8_0_block(2.0)))
    c.case("gg_q8_0_valid", "gg_q8_0_valid.gguf", "valid Q8_0 [2,32] tensor (convert dequantizes it)", "ok")

    c.write("gg_bad_magic.gguf", b"GGUX" + GGUF_VALID[4:])
    c.case(
        "gg_bad_magic",
        "gg_bad_magic.gguf",
        "magic GGUX in a .gguf file",
        "malformed",
        "magic",
    )

    c.write("gg_magic_only.gguf", b"GGUF")
    c.case("gg_magic_only", "gg_magic_only.gguf", "4-byte file: the magic and nothing else", "truncated", "byte")

    c.write("gg_version1.gguf", GGUF_VALID[:4] + u32(1) + GGUF_VALID[8:])
    c.case("gg_version1", "gg_version1.gguf", "GGUF version 1 (32-bit counts; rejected by ggml too)", "unsupported", "version")

    c.write("gg_version4.gguf", GGUF_VALID[:4] + u32(4) + GGUF_VALID[8:])
    c.case("gg_version4", "gg_version4.gguf", "GGUF version 4 (does not exist yet)", "unsupported", "version")

    head = GGUF_MAGIC + u32(3) + u64(1) + u64(2) + ARCH
    c.write("gg_truncated_kv.gguf", head[:-6])
    c.case("gg_truncated_kv", "gg_truncated_kv.gguf", "file ends inside the first metadata value", "truncated", "bytes")

    full_head = GGUF_MAGIC + u32(3) + u64(1) + u64(1) + ARCH + tinfo("w", [4, 2], "F32", 0)
    c.write("gg_truncated_tensor_info.gguf", full_head[:-10])
    c.case("gg_truncated_tensor_info", "gg_truncated_tensor_info.gguf", "file ends inside the tensor info", "truncated", "'w'")

    c.write("gg_string_past_eof.gguf", gguf([ARCH, kv("general.name", "STRING", gstr(b"abc", n=5000))], [], b"", pad_end=False))
    c.case("gg_string_past_eof", "gg_string_past_eof.gguf", "string value declares 5000 bytes in a ~100-byte file", "truncated", "general.name")

    c.write("gg_array_count_absurd.gguf", gguf([ARCH, kv("test.arr", "ARRAY", u32(VT["U32"]) + u64(2**60) + u32(1))], [], b""))
    c.case("gg_array_count_absurd", "gg_array_count_absurd.gguf", "array of 2^60 U32 (2^62 bytes)", "limit", "test.arr")

    c.write("gg_array_count_past_eof.gguf", gguf([ARCH, kv("test.arr", "ARRAY", u32(VT["U32"]) + u64(1000) + u32(1))], [], b"", pad_end=False))
    c.case("gg_array_count_past_eof", "gg_array_count_past_eof.gguf", "array of 1000 U32 in a ~100-byte file", "truncated", "test.arr")

    c.write("gg_tensor_count_absurd.gguf", gguf([ARCH], [tinfo("w", [4, 2], "F32", 0)], F32_8, n_tensors=2**60))
    c.case("gg_tensor_count_absurd", "gg_tensor_count_absurd.gguf", "tensor_count 2^60", "limit", "tensor")

    c.write("gg_kv_count_absurd.gguf", gguf([ARCH], [], b"", n_kv=2**60))
    c.case("gg_kv_count_absurd", "gg_kv_count_absurd.gguf", "metadata_kv_count 2^60", "limit", "key-value")

    nested = b""
    depth = 5000
    for _ in range(depth - 1):
        nested += u32(VT["ARRAY"]) + u64(1)
    nested += u32(VT["U8"]) + u64(0)
    c.write("gg_nested_arrays.gguf", gguf([ARCH, kv("test.deep", "ARRAY", nested)], [], b""))
    c.case("gg_nested_arrays", "gg_nested_arrays.gguf", "arrays nested 5000 deep (stack exhaustion)", "limit", "test.deep")

    c.write("gg_ndims_9.gguf", gguf([ARCH], [tinfo("w", [1] * 8 + [8], "F32", 0)], F32_8))
    c.case("gg_ndims_9", "gg_ndims_9.gguf", "n_dims 9 (phasekit's cap is 8)", "limit", "'w'")

    c.write("gg_ndims_huge.gguf", gguf([ARCH], [tinfo("w", [], "F32", 0, n_dims=0xFFFFFFFF)], b""))
    c.case("gg_ndims_huge", "gg_ndims_huge.gguf", "n_dims u32::MAX", "limit", "'w'")

    c.write("gg_unknown_value_type.gguf", gguf([ARCH, kv("test.x", 13, u32(7))], [tinfo("w", [4, 2], "F32", 0)], F32_8))
    c.case("gg_unknown_value_type", "gg_unknown_value_type.gguf", "metadata value type 13", "malformed", "test.x")

    c.write("gg_unknown_array_type.gguf", gguf([ARCH, kv("test.x", "ARRAY", u32(99) + u64(1) + u32(0))], [tinfo("w", [4, 2], "F32", 0)], F32_8))
    c.case("gg_unknown_array_type", "gg_unknown_array_type.gguf", "array element type 99", "malformed", "test.x")

    c.write("gg_unknown_ggml_type.gguf", gguf([ARCH], [tinfo("w", [4, 2], 40, 0)], F32_8))
    c.case("gg_unknown_ggml_type", "gg_unknown_ggml_type.gguf", "ggml type id 40 (NVFP4, newer than phasekit)", "unsupported", "'w'")

    c.write("gg_bool_2.gguf", gguf([ARCH, kv("test.flag", "BOOL", b"\x02")], [tinfo("w", [4, 2], "F32", 0)], F32_8))
    c.case("gg_bool_2", "gg_bool_2.gguf", "BOOL value 2", "malformed", "test.flag")

    c.write("gg_key_non_utf8.gguf", gguf([ARCH, kv(b"test.\xff", "U32", u32(1))], [tinfo("w", [4, 2], "F32", 0)], F32_8))
    c.case("gg_key_non_utf8", "gg_key_non_utf8.gguf", "metadata key with invalid UTF-8", "malformed", "UTF-8")

    c.write("gg_duplicate_key.gguf", gguf([ARCH, kv_u32("test.k", 1), kv_u32("test.k", 2)], [tinfo("w", [4, 2], "F32", 0)], F32_8))
    c.case("gg_duplicate_key", "gg_duplicate_key.gguf", "metadata key twice", "malformed", "test.k")

    for name, val, what in [
        ("gg_alignment_0", kv_u32("general.alignment", 0), "general.alignment 0 (a division by zero in naive readers)"),
        ("gg_alignment_48", kv_u32("general.alignment", 48), "general.alignment 48 (not a power of two)"),
        ("gg_alignment_u64", kv("general.alignment", "U64", u64(32)), "general.alignment stored as U64 (ggml requires U32)"),
        ("gg_alignment_string", kv_str("general.alignment", "32"), "general.alignment stored as a string"),
    ]:
        c.write(name + ".gguf", gguf([ARCH, val], [tinfo("w", [4, 2], "F32", 0)], F32_8))
        c.case(name, name + ".gguf", what, "malformed", "alignment")

    c.write("gg_offset_misaligned.gguf", gguf([ARCH], [tinfo("a", [4], "F32", 0), tinfo("b", [4], "F32", 20)], f32(*range(4)) + b"\0" * 4 + f32(*range(4)), align=32))
    c.case("gg_offset_misaligned", "gg_offset_misaligned.gguf", "tensor 'b' at data offset 20 with alignment 32", "malformed", "'b'")

    c.write("gg_overlap.gguf", gguf([ARCH], [tinfo("a", [8], "F32", 0), tinfo("b", [8], "F32", 0)], F32_8))
    c.case("gg_overlap", "gg_overlap.gguf", "two tensors at data offset 0", "malformed", "'b'")

    c.write("gg_data_past_eof.gguf", gguf([ARCH], [tinfo("w", [64], "F32", 0)], F32_8))
    c.case("gg_data_past_eof", "gg_data_past_eof.gguf", "256-byte tensor, 32 bytes of data", "truncated", "'w'")

    c.write("gg_offset_huge.gguf", gguf([ARCH], [tinfo("w", [8], "F32", 2**64 - 32)], F32_8))
    c.case("gg_offset_huge", "gg_offset_huge.gguf", "data offset 2^64-32 (offset + size overflows)", "malformed", "'w'")

    c.write("gg_duplicate_tensor.gguf", gguf([ARCH], [tinfo("w", [8], "F32", 0), tinfo("w", [8], "F32", 32)], F32_8 + F32_8))
    c.case("gg_duplicate_tensor", "gg_duplicate_tensor.gguf", "tensor name 'w' twice", "malformed", "duplicate")

    c.write("gg_q8_0_ne0.gguf", gguf([ARCH], [tinfo("q", [33, 1], "Q8_0", 0)], q8_0_block() + q8_0_block()))
    c.case("gg_q8_0_ne0", "gg_q8_0_ne0.gguf", "Q8_0 with ne0 = 33 (not a multiple of the 32-element block)", "malformed", "'q'")

    c.write("gg_dims_overflow.gguf", gguf([ARCH], [tinfo("w", [2**32, 2**32, 16], "F32", 0)], F32_8))
    c.case("gg_dims_overflow", "gg_dims_overflow.gguf", "ne product 2^68 overflows u64", "malformed", "'w'")

    c.write("gg_ne_negative.gguf", gguf([ARCH], [tinfo("w", [2**64 - 1, 2], "F32", 0)], F32_8))
    c.case("gg_ne_negative", "gg_ne_negative.gguf", "ne[0] = -1 as int64", "malformed", "'w'")

    # ----- PyTorch: pickles that would run code, and broken archives ---------------------------
    PT = ("verify", "inspect", "convert")
    c.write("pk_valid.pt", torch_file(p_state_dict([("w", p_tensor("0", 4, [2, 2]))]), [("0", W_F32)]))
    c.case("pk_valid", "pk_valid.pt", "valid torch.save archive: one F32 [2,2] tensor", "ok", commands=PT)
    evil = p_global("os", "system") + p_str("touch /tmp/phasekit-pwned") + b"\x85R"
    c.write("pk_os_system.pt", torch_file(b"\x80\x02" + evil + b".", []))
    c.case("pk_os_system", "pk_os_system.pt", "data.pkl is GLOBAL os.system + REDUCE (runs a shell command on torch.load)", "malformed", "refuses global 'os.system'", commands=PT)
    hidden = p_state_dict([("w", p_tensor("0", 4, [2, 2])), ("x", evil)])
    c.write("pk_os_system_in_state_dict.pt", torch_file(hidden, [("0", W_F32)]))
    c.case("pk_os_system_in_state_dict", "pk_os_system_in_state_dict.pt", "a valid tensor, then a value that calls os.system", "malformed", "refuses global 'os.system'", commands=PT)
    stack_eval = b"\x80\x04\x8c\x08builtins\x8c\x04eval\x93\x8c\x1a__import__('os').system('id')\x85R."
    c.write("pk_eval_stack_global.pt", torch_file(stack_eval, []))
    c.case("pk_eval_stack_global", "pk_eval_stack_global.pt", "protocol 4 STACK_GLOBAL builtins.eval + REDUCE", "malformed", "refuses global 'builtins.eval'", commands=PT)
    c.write("pk_reduce_popen.pt", torch_file(pickle.dumps({"w": Popen()}, protocol=4), []))
    c.case("pk_reduce_popen", "pk_reduce_popen.pt", "what pickle.dumps (protocol 4) writes for an object whose __reduce__ returns subprocess.Popen", "malformed", "refuses global 'subprocess.Popen'", commands=PT)
    c.write("pk_reduce_popen_p2.pt", torch_file(pickle.dumps({"w": Popen()}, protocol=2), []))
    c.case("pk_reduce_popen_p2", "pk_reduce_popen_p2.pt", "the same at protocol 2, where pickle names it by its Python 2 module (commands.Popen)", "malformed", "refuses global 'commands.Popen'", commands=PT)
    c.write("pk_reduce_system.pt", torch_file(pickle.dumps({"w": System()}, protocol=2), []))
    c.case("pk_reduce_system", "pk_reduce_system.pt", "__reduce__ returning os.system (pickled as posix.system)", "malformed", "refuses global 'posix.system'", commands=PT)
    inst = b"(X\x02\x00\x00\x00idios\nsystem\n."
    c.write("pk_inst_opcode.pt", torch_file(inst, []))
    c.case("pk_inst_opcode", "pk_inst_opcode.pt", "protocol-0 INST opcode (creates an object by name)", "malformed", "INST", commands=PT)
    c.write("pk_memo_missing.pt", torch_file(b"\x80\x02j\xff\xff\xff\xff.", []))
    c.case("pk_memo_missing", "pk_memo_missing.pt", "LONG_BINGET of memo index 2^32-1, never stored", "malformed", "never stored", commands=PT)
    huge_put = b"\x80\x02}r\xf0\xff\xff\xff(" + p_str("w") + p_tensor("0", 4, [2, 2]) + b"u."
    c.write("pk_memo_huge_index.pt", torch_file(huge_put, [("0", W_F32)]))
    c.case("pk_memo_huge_index", "pk_memo_huge_index.pt", "valid: the state dict memoised at index 4294967280 (stored sparsely, no allocation)", "ok", commands=PT)
    deep = p_state_dict([("w", p_tensor("0", 4, [2, 2])), ("deep", b"]" * 100000 + b"a" * 99999)])
    c.write("pk_deep_nesting.pt", torch_file(deep, [("0", W_F32)]))
    c.case("pk_deep_nesting", "pk_deep_nesting.pt", "a value nested in 100000 lists", "limit", "nested deeper than 64", commands=PT)
    c.write("pk_string_past_end.pt", torch_file(b"\x80\x02X\xff\xff\xff\x7fab", []))
    c.case("pk_string_past_end", "pk_string_past_end.pt", "BINUNICODE of 2 GiB in a 10-byte pickle", "truncated", "runs past the end", commands=PT)
    whole = torch_file(p_state_dict([("w", p_tensor("0", 4, [2, 2]))]), [("0", W_F32)])
    c.write("pk_truncated_zip.pt", whole[: len(whole) // 2])
    c.case("pk_truncated_zip", "pk_truncated_zip.pt", "a torch.save archive cut in half", "truncated", "end-of-central-directory", commands=PT)
    c.write("pk_storage_past_end.pt", torch_file(p_state_dict([("w", p_tensor("0", 4, [2, 2], offset=2))]), [("0", W_F32)]))
    c.case("pk_storage_past_end", "pk_storage_past_end.pt", "a [2,2] tensor at element 2 of a 4-element storage", "malformed", "past the end of its storage", commands=PT)
    c.write("pk_storage_size.pt", torch_file(p_state_dict([("w", p_tensor("0", 8, [2, 2]))]), [("0", W_F32)]))
    c.case("pk_storage_size", "pk_storage_size.pt", "storage declares 8 floats, the entry holds 4", "malformed", "holds 16", commands=PT)
    c.write("pk_missing_storage.pt", torch_file(p_state_dict([("w", p_tensor("7", 4, [2, 2]))]), [("0", W_F32)]))
    c.case("pk_missing_storage", "pk_missing_storage.pt", "tensor refers to storage 7, which the archive lacks", "malformed", "not in the archive", commands=PT)
    c.write("pk_deflated.pt", torch_file(p_state_dict([("w", p_tensor("0", 4, [2, 2]))]), [("0", W_F32)], deflate=("data/0",)))
    c.case("pk_deflated", "pk_deflated.pt", "the storage entry is deflate-compressed (torch stores entries)", "unsupported", "compressed", commands=PT)
    c.write("pk_not_a_pickle_global.pt", torch_file(p_state_dict([("w", p_tensor("0", 4, [2, 2], storage="QInt8Storage"))]), [("0", W_F32)]))
    c.case("pk_not_a_pickle_global", "pk_not_a_pickle_global.pt", "a storage class outside the allow-list (torch.QInt8Storage)", "malformed", "refuses global 'torch.QInt8Storage'", commands=PT)
    c.write("pk_dcp_evil/.metadata", b"\x80\x04" + evil + b".")
    c.write("pk_dcp_evil/__0_0.distcp", b"")
    c.case("pk_dcp_evil", "pk_dcp_evil/", "a DCP folder whose .metadata pickle calls os.system", "malformed", "refuses global 'os.system'", commands=PT, out="out_model")

    # ----- sha256 sidecars -----------------------------------------------------------------------
    good = hashlib.sha256(VALID).hexdigest()
    c.write("sc_ok/model.safetensors", VALID)
    c.write("sc_ok/model.safetensors.sha256", ("%s  model.safetensors\n" % good).encode())
    c.case("sc_ok", "sc_ok/model.safetensors", "valid file with a matching sidecar", "ok")
    c.case(
        "sc_ok_direct",
        "sc_ok/model.safetensors.sha256",
        "verify given the sidecar itself (verify.rs accepts a .sha256 path)",
        "ok",
        commands=("verify",),
    )

    bad = hashlib.sha256(VALID + b"x").hexdigest()
    c.write("sc_mismatch/model.safetensors", VALID)
    c.write("sc_mismatch/model.safetensors.sha256", ("%s  model.safetensors\n" % bad).encode())
    c.case("sc_mismatch", "sc_mismatch/model.safetensors", "sidecar digest does not match", "integrity", bad[:16], commands=(), runs=[run("verify", "integrity", bad[:16]), run("inspect", "ok"), run("convert", "ok")])

    c.write("sc_malformed/model.safetensors", VALID)
    c.write("sc_malformed/model.safetensors.sha256", b"not-a-digest  model.safetensors\n")
    c.case("sc_malformed", "sc_malformed/model.safetensors", "sidecar line without 64 hex digits", "malformed", "line 1", names="model.safetensors.sha256", commands=(), runs=[run("verify", "malformed", "line 1"), run("inspect", "ok"), run("convert", "ok")])

    c.write("sc_listed_missing/model.safetensors", VALID)
    c.write("sc_listed_missing/model.safetensors.sha256", ("%s  model.safetensors\n%s  gone.safetensors\n" % (good, good)).encode())
    c.case("sc_listed_missing", "sc_listed_missing/model.safetensors", "sidecar lists a second file that does not exist", "integrity", "gone.safetensors", names="gone.safetensors", commands=(), runs=[run("verify", "integrity", "gone.safetensors"), run("inspect", "ok")])


def generate(root):
    files = os.path.join(root, "files")
    if os.path.isdir(files):
        shutil.rmtree(files)
    os.makedirs(files)
    c = Corpus(root)
    build(c)
    names = [x["name"] for x in c.cases]
    assert len(names) == len(set(names)), "duplicate case names"
    with open(os.path.join(root, "expected.json"), "w") as f:
        json.dump({"comment": "Generated by make.py; see its docstring. Paths are relative to tests/corpus.", "known_bugs": KNOWN_BUGS, "cases": c.cases}, f, indent=1)
        f.write("\n")
    return c.cases


def same_tree(a, b):
    cmp = filecmp.dircmp(a, b)
    if cmp.left_only or cmp.right_only or cmp.funny_files:
        return False
    _, mismatch, errors = filecmp.cmpfiles(a, b, cmp.common_files, shallow=False)
    if mismatch or errors:
        return False
    return all(same_tree(os.path.join(a, d), os.path.join(b, d)) for d in cmp.common_dirs)


def main():
    if sys.argv[1:] == ["--check"]:
        with tempfile.TemporaryDirectory() as t:
            generate(t)
            ok = same_tree(os.path.join(t, "files"), os.path.join(HERE, "files")) and filecmp.cmp(
                os.path.join(t, "expected.json"), os.path.join(HERE, "expected.json"), shallow=False
            )
        print("corpus up to date" if ok else "corpus differs from make.py: run python3 tests/corpus/make.py")
        sys.exit(0 if ok else 1)
    cases = generate(HERE)
    print("wrote %d cases to %s" % (len(cases), os.path.relpath(os.path.join(HERE, "files"))))


if __name__ == "__main__":
    main()
