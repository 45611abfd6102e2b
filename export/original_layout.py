"""Stable Diffusion 1.x's, 2.x's and SDXL's original key layouts: one ``.safetensors`` file holding the whole model
under the names of the CompVis/LDM (SDXL: Stability's SGM) code that trained it, as single-file checkpoints are
shared.

Three prefixes, one per sub-model: ``model.diffusion_model.`` (the UNet: ``input_blocks``, ``middle_block``,
``output_blocks``), ``first_stage_model.`` (the VAE: ``encoder.down.N.block.M``, ``decoder.up.N`` numbered from the
bottom, ``mid.attn_1`` with 1x1-conv ``q``/``k``/``v``/``proj_out``) and ``cond_stage_model.transformer.`` (the CLIP
ViT-L text encoder, transformers' names under ``text_model.``). SD 2.x keeps the UNet's and VAE's names and stores
its OpenCLIP-H text encoder under ``cond_stage_model.model.`` in OpenCLIP's layout (export/open_clip_layout.py), with
the last of its 24 layers, which SD 2.x skips (it reads the penultimate states) and diffusers' 23-layer text encoder
does not have, its ``text_projection`` and its ``logit_scale``. SDXL keeps the UNet's and VAE's names (its UNet adds
``label_emb``) and stores its text encoders under ``conditioner.embedders.0.transformer.`` (as SD 1.x's) and
``conditioner.embedders.1.model.`` (OpenCLIP's layout: export/open_clip_layout.py). ``original_name`` maps each
diffusers tensor name to its original one; the writer (``pocketsd random-model --single-file``) and the reader's
architecture check (export/single_file.py) both use it, so the two cannot disagree. The round trip through diffusers'
own single-file loader is exact (tests/export/test_single_file.py).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Iterator

from pocketsd.errors import InternalError, ModelError, OutputError
from pocketsd.export.model_loader import ModelFolder, open_model_folder, read_json, weight_layouts

log = logging.getLogger(__name__)

PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
            "text_encoder": "cond_stage_model.transformer."}
XL_PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
               "text_encoder": "conditioner.embedders.0.transformer.",
               "text_encoder_2": "conditioner.embedders.1.model."}
# The text encoder's position ids: a buffer, not a weight, but original checkpoints carry it (int64, 1 x length)
POSITION_IDS = "cond_stage_model.transformer.text_model.embeddings.position_ids"
XL_POSITION_IDS = "conditioner.embedders.0.transformer.text_model.embeddings.position_ids"
# OpenCLIP's temperature: SDXL files carry it, no diffusers model has it
XL_UNUSED = (XL_POSITION_IDS, "conditioner.embedders.1.model.logit_scale")
SD2_PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
                "text_encoder": "cond_stage_model.model."}
# What SD 2.x files carry beside diffusers' text encoder: OpenCLIP's temperature and text projection (unused: SD 2.x
# conditions on the penultimate layer's states), and that last layer itself (``resblocks.{layers}.``, sd2_skipped_layer)
SD2_LOGIT_SCALE, SD2_PROJECTION = "cond_stage_model.model.logit_scale", "cond_stage_model.model.text_projection"
SD2_UNUSED = (SD2_LOGIT_SCALE, SD2_PROJECTION)
FAMILY_PREFIXES = {"sd1": PREFIXES, "sd2": SD2_PREFIXES, "sdxl": XL_PREFIXES}
SD1_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline")
XL_PIPELINE = "StableDiffusionXLPipeline"

_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "norm2": "out_layers.0",
           "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_VAE_TOP = {"conv_norm_out": "norm_out", "conv_in": "conv_in", "conv_out": "conv_out"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_BLOCK = re.compile(r"(?P<side>down|up)_blocks\.(?P<block>\d+)\.(?P<part>resnets|attentions|downsamplers|upsamplers)"
                    r"\.(?P<index>\d+)\.(?P<rest>.+)")
_VAE_BLOCK = re.compile(r"(?P<coder>encoder|decoder)\.(?P<side>down|up)_blocks\.(?P<block>\d+)\."
                        r"(?P<part>resnets|downsamplers|upsamplers)\.(?P<index>\d+)\.(?P<rest>.+)")
_VAE_MID = re.compile(r"(?P<coder>encoder|decoder)\.mid_block\.(?P<part>resnets|attentions)\.(?P<index>\d+)\."
                      r"(?P<rest>.+)")


def _resnet(rest: str) -> str:
    layer, _, tail = rest.partition(".")
    return f"{_RESNET[layer]}.{tail}"


def _unet_name(name: str, config: dict[str, Any]) -> str:
    """LDM numbers the UNet's blocks in one sequence per side: ``input_blocks.0`` is conv_in, then each level has
    ``layers_per_block`` (resnet, attention) pairs and, but the last, one downsampler; ``output_blocks`` has one pair
    more per level, the level's upsampler sitting after the pair's attention (``.2``) or its resnet (``.1``)."""
    head, _, tail = name.rpartition(".")
    if head in _UNET_TOP:
        return f"{_UNET_TOP[head]}.{tail}"
    layers = int(config["layers_per_block"])
    if m := _BLOCK.fullmatch(name):
        block, index, rest = int(m["block"]), int(m["index"]), m["rest"]
        if m["side"] == "down":
            first = 1 + block * (layers + 1)
            return {"resnets": lambda: f"input_blocks.{first + index}.0.{_resnet(rest)}",
                    "attentions": lambda: f"input_blocks.{first + index}.1.{rest}",
                    "downsamplers": lambda: f"input_blocks.{first + layers}.0.op.{rest.removeprefix('conv.')}",
                    }[m["part"]]()
        first = block * (layers + 1)
        upsampler_at = 2 if "CrossAttn" in config["up_block_types"][block] else 1
        return {"resnets": lambda: f"output_blocks.{first + index}.0.{_resnet(rest)}",
                "attentions": lambda: f"output_blocks.{first + index}.1.{rest}",
                "upsamplers": lambda: f"output_blocks.{first + layers}.{upsampler_at}.{rest}"}[m["part"]]()
    if m := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", name):
        part, index, rest = m.group(1), int(m.group(2)), m.group(3)
        return f"middle_block.{2 * index}.{_resnet(rest)}" if part == "resnets" else f"middle_block.1.{rest}"
    raise InternalError(f"no original-layout name for the UNet tensor {name}")


def _vae_name(name: str, config: dict[str, Any]) -> str:
    """The decoder's ``up.N`` counts from the lowest resolution's block upwards: diffusers' ``up_blocks.0`` is the
    last one. ResNet shortcuts are ``nin_shortcut``, mid-block resnets ``block_1``/``block_2``."""
    if m := _VAE_BLOCK.fullmatch(name):
        block = int(m["block"]) if m["side"] == "down" else len(config["block_out_channels"]) - 1 - int(m["block"])
        where = f"{m['coder']}.{m['side']}.{block}"
        if m["part"] == "resnets":
            return f"{where}.block.{m['index']}.{m['rest'].replace('conv_shortcut', 'nin_shortcut')}"
        return f"{where}.{'downsample' if m['side'] == 'down' else 'upsample'}.{m['rest']}"
    if m := _VAE_MID.fullmatch(name):
        if m["part"] == "resnets":
            return f"{m['coder']}.mid.block_{int(m['index']) + 1}.{m['rest']}"
        layer, _, tail = m["rest"].rpartition(".")
        return f"{m['coder']}.mid.attn_1.{_VAE_ATTENTION[layer]}.{tail}"
    coder, _, rest = name.partition(".")
    head, _, tail = rest.rpartition(".")
    if coder in ("encoder", "decoder") and head in _VAE_TOP:
        return f"{coder}.{_VAE_TOP[head]}.{tail}"
    if name.split(".")[0] in ("quant_conv", "post_quant_conv"):
        return name
    raise InternalError(f"no original-layout name for the VAE tensor {name}")


def prefixes_for(family: str) -> dict[str, str]:
    return FAMILY_PREFIXES[family]


def layout_family(text_encoder: dict[str, Any], text_encoder_2: dict[str, Any] | None) -> str:
    """``sdxl`` (two text encoders), ``sd2`` (an OpenCLIP text encoder: gelu) or ``sd1`` (CLIP ViT-L: quick_gelu)."""
    if text_encoder_2 is not None:
        return "sdxl"
    return "sd2" if text_encoder.get("hidden_act") == "gelu" else "sd1"


def sd2_skipped_layer(layers: int) -> str:
    """The name prefix of the OpenCLIP layer an SD 2.x file holds after diffusers' ``layers`` text-encoder layers."""
    return f"{SD2_PREFIXES['text_encoder']}transformer.resblocks.{layers}."


def original_name(sub: str, name: str, config: dict[str, Any], prefixes: dict[str, str] = PREFIXES) -> str:
    """The original-layout name of the diffusers tensor ``name`` of sub-model ``sub`` (with its ``config``); SDXL's
    second text encoder is renamed as a whole (open_clip_tensors), not tensor by tensor."""
    if sub == "unet":
        local = _unet_name(name, config)
    elif sub == "vae":
        local = _vae_name(name, config)
    elif sub == "text_encoder":  # transformers ≥ 5.6 saves CLIPTextModel without its text_model. level
        local = name if name.startswith("text_model.") else f"text_model.{name}"
    else:
        raise InternalError(f"no original layout for the sub-model {sub!r}")
    return prefixes[sub] + local


def original_shape(sub: str, name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The VAE's mid-block attention projections are 1x1 convolutions in the original code, linear in diffusers."""
    if sub == "vae" and ".mid_block.attentions." in name and name.endswith(".weight") and len(shape) == 2:
        return (*shape, 1, 1)
    return shape


def layout_problem(unet: dict[str, Any], text_encoder: dict[str, Any], pipeline: str | None) -> str:
    """Why a model has none of SD 1.x's, SD 2.x's and SDXL's original layouts ("" when it has one)."""
    if pipeline == XL_PIPELINE:
        return "" if unet.get("addition_embed_type") == "text_time" else "an SDXL pipeline without SDXL's UNet"
    if pipeline not in SD1_PIPELINES:
        return f"a {pipeline}, not an SD 1.x, 2.x or SDXL pipeline ({', '.join((*SD1_PIPELINES, XL_PIPELINE))})"
    if text_encoder.get("hidden_act") not in ("quick_gelu", "gelu"):
        return (f"its text encoder is neither CLIP ViT-L's kind nor OpenCLIP's (hidden_act "
                f"{text_encoder.get('hidden_act')!r}, not 'quick_gelu' or 'gelu')")
    extra = [k for k in ("class_embed_type", "addition_embed_type", "encoder_hid_dim") if unet.get(k) is not None]
    if extra:
        return f"its UNet has {', '.join(extra)}, which SD 1.x's layout has no names for"
    return ""


def _weight_files(folder: ModelFolder, sub: str) -> list[Path]:
    """The safetensors file(s) of one sub-model, as ``from_pretrained`` would pick them."""
    layout = weight_layouts(folder.path / sub)[folder.variants.get(sub)]
    if layout.endswith(".json"):
        shards = sorted(set(read_json(folder.path / sub / layout)["weight_map"].values()))
        return [folder.path / sub / shard for shard in shards]
    return [folder.path / sub / layout]


def _original_tensors(folder: ModelFolder) -> Iterator[tuple[str, Any]]:
    """(original name, tensor) for every weight of the folder, with the position ids original files carry."""
    import torch
    from safetensors import safe_open

    from pocketsd.export.open_clip_layout import open_clip_tensors

    xl = folder.model_index.get("_class_name") == XL_PIPELINE
    family = layout_family(folder.config("text_encoder"), {} if xl else None)
    prefixes = prefixes_for(family)
    for sub, prefix in prefixes.items():
        config = folder.config(sub)
        for path in _weight_files(folder, sub):
            with safe_open(str(path), framework="pt") as weights:
                if sub == "text_encoder_2" or (family == "sd2" and sub == "text_encoder"):
                    state = {name: weights.get_tensor(name) for name in weights.keys()}
                    yield from ((prefix + name, tensor) for name, tensor in open_clip_tensors(state).items())
                    if sub == "text_encoder":
                        yield from _sd2_extras(state, int(config["num_hidden_layers"]))
                    continue
                for name in weights.keys():
                    tensor = weights.get_tensor(name)
                    yield (original_name(sub, name, config, prefixes),
                           tensor.reshape(original_shape(sub, name, tuple(tensor.shape))))
    if family != "sd2":  # OpenCLIP has no position ids buffer
        length = int(folder.config("text_encoder")["max_position_embeddings"])
        yield XL_POSITION_IDS if xl else POSITION_IDS, torch.arange(length, dtype=torch.int64).unsqueeze(0)


def _sd2_extras(state: dict[str, Any], layers: int) -> Iterator[tuple[str, Any]]:
    """What an SD 2.x file holds beside diffusers' text encoder, so that a written file reads as a real one: the
    layer SD 2.x skips (a copy of the last kept layer here: only its names and shapes matter, no reader uses it), the
    text projection (identity) and OpenCLIP's temperature (its initial value, log(1/0.07))."""
    import math

    import torch

    from pocketsd.export.open_clip_layout import open_clip_tensors

    last = f"encoder.layers.{layers - 1}."
    copied = {name.replace(last, "encoder.layers.0."): tensor for name, tensor in state.items() if last in name}
    skipped = sd2_skipped_layer(layers)
    for name, tensor in open_clip_tensors(copied).items():  # cloned: safetensors refuses tensors sharing memory
        yield skipped + name.removeprefix("transformer.resblocks.0."), tensor.clone()
    width = int(state[next(k for k in state if k.endswith("token_embedding.weight"))].shape[1])
    yield SD2_PROJECTION, torch.eye(width)
    yield SD2_LOGIT_SCALE, torch.tensor(math.log(1 / 0.07))


def check_single_file_target(path: str | Path) -> Path:
    """Refuse a target that is not a new ``.safetensors`` file in an existing folder (before anything is built)."""
    target = Path(path)
    if target.suffix != ".safetensors":
        raise OutputError(f"--single-file {target}: the checkpoint must be a .safetensors file",
                          "name it e.g. model.safetensors")
    if target.exists() or not target.parent.is_dir():
        raise OutputError(f"cannot write {target}: " + ("it already exists" if target.exists() else
                          f"{target.parent} is not a folder"), "give a new file name in an existing folder")
    return target


def write_original_layout(model_dir: str | Path, target: str | Path) -> Path:
    """Write the SD 1.x, 2.x or SDXL diffusers folder ``model_dir`` as one original-layout ``.safetensors`` file at
    ``target``, completely or not at all (written beside it under a temporary name, then renamed)."""
    from safetensors.torch import save_file

    out = check_single_file_target(target)
    folder = open_model_folder(model_dir)
    problem = layout_problem(folder.config("unet"), folder.config("text_encoder"),
                             folder.model_index.get("_class_name"))
    if problem:
        raise ModelError(f"{folder.path} cannot be written in an original layout: {problem}",
                         "only SD 1.x, 2.x and SDXL models are written so (random-model --arch tiny, tiny-inpaint, "
                         "sd15, sd15-inpaint, tiny-sd21, sd21, tiny-sdxl or sdxl)", code="unsupported-model")
    tensors = dict(_original_tensors(folder))
    partial = out.with_name(f".{out.name}.partial-{os.getpid()}")
    try:
        save_file(tensors, str(partial), metadata={"format": "pt"})
        umask = os.umask(0)  # safetensors creates the file 0600; give it what a plain open() would
        os.umask(umask)
        partial.chmod(0o666 & ~umask)
        partial.rename(out)
    except BaseException as exc:
        partial.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OutputError(f"cannot write {out}: {exc.strerror or exc}", "free some disk space, or choose a "
                              "writable folder") from None
        raise
    log.info("wrote %d tensors of %s in the original layout to %s", len(tensors), folder.path, out)
    return out
