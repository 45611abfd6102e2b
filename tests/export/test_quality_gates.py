"""Quality gates of the lossy steps: a default per recipe, overridable per component, failing closed with a table.

The export-level tests make a tiny-model export fail at its gate (a threshold raised above what the recipe reaches,
or a recipe made too aggressive for the threshold asked) and check that it leaves nothing beside what was there.
"""

from __future__ import annotations

import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from pocketsd.errors import ParityError, PresetError
from pocketsd.export.compression.coreml_config import PALETTE_BITS, LayerCompression, MixedBit, parse_compression
from pocketsd.export.compression.quality_gates import (
    DEFAULT_MIN_PSNR_DB,
    GateRow,
    Threshold,
    combined_db,
    coreml_threshold,
    default_min_psnr_db,
    enforce,
)


# ------------------------------------------------------------------------------------------ the table, no torch
def test_every_recipe_a_preset_can_ask_for_has_a_default():
    from pocketsd.export.preset import QUANT_MODES

    for mode in QUANT_MODES:
        assert f"onnx:{mode}" in DEFAULT_MIN_PSNR_DB
    for bits in PALETTE_BITS:
        assert f"coreml:palettize:{bits}" in DEFAULT_MIN_PSNR_DB
    assert "coreml:linear_int8:8" in DEFAULT_MIN_PSNR_DB and "coreml:fp16" in DEFAULT_MIN_PSNR_DB
    palettes = [DEFAULT_MIN_PSNR_DB[f"coreml:palettize:{b}"] for b in sorted(PALETTE_BITS)]
    assert palettes == sorted(palettes), "fewer bits cannot be asked to reach more dB"


def test_threshold_is_the_narrowest_recipe_then_mixed_budget_then_the_preset():
    layers = {"a": LayerCompression("palettize", 6), "b": LayerCompression("palettize", 4),
              "c": LayerCompression("linear_int8")}
    narrowest = coreml_threshold("unet", layers, None, None)
    assert narrowest.recipe == "coreml:palettize:4"
    assert narrowest.min_psnr_db == default_min_psnr_db("coreml:palettize:4")
    assert not narrowest.from_preset and "coreml.compression.unet.min_psnr_db" in narrowest.describe()
    mixed = coreml_threshold("unet", layers, MixedBit((4, 6, 8), 33.0), None)
    assert mixed.min_psnr_db == 33.0 and mixed.from_preset
    assert coreml_threshold("unet", layers, MixedBit((4, 6), 33.0), 41.0).min_psnr_db == 41.0
    assert coreml_threshold("text_encoder", {}, None, None).recipe == "coreml:fp16"


def test_losses_add_as_noise_powers():
    assert combined_db(30.0, 30.0) == round(30 - 10 * math.log10(2), 2) == 26.99
    assert combined_db(60.0, 30.0) == pytest.approx(30.0, abs=0.01)


def test_enforce_names_component_figure_and_threshold_with_every_row_in_the_table():
    need = Threshold(30.0, "coreml:palettize:6", "coreml.compression.unet.min_psnr_db", False)
    rows = [GateRow("text_encoder", "fp16 weights (simulated)", "text_encoder (fp16 vs fp32)", 71.3, 1e-4, need),
            GateRow("unet", "palettize:6 compression (simulated)", "unet (compressed vs fp32)", 21.5, 0.3, need)]
    enforce(rows[:1], "hint")
    with pytest.raises(ParityError) as caught:
        enforce(rows, "hint")
    message = caught.value.message
    assert message.startswith("unet: palettize:6 compression (simulated) gives 21.50 dB against fp32")
    assert "default 30.0 dB for coreml:palettize:6" in message
    assert "text_encoder (fp16 vs fp32)" in caught.value.details and "unet (compressed vs fp32)" in caught.value.details
    nan = GateRow("unet", "x", "unet", float("nan"), float("inf"), need)
    with pytest.raises(ParityError):
        enforce([nan], "hint")


def test_compression_min_psnr_db_parses_and_bad_values_name_the_key():
    cfg = parse_compression({"global": {"mode": "palettize", "nbits": 6}, "min_psnr_db": 35},
                            "test.yaml: coreml.compression.unet", "iOS17")
    assert cfg.min_psnr_db == 35.0
    assert parse_compression({"min_psnr_db": 40}, "t", "iOS17").global_config is None  # fp16 only, own gate
    with pytest.raises(PresetError, match=r"test.yaml: coreml.compression.unet.min_psnr_db is 'high'"):
        parse_compression({"min_psnr_db": "high"}, "test.yaml: coreml.compression.unet", "iOS17")


def test_whole_component_check_compares_with_fp32_where_a_lossy_step_ran():
    """The macOS CoreML check (predictions through the whole chain): with compression, against the uncompressed fp32
    model at the combined threshold; without, against the captured model at the parity threshold."""
    pytest.importorskip("torch")
    from pocketsd.export.backends.base import Fp32Reference
    from pocketsd.export.check_component import whole_reference

    compressed_ref, fp32_ref = (np.zeros(3),), (np.ones(3),)
    plain = SimpleNamespace(id="unet", reference_outputs=compressed_ref, threshold=30.0, fp32=None)
    assert whole_reference(plain) == ("unet (whole)", compressed_ref, 30.0)  # type: ignore[arg-type]
    lossy = SimpleNamespace(id="unet", reference_outputs=compressed_ref, threshold=30.0,
                            fp32=Fp32Reference(fp32_ref, 30.0))
    what, reference, threshold = whole_reference(lossy)  # type: ignore[arg-type]
    assert what == "unet (whole vs fp32)" and reference is fp32_ref and threshold == 26.99


# --------------------------------------------------------------------------------- exports that fail closed
def _fails_closed(model: Path, tmp_path: Path, preset_text: str) -> ParityError:
    from pocketsd.export.exporter import ExportRequest, export_bundle
    from pocketsd.export.preset import load_preset

    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("was here before")
    preset = tmp_path / "preset.yaml"
    preset.write_text(preset_text)
    with pytest.raises(ParityError) as caught:
        export_bundle(ExportRequest(str(model), load_preset(str(preset)), work / "out", progress=False,
                                    warm_cache=False))
    assert [p.name for p in work.iterdir()] == ["keep.txt"]
    return caught.value


COREML_UNET = ("backend: coreml\nprecision: fp16\nunet_batch: 1\ncomponents: [unet]\n"
               "coreml:\n  deployment_target: iOS17\n  compression:\n    unet:\n")


@pytest.mark.export
@pytest.mark.parametrize("compression, needs", [
    ("      global: {mode: palettize, nbits: 6}\n      min_psnr_db: 99\n", "99.0"),  # threshold out of reach
    ("      global: {mode: palettize, nbits: 2}\n      min_psnr_db: 30\n", "30.0"),  # recipe too aggressive
])
def test_iphone_style_compression_below_its_gate_fails_closed(tiny_model_dir: Path, tmp_path: Path,
                                                              compression: str, needs: str):
    pytest.importorskip("coremltools")
    error = _fails_closed(tiny_model_dir, tmp_path, COREML_UNET + compression)
    assert error.message.startswith("unet: palettize:") and "dB against fp32" in error.message
    assert f"coreml.compression.unet.min_psnr_db of {needs} dB" in error.message
    row = error.details.splitlines()[1].split()
    assert row[:3] == ["unet", "(compressed", "vs"] and float(row[4]) < float(needs) == float(row[5])


@pytest.mark.export
def test_fp16_components_are_gated_and_their_figure_is_in_the_manifest(tiny_iphone_bundle: Path):
    from pocketsd.runtime.manifest import load_manifest

    manifest = load_manifest(tiny_iphone_bundle)
    fp16 = manifest.component("text_encoder").extra["fp16"]
    assert fp16["psnr_db"] >= fp16["min_psnr_db"] == DEFAULT_MIN_PSNR_DB["coreml:fp16"]
    compression = manifest.component("unet").extra["compression"]
    assert compression["psnr_db"] >= compression["min_psnr_db"] == DEFAULT_MIN_PSNR_DB["coreml:palettize:6"]


@pytest.mark.export
@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_onnx_weight_quantization_below_its_gate_fails_closed(tiny_model_dir: Path, tmp_path: Path, mode: str):
    pytest.importorskip("torch")
    error = _fails_closed(tiny_model_dir, tmp_path, "backend: onnx\ncomponents: [unet]\n"
                                                    f"quantize:\n  unet: {{weights: {mode}, min_psnr_db: 99}}\n")
    assert error.message.startswith(f"unet: {mode} weight quantization gives")
    assert "the preset's quantize.unet.min_psnr_db of 99.0 dB" in error.message
    assert f"unet ({mode} vs fp32)" in error.details
