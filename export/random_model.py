"""Build a Stable Diffusion folder with random weights from the configs shipped in ``model_configs/``.

``tiny`` is small enough that export + tests take seconds; ``sd15`` is the published SD 1.5 architecture, so speed,
memory and size measured on it are real even though its pictures are noise. ``sd21`` is SD 2.1 (768-v: OpenCLIP-H
text encoder in CLIPTextModel form, v-prediction, linear projections, upcast attention, ``!`` as the tokenizer's pad
token) and ``tiny-sd21`` the same family at the tiny size. ``sd15-inpaint`` is SD 1.5's inpainting model (a UNet
of 9 input channels: latents, mask, masked image latents), ``tiny-inpaint`` its tiny twin. ``tiny-turbo`` is an
SD-Turbo-style model at the tiny size (SD 2.x family, Euler with trailing timesteps: one to four steps, no
guidance). ``sdxl`` is SDXL base 1.0 (two text encoders, CLIP ViT-L and OpenCLIP bigG with its projection; a
UNet with added size and text conditioning; 1024²), ``sdxl-turbo`` the same model at 512² with SDXL-Turbo's
scheduler (Euler ancestral, trailing timesteps), ``tiny-sdxl`` and ``tiny-sdxl-turbo`` both at the tiny size. A
folder may add ``pipeline.json``: its pipeline class and tokenizer pad tokens. ``sd15-lcm`` is an LCM-distilled
SD 1.5 (LCM Dreamshaper's shape: a UNet that takes the guidance scale's embedding, the LCM scheduler), ``tiny-lcm``
its twin.
All are deterministic (fixed seed) and written in the standard diffusers layout that the pipeline class's
``from_pretrained`` loads.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from pocketsd.errors import UserError
from pocketsd.staging import staged_folder

log = logging.getLogger(__name__)
ARCHS = ("tiny", "sd15", "tiny-sd21", "sd21", "tiny-inpaint", "sd15-inpaint", "tiny-turbo", "tiny-sdxl", "sdxl",
         "sdxl-turbo", "tiny-sdxl-turbo", "tiny-lcm", "sd15-lcm")
SEED = 0
# what --model takes besides a folder or a file, and how the manifest names its source: `tiny` is built from ARCHS'
# configs on use, `shapes` is trained and shipped (pocketsd.shapes)
BUILTIN_MODELS = {"tiny": "tiny (built-in random model)", "shapes": "shapes (built-in trained model)"}


@dataclass(frozen=True)
class ModelConfigs:
    """The four configs of a random model (diffusers/transformers config dicts)."""

    unet: dict[str, Any]
    vae: dict[str, Any]
    text_encoder: dict[str, Any]
    scheduler: dict[str, Any]
    arch: str = "custom"
    extra: dict[str, Any] = field(default_factory=dict)
    text_encoder_2: dict[str, Any] | None = None  # SDXL's second text encoder (CLIPTextModelWithProjection)


def builtin_configs(arch: str) -> ModelConfigs:
    if arch not in ARCHS:
        raise UserError(f"unknown architecture {arch!r}", f"choose one of: {', '.join(ARCHS)}", code="arch")
    folder = resources.files("pocketsd.export") / "model_configs" / arch
    load = lambda name: json.loads((folder / f"{name}.json").read_text())  # noqa: E731
    extra = load("pipeline") if (folder / "pipeline.json").is_file() else {}
    second = load("text_encoder_2") if (folder / "text_encoder_2.json").is_file() else None
    return ModelConfigs(load("unet"), load("vae"), load("text_encoder"), load("scheduler"), arch=arch, extra=extra,
                        text_encoder_2=second)


def model_index(diffusers_version: str, scheduler_class: str, pipeline_class: str,
                 configs: ModelConfigs) -> dict[str, Any]:
    if configs.text_encoder_2 is not None:  # SDXL's pipeline has no safety checker
        return {"_class_name": pipeline_class, "_diffusers_version": diffusers_version,
                "feature_extractor": [None, None], "image_encoder": [None, None],
                "force_zeros_for_empty_prompt": bool(configs.extra.get("force_zeros_for_empty_prompt", True)),
                "scheduler": ["diffusers", scheduler_class], "text_encoder": ["transformers", "CLIPTextModel"],
                "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
                "tokenizer": ["transformers", "CLIPTokenizer"], "tokenizer_2": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    return {
        "_class_name": pipeline_class,
        "_diffusers_version": diffusers_version,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def _write_components(configs: ModelConfigs, root: Path) -> None:
    import diffusers
    import torch
    import transformers
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from pocketsd.export.tokenizer_files import write_clip_tokenizer

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()  # its "Writing model shards" bar is noise for one file

    pad_token = configs.extra.get("tokenizer_pad_token", "<|endoftext|>")
    write_clip_tokenizer(root / "tokenizer", vocab_size=configs.text_encoder["vocab_size"], pad_token=pad_token)
    vocab = json.loads((root / "tokenizer" / "vocab.json").read_text())
    special = {"bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"],
               "pad_token_id": vocab["<|endoftext|>"]}

    torch.manual_seed(SEED)
    text_encoder = CLIPTextModel(CLIPTextConfig(**{**configs.text_encoder, **special}))
    text_encoder.save_pretrained(root / "text_encoder", safe_serialization=True)
    del text_encoder
    if configs.text_encoder_2 is not None:
        write_clip_tokenizer(root / "tokenizer_2", vocab_size=configs.text_encoder_2["vocab_size"],
                             pad_token=configs.extra.get("tokenizer_2_pad_token", "!"))
        torch.manual_seed(SEED + 3)
        second = CLIPTextModelWithProjection(CLIPTextConfig(**{**configs.text_encoder_2, **special}))
        second.save_pretrained(root / "text_encoder_2", safe_serialization=True)
        del second
    torch.manual_seed(SEED + 1)
    unet = diffusers.UNet2DConditionModel(**configs.unet)
    unet.save_pretrained(root / "unet", safe_serialization=True)
    del unet
    torch.manual_seed(SEED + 2)
    diffusers.AutoencoderKL(**configs.vae).save_pretrained(root / "vae", safe_serialization=True)
    scheduler_class = configs.scheduler.get("_class_name", "PNDMScheduler")
    getattr(diffusers, scheduler_class).from_config(configs.scheduler).save_pretrained(root / "scheduler")
    index = model_index(diffusers.__version__, scheduler_class,
                         configs.extra.get("pipeline_class", "StableDiffusionPipeline"), configs)
    (root / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


def write_random_model(out_dir: str | Path, configs: ModelConfigs) -> Path:
    """Write the model to ``out_dir`` (which must not exist or be empty), completely or not at all."""
    with staged_folder(out_dir, "model") as staging:
        log.info("building random %s model in %s", configs.arch, out_dir)
        _write_components(configs, staging)
    return Path(out_dir)


def builtin_model_folder(name: str, scratch: Path) -> Path:
    """The diffusers folder of the built-in model ``name`` (one of BUILTIN_MODELS): ``tiny`` is written under
    ``scratch`` (once: a folder already there is reused), ``shapes`` is the shipped one."""
    if name == "shapes":
        from pocketsd.shapes import model_folder

        return model_folder()
    if name != "tiny":
        raise ValueError(f"{name!r} is not a built-in model ({', '.join(BUILTIN_MODELS)})")
    path = scratch / "tiny-model"
    if not (path / "model_index.json").is_file():
        write_random_model(path, builtin_configs("tiny"))
    return path
