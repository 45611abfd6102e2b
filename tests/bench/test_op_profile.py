"""The per-operator profile accounts for the measured call time, on both engines, and names the UNet's operators."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pocketsd.bench.op_profile import TOP_NODES, main, profile

pytestmark = pytest.mark.export


def _check_accounting(result: dict[str, Any]) -> None:
    """Operators run one after another inside the call: their sum is at most the call's wall time, and a good part
    of it. Loose: a tiny UNet call takes a few ms, of which Python's chaining of four chunks is a visible share, and
    on a shared 2-core box under load (3) the operators were measured at 49-88% of the call (onnxruntime 59-88%)."""
    assert result["wall_ms_per_call"] / 3 <= result["ops_ms_per_call"] <= result["wall_ms_per_call"]
    assert sum(o["ms_per_call"] for o in result["by_op"]) == pytest.approx(result["ops_ms_per_call"], abs=0.01)
    assert sum(o["share_pct"] for o in result["by_op"]) == pytest.approx(100, abs=0.1)
    assert all(o["count"] > 0 for o in result["by_op"])
    times = [n["ms_per_call"] for n in result["top_nodes"]]
    assert 0 < len(times) <= TOP_NODES and times == sorted(times, reverse=True)


def test_onnxruntime_profile_of_the_unet(tiny_bundle: Path, tmp_path: Path, capsys):
    assert main([str(tiny_bundle), "--calls", "2", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert (result["engine"], result["component"], result["calls"], len(result["wall_ms_calls"])) == \
        ("onnxruntime", "unet", 2, 2)
    _check_accounting(result)
    ops = {o["op"] for o in result["by_op"]}
    assert "Conv" in ops and ops & {"MatMul", "FusedMatMul", "Gemm"} and "Softmax" in ops
    assert {n["chunk"] for n in result["top_nodes"]} <= {f"unet.0{i}" for i in range(5)}
    table = (tmp_path / "result.md").read_text()
    assert "| op type | ms per call | share | count |" in table and "| Conv |" in table
    assert table == capsys.readouterr().out


def test_openvino_profile_of_the_unet(tiny_bundle: Path):
    pytest.importorskip("openvino", reason="the openvino engine is an optional extra (pocketsd[openvino])")
    from pocketsd.runtime.openvino_session import _core

    result = profile(tiny_bundle, "unet", engine="openvino", calls=2)
    _check_accounting(result)
    ops = {o["op"] for o in result["by_op"]}  # OpenVINO's own node types, after its fusions
    assert "Convolution" in ops and ops & {"MatMul", "FullyConnected"}
    assert _core().get_property("CPU", "PERF_COUNT") is False  # the other sessions of the process stay unprofiled


def test_calls_must_be_positive(tiny_bundle: Path):
    with pytest.raises(SystemExit):
        main([str(tiny_bundle), "--calls", "0"])


def test_only_the_timed_calls_are_counted_for_a_chunk_run_once_per_row(tmp_path: Path):
    """A per-row chunk (the shared prefix) runs twice per call where the rows differ: the warm-up ends after its
    2 × WARM_UP-th run, not its WARM_UP-th. A trace of 2 warm-up and 2 timed calls, one node of 1 ms per run."""
    from pocketsd.bench.op_profile import WARM_UP, OrtProfiler

    events = []
    for run in range(2 * (WARM_UP + 2)):
        start = run * 100
        events.append({"name": "model_run", "ts": start, "dur": 10})
        events.append({"cat": "Node", "name": "conv_kernel_time", "ts": start + 1, "dur": 1000,
                       "args": {"op_name": "Conv"}})
    trace = tmp_path / "trace.json"
    trace.write_text(json.dumps(events))

    class Traced:
        def end_profiling(self) -> str:
            return str(trace)

    profiler = OrtProfiler(tmp_path, None, tmp_path)  # type: ignore[arg-type]
    profiler.sessions["unet.00"] = type("Wrapped", (), {"session": Traced()})()  # type: ignore[assignment]
    assert profiler.node_times(WARM_UP, 2) == {("unet.00", "conv", "Conv"): pytest.approx(4e-3)}  # 2 calls × 2 rows
