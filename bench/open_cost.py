"""What reopening a bundle's chunks costs, with the optimized graphs stored at export and with the original graphs.

    python -m pocketsd.bench.open_cost BUNDLE [--component unet] [--repeats 5] [--out results/open_cost]

Opens every chunk of the component the way the ``stream`` policy does (no arena, no prepacking; hashes checked once,
before timing), ``--repeats`` times each way, the two ways interleaved chunk by chunk so that drift hits both alike.
Reports per way the median time to open all chunks once (what one streamed UNet step pays) and the slowest chunk.
Writes ``result.json`` and ``result.md`` to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from pocketsd.runtime.manifest import load_manifest
from pocketsd.runtime.sessions import OnnxSession, SessionOptions, onnx_graph, verify_chunk

WAYS = ("optimized", "original")


def measure(bundle: Path, component: str, repeats: int) -> dict[str, Any]:
    manifest = load_manifest(bundle)
    chunks = [c for c in manifest.component(component).chunks if c.format == "onnx"]
    if not chunks or any(c.optimized is None for c in chunks):
        raise SystemExit(f"{bundle}: the {component} chunks have no optimized graphs (exported before they existed)")
    options = SessionOptions(transient=True)
    times: dict[str, list[list[float]]] = {w: [[] for _ in chunks] for w in WAYS}
    for i, chunk in enumerate(chunks):
        verify_chunk(bundle, chunk)
        graphs = {"optimized": onnx_graph(bundle, chunk), "original": bundle / chunk.file.path}
        if graphs["optimized"] == graphs["original"]:
            raise SystemExit(f"{chunk.id}'s optimized graph is for onnxruntime {chunk.optimized.version}, not this one")
        for _ in range(repeats + 1):  # the first round warms the page cache and is dropped
            for way in WAYS:
                start = time.perf_counter()
                OnnxSession(graphs[way], options, chunk)
                times[way][i].append(time.perf_counter() - start)
    result: dict[str, Any] = {"bundle": str(bundle), "component": component, "chunks": len(chunks),
                              "repeats": repeats}
    for way in WAYS:
        medians = [statistics.median(t[1:]) for t in times[way]]
        result[way] = {"all_chunks_s": round(sum(medians), 4), "slowest_chunk_s": round(max(medians), 4)}
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pocketsd.bench.open_cost", description=__doc__.split("\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--component", default="unet")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("results/open_cost"))
    args = parser.parse_args(argv)
    result = measure(args.bundle, args.component, args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    table = ["| graphs | open all chunks once | slowest chunk |", "|---|---|---|"]
    table += [f"| {w} | {result[w]['all_chunks_s']:.3f} s | {result[w]['slowest_chunk_s'] * 1000:.1f} ms |"
              for w in WAYS]
    (args.out / "result.md").write_text("\n".join(table) + "\n")
    print(f"{result['chunks']} {args.component} chunks of {args.bundle}, median of {args.repeats}:")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
