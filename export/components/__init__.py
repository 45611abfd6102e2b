"""Component specs of the Stable Diffusion family, in the order an export writes them."""

from __future__ import annotations

from pocketsd.export.components import sdxl, text_encoder, unet, vae_decoder, vae_encoder
from pocketsd.export.components.base import ComponentSpec, Dims, IOSpec

SD_COMPONENTS: dict[str, ComponentSpec] = {
    spec.id: spec for spec in (text_encoder.SPEC, unet.SPEC, vae_decoder.SPEC, vae_encoder.SPEC)
}
SDXL_COMPONENTS: dict[str, ComponentSpec] = {
    spec.id: spec for spec in (sdxl.TEXT_ENCODER, sdxl.TEXT_ENCODER_2, sdxl.UNET, vae_decoder.SPEC, vae_encoder.SPEC)
}


def components_for(family: str) -> dict[str, ComponentSpec]:
    """The component specs of a model family: ``sd`` (SD 1.x / 2.x) or ``sdxl``."""
    return SDXL_COMPONENTS if family == "sdxl" else SD_COMPONENTS


__all__ = ["SDXL_COMPONENTS", "SD_COMPONENTS", "ComponentSpec", "Dims", "IOSpec", "components_for"]
