"""The export reads its own bundle back through the runtime before renaming it into place.

Regression: a bool tensor (CLIP's causal mask) crossing a text-encoder cut made `cpu-lowmem` bundles of SD 1.5 that
the runtime refused. Every dtype a cut can carry must be one the manifest reader and the chain accept.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytestmark = pytest.mark.export

from pocketsd.errors import InternalError  # noqa: E402
from pocketsd.export.exporter import ExportRequest, export_bundle  # noqa: E402
from pocketsd.export.preset import preset_from_dict  # noqa: E402
from pocketsd.runtime.manifest import Manifest, load_manifest  # noqa: E402
from pocketsd.runtime.pipeline import Pipeline  # noqa: E402

TEXT_CUT = {"name": "text-cut", "backend": "onnx", "components": ["text_encoder", "unet", "vae_decoder"],
            "split": {"text_encoder": {"at_modules": ["encoder.layers.1"]}}}
# The refusal needs only the cut text encoder (its second chunk's input is what breaks): a third of the export.
TEXT_ENCODER_CUT = {**TEXT_CUT, "components": ["text_encoder"]}


def test_a_bool_mask_crossing_a_text_encoder_cut_reads_back_and_generates(tiny_model_dir: Path, tmp_path: Path):
    out = export_bundle(ExportRequest(str(tiny_model_dir), preset_from_dict(TEXT_CUT, "test"), tmp_path / "b",
                                      progress=False, warm_cache=False))
    chunks = load_manifest(out).component("text_encoder").chunks
    crossing = {t.dtype for t in chunks[1].inputs}
    assert "bool" in crossing, "the cut after encoder.layers.0 should carry the causal mask"
    image = Pipeline.from_bundle(out)("a red circle", num_inference_steps=2, seed=0, output_type="np")
    assert image.shape == (128, 128, 3) and np.isfinite(image).all()


def test_a_bundle_the_runtime_refuses_is_never_renamed_into_place(tiny_model_dir: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch):
    real_to_dict = Manifest.to_dict

    def corrupt(self: Manifest) -> dict:
        body = real_to_dict(self)
        body["components"]["text_encoder"]["chunks"][1]["inputs"][0]["source"] = "text_encoder.09:nowhere"
        return body

    monkeypatch.setattr(Manifest, "to_dict", corrupt)
    out = tmp_path / "refused"
    with pytest.raises(InternalError, match="runtime refuses the bundle"):
        export_bundle(ExportRequest(str(tiny_model_dir), preset_from_dict(TEXT_ENCODER_CUT, "test"), out,
                                    progress=False, warm_cache=False))
    assert not out.exists() and list(tmp_path.iterdir()) == []
