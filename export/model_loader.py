"""Open a diffusers Stable Diffusion folder and load its sub-models for export.

Only safetensors weights are read: a folder that has only pickled ``.bin`` weights is refused with a hint, because
loading pickles runs arbitrary code.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pocketsd.errors import ModelError

log = logging.getLogger(__name__)

SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline")
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
_SUBFOLDERS = {"unet": "UNet", "vae": "VAE", "text_encoder": "text encoder"}


@dataclass(frozen=True)
class ModelFolder:
    """A checked diffusers folder: what it contains, before anything heavy is loaded."""

    path: Path
    model_index: dict[str, Any]
    scheduler_config: dict[str, Any]

    def config(self, subfolder: str) -> dict[str, Any]:
        return json.loads((self.path / subfolder / "config.json").read_text())

    def tokenizer_files(self) -> dict[str, Path]:
        folder = self.path / "tokenizer"
        return {name: folder / name for name in TOKENIZER_FILES if (folder / name).is_file()}


def open_model_folder(path: str | Path) -> ModelFolder:
    root = Path(path)
    if not root.is_dir():
        raise ModelError(f"model folder {root} does not exist", "pass a diffusers folder, or --model tiny")
    index_path = root / "model_index.json"
    if not index_path.is_file():
        raise ModelError(f"{root} has no model_index.json: it is not a diffusers model folder",
                         "pass the folder that contains model_index.json, unet/, vae/, text_encoder/, tokenizer/")
    index = json.loads(index_path.read_text())
    kind = index.get("_class_name")
    if kind not in SUPPORTED_PIPELINES:
        raise ModelError(f"{root} is a {kind}, which this pocketsd cannot export yet",
                         f"supported: {', '.join(SUPPORTED_PIPELINES)}", code="unsupported-model")
    for sub, label in _SUBFOLDERS.items():
        _check_weights(root / sub, label)
    tok = root / "tokenizer"
    for name in ("vocab.json", "merges.txt"):
        if not (tok / name).is_file():
            raise ModelError(f"{root} is missing its tokenizer: {tok / name} not found",
                             "copy the tokenizer/ folder of the original model into the model folder")
    sched = root / "scheduler" / "scheduler_config.json"
    if not sched.is_file():
        raise ModelError(f"{root} is missing its scheduler: {sched} not found",
                         "copy the scheduler/ folder of the original model into the model folder")
    return ModelFolder(root, index, json.loads(sched.read_text()))


def _check_weights(folder: Path, label: str) -> None:
    if not (folder / "config.json").is_file():
        raise ModelError(f"the model folder is missing its {label}: {folder / 'config.json'} not found",
                         f"copy the {folder.name}/ folder of the original model into the model folder")
    if not any(folder.glob("*.safetensors")):
        pickles = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.ckpt")]
        hint = ("only pickled weights found (" + ", ".join(pickles) + "); pocketsd never loads pickles — convert them "
                "to safetensors first") if pickles else f"put the {label} weights (*.safetensors) in {folder}"
        raise ModelError(f"no safetensors weights in {folder}", hint)


def load_module(folder: ModelFolder, subfolder: str) -> Any:
    """Load one sub-model in fp32, eval mode, from safetensors."""
    import diffusers
    import torch
    import transformers

    # their per-shard progress bars would interleave with ours on stderr
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()

    if subfolder == "text_encoder":
        from transformers import CLIPTextModel as cls
    elif subfolder == "unet":
        from diffusers import UNet2DConditionModel as cls
    elif subfolder == "vae":
        from diffusers import AutoencoderKL as cls
    else:
        raise ModelError(f"unknown sub-model {subfolder!r}")
    log.info("loading %s from %s", subfolder, folder.path / subfolder)
    module = cls.from_pretrained(folder.path / subfolder, use_safetensors=True, torch_dtype=torch.float32)
    return module.eval().requires_grad_(False)
