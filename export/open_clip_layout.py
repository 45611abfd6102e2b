"""OpenCLIP's tensor layout, in which SDXL's original checkpoints store their second text encoder
(``conditioner.embedders.1.model.``) and SD 2.x's their only one (``cond_stage_model.model.``): transformers'
``CLIPTextModelWithProjection`` (``CLIPTextModel`` for SD 2.x) weights renamed, each layer's q/k/v projections fused
into one ``in_proj`` tensor, the projection stored transposed.

The names are diffusers' own table (``DIFFUSERS_TO_LDM_MAPPING["openclip"]``, the one its single-file loader reads
with), inverted, so that what ``random-model --single-file`` writes is what that loader reads; the fusing and the
transpose are the inverse of ``convert_open_clip_checkpoint``, and tests/export/test_single_file.py checks the round
trip bit for bit.
"""

from __future__ import annotations

import re
from typing import Any

from pocketsd.errors import InternalError

_ATTENTION = re.compile(r"encoder\.layers\.(?P<layer>\d+)\.self_attn\.(?P<proj>[qkv])_proj\.(?P<kind>weight|bias)")


def _renames() -> tuple[dict[str, str], list[tuple[str, str]]]:
    """diffusers' table: whole names (embeddings, final norm, projection) and the substrings of layer names."""
    from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

    table = DIFFUSERS_TO_LDM_MAPPING["openclip"]
    whole = {k.removeprefix("text_model."): v for k, v in table["layers"].items()}
    parts = [(k.removeprefix("text_model."), v) for k, v in table["transformer"].items()
             if not k.startswith("transformer.")]  # those are the whole names again, under another prefix
    return whole, parts


def open_clip_tensors(state: dict[str, Any]) -> dict[str, Any]:
    """A ``CLIPTextModelWithProjection`` or ``CLIPTextModel`` state dict (torch tensors, any device, meta included) in
    OpenCLIP's layout, names without the checkpoint's prefix. The position ids buffer is not a weight: left out."""
    import torch

    whole, parts = _renames()
    local = {name.removeprefix("text_model."): value for name, value in state.items()
             if not name.endswith("position_ids")}
    out: dict[str, Any] = {}
    fused: dict[tuple[str, str], dict[str, Any]] = {}
    for name, value in local.items():
        if name in whole:
            out[whole[name]] = value.T.contiguous() if name == "text_projection.weight" else value
        elif m := _ATTENTION.fullmatch(name):
            fused.setdefault((m["layer"], m["kind"]), {})[m["proj"]] = value
        elif name.startswith("encoder.layers."):
            renamed = name
            for new, old in parts:
                renamed = renamed.replace(new, old)
            out[f"transformer.{renamed}"] = value
        else:
            raise InternalError(f"no OpenCLIP name for the text encoder tensor {name}")
    for (layer, kind), projections in fused.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([projections[p] for p in "qkv"])
    return out
