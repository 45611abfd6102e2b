"""Component specs of the Stable Diffusion family, in the order an export writes them."""

from __future__ import annotations

from pocketsd.export.components import text_encoder, unet, vae_decoder, vae_encoder
from pocketsd.export.components.base import ComponentSpec, Dims, IOSpec

SD_COMPONENTS: dict[str, ComponentSpec] = {
    spec.id: spec for spec in (text_encoder.SPEC, unet.SPEC, vae_decoder.SPEC, vae_encoder.SPEC)
}



__all__ = ["SD_COMPONENTS", "ComponentSpec", "Dims", "IOSpec"]
