"""Routed checkpoints: experts, the σ routing, metadata, verification and state dicts."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

from . import _native
from .errors import _from_native

PathLike = Union[str, "os.PathLike[str]"]

#: Frameworks :meth:`Checkpoint.state_dict` returns tensors for.
FRAMEWORKS = ("numpy", "torch")
#: Layouts tensor names can be renamed to.
LAYOUTS = ("original", "diffusers", "comfy")

# numpy dtype names for the ``dtype=`` argument.
_NP_DTYPES = {"float32": "float32", "float16": "float16", "float64": "float64"}
# torch dtypes by safetensors name, for raw bits that numpy cannot type.
_TORCH_RAW = {
    "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2",
    "F8_E4M3FNUZ": "float8_e4m3fnuz",
    "F8_E5M2FNUZ": "float8_e5m2fnuz",
    "F8_E8M0": "float8_e8m0fnu",
}


def _usage(message: str) -> Exception:
    return _from_native("usage", message)


@dataclass(frozen=True)
class Expert:
    """One row of the routing table: the expert that serves ``sigma_lo ≤ σ < sigma_hi``.

    σ is the noise level the denoiser is called with (after the sampler's shift), in [0, 1];
    the expert whose ``sigma_hi`` is 1 also serves σ = 1.
    """

    #: Position in the routing table (``experts.<index>.`` in the file).
    index: int
    #: Unique name (``high_noise``, ``low_noise``, ``e2``, ...).
    name: str
    #: ``"full"`` (its own weights) or ``"lora"`` (kohya LoRA over a base).
    kind: str
    sigma_lo: float
    sigma_hi: float
    #: The sampler timesteps (t = σ·T) this expert serves, in sampling order.
    timesteps: Tuple[float, ...]
    #: For a LoRA expert, the base it applies to: 0 is ``base.``, j is ``bases.<j>.``; None for full experts.
    base: Optional[int]
    #: The CFG scale of this expert's steps, when it has its own.
    guidance: Optional[float]

    @property
    def is_lora(self) -> bool:
        return self.kind == "lora"

    def serves(self, sigma: float) -> bool:
        """Whether this expert's range holds ``sigma``."""
        return self.sigma_lo <= sigma < self.sigma_hi or (sigma == 1.0 and self.sigma_hi == 1.0)


ExpertRef = Union[Expert, int, str]


class Checkpoint:
    """A routed checkpoint opened through the phasekit library (see :func:`open`).

    Nothing is read until a tensor is asked for; tensors are views of a private memory map of
    the file (writable, and writes never reach the file).
    """

    def __init__(self, path: PathLike) -> None:
        self._native = _native.Moe(os.fspath(path))
        r = json.loads(self._native.routing_json)
        #: The routing table as stored (``phasekit.moe.routing``, docs/moe-format.md §4).
        self.routing: Dict[str, Any] = r
        #: ``phasekit.moe.model``: family, variant, layout, config (and kind for toy models).
        self.model: Dict[str, Any] = json.loads(self._native.model_json)
        #: ``phasekit.moe.provenance``: tool, teacher digests, recipe digest, sources.
        self.provenance: Dict[str, Any] = json.loads(self._native.provenance_json)
        self.experts: List[Expert] = [
            Expert(
                index=i,
                name=e["name"],
                kind=e["kind"],
                sigma_lo=float(e["sigma_lo"]),
                sigma_hi=float(e["sigma_hi"]),
                timesteps=tuple(float(t) for t in e["timesteps"]),
                base=self._native.base_index(i),
                guidance=e.get("guidance"),
            )
            for i, e in enumerate(r["experts"])
        ]

    # -- what the file says ------------------------------------------------------------------

    @property
    def path(self) -> str:
        return self._native.path

    @property
    def files(self) -> List[str]:
        """The file, or the shards of a sharded checkpoint, in order."""
        return list(self._native.files)

    @property
    def metadata(self) -> Dict[str, str]:
        """The safetensors ``__metadata__`` (string → string)."""
        return dict(self._native.metadata)

    @property
    def format(self) -> str:
        """The format tag, ``phasekit.moe/1`` or ``phasekit.moe/2`` (per-expert bases)."""
        return self._native.format_tag

    @property
    def digest(self) -> str:
        """``phasekit.moe.digest``: ``sha256:<hex>`` over the metadata (and so every tensor hash)."""
        return self._native.digest

    @property
    def layout(self) -> Optional[str]:
        """The layout the tensor names are in (``original``, ``diffusers``), or None."""
        return self._native.layout

    @property
    def family(self) -> Optional[str]:
        """``wan22``, ``qwen_image``, or None (toy and unknown models)."""
        return self.model.get("family")

    @property
    def shift(self) -> float:
        """The sampler's flow-matching shift s: σ' = s·σ / (1 + (s−1)·σ)."""
        return float(self.routing["shift"])

    @property
    def steps(self) -> int:
        """The number of sampling steps the experts were distilled for."""
        return int(self.routing["steps"])

    @property
    def solver(self) -> str:
        """The sampler the experts were distilled for (``euler``)."""
        return str(self.routing["solver"])

    @property
    def guidance(self) -> float:
        """The CFG scale to sample with (1: no CFG, as distilled students are sampled)."""
        return float(self.routing["guidance"])

    @property
    def num_train_timesteps(self) -> float:
        """T in t = σ·T (1000 for Wan2.2 and Qwen-Image)."""
        return float(self.routing["num_train_timesteps"])

    @property
    def sigmas(self) -> List[float]:
        """The σ of each sampling step (shifted), in sampling order."""
        return [float(s) for s in self.routing["sigmas"]]

    @property
    def latent(self) -> Optional[Tuple[int, int, int]]:
        """``phasekit.moe.sample``: the latent (frames, height, width) the experts were trained at."""
        v = self.metadata.get("phasekit.moe.sample")
        if v is None:
            return None
        f, h, w = json.loads(v)["latent"]
        return int(f), int(h), int(w)

    def __repr__(self) -> str:
        ex = ", ".join(f"{e.name} [{e.sigma_lo:.10g}, {e.sigma_hi:.10g}) {e.kind}" for e in self.experts)
        return f"<phasekit.Checkpoint {self.path!r} {self.format} {self.family or self.model.get('kind')}: {ex}>"

    # -- routing -------------------------------------------------------------------------------

    def expert(self, ref: ExpertRef) -> Expert:
        """An expert by :class:`Expert`, index or name."""
        if isinstance(ref, Expert):
            if ref.index >= len(self.experts) or self.experts[ref.index] != ref:
                raise _usage(f"expert {ref.name!r} is not one of this checkpoint's")
            return ref
        if isinstance(ref, bool) or not isinstance(ref, (int, str)):
            raise TypeError(f"an expert is an Expert, an index or a name, not {type(ref).__name__}")
        if isinstance(ref, int):
            if not 0 <= ref < len(self.experts):
                raise IndexError(f"expert {ref} out of range: the checkpoint has {len(self.experts)} experts")
            return self.experts[ref]
        for e in self.experts:
            if e.name == ref:
                return e
        raise KeyError(f"no expert named {ref!r} (experts: {', '.join(e.name for e in self.experts)})")

    def expert_for(self, sigma: float) -> Expert:
        """The expert whose σ range holds ``sigma`` (in [0, 1]): the routing."""
        i = self._native.expert_for_sigma(float(sigma))
        if i is None:
            raise _usage(f"σ = {sigma} is outside [0, 1]")
        return self.experts[i]

    def expert_for_timestep(self, t: float) -> Expert:
        """The expert serving timestep ``t`` = σ·T."""
        return self.expert_for(float(t) / self.num_train_timesteps)

    # -- sampling ------------------------------------------------------------------------------

    def sample(
        self,
        n: int,
        *,
        steps: Optional[int] = None,
        seed: int = 0,
        cls: Optional[int] = None,
        cond: Optional[PathLike] = None,
        cond_seed: int = 0,
        latent: Optional[Tuple[int, int, int]] = None,
    ) -> Any:
        """``n`` samples through the routing, as ``phasekit sample --moe`` (the same numbers for
        the same arguments), as a float32 numpy array. Euler from the noise of ``seed`` over the
        checkpoint's σ grid (or ``steps`` steps at its shift), each step by the expert whose σ
        range holds its σ; computed by the phasekit library on the CPU.

        Toy checkpoints (the quickstart's) give points ``[n, d]``; ``cls`` fixes the class. Wan2.2
        and Qwen-Image checkpoints give latents (``[n, C, F, H, W]``; Qwen packed ``[n, S, 4C]``)
        and need ``cond``, prompt embeddings: a safetensors file with ``prompt_embeds`` [N, L, C]
        (sample i takes prompt i mod N) or ``"random:N"`` (drawn from ``cond_seed``); ``latent``
        (frames, height, width) defaults to the checkpoint's :attr:`latent`. For diffusers
        pipelines use :func:`phasekit.diffusers.route` instead.
        """
        import numpy as np

        buf = _native.sample(
            self.path,
            int(n),
            steps=steps,
            seed=int(seed),
            class_=cls,
            cond=None if cond is None else os.fspath(cond),
            cond_seed=int(cond_seed),
            latent=None if latent is None else (int(latent[0]), int(latent[1]), int(latent[2])),
        )
        return np.asarray(buf)

    # -- integrity -----------------------------------------------------------------------------

    def verify(self, check: bool = True) -> Dict[str, Any]:
        """Recompute every tensor's sha256 and the metadata digest, and check the structure and
        routing (``phasekit verify``). Returns the report; with ``check=True`` a failure raises
        the exception of its kind (:class:`~phasekit.IntegrityError` for a hash that differs)."""
        report, kind, first = self._native.verify()
        if kind is not None and check:
            raise _from_native(kind, first or "verification failed", self.path)
        return json.loads(report)

    # -- tensors -------------------------------------------------------------------------------

    def state_dict(
        self,
        expert: ExpertRef,
        framework: str = "numpy",
        layout: Optional[str] = None,
        dtype: Optional[str] = None,
    ) -> Dict[str, Any]:
        """Expert ``expert``'s full weights, name → array (numpy) or tensor (torch).

        A full expert's tensors are views of the memory map (no copy). A LoRA expert's weights
        are its base's with the LoRA merged in, W + (alpha/rank)·up·down computed in float32 (those
        tensors are new; the others are views); use :meth:`lora_state_dict` and
        :meth:`base_state_dict` to keep the two apart.

        ``layout=None`` keeps the names the experts were assembled from (:attr:`layout`);
        ``"diffusers"``, ``"comfy"`` or ``"original"`` renames them by the family's rules.

        ``dtype=None`` keeps each tensor's stored type where the framework has it: torch has every
        float type (bf16 and fp8 as views); numpy has no bf16 or fp8, so those come as float32
        copies (``dtype="raw"`` gives their bits as uint16/uint8 views instead). A merged LoRA
        weight takes its base weight's type. ``dtype="float32"``, ``"float16"``, ``"bfloat16"``
        (torch) or ``"float64"`` converts every float tensor (a copy unless it already is).
        """
        e = self.expert(expert)
        if not e.is_lora:
            return self._tensors(self._native.expert_params(e.index), framework, layout, dtype)
        base = self._native.base_params(e.index)
        merged = set(self._native.lora_targets(e.index))
        out = self._tensors([(p, s) for p, s in base if p not in merged], framework, layout, dtype)
        for p, s in base:
            if p not in merged:
                continue
            stored, _ = self._native.tensor_info(s)
            buf = self._native.merged_f32(e.index, p)
            out[self._rename(p, layout)] = self._convert(buf, framework, dtype, like=stored)
        return {k: out[k] for k in sorted(out)}

    def lora_state_dict(
        self,
        expert: ExpertRef,
        framework: str = "numpy",
        layout: Optional[str] = None,
        dtype: Optional[str] = None,
    ) -> Dict[str, Any]:
        """A LoRA expert's own tensors, kohya names: ``<target>.lora_down.weight`` [r, in],
        ``<target>.lora_up.weight`` [out, r] and ``<target>.alpha`` (delta = alpha/r·up·down);
        ``layout`` renames the targets. Views of the map. A full expert has none (an error)."""
        e = self.expert(expert)
        if not e.is_lora:
            raise _usage(f"expert {e.name!r} holds full weights, not a LoRA: use state_dict()")
        return self._tensors(self._native.expert_params(e.index), framework, layout, dtype)

    def base_state_dict(
        self,
        expert: ExpertRef,
        framework: str = "numpy",
        layout: Optional[str] = None,
        dtype: Optional[str] = None,
    ) -> Dict[str, Any]:
        """The weights of the base a LoRA expert applies to (``base.`` or ``bases.<j>.``), views
        of the map. A full expert has no base (an error)."""
        e = self.expert(expert)
        if not e.is_lora:
            raise _usage(f"expert {e.name!r} holds full weights and has no base: use state_dict()")
        return self._tensors(self._native.base_params(e.index), framework, layout, dtype)

    def tensor_names(self, expert: ExpertRef) -> List[str]:
        """The names :meth:`state_dict` returns for ``expert`` (stored layout), without reading."""
        e = self.expert(expert)
        pairs = self._native.base_params(e.index) if e.is_lora else self._native.expert_params(e.index)
        return [p for p, _ in pairs]

    def __iter__(self) -> Iterator[Expert]:
        return iter(self.experts)

    def __len__(self) -> int:
        return len(self.experts)

    # -- helpers -------------------------------------------------------------------------------

    def _rename(self, name: str, layout: Optional[str]) -> str:
        if layout is None:
            return name
        return self._native.rename(name, layout)

    def _tensors(
        self, pairs: List[Tuple[str, str]], framework: str, layout: Optional[str], dtype: Optional[str]
    ) -> Dict[str, Any]:
        if framework not in FRAMEWORKS:
            raise _usage(f"framework {framework!r}: expected 'numpy' or 'torch'")
        if layout is not None and layout not in LAYOUTS:
            raise _usage(f"layout {layout!r}: expected None, 'original', 'diffusers' or 'comfy'")
        m = self._native.mapping()
        out = {}
        for param, stored in pairs:
            buf = m.view(stored)
            if framework == "numpy" and buf.raw and buf.dtype in _TORCH_RAW and dtype != "raw":
                buf = self._native.decode_f32(stored)  # numpy has no bf16 / fp8: float32 values
            out[self._rename(param, layout)] = self._convert(buf, framework, dtype)
        return out

    def _convert(self, buf: Any, framework: str, dtype: Optional[str], like: Optional[str] = None) -> Any:
        """A buffer as an array or tensor of ``dtype``; ``like``: the stored dtype a decoded
        float32 buffer stands for (merged LoRA weights keep their base's type)."""
        import numpy as np

        if dtype is not None and dtype not in ("raw", "float32", "float16", "bfloat16", "float64"):
            raise _usage(f"dtype {dtype!r}: expected None, 'raw', 'float32', 'float16', 'bfloat16' or 'float64'")
        arr = np.asarray(buf)
        if framework == "numpy":
            if dtype == "bfloat16":
                raise _usage("numpy has no bfloat16: use framework='torch', dtype='float32' or dtype='raw'")
            if dtype == "raw":
                return arr
            if buf.raw and dtype is not None:
                raise _usage(f"dtype {dtype!r}: numpy cannot convert {buf.dtype}; use dtype='raw' or framework='torch'")
            if like is not None and dtype is None and like in ("F16", "F64"):
                arr = arr.astype(np.float16 if like == "F16" else np.float64)
            if dtype is not None and arr.dtype.kind == "f":
                arr = arr.astype(_NP_DTYPES[dtype], copy=False)
            return arr
        import torch

        t = torch.from_numpy(arr)
        if buf.raw and buf.dtype in _TORCH_RAW:
            t = t.view(getattr(torch, _TORCH_RAW[buf.dtype]))
        if like is not None and dtype is None:
            stored = _torch_dtype(torch, like)
            if stored is not None:
                t = t.to(stored)
        if dtype is not None and dtype != "raw" and t.is_floating_point():
            t = t.to(getattr(torch, dtype))
        return t


def _torch_dtype(torch: Any, name: str) -> Any:
    table = {"F32": "float32", "F16": "float16", "F64": "float64", **_TORCH_RAW}
    return getattr(torch, table[name], None) if name in table else None


def open(path: PathLike) -> Checkpoint:  # noqa: A001 - the package's entry point is phasekit.open
    """Open a routed checkpoint made by ``phasekit assemble`` (one file, or the index of a
    sharded set). Validates the safetensors structure and the ``phasekit.moe`` metadata; tensor
    hashes are checked by :meth:`Checkpoint.verify`, not here."""
    return Checkpoint(path)
