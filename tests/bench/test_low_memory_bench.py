"""The full-size bench scripts run end to end on the tiny model and report every figure they promise."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pocketsd.bench import all_presets, low_memory

pytestmark = pytest.mark.export


def test_low_memory_bench_measures_each_run_in_its_own_process(tiny_bundle: Path, tmp_path: Path):
    out = tmp_path / "lm"
    assert low_memory.main(["--run", f"res={tiny_bundle}:resident", "--run", f"stream={tiny_bundle}:stream",
                            "--compare", "res,stream", "--steps", "2", "--out", str(out)]) == 0
    result = json.loads((out / "result.json").read_text())
    runs = {r["label"]: r for r in result["runs"]}
    assert runs["res"]["memory"] == "resident" and runs["stream"]["memory"] == "stream"
    for run in runs.values():
        assert run["peak_rss_mb"] > 30 and run["wall_s"] > 0 and run["disk_bytes"]["unet"] > 0
    (comparison,) = result["comparisons"]
    assert comparison["identical_pixels"] is True and comparison["psnr_db"] is None  # the tiny model: same bytes
    assert "| res | cpu | resident |" in (out / "result.md").read_text()


def test_low_memory_bench_refuses_a_comparison_of_unknown_runs(tiny_bundle: Path, tmp_path: Path):
    with pytest.raises(SystemExit):
        low_memory.main(["--run", f"a={tiny_bundle}", "--compare", "a,b", "--out", str(tmp_path)])


def test_all_presets_bench_exports_then_generates(tiny_model_dir: Path, tmp_path: Path):
    out = tmp_path / "results"
    # one preset keeps `make test` short; the bench runs every preset the same way (bench/all_presets.py)
    assert all_presets.main(["--model", str(tiny_model_dir), "--work", str(tmp_path / "b"), "--preset", "cpu-int8",
                             "--steps", "1", "--out", str(out)]) == 0
    rows = json.loads((out / "result.json").read_text())["rows"]
    assert [r["preset"] for r in rows] == ["cpu-int8"] and all(r["ok"] for r in rows)
    for row in rows:
        assert row["export"]["exit_code"] == 0 and row["generate"]["exit_code"] == 0
        assert row["generate"]["peak_rss_mb"] > 30 and (tmp_path / "b" / f"{row['preset']}.png").is_file()
