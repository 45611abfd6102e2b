"""Shared fixtures. Expensive artifacts (the tiny model, its bundle) are built once per test session."""

from __future__ import annotations

from pathlib import Path

import pytest

# Tolerances in one table (see README "Tests"). Never widened by a default.
TOL = {
    "chunked_vs_unchunked_max_abs": 1e-5,
    "export_min_psnr_db": 60.0,
    "scheduler_max_abs": 1e-5,
    "pipeline_min_psnr_db": 40.0,
}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    from pocketsd.export.random_model import builtin_configs, write_random_model

    return write_random_model(tmp_path_factory.mktemp("models") / "tiny", builtin_configs("tiny"))


@pytest.fixture(scope="session")
def tiny_bundle(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model exported with the cpu preset (UNet in 4 chunks), as `make demo` does."""
    from pocketsd.export.exporter import ExportRequest, export_bundle
    from pocketsd.export.preset import load_preset

    out = tmp_path_factory.mktemp("bundles") / "tiny-cpu"
    return export_bundle(ExportRequest(str(tiny_model_dir), load_preset("cpu"), out, progress=False))


@pytest.fixture(scope="session")
def tiny_iphone_bundle(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with the iphone preset (6-bit palettized UNet in Apple's two-chunk form, CoreML)."""
    pytest.importorskip("coremltools")
    from pocketsd.export.exporter import ExportRequest, export_bundle
    from pocketsd.export.preset import load_preset

    out = tmp_path_factory.mktemp("bundles") / "tiny-iphone"
    return export_bundle(ExportRequest(str(tiny_model_dir), load_preset("iphone"), out, progress=False))
