"""Quality of tiled VAE decoding and encoding against the untiled VAE, measured in PyTorch.

    python -m pocketsd.bench.vae_tiling_quality --model DIR [--resolution 512] [--tiling 32,8 --tiling 48,16]
        [--option plain --option split --option two_pass --option split+two_pass] [--encoder] [--json out.json]

The decoder gets a seeded latent as the pipeline feeds it (``N(0, 1) / scaling_factor``); tiles are cut and blended
by the runtime's own ``runtime/tiling.py``. Options:

- ``plain``: the whole decoder per tile (what a ``vae_tiling: {group_norm: tile}`` bundle runs);
- ``split``: post_quant_conv + conv_in + mid_block (latent resolution, global attention) on the whole latent, only
  the up-blocks tiled (what a bundle with the default ``vae_tiling: {mid_block: whole}`` runs);
- ``two_pass``: a first tiled pass records every GroupNorm's per-tile mean and mean square; a second tiled pass
  normalizes with their average over the tiles (an estimate of the whole image's statistics): what a bundle with
  the default ``vae_tiling: {group_norm: image}`` runs; ``split+two_pass`` is the default bundle's decoder
  (tests/export/test_vae_tiling.py holds the exported bundles equal to these);
- ``oracle``: every GroupNorm normalizes with the untiled decode's exact statistics (the limit of ``two_pass``).

Figures per row: ``image_psnr_db`` on the final image (clipped to [0, 1], peak 1: what a user sees), ``psnr_db`` as
the parity gate defines it (peak = max |untiled output|, unclipped), max abs error, the number of tiles, and the
largest activation of one decoder tile (256 channels × (8·tile)² fp32: up_blocks.2's upsampled output, which
up_blocks.3 narrows to 128 channels).
"""

from __future__ import annotations

import argparse
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

from pocketsd.bench.report import emit
from pocketsd.export.parity import PSNR_CAP, compare
from pocketsd.runtime.tiling import Tiling, run_tiled, tile_starts

Stats = dict[str, tuple[torch.Tensor, torch.Tensor]]  # GroupNorm path → (mean, mean square) per group


def image_psnr(reference: np.ndarray, actual: np.ndarray) -> float:
    a, b = (np.clip(x.astype(np.float64) / 2 + 0.5, 0, 1) for x in (reference, actual))
    rmse = float(np.sqrt(np.mean((a - b) ** 2)))
    return PSNR_CAP if rmse == 0 else round(min(PSNR_CAP, float(20 * np.log10(1 / rmse))), 2)


def _group_stats(norm: torch.nn.GroupNorm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xg = x.reshape(x.shape[0], norm.num_groups, -1)
    return xg.mean(-1), (xg * xg).mean(-1)


@contextmanager
def group_norms(module: torch.nn.Module, record: Stats | None = None, fixed: Stats | None = None) -> Iterator[None]:
    """Forward hooks on every GroupNorm of ``module``: add each call's statistics to ``record`` (summed, with a
    count), and/or replace its output by a normalization with the ``fixed`` statistics."""
    counts: dict[str, int] = {}

    def hook(name: str) -> Callable[..., Any]:
        def run(norm: torch.nn.GroupNorm, inputs: tuple[torch.Tensor], output: torch.Tensor) -> torch.Tensor:
            x = inputs[0]
            if record is not None:
                mean, square = _group_stats(norm, x)
                old = record.get(name, (0, 0))
                record[name] = (old[0] + mean, old[1] + square)
                counts[name] = counts.get(name, 0) + 1
            if fixed is None or name not in fixed:
                return output
            mean, square = fixed[name]
            xg = x.reshape(x.shape[0], norm.num_groups, -1)
            y = ((xg - mean[..., None]) * torch.rsqrt(square[..., None] - mean[..., None] ** 2 + norm.eps))
            shape = (1, -1) + (1,) * (x.ndim - 2)
            return y.reshape(x.shape) * norm.weight.view(shape) + norm.bias.view(shape)
        return run

    with ExitStack() as stack:
        for name, norm in module.named_modules():
            if isinstance(norm, torch.nn.GroupNorm):
                stack.callback(norm.register_forward_hook(hook(name)).remove)
        yield
    if record is not None:
        for name, n in counts.items():
            record[name] = (record[name][0] / n, record[name][1] / n)


class Decoder:
    """The VAE decoder as a whole, or as head (latent resolution) + tail (the up-blocks)."""

    def __init__(self, vae: Any) -> None:
        self.vae, self.decoder = vae, vae.decoder

    @torch.no_grad()
    def whole(self, z: np.ndarray) -> np.ndarray:
        return self.vae.decode(torch.from_numpy(z)).sample.numpy()

    @torch.no_grad()
    def head(self, z: np.ndarray) -> np.ndarray:
        h = self.decoder.conv_in(self.vae.post_quant_conv(torch.from_numpy(z)))
        return self.decoder.mid_block(h, None).numpy()

    @torch.no_grad()
    def tail(self, h: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(h)
        for block in self.decoder.up_blocks:
            x = block(x, None)
        return self.decoder.conv_out(self.decoder.conv_act(self.decoder.conv_norm_out(x))).numpy()


def decode_tiled(dec: Decoder, z: np.ndarray, tiling: Tiling, option: str, oracle: Stats) -> np.ndarray:
    split = option.startswith("split")
    x, fn = (dec.head(z), dec.tail) if split else (z, dec.whole)
    if option.endswith("oracle"):
        with group_norms(dec.decoder, fixed=oracle):
            return run_tiled(fn, x, tiling, 1, 8)
    if not option.endswith("two_pass"):
        return run_tiled(fn, x, tiling, 1, 8)
    estimate: Stats = {}
    with group_norms(dec.decoder, record=estimate):
        run_tiled(fn, x, tiling, 1, 8)
    with group_norms(dec.decoder, fixed=estimate):
        return run_tiled(fn, x, tiling, 1, 8)


def tile_count(latent: int, tiling: Tiling) -> int:
    return len(tile_starts(latent, min(tiling.tile_height, latent), tiling.overlap)) ** 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pocketsd.bench.vae_tiling_quality", description=__doc__)
    parser.add_argument("--model", required=True, help="a diffusers folder (its vae/ is loaded)")
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--tiling", action="append", help="TILE,OVERLAP in latent pixels")
    parser.add_argument("--option", action="append", choices=["plain", "split", "two_pass", "split+two_pass",
                                                               "oracle", "split+oracle"])
    parser.add_argument("--encoder", action="store_true", help="also measure the tiled encoder (plain)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(Path(args.model) / "vae").eval()
    latent = args.resolution // 8
    g = torch.Generator().manual_seed(args.seed)
    z = (torch.randn(1, 4, latent, latent, generator=g) / vae.config.scaling_factor).numpy()
    dec = Decoder(vae)
    oracle: Stats = {}
    start = time.perf_counter()
    with group_norms(dec.decoder, record=oracle):
        reference = dec.whole(z)
    result: dict[str, Any] = {"resolution": args.resolution, "untiled_seconds": round(time.perf_counter() - start, 1),
                              "decoder": []}
    for spec in args.tiling or ["32,8", "32,16", "40,12", "48,16"]:
        tile, overlap = (int(v) for v in spec.split(","))
        tiling = Tiling(tile, tile, overlap)
        for option in args.option or ["plain"]:
            start = time.perf_counter()
            out = decode_tiled(dec, z, tiling, option, oracle)
            figures = compare(reference, out)
            row = {"option": option, "tile": tile, "overlap": overlap, "tiles": tile_count(latent, tiling),
                   "image_psnr_db": image_psnr(reference, out), "psnr_db": figures.psnr_db,
                   "max_abs": round(figures.max_abs, 4), "largest_tensor_mib": 256 * (8 * tile) ** 2 * 4 // 2**20,
                   "seconds": round(time.perf_counter() - start, 1)}
            result["decoder"].append(row)
            print(row, flush=True)
    if args.encoder:
        result["encoder"] = encoder_rows(vae, np.clip(reference, -1, 1), args.tiling or ["32,8"])
    emit(result, args.json)
    return 0


@torch.no_grad()
def encoder_rows(vae: Any, image: np.ndarray, tilings: list[str]) -> list[dict[str, Any]]:
    """Tiled vs untiled encoder moments (mean, log-variance) of the untiled decode, clipped to [-1, 1]."""
    def encode(x: np.ndarray) -> np.ndarray:
        dist = vae.encode(torch.from_numpy(x)).latent_dist
        return torch.cat([dist.mean, dist.logvar], dim=1).numpy()

    reference = encode(image)
    rows = []
    for spec in tilings:
        tile, overlap = (int(v) for v in spec.split(","))
        out = run_tiled(encode, image, Tiling(tile, tile, overlap), 8, 1)
        mean = compare(reference[:, :4], out[:, :4])
        rows.append({"tile": tile, "overlap": overlap, "mean_psnr_db": mean.psnr_db, "mean_max_abs": mean.max_abs,
                     "moments_psnr_db": compare(reference, out).psnr_db})
        print(rows[-1], flush=True)
    return rows


if __name__ == "__main__":
    raise SystemExit(main())
