"""Export from one original-layout ``.safetensors`` checkpoint (``export --model m.safetensors --tokenizer DIR``).

A single file holds the weights only. The architecture is read from its tensors' names and shapes: every tensor must
be where, and of the shape, one of pocketsd's shipped configs (``model_configs/<arch>/``) puts it, through the name
mapping of export/original_layout.py; nothing is guessed or downloaded. The file is then converted offline by
diffusers' own single-file loaders (``from_single_file`` with the shipped configs written as a local config folder)
into a diffusers folder inside a temporary folder, which the normal export reads. The tokenizer is not in the file:
``--tokenizer`` names a ``tokenizer/`` folder of the same family. Pickled checkpoints (``.ckpt``, ``.pt``, ...) are
refused, never loaded: loading a pickle runs arbitrary code.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pocketsd.errors import ModelError
from pocketsd.export.model_loader import TOKENIZER_FILES, ModelFolder, open_model_folder, read_json
from pocketsd.export.original_layout import (
    FAMILY_PREFIXES,
    POSITION_IDS,
    PREFIXES,
    SD2_UNUSED,
    XL_UNUSED,
    layout_family,
    original_name,
    original_shape,
    prefixes_for,
    sd2_skipped_layer,
)
from pocketsd.export.random_model import ModelConfigs, builtin_configs, model_index
from pocketsd.export.tokenizer_files import BOS_TOKEN, EOS_TOKEN, load_clip_tokenizer, set_pad_token
from pocketsd.runtime.hashing import sha256_path

log = logging.getLogger(__name__)

# SD 1.x's original layout (CLIP ViT-L text encoder under cond_stage_model.transformer.), SD 2.x's (OpenCLIP-H under
# cond_stage_model.model.) and SDXL's (two text encoders under conditioner.embedders.). SDXL-Turbo files hold the same
# tensors as SDXL base and read as SDXL base (its scheduler config and 1024² size): export a Turbo model from its
# diffusers folder. An SD 2.x file does not say whether its UNet predicts noise (the 512² "base" models) or velocity
# (the 768² "v" models): --prediction-type must.
SINGLE_FILE_ARCHS = ("tiny", "tiny-inpaint", "sd15", "sd15-inpaint", "tiny-sd21", "sd21", "tiny-sdxl", "sdxl")
PREDICTION_TYPES = ("epsilon", "v_prediction")
# SD 2.x base models (epsilon) are 512² models: the UNet's sample size then, as diffusers' stable-diffusion-2-1-base
_BASE_SAMPLE_SIZE = {"sd21": 64}
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
_CONV_IN = PREFIXES["unet"] + "input_blocks.0.0.weight"
_FAMILY_MARKS = (("conditioner.embedders.", "sdxl"), ("cond_stage_model.model.", "sd2"))


def _tokens_key(family: str) -> str:
    local = "token_embedding.weight" if family == "sd2" else "text_model.embeddings.token_embedding.weight"
    return prefixes_for(family)["text_encoder"] + local


def _family(arch: str) -> str:
    configs = builtin_configs(arch)
    return layout_family(configs.text_encoder, configs.text_encoder_2)


def _is_xl(arch: str) -> bool:
    return _family(arch) == "sdxl"


def is_single_file(model: str) -> bool:
    """Whether ``--model`` names a checkpoint file rather than a diffusers folder or ``tiny``."""
    path = Path(model)
    return path.suffix.lower() in (".safetensors", *PICKLE_SUFFIXES) and not path.is_dir()


def read_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes of a safetensors file, from its header (no weights are read)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as weights:
            return {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise ModelError(f"cannot read {path} as safetensors: {first}",
                         "copy the checkpoint again; only .safetensors checkpoints are read") from None


@functools.lru_cache(maxsize=None)
def expected_shapes(arch: str) -> dict[str, tuple[int, ...]]:
    """Every tensor of ``arch``'s single file, by original name: the shipped configs' models built on the meta
    device (shapes only, no memory) and named by export/original_layout.py."""
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from pocketsd.export.open_clip_layout import open_clip_tensors

    configs = builtin_configs(arch)
    family = _family(arch)
    prefixes = prefixes_for(family)
    no_ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}  # shapes only: the ids do not matter
    with torch.device("meta"):
        models = {"unet": diffusers.UNet2DConditionModel(**configs.unet), "vae": diffusers.AutoencoderKL(**configs.vae),
                  "text_encoder": CLIPTextModel(CLIPTextConfig(**{**configs.text_encoder, **no_ids}))}
        if configs.text_encoder_2 is not None:
            second = CLIPTextModelWithProjection(CLIPTextConfig(**{**configs.text_encoder_2, **no_ids}))
            shapes = {prefixes["text_encoder_2"] + name: tuple(tensor.shape)
                      for name, tensor in open_clip_tensors(second.state_dict()).items()}
        else:
            shapes = {}
    if family == "sd2":
        shapes.update({prefixes["text_encoder"] + name: tuple(tensor.shape)
                       for name, tensor in open_clip_tensors(models.pop("text_encoder").state_dict()).items()})
    for sub, model in models.items():
        config = dict(model.config) if sub != "text_encoder" else {}
        for name, tensor in model.state_dict().items():
            shapes[original_name(sub, name, config, prefixes)] = original_shape(sub, name, tuple(tensor.shape))
    return shapes


def _differences(found: dict[str, tuple[int, ...]], arch: str) -> list[str]:
    expected = expected_shapes(arch)
    out = [f"{key} is missing" if key not in found else f"{key} is {found[key]} here, {shape} in {arch}"
           for key, shape in sorted(expected.items()) if found.get(key) != shape]
    ours = tuple(prefixes_for(_family(arch)).values())
    skipped = sd2_skipped_layer(int(builtin_configs(arch).text_encoder["num_hidden_layers"]))
    unused = (POSITION_IDS, *XL_UNUSED, *SD2_UNUSED)
    return out + [f"{key} is not in {arch}" for key in sorted(found) if key.startswith(ours) and key not in expected
                  and key not in unused and not key.startswith(skipped)]


def _signature(configs: ModelConfigs) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes of conv_in and the token embedding that ``configs`` give: a first sieve before comparing all."""
    unet, text = configs.unet, configs.text_encoder
    kernel = int(unet.get("conv_in_kernel", 3))
    return ((int(unet["block_out_channels"][0]), int(unet.get("in_channels", 4)), kernel, kernel),
            (int(text["vocab_size"]), int(text["hidden_size"])))


def _described(found: dict[str, tuple[int, ...]], family: str) -> str:
    conv_in, tokens = found.get(_CONV_IN), found.get(_tokens_key(family))
    context = next((shape[1] for key, shape in sorted(found.items()) if key.endswith(".attn2.to_k.weight")), None)
    parts = []
    if conv_in and len(conv_in) == 4:
        parts.append(f"a UNet of {conv_in[1]} input channels and width {conv_in[0]}"
                     + (f" with cross-attention {context}" if context else ""))
    if tokens and len(tokens) == 2:
        parts.append(f"a text encoder of width {tokens[1]} and {tokens[0]} tokens")
    return " and ".join(parts) or "no UNet input convolution or text token embedding"


def detect_arch(path: Path, found: dict[str, tuple[int, ...]]) -> str:
    """The one shipped architecture whose every tensor ``found`` (name → shape) holds; else a ModelError saying what
    the file is and what is supported."""
    supported = (f"single files pocketsd reads: {', '.join(SINGLE_FILE_ARCHS)} (SD 1.x's, SD 2.x's and SDXL's "
                 "original layouts)")
    hint = f"{supported}; export any other model from its diffusers folder"
    family = next((name for mark, name in _FAMILY_MARKS if any(key.startswith(mark) for key in found)), "sd1")
    if not any(key.startswith(tuple(prefixes_for(family).values())) for key in found):
        example = min(found, default="none")
        lora = any("lora" in key.lower() for key in found)
        known = sorted({prefix for prefixes in FAMILY_PREFIXES.values() for prefix in prefixes.values()})
        raise ModelError(f"{path.name} matches no architecture pocketsd knows: none of its {len(found)} tensors is "
                         f"under {', '.join(known)} (e.g. {example})",
                         "it looks like a LoRA: give it to --lora" if lora else hint, code="unknown-checkpoint")
    sieved = [arch for arch in SINGLE_FILE_ARCHS if _family(arch) == family
              and _signature(builtin_configs(arch)) == (found.get(_CONV_IN), found.get(_tokens_key(family)))]
    differences = {arch: _differences(found, arch) for arch in sieved}
    matches = [arch for arch, diff in differences.items() if not diff]
    if matches:
        return matches[0]
    closest = ""
    if differences:
        arch, diff = min(differences.items(), key=lambda item: len(item[1]))
        more = f" (and {len(diff) - 1} more differences)" if len(diff) > 1 else ""
        closest = f"; closest is {arch}, but {diff[0]}{more}"
    raise ModelError(f"{path.name} matches no architecture pocketsd knows: it holds {_described(found, family)}"
                     f"{closest}",
                     hint, code="unknown-checkpoint")


def check_tokenizer(tokenizer: str | None, checkpoint: Path, vocab_rows: int) -> Path:
    """``--tokenizer``: a folder with a CLIP ``vocab.json`` and ``merges.txt`` whose ids fit the text encoder."""
    hint = ("pass --tokenizer DIR: the tokenizer/ folder (vocab.json, merges.txt) of a diffusers model of the same "
            "family, e.g. SD 1.5's")
    if tokenizer is None:
        raise ModelError(f"{checkpoint.name} is a single-file checkpoint, which holds no tokenizer", hint,
                         code="tokenizer")
    folder = Path(tokenizer)
    if not folder.is_dir():
        raise ModelError(f"--tokenizer {folder} " + ("is a file" if folder.exists() else "does not exist"), hint,
                         code="tokenizer")
    for name in ("vocab.json", "merges.txt"):
        if not (folder / name).is_file():
            raise ModelError(f"--tokenizer {folder} has no {name}", hint, code="tokenizer")
    vocab = read_json(folder / "vocab.json")
    ids = [i for i in vocab.values() if isinstance(i, int) and not isinstance(i, bool)]
    if len(ids) != len(vocab) or BOS_TOKEN not in vocab or EOS_TOKEN not in vocab:
        raise ModelError(f"{folder / 'vocab.json'} is not a CLIP vocabulary (token → id, with {BOS_TOKEN} and "
                         f"{EOS_TOKEN})", hint, code="tokenizer")
    if max(ids) >= vocab_rows:
        raise ModelError(f"--tokenizer {folder} has token ids up to {max(ids)}, but the text encoder of "
                         f"{checkpoint.name} has {vocab_rows} token embeddings", hint, code="tokenizer")
    try:  # now, naming the user's folder, rather than when the bundle's tokenizer.json is written from the copy
        load_clip_tokenizer(folder)
    except ModelError as exc:
        raise ModelError(exc.message, hint, code="tokenizer") from None
    return folder


def _write_config_folder(configs: ModelConfigs, tokenizer: Path, out: Path) -> None:
    """A diffusers folder without weights: the shipped configs (completed as ``random-model`` completes them, so
    the converted folder equals the random model's), the user's tokenizer (SDXL: twice, the second with ``!`` as its
    pad token, as SDXL ships it) and the arch's scheduler."""
    import diffusers
    from transformers import CLIPTextConfig

    tokenizers = ["tokenizer", *(["tokenizer_2"] if configs.text_encoder_2 is not None else [])]
    for folder in tokenizers:
        (out / folder).mkdir(parents=True)
        for name in TOKENIZER_FILES:
            if (tokenizer / name).is_file():
                shutil.copyfile(tokenizer / name, out / folder / name)
    if configs.text_encoder_2 is not None:
        set_pad_token(out / "tokenizer_2", configs.extra.get("tokenizer_2_pad_token", "!"))
    if "tokenizer_pad_token" in configs.extra:  # SD 2.x's tokenizer pads with "!"
        set_pad_token(out / "tokenizer", configs.extra["tokenizer_pad_token"])
    vocab = read_json(out / "tokenizer" / "vocab.json")
    special = {"bos_token_id": vocab[BOS_TOKEN], "eos_token_id": vocab[EOS_TOKEN], "pad_token_id": vocab[EOS_TOKEN]}
    CLIPTextConfig(**{**configs.text_encoder, **special}).save_pretrained(out / "text_encoder")
    if configs.text_encoder_2 is not None:
        CLIPTextConfig(**{**configs.text_encoder_2, **special}).save_pretrained(out / "text_encoder_2")
    for sub, config in (("unet", configs.unet), ("vae", configs.vae)):
        (out / sub).mkdir()
        (out / sub / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    scheduler = configs.scheduler.get("_class_name", "PNDMScheduler")
    getattr(diffusers, scheduler).from_config(configs.scheduler).save_pretrained(out / "scheduler")
    index = model_index(diffusers.__version__, scheduler,
                        configs.extra.get("pipeline_class", "StableDiffusionPipeline"), configs)
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")  # as random-model writes it


def _configs_for(arch: str, prediction_type: str | None) -> ModelConfigs:
    """``arch``'s shipped configs, with the scheduler's ``prediction_type`` given (and for an SD 2.x base model, its
    512² sample size)."""
    configs = builtin_configs(arch)
    if prediction_type is None or prediction_type == configs.scheduler.get("prediction_type", "epsilon"):
        return configs
    unet = dict(configs.unet)
    if prediction_type == "epsilon" and arch in _BASE_SAMPLE_SIZE:
        unet["sample_size"] = _BASE_SAMPLE_SIZE[arch]
    return dataclasses.replace(configs, unet=unet, scheduler={**configs.scheduler, "prediction_type": prediction_type})


def convert_single_file(checkpoint: Path, arch: str, tokenizer: Path, out: Path, progress: bool = False,
                        prediction_type: str | None = None) -> Path:
    """Write ``checkpoint`` (of architecture ``arch``) as a diffusers folder ``out`` by diffusers' single-file
    loaders, offline: the config they read is the local folder written first, so nothing is looked up elsewhere."""
    import diffusers
    import transformers
    from diffusers.loaders.single_file_utils import SingleFileComponentError, create_diffusers_clip_model_from_ldm
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import CLIPTextModel

    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.disable_progress_bar()
    _write_config_folder(_configs_for(arch, prediction_type), tokenizer, out)
    config = dict(config=str(out), local_files_only=True)
    loaders = {"unet": lambda state: diffusers.UNet2DConditionModel.from_single_file(state, subfolder="unet", **config),
               "vae": lambda state: diffusers.AutoencoderKL.from_single_file(state, subfolder="vae", **config),
               "text_encoder": lambda state: create_diffusers_clip_model_from_ldm(
                   CLIPTextModel, state, subfolder="text_encoder", **config)}
    if _family(arch) == "sd2":
        loaders["text_encoder"] = lambda state: _open_clip_text_encoder(state, out / "text_encoder", "sd2")
    if _is_xl(arch):
        loaders["text_encoder_2"] = lambda state: _open_clip_text_encoder(state, out / "text_encoder_2", "sdxl")
    with tqdm(total=1 + len(loaders), desc="convert", unit="step", disable=not progress) as bar:
        try:
            state = load_file(str(checkpoint))  # read once, then each sub-model takes its part
            bar.update()
            for sub, load in loaders.items():
                bar.set_postfix_str(sub)
                load(state).save_pretrained(out / sub, safe_serialization=True)
                bar.update()
        except (SafetensorError, SingleFileComponentError, OSError, ValueError, RuntimeError, KeyError) as exc:
            first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise ModelError(f"cannot convert {checkpoint}: {first}", "copy the checkpoint again") from None
    return out


def _open_clip_text_encoder(state: dict[str, Any], config_dir: Path, family: str) -> Any:
    """A text encoder stored in OpenCLIP's layout, by diffusers' OpenCLIP converter called directly, loaded strictly:
    SDXL's second (its single-file loader takes the first encoder's tensors for the second whenever the two are as
    wide, true of tiny-sdxl, as it picks the branch by that width alone) or SD 2.x's, without the layer SD 2.x skips
    and the projection it does not use (diffusers ignores them by name for 24-layer models only)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig.from_pretrained(config_dir)
    model = (CLIPTextModelWithProjection if family == "sdxl" else CLIPTextModel)(config)
    prefix = "text_encoder_2" if family == "sdxl" else "text_encoder"
    converted = convert_open_clip_checkpoint(model, state, prefix=prefixes_for(family)[prefix])
    if family == "sd2":
        skipped = f"encoder.layers.{config.num_hidden_layers}."
        converted = {key: value for key, value in converted.items()
                     if skipped not in key and not key.endswith("text_projection.weight")}
    if not any(key.startswith("text_model.") for key in model.state_dict()):
        converted = {key.removeprefix("text_model."): value for key, value in converted.items()}
    missing, unexpected = model.load_state_dict(converted, strict=False)
    missing = [key for key in missing if not key.endswith("position_ids")]
    if missing or unexpected:
        raise KeyError(f"the {prefix.replace('_', ' ')}'s tensors do not fit: missing {missing[:3]}, unexpected "
                       f"{unexpected[:3]}")
    return model


def open_single_file(model: str, tokenizer: str | None, variant: str | None, stack: ExitStack,
                     progress: bool = False, prediction_type: str | None = None) -> tuple[ModelFolder, dict[str, Any]]:
    """The checkpoint ``model`` converted into a temporary diffusers folder (removed when ``stack`` closes), and
    the manifest's ``model`` fields naming where it came from."""
    path = Path(model)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise ModelError(f"{path} is a pickled checkpoint: pocketsd never loads pickles (loading one runs arbitrary "
                         "code)", "use the model's .safetensors checkpoint, or its diffusers folder",
                         code="unsupported-weights")
    if not path.is_file():
        raise ModelError(f"checkpoint {path} does not exist", "pass a .safetensors file or a diffusers folder")
    if variant is not None:
        raise ModelError(f"--variant {variant} picks among a diffusers folder's weight files; {path.name} is one file",
                         "leave out --variant")
    if prediction_type is not None and prediction_type not in PREDICTION_TYPES:
        raise ModelError(f"--prediction-type {prediction_type} is not one of {', '.join(PREDICTION_TYPES)}",
                         "epsilon for noise-predicting models (SD 1.x, SD 2.x base), v_prediction for SD 2.x 768-v")
    found = read_shapes(path)
    arch = detect_arch(path, found)
    if _family(arch) == "sd2" and prediction_type is None:
        raise ModelError(f"{path.name} is an SD 2.x checkpoint ({arch}), and its weights do not say whether it "
                         "predicts noise or velocity", "pass --prediction-type v_prediction for a 768² 'v' model "
                         "(SD 2.0-v, 2.1), --prediction-type epsilon for a 512² base model (SD 2.0-base, 2.1-base)",
                         code="prediction-type")
    tokenizer_dir = check_tokenizer(tokenizer, path, found[_tokens_key(_family(arch))][0])
    log.info("%s: original-layout %s checkpoint", path, arch)
    tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pocketsd-single-file-")))
    folder = open_model_folder(convert_single_file(path, arch, tokenizer_dir, tmp / "model", progress,
                                                   prediction_type))
    source = {"source": str(path.resolve()), "name": path.stem,
              "single_file": {"file": path.name, "sha256": sha256_path(path), "arch": arch,
                              "tokenizer": str(tokenizer_dir.resolve()),
                              **({"prediction_type": prediction_type} if prediction_type else {})}}
    return folder, source
