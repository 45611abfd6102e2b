"""Round trip at export: one denoising step through the runtime from the staging folder, before the rename; and a
scheduler config the samplers cannot honour refused before any weight is loaded."""

from __future__ import annotations

import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytestmark = pytest.mark.export

from pocketsd.cli import main  # noqa: E402
from pocketsd.errors import InternalError, ModelError, ParityError  # noqa: E402
from pocketsd.export import round_trip as rt  # noqa: E402
from pocketsd.export.exporter import ExportRequest, export_bundle  # noqa: E402
from pocketsd.export.preset import preset_from_dict  # noqa: E402
from pocketsd.runtime.manifest import load_manifest  # noqa: E402
from pocketsd.runtime.pipeline import Pipeline  # noqa: E402

TXT2IMG = {"name": "txt2img", "backend": "onnx", "components": ["text_encoder", "unet", "vae_decoder"]}


def test_one_step_runs_every_component_of_the_bundle(tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch):
    calls: list[str] = []
    real_runner = Pipeline.runner

    def spy(self: Pipeline, component_id: str):
        calls.append(component_id)
        return real_runner(self, component_id)

    monkeypatch.setattr(Pipeline, "runner", spy)
    seconds = rt.round_trip(tiny_bundle, load_manifest(tiny_bundle))
    assert seconds is not None and seconds < 10
    assert set(calls) == set(load_manifest(tiny_bundle).components)
    assert calls.count("unet") == 1


def test_a_failing_chunk_is_named_and_the_bundle_never_renamed(tiny_model_dir: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch):
    def broken(self: Pipeline, *args, **kwargs):
        raise RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code (simulated)")

    monkeypatch.setattr(Pipeline, "unet", broken)
    out = tmp_path / "b"
    with pytest.raises(InternalError, match=r"cannot generate: one step \(text encoder → UNet .*RUNTIME_EXCEPTION"):
        export_bundle(ExportRequest(str(tiny_model_dir), preset_from_dict(TXT2IMG, "test"), out, progress=False,
                                    warm_cache=False))
    assert list(tmp_path.iterdir()) == []


def test_non_finite_values_fail_the_round_trip(tiny_bundle: Path, monkeypatch: pytest.MonkeyPatch):
    real_decode = Pipeline.decode
    monkeypatch.setattr(Pipeline, "decode", lambda self, x: real_decode(self, x) * np.float32("nan"))
    with pytest.raises(ParityError, match="non-finite values in image"):
        rt.round_trip(tiny_bundle, load_manifest(tiny_bundle))


@pytest.mark.skipif(sys.platform == "darwin", reason="on macOS CoreML bundles do run")
def test_coreml_round_trip_is_skipped_off_macos_with_the_reason(tiny_iphone_bundle: Path,
                                                                caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.INFO, logger="pocketsd.export.round_trip"):
        assert rt.round_trip(tiny_iphone_bundle, load_manifest(tiny_iphone_bundle)) is None
    assert "round trip skipped: CoreML chunks run only on macOS" in caplog.text


@pytest.mark.parametrize("key, value, named", [
    ("beta_schedule", "unknown", "'beta_schedule' = 'unknown'"),
    ("prediction_type", "sample", "'pndm' does not support prediction_type 'sample'"),  # tiny: PNDMScheduler
    ("beta_end", 1.5, "'beta_end' = 1.5"),
])
def test_a_scheduler_config_the_samplers_cannot_run_is_refused_at_export(tiny_model_dir: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str],
                                                                          key: str, value: object, named: str):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    config_path = model / "scheduler" / "scheduler_config.json"
    config = json.loads(config_path.read_text())
    config[key] = value
    config_path.write_text(json.dumps(config))
    with pytest.raises(ModelError, match=f"scheduler_config.json: .*{named}"):
        export_bundle(ExportRequest(str(model), preset_from_dict(TXT2IMG, "test"), tmp_path / "a", progress=False,
                                    warm_cache=False))
    assert main(["export", "--model", str(model), "--preset", "cpu", "--out", str(tmp_path / "b"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error[model]:") and named in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
