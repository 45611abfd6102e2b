"""The open-cost bench reports both ways for every chunk, and refuses bundles it cannot compare."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from pocketsd.bench.open_cost import main
from pocketsd.runtime.manifest import MANIFEST_NAME

pytestmark = pytest.mark.export


def test_open_cost_writes_both_ways(tiny_bundle: Path, tmp_path: Path, capsys):
    assert main([str(tiny_bundle), "--repeats", "2", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["chunks"] == 5 and result["repeats"] == 2
    for way in ("optimized", "original"):
        assert 0 < result[way]["slowest_chunk_s"] <= result[way]["all_chunks_s"]
    assert "| optimized |" in (tmp_path / "result.md").read_text() and "unet chunks" in capsys.readouterr().out


def test_a_bundle_from_another_onnxruntime_is_refused(tiny_bundle: Path, tmp_path: Path):
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    for chunk in manifest["components"]["unet"]["chunks"]:
        chunk["optimized"]["version"] = "0.0.1"
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(SystemExit, match="not this one"):
        main([str(copy), "--repeats", "1", "--out", str(tmp_path / "out")])
