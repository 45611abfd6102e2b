"""Quality on trained weights: does each preset and compression recipe still draw what the prompt asks for?

    python -m pocketsd.bench.shapes_quality --work W [--prompts 405] [--steps 20] [--guidance 7.5]
        [--out results/shapes_quality]

On the built-in trained ``shapes`` model (pocketsd.shapes), over a fixed prompt set (``scenes.prompt_set``: by
default all 405 scenes, each once, in a seeded order; ``--prompts N`` takes the first N), each prompt with its own
seed, the same for every row:
- bundles, run by the runtime (onnxruntime): ``cpu`` (fp32, the reference), ``cpu-int8``, ``cpu-int4`` and
  ``cpu-lowmem``. The last is exported from a copy of the preset whose VAE tile (8 latents, overlap 4: 3 × 3 tiles
  over the model's 16²) and attention slice (0.01 MB: 4 queries at a time) are scaled down to this small model, so
  that its tiling and slicing really run; the preset's own sizes would cover its whole picture in one tile;
- CoreML recipes for the UNet, simulated in PyTorch exactly as ``export`` compresses them (``compress_component``:
  the same palettes as the mlpackages, weights rounded to fp16) and run by diffusers' ``StableDiffusionPipeline``
  (fp32 compute; CoreML itself cannot run here) from the runtime's starting latents, against that pipeline
  uncompressed (itself compared with the ``cpu`` bundle: a parity check of the whole path);
- the ``cpu`` bundle again with fewer steps (FEWER_STEPS), against its pictures at ``--steps``;
- the same architecture with random weights (the ``cpu`` bundle of an untrained copy): what the judge says of noise.
For each row: PSNR of its pictures against its reference's (one MSE over all pictures), the judge's adherence
(pocketsd.shapes.judge: colour, shape, position and all three), and the UNet's stored weight bytes. Writes
``result.json`` and ``result.md`` to ``--out``, and a grid of the first pictures of each row.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pocketsd.bench.activation_bounds import psnr
from pocketsd.shapes.judge import adherence, judge
from pocketsd.shapes.scenes import Scene, all_scenes, prompt_set

LOWMEM_SCALED = {"vae_tiling": {"tile": 8, "overlap": 4, "group_norm": "image", "mid_block": "whole"},
                 "attention": {"form": "sliced", "slice_mb": 0.01}}
# recipe name -> the UNet's CoreML compression block (preset YAML form); min_psnr_db 1 dB: measured here, not gated
RECIPES = {
    "iphone: 6-bit palettes": {"global": {"mode": "palettize", "nbits": 6, "granularity": "per_tensor"},
                               "min_psnr_db": 1},
    "4-bit palettes": {"global": {"mode": "palettize", "nbits": 4, "granularity": "per_tensor"}, "min_psnr_db": 1},
    "mixed 4/6-bit, 4.5 on average": {"mixed_bit": {"bits": [4, 6], "average_bits": 4.5, "min_psnr_db": 1}},
    "mixed 4/6-bit, 5.0 on average": {"mixed_bit": {"bits": [4, 6], "average_bits": 5.0, "min_psnr_db": 1}},
}
GRID = 10
FEWER_STEPS = (10, 5)  # rows of the fp32 bundle run with fewer steps than --steps, compared with it


@dataclass(frozen=True)
class Settings:
    prompts: int
    steps: int
    guidance: float


def export(model: str, preset: str, out: Path) -> Path:
    from pocketsd.cli import main as cli

    if cli(["export", "--model", model, "--preset", preset, "--out", str(out), "--quiet"]) != 0:
        raise SystemExit(f"export of {model} with {preset} failed (its error is above)")
    return out


def lowmem_preset(work: Path) -> Path:
    """``cpu-lowmem`` with the tile and slice sizes of LOWMEM_SCALED, as a YAML file in ``work``."""
    import yaml

    from pocketsd.export.preset import preset_text

    data = yaml.safe_load(preset_text("cpu-lowmem")[0])
    data.update(LOWMEM_SCALED, name="cpu-lowmem-scaled")
    path = work / "cpu-lowmem-scaled.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def bundle_images(bundle: Path, scenes: list[Scene], settings: Settings) -> np.ndarray:
    """Every prompt's picture from ``bundle``. Its chunks stay open (``memory="resident"``) even where the preset
    streams them (``cpu-lowmem``): streaming changes when a chunk is open, not what it computes, and reopening every
    chunk at every step would take this bench from minutes to hours."""
    from pocketsd.runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(bundle, memory="resident")
    return np.stack([pipe(scene.caption, num_inference_steps=settings.steps, guidance_scale=settings.guidance,
                          seed=i, output_type="np") for i, scene in enumerate(scenes)])


def diffusers_images(folder: Path, scenes: list[Scene], settings: Settings,
                     change_unet: Callable[[Any], Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
    import diffusers
    import torch

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                             requires_safety_checker=False, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    report = change_unet(pipe) if change_unet else {}
    size = pipe.unet.config.sample_size
    images = []
    with torch.inference_mode():
        for start in range(0, len(scenes), 20):
            batch = scenes[start:start + 20]
            # the runtime's starting latents for seed i (Pipeline._initial_latents), so that pictures compare
            latents = np.concatenate([np.random.default_rng(start + i).standard_normal(
                (1, pipe.unet.config.in_channels, size, size), dtype=np.float32) for i in range(len(batch))])
            images.append(pipe([s.caption for s in batch], num_inference_steps=settings.steps,
                               guidance_scale=settings.guidance, latents=torch.from_numpy(latents),
                               output_type="np").images)
    return np.concatenate(images), report


def compressor(folder: Path, recipe: dict[str, Any]) -> Callable[[Any], dict[str, Any]]:
    """Compress a pipeline's UNet in place as a CoreML ``iphone`` export would, with ``recipe`` as its block."""

    def change(pipe: Any) -> dict[str, Any]:
        from pocketsd.export.components import SD_COMPONENTS
        from pocketsd.export.compression.coreml_component import compress_component
        from pocketsd.export.compression.coreml_optimize import parse_compression
        from pocketsd.export.exporter import resolve_dims
        from pocketsd.export.model_loader import open_model_folder
        from pocketsd.export.preset import load_preset

        preset = load_preset("iphone")
        dims = resolve_dims(open_model_folder(folder), preset)
        config = parse_compression(recipe, "shapes_quality", preset.coreml.deployment_target)
        done = compress_component(SD_COMPONENTS["unet"], pipe.unet, dims, config, "fp16")
        pipe.unet = done.model
        return {"unet_bytes": done.report["stored_weight_bytes"], "modes": done.report["modes"],
                **({"mixed_bit": done.report["mixed_bit"]} if "mixed_bit" in done.report else {})}

    return change


def untrained_copy(folder: Path, out: Path) -> Path:
    """The shapes architecture with random weights (``write_random_model``'s seeded initialisation), with the trained
    tokenizer, so that captions encode as the trained model's do."""
    from pocketsd.export.random_model import write_random_model
    from pocketsd.shapes.train import model_configs

    write_random_model(out, model_configs())
    shutil.rmtree(out / "tokenizer")
    shutil.copytree(folder / "tokenizer", out / "tokenizer")
    return out


def row(name: str, path: str, images: np.ndarray, scenes: list[Scene], reference: np.ndarray | None,
        unet_bytes: int | None, started: float, **extra: Any) -> dict[str, Any]:
    rates = adherence([judge(image, scene) for image, scene in zip(images, scenes)])
    figure = psnr(reference, images, peak=1.0) if reference is not None else None  # one over all pictures
    out = {"row": name, "path": path, "psnr_db": None if figure is None else round(figure, 2),
           "adherence": {k: round(v, 4) for k, v in rates.items()}, "unet_bytes": unet_bytes,
           "seconds": round(time.perf_counter() - started, 1), **extra}
    print(json.dumps(out), flush=True)
    return out


def run(work: Path, settings: Settings) -> tuple[list[dict[str, Any]], dict[str, np.ndarray]]:
    from pocketsd.bench.low_memory import component_disk_bytes
    from pocketsd.shapes import model_folder

    scenes = prompt_set(settings.prompts)
    folder = model_folder()
    rows, grids = [], {}

    def bundle_row(name: str, preset: str, model: str = "shapes", reference: np.ndarray | None = None,
                   bundle: Path | None = None, steps: int | None = None) -> np.ndarray:
        started = time.perf_counter()
        bundle = bundle or export(model, preset, work / name.split(" ")[0])
        images = bundle_images(bundle, scenes, settings if steps is None else replace(settings, steps=steps))
        rows.append(row(name, "bundle (onnxruntime)", images, scenes, reference,
                        component_disk_bytes(bundle)["unet"], started))
        grids[name] = images[:GRID]
        return images

    fp32 = bundle_row("cpu (fp32)", "cpu")
    for steps in FEWER_STEPS:
        if steps < settings.steps:
            bundle_row(f"cpu (fp32), {steps} steps", "cpu", reference=fp32, bundle=work / "cpu", steps=steps)
    bundle_row("cpu-int8", "cpu-int8", reference=fp32)
    bundle_row("cpu-int4", "cpu-int4", reference=fp32)
    bundle_row("cpu-lowmem (tiles and slices scaled to 64²)", str(lowmem_preset(work)), reference=fp32)
    started = time.perf_counter()
    torch_fp32, _ = diffusers_images(folder, scenes, settings)
    rows.append(row("fp32, PyTorch (diffusers)", "simulated reference", torch_fp32, scenes, fp32, None, started,
                    psnr_against="cpu (fp32) bundle"))
    grids["fp32, PyTorch"] = torch_fp32[:GRID]
    for name, recipe in RECIPES.items():
        started = time.perf_counter()
        images, report = diffusers_images(folder, scenes, settings, compressor(folder, recipe))
        rows.append(row(f"{name} (simulated)", "simulated in PyTorch", images, scenes, torch_fp32,
                        report.pop("unet_bytes"), started, **report))
        grids[name] = images[:GRID]
    random_model = untrained_copy(folder, work / "untrained-model")
    bundle_row("random weights", "cpu", model=str(random_model))
    return rows, grids


def markdown(rows: list[dict[str, Any]], settings: Settings) -> str:
    lines = [f"Quality on the trained `shapes` model: {settings.prompts} prompts, {settings.steps} steps, guidance "
             f"{settings.guidance}, one seed per prompt.", "",
             "| row | run as | UNet stored | PSNR vs fp32 | colour | shape | position | all three |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        a = r["adherence"]
        size = f"{r['unet_bytes'] / 1e6:.2f} MB" if r["unet_bytes"] else "-"
        figure = "-" if r["psnr_db"] is None else f"{r['psnr_db']:.1f} dB"
        lines.append(f"| {r['row']} | {r['path']} | {size} | {figure} | {a['colour']:.0%} | {a['shape']:.0%} | "
                     f"{a['position']:.0%} | **{a['all']:.0%}** |")
    return "\n".join(lines) + "\n"


def save_grid(grids: dict[str, np.ndarray], path: Path) -> None:
    from PIL import Image

    rows = [np.concatenate(list((images * 255).round().clip(0, 255).astype(np.uint8)), axis=1)
            for images in grids.values()]
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pocketsd.bench.shapes_quality", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, required=True, help="an empty folder for the bundles")
    parser.add_argument("--prompts", type=int, default=len(all_scenes()),
                        help="how many of the fixed prompt set's scenes (default: all, each once)")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--out", type=Path, default=Path("results/shapes_quality"))
    args = parser.parse_args(argv)
    if not 1 <= args.prompts <= len(all_scenes()):
        raise SystemExit(f"--prompts is {args.prompts}: give 1 to {len(all_scenes())} (there are that many scenes)")
    if args.work.exists() and any(args.work.iterdir()):
        raise SystemExit(f"{args.work} is not empty: give a new folder (bundles are not reused)")
    args.work.mkdir(parents=True, exist_ok=True)
    settings = Settings(args.prompts, args.steps, args.guidance)
    rows, grids = run(args.work, settings)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps({"settings": settings.__dict__, "rows": rows}, indent=2) + "\n")
    (args.out / "result.md").write_text(markdown(rows, settings))
    save_grid(grids, args.out / "grid.png")
    print(markdown(rows, settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
