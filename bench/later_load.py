"""What a later process pays to load a bundle when the page cache has lost its files, as after a long run of other
work: each round evicts the bundle's files and pocketsd's cache folder from the page cache, then loads the bundle in
a fresh process (every component's sessions opened, resident), once with the chunks opened one at a time and once
as the runtime chooses (sessions.open_workers), the two ways alternating.

    python -m pocketsd.bench.later_load BUNDLE [--engine onnxruntime] [--rounds 5] [--out results/later_load]

Eviction is ``posix_fadvise(DONTNEED)`` on every file, which drops clean cached pages without root (Linux; elsewhere
the script says it cannot evict and stops). Writes ``result.json`` and ``result.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

from pocketsd.runtime.hashing import cache_dir
from pocketsd.runtime.sessions import ENGINES

WAYS = ("one at a time", "runtime's choice")

# The child: load the bundle as the bench's workers do and print the seconds. With "1", the pipeline is made with
# every component's chunks opened one at a time (sessions.open_workers replaced before the pipeline is made).
_CHILD = """
import json, sys, time
import pocketsd.runtime.pipeline as pipeline
if sys.argv[3] == "1":
    pipeline.open_workers = lambda bundle_dir, options: (lambda chunks: 1)
start = time.perf_counter()
pipe = pipeline.Pipeline.from_bundle(sys.argv[1], engine=sys.argv[2], memory="resident")
for component in pipe.manifest.components:
    pipe.runner(component)
print(json.dumps({"seconds": time.perf_counter() - start}))
"""


def evict(*folders: Path) -> int:
    """Drop every file under ``folders`` from the page cache; returns how many bytes those files hold."""
    if not hasattr(os, "posix_fadvise"):
        raise SystemExit("this platform has no posix_fadvise: the page cache cannot be evicted here (Linux only)")
    total = 0
    for folder in (f for f in folders if f.is_dir()):
        for path in (p for p in folder.rglob("*") if p.is_file()):
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
            total += path.stat().st_size
    return total


def load_once(bundle: Path, engine: str, one_at_a_time: bool) -> float:
    done = subprocess.run([sys.executable, "-c", _CHILD, str(bundle), engine, "1" if one_at_a_time else "0"],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise SystemExit(f"loading {bundle} failed: {last}")
    return float(json.loads(done.stdout.strip().splitlines()[-1])["seconds"])


def measure(bundle: Path, engine: str, rounds: int) -> dict[str, Any]:
    load_once(bundle, engine, False)  # the cache entries exist before the first timed round (a later process)
    times: dict[str, list[float]] = {way: [] for way in WAYS}
    evicted = 0
    for round_ in range(rounds):
        for way in WAYS if round_ % 2 == 0 else WAYS[::-1]:
            evicted = evict(bundle, cache_dir())
            times[way].append(load_once(bundle, engine, way == WAYS[0]))
    result: dict[str, Any] = {"bundle": str(bundle), "engine": engine, "rounds": rounds, "evicted_bytes": evicted}
    for way in WAYS:
        result[way] = {"median_s": round(statistics.median(times[way]), 3), "min_s": round(min(times[way]), 3),
                       "max_s": round(max(times[way]), 3), "all_s": [round(t, 3) for t in times[way]]}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pocketsd.bench.later_load", description=__doc__.split("\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--engine", choices=ENGINES, default="onnxruntime")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("results/later_load"))
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    result = measure(args.bundle, args.engine, args.rounds)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    table = ["| chunks opened | load, median (min–max) |", "|---|---|"]
    table += [f"| {w} | {result[w]['median_s']:.2f} s ({result[w]['min_s']:.2f}–{result[w]['max_s']:.2f}) |"
              for w in WAYS]
    (args.out / "result.md").write_text("\n".join(table) + "\n")
    print(f"{args.bundle} on {args.engine}, a fresh process per load, {result['evicted_bytes'] / 1e9:.2f} GB evicted "
          f"from the page cache before each, {args.rounds} rounds:")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
