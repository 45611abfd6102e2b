"""The shared-prefix bench times both ways on one pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pocketsd.bench.shared_prefix import main

pytestmark = pytest.mark.export


def test_both_ways_are_timed_on_the_tiny_bundle(tiny_bundle: Path, tmp_path: Path, capsys):
    assert main([str(tiny_bundle), "--calls", "3", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "result.json").read_text())
    assert len(result["times_s"]["once"]) == len(result["times_s"]["twice"]) == 3
    assert result["once_median_s"] > 0 and result["twice_over_once"] > 0
    assert "| twice (rows differ) |" in capsys.readouterr().out
