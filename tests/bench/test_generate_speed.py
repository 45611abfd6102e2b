"""The bench script reports every figure it promises (no timing thresholds: timings belong in bench output)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from pocketsd.bench.generate_speed import main

pytestmark = pytest.mark.export


@pytest.mark.parametrize("memory", [None, "stream"])
def test_generate_speed_writes_its_figures(tiny_bundle: Path, tmp_path: Path, capsys, memory: str | None):
    out = tmp_path / "speed.json"
    assert main([str(tiny_bundle), "--steps", "3", "--json", str(out), *(["--memory", memory] if memory else [])]) == 0
    result = json.loads(out.read_text())
    assert result["unet_chunks"] == 5 and result["resolution"] == "128x128"
    assert result["memory"] == (memory or "resident") and result["load_s_covers"] and result["engine"] == "onnxruntime"
    for key in ("load_s", "text_encode_s", "step_s_median", "vae_decode_s", "peak_rss_mb"):
        assert result[key] > 0, key


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino is not installed")
def test_generate_speed_runs_the_openvino_engine(tiny_bundle: Path, tmp_path: Path):
    out = tmp_path / "speed.json"
    assert main([str(tiny_bundle), "--steps", "2", "--engine", "openvino", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["engine"] == "openvino" and result["step_s_median"] > 0
