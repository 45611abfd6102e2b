"""Where a component's time goes, per operator type, as the engine itself measures it.

    python -m pocketsd.bench.op_profile BUNDLE [--component unet] [--engine onnxruntime] [--calls 3] [--threads 0]
                                               [--out results/op_profile]

Opens the component's chunks resident as the runtime does (onnxruntime: the graph ``onnx_graph`` picks, with
``onnx_session_options``; OpenVINO engines: the runtime's ``open_chunk``), with the engine's profiler on, chained by
the runtime's ``ComponentRunner``. Two warm-up calls, then ``--calls`` calls on seeded inputs of the manifest's
shapes. Per node: onnxruntime's ``enable_profiling`` trace (kernel durations) or OpenVINO's ``PERF_COUNT`` counters
(``real_time`` of executed nodes), summed per operator type (onnxruntime's op_name; OpenVINO's node type after its
own fusions) and listed for the slowest nodes, against the wall time of a call (profiling included). Writes
``result.json`` and ``result.md`` to ``--out``. Hashes are not checked.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from pocketsd.runtime import sessions
from pocketsd.runtime.chain import ComponentRunner
from pocketsd.runtime.execution import ResidentPolicy
from pocketsd.runtime.manifest import Chunk, Component, load_manifest
from pocketsd.runtime.per_row import PerRowSession
from pocketsd.runtime.sessions import ENGINES, SessionOptions, check_engine, onnx_graph, onnx_session_options

TOP_NODES = 15
# onnxruntime plans a session's memory pattern in its first run and allocates it in the second: at 512² the SD 1.5
# UNet's first 1 GiB attention-score buffer was faulted in again then (1.5 s for an 86 ms MatMul). Both are dropped.
WARM_UP = 2
NodeTimes = dict[tuple[str, str, str], float]  # (chunk id, node name, op type) -> seconds, summed over timed calls


def seeded_inputs(component: Component, seed: int = 0) -> dict[str, np.ndarray]:
    """Standard-normal floats (integers in [0, 1000)) of each component input's dtype and shape."""
    rng = np.random.default_rng(seed)
    draw = lambda s: rng.standard_normal(s.shape) if np.dtype(s.dtype).kind == "f" else rng.integers(0, 1000, s.shape)  # noqa: E731
    return {spec.name: draw(spec).astype(spec.dtype) for spec in component.inputs}


class _OrtSession:
    def __init__(self, session: Any) -> None:
        self.session, self._outputs = session, [o.name for o in session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self._outputs, self.session.run(self._outputs, feeds)))


class OrtProfiler:
    """onnxruntime sessions with ``enable_profiling``; their traces (all runs) are read at the end, warm-ups dropped."""

    def __init__(self, bundle: Path, options: SessionOptions, trace_dir: Path) -> None:
        self.bundle, self.options, self.trace_dir = bundle, options, trace_dir
        self.sessions: dict[str, _OrtSession] = {}

    def open(self, chunk: Chunk) -> _OrtSession:
        import onnxruntime as ort

        so = onnx_session_options(self.options, chunk)
        so.enable_profiling = True
        so.profile_file_prefix = str(self.trace_dir / chunk.id)
        session = ort.InferenceSession(str(onnx_graph(self.bundle, chunk)), so, providers=["CPUExecutionProvider"])
        self.sessions[chunk.id] = _OrtSession(session)
        return PerRowSession(self.sessions[chunk.id], chunk) if chunk.per_row else self.sessions[chunk.id]

    def after_warm_up(self) -> None: ...

    def node_times(self, warm_up: int, calls: int) -> NodeTimes:
        times: NodeTimes = defaultdict(float)
        for chunk_id, wrapped in self.sessions.items():
            events = json.loads(Path(wrapped.session.end_profiling()).read_text())
            runs = sorted(e["ts"] + e["dur"] for e in events if e.get("name") == "model_run")
            # a per-row chunk (the shared prefix) runs once per distinct row of each call: two runs a call here
            per_call = max(1, len(runs) // (warm_up + calls))
            warm_up_end = runs[warm_up * per_call - 1]
            for e in events:
                if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] > warm_up_end:
                    times[chunk_id, e["name"].removesuffix("_kernel_time"), e["args"]["op_name"]] += e["dur"] / 1e6
        return times


class OpenVinoProfiler:
    """The runtime's OpenVINO sessions, compiled with ``PERF_COUNT``. A node's counter is the mean over all its
    request's runs (``PerfCount::avg`` in OpenVINO's CPU plugin), so the timed calls' total is the mean after them
    times the runs, less the warm-up's."""

    def __init__(self, bundle: Path, options: SessionOptions) -> None:
        self.bundle, self.options = bundle, options
        self.sessions, self.warm_up = {}, {}

    def open(self, chunk: Chunk) -> Any:
        from pocketsd.runtime.openvino_session import _core

        # PERF_COUNT as a default of the runtime's own Core while the runtime opens this chunk with its own config;
        # off again after, for the process's other sessions
        _core().set_property("CPU", {"PERF_COUNT": True})
        try:
            session = sessions.open_chunk(self.bundle, chunk, self.options)
        finally:
            _core().set_property("CPU", {"PERF_COUNT": False})
        self.sessions[chunk.id] = session.inner if isinstance(session, PerRowSession) else session
        return session

    def _means(self) -> NodeTimes:
        means: NodeTimes = {}
        for chunk_id, session in self.sessions.items():
            for info in session._request.get_profiling_info():  # the runtime keeps its request private
                if info.status == info.Status.EXECUTED:
                    means[chunk_id, info.node_name, info.node_type] = info.real_time.total_seconds()
        return means

    def after_warm_up(self) -> None:
        self.warm_up = self._means()

    def node_times(self, warm_up: int, calls: int) -> NodeTimes:
        return {key: max(0.0, mean * (warm_up + calls) - self.warm_up.get(key, 0.0) * warm_up)
                for key, mean in self._means().items()}


def profile(bundle: Path, component_id: str, engine: str = "onnxruntime", calls: int = 3,
            threads: int = 0) -> dict[str, Any]:
    """Profile ``calls`` calls of a component (after ``WARM_UP`` calls); see the module docstring."""
    component = load_manifest(bundle).component(component_id)
    check_engine(engine, (c.format for c in component.chunks))
    options = SessionOptions(threads=threads, engine=engine, verify_hashes=False)
    inputs = seeded_inputs(component)
    with tempfile.TemporaryDirectory(prefix="op_profile-") as tmp:
        profiler = (OrtProfiler(bundle, options, Path(tmp)) if engine == "onnxruntime"
                    else OpenVinoProfiler(bundle, options))
        runner = ComponentRunner(component, ResidentPolicy(profiler.open))
        for _ in range(WARM_UP):
            runner(**inputs)
        profiler.after_warm_up()
        wall = []
        for _ in range(calls):
            start = time.perf_counter()
            runner(**inputs)
            wall.append(time.perf_counter() - start)
        times = profiler.node_times(WARM_UP, calls)
    return summarize(times, calls, wall, {"bundle": str(bundle), "component": component_id, "engine": engine,
                                          "threads": threads, "calls": calls})


def summarize(times: NodeTimes, calls: int, wall: list[float], head: dict[str, Any]) -> dict[str, Any]:
    by_op: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for (_, _, op), seconds in times.items():
        by_op[op][0] += seconds
        by_op[op][1] += 1
    total = sum(s for s, _ in by_op.values())
    figures = lambda s: {"ms_per_call": round(s / calls * 1000, 3), "share_pct": round(100 * s / (total or 1), 2)}  # noqa: E731
    ops = [{"op": op, **figures(s), "count": n} for op, (s, n) in sorted(by_op.items(), key=lambda kv: -kv[1][0])]
    top = sorted(times.items(), key=lambda kv: -kv[1])[:TOP_NODES]
    nodes = [{"chunk": c, "node": name, "op": op, **figures(s)} for (c, name, op), s in top]
    return {**head, "wall_ms_per_call": round(statistics.mean(wall) * 1000, 3),
            "wall_ms_calls": [round(w * 1000, 3) for w in wall], "ops_ms_per_call": round(total / calls * 1000, 3),
            "by_op": ops, "top_nodes": nodes}


def markdown(result: dict[str, Any]) -> str:
    wall, ops = result["wall_ms_per_call"], result["ops_ms_per_call"]
    lines = [f"{result['component']} on {result['engine']} (threads {result['threads']}), {result['bundle']}: mean "
             f"call {wall:.1f} ms over {result['calls']} calls, operators {ops:.1f} ms ({100 * ops / wall:.0f}%)", "",
             "| op type | ms per call | share | count |", "|---|---:|---:|---:|"]
    lines += [f"| {o['op']} | {o['ms_per_call']:.2f} | {o['share_pct']:.1f}% | {o['count']} |" for o in result["by_op"]]
    lines += ["", f"Slowest {len(result['top_nodes'])} nodes:", "",
              "| chunk | node | op type | ms per call | share |", "|---|---|---|---:|---:|"]
    lines += [f"| {n['chunk']} | `{n['node']}` | {n['op']} | {n['ms_per_call']:.2f} | {n['share_pct']:.1f}% |"
              for n in result["top_nodes"]]
    return "\n".join(lines) + "\n"


def _at_least_one(text: str) -> int:
    if int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text} < 1")
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pocketsd.bench.op_profile", description=__doc__.split("\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--component", default="unet")
    parser.add_argument("--engine", choices=ENGINES, default="onnxruntime")
    parser.add_argument("--calls", type=_at_least_one, default=3)
    parser.add_argument("--threads", type=int, default=0, help="0: all cores, as the runtime's default")
    parser.add_argument("--out", type=Path, default=Path("results/op_profile"))
    args = parser.parse_args(argv)
    result = profile(args.bundle, args.component, args.engine, args.calls, args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    table = markdown(result)
    (args.out / "result.md").write_text(table)
    print(table, end="")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
