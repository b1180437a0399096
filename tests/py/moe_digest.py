"""Independent implementation of the phasekit.moe/1 metadata digest (docs/moe-format.md §5).

Usage:
  moe_digest.py vectors FILE.json   check every vector, print "ok N"
  moe_digest.py file CHECKPOINT     print stored and recomputed digest of a checkpoint
Uses only the standard library (the header is read by hand, not with phasekit's code).
"""
import hashlib, json, struct, sys

DOMAIN = b"phasekit.moe/1 metadata digest\x00"
DIGEST_KEY = "phasekit.moe.digest"


def digest(metadata):
    items = sorted(((k.encode(), v.encode()) for k, v in metadata.items() if k != DIGEST_KEY), key=lambda kv: kv[0])
    h = hashlib.sha256(DOMAIN + struct.pack("<Q", len(items)))
    for k, v in items:
        h.update(struct.pack("<Q", len(k)) + k + struct.pack("<Q", len(v)) + v)
    return "sha256:" + h.hexdigest()


def header_metadata(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)).get("__metadata__", {})


if __name__ == "__main__":
    if sys.argv[1] == "vectors":
        vectors = json.load(open(sys.argv[2], encoding="utf-8"))
        for v in vectors:
            got = digest(v["metadata"])
            assert got == v["digest"], (v["name"], got, v["digest"])
        print("ok", len(vectors))
    else:
        md = header_metadata(sys.argv[2])
        print(md.get(DIGEST_KEY), digest(md))
