"""Prompts → the UNet's conditioning inputs, as diffusers' pipelines encode them.

SD 1.x / 2.x (``StableDiffusionPipeline.encode_prompt``): one text encoder's last hidden states. SDXL
(``StableDiffusionXLPipeline.encode_prompt``): both encoders' penultimate states concatenated on channels, the second
encoder's pooled projection (``text_embeds``), and ``time_ids`` (original size, crop corner, target size: the
image's size, uncropped, as diffusers' defaults). An SDXL negative prompt left out is zeros, not the empty prompt,
when the model says ``force_zeros_for_empty_prompt`` (SDXL base does). A bundle is SDXL when its manifest has a
``text_encoder_2`` component (export/components/sdxl.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pocketsd.contract import TEXT_ENCODER_IO, UNET_IO
from pocketsd.errors import BundleError
from pocketsd.runtime.chain import ComponentRunner
from pocketsd.runtime.hashing import sha256_once
from pocketsd.runtime.json_fields import Field
from pocketsd.runtime.manifest import MANIFEST_NAME, SECOND_TOKENIZER, Manifest
from pocketsd.runtime.tokenizer import ClipTokenizer

SECOND_ENCODER = "text_encoder_2"


def guidance_embedding(guidance_scale: float, dim: int) -> np.ndarray:
    """An LCM-distilled UNet's ``timestep_cond`` row (1, dim): diffusers' ``get_guidance_scale_embedding`` of
    ``w = guidance_scale - 1``, sines then cosines of ``1000 w`` over geometric frequencies from 1 to 1/10000."""
    half = dim // 2
    # float32 throughout, in diffusers' order: angles reach 1000 w radians, where one float32 step is 1e-3 rad
    step = np.log(np.float32(10000.0)) / np.float32(half - 1)
    freqs = np.exp(np.arange(half, dtype=np.float32) * -step)
    angles = (np.float32(guidance_scale - 1.0) * np.float32(1000.0)) * freqs
    row = np.concatenate([np.sin(angles), np.cos(angles), np.zeros(dim % 2, np.float32)])
    return row[None, :].astype(np.float32)


def is_lcm(manifest: Manifest) -> bool:
    """An LCM-distilled UNet: the guidance scale goes in as an embedding, and there is no classifier-free guidance."""
    return any(t.name == UNET_IO.timestep_cond for t in manifest.component("unet").inputs)


def is_sdxl(manifest: Manifest) -> bool:
    return SECOND_ENCODER in manifest.components


def open_tokenizer(bundle_dir: Path, entry: Any, where: str) -> ClipTokenizer:
    """A tokenizer entry of the manifest (``tokenizer``, or SDXL's ``tokenizer.text_encoder_2``), its files checked."""
    checked = Field(entry, str(bundle_dir / MANIFEST_NAME), where)
    max_length = checked.key("max_length").int(1)
    files = checked.obj().get("files", {})
    if "vocab.json" not in files:
        raise BundleError(f"{bundle_dir}: the manifest's {where} names no vocab.json", "re-export the bundle")
    for ref in files.values():
        if sha256_once(bundle_dir / ref.path) != ref.sha256:
            raise BundleError(f"{bundle_dir / ref.path} does not match its sha256 in the manifest",
                              "re-export or re-copy the bundle")
    folder = bundle_dir / Path(files["vocab.json"].path).parent
    return ClipTokenizer.from_dir(folder, max_length=max_length)


@dataclass
class Encoded:
    """One prompt's conditioning: text states (1, S, C) and, for SDXL, the pooled projection (1, P)."""

    states: np.ndarray
    pooled: np.ndarray | None = None

    def zeros(self) -> "Encoded":
        return Encoded(np.zeros_like(self.states), None if self.pooled is None else np.zeros_like(self.pooled))


class TextConditioning:
    """The text encoder(s) of a bundle and their tokenizers. ``runner(component_id)`` gives a component's chain;
    ``expect(component_id)`` tells the memory policy what runs next (the prefetch policy opens it early)."""

    def __init__(self, bundle_dir: Path, manifest: Manifest, runner: Callable[[str], ComponentRunner],
                 expect: Callable[[str | None], None]) -> None:
        self.manifest, self.runner, self.expect = manifest, runner, expect
        self.sdxl = is_sdxl(manifest)
        self.tokenizer = open_tokenizer(bundle_dir, manifest.tokenizer, "tokenizer")
        self.tokenizer_2 = None
        if self.sdxl:
            second = manifest.tokenizer.get(SECOND_TOKENIZER)
            if second is None:
                raise BundleError(f"{bundle_dir / MANIFEST_NAME}: an SDXL bundle's tokenizer entry has no "
                                  f"{SECOND_TOKENIZER}", "re-export the bundle")
            self.tokenizer_2 = open_tokenizer(bundle_dir, second, f"tokenizer.{SECOND_TOKENIZER}")
        self.zeros_for_empty = bool(manifest.model.get("force_zeros_for_empty_prompt", False))

    @property
    def encoders(self) -> tuple[str, ...]:
        return ("text_encoder", SECOND_ENCODER) if self.sdxl else ("text_encoder",)

    def _run(self, component_id: str, tokenizer: ClipTokenizer, prompt: str) -> dict[str, np.ndarray]:
        runner = self.runner(component_id)
        ids = tokenizer.encode([prompt]).astype(runner.component.inputs[0].dtype)
        return runner(**{TEXT_ENCODER_IO.input_ids: ids})

    def encode(self, prompt: str, then: str | None = None) -> Encoded:
        """One prompt through every text encoder; ``then``: the component that runs after the last encoder."""
        if not self.sdxl:
            self.expect(then)
            return Encoded(self._run("text_encoder", self.tokenizer, prompt)[TEXT_ENCODER_IO.last_hidden_state])
        assert self.tokenizer_2 is not None
        self.expect(SECOND_ENCODER)
        first = self._run("text_encoder", self.tokenizer, prompt)[TEXT_ENCODER_IO.hidden_embeds]
        self.expect(then)
        second = self._run(SECOND_ENCODER, self.tokenizer_2, prompt)
        states = np.concatenate([first, second[TEXT_ENCODER_IO.hidden_embeds]], axis=-1)
        return Encoded(states, second[TEXT_ENCODER_IO.pooled_outputs])

    def encodes_negative(self, negative_prompt: str | None) -> bool:
        """Whether guidance runs the text encoders on a negative prompt (else its conditioning is zeros)."""
        return not (self.sdxl and negative_prompt is None and self.zeros_for_empty)

    def negative(self, negative_prompt: str | None, positive: Encoded, then: str | None) -> Encoded:
        """The negative prompt's conditioning: zeros for an SDXL model that says so when none is given, else the
        encoded text (the empty prompt when none is given)."""
        if not self.encodes_negative(negative_prompt):
            self.expect(then)
            return positive.zeros()
        return self.encode("" if negative_prompt is None else negative_prompt, then)

    def unet_inputs(self, rows: list[Encoded], n: int, height: int, width: int,
                    guidance_scale: float = 1.0) -> dict[str, np.ndarray]:
        """The UNet's conditioning inputs, each prompt's row repeated for the ``n`` images made from it (diffusers'
        order: [negative] * n + [prompt] * n), the text states in the layout the bundle's UNet takes; an LCM UNet's
        ``timestep_cond`` from ``guidance_scale`` (diffusers' ``LatentConsistencyModelPipeline``)."""
        states = np.repeat(np.concatenate([r.states for r in rows]), n, axis=0)
        inputs = {UNET_IO.encoder_hidden_states: self.unet_layout(states)}
        if self.sdxl:
            pooled = [r.pooled for r in rows if r.pooled is not None]
            inputs[UNET_IO.text_embeds] = np.repeat(np.concatenate(pooled), n, axis=0).astype(np.float32)
            # original size, crop top-left, target size (diffusers' _get_add_time_ids with its defaults)
            time_ids = np.array([[height, width, 0, 0, height, width]], dtype=np.float32)
            inputs[UNET_IO.time_ids] = np.repeat(time_ids, len(rows) * n, axis=0)
        cond = {t.name: t for t in self.manifest.component("unet").inputs}.get(UNET_IO.timestep_cond)
        if cond is not None:
            inputs[UNET_IO.timestep_cond] = np.repeat(guidance_embedding(guidance_scale, cond.shape[-1]),
                                                      len(rows) * n, axis=0)
        return inputs

    def unet_layout(self, states: np.ndarray) -> np.ndarray:
        """Text states (B, S, C) in the layout the bundle's UNet takes: Apple's (B, C, 1, S) where it says so."""
        spec = {t.name: t for t in self.manifest.component("unet").inputs}[UNET_IO.encoder_hidden_states]
        if len(spec.shape) == 4:
            return np.ascontiguousarray(states.transpose(0, 2, 1)[:, :, None, :])
        return states
