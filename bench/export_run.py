"""Export a model with a preset in a child process and record what it cost and what it wrote.

    python -m pocketsd.bench.export_run --model DIR --preset iphone --out BUNDLE [--json result.json] [-- EXTRA ARGS]

Figures: wall time and peak RSS of the export (the child's, from ``getrusage``), bytes on disk per component and per
chunk, stored weight bytes, the compression report and parity figures from the manifest.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pocketsd.bench.report import emit, peak_rss_bytes
from pocketsd.runtime.hashing import size_of
from pocketsd.runtime.manifest import load_manifest


def summarize(bundle: Path) -> dict[str, Any]:
    manifest = load_manifest(bundle)
    components = {}
    for cid, component in manifest.components.items():
        chunks = [{"id": c.id, "disk_bytes": sum(size_of(bundle / f.path) for f in c.files),
                   "weight_bytes": c.weight_bytes, "psnr_db": c.parity.psnr_db if c.parity else None}
                  for c in component.chunks]
        components[cid] = {"chunks": chunks, "disk_bytes": sum(c["disk_bytes"] for c in chunks),
                           "psnr_db": component.parity.psnr_db if component.parity else None,
                           "compression": component.extra.get("compression")}
    return {"preset": manifest.target.get("preset"), "backend": manifest.target.get("backend"),
            "dims": manifest.dims, "components": components}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pocketsd.bench.export_run", description=__doc__)
    parser.add_argument("--model", required=True)
    parser.add_argument("--preset", required=True)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--json", type=Path)
    parser.add_argument("extra", nargs="*", help="more `pocketsd export` arguments (after --)")
    args = parser.parse_args(argv)
    command = [sys.executable, "-m", "pocketsd.cli", "export", "--model", args.model, "--preset", args.preset,
               "--out", str(args.out), "--quiet", *args.extra]
    start = time.perf_counter()
    done = subprocess.run(command)
    seconds = time.perf_counter() - start
    peak = peak_rss_bytes(children=True)
    if done.returncode != 0:
        return done.returncode
    result = {"command": " ".join(command[2:]), "export_s": round(seconds, 1), "peak_rss_gb": round(peak / 1e9, 2),
              **summarize(args.out)}
    emit(result, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
