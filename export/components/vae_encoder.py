"""VAE encoder: image ``x`` in [-1, 1] → ``latent``, the latent distribution's mean and log-variance stacked on the
channel axis (Apple's names and layout; diffusers' ``DiagonalGaussianDistribution`` parameters, unscaled).

The runtime samples ``mean + exp(logvar / 2) * noise`` itself, so its random draws stay in numpy.
"""

from __future__ import annotations

import torch

from pocketsd.contract import VAE_ENCODER_IO as IO
from pocketsd.export.components.base import WRAPPED, ComponentSpec, IOSpec


class VaeEncoderWrapper(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        setattr(self, WRAPPED, vae)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dist = getattr(self, WRAPPED).encode(x, return_dict=False)[0]
        return torch.cat([dist.mean, dist.logvar], dim=1)


SPEC = ComponentSpec(
    id="vae_encoder",
    subfolder="vae",
    inputs=(IOSpec(IO.x, "float32", ("batch", "image_channels", "vae_height", "vae_width"), example="image"),),
    outputs=(IOSpec(IO.latent, "float32", ("batch", "moments", "vae_latent_height", "vae_latent_width")),),
    make_wrapper=VaeEncoderWrapper,
    group_norm_scope=("encoder",),
)
