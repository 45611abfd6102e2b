"""Run a VAE component over overlapping tiles and blend the tiles' outputs without seams (numpy only).

A tiled component is exported at one tile's size and says so in its manifest entry
(``Component.extra["tiling"]``, see :mod:`pocketsd.runtime.manifest`). Positions are in latent pixels: the decoder
maps a latent tile to ``scale``× as many image pixels, the encoder an image tile to a latent (moments) tile.

On each axis tiles start every ``tile - overlap`` latent pixels and the last one is aligned to the far edge. Each
tile's output is weighted by a linear ramp across the stretch it shares with its neighbour (its actual overlap, which
is longer for the last tile) and by 1 elsewhere, including along the image borders; the weighted outputs are summed
and divided by the summed weights. Where two tiles overlap their ramps add up to one, so a tile function that is
the same everywhere (a per-pixel op) gives back what one untiled call would, up to float rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from pocketsd.errors import BundleError

TileFn = Callable[[np.ndarray], np.ndarray]
ManyFn = Callable[[list[np.ndarray]], list[np.ndarray]]  # every tile at once, outputs in the same order


@dataclass(frozen=True)
class Tiling:
    """One tile's size and the overlap between neighbours, in latent pixels."""

    tile_height: int
    tile_width: int
    overlap: int

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any], owner: str = "component") -> "Tiling | None":
        """The tiling a component records in its manifest ``extra`` (None when it is not tiled)."""
        entry = extra.get("tiling")
        if entry is None:
            return None
        try:
            if entry.get("space") != "latent":
                raise ValueError(f"space {entry.get('space')!r}")
            tiling = cls(int(entry["tile_height"]), int(entry["tile_width"]), int(entry["overlap"]))
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{owner}: malformed tiling entry {entry!r} ({exc})", "re-export the bundle") from None
        if min(tiling.tile_height, tiling.tile_width) < 1 or tiling.overlap < 0:
            raise BundleError(f"{owner}: impossible tiling {entry!r}", "re-export the bundle")
        return tiling


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile origins on one axis: every ``tile - overlap`` pixels, the last one aligned to the far edge."""
    if tile >= size:
        return [0]
    if not 0 <= overlap < tile:
        raise BundleError(f"tiles of {tile} pixels cannot overlap by {overlap}", "re-export the bundle")
    return [*range(0, size - tile, tile - overlap), size - tile]


def tile_weights(starts: list[int], tile: int, scale: int) -> list[np.ndarray]:
    """Each tile's 1-D blending weight at output resolution (``scale`` output pixels per latent pixel): a ramp
    across its actual overlap with each neighbour, 1 elsewhere. Where two tiles overlap their ramps sum to one;
    where three do (a short last stride) the blend divides by the sum."""
    length = tile * scale
    position = np.arange(length, dtype=np.float64) + 0.5
    weights = []
    for k, start in enumerate(starts):
        w = np.ones(length, dtype=np.float64)
        before = (starts[k - 1] + tile - start) * scale if k > 0 else 0
        after = (start + tile - starts[k + 1]) * scale if k + 1 < len(starts) else 0
        if before > 0:
            w = np.minimum(w, position / before)
        if after > 0:
            w = np.minimum(w, (length - position) / after)
        weights.append(w)
    return weights


def run_tiled(fn: TileFn, x: np.ndarray, tiling: Tiling, in_scale: int, out_scale: int) -> np.ndarray:
    """Blend ``fn`` over the tiles of ``x`` (N, C, H, W), one call per tile."""
    return run_tiled_many(lambda pieces: [fn(p) for p in pieces], x, tiling, in_scale, out_scale)


def run_tiled_many(fn_many: ManyFn, x: np.ndarray, tiling: Tiling, in_scale: int, out_scale: int) -> np.ndarray:
    """Blend over the tiles of ``x`` (N, C, H, W), all tiles handed to ``fn_many`` in one call (so a streamed
    component opens its chunks once for all tiles, not once per tile). ``in_scale`` / ``out_scale``: input / output
    pixels per latent pixel (decoder: 1 and the VAE's scale factor; encoder: the scale factor and 1)."""
    lat_h, lat_w = x.shape[2] // in_scale, x.shape[3] // in_scale
    tile_h, tile_w = min(tiling.tile_height, lat_h), min(tiling.tile_width, lat_w)
    rows, cols = tile_starts(lat_h, tile_h, tiling.overlap), tile_starts(lat_w, tile_w, tiling.overlap)
    row_weights, col_weights = tile_weights(rows, tile_h, out_scale), tile_weights(cols, tile_w, out_scale)
    places = [(r, wr, c, wc) for r, wr in zip(rows, row_weights) for c, wc in zip(cols, col_weights)]
    pieces = [np.ascontiguousarray(x[:, :, r * in_scale:(r + tile_h) * in_scale, c * in_scale:(c + tile_w) * in_scale])
              for r, _, c, _ in places]
    outputs = fn_many(pieces)
    weight_sum = np.zeros((lat_h * out_scale, lat_w * out_scale), dtype=np.float64)
    total = np.zeros((*outputs[0].shape[:2], *weight_sum.shape), dtype=np.float64)
    for (r, wr, c, wc), out in zip(places, outputs):
        at = (slice(r * out_scale, (r + tile_h) * out_scale), slice(c * out_scale, (c + tile_w) * out_scale))
        weight = np.outer(wr, wc)
        total[(..., *at)] += out * weight
        weight_sum[at] += weight
    return (total / weight_sum).astype(x.dtype)


def call_tiled(fn_many: ManyFn, x: np.ndarray, extra: Mapping[str, Any], owner: str, in_scale: int,
               out_scale: int) -> np.ndarray:
    """``x`` through the component in one call, or over tiles when its manifest ``extra`` says it is tiled."""
    tiling = Tiling.from_extra(extra, owner)
    return fn_many([x])[0] if tiling is None else run_tiled_many(fn_many, x, tiling, in_scale, out_scale)
