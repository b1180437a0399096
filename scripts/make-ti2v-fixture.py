#!/usr/bin/env python3
"""Write tests/fixtures/wan22_ti2v_tiny: a tiny Wan2.2 TI2V-shaped WanTransformer3DModel and one
forward call with per-token timesteps, as diffusers' Wan pipelines build them for TI2V-5B
(`expand_timesteps=True`).

    pip install diffusers==0.42.1   # reference only; torch (CPU) must be installed
    python3 scripts/make-ti2v-fixture.py [OUT_DIR]

Like the other fixtures: float32, every parameter N(0, 0.2²) from a fixed seed, the model saved
with `save_pretrained` under `diffusers/`, the inputs and diffusers' `output` in
`forward.safetensors`, the config and the non-tensor arguments in `forward.json`.

TI2V-5B has 48 latent channels in and out; so does this model. The latent has 3 frames (odd, as
Wan's 1 + 4k latent frames are). The timestep is `[B, seq]` with `seq = F·(H/2)·(W/2)` patch tokens,
built the way `WanImageToVideoPipeline` (and `WanPipeline`) do it with `expand_timesteps`: a mask
of ones over the latent with the first (image-conditioned) frame set to 0, subsampled at the
2×2 patch stride, times the step's `t`, flattened. The pipeline uses one `t` for the whole batch;
here each row gets its own `t` so that a per-row mix-up shows.
"""

import json
import os
import sys

import diffusers
import torch
from diffusers import WanTransformer3DModel
from safetensors.torch import save_file

OUT = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "tests", "fixtures", "wan22_ti2v_tiny")
SEED = 0

CONFIG = dict(
    patch_size=[1, 2, 2],
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=48,
    out_channels=48,
    text_dim=24,
    freq_dim=32,
    ffn_dim=48,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=64,
)

# B, latent frames, height, width; text tokens; one t per batch row (exact in float32).
B, F, H, W, L = 2, 3, 4, 6, 7
T = [875.0, 312.5]


def per_token_timestep(t: float, frames: int, height: int, width: int, patch=(1, 2, 2)) -> torch.Tensor:
    """The pipeline's `temp_ts` for one step: `(first_frame_mask[0][0][:, ::2, ::2] * t).flatten()`."""
    mask = torch.ones(1, 1, frames, height, width, dtype=torch.float32)
    mask[:, :, 0] = 0
    return (mask[0][0][:: patch[0], :: patch[1], :: patch[2]] * t).flatten()


def main() -> None:
    torch.manual_seed(SEED)
    model = WanTransformer3DModel(**CONFIG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)

    hidden_states = torch.randn(B, CONFIG["in_channels"], F, H, W)
    encoder_hidden_states = torch.randn(B, L, CONFIG["text_dim"])
    timestep = torch.stack([per_token_timestep(t, F, H, W) for t in T])
    seq = F * (H // 2) * (W // 2)
    assert timestep.shape == (B, seq), timestep.shape

    with torch.no_grad():
        output = model(hidden_states, timestep, encoder_hidden_states, return_dict=False)[0]

    os.makedirs(OUT, exist_ok=True)
    model.save_pretrained(os.path.join(OUT, "diffusers"), safe_serialization=True)
    tensors = {
        "hidden_states": hidden_states,
        "timestep": timestep,
        "encoder_hidden_states": encoder_hidden_states,
        "output": output,
    }
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(OUT, "forward.safetensors"))
    meta = {
        "model": "WanTransformer3DModel",
        "diffusers": diffusers.__version__,
        "torch": torch.__version__,
        "seed": SEED,
        "config": CONFIG,
        "timestep": {
            "shape": [B, seq],
            "per_row_t": T,
            "rule": "expand_timesteps: first latent frame's tokens 0, the others t",
        },
    }
    with open(os.path.join(OUT, "forward.json"), "w") as f:
        json.dump(meta, f, indent=2)
        f.write("\n")
    print(f"wrote {OUT}: output {tuple(output.shape)}, timestep {tuple(timestep.shape)}")


if __name__ == "__main__":
    main()
