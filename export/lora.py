"""LoRA files fused into the weights at export (``--lora FILE[:SCALE]``), as diffusers' ``fuse_lora`` fuses them.

Reading (diffusers and kohya key layouts), turning kohya keys into diffusers', building the peft layers and merging
them is diffusers' and peft's own code (``lora_state_dict``, ``load_lora_into_unet`` / ``_text_encoder``,
``fuse_lora``); this module checks the files first (safetensors only, never a pickle), fuses each file in turn at
its own scale, and refuses a LoRA whose layers do not all land in the model: one made for another architecture.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pocketsd.errors import ModelError, UserError

log = logging.getLogger(__name__)

# sub-model → key prefix in diffusers' LoRA layout (kohya's lora_te2_ keys become text_encoder_2's: SDXL)
_PREFIX = {"unet": "unet", "text_encoder": "text_encoder", "text_encoder_2": "text_encoder_2"}
_DOWN_KEYS = ("lora_A.weight", "lora.down.weight", "lora_down.weight")  # one per adapted layer, in either layout


@dataclass(frozen=True)
class LoraFile:
    path: Path
    scale: float
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.path.name, "sha256": self.sha256, "scale": self.scale}


def parse_lora_arg(text: str) -> tuple[str, float]:
    """``FILE`` or ``FILE:SCALE`` (the scale after the last colon, when it is a number): scale 1.0 by default."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            scale = float(tail)
        except ValueError:
            return text, 1.0
        if not math.isfinite(scale):
            raise ModelError(f"--lora {text}: the scale {tail} is not a finite number",
                             "e.g. --lora style.safetensors:0.8")
        return path, scale
    return text, 1.0


def check_lora_files(specs: tuple[tuple[str, float], ...]) -> tuple[LoraFile, ...]:
    """Each file exists, is safetensors with LoRA keys (never a pickle: loading one runs arbitrary code); hashed."""
    from safetensors import SafetensorError, safe_open

    checked = []
    for name, scale in specs:
        path = Path(name)
        if not path.is_file():
            raise ModelError(f"LoRA file {path} " + ("is a folder" if path.is_dir() else "does not exist"),
                             "pass the .safetensors file of the LoRA")
        if path.suffix != ".safetensors":
            raise ModelError(f"LoRA file {path} is not a .safetensors file",
                             "pocketsd never loads pickled weights (.ckpt, .pt, .bin): convert it to safetensors")
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelError(f"cannot read LoRA file {path}: {str(exc).splitlines()[0][:160]}",
                             "copy the file again") from None
        if not any("lora" in k for k in keys):
            raise ModelError(f"{path} holds no LoRA weights ({len(keys)} tensors, none named lora_*)",
                             "pass a LoRA in diffusers or kohya layout")
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        checked.append(LoraFile(path, scale, digest.hexdigest()))
    return tuple(checked)


def fuse_loras(module: Any, subfolder: str, loras: tuple[LoraFile, ...]) -> Any:
    """``module`` (the UNet or a text encoder) with every LoRA's layers for it merged into its weights."""
    if subfolder not in _PREFIX or not loras:
        return module
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        raise UserError("fusing a LoRA needs peft, which is not installed",
                        "pip install 'pocketsd[export]' (it includes peft)", code="missing-extra") from None
    from diffusers import StableDiffusionPipeline
    from diffusers.loaders.lora_base import _remove_text_encoder_monkey_patch, fuse_text_encoder_lora

    prefix = _PREFIX[subfolder]
    for index, lora in enumerate(loras):
        # with the UNet's config, kohya UNet keys in the original (SGM) block names, as kohya's SDXL trainer writes
        # them (lora_unet_input_blocks_4_1_…), are mapped to diffusers' blocks first, as load_lora_weights does
        config = {"unet_config": module.config} if subfolder == "unet" else {}
        state, alphas = StableDiffusionPipeline.lora_state_dict(str(lora.path), **config)
        wanted = sum(k.startswith(prefix + ".") and k.endswith(_DOWN_KEYS) for k in state)
        if not wanted:
            continue
        name = f"pocketsd_lora_{index}"
        try:
            if subfolder == "unet":
                StableDiffusionPipeline.load_lora_into_unet(state, alphas, module, adapter_name=name)
            else:
                _load_into_text_encoder(state, alphas, module, name, prefix)
        except (ValueError, RuntimeError, KeyError) as exc:
            raise _foreign(lora, subfolder, str(exc).splitlines()[0][:200]) from None
        landed = sum(isinstance(m, BaseTunerLayer) and name in getattr(m, "lora_A", {}) for m in module.modules())
        if landed != wanted:
            raise _foreign(lora, subfolder, f"{wanted - landed} of its {wanted} {subfolder} layers are not in "
                                            "this model")
        if subfolder == "unet":
            module.fuse_lora(lora_scale=lora.scale, adapter_names=[name])
            module.unload_lora()
        else:
            fuse_text_encoder_lora(module, lora_scale=lora.scale, adapter_names=[name])
            _remove_text_encoder_monkey_patch(module)
        log.info("fused %s into the %s (%d layers, scale %g)", lora.path.name, subfolder, landed, lora.scale)
    return module


def _load_into_text_encoder(state: dict[str, Any], alphas: dict[str, Any] | None, text_encoder: Any,
                            name: str, prefix: str) -> None:
    """diffusers' ``_load_lora_into_text_encoder`` step for step, except that the layers go in through peft's
    ``inject_adapter_in_model`` (what diffusers does for the UNet) instead of transformers' ``load_adapter``, which
    transformers 5 only allows with a peft newer than the package index has (>= 0.22)."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft
    from diffusers.utils.peft_utils import _create_lora_config
    from diffusers.utils.state_dict_utils import StateDictType
    from peft import inject_adapter_in_model, set_peft_model_state_dict

    state = {k.removeprefix(f"{prefix}."): v for k, v in state.items() if k.startswith(f"{prefix}.")}
    # kohya's text-encoder keys come out of lora_state_dict in diffusers' old naming (to_q_lora.down); diffusers
    # recognises that naming by a to_out_lora key alone, so a LoRA without out_proj layers would not be recognised
    old = any(f"to_{p}_lora." in k for k in state for p in ("q", "k", "v", "out"))
    state = convert_state_dict_to_peft(convert_state_dict_to_diffusers(
        state, original_type=StateDictType.DIFFUSERS_OLD if old else None))
    if not hasattr(text_encoder, "text_model"):  # CLIPTextModel is flat in newer transformers
        state = {k.removeprefix("text_model."): v for k, v in state.items()}
    rank = {f"{n}.lora_B.weight": state[f"{n}.lora_B.weight"].shape[1] for n, _ in text_encoder.named_modules()
            if f"{n}.lora_B.weight" in state}
    if alphas is not None:
        alphas = {k.removeprefix(f"{prefix}."): v for k, v in alphas.items() if k.split(".")[0] == prefix}
    config = _create_lora_config(state, alphas, None, rank, is_unet=False)
    inject_adapter_in_model(config, text_encoder, adapter_name=name)
    set_peft_model_state_dict(text_encoder, state, adapter_name=name)


def _foreign(lora: LoraFile, subfolder: str, detail: str) -> ModelError:
    return ModelError(f"LoRA {lora.path.name} does not fit this model's {subfolder}: {detail}",
                      "use a LoRA trained for this model's architecture (an SD 1.x LoRA for SD 1.x, ...)",
                      code="lora")
