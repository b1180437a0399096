#!/usr/bin/env python3
"""Write the image-to-video fixtures: diffusers' own WanImageToVideoPipeline, run on tiny models,
is the reference for how phasekit conditions Wan2.2 on a first frame.

    pip install diffusers==0.42.1 transformers   # reference only; torch (CPU) must be installed
    python3 scripts/make-i2v-fixture.py [FIXTURES_DIR]

Two cases, the two ways Wan2.2 takes an image:

* I2V-A14B (`tests/fixtures/wan22_i2v_tiny`, written here): the transformer has 36 input channels
  and 16 output channels. The pipeline VAE-encodes [image, zeros…] as a video and concatenates a
  4-channel first-frame mask and those 16 latent channels (`condition`, 20 channels) to the noisy
  latents on every call. This script saves a tiny model of that shape (`diffusers/`), one forward
  call (`forward.safetensors`, like the other fixtures: `hidden_states` is the concatenation), and
  `pipeline.safetensors` (below).
* TI2V-5B (`tests/fixtures/wan22_ti2v_tiny`, the model written by make-ti2v-fixture.py, reused):
  48 channels in and out, `expand_timesteps`. The pipeline VAE-encodes the image alone (one latent
  frame), writes it over the first latent frame before every call, gives that frame's tokens
  timestep 0, and writes it over the first frame of the result. Saved there as
  `pipeline.safetensors`.

`pipeline.safetensors` holds the inputs and outputs of the real pipeline (`output_type="latent"`,
tiny VAEs with random weights, a FlowMatchEulerDiscreteScheduler with shift 5 and 3 steps, so plain
Euler on `sigmas`): `prompt_embeds` [B, L, 24], `negative_prompt_embeds` [B, L, 24] (its rows equal),
`latents` [B, C, F, H, W] (the starting noise, passed in), `condition` (what `prepare_latents`
returned: [B, 20, F, H, W] for A14B, [B, 48, 1, H, W] for TI2V), `sigmas` [4] (ending at 0), and
the final latents `out_g1` (guidance 1) and `out_g3` (guidance 3, so the negative call also sees
the image).
"""

import json
import os
import sys

import diffusers
import numpy as np
import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline, WanTransformer3DModel
from PIL import Image
from safetensors.torch import load_file, save_file

ROOT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures")
SEED = 0
B, L, FRAMES = 2, 7, 9  # 9 frames -> 3 latent frames
STEPS, SHIFT = 3, 5.0



def config_of(folder: str) -> dict:
    """The model config saved in a fixture's diffusers folder (without diffusers' own keys)."""
    with open(os.path.join(folder, "diffusers", "config.json")) as f:
        return {k: v for k, v in json.load(f).items() if not k.startswith("_")}


def randomize(model: torch.nn.Module, std: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, std)


def run_pipeline(transformer, vae, expand: bool, height: int, width: int, channels: int, out_dir: str) -> dict:
    sched = FlowMatchEulerDiscreteScheduler(shift=SHIFT)
    pipe = WanImageToVideoPipeline(
        tokenizer=None, text_encoder=None, vae=vae, scheduler=sched, transformer=transformer, expand_timesteps=expand
    )
    g = torch.Generator().manual_seed(SEED + 1)
    prompt = torch.randn(B, L, 24, generator=g)
    negative = torch.randn(1, L, 24, generator=g).repeat(B, 1, 1)
    pixels = (torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8).numpy()
    image = Image.fromarray(np.ascontiguousarray(pixels))
    lat_f = (FRAMES - 1) // 4 + 1
    sf = pipe.vae_scale_factor_spatial
    latents = torch.randn(B, channels, lat_f, height // sf, width // sf, generator=g)

    seen = {}
    orig = pipe.prepare_latents

    def record(*a, **k):
        out = orig(*a, **k)
        seen["condition"] = out[1].clone()
        return out

    pipe.prepare_latents = record
    outs = {}
    for gs in (1.0, 3.0):
        r = pipe(
            image=image,
            prompt_embeds=prompt,
            negative_prompt_embeds=negative,
            height=height,
            width=width,
            num_frames=FRAMES,
            num_inference_steps=STEPS,
            guidance_scale=gs,
            latents=latents.clone(),
            output_type="latent",
            return_dict=False,
        )[0]
        outs[f"out_g{int(gs)}"] = r
    sigmas = sched.sigmas.clone().float()
    tensors = {
        "prompt_embeds": prompt,
        "negative_prompt_embeds": negative,
        "latents": latents,
        "condition": seen["condition"].float(),
        "sigmas": sigmas,
        **outs,
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(out_dir, "pipeline.safetensors"))
    return {
        "pipeline": "WanImageToVideoPipeline",
        "expand_timesteps": expand,
        "height": height,
        "width": width,
        "num_frames": FRAMES,
        "num_inference_steps": STEPS,
        "scheduler": {"class": "FlowMatchEulerDiscreteScheduler", "shift": SHIFT},
        "sigmas": [float(s) for s in sigmas],
        "guidance_scales": [1.0, 3.0],
        "condition_shape": list(seen["condition"].shape),
    }


def main() -> None:
    torch.manual_seed(SEED)
    meta_common = {"diffusers": diffusers.__version__, "torch": torch.__version__, "seed": SEED}

    # --- I2V-A14B shape: channel concatenation -------------------------------------------------
    # The TI2V fixture's tiny config (make-ti2v-fixture.py) with I2V-A14B's channels.
    i2v_config = {**config_of(os.path.join(ROOT, "wan22_ti2v_tiny")), "in_channels": 36, "out_channels": 16}
    out = os.path.join(ROOT, "wan22_i2v_tiny")
    os.makedirs(out, exist_ok=True)
    model = WanTransformer3DModel(**i2v_config).eval()
    randomize(model, 0.2)
    model.save_pretrained(os.path.join(out, "diffusers"), safe_serialization=True)
    hs = torch.randn(B, 36, 3, 4, 6)
    ts = torch.tensor([875.0, 312.5])
    enc = torch.randn(B, L, 24)
    with torch.no_grad():
        o = model(hs, ts, enc, return_dict=False)[0]
    save_file(
        {"hidden_states": hs, "timestep": ts, "encoder_hidden_states": enc, "output": o.contiguous()},
        os.path.join(out, "forward.safetensors"),
    )
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()
    randomize(vae, 0.05)
    with torch.no_grad():
        pmeta = run_pipeline(model, vae, False, 32, 48, 16, out)
    with open(os.path.join(out, "forward.json"), "w") as f:
        json.dump({"model": "WanTransformer3DModel", **meta_common, "config": i2v_config, "timestep": [875.0, 312.5], **pmeta}, f, indent=2)
        f.write("\n")
    print(f"wrote {out}")

    # --- TI2V-5B shape: first latent frame replaced, per-token timesteps --------------------------
    out = os.path.join(ROOT, "wan22_ti2v_tiny")
    model = WanTransformer3DModel(**config_of(out)).eval()
    model.load_state_dict(load_file(os.path.join(out, "diffusers", "diffusion_pytorch_model.safetensors")))
    vae = AutoencoderKLWan(
        base_dim=3,
        z_dim=48,
        in_channels=12,
        out_channels=12,
        is_residual=True,
        patch_size=2,
        latents_mean=[0.0] * 48,
        latents_std=[1.0] * 48,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        scale_factor_spatial=16,
        scale_factor_temporal=4,
        temperal_downsample=[False, True, True],
    ).eval()
    randomize(vae, 0.05)
    with torch.no_grad():
        pmeta = run_pipeline(model, vae, True, 64, 96, 48, out)
    with open(os.path.join(out, "pipeline.json"), "w") as f:
        json.dump({**meta_common, **pmeta}, f, indent=2)
        f.write("\n")
    print(f"wrote {out}/pipeline.*")


if __name__ == "__main__":
    main()
