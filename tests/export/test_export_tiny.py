"""Export of tiny models end to end: 4 UNet chunks, parity in the manifest, chunks == the unchunked graph."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TOL

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.export

from pocketsd.cli import main  # noqa: E402
from pocketsd.export.backends.onnx.convert import write_onnx  # noqa: E402
from pocketsd.export.capture import capture  # noqa: E402
from pocketsd.export.components import SD_COMPONENTS  # noqa: E402
from pocketsd.export.exporter import ExportRequest, export_bundle, resolve_dims  # noqa: E402
from pocketsd.export.model_loader import load_module, open_model_folder  # noqa: E402
from pocketsd.export.preset import load_preset, with_overrides  # noqa: E402
from pocketsd.export.random_model import builtin_configs, write_random_model  # noqa: E402
from pocketsd.runtime.chain import ComponentRunner  # noqa: E402
from pocketsd.runtime.manifest import load_manifest  # noqa: E402
from pocketsd.runtime.sessions import OnnxSession, SessionOptions  # noqa: E402


def test_cpu_bundle_has_four_unet_chunks_all_above_threshold(tiny_bundle: Path):
    manifest = load_manifest(tiny_bundle)
    unet = manifest.component("unet")
    # the shared prefix (export/shared_prefix.py), then the preset's four chunks
    assert [c.id for c in unet.chunks] == ["unet.00", "unet.01", "unet.02", "unet.03", "unet.04"]
    assert [c.per_row for c in unet.chunks] == [True, False, False, False, False]
    for component in manifest.components.values():
        assert component.parity.psnr_db >= TOL["export_min_psnr_db"]
        for chunk in component.chunks:
            assert chunk.parity.psnr_db >= TOL["export_min_psnr_db"], chunk.id
    assert set(manifest.components) == {"text_encoder", "unet", "vae_decoder", "vae_encoder"}
    plan = json.loads((tiny_bundle / manifest.plan.path).read_text())["components"]["unet"]
    assert [c["id"] for c in plan["chunks"]] == [c.id for c in unet.chunks]
    assert plan["strategy"] == "split::n_chunks" and len(plan["cuts"]) == 4


def test_inspect_json_lists_chunk_figures(tiny_bundle: Path, capsys: pytest.CaptureFixture[str]):
    assert main(["inspect", str(tiny_bundle), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    chunks = [c for comp in info["components"] for c in comp["chunks"]]
    for chunk in chunks:
        assert {"id", "file", "format", "sha256", "bytes", "psnr_db", "max_abs"} <= set(chunk)
        assert (tiny_bundle / chunk["file"]).is_file()
    assert main(["inspect", str(tiny_bundle)]) == 0
    table = capsys.readouterr().out
    assert "unet.03" in table and "PSNR" in table
    assert "run      memory resident, attention original, VAE untiled" in table


def chained_vs_unchunked(model_dir: Path, bundle: Path, tmp_path: Path) -> float:
    """Max abs difference between the bundle's chained UNet and the same UNet exported unchunked."""
    manifest = load_manifest(bundle)
    folder = open_model_folder(model_dir)
    preset = load_preset("cpu")
    captured = capture(SD_COMPONENTS["unet"], load_module(folder, "unet"), resolve_dims(folder, preset), seed=7)
    whole = tmp_path / "unet_whole.onnx"
    write_onnx(captured.graph_module, captured.example_inputs, [t.name for t in captured.inputs],
               [t.name for t in captured.outputs], whole)
    feeds = {t.name: x.numpy() for t, x in zip(captured.inputs, captured.example_inputs)}
    expected = OnnxSession(whole, SessionOptions()).run(feeds)["noise_pred"]
    runner = ComponentRunner.open(bundle, manifest.component("unet"), SessionOptions())
    return float(np.max(np.abs(runner(**feeds)["noise_pred"] - expected)))


def test_chained_unet_chunks_equal_the_unchunked_unet(tiny_model_dir: Path, tiny_bundle: Path, tmp_path: Path):
    assert chained_vs_unchunked(tiny_model_dir, tiny_bundle, tmp_path) <= TOL["chunked_vs_unchunked_max_abs"]


def test_another_architecture_exports_and_chains(tmp_path: Path):
    """Other block counts, head dims and cross-attention width: the exporter is not tied to one config."""
    base = builtin_configs("tiny")
    configs = type(base)(
        unet={**base.unet, "block_out_channels": [16, 32, 32], "layers_per_block": 1, "norm_num_groups": 8,
              "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
              "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
              "cross_attention_dim": 48, "attention_head_dim": 4, "sample_size": 8},
        vae={**base.vae, "block_out_channels": [8, 16, 16], "norm_num_groups": 4,
             "down_block_types": ["DownEncoderBlock2D"] * 3, "up_block_types": ["UpDecoderBlock2D"] * 3},
        text_encoder={**base.text_encoder, "hidden_size": 48, "num_attention_heads": 6, "num_hidden_layers": 3},
        scheduler=base.scheduler, arch="other")
    model = write_random_model(tmp_path / "other", configs)
    preset = with_overrides(load_preset("cpu"), {"unet": 3, "text_encoder": 2})
    bundle = export_bundle(ExportRequest(str(model), preset, tmp_path / "bundle", progress=False, warm_cache=False))
    manifest = load_manifest(bundle)
    unet = manifest.component("unet").chunks  # its shared prefix, then the three asked for
    assert len(unet) == 4 and unet[0].per_row and len(manifest.component("text_encoder").chunks) == 2
    assert manifest.dims["height"] == 32 and manifest.dims["text_hidden"] == 48
    for component in manifest.components.values():
        assert component.parity.psnr_db >= TOL["export_min_psnr_db"], component.id
    assert chained_vs_unchunked(model, bundle, tmp_path) <= TOL["chunked_vs_unchunked_max_abs"]


def test_external_data_chunks_load_and_are_hash_checked(tiny_bundle: Path, tmp_path: Path):
    """Weights go to a .data file beside each chunk (onnxruntime memory-maps it); hash-checked like the graph. On a
    copy of ``tiny_bundle`` (shared with other test files), whose weights file this test corrupts."""
    import shutil

    from pocketsd.runtime.sessions import open_chunk

    bundle = Path(shutil.copytree(tiny_bundle, tmp_path / "b"))
    chunk = load_manifest(bundle).component("unet").chunks[0]
    # small initializers stay inline in the .onnx; the weights go to the .data file
    assert chunk.data_files and (bundle / chunk.data_files[0].path).stat().st_size >= 0.9 * chunk.weight_bytes
    assert chunk.parity.psnr_db >= TOL["export_min_psnr_db"]
    data = bundle / chunk.data_files[0].path
    data.write_bytes(data.read_bytes()[:-1] + b"\x01")
    with pytest.raises(Exception, match="sha256"):
        open_chunk(bundle, chunk, SessionOptions())


def test_a_linear_applied_to_several_slices_is_stored_once(tmp_path: Path):
    """Feed-forward slicing applies one Linear per token slice: the chunk holds its weight once, as an initializer
    (not a run-time Transpose), so it is neither stored twice nor missed by the quantization pass."""
    import onnx_ir as ir

    class Sliced(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.linear = torch.nn.Linear(64, 96)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.cat([self.linear(part) for part in x.chunk(4, dim=1)], dim=1)

    module = Sliced().eval()
    x = torch.randn(1, 64, 64)
    files = write_onnx(module, [x], ["x"], ["y"], tmp_path / "sliced.onnx")
    model = ir.load(files[0])
    weights = [v for v in model.graph.initializers.values() if v.shape is not None and len(v.shape) == 2]
    assert len(weights) == 1 and {n.op_type for n in model.graph} == {"Split", "MatMul", "Add", "Concat"}
    got = OnnxSession(files[0], SessionOptions(threads=1)).run({"x": x.numpy()})["y"]
    with torch.no_grad():
        assert float(np.max(np.abs(got - module(x).numpy()))) <= TOL["chunked_vs_unchunked_max_abs"]
