"""UNet: (noisy latents, timestep, text states) → the model output (epsilon or v, per the scheduler config).

An inpainting UNet's sample is the latents with the mask and the masked image's latents appended as channels (9).

The batch is the preset's ``unet_batch``: 2 runs classifier-free guidance as one call, 1 as two calls. The text
states come in Apple's (B, C, 1, S) layout, which the Neural Engine prefers and the Swift pipeline passes, in every
backend, so one contract (names, shapes, chunk boundaries) holds for ONNX and CoreML alike.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from pocketsd.contract import UNET_IO as IO
from pocketsd.export.components.base import WRAPPED, ComponentSpec, IOSpec


class UNetWrapper(torch.nn.Module):
    def __init__(self, unet: torch.nn.Module) -> None:
        super().__init__()
        setattr(self, WRAPPED, unet)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                timestep_cond: torch.Tensor | None = None) -> torch.Tensor:
        # Apple's (batch, channels, 1, sequence) layout → diffusers' (batch, sequence, channels)
        context = encoder_hidden_states.squeeze(2).transpose(1, 2)
        return getattr(self, WRAPPED)(sample, timestep, context, timestep_cond=timestep_cond, return_dict=False)[0]


def with_timestep_cond(spec: ComponentSpec) -> ComponentSpec:
    """An LCM-distilled UNet (``time_cond_proj_dim`` in its config) also takes the guidance scale's embedding as
    ``timestep_cond``, its last input (the wrappers' last argument), and runs without classifier-free guidance."""
    cond = IOSpec(IO.timestep_cond, "float32", ("batch", "time_cond_dim"), example="guidance_embedding")
    return replace(spec, inputs=(*spec.inputs, cond))


SPEC = ComponentSpec(
    id="unet",
    subfolder="unet",
    inputs=(
        IOSpec(IO.sample, "float32", ("batch", "unet_sample_channels", "latent_height", "latent_width")),
        IOSpec(IO.timestep, "float32", ("batch",), example="timestep"),
        IOSpec(IO.encoder_hidden_states, "float32", ("batch", "text_hidden", "one", "text_length")),
    ),
    outputs=(IOSpec(IO.noise_pred, "float32", ("batch", "latent_channels", "latent_height", "latent_width")),),
    make_wrapper=UNetWrapper,
    batch_from="unet_batch",
)
