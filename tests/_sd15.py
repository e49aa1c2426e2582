"""Stable Diffusion 1.5 in the diffusers folder layout (`runwayml/stable-diffusion-v1-5`), written
locally: the published unet/, vae/ and scheduler/ configs, with or without random weights.

lit_restore reads unet/ and vae/ (the LDM's text context comes from open_clip, the noise schedule
is built in code), so the folder holds no text_encoder/ or tokenizer/.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

# The architecture keys of SD-1.5's unet/config.json (the rest are diffusers defaults).
UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

# vae/config.json
VAE = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 512,
    "scaling_factor": 0.18215,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# scheduler/scheduler_config.json: SD's inference scheduler on its training schedule.
SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}


def write_sd15(root: Path, weights: bool = False) -> Path:
    """`root` as an SD-1.5 diffusers folder: configs only, or with random weights (~3.4 GB of
    float32 safetensors, built one network at a time)."""
    for sub, cls, config in (("unet", UNet2DConditionModel, UNET), ("vae", AutoencoderKL, VAE)):
        if weights:
            cls(**config).save_pretrained(root / sub)
        else:
            with torch.device("meta"):
                cls(**config).save_config(root / sub)
    (root / "scheduler").mkdir(parents=True, exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(SCHEDULER, indent=2))
    return root
