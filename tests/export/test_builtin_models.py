"""The built-in model names (`--model tiny`, `--model shapes`), resolved to diffusers folders in one place for export
and bench (export/random_model.builtin_model_folder)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pocketsd.export.random_model import BUILTIN_MODELS, builtin_model_folder

pytestmark = pytest.mark.export


def test_tiny_is_written_once_under_the_scratch_folder(tmp_path: Path):
    first = builtin_model_folder("tiny", tmp_path)
    assert first.parent == tmp_path and (first / "model_index.json").is_file()
    stamp = (first / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns
    assert builtin_model_folder("tiny", tmp_path) == first  # reused, not written again
    assert (first / "unet" / "diffusion_pytorch_model.safetensors").stat().st_mtime_ns == stamp


def test_shapes_is_the_shipped_folder(tmp_path: Path):
    from pocketsd.shapes import model_folder

    assert builtin_model_folder("shapes", tmp_path) == model_folder()
    assert not any(tmp_path.iterdir())  # nothing written for a shipped model


def test_every_builtin_name_has_a_source_line_and_others_are_refused(tmp_path: Path):
    assert set(BUILTIN_MODELS) == {"tiny", "shapes"} and all("built-in" in s for s in BUILTIN_MODELS.values())
    with pytest.raises(ValueError, match="not a built-in model"):
        builtin_model_folder("sd15", tmp_path)
