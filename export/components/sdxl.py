"""SDXL's components: two CLIP text encoders and a UNet with added conditioning; the VAE's are SD's own.

As ``StableDiffusionXLPipeline.encode_prompt`` uses them: each text encoder gives the UNet its *penultimate* layer's
states (``hidden_embeds``), the two concatenated on channels (768 + 1280 = 2048 for SDXL base); the second
(``CLIPTextModelWithProjection``) also gives its projected pooled state (``pooled_outputs``), which the UNet takes as
``text_embeds`` beside ``time_ids`` (original size, crop corner, target size). Names follow Apple's Swift SDXL
pipeline. The second encoder follows the first's preset settings (split, quantization, parity).
"""

from __future__ import annotations

from functools import partial

import torch

from pocketsd.contract import TEXT_ENCODER_IO as TEXT_IO
from pocketsd.contract import UNET_IO
from pocketsd.export.components.base import WRAPPED, ComponentSpec, IOSpec
from pocketsd.export.components.unet import SPEC as SD_UNET

TIME_IDS = 6  # original (height, width), crop (top, left), target (height, width)


class PenultimateTextEncoderWrapper(torch.nn.Module):
    """Either SDXL text encoder: its penultimate layer's states and ``pooled``, the pooled field of its output
    (``pooler_output`` for CLIPTextModel, ``text_embeds``, the projection, for CLIPTextModelWithProjection)."""

    def __init__(self, text_encoder: torch.nn.Module, pooled: str) -> None:
        super().__init__()
        setattr(self, WRAPPED, text_encoder)
        self.pooled = pooled

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = getattr(self, WRAPPED)(input_ids.long(), output_hidden_states=True, return_dict=True)
        return out.hidden_states[-2], getattr(out, self.pooled)


class UNetXLWrapper(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        setattr(self, WRAPPED, unet)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                text_embeds: torch.Tensor, time_ids: torch.Tensor,
                timestep_cond: torch.Tensor | None = None) -> torch.Tensor:
        # Apple's (batch, channels, 1, sequence) layout → diffusers' (batch, sequence, channels), as SD's UNet
        context = encoder_hidden_states.squeeze(2).transpose(1, 2)
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return getattr(self, WRAPPED)(sample, timestep, context, timestep_cond=timestep_cond,
                                      added_cond_kwargs=added, return_dict=False)[0]


TEXT_ENCODER = ComponentSpec(
    id="text_encoder",
    subfolder="text_encoder",
    inputs=(IOSpec(TEXT_IO.input_ids, "float32", ("batch", "text_length"), example="tokens"),),
    # the pooled state is unused by diffusers' SDXL pipeline, but Apple's Swift one reads it from both encoders
    outputs=(
        IOSpec(TEXT_IO.hidden_embeds, "float32", ("batch", "text_length", "text_hidden_1")),
        IOSpec(TEXT_IO.pooled_outputs, "float32", ("batch", "text_hidden_1")),
    ),
    make_wrapper=partial(PenultimateTextEncoderWrapper, pooled="pooler_output"),
)

TEXT_ENCODER_2 = ComponentSpec(
    id="text_encoder_2",
    subfolder="text_encoder_2",
    inputs=(IOSpec(TEXT_IO.input_ids, "float32", ("batch", "text_length"), example="tokens"),),
    outputs=(
        IOSpec(TEXT_IO.hidden_embeds, "float32", ("batch", "text_length", "text_hidden_2")),
        IOSpec(TEXT_IO.pooled_outputs, "float32", ("batch", "pooled_dim")),
    ),
    make_wrapper=partial(PenultimateTextEncoderWrapper, pooled="text_embeds"),
    settings_from="text_encoder",
)

UNET = ComponentSpec(
    id="unet",
    subfolder="unet",
    inputs=(
        *SD_UNET.inputs,
        IOSpec(UNET_IO.text_embeds, "float32", ("batch", "pooled_dim")),
        IOSpec(UNET_IO.time_ids, "float32", ("batch", TIME_IDS), example="time_ids"),
    ),
    outputs=SD_UNET.outputs,
    make_wrapper=UNetXLWrapper,
    batch_from="unet_batch",
)
