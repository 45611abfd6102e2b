"""What running a bundle's shared prefix once saves per UNet call (runtime/per_row.py).

    python -m pocketsd.bench.shared_prefix BUNDLE [--engine openvino-bf16] [--calls 20] [--out results/shared_prefix]

One pipeline, one process, so both ways run on the same compiled model and the same memory (between processes this
box's first-loaded worker ran up to 40 % slower: docs/bench/where_time_goes.md). The UNet is called with the inputs of
a guided step, one latent in both rows (its prefix runs once), and with the same inputs but for one element of the
second row's latent (it runs twice); the two alternate, which goes first swapping each round. Reports each way's
median and the median over the rounds of twice / once. Writes ``result.json`` and ``result.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from pocketsd.contract import UNET_IO
from pocketsd.runtime.pipeline import Pipeline
from pocketsd.runtime.sessions import ENGINES

WAYS = ("once", "twice")


def guided_inputs(pipe: Pipeline, seed: int = 0) -> dict[str, np.ndarray]:
    """Every input of the bundle's UNet, seeded, with one latent in every row (a guided step)."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in pipe.manifest.component("unet").inputs:
        value = rng.standard_normal(spec.shape).astype(spec.dtype)
        if spec.name == UNET_IO.sample:
            value = np.repeat(value[:1], spec.shape[0], axis=0)
        elif spec.name == UNET_IO.timestep:
            value = np.full(spec.shape, 500, spec.dtype)
        feeds[spec.name] = value
    return feeds


def measure(bundle: Path, engine: str, calls: int) -> dict[str, Any]:
    pipe = Pipeline.from_bundle(bundle, engine=engine)
    unet = pipe.runner("unet")
    if not any(c.per_row for c in unet.component.chunks):
        raise SystemExit(f"{bundle}: its UNet has no shared prefix (export it with a preset that sets shared_prefix)")
    once = guided_inputs(pipe)
    twice = dict(once, **{UNET_IO.sample: once[UNET_IO.sample].copy()})
    twice[UNET_IO.sample][1].flat[0] += 1e-3
    ways = {"once": lambda: unet(**once), "twice": lambda: unet(**twice)}
    for call in ways.values():  # warm-up
        call()
    times: dict[str, list[float]] = {w: [] for w in WAYS}
    for i in range(calls):
        for way in (WAYS if i % 2 == 0 else WAYS[::-1]):
            start = time.perf_counter()
            ways[way]()
            times[way].append(time.perf_counter() - start)
    ratios = [b / a for a, b in zip(times["once"], times["twice"])]
    return {"bundle": str(bundle), "engine": engine, "calls": calls, "dims": pipe.manifest.dims,
            **{f"{w}_median_s": round(statistics.median(times[w]), 4) for w in WAYS},
            "twice_over_once": round(statistics.median(ratios), 4), "times_s": times}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pocketsd.bench.shared_prefix", description=__doc__.split("\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--engine", default="onnxruntime", choices=ENGINES)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("results/shared_prefix"))
    args = parser.parse_args(argv)
    result = measure(args.bundle, args.engine, args.calls)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    d = result["dims"]
    table = ["| prefix runs | UNet call, median | twice / once (median of rounds) |", "|---|---|---|",
             f"| once (equal rows) | {result['once_median_s']:.4f} s | |",
             f"| twice (rows differ) | {result['twice_median_s']:.4f} s | {result['twice_over_once']:.4f} |"]
    (args.out / "result.md").write_text("\n".join(table) + "\n")
    print(f"{args.bundle} at {d['height']}x{d['width']}, {args.engine}, {args.calls} rounds:")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
