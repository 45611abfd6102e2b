"""``pocketsd bench`` on the tiny model: every figure it promises, calls interleaved, skipped and failed contenders
reported while the others finish. No timing thresholds: timings belong in the bench's own output."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from pocketsd.bench import race, side_by_side
from pocketsd.bench.bench_output import markdown, write_results
from pocketsd.bench.contenders import CONTENDERS, by_names, skip_reason
from pocketsd.bench.side_by_side import BenchRequest, run_bench
from pocketsd.bench.worker_client import WorkerError, WorkerProcess
from pocketsd.cli import main as cli_main
from pocketsd.errors import UserError

pytestmark = pytest.mark.export

# A worker that loads, then dies on its second UNet call: a contender that fails mid-run.
DYING_WORKER = """
import os, sys
sys.path.insert(0, {bench!r})
from worker_protocol import serve
calls = []
def call(_request):
    calls.append(1)
    if len(calls) == 2:
        os._exit(3)
    return {{"seconds": 0.01}}
serve({{"info": lambda r: {{"describe": "dies", "versions": {{}}}}, "load": lambda r: {{"seconds": 0.01}},
       "call": call}})
"""


def _request(model: Path, work: Path, names: list[str]) -> BenchRequest:
    return BenchRequest(model=str(model), contenders=tuple(by_names(names)), work=work, resolutions=(128,),
                        calls=3, warmup=1, steps=2, reuse_bundles=True, matmul_size=256, batch_one=False)


def _work_with_bundle(tmp_path: Path, bundle: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(bundle, work / "cpu-128-chunked")  # the cpu preset at 128²: what the bench would export
    return work


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, str]]:
    """Every request the bench sends, in order, as (contender, op)."""
    sent: list[tuple[str, str]] = []
    original = WorkerProcess.request

    def request(self: WorkerProcess, op: str, **fields: object) -> dict:
        sent.append((self.name, op))
        return original(self, op, **fields)

    monkeypatch.setattr(WorkerProcess, "request", request)
    return sent


def test_bench_measures_contenders_interleaved(tiny_model_dir: Path, tiny_bundle: Path, tmp_path: Path,
                                               recorded: list[tuple[str, str]]):
    """One run with every section, batch one included (its own export, pocketsd's chunked contenders only)."""
    work = _work_with_bundle(tmp_path, tiny_bundle)
    ticks: list[str] = []
    request = _request(tiny_model_dir, work, ["pocketsd-onnxruntime", "diffusers-torch"])
    result = run_bench(BenchRequest(**{**request.__dict__, "batch_one": True}), ticks.append)
    rows = {r["contender"]: r for r in result["resolutions"][0]["rows"]}
    ours, torch_row = rows["pocketsd-onnxruntime"], rows["diffusers-torch"]
    for row in (ours, torch_row):
        assert "error" not in row and "skipped" not in row, row
        assert row["unet_call_s"]["min"] <= row["unet_call_s"]["median"] <= row["unet_call_s"]["max"]
        for key in ("cold_load_s", "warm_load_s", "generate_s", "peak_rss_calls_mb", "peak_rss_generate_mb"):
            assert row[key] > 0, key
        assert row["versions"] and row["describe"]
    assert sorted(ours["chunk_s_median"]) == ["unet.00", "unet.01", "unet.02", "unet.03", "unet.04"]
    # pocketsd on onnxruntime also loads once in a fresh process with an empty cache folder, removed after
    assert ours["first_load_no_cache_s"] > 0 and "first_load_no_cache_s" not in torch_row
    assert "pocketsd-onnxruntime load without cache" in ticks and not list(work.glob(".fresh-cache-*"))
    assert ours["unet_chunks"] == 5 and ours["bundle_disk_bytes"] > 0
    # every contender computed the same model: the chunked fp32 bundle matches diffusers' UNet output (export parity
    # of the tiny model is ~1e-6)
    assert ours["vs_reference"]["reference"] == "diffusers-torch" and ours["vs_reference"]["max_abs"] < 1e-4
    assert torch_row["vs_reference"]["psnr_db"] is None  # the reference itself
    assert result["resolutions"][0]["unet_gflop_per_call"] > 0 and len(result["matmul_ceiling"]) == 2
    assert result["machine"]["logical_cores"] >= 1 and "onnxruntime" in result["machine"]["versions"]
    calls = [name for name, op in recorded if op == "call"]
    # pocketsd alone (a warm-up, 3 calls: a group of one runs once), then the peer beside a pace worker of pocketsd:
    # a warm-up each as it starts, then the timed calls alternate A B A B A B (race.py); then the same pair again in
    # fresh workers loaded in the reverse order; then batch one: pocketsd alone again
    ours_alone, pair = ["pocketsd-onnxruntime"] * 4, ["pocketsd-onnxruntime", "diffusers-torch"]
    race_pair = [*pair, *pair[::-1], *pair]  # each first in a round in turn
    reversed_pair = [*pair[::-1], *pair, *pair[::-1]]
    assert calls == (ours_alone + pair + race_pair + pair[::-1] + reversed_pair + ["pocketsd-onnxruntime"] * 4)
    assert len(ours["unet_call_s"]["all"]) == 3 and len(torch_row["unet_call_s"]["all"]) == 6
    pace = torch_row["vs_fastest"]
    assert pace["interleaved"] and len(pace["pocketsd_call_s"]) == 6 and len(pace["by_load_order"]) == 2
    assert len(torch_row["unet_call_s"]["median_by_load_order"]) == 2
    assert ticks and ticks[-1] == "matmul ceiling"

    section = result["batch_one"]
    bundle = section["bundles"]["batch1"]
    assert bundle["export"]["exit_code"] == 0 and bundle["dims"]["unet_batch"] == 1
    assert "unet_batch: 1" in (work / "cpu-batch1.yaml").read_text()
    assert "shared_prefix" not in (work / "cpu-batch1.yaml").read_text()
    (row,) = section["rows"]  # pocketsd's chunked contenders only: the peers are not timed again
    assert "first_load_no_cache_s" not in row
    assert row["contender"] == "pocketsd-onnxruntime" and "error" not in row, row
    assert len(row["unet_call_s"]["all"]) == 3 and row["unet_chunks"] == 4  # no shared prefix at batch 1
    # half the arithmetic of the batch-2 call (the FLOPs counted from each bundle's own graph)
    ratio = section["unet_gflop_per_call"] / result["resolutions"][0]["unet_gflop_per_call"]
    assert 0.49 < ratio < 0.51, ratio
    # the fp32 ceiling measured just before and just after the batch-1 calls (no bf16 contender: no bf16 ceiling)
    assert [c["engine"] for c in section["matmul_ceiling"]["onnxruntime"]] == ["onnxruntime"] * 2
    assert "openvino-bf16" not in section["matmul_ceiling"]

    out = tmp_path / "out"
    write_results(result, out, "pocketsd bench --model tiny")
    assert json.loads((out / "result.json").read_text())["contenders"] == ["pocketsd-onnxruntime", "diffusers-torch"]
    table = (out / "result.md").read_text()
    assert "| pocketsd-onnxruntime | 4 |" in table and "pocketsd-onnxruntime vs diffusers-torch" in table
    assert "faster (interleaved: " in table and "; by load order " in table
    assert "Each group of workers ran twice, loaded in one order and then the reverse" in table
    assert "## 128×128, UNet batch 1" in table
    assert "Large MatMul just before and after these calls: onnxruntime" in table
    (cold,) = [line for line in table.splitlines() if "cold start" in line]
    assert cold.startswith("- pocketsd-onnxruntime: cold start") and ", first load on a machine without its cache " \
        f"{ours['first_load_no_cache_s']:.2f} s" in cold
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*tmp*"))


def test_a_contender_that_dies_mid_run_is_reported_and_the_others_finish(
        tiny_model_dir: Path, tiny_bundle: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    bench_dir = str(Path(side_by_side.__file__).parent)
    real = race.worker_command

    def command(contender, spec_json, optimum):
        if contender.name == "onnxruntime":
            return [sys.executable, "-c", DYING_WORKER.format(bench=bench_dir)]
        return real(contender, spec_json, optimum)

    monkeypatch.setattr(race, "worker_command", command)
    work = _work_with_bundle(tmp_path, tiny_bundle)
    request = _request(tiny_model_dir, work, ["pocketsd-onnxruntime", "onnxruntime", "optimum"])
    result = run_bench(BenchRequest(**{**request.__dict__, "optimum_python": None, "steps": 0}), lambda _: None)
    rows = {r["contender"]: r for r in result["resolutions"][0]["rows"]}
    assert rows["onnxruntime"]["error"].startswith("worker exited (code 3) during call")
    assert "\n" not in rows["onnxruntime"]["error"]
    assert rows["optimum"]["skipped"].startswith("optimum is not installed")
    assert len(rows["pocketsd-onnxruntime"]["unet_call_s"]["all"]) == 3 and "error" not in rows["pocketsd-onnxruntime"]
    assert rows["pocketsd-onnxruntime"]["first_load_no_cache_s"] > 0  # with steps 0 too: it is a load, no generate
    table = markdown(result, "pocketsd bench")
    assert "FAILED: worker exited (code 3) during call" in table and "skipped: optimum is not installed" in table


def test_a_failing_request_is_one_line_and_the_worker_keeps_serving(tmp_path: Path):
    spec = json.dumps({"kind": "onnxruntime", "onnx": str(tmp_path / "missing.onnx"), "threads": 1})
    with WorkerProcess("plain", [sys.executable, "-m", "pocketsd.bench.worker", spec], tmp_path / "w.log") as worker:
        with pytest.raises(WorkerError) as failed:
            worker.request("load")
        assert str(failed.value).startswith("load: ") and "\n" not in str(failed.value)
        assert worker.request("stats")["peak_rss_mb"] > 0


def test_a_fresh_cache_worker_loads_with_a_new_cache_folder_beside_the_bundle_and_removes_it(
        tiny_bundle: Path, tmp_path: Path):
    from pocketsd.runtime.manifest import load_manifest

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, bundle)
    spec = {"kind": "pocketsd", "engine": "onnxruntime", "bundle": str(bundle), "threads": 1, "fresh_cache": True,
            **{k: load_manifest(bundle).dims[k] for k in ("latent_height", "latent_width", "unet_batch",
                                                          "latent_channels", "text_length", "text_hidden")}}
    command = [sys.executable, "-m", "pocketsd.bench.worker", json.dumps(spec)]
    with WorkerProcess("fresh", command, tmp_path / "w.log") as worker:
        assert worker.request("load")["seconds"] > 0
        (folder,) = tmp_path.glob(".fresh-cache-*")
        assert folder.is_dir()
    assert not folder.exists()


def test_a_missing_package_skips_its_contender(monkeypatch: pytest.MonkeyPatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else real(name, *a))
    reasons = {c.name: skip_reason(c, None) for c in CONTENDERS}
    assert reasons["openvino"] == reasons["pocketsd-openvino"] == "openvino is not installed"
    assert reasons["pocketsd-onnxruntime"] is None and "make bench-env-optimum" in reasons["optimum"]


def test_bad_bench_arguments_are_one_line(capsys, tmp_path: Path):
    with pytest.raises(UserError, match="unknown contender 'torch'"):
        by_names(["torch"])
    assert cli_main(["bench", "--model", "tiny", "--contender", "torch", "--work", str(tmp_path)]) == 2
    assert cli_main(["bench", "--model", str(tmp_path), "--work", str(tmp_path)]) == 2
    assert cli_main(["bench", "--model", "tiny", "--optimum-python", str(tmp_path / "nope")]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(errors) == 3 and all(line.startswith("error") or ":" in line for line in errors)


def test_the_optimum_worker_exports_loads_and_runs_the_same_unet(tiny_model_dir: Path, tmp_path: Path):
    """optimum's pipeline on its own export of the same folder, in optimum's own environment."""
    from pocketsd.bench.contenders import optimum_python

    python = optimum_python(None)
    if python is None:
        pytest.skip("optimum's environment is not installed here (make bench-env-optimum creates .venv-optimum)")
    spec = json.dumps({"model": str(tiny_model_dir), "export_dir": str(tmp_path / "optimum"), "height": 128,
                       "width": 128, "threads": 0, "unet_batch": 2})
    command = [str(python), str(Path(side_by_side.__file__).with_name("optimum_worker.py")), spec]
    with WorkerProcess("optimum", command, tmp_path / "optimum.log") as worker:
        with pytest.raises(WorkerError, match="no pipeline loaded"):
            worker.request("call")
        assert worker.request("export")["exported"] is True
        assert worker.request("export")["exported"] is False  # already there: not exported twice
        assert worker.request("load")["seconds"] > 0
        assert worker.request("call", save=str(tmp_path / "out.npy"))["seconds"] > 0
        assert worker.request("generate", steps=2, prompt="a cat", guidance=7.5, seed=0)["seconds"] > 0
    assert np.load(tmp_path / "out.npy").shape == (2, 4, 16, 16)
    assert not (tmp_path / "optimum.partial").exists()
