"""phasekit.open: experts, routing, metadata, verify and state dicts, each checked against an
independent reference: the PyPI safetensors reader, numpy float64 math, the CLI, the Python
digest of tests/py/moe_digest.py, and the docs' 20-line loader (docs/moe-format.md §8)."""

from __future__ import annotations

import hashlib
import json
import importlib.util
import math
import shutil
import struct
import subprocess
import sys

import numpy as np
import pytest

import phasekit
from conftest import REPO, WAN, load, metadata, need

DIGEST_PY = REPO / "tests" / "py" / "moe_digest.py"


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


# -- experts and routing -------------------------------------------------------------------------


def test_experts_and_routing(two_full):
    path, _, _ = two_full
    ck = phasekit.open(path)
    assert [e.name for e in ck.experts] == [ck.experts[0].name, ck.experts[1].name]
    hi, lo = ck.experts
    assert (hi.kind, lo.kind) == ("full", "full")
    assert (hi.sigma_lo, hi.sigma_hi, lo.sigma_lo, lo.sigma_hi) == (0.875, 1.0, 0.0, 0.875)
    # Wan2.2-Lightning's schedule: 4 steps at shift 5 → t = 1000, 937.5 | 833.3, 625.
    assert hi.timesteps == (1000.0, 937.5)
    assert lo.timesteps[1] == 625.0 and abs(lo.timesteps[0] - 833.3333333333334) < 1e-9
    assert (ck.steps, ck.shift, ck.solver, ck.guidance) == (4, 5.0, "euler", 1.0)
    assert ck.format == "phasekit.moe/1" and ck.family == "wan22" and ck.layout == "diffusers"
    # The routing rule: lo ≤ σ < hi, and σ = 1 to the expert ending at 1.
    for sigma, want in [(1.0, 0), (0.9, 0), (0.875, 0), (0.8749999, 1), (0.3, 1), (0.0, 1)]:
        assert ck.expert_for(sigma).index == want, sigma
        assert ck.experts[want].serves(sigma)
    assert ck.expert_for_timestep(937.5).index == 0
    with pytest.raises(phasekit.UsageError):
        ck.expert_for(1.5)
    assert ck.expert(lo.name) == lo and ck.expert(1) == lo and ck.expert(lo) == lo
    with pytest.raises(IndexError):
        ck.expert(2)
    with pytest.raises(KeyError):
        ck.expert("nope")


def test_metadata_and_digest_match_the_independent_implementation(two_full):
    path, _, _ = two_full
    ck = phasekit.open(path)
    md = metadata(path)
    assert ck.metadata == md
    spec = importlib.util.spec_from_file_location("moe_digest", DIGEST_PY)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert ck.digest == md["phasekit.moe.digest"] == mod.digest(md)
    assert ck.provenance["tool"].startswith("phasekit ")
    assert ck.model["config"]["num_layers"] == 2


# -- state dicts ---------------------------------------------------------------------------------


def test_full_expert_state_dict_numpy_and_torch(two_full):
    path, high, low = two_full
    ck = phasekit.open(path)
    for e, src in zip(ck.experts, (high, low)):
        ref = load(src / "diffusion_pytorch_model.safetensors")  # f32 sources, cast to bf16 by assemble
        sd = ck.state_dict(e)  # numpy: bf16 → float32 values
        assert sorted(sd) == sorted(ref)
        bits = ck.state_dict(e, dtype="raw")
        for k, v in ref.items():
            assert sd[k].dtype == np.float32 and sd[k].shape == v.shape
            # bf16 of the source, rounded to nearest even: within half a bf16 ulp (2^-9 relative).
            assert np.all(np.abs(sd[k] - v) <= np.abs(v) * 2.0**-8 + 1e-30), k
            assert bits[k].dtype == np.uint16
            assert np.array_equal(bf16_to_f32(bits[k]), sd[k]), k
    need("torch")
    import torch
    from safetensors.torch import load_file

    stored = load_file(str(path))
    for e in ck.experts:
        sd = ck.state_dict(e, framework="torch")
        where = dict(ck._native.expert_params(e.index))  # param → stored name (shared., experts.<i>., aliases)
        for k, t in sd.items():
            assert t.dtype == torch.bfloat16
            assert torch.equal(t, stored[where[k]]), k
        f32 = ck.state_dict(e, framework="torch", dtype="float32")
        assert all(t.dtype == torch.float32 for t in f32.values())


def test_views_are_zero_copy_and_private(two_full):
    path, _, _ = two_full
    ck = phasekit.open(path)
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    bits = ck.state_dict(0, dtype="raw")
    name = sorted(bits)[0]
    a = bits[name]
    # A view of the map, not a copy: its base is the Rust buffer, and it is writable.
    assert not a.flags.owndata and a.flags.writeable
    buf = a.base
    while not hasattr(buf, "mapped") and getattr(buf, "base", None) is not None:
        buf = buf.base
    assert buf.mapped is True
    old = a.flat[0]
    a.flat[0] = old ^ 0xFFFF
    # The write stays in this process: the file is unchanged, and a new state dict is not.
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before
    assert ck.state_dict(0, dtype="raw")[name].flat[0] == old
    ck.verify()
    need("torch")
    import torch

    t = ck.state_dict(0, framework="torch")[name]
    assert t.dtype == torch.bfloat16
    t.mul_(2)  # in place: allowed, private
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


def test_sharded_checkpoint_reads_like_one_file(two_full_f32, cli, tmp_path):
    path, high, low = two_full_f32
    out = tmp_path / "sharded.safetensors"
    cli(
        [
            "assemble",
            "--expert", high, "--sigma-range", "0.875:1",
            "--expert", low, "--sigma-range", "0:0.875",
            "--steps", "4", "--shift", "5", "--shard-size", "20KB", "-o", out,
        ]
    )  # fmt: skip
    index = tmp_path / "sharded.safetensors.index.json"
    assert index.is_file()
    one, many = phasekit.open(path), phasekit.open(index)
    assert len(many.files) > 2 and len(one.files) == 1
    assert many.routing == one.routing  # (the digests differ: the title is the file stem)
    for e in one.experts:
        a, b = one.state_dict(e), many.state_dict(e)
        assert sorted(a) == sorted(b)
        for k in a:
            assert np.array_equal(a[k], b[k]), k
    many.verify()


def test_layout_renames_match_convert(two_full, cli, tmp_path):
    path, high, _ = two_full
    ck = phasekit.open(path)
    sd = ck.state_dict(0, layout="original")
    out = tmp_path / "original.safetensors"
    cli(["convert", high, out, "--layout", "original", "--dtype", "bf16"])
    need("torch")
    from safetensors.torch import load_file

    ref = load_file(str(out))
    assert sorted(sd) == sorted(ref)
    for k, v in ref.items():
        assert np.array_equal(sd[k], v.float().numpy()), k
    assert "blocks.0.self_attn.q.weight" in sd
    # Round trip back to the stored names.
    assert sorted(ck.state_dict(0, layout="diffusers")) == sorted(ck.state_dict(0))
    with pytest.raises(phasekit.UsageError):
        ck.state_dict(0, layout="nope")
    with pytest.raises(phasekit.UsageError):
        ck.state_dict(0, framework="jax")


def test_lora_expert_merge_equals_float64_reference(wan_run):
    ck = phasekit.open(wan_run["checkpoint"])
    assert ck.format == "phasekit.moe/2"
    assert [e.kind for e in ck.experts] == ["lora", "lora"]
    assert [e.base for e in ck.experts] == [0, 1]
    for e in ck.experts:
        base = ck.base_state_dict(e)
        lora = ck.lora_state_dict(e)
        merged = ck.state_dict(e)
        assert sorted(merged) == sorted(base)
        targets = {k[: -len(".lora_down.weight")] for k in lora if k.endswith(".lora_down.weight")}
        assert targets
        for k, w in base.items():
            t = k[: -len(".weight")]
            if t in targets:
                down = lora[t + ".lora_down.weight"].astype(np.float64)
                up = lora[t + ".lora_up.weight"].astype(np.float64)
                alpha = float(lora[t + ".alpha"]) if t + ".alpha" in lora else down.shape[0]
                want = w.astype(np.float64) + alpha / down.shape[0] * (up @ down)
                err = np.abs(merged[k] - want).max() / max(np.abs(want).max(), 1e-30)
                assert err < 1e-6, (k, err)
            else:
                assert np.array_equal(merged[k], w), k
    # The two experts' bases are the two teacher experts (the second is the first × 0.8).
    b0, b1 = ck.base_state_dict(0), ck.base_state_dict(1)
    k = "blocks.0.attn1.to_q.weight"
    assert np.allclose(b1[k], b0[k] * np.float32(0.8), rtol=1e-6)


# -- sampling ------------------------------------------------------------------------------------


def test_sample_is_the_clis(toy_checkpoint, wan_run, cli, tmp_path):
    from conftest import samples

    ck = phasekit.open(toy_checkpoint)
    assert ck.model["kind"] == "toy-mlp" and len(ck.experts) == 4
    out = tmp_path / "toy.safetensors"
    cli(["sample", "--moe", toy_checkpoint, "--n", 300, "--seed", 3, "--out", out])
    x = ck.sample(300, seed=3)
    assert x.shape == (300, 2) and x.dtype == np.float32
    assert np.array_equal(x, load(out)["samples"]), "the same numbers as sample --moe"
    cli(["sample", "--moe", toy_checkpoint, "--n", 50, "--seed", 1, "--class", 1, "--steps", 6, "--out", out, "--force"])
    assert np.array_equal(ck.sample(50, seed=1, cls=1, steps=6), load(out)["samples"])
    ck = phasekit.open(wan_run["checkpoint"])
    ref = samples(cli, wan_run["checkpoint"], wan_run["embeddings"], tmp_path / "w.safetensors", 3, 5)
    z = ck.sample(3, cond=wan_run["embeddings"], seed=5)
    assert np.array_equal(z, ref)
    with pytest.raises(phasekit.UsageError, match="cond"):
        ck.sample(3)
    with pytest.raises(phasekit.UsageError):
        phasekit.open(toy_checkpoint).sample(3, cls=9)


# -- verify and errors ---------------------------------------------------------------------------


def test_verify_and_integrity_error(two_full, tmp_path):
    path, _, _ = two_full
    report = phasekit.open(path).verify()
    assert report["ok"] and report["tensors_checked"] > 0
    bad = tmp_path / "bad.safetensors"
    shutil.copy(path, bad)
    data = bytearray(bad.read_bytes())
    data[-3] ^= 0x40  # a tensor byte
    bad.write_bytes(bytes(data))
    ck = phasekit.open(bad)  # opening does not hash
    with pytest.raises(phasekit.IntegrityError) as e:
        ck.verify()
    assert e.value.exit_code == 8 and e.value.kind == "integrity" and e.value.path == str(bad)
    assert isinstance(e.value, phasekit.PhasekitError)
    assert not ck.verify(check=False)["ok"]
    with pytest.raises(phasekit.IntegrityError):
        phasekit.verify(bad)
    assert phasekit.verify(bad, check=False)["ok"] is False
    assert phasekit.verify(path)["ok"] is True


def test_errors_name_the_file_and_kind(tmp_path):
    missing = tmp_path / "missing.safetensors"
    with pytest.raises(phasekit.IoError) as e:
        phasekit.open(missing)
    assert isinstance(e.value, OSError) and e.value.exit_code == 3 and e.value.path == str(missing)
    assert str(e.value).startswith(str(missing) + ": ")
    trunc = tmp_path / "trunc.safetensors"
    trunc.write_bytes(struct.pack("<Q", 1000) + b"{}")
    with pytest.raises(phasekit.TruncatedError) as e:
        phasekit.open(trunc)
    assert e.value.exit_code == 4
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    with pytest.raises(phasekit.MalformedError) as e:
        phasekit.open(junk)
    assert e.value.exit_code == 5
    # A safetensors file that is no routed checkpoint: exit 7, as `phasekit sample --moe` says.
    with pytest.raises(phasekit.UnsupportedError, match="not a phasekit MoE checkpoint") as e:
        phasekit.open(WAN / "diffusion_pytorch_model.safetensors")
    assert e.value.exit_code == 7
    with pytest.raises(phasekit.UsageError) as e:
        phasekit.convert(WAN, tmp_path / "x.safetensors", dtype="int3")
    assert isinstance(e.value, ValueError) and e.value.exit_code == 2


def test_exception_classes_match_the_cli_exit_codes():
    from phasekit import _native, errors

    native = dict(_native.kinds())
    assert native == {c.kind: c.exit_code for c in errors._BY_KIND.values()}
    assert sorted(native.values()) == list(range(1, 10))


def test_the_cli_and_the_package_raise_the_same_kind(cli, tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    p = cli(["inspect", junk], check=False)
    with pytest.raises(phasekit.PhasekitError) as e:
        phasekit.inspect(junk)
    assert p.returncode == e.value.exit_code == 5


# -- functions -----------------------------------------------------------------------------------


def test_inspect_and_convert(tmp_path, cli):
    r = phasekit.inspect(WAN)
    assert len(r) == 1 and r[0]["detection"]["family"] == "wan22"
    assert r == [json.loads(cli(["inspect", WAN, "--json"]).stdout)], "the same report as the CLI's"
    out = tmp_path / "comfy.safetensors"
    rep = phasekit.convert(WAN, out, layout="comfy", dtype="bf16", sha256=True)
    assert rep["tensors"] > 0 and out.is_file() and (tmp_path / "comfy.safetensors.sha256").is_file()
    cli(["verify", out])
    with pytest.raises(phasekit.UsageError):
        phasekit.convert(WAN, out, layout="comfy")  # exists, no force
    phasekit.convert(WAN, out, layout="comfy", force=True)


# -- noise ---------------------------------------------------------------------------------------


def _splitmix_normals(seed: int, n: int) -> np.ndarray:
    """phasekit's Rng (src/train/mod.rs) re-implemented: SplitMix64, Box–Muller, one value per call."""
    m = (1 << 64) - 1
    state = seed ^ 0x5851F42D4C957F2D

    def next_u64() -> int:
        nonlocal state
        state = (state + 0x9E3779B97F4A7C15) & m
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        return z ^ (z >> 31)

    out = []
    for _ in range(n):
        u1 = 1.0 - (next_u64() >> 11) * 2.0**-53
        u2 = (next_u64() >> 11) * 2.0**-53
        out.append(math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2))
    return np.array(out, dtype=np.float32)


def test_noise_is_the_trainers_generator():
    x = phasekit.noise(5, (3, 4, 1, 4, 4))
    assert x.shape == (3, 4, 1, 4, 4) and x.dtype == np.float32
    ref = _splitmix_normals(5, x.size).reshape(x.shape)
    assert np.array_equal(x, ref)
    assert not np.array_equal(phasekit.noise(6, (8,)), phasekit.noise(5, (8,)))
    with pytest.raises(phasekit.UsageError):
        phasekit.noise(-1, (2,))


# -- the docs' loader (docs/moe-format.md §8) stays, and agrees with the package ------------------


def _docs_loader(tmp_path):
    doc = (REPO / "docs" / "moe-format.md").read_text()
    block = doc.split("<!-- loader:begin -->")[1].split("<!-- loader:end -->")[0]
    code = block.split("```python")[1].split("```")[0]
    script = tmp_path / "loader.py"
    script.write_text(code)
    spec = importlib.util.spec_from_file_location("docs_loader", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod, script


def test_docs_loader_agrees_with_the_package(two_full_f32, wan_run, tmp_path):
    need("safetensors")
    mod, script = _docs_loader(tmp_path)
    for path in (two_full_f32[0], wan_run["checkpoint"]):
        ck = phasekit.open(path)
        for sigma in (1.0, 0.9, 0.875, 0.5, 0.0):
            i, e, weights, base = mod.load_moe(str(path), sigma)
            want = ck.expert_for(sigma)
            assert i == want.index and e["name"] == want.name
            ours = ck.lora_state_dict(want, dtype="raw") if want.is_lora else ck.state_dict(want, dtype="raw")
            assert sorted(weights) == sorted(ours)
            for k, v in weights.items():
                assert v.tobytes() == ours[k].tobytes(), k
            assert base == ("base." if not want.is_lora or not want.base else f"bases.{want.base}.")
        # The script runs as a program too, as the docs show.
        p = subprocess.run([sys.executable, str(script), str(path), "0.3"], capture_output=True, text=True)
        assert p.returncode == 0, p.stderr
        assert p.stdout.split()[0] == str(ck.expert_for(0.3).index)
