"""Sample with diffusers pipelines through a routed phasekit checkpoint.

One call makes a ``WanPipeline``, ``WanImageToVideoPipeline`` or ``QwenImagePipeline`` sample
through a checkpoint made by ``phasekit assemble``::

    from diffusers import WanPipeline
    import phasekit
    from phasekit.diffusers import route

    pipe = WanPipeline.from_pretrained("Wan-AI/Wan2.2-T2V-A14B-Diffusers")
    route(pipe, "wan-4step.safetensors")
    video = pipe(prompt="...", num_frames=81).frames[0]     # 4 steps, shift 5, CFG 1

What :func:`route` does to the pipeline:

* **Scheduler.** A ``FlowMatchEulerDiscreteScheduler`` with the checkpoint's ``shift`` (no
  dynamic shifting) replaces the pipeline's, and it always lays out the checkpoint's σ grid —
  ``linspace(1, 0, steps + 1)`` shifted, then 0 — for the checkpoint's ``steps`` (or the
  ``steps=`` given to :func:`route`), whatever ``num_inference_steps`` the pipeline is called
  with (a warning says so when they differ). The solver must be ``euler``.
* **Routing.** A forward pre-hook on the transformer(s) reads each call's timestep, finds the
  step of the σ grid it belongs to and makes the transformer run the expert whose σ range holds
  that step's σ (``Checkpoint.expert_for``), before the call. Calls of one step (CFG's two) run
  the same expert.
* **Experts.** A full expert is a weight swap: its tensors are copied into the transformer's
  parameters when it becomes active (and only then). A LoRA expert is, with ``lora="adapter"``
  (the default when ``peft`` is installed), a PEFT adapter loaded once (``load_lora_adapter``,
  up scaled by alpha/rank) and activated with ``set_adapters`` over its base's weights (copied in
  when another base was active); with ``lora="merge"``, a weight swap of base + LoRA merged in
  float32.
* **Wan2.2 A14B** pipelines that have ``transformer_2``: a checkpoint of two experts split at σ =
  b (Wan-style) keeps the high-noise expert on ``transformer`` and the low-noise one on
  ``transformer_2`` with ``boundary_ratio = b``, so each is loaded once. Any other checkpoint
  runs on ``transformer`` alone (``boundary_ratio = None``).

The tensors are read from the checkpoint's memory map; nothing is loaded until a step needs
it. ``pipe.phasekit_router`` is the :class:`Router` (its ``history`` lists which expert ran
each call).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Dict, List, Optional, Tuple, Union

from ._checkpoint import Checkpoint, Expert
from ._checkpoint import open as _open
from .errors import _from_native

__all__ = ["route", "Router", "PIPELINES"]

#: Pipeline classes :func:`route` accepts, and the model family each samples.
PIPELINES: Dict[str, str] = {
    "WanPipeline": "wan22",
    "WanImageToVideoPipeline": "wan22",
    "QwenImagePipeline": "qwen_image",
}


def _err(kind: str, message: str, path: Optional[str] = None) -> Exception:
    return _from_native(kind, message, path)


def _pipeline_family(pipe: Any) -> Tuple[str, str]:
    for cls in type(pipe).__mro__:
        if cls.__name__ in PIPELINES:
            return cls.__name__, PIPELINES[cls.__name__]
    names = ", ".join(PIPELINES)
    raise _err("unsupported", f"{type(pipe).__name__} is not a pipeline phasekit routes ({names})")


def _peft_available() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def route(
    pipe: Any,
    checkpoint: Union[Checkpoint, str, "os.PathLike[str]"],
    *,
    lora: str = "auto",
    steps: Optional[int] = None,
) -> Any:
    """Make ``pipe`` sample through ``checkpoint``; returns ``pipe`` (changed in place).

    ``checkpoint``: a :class:`~phasekit.Checkpoint` or a path. ``lora``: ``"adapter"`` (PEFT
    adapters, needs ``peft``), ``"merge"`` (weight swaps of base + LoRA) or ``"auto"`` (adapters
    when ``peft`` is installed). ``steps``: sample in this many steps instead of the
    checkpoint's (each step still runs the expert whose range holds its σ).

    Raises :class:`~phasekit.UnsupportedError` for another pipeline, a checkpoint of another
    model family or a solver diffusers has no scheduler for.
    """
    ck = checkpoint if isinstance(checkpoint, Checkpoint) else _open(checkpoint)
    router = Router(pipe, ck, lora=lora, steps=steps)
    router.install()
    return pipe


class _Slot:
    """A transformer module of the pipeline and what it holds now."""

    def __init__(self, name: str, module: Any) -> None:
        self.name = name
        self.module = module
        #: ("base", j), ("expert", i) or None: whose weights are in the module's parameters.
        self.weights: Optional[Tuple[str, int]] = None
        #: Adapter names loaded into the module, and the active one (None: adapters off).
        self.adapters: Dict[str, int] = {}
        self.active: Optional[str] = None
        self.handle: Any = None


class Router:
    """Routes each transformer call of a pipeline to the checkpoint's expert for its σ."""

    def __init__(self, pipe: Any, ck: Checkpoint, *, lora: str = "auto", steps: Optional[int] = None) -> None:
        self.pipe = pipe
        self.ck = ck
        self.pipeline, family = _pipeline_family(pipe)
        if ck.family != family:
            raise _err(
                "unsupported",
                f"{self.pipeline} samples {family} models; the checkpoint holds {ck.family or ck.model.get('kind') or 'an unknown model'}",
                ck.path,
            )
        if ck.solver != "euler":
            raise _err("unsupported", f"solver {ck.solver!r}: diffusers routing supports the euler solver", ck.path)
        if lora not in ("auto", "adapter", "merge"):
            raise _err("usage", f"lora={lora!r}: expected 'auto', 'adapter' or 'merge'")
        if lora == "adapter" and not _peft_available():
            raise _err("unsupported", "lora='adapter' needs the peft package (pip install peft), or use lora='merge'")
        self.lora = ("adapter" if _peft_available() else "merge") if lora == "auto" else lora
        if steps is not None and (not isinstance(steps, int) or steps < 1):
            raise _err("usage", f"steps={steps!r}: a positive number of sampling steps")
        self.steps: int = steps or ck.steps
        # The model's timestep input: Wan pipelines pass t = σ·T, Qwen-Image's pass σ.
        self.timestep_scale: float = ck.num_train_timesteps if family == "wan22" else 1.0
        self.sigmas: List[float] = schedule(self.steps, ck.shift)
        #: One entry per transformer call: (step, σ of the step, expert index, slot name).
        self.history: List[Tuple[int, float, int, str]] = []
        self.slots: List[_Slot] = []
        self._warned = False

    # -- installation ------------------------------------------------------------------------

    def install(self) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        pipe, ck = self.pipe, self.ck
        sched = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=int(round(ck.num_train_timesteps)), shift=ck.shift, use_dynamic_shifting=False
        )
        original = FlowMatchEulerDiscreteScheduler.set_timesteps
        router = self

        def set_timesteps(
            num_inference_steps: Optional[int] = None,
            device: Any = None,
            sigmas: Optional[List[float]] = None,
            mu: Optional[float] = None,
            timesteps: Optional[List[float]] = None,
        ) -> None:
            given = sigmas if sigmas is not None else timesteps
            asked = num_inference_steps if num_inference_steps is not None else (len(given) if given is not None else None)
            if asked is not None and asked != router.steps and not router._warned:
                warnings.warn(
                    f"phasekit: {ck.path} samples in {router.steps} steps; the pipeline asked for {asked} "
                    f"(pass num_inference_steps={router.steps}, or steps= to phasekit.diffusers.route)",
                    stacklevel=3,
                )
                router._warned = True
            n = router.steps
            unshifted = [1.0 - k / n for k in range(n)]
            original(sched, n, device=device, sigmas=unshifted)

        # An instance attribute shadows the method: the pipeline's calls get the checkpoint's grid,
        # and the scheduler's saved config stays a plain FlowMatchEulerDiscreteScheduler's.
        setattr(sched, "set_timesteps", set_timesteps)
        pipe.register_modules(scheduler=sched)

        if getattr(pipe, "transformer", None) is None:
            raise _err("usage", f"{self.pipeline} has no transformer to route (pass transformer= when building it)")
        self.slots = [_Slot("transformer", pipe.transformer)]
        two = getattr(pipe, "transformer_2", None) is not None and "boundary_ratio" in pipe.config
        boundary = self._wan_boundary()
        if two and boundary is not None:
            self.slots.append(_Slot("transformer_2", pipe.transformer_2))
            pipe.register_to_config(boundary_ratio=boundary)
        elif "boundary_ratio" in pipe.config:
            pipe.register_to_config(boundary_ratio=None)
        for slot in self.slots:
            slot.handle = slot.module.register_forward_pre_hook(self._hook(slot), with_kwargs=True)
        pipe.phasekit_router = self

    def _wan_boundary(self) -> Optional[float]:
        """b when the checkpoint has two experts on [b, 1] and [0, b)."""
        ex = self.ck.experts
        if len(ex) != 2:
            return None
        hi, lo = sorted(ex, key=lambda e: -e.sigma_lo)
        if hi.sigma_hi == 1.0 and lo.sigma_lo == 0.0 and lo.sigma_hi == hi.sigma_lo:
            return hi.sigma_lo
        return None

    def remove(self) -> None:
        """Take the hooks off (the weights stay as they are)."""
        for slot in self.slots:
            if slot.handle is not None:
                slot.handle.remove()
                slot.handle = None

    # -- per call ----------------------------------------------------------------------------

    def step_of(self, timestep: Any) -> int:
        """The step of the σ grid a model call's timestep belongs to (the nearest σ)."""
        import torch

        t = timestep
        if isinstance(t, torch.Tensor):
            # Wan TI2V gives one timestep per token (0 on the given first frame): the step's is the largest.
            t = float(t.detach().float().max())
        sigma = float(t) / self.timestep_scale
        return min(range(len(self.sigmas)), key=lambda k: abs(self.sigmas[k] - sigma))

    def _hook(self, slot: _Slot) -> Any:
        def hook(module: Any, args: Tuple[Any, ...], kwargs: Dict[str, Any]) -> None:
            t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
            if t is None:
                raise _err("internal", f"{self.pipeline} called {slot.name} without a timestep; phasekit cannot route it")
            k = self.step_of(t)
            e = self.ck.expert_for(self.sigmas[k])
            self.activate(slot, e)
            self.history.append((k, self.sigmas[k], e.index, slot.name))
            return None

        return hook

    def activate(self, slot: _Slot, e: Expert) -> None:
        """Make ``slot``'s module compute as expert ``e``."""
        if e.is_lora and self.lora == "adapter":
            base = e.base or 0
            if slot.weights != ("base", base):
                self._disable_adapters(slot)
                _copy_weights(slot.module, self.ck.base_state_dict(e, "torch", layout="diffusers"), self.ck.path)
                slot.weights = ("base", base)
            name = f"phasekit_{e.name}"
            if name not in slot.adapters:
                with warnings.catch_warnings():
                    # Several adapters in one module is what routing needs; peft warns about it.
                    warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                    slot.module.load_lora_adapter(_peft_state_dict(self.ck, e), adapter_name=name, prefix=None)
                slot.adapters[name] = e.index
                slot.active = None
            if slot.active != name:
                slot.module.enable_adapters()
                slot.module.set_adapters([name], weights=[1.0])
                slot.active = name
            return
        if slot.weights != ("expert", e.index):
            self._disable_adapters(slot)
            _copy_weights(slot.module, self.ck.state_dict(e, "torch", layout="diffusers"), self.ck.path)
            slot.weights = ("expert", e.index)

    @staticmethod
    def _disable_adapters(slot: _Slot) -> None:
        if slot.adapters and slot.active is not None:
            slot.module.disable_adapters()
            slot.active = None


def schedule(steps: int, shift: float) -> List[float]:
    """The σ of each of ``steps`` Euler steps at ``shift`` (float64): ``linspace(1, 0, steps+1)``
    without the final 0, each shifted σ' = s·σ / (1 + (s−1)·σ), as phasekit's routing table."""
    out = []
    for k in range(steps):
        s = 1.0 - k / steps
        out.append(shift * s / (1.0 + (shift - 1.0) * s))
    return out


def _peft_state_dict(ck: Checkpoint, e: Expert) -> Dict[str, Any]:
    """A LoRA expert as a PEFT adapter state dict (diffusers names, ``lora_A``/``lora_B``), with
    alpha/rank folded into ``lora_B`` so that the adapter's own scale is 1 (alpha = rank)."""
    sd = ck.lora_state_dict(e, "torch", layout="diffusers")
    out = {}
    for k, v in sd.items():
        if k.endswith(".lora_down.weight"):
            out[k[: -len(".lora_down.weight")] + ".lora_A.weight"] = v.float()
        elif k.endswith(".lora_up.weight"):
            target = k[: -len(".lora_up.weight")]
            rank = v.shape[1]
            alpha = sd.get(target + ".alpha")
            scale = float(alpha.float().reshape(-1)[0]) / rank if alpha is not None else 1.0
            out[target + ".lora_B.weight"] = v.float() * scale
        elif not k.endswith(".alpha"):
            raise _err("unsupported", f"LoRA tensor {k!r} of expert {e.name!r} has no PEFT form", ck.path)
    return out


def _copy_weights(module: Any, sd: Dict[str, Any], path: str) -> None:
    """Copy ``sd`` into ``module``'s parameters and buffers in place (dtype and device as the
    module's). With PEFT adapters injected, ``X.weight`` lives at ``X.base_layer.weight``. Every
    parameter must be covered and every tensor used, or nothing is copied."""
    import torch

    own = {k: v for k, v in module.state_dict(keep_vars=True).items() if ".lora_" not in k}
    plan = []
    used = set()
    for key, target in own.items():
        src = key.replace(".base_layer.", ".")
        if src not in sd:
            continue
        if tuple(sd[src].shape) != tuple(target.shape):
            raise _err(
                "inconsistent", f"tensor {src!r} is {tuple(sd[src].shape)} in the checkpoint, the model has {tuple(target.shape)}", path
            )
        plan.append((target, sd[src]))
        used.add(src)
    missing = [k for k in own if k.replace(".base_layer.", ".") not in sd]
    extra = [k for k in sd if k not in used]
    if missing or extra:
        what = []
        if missing:
            what.append(f"the model has {len(missing)} tensors the checkpoint lacks (e.g. {missing[0]!r})")
        if extra:
            what.append(f"the checkpoint has {len(extra)} tensors the model lacks (e.g. {extra[0]!r})")
        raise _err("inconsistent", f"the expert does not fit the pipeline's transformer: {'; '.join(what)}", path)
    with torch.no_grad():
        for target, src in plan:
            target.copy_(src)
