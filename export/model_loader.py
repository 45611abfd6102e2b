"""Open a diffusers Stable Diffusion folder and load its sub-models for export.

Only safetensors weights are read: a folder that has only pickled ``.bin`` weights is refused with a hint, because
loading pickles runs arbitrary code.
"""

from __future__ import annotations

import json
import logging
import re
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
        return read_json(self.path / subfolder / "config.json")

    def tokenizer_files(self) -> dict[str, Path]:
        folder = self.path / "tokenizer"
        return {name: folder / name for name in TOKENIZER_FILES if (folder / name).is_file()}


def open_model_folder(path: str | Path) -> ModelFolder:
    root = Path(path)
    if not root.is_dir():
        raise ModelError(f"model folder {root} " + ("is a file" if root.exists() else "does not exist"),
                         "pass a diffusers folder, or --model tiny")
    index_path = root / "model_index.json"
    if not index_path.is_file():
        raise ModelError(f"{root} has no model_index.json: it is not a diffusers model folder",
                         "pass the folder that contains model_index.json, unet/, vae/, text_encoder/, tokenizer/")
    index = read_json(index_path)
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
    return ModelFolder(root, index, read_json(sched))


WEIGHT_FILES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                "text_encoder": "model.safetensors"}  # the one file diffusers' from_pretrained reads per sub-model
_SHARD = re.compile(r".*-\d+-of-\d+\.safetensors|.*\.safetensors\.index\.json")
_PICKLES = (".bin", ".ckpt", ".pt", ".pth")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON object of the model folder; anything else is a ModelError naming the file."""
    try:
        data = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as exc:
        raise ModelError(f"cannot read {path}: {getattr(exc, 'strerror', None) or str(exc)[:120]}",
                         "copy this file again from the original model") from None
    if not isinstance(data, dict):
        raise ModelError(f"{path} holds a JSON {type(data).__name__}, not an object",
                         "copy this file again from the original model")
    return data


def _check_weights(folder: Path, label: str) -> None:
    """The sub-model's weights are the one safetensors file diffusers reads (``WEIGHT_FILES``). Pickles are never
    loaded (loading one runs arbitrary code); fp16-variant-only and sharded folders are refused for now, saying what
    was found: diffusers would need a variant or shard index that pocketsd does not pass yet."""
    if not (folder / "config.json").is_file():
        raise ModelError(f"the model folder is missing its {label}: {folder / 'config.json'} not found",
                         f"copy the {folder.name}/ folder of the original model into the model folder")
    expected = WEIGHT_FILES[folder.name]
    if (folder / expected).is_file():
        return
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith((".safetensors", ".json", *_PICKLES)))
    shards = [n for n in names if _SHARD.fullmatch(n)]
    variants = [n for n in names if n.endswith(".safetensors") and n.startswith(expected[:-len(".safetensors")] + ".")]
    pickles = [n for n in names if n.endswith(_PICKLES)]
    if shards:
        raise ModelError(f"{folder} holds sharded weights ({_listed(shards)}), which pocketsd cannot read yet",
                         f"save the {label} as one file: load it with diffusers and save_pretrained(..., "
                         f"max_shard_size='100GB'), which writes {expected}", code="unsupported-weights")
    if variants:
        raise ModelError(f"{folder} has only variant weights ({_listed(variants)}), no {expected}",
                         f"rename {variants[0]} to {expected} (pocketsd loads it in float32), or save the model "
                         "again without variant=", code="unsupported-weights")
    if pickles:
        raise ModelError(f"no safetensors weights in {folder}",
                         f"only pickled weights found ({_listed(pickles)}); pocketsd never loads pickles — convert "
                         "them to safetensors first", code="unsupported-weights")
    raise ModelError(f"no {expected} in {folder}" + (f" (found: {_listed(names)})" if names else ""),
                     f"put the {label} weights, saved by diffusers' save_pretrained, in {folder}")


def _listed(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")


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
    from safetensors import SafetensorError

    try:
        module = cls.from_pretrained(folder.path / subfolder, use_safetensors=True, torch_dtype=torch.float32)
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
        # a truncated or foreign weights file, a config that does not fit the weights: the user's files, not our bug
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ModelError(f"cannot load the {subfolder} from {folder.path / subfolder}: {first}",
                         "copy this sub-model's folder again from the original model") from None
    return module.eval().requires_grad_(False)
