"""What every component spec says: its id, which diffusers sub-model it wraps, and its named inputs and outputs.

A spec is data plus one explicit wrapper ``nn.Module`` (we never patch ``forward`` on someone else's module). Shapes
are written with named dimensions and resolved against the export's :class:`Dims`, so other model families
(SD 2.x at 768², SDXL with a second text encoder and extra UNet conditioning) are new specs, not new code paths.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

# The attribute under which every wrapper holds the diffusers module; module paths are reported without it.
WRAPPED = "model"


@dataclass(frozen=True)
class IOSpec:
    """A named tensor with named dims. ``example`` says how to draw a seeded example value."""

    name: str
    dtype: str
    dims: tuple[str | int, ...]  # a name resolved by Dims.size, or a size fixed by the model (an int)
    # normal | tokens | timestep | image | ones | group_norm_stats | time_ids | guidance_embedding
    example: str = "normal"


@dataclass(frozen=True)
class Dims:
    """Static sizes of one export, from the preset and the model's configs."""

    height: int
    width: int
    latent_channels: int
    vae_scale_factor: int
    text_length: int
    text_hidden: int
    vocab_size: int
    unet_batch: int
    vae_tile: int = 0  # VAE tile side in latent pixels (the preset's vae_tiling.tile); 0: the VAE is not tiled
    vae_overlap: int = 0  # latent pixels shared by neighbouring VAE tiles
    vae_head_channels: int = 0  # channels of the VAE decoder's mid block (its head's output, vae_decoder.py)
    unet_in_channels: int = 0  # the UNet's input channels; 0: latent_channels (an inpainting UNet takes 2 * 4 + 1)
    # SDXL (components/sdxl.py): each text encoder's width (text_hidden, the UNet's context, is their sum) and the
    # second encoder's pooled projection; 0 for a model with one text encoder
    text_hidden_1: int = 0
    text_hidden_2: int = 0
    pooled_dim: int = 0
    time_cond_dim: int = 0  # an LCM-distilled UNet's guidance embedding width (time_cond_proj_dim); 0: none

    @property
    def unet_sample_channels(self) -> int:
        return self.unet_in_channels or self.latent_channels

    @property
    def latent_height(self) -> int:
        return self.height // self.vae_scale_factor

    @property
    def latent_width(self) -> int:
        return self.width // self.vae_scale_factor

    # The VAE components run at one tile's size: the tile clamped to the latent size (an axis no longer than the
    # tile is not tiled), or the whole latent when the preset asks for no tiling.
    @property
    def vae_latent_height(self) -> int:
        return min(self.vae_tile, self.latent_height) if self.vae_tile else self.latent_height

    @property
    def vae_latent_width(self) -> int:
        return min(self.vae_tile, self.latent_width) if self.vae_tile else self.latent_width

    @property
    def vae_height(self) -> int:
        return self.vae_latent_height * self.vae_scale_factor

    @property
    def vae_width(self) -> int:
        return self.vae_latent_width * self.vae_scale_factor

    def vae_tiling(self) -> dict[str, int | str] | None:
        """The manifest entry of a tiled VAE component (``Component.extra["tiling"]``, see runtime/manifest.py);
        None when the tile covers the whole latent."""
        tile = (self.vae_latent_height, self.vae_latent_width)
        if tile == (self.latent_height, self.latent_width):
            return None
        return {"space": "latent", "tile_height": tile[0], "tile_width": tile[1], "overlap": self.vae_overlap}

    def size(self, name: str | int, batch: int) -> int:
        if isinstance(name, int):
            return name
        if name == "batch":
            return batch
        if name == "image_channels":
            return 3
        if name == "one":
            return 1
        if name == "moments":  # mean and log-variance of each latent channel
            return 2 * self.latent_channels
        value = getattr(self, name, None)
        if not isinstance(value, int):
            raise KeyError(f"unknown dimension name {name!r}")
        return value


@dataclass(frozen=True)
class ComponentSpec:
    id: str
    subfolder: str
    inputs: tuple[IOSpec, ...]
    outputs: tuple[IOSpec, ...]
    make_wrapper: Callable[[Any], Any]
    batch_from: str = "one"  # which Dims field gives this component's batch ("unet_batch") or "one"
    # The submodules whose GroupNorms take whole-image statistics when the component is tiled with
    # ``vae_tiling.group_norm: image`` (group_norm_stats.py); empty: it has none to offer.
    group_norm_scope: tuple[str, ...] = ()
    # The component whose preset settings (split, quantize, parity) this one follows; None: its own id.
    settings_from: str | None = None

    @property
    def settings_id(self) -> str:
        return self.settings_from or self.id

    def batch(self, dims: Dims) -> int:
        return 1 if self.batch_from == "one" else dims.size(self.batch_from, 1)

    def shape(self, io: IOSpec, dims: Dims) -> tuple[int, ...]:
        batch = self.batch(dims)
        return tuple(dims.size(d, batch) for d in io.dims)
