"""ONNX weight quantization: int8 / int4 in PyTorch before the cut, stored losslessly as int8 / int4 in the chunks,
gated against fp32, shown by inspect; tiny-model bundles generate close to the fp32 bundle."""

from __future__ import annotations

import importlib.util
import itertools
import re
from pathlib import Path

import numpy as np
import onnx
import pytest
import yaml

from tests.conftest import TOL

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.export

from torch import nn  # noqa: E402

from pocketsd.cli import main  # noqa: E402
from pocketsd.errors import BundleError, InternalError, PresetError  # noqa: E402
from pocketsd.export.backends.onnx.convert import write_onnx  # noqa: E402
from pocketsd.export.compression.onnx_quantize import quantize_chunk_file, recover_grid, stored_bytes  # noqa: E402
from pocketsd.export.compression.onnx_weights import (  # noqa: E402
    _stored_bytes,
    fake_quantize,
    quantizable_layers,
    store_chunk_quantized,
)
from pocketsd.export.exporter import ExportRequest, export_bundle  # noqa: E402
from pocketsd.export.model_loader import load_module, open_model_folder  # noqa: E402
from pocketsd.export.preset import WeightQuantization, load_preset, preset_from_dict  # noqa: E402
from pocketsd.export.random_model import builtin_configs  # noqa: E402
from pocketsd.runtime.manifest import load_manifest  # noqa: E402
from pocketsd.runtime.pipeline import Pipeline  # noqa: E402
from pocketsd.runtime.sessions import OnnxSession, SessionOptions  # noqa: E402

QUANT_OPS = {"DequantizeLinear", "MatMulNBits", "GatherBlockQuantized"}
INT_TYPES = {onnx.TensorProto.INT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT8}


def _builtin_without_other_features(name: str, path: Path, **changes) -> Path:
    """A built-in preset as a file, minus sliced attention and VAE tiling (tested by their own tests), so that these
    tests measure quantization alone."""
    data = yaml.safe_load((Path(__file__).parents[2] / "split_configs" / f"{name}.yaml").read_text())
    data.pop("attention", None)
    data.pop("vae_tiling", None)
    data.update(changes)
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def int8_bundle(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("int8")
    preset = load_preset(str(_builtin_without_other_features("cpu-int8", folder / "cpu-int8.yaml")))
    return export_bundle(ExportRequest(str(tiny_model_dir), preset, folder / "bundle", progress=False,
                                       warm_cache=False))


@pytest.fixture(scope="module")
def int4_bundle(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """cpu-int4 with blocks of 16: the tiny model's layers are 32 to 256 wide, so blocks of 128 would be one block."""
    folder = tmp_path_factory.mktemp("int4")
    file = _builtin_without_other_features("cpu-int4", folder / "cpu-int4.yaml", quantize={
        "default": {"weights": "int8"}, "unet": {"weights": "int4", "block_size": 16}})
    return export_bundle(ExportRequest(str(tiny_model_dir), load_preset(str(file)), folder / "bundle",
                                       progress=False, warm_cache=False))


@pytest.fixture(params=["int8", "int4"])
def bundle(request: pytest.FixtureRequest) -> Path:
    return request.getfixturevalue(f"{request.param}_bundle")


def _predicted(model_dir: Path, bundle: Path) -> dict[str, int]:
    """Stored bytes of every quantized weight, as onnx_weights predicts them for the planner."""
    manifest, folder = load_manifest(bundle), open_model_folder(model_dir)
    config = manifest.target["config"]["quantize"]
    predicted = {}
    for sub in ("text_encoder", "unet", "vae"):
        model = load_module(folder, sub)
        cid = "vae_decoder" if sub == "vae" else sub
        q = WeightQuantization(config[cid]["mode"], config[cid]["block_size"])
        layers = quantizable_layers(model, manifest.dims["vocab_size"], {p for p, _ in model.named_modules()})
        predicted.update(_stored_bytes(model, layers, q))
    return predicted


# ------------------------------------------------------------------------------------- bundles: files and figures
def test_chunks_store_int_weights_at_the_predicted_bytes(tiny_model_dir: Path, bundle: Path):
    manifest, predicted = load_manifest(bundle), _predicted(tiny_model_dir, bundle)
    for component in manifest.components.values():
        mode = manifest.target["config"]["quantize"][component.id]["mode"]
        for chunk in component.chunks:
            model = onnx.load(bundle / chunk.file.path)
            ops = {n.op_type for n in model.graph.node}
            assert {"DequantizeLinear", "MatMulNBits"} & ops, chunk.id
            stored: dict[str, int] = {}
            for init in model.graph.initializer:
                match = re.fullmatch(r"(.+)\.(int8|int4|scale)", init.name)
                if match:
                    assert init.data_type in INT_TYPES | {onnx.TensorProto.FLOAT}
                    stored[match.group(1)] = stored.get(match.group(1), 0) + len(init.raw_data)
            assert stored, chunk.id
            assert {name: predicted[name] for name in stored} == stored, chunk.id  # exact, per weight
            types = {i.data_type for i in model.graph.initializer}
            assert (onnx.TensorProto.INT4 in types) == (mode == "int4" and "DequantizeLinear" in ops), chunk.id
            total = sum(len(i.raw_data) or 4 * int(np.prod(i.dims)) for i in model.graph.initializer)
            # the plan's bytes are the file's, up to constants the exporter folds in or out
            assert 0.95 * chunk.weight_bytes <= total <= chunk.weight_bytes + 64_000, chunk.id
            assert chunk.extra["quantization"]["weights"] == mode


def test_int8_unet_is_about_a_quarter_of_fp32(int8_bundle: Path, tiny_bundle: Path):
    def unet_bytes(b: Path) -> int:
        """The weights files (graphs are as large as the weights in the tiny model, 0.2 % of them in SD 1.5)."""
        return sum(sum(f.bytes for f in c.data_files) for c in load_manifest(b).component("unet").chunks)

    assert unet_bytes(int8_bundle) < 0.35 * unet_bytes(tiny_bundle)


def test_quantization_psnr_is_in_manifest_and_inspect(bundle: Path, capsys: pytest.CaptureFixture[str]):
    manifest = load_manifest(bundle)
    for component in manifest.components.values():
        report = component.extra["quantization"]
        assert report["psnr_db"] >= report["min_psnr_db"] and report["layers"] > 0
        assert report["stored_weight_bytes"] < report["fp32_weight_bytes"] / 3
        assert component.parity.psnr_db >= TOL["export_min_psnr_db"]  # the ONNX chunks == fake-quantized PyTorch
    assert main(["inspect", str(bundle)]) == 0
    lines = [x for x in capsys.readouterr().out.splitlines() if "quantization:" in x]
    assert len(lines) == 4
    unet = manifest.component("unet").extra["quantization"]
    assert f"PSNR {unet['psnr_db']:.1f} dB vs fp32 (PyTorch, gate ≥ {unet['min_psnr_db']:.1f} dB)" in "\n".join(lines)


def test_bundle_generates_close_to_the_fp32_bundle(bundle: Path, tiny_bundle: Path):
    def image(b: Path) -> np.ndarray:
        return Pipeline.from_bundle(b)("a lighthouse", num_inference_steps=2, seed=0, output_type="np")

    got, ref = image(bundle), image(tiny_bundle)
    mode = load_manifest(bundle).target["config"]["quantize"]["unet"]["mode"]
    psnr = 20 * np.log10(1.0 / np.sqrt(np.mean((got - ref) ** 2)))
    assert psnr >= TOL[f"{mode}_image_min_psnr_db"]


# ------------------------------------------------------------------------------------------- the gate fails closed
def test_gate_failure_leaves_nothing_and_prints_the_table(tiny_model_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]):
    preset = tmp_path / "strict.yaml"
    preset.write_text("backend: onnx\ncomponents: [unet]\n"
                      "quantize:\n  unet: {weights: int8, min_psnr_db: 200}\n")
    out = tmp_path / "out"
    assert main(["export", "--model", str(tiny_model_dir), "--preset", str(preset), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    errors = [x for x in err.splitlines() if x.startswith("error[")]
    assert len(errors) == 1 and errors[0].startswith("error[parity]: unet: int8 weight quantization gives")
    assert "200.0 dB" in errors[0]
    assert re.search(r"unet \(int8 vs fp32\)\s+[\d.]+\s+200\.0", err)
    assert not out.exists() and not list(tmp_path.glob(".out.partial*"))


# ------------------------------------------------------------------------------ lossless conversion, single layers
class _Embed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Embedding(1000, 96)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(ids.long())


LINEAR_OPS = {"int8": "DequantizeLinear", "int4": "MatMulNBits"}
LAYERS = {  # name → (module, example input, kind, the ONNX op that must store it (per mode where it differs))
    "conv3x3": (lambda: nn.Conv2d(320, 64, 3, padding=1), (1, 320, 8, 8), "conv", "DequantizeLinear"),
    "conv_narrow": (lambda: nn.Conv2d(4, 40, 3, padding=1), (1, 4, 8, 8), "conv", "DequantizeLinear"),
    "linear_3d": (lambda: nn.Linear(320, 200), (2, 7, 320), "linear", LINEAR_OPS),  # MatMul [K, N]
    "linear_2d": (lambda: nn.Linear(320, 200), (2, 320), "linear", LINEAR_OPS),  # Gemm transB with bias
    "embedding": (_Embed, None, "embedding", "GatherBlockQuantized"),
}


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("layer", sorted(LAYERS))
def test_onnx_conversion_is_lossless(layer: str, mode: str, tmp_path: Path):
    make, shape, kind, op = LAYERS[layer]
    torch.manual_seed(0)
    module = make().eval()
    name, weighted = next((n, m) for n, m in module.named_modules() if hasattr(m, "weight"))
    with torch.no_grad():
        weighted.weight.copy_(fake_quantize(weighted.weight, kind, "int8" if kind == "embedding" else mode, 64))
    x = torch.randint(0, 1000, (1, 77)).float() if shape is None else torch.randn(shape)
    files = write_onnx(module, [x], ["x"], ["y"], tmp_path / "layer.onnx")
    weight = f"{name}.weight" if name else "weight"
    files, summary = store_chunk_quantized(files, module, {weight}, WeightQuantization(mode, 64), "layer")
    op = op[mode] if isinstance(op, dict) else op
    assert summary["ops"] == {op: 1} and summary["layers"] == 1
    stored = onnx.load(files[0])
    assert weight not in {i.name for i in stored.graph.initializer}  # the fp32 weight is gone
    got = OnnxSession(files[0], SessionOptions(threads=1)).run({"x": x.numpy()})["y"]
    with torch.no_grad():
        assert float(np.max(np.abs(got - module(x).numpy()))) <= 1e-5
    assert sum(len(i.raw_data) for i in stored.graph.initializer if i.name.startswith(weight + ".")) == \
        stored_bytes(kind, "int8" if kind == "embedding" else mode, tuple(weighted.weight.shape), 64)


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_wide_convs_are_dequantized_in_pieces(mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A Conv whose fp32 weight exceeds the piece budget becomes one Conv per output-channel range (each with its
    own DequantizeLinear) and a Concat, computing the same numbers."""
    import pocketsd.export.compression.onnx_quantize as onnx_quantize

    torch.manual_seed(0)
    module = nn.Conv2d(64, 96, 3, padding=1).eval()  # 96 × 64·9·4 B = 216 KiB of fp32 weight
    with torch.no_grad():
        module.weight.copy_(fake_quantize(module.weight, "conv", mode, 32))
    x = torch.randn(1, 64, 8, 8)
    (tmp_path / "whole").mkdir(), (tmp_path / "split").mkdir()
    files = write_onnx(module, [x], ["x"], ["y"], tmp_path / "whole" / "layer.onnx")
    whole, _ = store_chunk_quantized(files, module, {"weight"}, WeightQuantization(mode, 32), "layer")
    monkeypatch.setattr(onnx_quantize, "DEQUANTIZED_PIECE_BYTES", 64 * 1024)
    files = write_onnx(module, [x], ["x"], ["y"], tmp_path / "split" / "layer.onnx")
    split, summary = store_chunk_quantized(files, module, {"weight"}, WeightQuantization(mode, 32), "layer")
    assert summary["ops"] == {"DequantizeLinear": 1}
    ops = [n.op_type for n in onnx.load(split[0]).graph.node]
    assert ops.count("DequantizeLinear") == ops.count("Conv") == 4 and ops.count("Concat") == 1
    stored = {i.name for i in onnx.load(split[0]).graph.initializer}
    assert "bias" not in stored and "weight" not in stored  # only the pieces are stored
    got = OnnxSession(split[0], SessionOptions(threads=1)).run({"x": x.numpy()})["y"]
    ref = OnnxSession(whole[0], SessionOptions(threads=1)).run({"x": x.numpy()})["y"]
    assert got.shape == (1, 96, 8, 8) and float(np.max(np.abs(got - ref))) <= 1e-5
    with torch.no_grad():
        assert float(np.max(np.abs(got - module(x).numpy()))) <= 1e-5


class _SlicedFeedForward(nn.Module):
    """One Linear used twice (as sliced attention / feed-forward use theirs) and one with a bias in 2-D (Gemm)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(64, 96)
        self.gemm = nn.Linear(96, 40)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.proj(x[:, :5]), self.proj(x[:, 5:])], dim=1)
        return self.gemm(h.mean(dim=1))


def test_int8_linears_are_dequantized_per_use_in_pieces(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """int8 Linear weights are stored once as int8 [N, K] per output range; each use dequantizes its own pieces
    into FusedMatMul / Gemm (transB) and concatenates them. onnxruntime keeps that form (it would turn
    DequantizeLinear → MatMul into MatMulNBits, whose 8-bit kernel is the slow one), and it computes what PyTorch
    does."""
    import onnxruntime as ort

    import pocketsd.export.compression.onnx_quantize as onnx_quantize

    torch.manual_seed(0)
    module = _SlicedFeedForward().eval()
    with torch.no_grad():
        for layer in (module.proj, module.gemm):
            layer.weight.copy_(fake_quantize(layer.weight, "linear", "int8", 64))
    x = torch.randn(2, 9, 64)
    monkeypatch.setattr(onnx_quantize, "DEQUANTIZED_PIECE_BYTES", 40 * 64 * 4)  # proj: 3 × 32 rows, gemm: 2 × 20
    files = write_onnx(module, [x], ["x"], ["y"], tmp_path / "layer.onnx")
    files, summary = store_chunk_quantized(files, module, {"proj.weight", "gemm.weight"},
                                           WeightQuantization("int8", 64), "layer")
    assert summary["ops"] == {"DequantizeLinear": 2}
    graph = onnx.load(files[0]).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("FusedMatMul") == 6 and ops.count("Gemm") == 2 and ops.count("DequantizeLinear") == 8
    assert "MatMulNBits" not in ops and ops.count("Concat") >= 2
    stored = {i.name: i for i in graph.initializer}
    assert not any(n.startswith("gemm.bias") and not n.endswith((".0", ".1")) for n in stored)  # bias in pieces
    assert sorted(n for n in stored if n.startswith("proj.weight")) == \
        [f"proj.weight.{i}.{part}" for i in range(3) for part in ("int8", "scale")]  # once, not once per use
    assert sum(len(stored[n].raw_data) for n in stored if n.startswith("proj.weight")) == \
        stored_bytes("linear", "int8", (96, 64), 64)

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ort.InferenceSession(str(files[0]), so, providers=["CPUExecutionProvider"])
    optimized = {n.op_type for n in onnx.load(tmp_path / "optimized.onnx").graph.node}
    assert "MatMulNBits" not in optimized and "FusedMatMul" in optimized

    got = OnnxSession(files[0], SessionOptions(threads=1)).run({"x": x.numpy()})["y"]
    with torch.no_grad():
        assert float(np.max(np.abs(got - module(x).numpy()))) <= 1e-5


def test_output_pieces_cover_the_channels_within_the_budget():
    from pocketsd.export.compression.onnx_quantize import output_pieces

    assert output_pieces(1280, 2560 * 9 * 4, 16 * 2**20) == [(i * 160, i * 160 + 160) for i in range(8)]
    assert output_pieces(320, 320 * 9 * 4, 16 * 2**20) == [(0, 320)]
    pieces = output_pieces(7, 10, 25)
    assert pieces[0][0] == 0 and pieces[-1][1] == 7 and all(b - a <= 2 for a, b in pieces)
    assert all(p[1] == q[0] for p, q in zip(pieces, pieces[1:]))


def test_a_quantized_chunk_keeps_its_weights_in_one_data_file(tmp_path: Path):
    module = nn.Linear(64, 32).eval()
    with torch.no_grad():
        module.weight.copy_(fake_quantize(module.weight, "linear", "int8", 128))
    x = torch.randn(3, 64)
    files = write_onnx(module, [x], ["x"], ["y"], tmp_path / "layer.onnx")
    assert len(files) == 2
    files, _ = store_chunk_quantized(files, module, {"weight"}, WeightQuantization("int8", 128), "layer")
    assert files == [tmp_path / "layer.onnx", tmp_path / "layer.onnx.data"] and sorted(tmp_path.iterdir()) == files
    got = OnnxSession(files[0], SessionOptions(threads=1)).run({"x": x.numpy()})["y"]
    with torch.no_grad():
        assert float(np.max(np.abs(got - module(x).numpy()))) <= 1e-5


def test_weights_off_the_grid_are_refused(tmp_path: Path):
    with pytest.raises(InternalError, match="not on an int grid"):
        recover_grid(np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32), 127, "w")
    module = nn.Linear(64, 32).eval()
    files = write_onnx(module, [torch.randn(3, 64)], ["x"], ["y"], tmp_path / "layer.onnx")
    expected = {"weight": fake_quantize(module.weight, "linear", "int8", 128).numpy()}  # not what was exported
    with pytest.raises(InternalError, match="no matching initializer"):
        quantize_chunk_file(files, expected, "int8", 128, "layer")


# -------------------------------------------------------------------------------------------- presets and sizes
@pytest.mark.parametrize(("item", "expected"), [
    ("{weights: int3}", r"quantize\.unet\.weights is 'int3' — allowed: int8, int4"),
    ("{weights: int4, block_size: 48}", r"quantize\.unet\.block_size is 48, not a power of two"),
    ("{weights: int4, block_size: 512}", r"quantize\.unet\.block_size is 512"),
    ("{weights: int8, min_psnr: 3}", r"unknown key 'quantize\.unet\.min_psnr'"),
])
def test_bad_quantize_values_name_the_key(item: str, expected: str):
    with pytest.raises(PresetError) as info:
        preset_from_dict(yaml.safe_load(f"backend: onnx\nquantize:\n  unet: {item}\n"), "mine.yaml")
    assert re.search(expected, info.value.one_line()) and "\n" not in info.value.one_line()


def test_sd15_unet_fits_the_size_targets():
    """SD 1.5's UNet by arithmetic over its parameter shapes (meta device): int8 ≤ 0.90 GB, int4 / 128 ≤ 0.47 GB."""
    import diffusers

    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(**builtin_configs("sd15").unet)
    layers = quantizable_layers(unet, 49408, {p for p, _ in unet.named_modules()})
    assert len(layers) == 282  # every Conv2d and Linear
    sizes = {(mode, block): sum(_stored_bytes(unet, layers, WeightQuantization(mode, block)).values())
             for mode, block in itertools.product(("int8", "int4"), (64, 128))}
    assert sizes["int8", 128] <= 0.90e9 and sizes["int4", 128] <= 0.47e9 < sizes["int4", 64]


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino is not installed")
def test_openvino_names_the_int4_chunk_it_cannot_read(int4_bundle: Path):
    """OpenVINO's ONNX reader has no blockwise int4 DequantizeLinear (opset 21): one clear error, naming the chunk."""
    pipe = Pipeline.from_bundle(int4_bundle, engine="openvino")
    with pytest.raises(BundleError, match=r"OpenVINO cannot compile chunk unet\.\d\d: .*DequantizeLinear") as err:
        pipe("a cat", num_inference_steps=1, seed=1)
    assert "--engine onnxruntime" in err.value.one_line()


def test_optimized_graphs_dequantize_weights_first_as_the_exported_graph_does(int8_bundle: Path):
    """onnxruntime runs a graph in its file's order, and saves its optimized graph with each DequantizeLinear beside
    its MatMul, which measured higher peaks; the written graph has the weight-only nodes first, as exported."""
    for component in load_manifest(int8_bundle).components.values():
        for chunk in component.chunks:
            model = onnx.load(str(int8_bundle / chunk.optimized.file.path), load_external_data=False)
            constants = {i.name for i in model.graph.initializer}
            weight_only = [all(not i or i in constants for i in n.input) for n in model.graph.node]
            assert any(weight_only) and weight_only == sorted(weight_only, reverse=True), chunk.id


@pytest.mark.skipif(importlib.util.find_spec("openvino") is None, reason="openvino is not installed")
def test_openvino_runs_int8_bundles_as_onnxruntime_does(int8_bundle: Path):
    """Activation quantization off (openvino_session.py): int8 weights, fp32 math, as onnxruntime; ≤ 1e-3 on 0-1."""
    images = [Pipeline.from_bundle(int8_bundle, engine=engine)("a cat", num_inference_steps=2, seed=1,
                                                               output_type="np")
              for engine in ("onnxruntime", "openvino")]
    assert np.abs(images[0] - images[1]).max() <= 1e-3
