"""VAE decoder: ``z`` (latents already divided by the scaling factor) → ``image`` in [-1, 1] (Apple's names).

A tiled decoder (``vae_tiling``) can keep its global part whole (``vae_tiling.mid_block: whole``, the default): a
head component (``vae_decoder_head``: post_quant_conv, conv_in and the mid block, whose attention sees every latent
pixel) runs once on the whole latent at latent resolution, and only the tail (the up-blocks, the output norm and
conv, all local) runs per tile. Tiling the mid block's attention is the largest error left once GroupNorms use
whole-image statistics: on the SD 1.5 VAE at tile 24, overlap 8, image PSNR against the untiled decode 36.3 dB with
the whole decoder tiled, 40.9 dB with the head whole (``bench/vae_tiling_quality.py``, options two_pass and
split+two_pass). The head's tensors are no larger than one tile's: 512 × 64 × 64 floats (8 MiB) at 512².
"""

from __future__ import annotations

import torch

from pocketsd.contract import VAE_DECODER_IO as IO
from pocketsd.export.components.base import WRAPPED, ComponentSpec, IOSpec

HEAD_ID = "vae_decoder_head"
HEAD_OUTPUT = "h"


class VaeDecoderWrapper(torch.nn.Module):
    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        setattr(self, WRAPPED, vae)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return getattr(self, WRAPPED).decode(z, return_dict=False)[0]


class VaeDecoderHeadWrapper(torch.nn.Module):
    """diffusers' ``AutoencoderKL.decode`` up to the end of the decoder's mid block."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        setattr(self, WRAPPED, vae)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        vae = getattr(self, WRAPPED)
        if getattr(vae, "post_quant_conv", None) is not None:
            z = vae.post_quant_conv(z)
        return vae.decoder.mid_block(vae.decoder.conv_in(z), None)


class VaeDecoderTailWrapper(torch.nn.Module):
    """The rest of diffusers' ``Decoder.forward`` from the mid block's output: up-blocks, norm, activation, conv."""

    def __init__(self, vae: torch.nn.Module) -> None:
        super().__init__()
        setattr(self, WRAPPED, vae)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        decoder = getattr(self, WRAPPED).decoder
        x = h.to(next(iter(decoder.up_blocks.parameters())).dtype)
        for block in decoder.up_blocks:
            x = block(x, None)
        return decoder.conv_out(decoder.conv_act(decoder.conv_norm_out(x)))


SPEC = ComponentSpec(
    id="vae_decoder",
    subfolder="vae",
    inputs=(IOSpec(IO.z, "float32", ("batch", "latent_channels", "vae_latent_height", "vae_latent_width")),),
    outputs=(IOSpec(IO.image, "float32", ("batch", "image_channels", "vae_height", "vae_width")),),
    make_wrapper=VaeDecoderWrapper,
    group_norm_scope=("decoder",),
)

HEAD_SPEC = ComponentSpec(
    id=HEAD_ID,
    subfolder="vae",
    inputs=(IOSpec(IO.z, "float32", ("batch", "latent_channels", "latent_height", "latent_width")),),
    outputs=(IOSpec(HEAD_OUTPUT, "float32", ("batch", "vae_head_channels", "latent_height", "latent_width")),),
    make_wrapper=VaeDecoderHeadWrapper,
    settings_from="vae_decoder",
)

# The decoder after a head: the head's output at one tile's size → the image tile.
TAIL_SPEC = ComponentSpec(
    id="vae_decoder",
    subfolder="vae",
    inputs=(IOSpec(HEAD_OUTPUT, "float32", ("batch", "vae_head_channels", "vae_latent_height", "vae_latent_width")),),
    outputs=SPEC.outputs,
    make_wrapper=VaeDecoderTailWrapper,
    group_norm_scope=("decoder.up_blocks", "decoder.conv_norm_out"),
)
