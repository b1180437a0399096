"""Shared fixtures: the phasekit CLI (the reference the package is compared with), the tiny model
fixtures of tests/fixtures, and routed checkpoints made from them by the CLI.

The CLI is found as $PHASEKIT_BIN, else target/release/phasekit or target/debug/phasekit of this
repository (`cargo build` makes it). Tests that need it, or torch / diffusers / safetensors, are
skipped with the reason when they are missing; CI (.ci/run) installs and builds all of them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures"
WAN = FIXTURES / "wan22_t2v_tiny" / "diffusers"
QWEN = FIXTURES / "qwen_image_tiny" / "diffusers"


def cli_path() -> Path | None:
    env = os.environ.get("PHASEKIT_BIN")
    if env:
        return Path(env)
    for profile in ("release", "debug"):
        p = REPO / "target" / profile / "phasekit"
        if p.is_file():
            return p
    return None


def has(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True


@pytest.fixture(scope="session")
def cli():
    """Run the phasekit CLI; returns a function(args) -> CompletedProcess (checked)."""
    path = cli_path()
    if path is None:
        pytest.skip("skipped: no phasekit CLI (cargo build, or set PHASEKIT_BIN)")

    def run(args: List[str], check: bool = True) -> subprocess.CompletedProcess:
        p = subprocess.run([str(path), *map(str, args)], capture_output=True, text=True)
        if check and p.returncode != 0:
            raise AssertionError(f"phasekit {' '.join(map(str, args))} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
        return p

    return run


def need(*modules: str) -> None:
    for m in modules:
        if not has(m):
            pytest.skip(f"skipped: python module {m} not installed")


def load(path: Path) -> Dict[str, np.ndarray]:
    """Every tensor of a safetensors file as numpy, by the reference reader (PyPI safetensors)."""
    need("safetensors")
    from safetensors.numpy import load_file

    return load_file(str(path))


def scaled_copy(src: Path, dst: Path, factor: float) -> Path:
    """A copy of a diffusers model folder with every weight times ``factor`` (a second teacher)."""
    need("safetensors")
    from safetensors.numpy import save_file

    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "config.json", dst / "config.json")
    t = load(src / "diffusion_pytorch_model.safetensors")
    save_file({k: (v * np.float32(factor)).astype(v.dtype) for k, v in t.items()}, str(dst / "diffusion_pytorch_model.safetensors"))
    return dst


def _two_full(cli, d: Path, dtype: str):
    low = scaled_copy(WAN, d / "low", 0.8)
    out = d / "two.safetensors"
    cli(
        [
            "assemble",
            "--expert", WAN, "--sigma-range", "0.875:1",
            "--expert", low, "--sigma-range", "0:0.875",
            "--steps", "4", "--shift", "5", "--dtype", dtype,
            "-o", out,
        ]
    )  # fmt: skip
    return out, WAN, low


@pytest.fixture(scope="session")
def two_full(cli, tmp_path_factory):
    """A routed checkpoint of two full Wan experts (the fixture, and it × 0.8) in bf16, split at
    σ = 0.875, 4 steps at shift 5: (checkpoint, high source, low source)."""
    return _two_full(cli, tmp_path_factory.mktemp("two_full"), "bf16")


@pytest.fixture(scope="session")
def two_full_f32(cli, tmp_path_factory):
    """:func:`two_full` in float32 (what numpy readers such as the docs' loader can read)."""
    return _two_full(cli, tmp_path_factory.mktemp("two_full_f32"), "f32")


def train_and_assemble(cli, d: Path, recipe_text: str, name: str) -> Dict[str, Path]:
    recipe = d / f"{name}.toml"
    recipe.write_text(recipe_text)
    run = d / "run"
    cli(["train", "--recipe", recipe, "--out", run, "--quiet", "--eval-samples", "0"])
    ck = d / f"{name}.safetensors"
    cli(["assemble", "--run", run, "-o", ck])
    return {"run": run, "checkpoint": ck, "embeddings": run / "embeddings.safetensors"}


def _absolute(text: str) -> str:
    return text.replace('"../tests/fixtures/', f'"{FIXTURES}/')


@pytest.fixture(scope="session")
def wan_run(cli, tmp_path_factory):
    """recipes/wan2.2-tiny-2phase.toml with two different teacher experts (the fixture as the
    high-noise model, it × 0.8 as the low-noise one): two LoRA experts on two bases
    (phasekit.moe/2), trained and assembled by the CLI."""
    d = tmp_path_factory.mktemp("wan_run")
    low = scaled_copy(WAN, d / "low_noise_model", 0.8)
    text = _absolute((REPO / "recipes" / "wan2.2-tiny-2phase.toml").read_text())
    lines = [
        f'experts = ["{WAN}", "{low}"]' if line.startswith("experts = ") else line for line in text.splitlines()
    ]
    return train_and_assemble(cli, d, "\n".join(lines) + "\n", "wan")


@pytest.fixture(scope="session")
def qwen_run(cli, tmp_path_factory):
    """recipes/qwen-image-tiny.toml, trained and assembled by the CLI (two LoRA experts, one base)."""
    d = tmp_path_factory.mktemp("qwen_run")
    return train_and_assemble(cli, d, _absolute((REPO / "recipes" / "qwen-image-tiny.toml").read_text()), "qwen")


@pytest.fixture(scope="session")
def toy_checkpoint(cli, tmp_path_factory):
    """The quickstart's Phased DMD recipe cut to seconds (small MLP, few updates), trained and
    assembled by the CLI: four full toy-MLP experts."""
    d = tmp_path_factory.mktemp("toy")
    text = (REPO / "recipes" / "toy-phased-4step-4phase.toml").read_text()
    for a, b in [
        ("width = 64", "width = 16"),
        ("steps = 1500", "steps = 40"),
        ("updates_per_phase = 500", "updates_per_phase = 4"),
        ("ttur = 5", "ttur = 1"),
        ("checkpoint_every = 100", "checkpoint_every = 4"),
        ("log_every = 10", "log_every = 2"),
    ]:
        text = text.replace(a, b)
    return train_and_assemble(cli, d, text, "toy")["checkpoint"]


def samples(cli, checkpoint: Path, cond: Path, out: Path, n: int, seed: int) -> np.ndarray:
    """`phasekit sample --moe`'s latents."""
    cli(["sample", "--moe", checkpoint, "--cond", cond, "--n", n, "--seed", seed, "--out", out, "--force"])
    return load(out)["samples"]


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def metadata(path: Path) -> Dict[str, str]:
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        return json.loads(f.read(n))["__metadata__"]
