"""The runtime generates an image with torch, diffusers, transformers and coremltools made unimportable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.export  # the bundle is made by the exporter; the generation below runs without torch

SCRIPT = r"""
import importlib.abc, sys
BANNED = ("torch", "diffusers", "transformers", "coremltools", "onnx", "onnxscript", "onnx_ir")

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BANNED:
            raise ImportError(f"{name} is banned in this test")
        return None

sys.meta_path.insert(0, Block())
from pocketsd.cli import main
code = main(["generate", sys.argv[1], "--prompt", "a cat", "--steps", "3", "--seed", "1", "--out", sys.argv[2],
             "--quiet"])
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BANNED)
assert code == 0 and not loaded, (code, loaded)
print("ok")
"""


def test_generate_with_heavy_modules_unimportable(tiny_bundle: Path, tmp_path: Path):
    out = tmp_path / "cat.png"
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_bundle), str(out)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout and out.stat().st_size > 0


def test_runtime_sources_import_nothing_heavy():
    runtime = Path(__file__).resolve().parents[2] / "runtime"
    banned = ("import torch", "from torch", "import diffusers", "from diffusers", "import transformers",
              "from transformers", "from pocketsd.export", "import pocketsd.export", "coremltools.converters")
    offenders = [f"{p.name}: {line.strip()}" for p in runtime.rglob("*.py") for line in p.read_text().splitlines()
                 if line.strip().startswith(banned)]
    assert offenders == []
