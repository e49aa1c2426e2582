"""`lit-restore export`: a training checkpoint → an exported weights folder, and back.

`export_command` rebuilds the stage from the config saved in the checkpoint, loads its weights
(EMA by default) and writes `OUT/<stage>/`: `model.safetensors` (the stage's `export_modules()`,
keys prefixed by module name; metadata stage, step, ema), `config.yaml`, a model card
`README.md` with Hugging Face front matter, plus per kind of module: diffusers models as
`save_pretrained` folders (the LDM as a whole InstructPix2Pix pipeline folder with its text
encoder, tokenizer and sampler), open_clip models as `open_clip_model.safetensors` +
`open_clip_config.json` (what open_clip's `local-dir:` loader reads), and for the restorer and
SCM `model.onnx` with dynamic batch, height and width, checked against onnxruntime. Optimizer state is never written. A sharded (FSDP/DCP)
checkpoint folder is consolidated in memory first.

`lit_restore.exported.load_exported` reads such a folder back for inference.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors.torch import save_file
from torch import nn

from lit_restore.config import CLIPTextConfig, ConfigError, RunConfig, schema_for, to_yaml
from lit_restore.data.degrade.types import DEGRADATION_TYPES, TYPES_KEY, align_type_rows, recorded_types
from lit_restore.errors import DiskFullError, UserError, is_disk_full
from lit_restore.rundir import process_alive
from lit_restore.exported import offline_model
from lit_restore.settings import SamplerSettings
from lit_restore.weights import WeightsError, load_checkpoint, load_sharded_checkpoint

# Stages whose exported modules are convolutional image-to-image nets: also written as ONNX.
ONNX_STAGES = ("restorer", "scm")


# ------------------------------------------------------------------ reading checkpoints


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint file (read as data only, `load_checkpoint`), or a sharded checkpoint
    folder consolidated in memory."""
    path = Path(path)
    if not path.exists():
        raise WeightsError(f"{path}: checkpoint not found (a run's checkpoints/last.ckpt, or a sharded checkpoint folder)")
    if path.is_dir():
        ckpt = load_sharded_checkpoint(path)
        if "state_dict" not in ckpt and "model" in ckpt:  # Lightning's sharded layout names it "model"
            ckpt["state_dict"] = ckpt.pop("model")
        return ckpt
    return load_checkpoint(path)


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """The RunConfig a checkpoint was trained with (its `hyper_parameters["config"]`)."""
    if not isinstance(data, dict):
        raise ConfigError(f"the checkpoint's config is a {type(data).__name__}, not a mapping")
    try:
        merged = OmegaConf.merge(schema_for(str(data.get("stage", "biqa"))), data)
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as e:
        raise ConfigError(f"the checkpoint's config: {str(e).splitlines()[0]}") from None


def without_downloads(cfg: RunConfig) -> RunConfig:
    """The same run with a model config that builds its architecture offline (`offline_model`)."""
    return dataclasses.replace(cfg, model=offline_model(cfg.stage, cfg.model))


def build_modules(cfg: RunConfig, ema: bool) -> tuple[nn.Module, dict[str, nn.Module]]:
    """The stage (configured, random weights) and its export modules. Without `ema` the stage is
    built without its EMA copy, so `export_modules()` returns the raw networks."""
    from lit_restore.fit import build_stage

    if not ema:
        cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, ema_decay=0.0))
    stage = build_stage(cfg)
    stage.configure_model()
    return stage, stage.export_modules()


def stage_state_dict(ckpt: dict[str, Any], stage: nn.Module, ema: bool) -> dict[str, torch.Tensor]:
    """The weights to load into `stage`: Lightning's EMA callback keeps the averaged weights in
    `state_dict` and the raw ones in `current_model_state`; stages with their own EMA hold both
    in `state_dict` (a stage built without EMA ignores the EMA copy's keys)."""
    state = ckpt["state_dict"]
    if not ema and "current_model_state" in ckpt:
        state = ckpt["current_model_state"]
    wanted = stage.state_dict().keys()
    missing = [k for k in wanted if k not in state]
    if missing:
        raise WeightsError(f"checkpoint lacks {len(missing)} weights of the rebuilt stage, e.g. {missing[:3]}")
    return {k: state[k] for k in wanted}


# ------------------------------------------------------------------ writing


def flat_state(modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """`name.key` → tensor, contiguous and unshared (safetensors refuses shared storage)."""
    return {f"{name}.{k}": v.detach().cpu().contiguous().clone() for name, m in modules.items()
            for k, v in m.state_dict().items()}


def export_onnx(module: nn.Module, path: Path, channels: int = 3) -> float:
    """ONNX with dynamic batch/height/width; returns the max abs difference to PyTorch measured
    by onnxruntime on sizes other than the export example. One image input is named `image`; a
    module taking several images (the SCM: degraded input and LDM output) keeps its argument names."""
    import inspect

    import numpy as np
    import onnxruntime as ort

    module = module.eval()
    params = list(inspect.signature(module.forward).parameters)
    names = ["image"] if len(params) == 1 else params
    batch = torch.export.Dim("batch")
    dims = tuple({0: batch, 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO} for _ in names)
    # Batch 2 in the example: a batch of 1 would be specialised to a constant.
    example = tuple(torch.rand(2, channels, 32, 32) for _ in names)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    torch.onnx.export(module, example, str(tmp), dynamo=True, dynamic_shapes=dims, input_names=names,
                      output_names=["restored"], external_data=False)
    session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    worst = 0.0
    gen = torch.Generator().manual_seed(0)
    for shape in [(1, channels, 37, 23), (3, channels, 48, 64)]:
        xs = [torch.rand(*shape, generator=gen) for _ in names]
        with torch.no_grad():
            ref = module(*xs).numpy()
        (out,) = session.run(None, {n: x.numpy() for n, x in zip(names, xs)})
        if out.shape != ref.shape:
            raise RuntimeError(f"ONNX output shape {out.shape} != PyTorch {ref.shape} for input {shape}")
        worst = max(worst, float(np.abs(out - ref).max()))
    os.replace(tmp, path)
    return worst


# Per stage: the library that loads the folder, the Hugging Face pipeline tag, extra tags, and
# what the stage's validation measures.
CARD_META: dict[str, tuple[str, str, list[str], list[str]]] = {
    "autoencoder": ("diffusers", "image-to-image", ["autoencoder-kl", "vae"], ["psnr", "ssim"]),
    "biqa": ("open_clip", "zero-shot-image-classification", ["clip", "image-quality-assessment"], ["accuracy"]),
    "constyle": ("pytorch", "image-feature-extraction", ["constyle", "contrastive-learning"], []),
    "restorer": ("pytorch", "image-to-image", ["constyle", "nafnet", "onnx"], ["psnr", "ssim"]),
    "ldm": ("diffusers", "image-to-image", ["instruct-pix2pix", "stable-diffusion", "autodir"], ["psnr", "ssim"]),
    "scm": ("pytorch", "image-to-image", ["autodir", "nafnet", "onnx"], ["psnr", "ssim"]),
}


# Per stage: the files a snippet needs (any of them) and the snippet loading them in their own tool.
CARD_USAGE: dict[str, tuple[tuple[str, ...], list[str]]] = {
    "autoencoder": (("vae",), [
        "from diffusers import AutoencoderKL",
        'vae = AutoencoderKL.from_pretrained("autoencoder/vae")',
        "latents = vae.encode(image * 2 - 1).latent_dist.mode() * vae.config.scaling_factor  # image in [0, 1]",
    ]),
    "ldm": (("model_index.json",), [
        "from diffusers import StableDiffusionInstructPix2PixPipeline",
        'pipe = StableDiffusionInstructPix2PixPipeline.from_pretrained("ldm")',
        'out = pipe(prompt="A photo needs noise artifact reduction", image=image, '
        f'num_inference_steps={SamplerSettings().steps},',
        "           guidance_scale=1.0, image_guidance_scale=1.0).images[0]",
    ]),
    "biqa": (("open_clip_config.json",), [
        "import open_clip, json",
        'model, _, preprocess = open_clip.create_model_and_transforms("local-dir:biqa")',
        'prompts = json.load(open("biqa/open_clip_config.json"))["prompts"]  # logit order',
    ]),
    "restorer": (("model.onnx",), [
        "import onnxruntime",
        'session = onnxruntime.InferenceSession("restorer/model.onnx")',
        'restored, = session.run(None, {"image": image})  # float32 (N, 3, H, W) in [0, 1]',
    ]),
    "scm": (("model.onnx",), [
        "import onnxruntime",
        'session = onnxruntime.InferenceSession("scm/model.onnx")',
        'corrected, = session.run(None, {"lq": degraded, "ldm_out": ldm_output})  # [0, 1] images',
    ]),
}


def base_model(cfg: RunConfig) -> Optional[str]:
    """The Hugging Face model the stage was fine-tuned from, when it came from the Hub."""
    m = cfg.model
    if cfg.stage == "ldm" and m.pretrained and not Path(m.pretrained).exists():
        return m.pretrained
    if cfg.stage == "biqa" and m.pretrained and m.model_cfg is None:
        import open_clip

        hub = open_clip.get_pretrained_cfg(m.arch, m.pretrained).get("hf_hub", "")
        return hub.rstrip("/") or None
    return None


def card_front_matter(cfg: RunConfig) -> str:
    """The model card's YAML metadata block (what the Hub and `huggingface_hub.ModelCard` read)."""
    from huggingface_hub import ModelCardData

    library, pipeline_tag, tags, metrics = CARD_META[cfg.stage]
    data = ModelCardData(library_name=library, pipeline_tag=pipeline_tag, base_model=base_model(cfg),
                         tags=["lit_restore", "image-restoration", cfg.stage, *tags], metrics=metrics or None,
                         datasets=[s.url for s in cfg.data.train])
    return f"---\n{data.to_yaml()}\n---\n"


def model_card(cfg: RunConfig, step: int, ema: bool, files: list[str], metrics: dict[str, float],
               onnx_diffs: dict[str, float]) -> str:
    data = ", ".join(s.url for s in cfg.data.train)
    lines = [
        card_front_matter(cfg),
        f"# lit_restore {cfg.stage} weights",
        "",
        f"- stage: `{cfg.stage}`",
        f"- training step: {step}",
        f"- weights: {'EMA' if ema else 'raw (no EMA)'}",
        f"- training data: {data}",
        f"- degradations: mode `{cfg.degrade.mode}`, types {', '.join(cfg.degrade.types)}",
        f"- seed: {cfg.seed}",
    ]
    if metrics:
        lines += ["", "## Metrics at export", ""] + [f"- {k}: {v:.4g}" for k, v in sorted(metrics.items())]
    if onnx_diffs:
        lines += ["", "## ONNX", ""] + [f"- {k}: max abs difference to PyTorch (onnxruntime) {v:.2e}"
                                        for k, v in onnx_diffs.items()]
    if cfg.stage in CARD_USAGE and any(f in files for f in CARD_USAGE[cfg.stage][0]):
        lines += ["", "## Use", "", "```python", *CARD_USAGE[cfg.stage][1], "```"]
    lines += ["", "## Files", ""] + [f"- `{f}`" for f in files]
    lines += ["", "`config.yaml` is the resolved training config. Load with `lit_restore.exported.load_exported`.", ""]
    return "\n".join(lines)


def checkpoint_metrics(ckpt: dict[str, Any]) -> dict[str, float]:
    """Validation metrics the checkpoint remembers (ModelCheckpoint's monitor values)."""
    out = {}
    for state in ckpt.get("callbacks", {}).values():
        if isinstance(state, dict) and state.get("current_score") is not None and state.get("monitor") not in (None, "step"):
            out[state["monitor"]] = float(state["current_score"])
    return out


def export_command(ckpt: str, out: str, ema: bool = True, onnx: bool = True) -> int:
    checkpoint = read_checkpoint(ckpt)
    hparams = checkpoint.get("hyper_parameters")
    saved = hparams.get("config") if isinstance(hparams, dict) else None
    if saved is None:
        raise ConfigError(f"{ckpt}: no config in the checkpoint's hyper_parameters; not a lit_restore checkpoint")
    cfg = config_from_dict(saved)
    use_ema = ema and cfg.optim.ema_decay > 0
    stage, modules = build_modules(without_downloads(cfg), use_ema)
    state = stage_state_dict(checkpoint, stage, use_ema)
    trained_types = recorded_types(checkpoint.get(TYPES_KEY), ckpt)
    align_type_rows(state, trained_types, stage.state_dict(), ckpt)  # a checkpoint from before an op was added
    try:
        stage.load_state_dict(state)
    except RuntimeError as e:  # shapes that differ from the checkpoint's own config
        raise WeightsError(f"{ckpt}: weights do not fit its config: {str(e).splitlines()[-1].strip()[:200]}") from None
    stage.prepare_export()
    step = int(checkpoint.get("global_step", 0))
    final = Path(out) / cfg.stage
    if final.parent.exists() and not final.parent.is_dir():
        raise UserError(f"--out {final.parent} is a file; give a folder")
    final.parent.mkdir(parents=True, exist_ok=True)
    for left in remove_dead_exports(final.parent):
        print(f"removed {left}, left by a killed export")
    work = Path(tempfile.mkdtemp(prefix=f".{cfg.stage}.{socket.gethostname()}.{os.getpid()}.", dir=final.parent))
    files = ["model.safetensors", "config.yaml", "README.md"]
    onnx_diffs: dict[str, float] = {}
    try:
        meta = {"stage": cfg.stage, "step": str(step), "ema": str(use_ema).lower(), "modules": ",".join(modules),
                TYPES_KEY: ",".join(DEGRADATION_TYPES)}
        save_file(flat_state(modules), str(work / "model.safetensors"), metadata=meta)
        (work / "config.yaml").write_text(to_yaml(cfg))
        files += write_tool_formats(stage, modules, work)
        if cfg.stage == "ldm":
            files += write_ldm_pipeline(stage, modules, cfg.model.clip, work, trained_types)
        if onnx and cfg.stage in ONNX_STAGES:
            for name, module in modules.items():
                file = "model.onnx" if len(modules) == 1 else f"{name}.onnx"
                onnx_diffs[file] = export_onnx(module, work / file)
                files.append(file)
        (work / "README.md").write_text(model_card(cfg, step, use_ema, files, checkpoint_metrics(checkpoint), onnx_diffs))
        follow_umask(work)
        # Swap the finished folder in: a failed export never leaves a half-written one behind.
        if final.exists():
            shutil.rmtree(final)
        os.replace(work, final)
    except Exception as e:
        if is_disk_full(e, final.parent):
            raise DiskFullError(f"no space left on {final.parent} writing the {cfg.stage} export; "
                                f"{'the previous ' + str(final) + ' is intact' if final.exists() else 'nothing was written'}"
                                ) from None
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"exported {cfg.stage} (step {step}, {'EMA' if use_ema else 'raw'} weights) to {final}")
    for name, diff in onnx_diffs.items():
        print(f"  {name}: max abs difference to PyTorch (onnxruntime) {diff:.2e}")
    return 0


def remove_dead_exports(folder: Path) -> list[Path]:
    """Delete the work folders (`.<stage>.<host>.<pid>.XXXX`) that exports killed on this host
    left in `folder`; those of live processes, and of other hosts, stay."""
    removed = []
    host = socket.gethostname()
    for work in folder.glob(f".*.{host}.*.*"):
        parts = work.name.split(".")  # ["", stage, host..., pid, random]
        pid = parts[-2]
        if not (work.is_dir() and not work.is_symlink() and pid.isdigit() and ".".join(parts[2:-2]) == host):
            continue
        if process_alive(pid):
            continue  # a live export
        shutil.rmtree(work, ignore_errors=True)
        removed.append(work)
    return removed


def follow_umask(folder: Path) -> None:
    """Give `folder` and everything in it the modes a plain mkdir/open gets under the user's
    umask: mkdtemp makes the folder owner-only, and an export is meant to be shared."""
    mask = os.umask(0)
    os.umask(mask)
    for p in [folder, *folder.rglob("*")]:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


def write_tool_formats(stage: nn.Module, modules: dict[str, nn.Module], folder: Path) -> list[str]:
    """Files other tools load directly: diffusers folders, open_clip state dicts."""
    written = []
    from diffusers import ModelMixin

    for name, module in modules.items():
        if isinstance(module, ModelMixin):
            module.save_pretrained(str(folder / name), safe_serialization=True)
            written.append(f"{name}/")
    try:
        import open_clip
    except ImportError:
        open_clip = None
    if open_clip is not None:
        for name, module in modules.items():
            if isinstance(module, open_clip.CLIP):
                prefix = "open_clip" if len(modules) == 1 else f"{name}_open_clip"
                save_file({k: v.contiguous().clone() for k, v in module.state_dict().items()},
                          str(folder / f"{prefix}_model.safetensors"))
                (folder / f"{prefix}_config.json").write_text(json.dumps(open_clip_config(stage.cfg, module), indent=2))
                written += [f"{prefix}_model.safetensors", f"{prefix}_config.json"]
    return written


def ldm_text_tower(clip: CLIPTextConfig, context_bank: torch.Tensor,
                   trained_types: tuple[str, ...] = DEGRADATION_TYPES) -> Optional[nn.Module]:
    """The LDM's frozen text tower (`model.clip` of its training config) as a transformers
    CLIPTextModel, checked against the prompt contexts the checkpoint holds (the rows of the
    types it was trained with, and the empty prompt's); None when the LDM trained with a random
    tower (nothing to rebuild it from)."""
    from lit_restore.models.clip import PromptCLIP, create_clip, transformers_text_model
    from lit_restore.models.ldm import bank_prompts

    if not clip.pretrained:
        return None
    tower = PromptCLIP(create_clip(clip.arch, clip.pretrained, clip.model_cfg, key="model.clip.pretrained"), ["no"])
    rows = [i for i, t in enumerate(DEGRADATION_TYPES) if t in trained_types] + [len(DEGRADATION_TYPES)]
    states, context_bank = tower.eval().token_states(bank_prompts())[rows], context_bank[rows]
    if not torch.allclose(states, context_bank.float(), atol=1e-3, rtol=1e-3):
        raise ValueError(f"model.clip.pretrained={clip.pretrained}: its text tower does not give the prompt "
                         "contexts this LDM trained with (max difference "
                         f"{float((states - context_bank).abs().max()):.3g})")
    return transformers_text_model(tower.model)


def write_ldm_pipeline(stage: nn.Module, modules: dict[str, nn.Module], clip: CLIPTextConfig,
                       folder: Path, trained_types: tuple[str, ...] = DEGRADATION_TYPES) -> list[str]:
    """The LDM as a diffusers StableDiffusionInstructPix2PixPipeline folder: unet/, vae/,
    scheduler/ (the Euler-ancestral sampler `restore` uses, with its timestep spacing),
    text_encoder/ + tokenizer/ (transformers CLIP, converted from the open_clip text tower) and
    model_index.json. Without a pretrained text tower only unet/, vae/ and scheduler/ are written."""
    from lit_restore.models.clip import transformers_tokenizer
    from lit_restore.models.ldm import make_sampler

    sampler = make_sampler("euler_a", stage.ldm.scheduler)
    text = ldm_text_tower(clip, stage.context_bank, trained_types)
    if text is None:
        sampler.save_pretrained(str(folder / "scheduler"))
        print("  no pretrained text tower (model.clip.pretrained is empty): the ldm folder is not a complete "
              "diffusers pipeline, and `restore` cannot use it")
        return ["scheduler/"]
    from diffusers import StableDiffusionInstructPix2PixPipeline
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # export prints its own summary
    tokenizer = transformers_tokenizer(folder / "tokenizer", context_length=text.config.max_position_embeddings)
    pipe = StableDiffusionInstructPix2PixPipeline(
        vae=modules["vae"], text_encoder=text, tokenizer=tokenizer, unet=modules["unet"], scheduler=sampler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder), safe_serialization=True)
    return ["scheduler/", "text_encoder/", "tokenizer/", "model_index.json"]


def open_clip_config(cfg: RunConfig, model: nn.Module) -> dict[str, Any]:
    """What `open_clip.create_model_and_transforms("local-dir:FOLDER")` reads: the full model config
    (`model_cfg`, whether the run named an architecture or gave one) and the image preprocessing
    (`preprocess_cfg`); plus, for lit_restore and other users, the BIQA classes in logit order and
    their prompts. BIQA crops at native scale unless `resize` was set: open_clip's transform
    resizes first, so with `native_scale_crop` true centre-crop `preprocess_cfg.size` pixels yourself."""
    import open_clip

    from lit_restore.data.degrade.types import prompt_for

    m = cfg.model
    model_cfg = OmegaConf.to_container(OmegaConf.create(m.model_cfg)) if m.model_cfg else open_clip.get_model_config(m.arch)
    out = {"arch": m.arch, "model_cfg": model_cfg, "preprocess_cfg": dict(model.visual.preprocess_cfg)}
    if cfg.stage == "biqa":
        out.update(classes=list(m.classes), prompts=[prompt_for(c) for c in m.classes], native_scale_crop=not m.resize)
    return out
