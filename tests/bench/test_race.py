"""The bench's race (bench/race.py) with stand-in workers: pocketsd's contenders first, then every peer beside a pace
worker of the fastest pocketsd contender, so that each peer's ratio comes from calls interleaved with its own; each
pair in both load orders, so that a worker loaded first being slower does not bias the ratio."""

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
PENALTY = 1.2  # the first-loaded worker's calls take this many times as long (race.py: 1.08-1.2 on the box)


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


@pytest.fixture
def first_loaded_slower(monkeypatch: pytest.MonkeyPatch, calls: list[str]) -> None:
    """The stand-in worker loaded first in its group reports PENALTY × its seconds per call."""
    first: set[int] = set()
    admit, request = race_module._Group.admit, WorkerProcess.request

    def tracking(group, row, largest, log=""):
        out = admit(group, row, largest, log)
        if len(group.live) == 1:
            first.add(id(group.live[0][1]))
        return out

    def slower(self: WorkerProcess, op: str, **fields: object) -> dict:
        answer = request(self, op, **fields)
        return {**answer, "seconds": answer["seconds"] * PENALTY} if op == "call" and id(self) in first else answer

    monkeypatch.setattr(race_module._Group, "admit", tracking)
    monkeypatch.setattr(WorkerProcess, "request", slower)


def _race(tmp_path: Path, load_orders: int = 2) -> dict[str, Row]:
    request = BenchRequest(model="tiny", contenders=tuple(by_names(NAMES)), work=tmp_path, calls=3, warmup=1,
                           load_orders=load_orders)
    rows = [Row(c, figures={"unet_chunks": 1 if c.name.endswith("1chunk") else 4}) for c in request.contenders]
    race_module.race(request, rows, {name: {} for name in NAMES}, 128, lambda _: None, keep_outputs=False)
    return {r.contender.name: r for r in rows}


def _table(rows: dict[str, Row], load_orders: int = 2) -> str:
    result = {"machine": machine_info(),
              "model": "tiny", "preset": "cpu", "threads": 0, "calls": 3, "warmup": 1, "steps": 0,
              "load_orders": load_orders,
              "contenders": NAMES, "matmul_ceiling": [{"gflops": 1.0, "size": 256}],
              "resolutions": [{"size": 128, "bundles": {}, "unet_gflop_per_call": None,
                               "rows": [r.to_dict() for r in rows.values()]}]}
    return markdown(result, "pocketsd bench")


def test_every_peer_is_timed_beside_a_pace_worker_in_both_load_orders(tmp_path: Path, calls: list[str],
                                                                     first_loaded_slower: None):
    rows = _race(tmp_path)
    twins, pace = "pocketsd-onnxruntime", "pocketsd-onnxruntime-1chunk"
    # pass 1: pocketsd and its unchunked twin interleaved; pass 2: the fastest of them (the unchunked one) as pace,
    # beside one peer at a time. After the warm-up calls, every round in the order opposite to the round before; each
    # pair then again in fresh workers loaded in the reverse order
    def both_orders(pair: list[str]) -> list[str]:
        back = pair[::-1]
        return [*pair, *pair, *back, *pair, *back, *back, *pair, *back]

    assert calls == [*both_orders([twins, pace]), *both_orders([pace, "onnxruntime"]),
                     *both_orders([pace, "openvino"])]
    assert rows[twins].group == rows[pace].group == 1
    assert (rows["onnxruntime"].group, rows["openvino"].group) == (2, 3)
    # the pace worker's calls are not the contender's figures; loaded first in the first run, second in the other
    assert rows[pace].runs == [[1.0] * 3, [PENALTY] * 3]
    for name, seconds in (("onnxruntime", 3.0), ("openvino", 1.5)):
        figures = rows[name].figures["vs_fastest"]
        assert figures["contender"] == pace and figures["interleaved"]
        assert figures["pocketsd_call_s"] == [PENALTY] * 3 + [1.0] * 3
        # the penalty cancels out of the ratio: it is the stand-ins' true ratio, though neither order reads it
        assert figures["ratio"] == pytest.approx(seconds)
        assert figures["by_load_order"] == pytest.approx([seconds / PENALTY, seconds * PENALTY])
    table = _table(rows)
    assert (f"- {pace} vs onnxruntime: **3.00×** faster (interleaved: 1.095 s beside its 3.286 s; by load order "
            "2.50× / 3.60×)") in table
    assert "chunked (4 UNet chunks) vs unchunked, onnxruntime: **2.000×** the unchunked time\n" in table
    assert rows["onnxruntime"].to_dict()["unet_call_s"]["median_by_load_order"] == pytest.approx([3.0, 3.6])


def test_with_one_load_order_the_worker_loaded_first_biases_the_ratio(tmp_path: Path, calls: list[str],
                                                                    first_loaded_slower: None):
    """What the second order is for: in one, the pace worker (loaded first) reads PENALTY slower."""
    rows = _race(tmp_path, load_orders=1)
    assert len(calls) == 3 * (2 + 2 * 3)  # three pairs, each once: two warm-ups and three rounds
    assert rows["onnxruntime"].figures["vs_fastest"]["ratio"] == pytest.approx(3.0 / PENALTY)
    assert "by_load_order" not in rows["onnxruntime"].figures["vs_fastest"] or \
        len(rows["onnxruntime"].figures["vs_fastest"]["by_load_order"]) == 1
    assert "Each group of workers ran once (`--load-orders 1`)" in _table(rows, load_orders=1)


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
