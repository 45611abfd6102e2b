"""VAE decoder: ``z`` (latents already divided by the scaling factor) → ``image`` in [-1, 1] (Apple's names)."""

from __future__ import annotations

import torch

from pocketsd.export.components.base import WRAPPED, ComponentSpec, IOSpec


class VaeDecoderWrapper(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        setattr(self, WRAPPED, vae)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return getattr(self, WRAPPED).decode(z, return_dict=False)[0]


SPEC = ComponentSpec(
    id="vae_decoder",
    subfolder="vae",
    inputs=(IOSpec("z", "float32", ("batch", "latent_channels", "vae_latent_height", "vae_latent_width")),),
    outputs=(IOSpec("image", "float32", ("batch", "image_channels", "vae_height", "vae_width")),),
    make_wrapper=VaeDecoderWrapper,
    group_norm_scope="decoder",
)
