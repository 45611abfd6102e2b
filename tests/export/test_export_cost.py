"""Export cost: exact palettes in linear time (coreml_palettes.py), and torch weights released before chunks run."""

from __future__ import annotations

import contextlib
import gc
import os
import tempfile
import weakref
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ct = pytest.importorskip("coremltools")
pytestmark = pytest.mark.export

from torch import nn  # noqa: E402

from pocketsd.errors import InternalError  # noqa: E402
from pocketsd.export.backends.coreml import convert as coreml_writer  # noqa: E402
from pocketsd.export.backends.coreml.convert import CoreMLTarget, write_mlpackage  # noqa: E402
from pocketsd.export.backends.coreml.palettes import bits_for, unique_lut, unique_values  # noqa: E402
from pocketsd.export.compression.coreml_optimize import LayerCompression, compress  # noqa: E402
from pocketsd.runtime.manifest import TensorSpec  # noqa: E402
from tests.export.compression_helpers import SMALL_INPUT, small  # noqa: E402

WEIGHTS = Path("Data/com.apple.CoreML/weights/weight.bin")


def _palette_values(n: int, count: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    palette = rng.standard_normal(count).astype(np.float16)
    palette[:2] = [0.0, -0.0]
    return palette[rng.integers(0, count, n)].astype(np.float32)


def test_unique_values_is_np_unique_in_linear_time_for_fp16_values():
    values = _palette_values(100_000, 64)
    got, inverse = unique_values(values)
    want, want_inverse = np.unique(values, return_inverse=True)
    assert got.dtype == np.float32 and np.array_equal(got, want) and np.array_equal(inverse, want_inverse)
    assert np.array_equal(got[inverse], values)
    other = np.random.default_rng(1).standard_normal(1000).astype(np.float32)  # not fp16 values: numpy's path
    got, inverse = unique_values(other)
    assert np.array_equal(got, np.unique(other)) and np.array_equal(got[inverse], other)


def test_unique_lut_pads_the_palette_to_its_width_and_indexes_exactly():
    values = _palette_values(4096, 40).reshape(64, 64)
    lut, indices = unique_lut(values, nbits=6)
    assert lut.shape == (64,) and lut.dtype == np.float32 and indices.dtype == np.uint8
    assert np.all(lut[len(np.unique(values)):] == 0) and np.all(np.diff(lut[:len(np.unique(values))]) > 0)
    assert np.array_equal(lut[indices].reshape(values.shape), values)


def test_bits_for_is_the_smallest_width_coremltools_stores():
    assert [bits_for(n) for n in (1, 2, 5, 16, 17, 64, 65, 256)] == [1, 1, 3, 4, 6, 6, 8, 8]
    with pytest.raises(InternalError):
        bits_for(257)


def _coremltools_unique(model: nn.Module):
    """What the writer asked of coremltools before: its own lossless ``unique`` mode on every large constant."""
    import coremltools.optimize.coreml as cto

    def pipeline(palettes, program):
        groups = {p.out_channels // p.groups for p in palettes.values() if p.groups > 1}
        grouped = {"granularity": "per_grouped_channel", "group_size": groups.pop()} if groups else {}
        smallest = min(model.get_parameter(name).numel() for name in palettes)
        config = cto.OpPalettizerConfig(mode="unique", weight_threshold=smallest - 1, **grouped)
        result = ct.PassPipeline.DEFAULT_PALETTIZATION
        result.set_options("compression::palettize_weights", {"config": cto.OptimizationConfig(global_config=config)})
        return result

    return pipeline


def _convert(model: nn.Module, path: Path, target: str) -> Path:
    with torch.no_grad():
        out_shape = tuple(model(SMALL_INPUT).shape)
    write_mlpackage(model, [SMALL_INPUT], [TensorSpec("x", "float32", tuple(SMALL_INPUT.shape))],
                    [TensorSpec("y", "float32", out_shape)], path, CoreMLTarget(target, "fp16"))
    return path


UNIFORM = {  # one palette granularity per chunk: what coremltools' unique mode could reproduce
    "iOS17": {"conv_b": LayerCompression("palettize", 4), "proj": LayerCompression("palettize", 6),
              "out": LayerCompression("palettize", 8)},
    "iOS18": {"conv_b": LayerCompression("palettize", 4, "per_grouped_channel", 8),
              "proj": LayerCompression("palettize", 3, "per_grouped_channel", 8)},
}


@pytest.mark.parametrize("target", sorted(UNIFORM))
def test_package_is_byte_for_byte_what_coremltools_unique_mode_writes(tmp_path, monkeypatch, target: str):
    model = compress(small(), UNIFORM[target])
    ours = _convert(model, tmp_path / "ours.mlpackage", target)
    monkeypatch.setattr(coreml_writer, "palettization_pipeline", _coremltools_unique(model))
    theirs = _convert(model, tmp_path / "theirs.mlpackage", target)
    assert (ours / WEIGHTS).read_bytes() == (theirs / WEIGHTS).read_bytes()
    assert str(ct.utils.load_spec(str(ours))) == str(ct.utils.load_spec(str(theirs)))


def test_each_weight_keeps_its_own_palette_granularity(tmp_path):
    """A grouped and a per-tensor palette in one chunk: each is stored as PyTorch chose it (coremltools' unique mode
    took one granularity for the whole chunk)."""
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    layers = {"conv_b": LayerCompression("palettize", 4, "per_grouped_channel", 8),
              "proj": LayerCompression("palettize", 6)}
    path = _convert(compress(small(), layers), tmp_path / "mixed.mlpackage", "iOS18")
    spec = ct.utils.load_spec(str(path))
    program = milproto_load(spec, specification_version=spec.specificationVersion,
                            file_weights_dir=str(path / WEIGHTS.parent))
    luts = {op.name: op.lut.val.shape for op in program.functions["main"].operations
            if op.op_type == "constexpr_lut_to_dense"}
    [conv] = [shape for name, shape in luts.items() if name.startswith("p_conv_b_weight")]
    [proj] = [shape for name, shape in luts.items() if name.startswith("p_proj_weight")]
    assert (conv[0], conv[-2]) == (32 // 8, 16) and (proj[0], proj[-2]) == (1, 64)


def test_conversion_leaves_no_copy_in_the_temp_folder(tmp_path, monkeypatch):
    """coremltools converts into a temporary package and deletes it only at exit: each chunk's weights must not stay
    there (nor for good, when the export is killed) once the chunk is in the bundle."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    path = _convert(small(), tmp_path / "chunk.mlpackage", "iOS17")
    assert (path / WEIGHTS).is_file()
    assert list(scratch.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chunk.mlpackage", "tmp"]


def test_compression_writes_over_the_weights_it_replaces():
    """In place in memory too: a weight read from a file mapping must not stay resident beside its compressed copy."""
    model = small()
    layers = {"conv_b": LayerCompression("palettize", 4), "proj": LayerCompression("linear_int8")}
    before = {name: model.get_submodule(name).weight.data_ptr() for name in layers}
    compress(model, layers)
    assert {name: model.get_submodule(name).weight.data_ptr() for name in layers} == before
    assert model.conv_b.weight.unique().numel() <= 16


def test_onnx_export_lets_go_of_the_weights(tmp_path):
    """The exporter's graph outlives the export (onnxscript's rewrite rules keep the last graph they matched); it
    must not keep the module's weights alive, nor those its optimizer folded away (transposed Linear weights)."""
    from pocketsd.export.backends.onnx.convert import write_onnx

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32), nn.LayerNorm(32)).eval()
    weights = [weakref.ref(p) for p in model.parameters()]
    write_onnx(model, [torch.randn(2, 8, 32)], ["x"], ["y"], tmp_path / "m.onnx")
    del model
    gc.collect()
    assert [w() is None for w in weights] == [True] * len(weights)


def test_torch_builds_its_onnx_registry_once_and_writes_the_same_files(tmp_path, monkeypatch):
    """write_onnx hands torch.onnx.export one torchlib registry per opset (convert.one_torchlib_registry): built
    once, the files byte for byte those of a registry built per call, and torch's own method back in place after."""
    from torch.onnx._internal.exporter import _registration

    from pocketsd.export.backends.onnx import convert

    original = _registration.ONNXRegistry.__dict__["from_torchlib"]
    built: list[int] = []

    def counting(cls, opset_version=_registration._constants.TORCHLIB_OPSET):
        built.append(opset_version)
        return original.__func__(cls, opset_version=opset_version)

    monkeypatch.setattr(_registration.ONNXRegistry, "from_torchlib", classmethod(counting))
    monkeypatch.setattr(convert, "_REGISTRIES", {})
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32)).eval()
    x = torch.randn(2, 8, 32)
    folders = [tmp_path / str(i) for i in range(4)]
    for folder in folders:
        folder.mkdir()
    files = [convert.write_onnx(model, [x], ["x"], ["y"], folder / "m.onnx")[0] for folder in folders[:3]]
    assert len(built) == 1
    assert _registration.ONNXRegistry.__dict__["from_torchlib"].__func__ is counting
    monkeypatch.setattr(convert, "one_torchlib_registry", contextlib.nullcontext)
    files.append(convert.write_onnx(model, [x], ["x"], ["y"], folders[3] / "m.onnx")[0])
    assert len(built) == 2
    assert len({f.read_bytes() for f in files}) == 1


def test_the_model_is_released_before_its_chunks_run(tiny_model_dir: Path, tmp_path, monkeypatch):
    """Chunk checks (onnxruntime sessions, the optimized graphs) start only once no weight of the component's torch
    model is alive: the model and a chunk's session are never in memory together."""
    from pocketsd.export import exporter
    from pocketsd.export.preset import load_preset

    loaded: dict[str, list[weakref.ref]] = {}
    load, check = exporter.load_module, exporter.check_component

    def load_module(folder, sub):
        module = load(folder, sub)
        loaded[sub] = [weakref.ref(p) for p in module.parameters()]
        return module

    def check_component(written, staging, progress=True):
        sub = {"text_encoder": "text_encoder", "unet": "unet"}[written.id]
        alive = [w for w in loaded[sub] if w() is not None]
        assert not alive, f"{len(alive)} of {len(loaded[sub])} {sub} weights alive while its chunks are checked"
        return check(written, staging, progress)

    monkeypatch.setattr(exporter, "load_module", load_module)
    monkeypatch.setattr(exporter, "check_component", check_component)
    preset = tmp_path / "preset.yaml"
    preset.write_text("backend: onnx\ncomponents: [text_encoder, unet]\nsplit:\n  unet: {n_chunks: 2}\n")
    out = exporter.export_bundle(exporter.ExportRequest(str(tiny_model_dir), load_preset(str(preset)),
                                                        tmp_path / "bundle", progress=False, warm_cache=False))
    assert os.path.isfile(out / "manifest.json") and set(loaded) == {"text_encoder", "unet"}
