"""A tiny bundle with a tiled VAE (``vae_tiling: {tile: 8, overlap: 2}``) and sliced attention: the VAE runs at
one tile's size, the pipeline blends the tiles, and the picture stays close to the untiled bundle's."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TOL

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.export

from pocketsd.cli import main  # noqa: E402
from pocketsd.export.components import Dims  # noqa: E402
from pocketsd.export.components.attention import MIB  # noqa: E402
from pocketsd.export.exporter import ExportRequest, export_bundle, resolve_dims  # noqa: E402
from pocketsd.export.model_loader import load_module, open_model_folder  # noqa: E402
from pocketsd.export.preset import load_preset  # noqa: E402
from pocketsd.runtime.manifest import load_manifest  # noqa: E402
from pocketsd.runtime.pipeline import Pipeline  # noqa: E402
from pocketsd.runtime.tiling import Tiling, run_tiled  # noqa: E402

# 1 MiB cuts the tiny UNet's self-attention (2 × 8 heads × 256 keys × 4 B = 16 KiB a query) into 4 blocks of 64
# queries. Far smaller budgets work too (tests/export/test_attention.py exports a VAE at 0.001 MiB) but give the
# UNet one-query blocks: ~20,000 graph nodes and a quarter of an hour of ONNX export on 2 cores.
SLICE_MB = 1.0
PRESET = f"""
name: tiny-tiled
description: the tiny model with its VAE in tiles of 8 latent pixels and sliced attention
backend: onnx
precision: fp32
split:
  unet: {{n_chunks: 2}}
attention: {{form: sliced, slice_mb: {SLICE_MB}}}
vae_tiling: {{tile: 8, overlap: 2}}
"""
TILING = {"space": "latent", "tile_height": 8, "tile_width": 8, "overlap": 2}


@pytest.fixture(scope="module")
def preset_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("presets") / "tiny-tiled.yaml"
    path.write_text(PRESET)
    return path


@pytest.fixture(scope="module")
def tiled_bundle(tiny_model_dir: Path, preset_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "tiny-tiled"
    return export_bundle(ExportRequest(str(tiny_model_dir), load_preset(str(preset_file)), out, progress=False))


@pytest.fixture(scope="module")
def pipes(tiled_bundle: Path, tiny_bundle: Path) -> tuple[Pipeline, Pipeline]:
    """(tiled, untiled): the untiled one is the cpu-preset bundle of the same model (original attention, which
    computes the same function as sliced)."""
    return Pipeline.from_bundle(tiled_bundle), Pipeline.from_bundle(tiny_bundle)


def psnr(reference: np.ndarray, actual: np.ndarray) -> float:
    """On images in [0, 1] (peak 1)."""
    return float(20 * np.log10(1 / np.sqrt(np.mean((reference.astype(np.float64) - actual) ** 2))))


def test_dims_tile_only_what_exceeds_the_tile():
    def dims(height: int, width: int, tile: int) -> Dims:
        return Dims(height=height, width=width, latent_channels=4, vae_scale_factor=8, text_length=77,
                    text_hidden=32, vocab_size=1000, unet_batch=1, vae_tile=tile, vae_overlap=2)

    assert dims(128, 128, 0).vae_tiling() is None and dims(128, 128, 0).vae_latent_height == 16
    assert dims(128, 128, 16).vae_tiling() is None  # the tile covers the latent: small resolutions are untiled
    wide = dims(128, 512, 32)
    assert (wide.vae_latent_height, wide.vae_latent_width, wide.vae_height, wide.vae_width) == (16, 32, 128, 256)
    assert wide.vae_tiling() == {"space": "latent", "tile_height": 16, "tile_width": 32, "overlap": 2}
    assert (wide.latent_height, wide.latent_width) == (16, 64)  # the UNet keeps the whole latent


def test_resolve_dims_takes_the_tile_from_the_preset(tiny_model_dir: Path, preset_file: Path):
    dims = resolve_dims(open_model_folder(tiny_model_dir), load_preset(str(preset_file)))
    assert (dims.vae_tile, dims.vae_overlap, dims.vae_latent_height, dims.vae_height) == (8, 2, 8, 64)
    assert (dims.height, dims.latent_height) == (128, 16)


def test_vae_components_run_at_one_tile(tiled_bundle: Path, capsys: pytest.CaptureFixture[str]):
    manifest = load_manifest(tiled_bundle)
    decoder, encoder = manifest.component("vae_decoder"), manifest.component("vae_encoder")
    assert [(t.name, t.shape) for t in decoder.inputs + decoder.outputs] == [("z", (1, 4, 8, 8)),
                                                                            ("image", (1, 3, 64, 64))]
    assert [(t.name, t.shape) for t in encoder.inputs + encoder.outputs] == [("x", (1, 3, 64, 64)),
                                                                            ("latent", (1, 8, 8, 8))]
    assert decoder.extra["tiling"] == encoder.extra["tiling"] == TILING
    assert "tiling" not in manifest.component("unet").extra
    assert (manifest.dims["height"], manifest.dims["latent_height"]) == (128, 16)  # the image's sizes
    assert decoder.parity.psnr_db >= TOL["export_min_psnr_db"]  # the gate, per tile, as for any bundle
    assert main(["inspect", str(tiled_bundle)]) == 0 and "vae_decoder.00" in capsys.readouterr().out


def test_tiled_decode_is_the_blend_of_pytorch_tiles(tiny_model_dir: Path, pipes: tuple[Pipeline, Pipeline]):
    """The runtime's blend of onnxruntime tiles equals the same blend of PyTorch tiles: only export error."""
    tiled, _ = pipes
    vae = load_module(open_model_folder(tiny_model_dir), "vae")
    latents = np.random.default_rng(0).standard_normal((1, 4, 16, 16), dtype=np.float32)

    def torch_tile(z: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return vae.decode(torch.from_numpy(z)).sample.numpy()

    scaled = latents / np.float32(tiled.manifest.latent_scaling_factor)
    expected = run_tiled(torch_tile, scaled, Tiling(8, 8, 2), in_scale=1, out_scale=8)
    expected = np.transpose(np.clip(expected / 2 + 0.5, 0, 1)[0], (1, 2, 0))
    assert np.max(np.abs(tiled.decode(latents) - expected)) <= TOL["chunked_vs_unchunked_max_abs"]


@pytest.mark.parametrize("seed", [0, 1])
def test_tiled_image_is_close_to_the_untiled_one(pipes: tuple[Pipeline, Pipeline], seed: int):
    tiled, untiled = pipes
    latents = np.random.default_rng(seed).standard_normal((1, 4, 16, 16), dtype=np.float32)
    assert psnr(untiled.decode(latents), tiled.decode(latents)) >= TOL["tiled_tiny_min_psnr_db"]
    args = dict(prompt="a lighthouse", num_inference_steps=4, seed=seed, output_type="np")
    assert psnr(untiled(**args), tiled(**args)) >= TOL["tiled_tiny_min_psnr_db"]


def test_img2img_runs_tiled(pipes: tuple[Pipeline, Pipeline]):
    tiled, untiled = pipes
    init = untiled("a lighthouse", num_inference_steps=4, seed=3, output_type="np")
    args = dict(prompt="a lighthouse at night", image=init, strength=0.6, num_inference_steps=5, seed=4,
                output_type="np")
    image = tiled(**args)
    assert image.shape == (128, 128, 3) and np.all(np.isfinite(image))
    assert psnr(untiled(**args), image) >= TOL["tiled_tiny_min_psnr_db"]


def test_sliced_unet_chunks_keep_scores_within_budget(tiled_bundle: Path):
    import onnx

    manifest = load_manifest(tiled_bundle)
    softmaxes = 0
    for chunk in manifest.component("unet").chunks:
        model = onnx.shape_inference.infer_shapes(onnx.load(tiled_bundle / chunk.file.path))
        shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.value_info}
        for node in model.graph.node:
            shape = shapes.get(node.output[0], [])
            if node.op_type in ("MatMul", "Softmax") and len(shape) == 4 and shape[-1] in (256, 77):  # keys
                assert int(np.prod(shape)) * 4 <= SLICE_MB * MIB, (chunk.id, node.name, shape)
            softmaxes += node.op_type == "Softmax"
    # 5 transformer blocks at 16×16: self-attention in 4 blocks of 64 queries, cross-attention (77 keys) in 2;
    # the mid-block's (8×8) in one each
    assert softmaxes == 5 * (4 + 2) + 2
