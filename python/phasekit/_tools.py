"""The CLI's ``inspect``, ``convert`` and ``verify`` as functions, and the trainer's noise."""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Union

from . import _native
from .errors import _from_native

PathLike = Union[str, "os.PathLike[str]"]


def inspect(path: PathLike) -> List[Dict[str, Any]]:
    """Describe the checkpoint(s) at ``path`` from their headers alone, as ``phasekit inspect --json``.

    ``path`` may be a ``.safetensors`` file, a sharded folder or its index, a diffusers model
    folder, a Wan2.2 repo folder (one report per model in it) or a ``.gguf`` file. Each report is
    the object ``phasekit inspect --json`` prints for that model: ``format``, ``detection``
    (family, variant, layout, config), parameters, dtypes, files, metadata (and ``moe`` for a
    routed checkpoint); docs/cli.md describes the fields.
    """
    return json.loads(_native.inspect(os.fspath(path)))


def verify(path: PathLike, check: bool = True) -> Dict[str, Any]:
    """Check ``path`` as ``phasekit verify`` does; returns the report (``ok``, ``checks``).

    With ``check=True`` (the default) a failed check raises the exception of its kind
    (:class:`~phasekit.IntegrityError` for a hash that does not match, ...), as the CLI exits
    with that kind's code; with ``check=False`` the report is returned either way.
    """
    report, fail = _native.verify(os.fspath(path))
    if fail is not None and check:
        kind, message = fail
        raise _from_native(kind, message, os.fspath(path))
    return json.loads(report)


def convert(
    input: PathLike,
    output: PathLike,
    *,
    layout: Optional[str] = None,
    dtype: str = "keep",
    format: Optional[str] = None,
    quant: Optional[str] = None,
    shard_size: Optional[str] = None,
    sha256: bool = False,
    force: bool = False,
    keep_metadata: bool = True,
) -> Dict[str, Any]:
    """Convert a checkpoint between layouts, dtypes and formats, as ``phasekit convert``.

    ``layout``: ``"original"``, ``"diffusers"`` or ``"comfy"`` (default: keep). ``dtype``:
    ``"keep"``, ``"bf16"``, ``"f16"``, ``"f32"``, ``"fp8-e4m3"``, ``"fp8-e5m2"``. ``format``:
    ``"safetensors"`` or ``"gguf"`` (default: from the output's extension), with ``quant``
    (``"Q8_0"``, ``"Q4_K"``, ...) for GGUF. ``shard_size`` such as ``"5GB"``. The output
    appears only when complete; returns the report (tensors, bytes, seconds, notes).
    """
    return json.loads(
        _native.convert(
            os.fspath(input),
            os.fspath(output),
            layout=layout,
            dtype=dtype,
            format=format,
            quant=quant,
            shard_size=shard_size,
            sha256=sha256,
            force=force,
            keep_metadata=keep_metadata,
        )
    )


def noise(seed: int, shape: Sequence[int]) -> Any:
    """The standard-normal noise phasekit's sampler starts from, as a float32 numpy array.

    ``phasekit sample --seed S --n N`` starts from ``noise(S, (N, *item))`` where ``item`` is one
    sample's latent shape (Wan2.2: ``(C, F, H, W)``; Qwen-Image, packed: ``(F·H/2·W/2, 4·C)``),
    so a pipeline fed these latents starts from the same numbers.
    """
    import numpy as np

    shape = tuple(int(d) for d in shape)
    if any(d < 0 for d in shape) or seed < 0:
        raise _from_native("usage", f"noise: seed and shape must be non-negative, got {seed}, {shape}")
    return np.asarray(_native.noise(int(seed), math.prod(shape))).reshape(shape)
