"""The bench's race (bench/race.py) with stand-in workers: pocketsd's contenders first, then every peer beside a pace
worker of the fastest pocketsd contender, so that each peer's ratio comes from calls interleaved with its own."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pocketsd.bench import race as race_module
from pocketsd.bench.bench_output import markdown
from pocketsd.bench.contenders import by_names
from pocketsd.bench.machine import machine_info
from pocketsd.bench.side_by_side import BenchRequest, Row
from pocketsd.bench.worker_client import WorkerProcess

# A worker that takes SECONDS per UNet call (it only says so: nothing runs) and reports a peak RSS of 100 MB.
FAKE_WORKER = """
import sys
sys.path.insert(0, {bench!r})
from worker_protocol import serve
serve({{"info": lambda r: {{"describe": "stand-in", "versions": {{}}}}, "load": lambda r: {{"seconds": 0.01}},
       "call": lambda r: {{"seconds": {seconds}}}, "stats": lambda r: {{"peak_rss_mb": 100.0}}}})
"""
SECONDS = {"pocketsd-onnxruntime": 2.0, "pocketsd-onnxruntime-1chunk": 1.0, "onnxruntime": 3.0, "openvino": 1.5}
NAMES = list(SECONDS)


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Stand-in workers for every contender; the names of the workers called, in order."""
    bench_dir = str(Path(race_module.__file__).parent)

    def command(contender, _spec_json, _optimum):
        return [sys.executable, "-c", FAKE_WORKER.format(bench=bench_dir, seconds=SECONDS[contender.name])]

    sent: list[str] = []
    original = WorkerProcess.request

    def request(self: WorkerProcess, op: str, **fields: object) -> dict:
        if op == "call":
            sent.append(self.name)
        return original(self, op, **fields)

    monkeypatch.setattr(race_module, "worker_command", command)
    monkeypatch.setattr(WorkerProcess, "request", request)
    return sent


def _race(tmp_path: Path) -> dict[str, Row]:
    request = BenchRequest(model="tiny", contenders=tuple(by_names(NAMES)), work=tmp_path, calls=3, warmup=1)
    rows = [Row(c, figures={"unet_chunks": 1 if c.name.endswith("1chunk") else 4}) for c in request.contenders]
    race_module.race(request, rows, {name: {} for name in NAMES}, 128, lambda _: None, keep_outputs=False)
    return {r.contender.name: r for r in rows}


def _table(rows: dict[str, Row]) -> str:
    result = {"machine": machine_info(),
              "model": "tiny", "preset": "cpu", "threads": 0, "calls": 3, "warmup": 1, "steps": 0,
              "contenders": NAMES, "matmul_ceiling": [{"gflops": 1.0, "size": 256}],
              "resolutions": [{"size": 128, "bundles": {}, "unet_gflop_per_call": None,
                               "rows": [r.to_dict() for r in rows.values()]}]}
    return markdown(result, "pocketsd bench")


def test_every_peer_is_timed_beside_a_pace_worker_of_the_fastest_pocketsd_contender(tmp_path: Path,
                                                                                    calls: list[str]):
    rows = _race(tmp_path)
    twins, peers = "pocketsd-onnxruntime", ["pocketsd-onnxruntime-1chunk", "onnxruntime", "openvino"]
    # pass 1: pocketsd and its unchunked twin interleaved; pass 2: the fastest of them (the unchunked one) as pace;
    # after the warm-up calls, every round in the order opposite to the round before
    pair = [twins, f"{twins}-1chunk"]
    assert calls == [*pair, *pair, *pair[::-1], *pair, *peers, *peers, *peers[::-1], *peers]
    assert rows[twins].group == rows[f"{twins}-1chunk"].group == 1
    assert rows["onnxruntime"].group == rows["openvino"].group == 2
    assert rows[f"{twins}-1chunk"].call_s == [1.0] * 3  # the pace worker's calls are not the contender's figures
    for name, seconds in (("onnxruntime", 3.0), ("openvino", 1.5)):
        pace = rows[name].figures["vs_fastest"]
        assert pace["contender"] == f"{twins}-1chunk" and pace["interleaved"]
        assert pace["pocketsd_call_s"] == [1.0] * 3 and pace["ratio"] == pytest.approx(seconds)
    table = _table(rows)
    assert f"- {twins}-1chunk vs onnxruntime: **3.00×** faster (interleaved: 1.000 s beside its 3.000 s)" in table
    assert "chunked (4 UNet chunks) vs unchunked, onnxruntime: **2.000×** the unchunked time\n" in table


def test_a_peer_that_does_not_fit_beside_the_pace_worker_runs_alone_and_says_so(
        tmp_path: Path, calls: list[str], monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(race_module, "fits_unit_now", lambda peaks, *_: not peaks)  # only the first of a group
    rows = _race(tmp_path)
    # nothing fits beside anything: each worker alone, the pace worker started and closed unused for each peer
    assert [rows[n].group for n in NAMES] == [1, 2, 3, 4]
    assert calls == [n for n in NAMES for _ in range(4)]
    for name in ("onnxruntime", "openvino"):
        pace = rows[name].figures["vs_fastest"]
        assert not pace["interleaved"] and "pocketsd_call_s" not in pace
        assert pace["ratio"] == pytest.approx(SECONDS[name] / 1.0)
    table = _table(rows)
    assert "vs openvino: **1.50×** faster (not interleaved: it ran in another group)" in table
    assert "**2.000×** the unchunked time (not interleaved: they ran in different groups)" in table
