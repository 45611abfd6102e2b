"""The runtime generates an image with torch, diffusers, transformers, coremltools and PyYAML made unimportable;
``import pocketsd`` stays light and ``from pocketsd import Pipeline`` loads the runtime only then."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r"""
import importlib.abc, sys
# yaml: presets are read at export and by bench only, so pyyaml is not in the base install
BANNED = ("torch", "diffusers", "transformers", "coremltools", "onnx", "onnxscript", "onnx_ir", "yaml")

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BANNED:
            raise ImportError(f"{name} is banned in this test")
        return None

sys.meta_path.insert(0, Block())
from pocketsd.cli import main
code = main(["generate", sys.argv[1], "--prompt", "a cat", "--steps", "3", "--seed", "1", "--out", sys.argv[2],
             "--quiet"])
assert code == 0, code
assert main(["inspect", sys.argv[1]]) == 0
from pocketsd import Pipeline
image = Pipeline.from_bundle(sys.argv[1])("a dog", num_inference_steps=2, seed=0)
assert image.size[0] > 0
loaded = sorted(m for m in sys.modules if m.split(".")[0] in BANNED)
assert not loaded, loaded
print("ok")
"""


@pytest.mark.export  # the bundle is made by the exporter; the generation below runs without torch
def test_generate_with_heavy_modules_unimportable(tiny_bundle: Path, tmp_path: Path):
    out = tmp_path / "cat.png"
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_bundle), str(out)], capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "ok" in result.stdout and out.stat().st_size > 0


def test_runtime_sources_import_nothing_heavy():
    runtime = Path(__file__).resolve().parents[2] / "runtime"
    banned = ("import torch", "from torch", "import diffusers", "from diffusers", "import transformers",
              "from transformers", "from pocketsd.export", "import pocketsd.export", "coremltools.converters",
              "import yaml", "from yaml")
    offenders = [f"{p.name}: {line.strip()}" for p in runtime.rglob("*.py") for line in p.read_text().splitlines()
                 if line.strip().startswith(banned)]
    assert offenders == []


def test_import_pocketsd_is_light_and_pipeline_is_lazy():
    code = (
        "import sys, pocketsd; heavy = {'numpy', 'onnxruntime', 'tokenizers', 'pocketsd.runtime.pipeline'}; "
        "assert not heavy & set(sys.modules), heavy & set(sys.modules); "
        "from pocketsd import Pipeline; from pocketsd.runtime.pipeline import Pipeline as P; assert Pipeline is P; "
        "assert 'Pipeline' in dir(pocketsd) and pocketsd.Pipeline is P; "
        "import pytest; pytest.raises(AttributeError, getattr, pocketsd, 'Nope'); print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
