"""Inpainting, as diffusers' ``StableDiffusionInpaintPipeline`` prepares and applies it, in numpy.

The mask is read as diffusers' mask processor reads it (grayscale, in [0, 1], binarized at 0.5: 1 = repaint) and
brought to the latent grid by nearest-neighbour sampling (``torch.nn.functional.interpolate``'s default, which at an
integer ratio picks every ``scale``-th pixel). An inpainting UNet (``dims.unet_in_channels`` = 2 * latents + 1) gets
the mask and the masked image's latents as extra input channels at every step; a plain UNet given a mask keeps the
unmasked area by blending the re-noised image latents back in after every step (diffusers' 4-channel path).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from pocketsd.errors import GenerateError


def mask_to_array(mask: Any, height: int, width: int) -> np.ndarray:
    """A mask image (PIL, any mode; or an HxW array, uint8 or float in [0, 1]) of the bundle's size → (1, 1, H, W)
    float32 of 0 (keep) and 1 (repaint)."""
    if isinstance(mask, Image.Image):
        array = np.asarray(mask.convert("L"), dtype=np.float32) / np.float32(255.0)
    else:
        array = np.asarray(mask)
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        if array.dtype == np.uint8:
            array = array.astype(np.float32) / np.float32(255.0)
        elif not np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_:
            array = array.astype(np.float32)
    if array.ndim != 2:
        raise GenerateError(f"mask has shape {list(np.shape(mask))}", "pass a grayscale image (white = repaint)")
    if array.shape != (height, width):
        h, w = array.shape
        raise GenerateError(f"mask is {w}x{h} (width x height) but the bundle was exported for {width}x{height}",
                            f"resize the mask to {width}x{height}")
    return np.where(array < 0.5, 0.0, 1.0).astype(np.float32)[None, None]


@dataclass(frozen=True, eq=False)
class Inpainting:
    """What the denoising loop needs, for ``n`` images: the latent mask, and either the UNet's extra channels
    (inpainting UNet) or what the blend re-noises (plain UNet)."""

    mask: np.ndarray  # (n, 1, h, w) on the latent grid
    # mask and masked image latents for every row of the UNet's sample (2n rows when guided), built once; None for a
    # plain UNet
    extra_channels: np.ndarray | None
    image_latents: np.ndarray | None  # (n, c, h, w): the image's latents (plain UNet: blended back after each step)
    noise: np.ndarray | None  # the noise the initial latents were made with, re-used by the blend

    def unet_input(self, sample: np.ndarray) -> np.ndarray:
        """The UNet's sample (latents, already doubled when guided) with the extra channels the UNet takes."""
        if self.extra_channels is None:
            return sample
        return np.concatenate([sample, self.extra_channels], axis=1)

    def blend(self, sched: Any, schedule: Any, x: np.ndarray, step_index: int) -> np.ndarray:
        """After step ``step_index`` (plain UNet only): the unmasked area back to the image, noised to the next
        step's level (not at all after the last step)."""
        if self.extra_channels is not None:
            return x
        proper = self.image_latents
        if step_index < len(schedule.timesteps) - 1:
            proper = sched.add_noise(schedule, self.image_latents, self.noise, step_index + 1)
        return (np.float32(1.0) - self.mask) * proper + self.mask * x


def latent_mask(mask: np.ndarray, scale: int) -> np.ndarray:
    return np.ascontiguousarray(mask[:, :, ::scale, ::scale])
