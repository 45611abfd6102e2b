"""What bounding activations costs in accuracy: sliced attention and tiled VAE against the plain export.

    python -m pocketsd.bench.activation_bounds --model sd15 --reference B_CPU --work DIR \
        [--slice-mb 16] [--tile 32] [--overlap 8] [--json out.json]

``--reference`` is an fp32 bundle with the original attention and an untiled VAE (the ``cpu`` preset). The bench
exports the same model's UNet and VAE decoder again at fp32 with only two things changed, attention in query slices
and the VAE decoder in overlapping tiles, then feeds both bundles the same seeded inputs: one UNet call (latents,
timestep 981, text states) and one decode of a latent drawn as the pipeline's are (N(0, 1), divided by the scaling
factor). The UNet's PSNR is pocketsd's usual ``20·log10(max|reference| / rmse)``; the decode's is taken on the
final image, clipped to [0, 1] with peak 1, which is what a viewer sees (``bench/vae_tiling_quality.py`` gives the
decoder's raw-output figure too, and other tile sizes).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from pocketsd.bench.report import emit


def psnr(reference: np.ndarray, actual: np.ndarray, peak: float | None = None) -> float:
    ref, got = reference.astype(np.float64), actual.astype(np.float64)
    rmse = float(np.sqrt(np.mean((got - ref) ** 2)))
    top = float(np.max(np.abs(ref))) if peak is None else peak
    return float("inf") if rmse == 0 else round(20 * np.log10(top / rmse), 2)


def export_bounded(model: str, reference: Path, out: Path, slice_mb: float, tile: int, overlap: int) -> Path:
    from pocketsd.export.exporter import ExportRequest, export_bundle
    from pocketsd.export.preset import load_preset, preset_from_dict
    from pocketsd.runtime.manifest import load_manifest

    base = load_preset(str(load_manifest(reference).target.get("preset", "cpu")))
    config = {**base.to_dict(), "name": "activation-bounds", "components": ["unet", "vae_decoder"],
              "attention": {"form": "sliced", "slice_mb": slice_mb}, "vae_tiling": {"tile": tile, "overlap": overlap},
              "quantize": {}}
    res = load_manifest(reference).dims
    config["resolution"] = f"{res['height']}x{res['width']}"
    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        yaml.safe_dump(config, handle)
    return export_bundle(ExportRequest(model, preset_from_dict(config, handle.name), out))


def compare(reference: Path, bounded: Path, seed: int = 0) -> dict[str, Any]:
    from pocketsd.runtime.pipeline import Pipeline

    rng = np.random.default_rng(seed)
    ref, low = Pipeline.from_bundle(reference), Pipeline.from_bundle(bounded)
    d = ref.manifest.dims
    sample = rng.standard_normal((1, d["latent_channels"], d["latent_height"], d["latent_width"]), dtype=np.float32)
    context = ref.unet_context(rng.standard_normal((1, d["text_length"], d["text_hidden"]), dtype=np.float32))
    unet = [p.unet(sample, 981.0, context) for p in (ref, low)]
    images = [p.decode(sample) for p in (ref, low)]
    return {"unet_psnr_db": psnr(*unet), "unet_max_abs": float(np.max(np.abs(unet[0] - unet[1]))),
            "vae_decode_image_psnr_db": psnr(*images, peak=1.0),
            "tiling": low.manifest.component("vae_decoder").extra.get("tiling"),
            "attention": low.manifest.target["config"]["attention"]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pocketsd.bench.activation_bounds", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--reference", type=Path, required=True, help="fp32 bundle, original attention, untiled VAE")
    parser.add_argument("--work", type=Path, required=True, help="where the bounded bundle is written (must not exist)")
    parser.add_argument("--slice-mb", type=float, default=16.0)
    parser.add_argument("--tile", type=int, default=32)
    parser.add_argument("--overlap", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    bounded = export_bounded(args.model, args.reference, args.work, args.slice_mb, args.tile, args.overlap)
    emit({"reference": str(args.reference), "bounded": str(bounded), **compare(args.reference, bounded)}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
