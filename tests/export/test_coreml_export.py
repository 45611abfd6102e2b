"""CoreML export: the same plan as ONNX, checked structurally here, compressed in PyTorch before it is cut."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

coremltools = pytest.importorskip("coremltools")
pytestmark = pytest.mark.export

from pocketsd.cli import main  # noqa: E402
from pocketsd.export.backends.coreml.check import read_spec  # noqa: E402
from pocketsd.export.backends.coreml.convert import SPEC_VERSION, coreml_name  # noqa: E402
from pocketsd.export.exporter import ExportRequest, export_bundle  # noqa: E402
from pocketsd.export.preset import load_preset  # noqa: E402
from pocketsd.runtime.manifest import load_manifest  # noqa: E402

ON_MAC = sys.platform == "darwin"
NEEDS_MAC = "CoreML predictions need macOS: coremltools cannot run models on Linux"


def preset_file(tmp_path: Path, text: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "preset.yaml"
    path.write_text(text)
    return path


def test_coreml_chunks_have_the_onnx_boundaries_and_names(tiny_model_dir: Path, tmp_path: Path):
    """Same split request and fp32 weights in both backends → the same plan, chunk for chunk, name for name (the
    cpu preset's request, less its shared prefix, which CoreML presets cannot ask for)."""
    body = "precision: fp32\nunet_batch: 2\ncomponents: [text_encoder, unet]\nsplit:\n  unet: {n_chunks: 4}\n"
    bundles = {}
    for backend, extra in (("coreml", "coreml: {deployment_target: iOS17}\n"), ("onnx", "")):
        preset = preset_file(tmp_path / backend, f"backend: {backend}\n{body}{extra}")
        bundles[backend] = load_manifest(export_bundle(ExportRequest(
            str(tiny_model_dir), load_preset(str(preset)), tmp_path / backend / "bundle", progress=False,
            warm_cache=False)))
    coreml, onnx = bundles["coreml"], bundles["onnx"]
    for cid in ("text_encoder", "unet"):
        component = onnx.component(cid)
        other = coreml.component(cid)
        assert [c.id for c in other.chunks] == [c.id for c in component.chunks]
        for a, b in zip(component.chunks, other.chunks):
            assert (a.inputs, a.outputs, a.modules) == (b.inputs, b.outputs, b.modules), a.id
            assert b.format == "mlpackage" and b.parity is None if not ON_MAC else True
        assert component.outputs == other.outputs and component.inputs == other.inputs
    chunk = coreml.component("unet").chunks[1]
    report = read_spec(tmp_path / "coreml" / "bundle" / chunk.file.path)
    assert [f.name for f in report.inputs] == [coreml_name(t.name) for t in chunk.inputs]
    assert [f.name for f in report.outputs] == [coreml_name(t.name) for t in chunk.outputs]
    assert chunk.extra["coreml"]["feature_names"] == {t.name: coreml_name(t.name) for t in chunk.inputs + chunk.outputs}
    assert report.spec_version == SPEC_VERSION["iOS17"] and all(f.dtype == "float32" for f in report.outputs)


def test_iphone_bundle_is_palettized_and_checked(tiny_iphone_bundle: Path, capsys):
    manifest = load_manifest(tiny_iphone_bundle)
    unet = manifest.component("unet")
    compression = unet.extra["compression"]
    assert compression["modes"] == {"palettize:6": compression["layers"]} and compression["layers"] > 0
    assert 0 < compression["psnr_db"] < 200
    assert compression["stored_weight_bytes"] < compression["fp32_weight_bytes"] / 4  # 6 of 32 bits + tables
    for chunk in unet.chunks:
        meta = chunk.extra["coreml"]
        assert meta["compressed_ops"].get("constexpr_lut_to_dense", 0) == meta["compressed_layers"] > 0
        assert abs(meta["weight_file_bytes"] - chunk.weight_bytes) <= 0.1 * chunk.weight_bytes + 65536
        assert meta["attention"] == "split_einsum" and meta["compute_precision"] == "fp16"
    assert "compression" not in manifest.component("text_encoder").extra
    if not ON_MAC:
        assert "macOS" in unet.extra["parity_not_run"]
    assert main(["inspect", str(tiny_iphone_bundle)]) == 0
    table = capsys.readouterr().out
    assert "palettize:6" in table and "simulated" in table


def test_compression_happens_before_the_cut(tiny_model_dir: Path, tmp_path: Path, capsys):
    """Only Linear layers are palettized (2-bit), convolutions stay fp16: balanced by stored size, the cut lands
    elsewhere than an fp32-balanced cut would, and the written packages come out balanced."""
    preset = preset_file(tmp_path, (
        "backend: coreml\nprecision: fp16\nunet_batch: 1\ncomponents: [unet]\nsplit:\n  unet: {n_chunks: 2}\n"
        "coreml:\n  deployment_target: iOS17\n  compression:\n    unet:\n"
        "      global: {mode: palettize, nbits: 2}\n      op_type: {Conv2d: null}\n"))
    bundle = export_bundle(ExportRequest(str(tiny_model_dir), load_preset(str(preset)), tmp_path / "b",
                                         progress=False, warm_cache=False))
    manifest = load_manifest(bundle)
    unet = manifest.component("unet")
    stored = [c.weight_bytes for c in unet.chunks]
    files = [c.extra["coreml"]["weight_file_bytes"] for c in unet.chunks]
    assert sum(stored) == unet.extra["compression"]["stored_weight_bytes"]
    assert max(stored) <= 1.25 * sum(stored) / 2
    assert max(files) <= 1.3 * sum(files) / 2
    plan = json.loads((bundle / manifest.plan.path).read_text())["components"]["unet"]
    assert plan["total_weight_bytes"] == sum(stored) < unet.extra["compression"]["fp32_weight_bytes"] / 2
    assert main(["inspect", str(bundle)]) == 0
    assert "compression: palettize:2" in capsys.readouterr().out


def test_mixed_bit_recipe_meets_its_budget_and_inspect_shows_it(tiny_model_dir: Path, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch):
    """The recipe as the exporter runs it (the report is what goes into the manifest's compression entry), its
    palettes spilled to the scratch folder it is given (an export gives its staging folder)."""
    from pocketsd.export.components import SD_COMPONENTS
    from pocketsd.export.compression import mixed_bit
    from pocketsd.export.compression.coreml_component import compress_component
    from pocketsd.export.exporter import resolve_dims
    from pocketsd.export.model_loader import load_module, open_model_folder
    from pocketsd.runtime.describe import _notes

    folders = []
    real_spill = mixed_bit._Spill

    def spill(folder):
        folders.append(folder)
        return real_spill(folder)

    monkeypatch.setattr(mixed_bit, "_Spill", spill)
    preset = load_preset(str(preset_file(tmp_path, (
        "backend: coreml\nprecision: fp16\nunet_batch: 1\ncoreml:\n  deployment_target: iOS17\n  compression:\n"
        "    unet:\n      mixed_bit: {bits: [4, 6, 8], min_psnr_db: 40}\n"))))
    folder = open_model_folder(tiny_model_dir)
    scratch = tmp_path / "staging"
    scratch.mkdir()
    done = compress_component(SD_COMPONENTS["unet"], load_module(folder, "unet"), resolve_dims(folder, preset),
                              preset.coreml.compression["unet"], "fp16", scratch=scratch)
    assert folders == [scratch] and not list(scratch.iterdir())  # unlinked as it is made: nothing is ever left
    report = done.report
    assert report["psnr_db"] >= 40 and report["mixed_bit"]["psnr_db"] >= 40
    assert sum(report["mixed_bit"]["bits_histogram"].values()) == report["layers"] > 0
    assert report["mixed_bit"]["average_bits"] < 8
    assert sum(done.stored_bytes.values()) == report["stored_weight_bytes"]
    assert any("mixed-bit" in line for line in _notes({"compression": report}))


@pytest.mark.skipif(ON_MAC, reason="on macOS CoreML bundles do run")
def test_runtime_refuses_a_coreml_bundle_off_macos_in_one_line(tiny_iphone_bundle: Path, tmp_path: Path, capsys):
    code = main(["generate", str(tiny_iphone_bundle), "--prompt", "a cat", "--out", str(tmp_path / "x.png"),
                 "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "runs only on macOS" in err


@pytest.mark.skipif(not ON_MAC, reason=NEEDS_MAC)
def test_coreml_predictions_match_pytorch_on_macos(tiny_iphone_bundle: Path):
    manifest = load_manifest(tiny_iphone_bundle)
    for component in manifest.components.values():
        assert component.parity is not None and component.parity.psnr_db >= component.parity.min_psnr_db
        for chunk in component.chunks:
            assert chunk.parity.psnr_db >= chunk.parity.min_psnr_db, chunk.id


@pytest.mark.skipif(not ON_MAC, reason=NEEDS_MAC)
def test_generate_from_a_coreml_bundle_on_macos(tiny_iphone_bundle: Path, tmp_path: Path):
    assert main(["generate", str(tiny_iphone_bundle), "--prompt", "a cat", "--steps", "3", "--seed", "1",
                 "--compute-units", "cpu_only", "--out", str(tmp_path / "x.png"), "--quiet"]) == 0
