"""Every preset, exported from one model and then generated from: the check that no preset ships broken.

    python -m pocketsd.bench.all_presets --model sd15 --work bundles/ [--preset cpu --preset cpu-lowmem ...] \
        [--steps 2] [--out results/all_presets]

For each preset (default: every one in ``split_configs/``): ``pocketsd export`` in a child process (wall time and the
child's own peak RSS), then ``pocketsd generate`` from the bundle in another child with the bundle's own memory
policy (wall time, peak RSS). CoreML bundles can only run where CoreML does (macOS); elsewhere the bundle is read
back (``inspect``) and laid out with ``apple-resources`` instead, and the result says so. A failed step is recorded
with its exit code and the last line it printed, and the bench goes on with the next preset; it exits 1 if any
preset failed. Bundles stay in ``--work`` (delete them yourself: SD 1.5 bundles are GBs).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pocketsd.bench.low_memory import component_disk_bytes


def run_child(command: list[str]) -> dict[str, Any]:
    """Run one pocketsd command; its wall time, own peak RSS (``wait4``), exit code and last stderr line."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-m", "pocketsd.cli", *command], stderr=subprocess.PIPE, text=True)
    stderr = child.stderr.read() if child.stderr else ""  # to the end first: wait4 must reap the child itself
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = code = os.waitstatus_to_exitcode(status)
    lines = [line for line in stderr.splitlines() if line.strip()]
    return {"command": "pocketsd " + " ".join(command), "exit_code": code,
            "wall_s": round(time.perf_counter() - start, 1),
            "peak_rss_mb": round(usage.ru_maxrss * (1 if sys.platform == "darwin" else 1024) / 1e6, 1),
            **({"last_line": lines[-1]} if code != 0 and lines else {})}


def can_run_coreml() -> bool:
    return sys.platform == "darwin"


def one_preset(preset: str, model: str, work: Path, steps: int, extra: list[str]) -> dict[str, Any]:
    bundle = work / preset
    row: dict[str, Any] = {"preset": preset, "bundle": str(bundle)}
    if bundle.exists():
        raise SystemExit(f"{bundle} exists: give an empty --work folder (bundles are not reused: they may be stale)")
    row["export"] = run_child(["export", "--model", model, "--preset", preset, "--out", str(bundle), "--quiet",
                               *extra])
    if row["export"]["exit_code"] != 0:
        row["ok"] = False
        return row
    from pocketsd.runtime.manifest import load_manifest

    manifest = load_manifest(bundle)
    row.update(backend=manifest.target.get("backend"), dims=manifest.dims, disk_bytes=component_disk_bytes(bundle),
               chunks={c: len(v.chunks) for c, v in manifest.components.items()})
    if manifest.target.get("backend") == "coreml" and not can_run_coreml():
        row["generate"] = {"skipped": "CoreML predictions need macOS (coremltools cannot run models on Linux)"}
        row["read_back"] = run_child(["inspect", str(bundle)])
        row["apple_resources"] = run_child(["apple-resources", str(bundle), "--out", str(work / f"{preset}-Resources"),
                                            "--no-compile"])
        row["ok"] = row["read_back"]["exit_code"] == 0 and row["apple_resources"]["exit_code"] == 0
        return row
    row["generate"] = run_child(["generate", str(bundle), "--prompt", "a lighthouse on a cliff at sunset",
                                 "--steps", str(steps), "--seed", "1", "--out", str(work / f"{preset}.png"),
                                 "--quiet"])
    row["ok"] = row["generate"]["exit_code"] == 0
    return row


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| preset | backend | chunks (te/unet/vae dec) | UNet on disk | export | export peak RSS | generate | "
             "generate peak RSS | ok |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        c, e, g = r.get("chunks", {}), r["export"], r.get("generate", {})
        generate = g.get("skipped") or (f"{g['wall_s']:.1f} s" if "wall_s" in g else "-")
        peak = f"{g['peak_rss_mb']:.0f} MB" if "peak_rss_mb" in g else "-"
        ok = "yes" if r["ok"] else "NO: " + (g.get("last_line") or e.get("last_line") or "see result.json")
        lines.append(f"| {r['preset']} | {r.get('backend', '-')} | {c.get('text_encoder', '-')}/{c.get('unet', '-')}/"
                     f"{c.get('vae_decoder', '-')} | {r.get('disk_bytes', {}).get('unet', 0) / 1e9:.3f} GB | "
                     f"{e['wall_s']:.0f} s | {e['peak_rss_mb'] / 1e3:.1f} GB | {generate} | {peak} | {ok} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    from pocketsd.export.preset import builtin_presets

    parser = argparse.ArgumentParser(prog="python -m pocketsd.bench.all_presets", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a diffusers folder, e.g. from `pocketsd random-model`")
    parser.add_argument("--work", type=Path, required=True, help="empty folder for the bundles")
    parser.add_argument("--preset", action="append", help="default: every built-in preset")
    parser.add_argument("--steps", type=int, default=2, help="denoising steps of each generate")
    parser.add_argument("--out", type=Path, default=Path("results/all_presets"))
    parser.add_argument("extra", nargs="*", help="more `pocketsd export` arguments for every preset (after --)")
    args = parser.parse_args(argv)
    presets = args.preset or builtin_presets()
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, preset in enumerate(presets, start=1):
        print(f"[{i}/{len(presets)}] {preset}", file=sys.stderr)
        rows.append(one_preset(preset, args.model, args.work, args.steps, args.extra))
        (args.out / "result.json").write_text(json.dumps({"model": args.model, "rows": rows}, indent=2) + "\n")
    (args.out / "result.md").write_text(markdown(rows))
    print(markdown(rows))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
