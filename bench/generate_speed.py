"""Time ``generate`` on a bundle: session load, text encoding, per UNet step, VAE decode, and peak memory.

    python -m pocketsd.bench.generate_speed BUNDLE [--steps 10] [--threads 0] [--memory stream] \
        [--engine openvino] [--json out.json]

Run it once per bundle in a fresh process: peak RSS (``getrusage``) covers the whole process, so a second bundle in
the same process would report the first one's peak. Step times exclude the first step (warm-up).

With ``--memory stream`` or ``prefetch`` nothing stays loaded: ``load_s`` then covers the manifest, the tokenizer
and hashing every chunk file once, and every step, encode and decode time includes opening its chunks (which is
the price of the mode). The JSON says which (``load_s_covers``).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from pocketsd.bench.report import emit, peak_rss_bytes
from pocketsd.runtime.execution import MEMORY_POLICIES
from pocketsd.runtime.sessions import ENGINES


def measure(bundle: Path, steps: int, threads: int | None, scheduler: str = "euler",
            memory: str | None = None, engine: str = "onnxruntime") -> dict[str, Any]:
    from pocketsd.runtime.pipeline import Pipeline

    t0 = time.perf_counter()
    pipe = Pipeline.from_bundle(bundle, threads=threads, memory=memory, engine=engine)
    if pipe.memory == "resident":
        for component in ("text_encoder", "unet", "vae_decoder"):
            pipe.runner(component)
        covers = "manifest, tokenizer, and opening every chunk once (kept open)"
    else:
        pipe.verify()
        covers = "manifest, tokenizer and hashing every chunk file once; chunks are opened on each use, so step, " \
                 "encode and decode times include opening them"
    load_s = time.perf_counter() - t0

    pipe.encode_prompt("warm up")
    t0 = time.perf_counter()
    pipe.encode_prompt("a lighthouse on a cliff at sunset")
    encode_s = time.perf_counter() - t0

    marks: list[float] = []
    t_start = time.perf_counter()
    latents: list[np.ndarray] = []
    d = pipe.manifest.dims
    inpaint = {}
    if int(d.get("unet_in_channels", d["latent_channels"])) != int(d["latent_channels"]):
        # an inpainting bundle: a grey image with its central square to repaint (the timing does not depend on them)
        mask = np.zeros((d["height"], d["width"]), np.uint8)
        mask[d["height"] // 4:3 * d["height"] // 4, d["width"] // 4:3 * d["width"] // 4] = 255
        inpaint = {"image": np.full((d["height"], d["width"], 3), 128, np.uint8), "mask_image": mask}
    pipe("a lighthouse on a cliff at sunset", num_inference_steps=steps, guidance_scale=7.5, scheduler=scheduler,
         seed=0, output_type="np", callback=lambda done, total, x: (marks.append(time.perf_counter()),
                                                                      latents.append(x)), **inpaint)
    total_s = time.perf_counter() - t_start
    step_s = np.diff(marks).tolist()
    t0 = time.perf_counter()
    pipe.decode(latents[-1])
    decode_s = time.perf_counter() - t0
    return {
        "bundle": str(bundle), "model": pipe.manifest.model.get("name"), "preset": pipe.manifest.target.get("preset"),
        "resolution": f"{d['height']}x{d['width']}", "unet_batch": d["unet_batch"],
        "unet_chunks": len(pipe.manifest.component("unet").chunks), "steps": steps, "scheduler": scheduler,
        "inpainting": bool(inpaint),
        "threads": pipe.options.threads, "memory": pipe.memory, "engine": engine, "load_s": round(load_s, 3),
        "load_s_covers": covers,
        "text_encode_s": round(encode_s, 4),
        "step_s_median": round(statistics.median(step_s), 4) if step_s else None,
        "step_s_mean": round(statistics.fmean(step_s), 4) if step_s else None,
        "vae_decode_s": round(decode_s, 4), "generate_total_s": round(total_s, 3),
        "peak_rss_mb": round(peak_rss_bytes() / 1e6, 1), "machine": f"{platform.machine()} {platform.system()}",
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pocketsd.bench.generate_speed", description=__doc__)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--scheduler", default="euler")
    parser.add_argument("--memory", choices=MEMORY_POLICIES,
                        help="when chunks are loaded (default: the bundle's preset, else resident)")
    parser.add_argument("--engine", choices=ENGINES, default="onnxruntime", help="what runs the ONNX chunks")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    result = measure(args.bundle, args.steps, args.threads, args.scheduler, args.memory, args.engine)
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
