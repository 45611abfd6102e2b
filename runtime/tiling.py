"""Run a VAE component over overlapping tiles and blend the tiles' outputs without seams (numpy only).

A tiled component is exported at one tile's size and says so in its manifest entry
(``Component.extra["tiling"]``, see :mod:`pocketsd.runtime.manifest`). Positions are in latent pixels: the decoder
maps a latent tile to ``scale``× as many image pixels, the encoder an image tile to a latent (moments) tile.

On each axis tiles start every ``tile - overlap`` latent pixels and the last one is aligned to the far edge. Each
tile's output is weighted by a linear ramp across the stretch it shares with its neighbour (its actual overlap, which
is longer for the last tile) and by 1 elsewhere, including along the image borders; the weighted outputs are summed
and divided by the summed weights. Where two tiles overlap their ramps add up to one, so a tile function that is
the same everywhere (a per-pixel op) gives back what one untiled call would, up to float rounding.

A component whose tiling says ``"group_norm": "image"`` runs the tiles twice (``run_two_pass``): the first pass
normalizes each tile's GroupNorms with the tile's own statistics and reports them, the second normalizes every tile
with their average over the tiles, an estimate of the whole image's statistics; only the second pass is blended.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from pocketsd.errors import BundleError
from pocketsd.runtime.manifest import Component, Manifest

TileFn = Callable[[np.ndarray], np.ndarray]
ManyFn = Callable[[list[np.ndarray]], list[np.ndarray]]  # every tile at once, outputs in the same order
# Every tile at once with the GroupNorm statistics to use (None: each tile's own) → (outputs, each tile's own stats)
StatsFn = Callable[[list[np.ndarray], np.ndarray | None], tuple[list[np.ndarray], list[np.ndarray]]]
RowsFn = Callable[[Sequence[dict[str, np.ndarray]]], list[dict[str, np.ndarray]]]  # ComponentRunner.run_many
GROUP_NORM_MODES = ("tile", "image")


@dataclass(frozen=True)
class GroupNormIO:
    """The names of the tensors through which a tiled component takes whole-image GroupNorm statistics: an input
    ``[n_norms, batch, groups, 2]`` (mean, mean square), a float32 ``[1]`` input (1: use them, 0: the tile's own),
    and an output with the tile's own statistics, shaped as the first input."""

    stats_input: str
    use_stats_input: str
    stats_output: str


@dataclass(frozen=True)
class Tiling:
    """One tile's size and the overlap between neighbours, in latent pixels; ``group_norm`` is set when the
    component normalizes with whole-image statistics in two passes (None: each tile with its own, one pass)."""

    tile_height: int
    tile_width: int
    overlap: int
    group_norm: GroupNormIO | None = None
    head: str | None = None  # a component run once, untiled, on the whole input; its output is what gets tiled

    @classmethod
    def from_extra(cls, extra: Mapping[str, Any], owner: str = "component") -> "Tiling | None":
        """The tiling a component records in its manifest ``extra`` (None when it is not tiled)."""
        entry = extra.get("tiling")
        if entry is None:
            return None
        try:
            if entry.get("space") != "latent":
                raise ValueError(f"space {entry.get('space')!r}")
            head = entry.get("head")
            if head is not None and not (isinstance(head, str) and head):
                raise ValueError(f"head {head!r}")
            tiling = cls(int(entry["tile_height"]), int(entry["tile_width"]), int(entry["overlap"]),
                         _group_norm_io(entry), head)
        except (AttributeError, KeyError, TypeError, ValueError) as exc:
            raise BundleError(f"{owner}: malformed tiling entry {entry!r} ({exc})", "re-export the bundle") from None
        if min(tiling.tile_height, tiling.tile_width) < 1 or tiling.overlap < 0:
            raise BundleError(f"{owner}: impossible tiling {entry!r}", "re-export the bundle")
        return tiling


def _group_norm_io(entry: Mapping[str, Any]) -> GroupNormIO | None:
    """``group_norm``: absent (bundles from before it existed) or ``tile``: None; ``image``: the three names."""
    mode = entry.get("group_norm", "tile")
    if mode not in GROUP_NORM_MODES:
        raise ValueError(f"group_norm {mode!r}, not one of {', '.join(GROUP_NORM_MODES)}")
    if mode == "tile":
        return None
    names = [entry[key] for key in ("stats_input", "use_stats_input", "stats_output")]
    if not all(isinstance(name, str) and name for name in names):
        raise ValueError(f"tensor names {names}")
    return GroupNormIO(*names)


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


@dataclass(frozen=True)
class TileLayout:
    """Where the tiles of one input lie (latent pixels) and each one's 2-D blending weight at output resolution."""

    places: tuple[tuple[int, int, np.ndarray], ...]  # (row, column, weight) of each tile
    tile: tuple[int, int]
    latent: tuple[int, int]
    in_scale: int
    out_scale: int

    @classmethod
    def of(cls, x: np.ndarray, tiling: Tiling, in_scale: int, out_scale: int) -> "TileLayout":
        lat_h, lat_w = x.shape[2] // in_scale, x.shape[3] // in_scale
        tile_h, tile_w = min(tiling.tile_height, lat_h), min(tiling.tile_width, lat_w)
        rows, cols = tile_starts(lat_h, tile_h, tiling.overlap), tile_starts(lat_w, tile_w, tiling.overlap)
        row_weights, col_weights = tile_weights(rows, tile_h, out_scale), tile_weights(cols, tile_w, out_scale)
        places = tuple((r, c, np.outer(wr, wc)) for r, wr in zip(rows, row_weights) for c, wc in zip(cols, col_weights))
        return cls(places, (tile_h, tile_w), (lat_h, lat_w), in_scale, out_scale)

    def cut(self, x: np.ndarray) -> list[np.ndarray]:
        (th, tw), s = self.tile, self.in_scale
        return [np.ascontiguousarray(x[:, :, r * s:(r + th) * s, c * s:(c + tw) * s]) for r, c, _ in self.places]

    def blend(self, outputs: list[np.ndarray], dtype: Any) -> np.ndarray:
        (th, tw), s = self.tile, self.out_scale
        weight_sum = np.zeros((self.latent[0] * s, self.latent[1] * s), dtype=np.float64)
        total = np.zeros((*outputs[0].shape[:2], *weight_sum.shape), dtype=np.float64)
        for (r, c, weight), out in zip(self.places, outputs):
            at = (slice(r * s, (r + th) * s), slice(c * s, (c + tw) * s))
            total[(..., *at)] += out * weight
            weight_sum[at] += weight
        return (total / weight_sum).astype(dtype)


def run_tiled(fn: TileFn, x: np.ndarray, tiling: Tiling, in_scale: int, out_scale: int) -> np.ndarray:
    """Blend ``fn`` over the tiles of ``x`` (N, C, H, W), one call per tile."""
    return run_tiled_many(lambda pieces: [fn(p) for p in pieces], x, tiling, in_scale, out_scale)


def run_tiled_many(fn_many: ManyFn, x: np.ndarray, tiling: Tiling, in_scale: int, out_scale: int) -> np.ndarray:
    """Blend over the tiles of ``x`` (N, C, H, W), all tiles handed to ``fn_many`` in one call (so a streamed
    component opens its chunks once for all tiles, not once per tile). ``in_scale`` / ``out_scale``: input / output
    pixels per latent pixel (decoder: 1 and the VAE's scale factor; encoder: the scale factor and 1)."""
    layout = TileLayout.of(x, tiling, in_scale, out_scale)
    return layout.blend(fn_many(layout.cut(x)), x.dtype)


def image_stats(per_tile: Sequence[np.ndarray]) -> np.ndarray:
    """The whole image's GroupNorm statistics (mean, mean square per group) estimated from each tile's own.

    A tile's statistics cover all of its pixels, so each tile counts by its area, not by its share of the blend;
    every tile has the same size (the last one on an axis is moved back to fit, not cut short), so that is their
    plain mean. Pixels in an overlap are counted once per tile that holds them: a small bias toward the seams, and
    the estimate ``bench/vae_tiling_quality.py --option two_pass`` measures. Averaging the mean square (not the
    variance) keeps the spread between tiles' means in the variance the model derives, E[x²] - E[x]²."""
    return np.mean(np.stack(per_tile).astype(np.float64), axis=0).astype(np.float32)


def run_two_pass(fn: StatsFn, x: np.ndarray, tiling: Tiling, in_scale: int, out_scale: int) -> np.ndarray:
    """As ``run_tiled_many``, in two passes over all tiles: the first with each tile's own GroupNorm statistics,
    only to collect them; the second with their average (``image_stats``), blended."""
    layout = TileLayout.of(x, tiling, in_scale, out_scale)
    pieces = layout.cut(x)
    _, per_tile = fn(pieces, None)
    outputs, _ = fn(pieces, image_stats(per_tile))
    return layout.blend(outputs, x.dtype)


@dataclass(frozen=True)
class TileIO:
    """How a VAE component is called: its image / latent input and output, and input / output pixels per latent
    pixel (decoder: 1 and the VAE's scale factor; encoder: the scale factor and 1)."""

    input: str
    output: str
    in_scale: int
    out_scale: int


def call_tiled(run_many: RowsFn, component: Component, x: np.ndarray, io: TileIO,
               before_pass: Callable[[bool], None] | None = None) -> np.ndarray:
    """``x`` through the component (``run_many``: its runner's) in one call, or over tiles as its manifest entry
    says, in one pass or two. ``before_pass(last)`` runs before each pass over the component (a prefetch hint)."""
    tiling = Tiling.from_extra(component.extra, component.id)
    announce = before_pass or (lambda last: None)

    def plain(pieces: list[np.ndarray]) -> list[np.ndarray]:
        announce(True)
        return [row[io.output] for row in run_many([{io.input: p} for p in pieces])]

    if tiling is None:
        return plain([x])[0]
    if tiling.group_norm is None:
        return run_tiled_many(plain, x, tiling, io.in_scale, io.out_scale)
    return run_two_pass(_stats_fn(run_many, component, io, tiling.group_norm, announce), x, tiling, io.in_scale,
                        io.out_scale)


def _stats_fn(run_many: RowsFn, component: Component, io: TileIO, names: GroupNormIO,
              announce: Callable[[bool], None]) -> StatsFn:
    """The component as a ``StatsFn``: pass 1 feeds zeros as the statistics (ignored at ``use_stats`` 0)."""
    ignored = np.zeros(_stats_shape(component, names), np.float32)

    def fn(pieces: list[np.ndarray], stats: np.ndarray | None) -> tuple[list[np.ndarray], list[np.ndarray]]:
        announce(stats is not None)
        extra = {names.stats_input: ignored if stats is None else stats,
                 names.use_stats_input: np.array([0.0 if stats is None else 1.0], np.float32)}
        rows = run_many([{io.input: p, **extra} for p in pieces])
        return [row[io.output] for row in rows], [row[names.stats_output] for row in rows]

    return fn


def _stats_shape(component: Component, names: GroupNormIO) -> tuple[int, ...]:
    """The statistics' shape, once the component is seen to have the tensors its tiling entry names."""
    inputs, outputs = {t.name: t for t in component.inputs}, {t.name: t for t in component.outputs}
    stats, use, own = (inputs.get(names.stats_input), inputs.get(names.use_stats_input),
                       outputs.get(names.stats_output))
    if stats is None or use is None or own is None:
        raise BundleError(f"{component.id}: its tiling entry names GroupNorm statistics tensors {names} that the "
                          "component does not have", "re-export the bundle")
    if (stats.dtype, use.dtype, own.dtype) != ("float32",) * 3 or use.shape != (1,) or own.shape != stats.shape:
        raise BundleError(f"{component.id}: GroupNorm statistics tensors of unexpected types "
                          f"{[(t.name, t.dtype, list(t.shape)) for t in (stats, use, own)]}", "re-export the bundle")
    return stats.shape


def decoder_head(manifest: Manifest, component_id: str = "vae_decoder") -> Component | None:
    """The component the tiling entry of ``component_id`` names as its ``head`` (None: no head, or not tiled),
    once it is seen to fit: untiled, one float32 input and one float32 output, whose channels are the tiled
    component's first input's."""
    if component_id not in manifest.components:
        return None
    tiled = manifest.component(component_id)
    tiling = Tiling.from_extra(tiled.extra, tiled.id)
    if tiling is None or tiling.head is None:
        return None
    if tiling.head not in manifest.components or tiling.head == component_id:
        raise BundleError(f"{component_id}: its tiling names head {tiling.head!r}, which is not another component of "
                          "the bundle", "re-export the bundle")
    head = manifest.component(tiling.head)
    if len(head.inputs) != 1 or len(head.outputs) != 1 or "tiling" in head.extra:
        raise BundleError(f"{head.id}: a tiling head must be untiled with one input and one output",
                          "re-export the bundle")
    out, into = head.outputs[0], tiled.inputs[0]
    if (out.dtype, into.dtype) != ("float32", "float32") or len(out.shape) != 4 or len(into.shape) != 4 \
            or out.shape[1] != into.shape[1]:
        raise BundleError(f"{head.id}: its output {out.name} {out.dtype} {list(out.shape)} does not fit "
                          f"{component_id}'s input {into.name} {into.dtype} {list(into.shape)}",
                          "re-export the bundle")
    return head
