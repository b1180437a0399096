"""phasekit.diffusers.route: diffusers pipelines sampling through routed checkpoints give the
latents `phasekit sample --moe` gives, from the same noise (phasekit.noise) and prompts, within
1e-4 relative L2.

The checkpoints are made by the CLI from the tiny fixtures: recipes/wan2.2-tiny-2phase.toml with
two different teacher experts (two LoRA experts on two bases, phasekit.moe/2),
recipes/qwen-image-tiny.toml (two LoRA experts on one base), and two full Wan experts. The
pipelines are the real diffusers classes with the fixtures' configs, random weights (route()
loads the checkpoint's) and no VAE or text encoder (prompt embeddings in, latents out).

What differs between the two sides is float rounding: diffusers' scheduler computes the σ grid in
float32 (phasekit: float64, then the Euler update in float32), PEFT adds the LoRA term after the
base layer as phasekit does, a merged LoRA rounds W + s·up·down once more (phasekit's own
merged-vs-adapter difference is 1e-7 to 2e-7, tests/moe_sample_transformer.rs), and phasekit's
Qwen-Image forward is within 5e-6 of diffusers' (docs/models.md). Measured here: 1.2e-7 to 1.8e-7
for Wan2.2 (T2V, I2V-A14B, TI2V-5B), 1.9e-6 for Qwen-Image; the bound 1e-4 is the issue's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

import phasekit
from conftest import QWEN, WAN, has, load, need, rel_l2, samples

TOL = 1e-4


def config(folder):
    return {k: v for k, v in json.loads((folder / "config.json").read_text()).items() if not k.startswith("_")}


def wan_pipe(two_slots: bool):
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel

    cfg = config(WAN)
    t2 = WanTransformer3DModel(**cfg).eval() if two_slots else None
    return WanPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=None,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        transformer=WanTransformer3DModel(**cfg).eval(),
        transformer_2=t2,
        boundary_ratio=0.5 if two_slots else None,
    )


def run_wan(pipe, ck, prompts, seed, n):
    import torch

    f, h, w = ck.latent or (1, 4, 4)
    c = pipe.transformer.config.out_channels
    latents = torch.from_numpy(phasekit.noise(seed, (n, c, f, h, w)))
    emb = torch.from_numpy(prompts[[i % len(prompts) for i in range(n)]])
    with torch.no_grad():
        out = pipe(
            prompt_embeds=emb,
            latents=latents,
            num_frames=(f - 1) * 4 + 1,
            height=h * 8,
            width=w * 8,
            num_inference_steps=ck.steps,
            guidance_scale=ck.guidance,
            output_type="latent",
            return_dict=False,
        )[0]
    return out.float().numpy()


MODES = [("one", "merge"), ("one", "adapter"), ("two", "adapter"), ("two", "merge")]


@pytest.mark.parametrize("slots,lora", MODES)
def test_wan_two_bases_equals_sample_moe(wan_run, cli, tmp_path, slots, lora):
    need("torch", "diffusers")
    if lora == "adapter":
        need("peft")
    from phasekit.diffusers import route

    ck = phasekit.open(wan_run["checkpoint"])
    assert ck.format == "phasekit.moe/2" and [e.base for e in ck.experts] == [0, 1]
    n, seed = 3, 5
    ref = samples(cli, wan_run["checkpoint"], wan_run["embeddings"], tmp_path / "s.safetensors", n, seed)
    pipe = route(wan_pipe(slots == "two"), ck, lora=lora)
    got = run_wan(pipe, ck, load(wan_run["embeddings"])["prompt_embeds"], seed, n)
    d = rel_l2(got, ref)
    print(f"wan {slots} slot(s), lora={lora}: relative L2 {d:.2e}")
    assert got.shape == ref.shape and d < TOL
    # Each step ran the expert whose σ range holds it: the high-noise expert for steps 1-2, then the low-noise one.
    r = pipe.phasekit_router
    assert [(k, e) for k, _, e, _ in r.history] == [(0, 0), (1, 0), (2, 1), (3, 1)]
    slots_used = [s for *_, s in r.history]
    if slots == "two":
        assert pipe.config.boundary_ratio == ck.experts[0].sigma_lo == ck.experts[1].sigma_hi
        assert slots_used == ["transformer", "transformer", "transformer_2", "transformer_2"]
    else:
        assert slots_used == ["transformer"] * 4
    # A second call samples the same again (the slots' state carries over correctly).
    again = run_wan(pipe, ck, load(wan_run["embeddings"])["prompt_embeds"], seed, n)
    assert rel_l2(again, got) < 1e-6


def test_wan_full_experts_weight_swaps(two_full, cli, tmp_path):
    need("torch", "diffusers", "safetensors")
    from safetensors.numpy import save_file

    from phasekit.diffusers import route

    path, _, _ = two_full  # bf16 full experts; both sides compute in float32 from the same values
    prompts = np.random.default_rng(0).standard_normal((2, 8, 24)).astype(np.float32)
    cond = tmp_path / "cond.safetensors"
    save_file({"prompt_embeds": prompts}, str(cond))
    n, seed = 2, 9
    out = tmp_path / "s.safetensors"
    cli(["sample", "--moe", path, "--cond", cond, "--n", n, "--seed", seed, "--frames", 1, "--height", 4, "--width", 4, "--out", out])
    ref = load(out)["samples"]
    ck = phasekit.open(path)
    pipe = route(wan_pipe(False), ck)
    got = run_wan(pipe, ck, prompts, seed, n)
    d = rel_l2(got, ref)
    print(f"wan full experts: relative L2 {d:.2e}")
    assert d < TOL


def test_qwen_equals_sample_moe(qwen_run, cli, tmp_path):
    need("torch", "diffusers")
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel

    from phasekit.diffusers import route

    ck = phasekit.open(qwen_run["checkpoint"])
    n, seed = 3, 7
    ref = samples(cli, qwen_run["checkpoint"], qwen_run["embeddings"], tmp_path / "s.safetensors", n, seed)
    for lora in ["merge"] + (["adapter"] if has("peft") else []):
        pipe = QwenImagePipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(),
            vae=None,
            text_encoder=None,
            tokenizer=None,
            transformer=QwenImageTransformer2DModel(**config(QWEN)).eval(),
        )
        route(pipe, ck, lora=lora)
        f, h, w = ck.latent
        c = pipe.transformer.config.in_channels
        latents = torch.from_numpy(phasekit.noise(seed, (n, f * (h // 2) * (w // 2), c)))
        prompts = load(qwen_run["embeddings"])["prompt_embeds"]
        emb = torch.from_numpy(prompts[[i % len(prompts) for i in range(n)]])
        with torch.no_grad():
            got = pipe(
                prompt_embeds=emb,
                prompt_embeds_mask=torch.ones(emb.shape[:2], dtype=torch.long),
                latents=latents,
                height=h * 8,
                width=w * 8,
                num_inference_steps=ck.steps,
                true_cfg_scale=1.0,
                output_type="latent",
                return_dict=False,
            )[0]
        d = rel_l2(got.float().numpy(), ref)
        print(f"qwen lora={lora}: relative L2 {d:.2e}")
        assert got.shape == ref.shape and d < TOL
        r = pipe.phasekit_router
        assert [e for _, _, e, _ in r.history] == [ck.expert_for(s).index for s in ck.sigmas]


def test_scheduler_is_the_checkpoints(wan_run):
    need("torch", "diffusers")
    from phasekit.diffusers import route, schedule

    ck = phasekit.open(wan_run["checkpoint"])
    pipe = route(wan_pipe(False), ck)
    s = pipe.scheduler
    assert type(s).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert s.config.shift == ck.shift and not s.config.use_dynamic_shifting
    with pytest.warns(UserWarning, match="samples in 4 steps"):
        s.set_timesteps(50)
    assert len(s.timesteps) == 4
    assert np.allclose(s.sigmas.numpy()[:-1], ck.sigmas, rtol=1e-6) and s.sigmas[-1] == 0
    assert schedule(4, 5.0) == ck.sigmas
    # Other step counts on request route each σ to its expert.
    pipe = route(wan_pipe(False), ck, steps=6)
    pipe.scheduler.set_timesteps(6)
    assert len(pipe.scheduler.timesteps) == 6


def test_route_refuses_what_it_cannot_do(wan_run, qwen_run):
    need("torch", "diffusers")
    from phasekit.diffusers import route

    with pytest.raises(phasekit.UnsupportedError, match="qwen_image"):
        route(wan_pipe(False), qwen_run["checkpoint"])
    with pytest.raises(phasekit.UnsupportedError):
        route(object(), wan_run["checkpoint"])
    with pytest.raises(phasekit.UsageError):
        route(wan_pipe(False), wan_run["checkpoint"], lora="bake")


I2V_CASES = {
    # I2V-A14B: 36 input channels (16 latent + 4 first-frame mask + 16 image latent), the
    # condition concatenated on every call.
    "i2v-a14b": dict(fixture="wan22_i2v_tiny", expand=False, height=32, width=48, vae=dict(z_dim=16)),
    # TI2V-5B: 48 channels in and out, the image as the first latent frame, per-token timesteps.
    "ti2v-5b": dict(
        fixture="wan22_ti2v_tiny",
        expand=True,
        height=64,
        width=96,
        vae=dict(
            z_dim=48,
            in_channels=12,
            out_channels=12,
            is_residual=True,
            patch_size=2,
            latents_mean=[0.0] * 48,
            latents_std=[1.0] * 48,
            scale_factor_spatial=16,
            scale_factor_temporal=4,
        ),
    ),
}


@pytest.mark.parametrize("case", sorted(I2V_CASES))
def test_wan_image_to_video_equals_sample_moe(case, cli, tmp_path):
    """WanImageToVideoPipeline (a tiny random VAE encodes the image, as in
    scripts/make-i2v-fixture.py) through a routed checkpoint of two full experts: the pipeline's
    own image condition, saved as `image_condition` beside the prompts, makes `phasekit sample
    --moe` compute the same latents."""
    need("torch", "diffusers", "safetensors", "PIL")
    import torch
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanTransformer3DModel
    from PIL import Image
    from safetensors.numpy import save_file

    from conftest import FIXTURES, scaled_copy
    from phasekit.diffusers import route

    c = I2V_CASES[case]
    src = FIXTURES / c["fixture"] / "diffusers"
    low = scaled_copy(src, tmp_path / "low", 0.8)
    ck_path = tmp_path / "i2v.safetensors"
    cli(
        [
            "assemble",
            "--expert", src, "--sigma-range", "0.875:1",
            "--expert", low, "--sigma-range", "0:0.875",
            "--steps", "4", "--shift", "5", "-o", ck_path,
        ]
    )  # fmt: skip
    ck = phasekit.open(ck_path)
    torch.manual_seed(0)
    vae = AutoencoderKLWan(base_dim=3, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True], **c["vae"]).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.normal_(0.0, 0.05)
    pipe = WanImageToVideoPipeline(
        tokenizer=None,
        text_encoder=None,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(),
        transformer=WanTransformer3DModel(**config(src)).eval(),
        expand_timesteps=c["expand"],
    )
    route(pipe, ck)
    seen = {}
    prepare = pipe.prepare_latents

    def record(*a, **k):
        out = prepare(*a, **k)
        seen["condition"] = out[1].detach().float().clone()
        return out

    pipe.prepare_latents = record
    n, seed, frames = 2, 4, 9
    sf = pipe.vae_scale_factor_spatial
    f, h, w = (frames - 1) // 4 + 1, c["height"] // sf, c["width"] // sf
    out_ch = pipe.transformer.config.out_channels
    latents = torch.from_numpy(phasekit.noise(seed, (n, out_ch, f, h, w)))
    prompts = np.random.default_rng(1).standard_normal((n, 7, 24)).astype(np.float32)
    pixels = (np.random.default_rng(2).random((c["height"], c["width"], 3)) * 255).astype(np.uint8)
    with torch.no_grad():
        got = pipe(
            image=Image.fromarray(pixels),
            prompt_embeds=torch.from_numpy(prompts),
            height=c["height"],
            width=c["width"],
            num_frames=frames,
            num_inference_steps=ck.steps,
            guidance_scale=1.0,
            latents=latents,
            output_type="latent",
            return_dict=False,
        )[0]
    cond = tmp_path / "cond.safetensors"
    save_file({"prompt_embeds": prompts, "image_condition": seen["condition"].numpy()}, str(cond))
    out = tmp_path / "s.safetensors"
    cli(["sample", "--moe", ck_path, "--cond", cond, "--n", n, "--seed", seed, "--frames", f, "--height", h, "--width", w, "--out", out])
    ref = load(out)["samples"]
    d = rel_l2(got.float().numpy(), ref)
    print(f"{case}: relative L2 {d:.2e}")
    assert got.shape == ref.shape and d < TOL
    assert [e for _, _, e, _ in pipe.phasekit_router.history] == [0, 0, 1, 1]
