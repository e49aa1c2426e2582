"""Exported weights folders (`lit-restore export --out W`) read back for inference.

`W/<stage>/config.yaml` gives the stage and its `model:` section; the networks are built from that
section through `lit_restore.models` with random weights, then `model.safetensors` (keys prefixed
by module name) fills them. Nothing here imports Lightning or the training code (`fit`,
`stages`), and the config's training sections are not read, so an export keeps loading after the
installed Lightning changes what `trainer:` may hold.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from lit_restore.config import load_model_config
from lit_restore.data.degrade.types import TYPES_KEY, align_type_rows, recorded_types
from lit_restore.weights import WeightsError, read_weights, safetensors_metadata
from lit_restore.weights_folder import check_entries, check_fits_file, check_values


def offline_model(stage: str, m: Any, folder: Optional[Path] = None) -> Any:
    """A copy of the model config `m` that builds the same architecture with random weights:
    every weight comes from a checkpoint or an export, so nothing pretrained is fetched or read.
    The LDM's UNet and VAE architectures come from the exported `folder`'s diffusers configs, else
    from `m.pretrained`'s config.json files (read, not their weights)."""
    m = dataclasses.replace(m)
    if stage == "biqa":
        m.pretrained = ""
    if stage == "ldm":
        from diffusers import AutoencoderKL, UNet2DConditionModel

        from lit_restore.models.ldm import architecture_config

        source = str(folder) if folder is not None else m.pretrained
        if m.unet_cfg is None:
            m.unet_cfg = architecture_config(UNet2DConditionModel, source, "unet", "model.pretrained")
        if m.vae_cfg is None:
            m.vae_cfg = architecture_config(AutoencoderKL, source, "vae", "model.pretrained")
        m.pretrained = ""
        m.clip = dataclasses.replace(m.clip, pretrained="")
    if stage == "scm":
        m.ldm = dataclasses.replace(m.ldm, clip=dataclasses.replace(m.ldm.clip, pretrained=""))
        m.ldm_checkpoint = ""
        m.pretrained = ""
    return m


def inference_modules(stage: str, m: Any) -> dict[str, nn.Module]:
    """The modules an export of `stage` holds, by name, built from its (offline) model config:
    the same classes and keys as the stage's `export_modules()`."""
    if stage == "biqa":
        from lit_restore.models.clip import create_clip

        return {"clip": create_clip(m.arch, m.pretrained, m.model_cfg)}
    if stage == "constyle":
        from lit_restore.models.constyle import build_encoder

        return {"encoder": build_encoder(m)}
    if stage == "restorer":
        from lit_restore.models.constyle import build_restorer

        return {"restorer": build_restorer(m)}
    if stage == "ldm":
        from lit_restore.models.ldm import build_latent_diffusion

        ldm = build_latent_diffusion(m)
        return {"unet": ldm.unet, "vae": ldm.vae}
    if stage == "scm":
        from lit_restore.models.scm import build_scm

        return {"scm": build_scm(m)}
    if stage == "autoencoder":
        from diffusers import AutoencoderKL

        return {"vae": AutoencoderKL(**dict(m.vae_cfg))}
    raise ValueError(f"no inference modules for stage {stage!r}")


def exported_model_config(weights_dir: str | Path, stage: str) -> Any:
    """The typed `model:` section of `weights_dir/<stage>/config.yaml`, its numbers checked
    (`weights_folder.check_values`)."""
    folder = Path(weights_dir) / stage
    check_entries(folder)
    found, m = load_model_config(folder / "config.yaml")
    if found != stage:
        raise ValueError(f"{folder}/config.yaml is for stage {found}, not {stage}")
    check_values(dataclasses.asdict(m), f"{folder}/config.yaml", "model")
    return m


def load_exported(weights_dir: str | Path, stage: str) -> nn.Module:
    """The inference modules of `weights_dir/<stage>/` (an export), in eval mode: the module itself
    when the stage exports one, else an nn.ModuleDict by name."""
    folder = Path(weights_dir) / stage
    if not (folder / "model.safetensors").is_file():
        raise FileNotFoundError(f"no exported {stage} weights in {folder} (run `lit-restore export CKPT --out {weights_dir}`)")
    m = offline_model(stage, exported_model_config(weights_dir, stage), folder)
    with torch.device("meta"):  # shapes only: what the config asks for, against what the file holds
        check_fits_file(inference_modules(stage, m).values(), [folder / "model.safetensors"], f"{folder}/config.yaml")
    modules = inference_modules(stage, m)
    state = read_weights(folder / "model.safetensors")
    # Rows indexed by degradation type follow this install's types (an export from before an op was added).
    trained_types = recorded_types(safetensors_metadata(folder / "model.safetensors").get(TYPES_KEY),
                                   f"{folder}/model.safetensors")
    align_type_rows(state, trained_types, {f"{name}.{k}": v for name, module in modules.items()
                                           for k, v in module.state_dict().items()}, f"{folder}/model.safetensors")
    for name, module in modules.items():
        part = {k[len(name) + 1:]: v for k, v in state.items() if k.startswith(name + ".")}
        try:
            module.load_state_dict(part)
        except RuntimeError as e:
            raise WeightsError(f"{folder}/model.safetensors does not fit its config.yaml ({name}): "
                               f"{str(e).splitlines()[-1].strip()[:200]}") from None
        module.eval().requires_grad_(False)
    return next(iter(modules.values())) if len(modules) == 1 else nn.ModuleDict(modules)
