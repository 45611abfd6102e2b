"""What the pipeline refuses before and while it generates: a request's bad values, a bundle that lacks what
generating reads, and NaN or infinity in the tensors between steps."""

from __future__ import annotations

from typing import Any

import numpy as np

from pocketsd.contract import TEXT_ENCODER_IO, UNET_IO
from pocketsd.errors import BundleError, GenerateError
from pocketsd.runtime.conditioning import is_sdxl
from pocketsd.runtime.json_fields import REEXPORT, Field
from pocketsd.runtime.manifest import Manifest


def finite(array: np.ndarray, when: str, what: str) -> np.ndarray:
    """``array``, after checking it holds no NaN or infinity; else a GenerateError saying when and where."""
    if np.isfinite(array).all():
        return array
    nan, inf = int(np.isnan(array).sum()), int(np.isinf(array).sum())
    held = " and ".join(f"{kind} ({n} of {array.size} values)" for kind, n in (("NaN", nan), ("inf", inf)) if n)
    raise GenerateError(f"{when}: {what} holds {held}",
                        "the bundle overflows here (weights or precision): check it with `pocketsd inspect`, "
                        "re-export it, or lower the guidance scale", code="non-finite")


def check_request(prompt: Any, negative_prompt: Any, guidance_scale: Any, seed: Any, strength: Any) -> None:
    """Refuse a request's values of the wrong type or range before any chunk runs (steps: the scheduler's check)."""
    for name, value in (("prompt", prompt), ("negative_prompt", negative_prompt)):
        if value is None and name == "negative_prompt":
            continue
        if isinstance(value, (list, tuple)):
            raise GenerateError(f"{name} is a {type(value).__name__}; this pipeline makes one image per call",
                                f"pass one str as {name}, and call once per prompt")
        if not isinstance(value, str):
            raise GenerateError(f"{name} must be text (a str), not {type(value).__name__}", f"pass {name}='...'")
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float, np.number)) \
            or not np.isfinite(guidance_scale):
        raise GenerateError(f"guidance scale must be a finite number, got {guidance_scale!r}",
                            "7.5 is usual; 1 or less turns guidance off")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0):
        raise GenerateError(f"seed must be a non-negative integer, got {seed!r}")
    if strength is not None and (isinstance(strength, bool) or not isinstance(strength, (int, float, np.number))
                                 or not 0.0 < strength <= 1.0):
        raise GenerateError(f"strength must be a number in (0, 1], got {strength!r}", "0.8 is usual for img2img")


_DIMS = ("height", "width", "latent_channels", "latent_height", "latent_width", "unet_batch", "vae_scale_factor")
# component → (inputs, outputs) the pipeline feeds and reads by name
_NAMED_IO = {"text_encoder": ((), (TEXT_ENCODER_IO.last_hidden_state,)), "vae_decoder": ((), ()),
             "unet": ((UNET_IO.sample, UNET_IO.timestep, UNET_IO.encoder_hidden_states), (UNET_IO.noise_pred,))}
_SDXL_NAMED_IO = {**_NAMED_IO, "text_encoder": ((), (TEXT_ENCODER_IO.hidden_embeds,)),
                  "text_encoder_2": ((), (TEXT_ENCODER_IO.hidden_embeds, TEXT_ENCODER_IO.pooled_outputs)),
                  "unet": ((*_NAMED_IO["unet"][0], UNET_IO.text_embeds, UNET_IO.time_ids), _NAMED_IO["unet"][1])}


def check_for_generation(manifest: Manifest, where: str) -> None:
    """What generating needs beyond a valid manifest (which may describe some components only: the round trip at
    export opens those too): the dims, scheduler config and components it reads, so that none is a KeyError mid-way."""
    for name in _DIMS:
        if manifest.dims.get(name, 0) < 1:
            raise Field(None, where, f"dims.{name}").fail("is missing" if name not in manifest.dims else "is 0")
    Field(manifest.scheduler, where, "scheduler").key("config").obj()
    for component_id, (inputs, outputs) in (_SDXL_NAMED_IO if is_sdxl(manifest) else _NAMED_IO).items():
        component = manifest.component(component_id)
        have_in, have_out = [t.name for t in component.inputs], [t.name for t in component.outputs]
        missing = [n for n in inputs if n not in have_in] + [n for n in outputs if n not in have_out]
        if missing or not have_in or not have_out:
            raise BundleError(f"{where}: component {component_id} lacks {', '.join(missing) or 'inputs or outputs'} "
                              f"(inputs: {', '.join(have_in) or 'none'}; outputs: {', '.join(have_out) or 'none'})",
                              REEXPORT)
