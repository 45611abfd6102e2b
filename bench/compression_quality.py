"""Simulated quality and stored size of compression recipes for one component, measured in PyTorch.

    python -m pocketsd.bench.compression_quality --model DIR [--component unet] [--resolution 512x512]
        [--recipe palettize:6] [--recipe palettize:4] [--recipe mixed:4,6,8@35] [--json out.json]

Each recipe compresses a fresh copy of the component exactly as a CoreML export does (``compress_component``) and
reports the output PSNR against the uncompressed component on the export's seeded inputs, the stored weight bytes,
and the time it took. No CoreML conversion: this is the quality side of the ``iphone`` preset's choice.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from pocketsd.export.components import SD_COMPONENTS
from pocketsd.export.compression.coreml_component import compress_component
from pocketsd.export.compression.coreml_optimize import parse_compression
from pocketsd.export.exporter import resolve_dims
from pocketsd.export.model_loader import load_module, open_model_folder
from pocketsd.export.preset import load_preset, with_overrides


def recipe_config(recipe: str) -> dict[str, Any]:
    kind, _, spec = recipe.partition(":")
    if kind == "palettize":
        return {"global": {"mode": "palettize", "nbits": int(spec), "granularity": "per_tensor"}}
    if kind == "int8":
        return {"global": {"mode": "linear_int8"}}
    if kind == "mixed":
        bits, _, budget = spec.partition("@")
        return {"mixed_bit": {"bits": [int(b) for b in bits.split(",")], "min_psnr_db": float(budget)}}
    raise SystemExit(f"unknown recipe {recipe!r}: palettize:N, int8 or mixed:B1,B2,...@DB")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pocketsd.bench.compression_quality", description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--component", default="unet", choices=sorted(SD_COMPONENTS))
    parser.add_argument("--resolution")
    parser.add_argument("--recipe", action="append")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    folder = open_model_folder(args.model)
    preset = with_overrides(load_preset("iphone"), resolution=args.resolution)
    dims = resolve_dims(folder, preset)
    spec = SD_COMPONENTS[args.component]
    results = []
    for recipe in args.recipe or ["palettize:6", "palettize:4", "mixed:4,6,8@35"]:
        config = parse_compression(recipe_config(recipe), "bench", preset.coreml.deployment_target)
        model = load_module(folder, spec.subfolder)
        start = time.perf_counter()
        done = compress_component(spec, model, dims, config, preset.precision)
        report = {"recipe": recipe, "seconds": round(time.perf_counter() - start, 1), **done.report}
        results.append(report)
        print(json.dumps(report), flush=True)
        del model, done
    if args.json:
        args.json.write_text(json.dumps({"resolution": f"{dims.height}x{dims.width}", "results": results},
                                        indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
