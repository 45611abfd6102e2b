"""Tiled VAE runs (runtime/tiling.py), numpy only: tile positions, blending weights, that a per-pixel tile
function gives back what one untiled call gives, and the two passes of whole-image GroupNorm statistics."""

from __future__ import annotations

import numpy as np
import pytest

from pocketsd.errors import BundleError
from pocketsd.runtime.manifest import Component, TensorSpec
from pocketsd.runtime.tiling import (
    GroupNormIO,
    TileIO,
    Tiling,
    call_tiled,
    image_stats,
    run_tiled,
    run_two_pass,
    tile_starts,
    tile_weights,
)

EXACT = 1e-6  # float rounding of the weighted sum and the division by the summed weights


def decoder_like(z: np.ndarray) -> np.ndarray:
    """A local stand-in for a VAE decoder: every latent pixel → an 8×8 block of 3 channels."""
    up = np.repeat(np.repeat(z[:, :3], 8, axis=2), 8, axis=3)
    return 2 * up - 1 + up * up


def encoder_like(x: np.ndarray) -> np.ndarray:
    """A local stand-in for a VAE encoder: 8×8 average pooling to 8 "moment" channels."""
    n, c, h, w = x.shape
    pooled = x.reshape(n, c, h // 8, 8, w // 8, 8).mean(axis=(3, 5))
    return np.concatenate([pooled, pooled[:, :1] ** 2, -pooled, pooled[:, :1]], axis=1)


@pytest.mark.parametrize("size, tile, overlap, expected", [
    (16, 8, 2, [0, 6, 8]),      # the last tile aligned to the far edge: it overlaps its neighbour by 6
    (20, 8, 2, [0, 6, 12]),     # an exact fit
    (64, 32, 8, [0, 24, 32]),
    (64, 40, 12, [0, 24]),
    (13, 8, 4, [0, 4, 5]),
    (8, 8, 2, [0]), (6, 8, 2, [0]),  # a tile as large as the image: not tiled
])
def test_tile_starts(size: int, tile: int, overlap: int, expected: list[int]):
    starts = tile_starts(size, min(tile, size), overlap)
    assert starts == expected
    assert starts[0] == 0 and starts[-1] + min(tile, size) == size  # the whole axis is covered
    for a, b in zip(starts, starts[1:]):
        assert a < b and a + tile - b >= overlap  # every neighbour shares at least ``overlap`` pixels


def test_tile_starts_refuses_an_overlap_as_large_as_the_tile():
    with pytest.raises(BundleError):
        tile_starts(16, 8, 8)


@pytest.mark.parametrize("size, tile, overlap, scale", [(16, 8, 2, 8), (20, 8, 2, 1), (64, 32, 8, 8),
                                                        (13, 8, 4, 1), (16, 8, 0, 8)])
def test_weights_ramp_across_overlaps_and_sum_to_one(size: int, tile: int, overlap: int, scale: int):
    starts = tile_starts(size, tile, overlap)
    weights = tile_weights(starts, tile, scale)
    total, count = np.zeros(size * scale), np.zeros(size * scale, dtype=int)
    for start, w in zip(starts, weights):
        assert w.shape == (tile * scale,) and np.all(w > 0) and np.all(w <= 1)
        total[start * scale:(start + tile) * scale] += w
        count[start * scale:(start + tile) * scale] += 1
    assert np.allclose(total[count <= 2], 1.0, atol=1e-12)  # where two tiles meet, their ramps sum to one
    assert weights[0][0] == 1 and weights[-1][-1] == 1  # full weight along the image borders
    normalized = [w / total[s * scale:(s + tile) * scale] for s, w in zip(starts, weights)]
    blended = np.zeros(size * scale)
    for start, w in zip(starts, normalized):
        blended[start * scale:(start + tile) * scale] += w
    assert np.allclose(blended, 1.0, atol=1e-12)


@pytest.mark.parametrize("height, width, tiling", [(16, 16, Tiling(8, 8, 2)), (24, 40, Tiling(8, 8, 3)),
                                                   (13, 21, Tiling(8, 6, 2)), (8, 32, Tiling(8, 16, 4))])
def test_a_local_tile_function_gives_the_untiled_result(height: int, width: int, tiling: Tiling):
    rng = np.random.default_rng(0)
    z = rng.standard_normal((1, 4, height, width), dtype=np.float32)
    decoded = run_tiled(decoder_like, z, tiling, in_scale=1, out_scale=8)
    assert decoded.dtype == np.float32 and decoded.shape == (1, 3, 8 * height, 8 * width)
    assert np.max(np.abs(decoded - decoder_like(z))) <= EXACT
    x = rng.uniform(-1, 1, (1, 3, 8 * height, 8 * width)).astype(np.float32)
    encoded = run_tiled(encoder_like, x, tiling, in_scale=8, out_scale=1)
    assert encoded.shape == (1, 8, height, width)
    assert np.max(np.abs(encoded - encoder_like(x))) <= EXACT


def test_tiles_are_fed_at_the_tile_size():
    seen = []

    def record(z: np.ndarray) -> np.ndarray:
        seen.append(z.shape)
        assert z.flags["C_CONTIGUOUS"]
        return decoder_like(z)

    run_tiled(record, np.zeros((1, 4, 16, 20), np.float32), Tiling(8, 8, 2), 1, 8)
    assert seen == [(1, 4, 8, 8)] * 9


def test_seams_are_blended_not_cut():
    """A tile function that adds a different constant per tile (what per-tile statistics do): across every seam the
    image changes by at most the offset difference spread over the ramp, never in one jump."""
    offsets = iter(np.linspace(0.0, 1.0, 9))  # 3×3 tiles: neighbours differ by 1/8 along a row, 3/8 down a column

    def shifted(z: np.ndarray) -> np.ndarray:
        return decoder_like(z) * 0 + next(offsets)

    out = run_tiled(shifted, np.zeros((1, 4, 16, 16), np.float32), Tiling(8, 8, 2), 1, 8)[0, 0]
    steps = max(np.abs(np.diff(out, axis=0)).max(), np.abs(np.diff(out, axis=1)).max())
    assert steps <= (3 / 8) / 16 + 1e-6  # the shortest ramp: 2 latent pixels = 16 image pixels


TILING = {"space": "latent", "tile_height": 8, "tile_width": 8, "overlap": 2}
TWO_PASS = {**TILING, "group_norm": "image", "stats_input": "gn_stats", "use_stats_input": "gn_use_stats",
            "stats_output": "gn_tile_stats"}
NAMES = GroupNormIO("gn_stats", "gn_use_stats", "gn_tile_stats")


def test_manifest_entry():
    extra = {"tiling": {"space": "latent", "tile_height": 8, "tile_width": 6, "overlap": 2}}
    assert Tiling.from_extra(extra) == Tiling(8, 6, 2)  # written before group_norm existed: per tile
    assert Tiling.from_extra({"tiling": {**TILING, "group_norm": "tile"}}) == Tiling(8, 8, 2)
    assert Tiling.from_extra({"tiling": TWO_PASS}) == Tiling(8, 8, 2, NAMES)
    assert Tiling.from_extra({}) is None
    assert Tiling.from_extra({"tiling": {**TWO_PASS, "head": "vae_decoder_head"}}).head == "vae_decoder_head"
    for bad in ({**TILING, "head": ""}, {**TILING, "head": 3},
                {"space": "pixel", "tile_height": 8, "tile_width": 8, "overlap": 2},
                {"space": "latent", "tile_height": 8, "overlap": 2},
                {"space": "latent", "tile_height": 0, "tile_width": 8, "overlap": 2}, [8, 8, 2],
                {**TILING, "group_norm": "whole"}, {**TILING, "group_norm": "image"},
                {**TWO_PASS, "stats_output": ""}, {**TWO_PASS, "use_stats_input": 1}):
        with pytest.raises(BundleError):
            Tiling.from_extra({"tiling": bad}, "vae_decoder")


def tensor(name: str, shape: tuple[int, ...]) -> TensorSpec:
    return TensorSpec(name, "float32", shape)


def component(extra: dict, groups: int = 0) -> Component:
    """A decoder-like component entry (no chunks: the tests run it through a local ``run_many``)."""
    stats = (1, 1, groups, 2)
    inputs, outputs = (tensor("z", (1, 4, 8, 8)),), (tensor("image", (1, 3, 64, 64)),)
    if groups:
        inputs += (tensor("gn_stats", stats), tensor("gn_use_stats", (1,)))
        outputs += (tensor("gn_tile_stats", stats),)
    return Component("vae_decoder", inputs, outputs, (), extra=extra)


DECODE = TileIO("z", "image", 1, 8)


def test_call_tiled_calls_once_when_not_tiled():
    calls = []
    z = np.ones((1, 4, 16, 16), np.float32)

    def run_many(rows):
        calls.append([row["z"].shape for row in rows])
        return [{"image": decoder_like(row["z"])} for row in rows]

    passes = []
    call_tiled(run_many, component({}), z, DECODE, before_pass=passes.append)
    assert calls == [[(1, 4, 16, 16)]] and passes == [True]


def test_call_tiled_hands_every_tile_over_in_one_call():
    """A streamed VAE opens its chunk once for all tiles: the tiles go to the component in one batch."""
    calls, passes = [], []
    z = np.random.default_rng(0).standard_normal((1, 4, 16, 20)).astype(np.float32)

    def run_many(rows):
        calls.append(len(rows))
        return [{"image": decoder_like(row["z"])} for row in rows]

    batched = call_tiled(run_many, component({"tiling": TILING}), z, DECODE, before_pass=passes.append)
    assert calls == [3 * 3] and passes == [True]
    np.testing.assert_allclose(batched, run_tiled(decoder_like, z, Tiling(8, 8, 2), 1, 8), atol=0)


def normalized(z: np.ndarray, stats: np.ndarray | None, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """A stand-in for a decoder with one GroupNorm: ``decoder_like`` of z normalized per channel group with
    ``stats`` [1, 1, groups, 2] (mean, mean square), or with z's own when None; also z's own statistics."""
    zg = z.astype(np.float64).reshape(1, groups, -1)
    own = np.stack([zg.mean(-1), (zg * zg).mean(-1)], axis=-1)[None].astype(np.float32)
    use = own if stats is None else stats.astype(np.float64)
    mean, square = use[0, ..., 0, None], use[0, ..., 1, None]
    y = ((zg - mean) / np.sqrt(square - mean * mean + 1e-6)).reshape(z.shape).astype(np.float32)
    return decoder_like(y), own


def test_two_passes_with_tiles_that_partition_the_image_normalize_as_one_untiled_call():
    """Without overlap, tiles of equal size partition the image: the mean of their statistics is the whole image's,
    so the second pass normalizes each tile exactly as the untiled call does; one pass does not."""
    groups = 2
    z = np.random.default_rng(1).standard_normal((1, 4, 16, 24)).astype(np.float32) * np.linspace(0.5, 3, 24)
    untiled, _ = normalized(z, None, groups)

    def fn(pieces, stats):
        done = [normalized(p, stats, groups) for p in pieces]
        return [y for y, _ in done], [s for _, s in done]

    two = run_two_pass(fn, z, Tiling(8, 8, 0), 1, 8)
    one = run_tiled(lambda p: normalized(p, None, groups)[0], z, Tiling(8, 8, 0), 1, 8)
    assert np.max(np.abs(two - untiled)) <= 1e-4  # float32 statistics of values up to ~10
    assert np.max(np.abs(one - untiled)) > 0.1


def test_image_stats_is_the_mean_over_tiles():
    tiles = [np.full((2, 1, 3, 2), v, np.float32) for v in (1.0, 2.0, 6.0)]
    stats = image_stats(tiles)
    assert stats.dtype == np.float32 and stats.shape == (2, 1, 3, 2) and np.all(stats == 3.0)


def test_call_tiled_runs_two_passes_through_run_many():
    """Pass 1: every tile with zeros and use 0, its own statistics collected; pass 2: every tile with their mean
    and use 1; only pass 2 is blended. Each pass is one ``run_many`` call (a streamed VAE opens its chunks once per
    pass), announced to ``before_pass``."""
    groups = 2
    z = np.random.default_rng(2).standard_normal((1, 4, 16, 16)).astype(np.float32)
    calls, passes = [], []

    def run_many(rows):
        calls.append(rows)
        out = []
        for row in rows:
            image, own = normalized(row["z"], row["gn_stats"] if row["gn_use_stats"][0] == 1 else None, groups)
            out.append({"image": image, "gn_tile_stats": own})
        return out

    got = call_tiled(run_many, component({"tiling": TWO_PASS}, groups), z, DECODE, before_pass=passes.append)
    assert [len(rows) for rows in calls] == [9, 9] and passes == [False, True]
    first, second = calls
    assert all(row["gn_use_stats"].tolist() == [0.0] and not row["gn_stats"].any() for row in first)
    own = [normalized(row["z"], None, groups)[1] for row in first]
    assert all(row["gn_use_stats"].tolist() == [1.0] and np.array_equal(row["gn_stats"], image_stats(own))
               for row in second)
    expected = run_tiled(lambda p: normalized(p, image_stats(own), groups)[0], z, Tiling(8, 8, 2), 1, 8)
    np.testing.assert_allclose(got, expected, atol=0)


def test_two_pass_entry_must_name_the_components_tensors():
    z = np.zeros((1, 4, 16, 16), np.float32)
    with pytest.raises(BundleError, match="does not have"):
        call_tiled(lambda rows: [], component({"tiling": TWO_PASS}), z, DECODE)  # a component without them
    wrong = {**TWO_PASS, "stats_output": "gn_stats"}  # an input named as the output
    with pytest.raises(BundleError):
        call_tiled(lambda rows: [], component({"tiling": wrong}, 2), z, DECODE)
