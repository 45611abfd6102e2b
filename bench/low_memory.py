"""Peak memory, end-to-end time and image agreement of ``pocketsd generate`` runs, each in a fresh process.

    python -m pocketsd.bench.low_memory --run cpu=B_CPU --run lowmem=B_LOW:stream --run lowmem-res=B_LOW:resident \
        --compare lowmem,lowmem-res --compare cpu,lowmem --steps 20 --out results/low_memory

Each ``--run LABEL=BUNDLE[:MEMORY]`` is one ``pocketsd generate`` process (MEMORY: resident | stream | prefetch; the
bundle's own policy when omitted). Its peak RSS is that process's own ``ru_maxrss`` from ``os.wait4`` — VmHWM of the
whole generate: imports, text encoder, UNet, VAE decode — and its time is the wall time of the whole command, load
included. Runs go in the order given, one at a time, with the same prompt, seed, steps and guidance, so ratios
between them come from one sitting. ``--compare A,B`` gives the PSNR of B's image against A's (uint8 pixels, 255
peak) and whether the pixels are identical. Writes ``result.json``, ``result.md`` and the PNGs to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pocketsd.runtime.hashing import size_of
from pocketsd.runtime.manifest import load_manifest

PROMPT = "a lighthouse on a cliff at sunset, oil painting"


@dataclass(frozen=True)
class Run:
    label: str
    bundle: Path
    memory: str | None  # None: the bundle's own policy


def parse_run(text: str) -> Run:
    label, _, rest = text.partition("=")
    bundle, _, memory = rest.partition(":")
    if not label or not bundle or memory not in ("", "resident", "stream", "prefetch"):
        raise argparse.ArgumentTypeError(f"expected LABEL=BUNDLE[:resident|stream|prefetch], got {text!r}")
    return Run(label, Path(bundle), memory or None)


def component_disk_bytes(bundle: Path) -> dict[str, int]:
    manifest = load_manifest(bundle)
    return {cid: sum(sum(size_of(bundle / f.path) for f in c.files) for c in comp.chunks)
            for cid, comp in manifest.components.items()}


def generate(run: Run, out_png: Path, steps: int, seed: int, threads: int | None) -> dict[str, Any]:
    """One ``pocketsd generate`` process; its own peak RSS comes back from ``wait4``."""
    command = [sys.executable, "-m", "pocketsd.cli", "generate", str(run.bundle), "--prompt", PROMPT,
               "--steps", str(steps), "--seed", str(seed), "--out", str(out_png), "--quiet"]
    if run.memory:
        command += ["--memory", run.memory]
    if threads is not None:
        command += ["--threads", str(threads)]
    start = time.perf_counter()
    child = subprocess.Popen(command)
    _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    child.returncode = code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{run.label}: `{' '.join(command)}` exited with {code}")
    peak = usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024)
    manifest = load_manifest(run.bundle)
    return {"label": run.label, "bundle": str(run.bundle), "preset": manifest.target.get("preset"),
            "memory": run.memory or manifest.target.get("config", {}).get("runtime", {}).get("memory", "resident"),
            "resolution": f"{manifest.dims['height']}x{manifest.dims['width']}", "steps": steps,
            "unet_batch": manifest.dims["unet_batch"], "chunks": {c: len(v.chunks) for c, v in
                                                                  manifest.components.items()},
            "disk_bytes": component_disk_bytes(run.bundle), "wall_s": round(seconds, 2),
            "peak_rss_mb": round(peak / 1e6, 1), "image": str(out_png)}


def image_psnr(a: Path, b: Path) -> dict[str, Any]:
    from PIL import Image

    x = np.asarray(Image.open(a).convert("RGB"), dtype=np.float64)
    y = np.asarray(Image.open(b).convert("RGB"), dtype=np.float64)
    mse = float(np.mean((x - y) ** 2))
    return {"psnr_db": None if mse == 0 else round(20 * np.log10(255.0 / np.sqrt(mse)), 2),
            "identical_pixels": mse == 0, "max_abs": int(np.max(np.abs(x - y)))}


def markdown(result: dict[str, Any]) -> str:
    lines = ["| run | preset | memory | UNet batch | chunks (te/unet/vae) | UNet on disk | wall | peak RSS |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        c = r["chunks"]
        lines.append(f"| {r['label']} | {r['preset']} | {r['memory']} | {r['unet_batch']} | "
                     f"{c.get('text_encoder', 0)}/{c.get('unet', 0)}/{c.get('vae_decoder', 0)} | "
                     f"{r['disk_bytes'].get('unet', 0) / 1e9:.3f} GB | {r['wall_s']:.1f} s | "
                     f"{r['peak_rss_mb']:.0f} MB |")
    if result["comparisons"]:
        lines += ["", "| reference | compared | image PSNR | identical pixels | time ratio |", "|---|---|---|---|---|"]
        for c in result["comparisons"]:
            psnr = "∞" if c["psnr_db"] is None else f"{c['psnr_db']:.1f} dB"
            lines.append(f"| {c['reference']} | {c['compared']} | {psnr} | {c['identical_pixels']} | "
                         f"{c['time_ratio']:.2f}× |")
    return "\n".join(lines) + "\n"


def chart(result: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    runs = result["runs"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    labels = [r["label"] for r in runs]
    left.barh(labels, [r["peak_rss_mb"] for r in runs])
    left.set_xlabel("peak RSS of the generate process (MB)")
    right.barh(labels, [r["wall_s"] for r in runs])
    right.set_xlabel(f"end-to-end time, {runs[0]['steps']} steps (s)")
    fig.suptitle(f"pocketsd generate, {runs[0]['resolution']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pocketsd.bench.low_memory", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=parse_run, action="append", required=True, metavar="LABEL=BUNDLE[:MEMORY]")
    parser.add_argument("--compare", action="append", default=[], metavar="REFERENCE,COMPARED")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--out", type=Path, default=Path("results/low_memory"))
    args = parser.parse_args(argv)
    labels = [r.label for r in args.run]
    pairs = [tuple(c.split(",")) for c in args.compare]
    for pair in pairs:
        if len(pair) != 2 or not set(pair) <= set(labels):
            parser.error(f"--compare takes two run labels from {labels}, got {','.join(pair)!r}")
    args.out.mkdir(parents=True, exist_ok=True)
    runs = []
    for i, run in enumerate(args.run, start=1):
        print(f"[{i}/{len(args.run)}] {run.label}: {run.bundle} ({run.memory or 'bundle default'})", file=sys.stderr)
        runs.append(generate(run, args.out / f"{run.label}.png", args.steps, args.seed, args.threads))
    by_label = {r["label"]: r for r in runs}
    comparisons = [{"reference": a, "compared": b, **image_psnr(Path(by_label[a]["image"]), Path(by_label[b]["image"])),
                    "time_ratio": round(by_label[b]["wall_s"] / by_label[a]["wall_s"], 3)} for a, b in pairs]
    result = {"prompt": PROMPT, "seed": args.seed, "steps": args.steps, "runs": runs, "comparisons": comparisons}
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "result.md").write_text(markdown(result))
    chart(result, args.out / "result.png")
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
