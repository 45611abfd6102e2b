"""VAE encoder: image in [-1, 1] → the latent distribution's mean and standard deviation (unscaled).

The runtime samples ``mean + std * noise`` itself, so its random draws stay in numpy.
"""

from __future__ import annotations

import torch

from pocketsd.export.components.base import WRAPPED, ComponentSpec, IOSpec


class VaeEncoderWrapper(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        setattr(self, WRAPPED, vae)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = getattr(self, WRAPPED).encode(image, return_dict=False)[0]
        return dist.mean, dist.std


_LATENT = ("batch", "latent_channels", "latent_height", "latent_width")
SPEC = ComponentSpec(
    id="vae_encoder",
    subfolder="vae",
    inputs=(IOSpec("image", "float32", ("batch", "image_channels", "height", "width"), example="image"),),
    outputs=(IOSpec("latent_mean", "float32", _LATENT), IOSpec("latent_std", "float32", _LATENT)),
    make_wrapper=VaeEncoderWrapper,
)
