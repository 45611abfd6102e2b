"""The later-load bench evicts the bundle from the page cache and reports both ways of opening the chunks (no timing
thresholds: timings belong in bench output)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pocketsd.bench.later_load import WAYS, evict, main

pytestmark = pytest.mark.export


def test_later_load_writes_both_ways(tiny_bundle: Path, tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert main([str(tiny_bundle), "--rounds", "2", "--out", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "result.json").read_text())
    assert result["rounds"] == 2 and result["engine"] == "onnxruntime"
    bundle_bytes = sum(p.stat().st_size for p in tiny_bundle.rglob("*") if p.is_file())
    assert result["evicted_bytes"] >= bundle_bytes  # the bundle's files, and the cache's (none for chunks this small)
    for way in WAYS:
        assert len(result[way]["all_s"]) == 2 and 0 < result[way]["min_s"] <= result[way]["median_s"]
    assert "| one at a time |" in (tmp_path / "out" / "result.md").read_text()
    assert "evicted from the page cache" in capsys.readouterr().out


def test_evict_counts_every_file(tmp_path: Path):
    (tmp_path / "a").write_bytes(b"x" * 10)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b").write_bytes(b"y" * 5)
    assert evict(tmp_path) == 15


def test_a_bundle_that_cannot_load_stops_with_its_error(tmp_path: Path):
    with pytest.raises(SystemExit, match="loading .* failed: .*"):
        main([str(tmp_path / "missing"), "--rounds", "1", "--out", str(tmp_path / "out")])
