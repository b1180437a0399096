"""phasekit for Python: routed few-step checkpoints in diffusers and your own code.

``phasekit.open(path)`` opens a routed checkpoint made by ``phasekit assemble`` (the
``phasekit.moe`` format: every expert, the σ routing table, hashes; ``docs/moe-format.md``)
through the phasekit library, lazily and without copying tensors::

    import phasekit
    ck = phasekit.open("student.safetensors")
    for e in ck.experts:
        print(e.name, e.kind, e.sigma_lo, e.sigma_hi, e.timesteps)
    e = ck.expert_for(0.9)                                # the routing: which expert serves σ = 0.9
    sd = ck.state_dict(e, framework="torch", layout="diffusers")

    from phasekit.diffusers import route                   # any WanPipeline, WanImageToVideoPipeline
    pipe = route(pipe, ck)                                 # or QwenImagePipeline now samples through ck

Also :func:`inspect`, :func:`convert` and :func:`verify` (the CLI commands as functions) and
:func:`noise` (the trainer's noise generator, to feed pipelines the noise ``phasekit sample``
starts from). Failures raise :class:`PhasekitError` subclasses, one per CLI exit code.
"""

from __future__ import annotations

from ._checkpoint import Checkpoint, Expert, open
from ._tools import convert, inspect, noise, verify
from .errors import (
    InconsistentError,
    IntegrityError,
    InternalError,
    IoError,
    LimitError,
    MalformedError,
    PhasekitError,
    TruncatedError,
    UnsupportedError,
    UsageError,
)
from . import _native

__version__: str = _native.version()

__all__ = [
    "open",
    "Checkpoint",
    "Expert",
    "inspect",
    "convert",
    "verify",
    "noise",
    "PhasekitError",
    "InternalError",
    "UsageError",
    "IoError",
    "TruncatedError",
    "MalformedError",
    "InconsistentError",
    "UnsupportedError",
    "IntegrityError",
    "LimitError",
]
