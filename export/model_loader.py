"""Open a diffusers Stable Diffusion folder and load its sub-models for export.

Only safetensors weights are read: a folder that has only pickled ``.bin`` weights is refused with a hint, because
loading pickles runs arbitrary code. Each sub-model's weights may be one file or shards with their index, in
diffusers' names, full precision or a variant (``fp16``): ``--variant`` picks one, and without it a sub-model whose
only weights are one variant uses that one. Loading itself is diffusers' and transformers' ``from_pretrained``.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pocketsd.errors import ModelError

log = logging.getLogger(__name__)

SUPPORTED_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline",
                       "StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline",
                       "LatentConsistencyModelPipeline")
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
_SUBFOLDERS = {"unet": "UNet", "vae": "VAE", "text_encoder": "text encoder"}
_SDXL_SUBFOLDERS = {**_SUBFOLDERS, "text_encoder_2": "second text encoder"}


@dataclass(frozen=True)
class ModelFolder:
    """A checked diffusers folder: what it contains, before anything heavy is loaded."""

    path: Path
    model_index: dict[str, Any]
    scheduler_config: dict[str, Any]
    variants: dict[str, str | None] = field(default_factory=dict)  # sub-model -> weights variant loaded (None: full)

    def config(self, subfolder: str) -> dict[str, Any]:
        return read_json(self.path / subfolder / "config.json")

    @property
    def family(self) -> str:
        """``sdxl`` for a model with SDXL's two text encoders and added conditioning, else ``sd`` (SD 1.x / 2.x)."""
        return family_of(self.model_index.get("_class_name"))

    @property
    def tokenizers(self) -> tuple[str, ...]:
        """The tokenizer folders, one per text encoder in order."""
        return ("tokenizer", "tokenizer_2") if self.family == "sdxl" else ("tokenizer",)

    def tokenizer_files(self, subfolder: str = "tokenizer") -> dict[str, Path]:
        folder = self.path / subfolder
        return {name: folder / name for name in TOKENIZER_FILES if (folder / name).is_file()}


def family_of(pipeline_class: Any) -> str:
    """``sdxl`` for diffusers' SDXL pipeline classes (two text encoders, added conditioning), else ``sd``."""
    return "sdxl" if "XL" in str(pipeline_class) else "sd"


def open_model_folder(path: str | Path, variant: str | None = None) -> ModelFolder:
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
    if variant is not None and not _VARIANT_NAME.fullmatch(variant):
        raise ModelError(f"--variant {variant!r} is not a weights variant name", "use e.g. --variant fp16")
    sdxl = family_of(kind) == "sdxl"
    first = index.get("text_encoder")
    if sdxl and not (isinstance(first, list) and first and first[0]):
        raise ModelError(f"{root} has no first text encoder (an SDXL refiner?): pocketsd exports text-to-image "
                         "models with their text encoders", "export the SDXL base model", code="unsupported-model")
    subfolders = _SDXL_SUBFOLDERS if sdxl else _SUBFOLDERS
    variants = {sub: _weights_variant(root / sub, label, variant) for sub, label in subfolders.items()}
    for tok in (root / "tokenizer", root / "tokenizer_2") if sdxl else (root / "tokenizer",):
        for name in ("vocab.json", "merges.txt"):
            if not (tok / name).is_file():
                raise ModelError(f"{root} is missing its {tok.name}: {tok / name} not found",
                                 f"copy the {tok.name}/ folder of the original model into the model folder")
    sched = root / "scheduler" / "scheduler_config.json"
    if not sched.is_file():
        raise ModelError(f"{root} is missing its scheduler: {sched} not found",
                         "copy the scheduler/ folder of the original model into the model folder")
    return ModelFolder(root, index, read_json(sched), variants)


# diffusers' name for each sub-model's full-precision weights
WEIGHT_FILES = {"unet": "diffusion_pytorch_model.safetensors", "vae": "diffusion_pytorch_model.safetensors",
                "text_encoder": "model.safetensors", "text_encoder_2": "model.safetensors"}
_VARIANT_NAME = re.compile(r"[A-Za-z0-9_]{1,32}")
_PICKLES = (".bin", ".ckpt", ".pt", ".pth")


def weight_layouts(folder: Path) -> dict[str | None, str]:
    """The loadable weights in a sub-model folder, by variant (None: full precision): each the file
    ``from_pretrained`` opens first (the single file, or the shard index naming the shards), in diffusers' names:
    ``model.safetensors`` / ``model.safetensors.index.json``, ``model.fp16.safetensors`` /
    ``model.safetensors.index.fp16.json``. A shard index whose shards are not all there does not count."""
    stem = WEIGHT_FILES[folder.name][:-len(".safetensors")]
    single = re.compile(re.escape(stem) + r"(?:\.(?P<v>[A-Za-z0-9_]{1,32}))?\.safetensors")
    index = re.compile(re.escape(stem) + r"\.safetensors\.index(?:\.(?P<v>[A-Za-z0-9_]{1,32}))?\.json")
    found: dict[str | None, str] = {}
    for name in sorted(p.name for p in folder.iterdir() if p.is_file()):
        if m := single.fullmatch(name):
            found.setdefault(m["v"], name)
        elif (m := index.fullmatch(name)) and _shards_present(folder / name):
            found.setdefault(m["v"], name)
    return found


def _shards_present(index: Path) -> bool:
    try:
        weight_map = json.loads(index.read_bytes()).get("weight_map")
    except (OSError, ValueError, AttributeError, RecursionError):
        return False
    if not isinstance(weight_map, dict) or not weight_map:
        return False
    shards = set(weight_map.values())
    return all(isinstance(s, str) and "/" not in s and (index.parent / s).is_file() for s in shards)


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


def _weights_variant(folder: Path, label: str, wanted: str | None) -> str | None:
    """Which weights of this sub-model to load: ``wanted`` (a variant name) where given, else the full-precision
    weights, else the one variant there is. Pickles are never loaded (loading one runs arbitrary code)."""
    if not (folder / "config.json").is_file():
        raise ModelError(f"the model folder is missing its {label}: {folder / 'config.json'} not found",
                         f"copy the {folder.name}/ folder of the original model into the model folder")
    layouts = weight_layouts(folder)
    have = ", ".join(sorted("full precision" if v is None else v for v in layouts)) or "none"
    if wanted is not None:
        if wanted not in layouts:
            raise ModelError(f"variant {wanted!r} is not there: {folder} has no {wanted} weights (weights found: "
                             f"{have})", "leave out --variant to load the full-precision weights"
                             if None in layouts else f"pass one of: {have}", code="unsupported-weights")
        return wanted
    if None in layouts:
        return None
    if len(layouts) == 1:
        (only,) = layouts
        log.info("%s: only %s weights found (%s); loading them in float32", folder, only, layouts[only])
        return only
    if layouts:
        raise ModelError(f"{folder} has several weight variants ({have}) and no full-precision weights",
                         f"choose one with --variant, e.g. --variant {sorted(layouts)[0]}", code="unsupported-weights")
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith((".safetensors", ".json", *_PICKLES)))
    pickles = [n for n in names if n.endswith(_PICKLES)]
    if pickles:
        raise ModelError(f"no safetensors weights in {folder}",
                         f"only pickled weights found ({_listed(pickles)}); pocketsd never loads pickles — convert "
                         "them to safetensors first", code="unsupported-weights")
    shards = [n for n in names if re.fullmatch(r".*-\d+-of-\d+\.safetensors|.*\.index(\.\w+)?\.json", n)]
    if shards:
        raise ModelError(f"{folder} holds incomplete sharded weights ({_listed(shards)}): the shard index or a shard "
                         "it names is missing", "copy this sub-model's folder again from the original model",
                         code="unsupported-weights")
    raise ModelError(f"no {WEIGHT_FILES[folder.name]} in {folder}" + (f" (found: {_listed(names)})" if names else ""),
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
    elif subfolder == "text_encoder_2":
        from transformers import CLIPTextModelWithProjection as cls
    elif subfolder == "unet":
        from diffusers import UNet2DConditionModel as cls
    elif subfolder == "vae":
        from diffusers import AutoencoderKL as cls
    else:
        raise ModelError(f"unknown sub-model {subfolder!r}")
    log.info("loading %s from %s", subfolder, folder.path / subfolder)
    from safetensors import SafetensorError

    try:
        module = cls.from_pretrained(folder.path / subfolder, use_safetensors=True, torch_dtype=torch.float32,
                                     variant=folder.variants.get(subfolder))
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
        # a truncated or foreign weights file, a config that does not fit the weights: the user's files, not our bug
        first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        raise ModelError(f"cannot load the {subfolder} from {folder.path / subfolder}: {first}",
                         "copy this sub-model's folder again from the original model") from None
    return module.eval().requires_grad_(False)
