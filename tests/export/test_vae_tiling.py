"""A tiny bundle with a tiled VAE (``vae_tiling: {tile: 8, overlap: 2}``) and sliced attention: the VAE runs at
one tile's size, the pipeline blends the tiles, and the picture stays close to the untiled bundle's.

Its VAE (cut into several chunks) takes whole-image GroupNorm statistics in two passes, the default
(``group_norm: image``), and its decoder's head (up to the mid block) runs whole, the default (``mid_block: whole``);
a second, VAE-only bundle with ``group_norm: tile, mid_block: tile`` runs each tile of the whole decoder with its
own statistics, once, and a third (``mid_block: tile``) the whole decoder in two passes."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

from tests.conftest import TOL

torch = pytest.importorskip("torch")
pytestmark = pytest.mark.export

from pocketsd.bench.vae_tiling_quality import Decoder, group_norms  # noqa: E402
from pocketsd.cli import main  # noqa: E402
from pocketsd.errors import BundleError  # noqa: E402
from pocketsd.export.components import Dims  # noqa: E402
from pocketsd.export.components.attention import MIB  # noqa: E402
from pocketsd.export.exporter import ExportRequest, export_bundle, resolve_dims  # noqa: E402
from pocketsd.export.model_loader import load_module, open_model_folder  # noqa: E402
from pocketsd.export.preset import load_preset  # noqa: E402
from pocketsd.runtime.manifest import load_manifest  # noqa: E402
from pocketsd.runtime.pipeline import Pipeline  # noqa: E402
from pocketsd.runtime.sessions import BACKENDS, Backend, SessionOptions  # noqa: E402
from pocketsd.runtime.tiling import TileIO, Tiling, call_tiled, decoder_head, run_tiled  # noqa: E402

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
  vae_decoder: {{n_chunks: 3}}
  vae_encoder: {{n_chunks: 2}}
attention: {{form: sliced, slice_mb: {SLICE_MB}}}
vae_tiling: {{tile: 8, overlap: 2}}
"""
PER_TILE_PRESET = """
name: tiny-tiled-per-tile
components: [vae_decoder, vae_encoder]
vae_tiling: {tile: 8, overlap: 2, group_norm: tile, mid_block: tile}
"""
NO_HEAD_PRESET = """
name: tiny-tiled-no-head
components: [vae_decoder]
vae_tiling: {tile: 8, overlap: 2, mid_block: tile}
"""
TILING = {"space": "latent", "tile_height": 8, "tile_width": 8, "overlap": 2}
TWO_PASS = {**TILING, "group_norm": "image", "stats_input": "gn_stats", "use_stats_input": "gn_use_stats",
            "stats_output": "gn_tile_stats"}


@pytest.fixture(scope="module")
def preset_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("presets") / "tiny-tiled.yaml"
    path.write_text(PRESET)
    return path


@pytest.fixture(scope="module")
def tiled_bundle(tiny_model_dir: Path, preset_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bundles") / "tiny-tiled"
    return export_bundle(ExportRequest(str(tiny_model_dir), load_preset(str(preset_file)), out, progress=False,
                                       warm_cache=False))


def export_vae_only(text: str, model: Path, tmp: pytest.TempPathFactory) -> Path:
    """Export the tiny model with the preset ``text`` into a folder named after the preset."""
    name = text.split("name:")[1].split()[0]
    path = tmp.mktemp("presets") / f"{name}.yaml"
    path.write_text(text)
    return export_bundle(ExportRequest(str(model), load_preset(str(path)), tmp.mktemp("bundles") / name,
                                       progress=False, warm_cache=False))


@pytest.fixture(scope="module")
def per_tile_bundle(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_vae_only(PER_TILE_PRESET, tiny_model_dir, tmp_path_factory)


@pytest.fixture(scope="module")
def no_head_bundle(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_vae_only(NO_HEAD_PRESET, tiny_model_dir, tmp_path_factory)


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
    head = manifest.component("vae_decoder_head")
    decoder, encoder = manifest.component("vae_decoder"), manifest.component("vae_encoder")
    # The head (post_quant_conv, conv_in, mid block) takes the whole latent; the decoder takes one tile of its
    # output (32 channels in the tiny VAE). The tiny decoder has 22 GroupNorms: the 5 of the mid block (2 resnets
    # × 2 + attention 1) run whole, the 17 left (4 up-blocks × 2 resnets × 2, conv_norm_out) take statistics. The
    # encoder has 14 (4 down-blocks × 1 resnet × 2, mid-block 5, conv_norm_out); 8 groups each.
    assert [(t.name, t.shape) for t in head.inputs + head.outputs] == [("z", (1, 4, 16, 16)), ("h", (1, 32, 16, 16))]
    assert [(t.name, t.shape) for t in decoder.inputs + decoder.outputs] == [
        ("h", (1, 32, 8, 8)), ("gn_stats", (17, 1, 8, 2)), ("gn_use_stats", (1,)),
        ("image", (1, 3, 64, 64)), ("gn_tile_stats", (17, 1, 8, 2))]
    assert [(t.name, t.shape) for t in encoder.inputs + encoder.outputs] == [
        ("x", (1, 3, 64, 64)), ("gn_stats", (14, 1, 8, 2)), ("gn_use_stats", (1,)),
        ("latent", (1, 8, 8, 8)), ("gn_tile_stats", (14, 1, 8, 2))]
    assert decoder.extra["tiling"] == {**TWO_PASS, "head": "vae_decoder_head"}
    assert encoder.extra["tiling"] == TWO_PASS
    assert "tiling" not in manifest.component("unet").extra and "tiling" not in head.extra
    assert len(head.chunks) == 3  # it follows the decoder's split, quantize and parity settings
    assert (manifest.dims["height"], manifest.dims["latent_height"]) == (128, 16)  # the image's sizes
    assert manifest.target["config"]["vae_tiling"] == {"tile": 8, "overlap": 2, "group_norm": "image",
                                                       "mid_block": "whole"}
    assert decoder_head(manifest) == head
    assert main(["inspect", str(tiled_bundle)]) == 0
    out = capsys.readouterr().out
    assert "vae_decoder.02" in out and "whole-image GroupNorm statistics (2 passes)" in out
    assert "mid block whole (vae_decoder_head)" in out


def test_a_head_that_does_not_fit_is_refused(tiled_bundle: Path):
    manifest = load_manifest(tiled_bundle)
    head, decoder = manifest.component("vae_decoder_head"), manifest.component("vae_decoder")

    def with_(**components: Any) -> Any:
        return dataclasses.replace(manifest, components={**manifest.components, **components})

    def tiling(**entry: Any) -> Any:
        return dataclasses.replace(decoder, extra={"tiling": {**decoder.extra["tiling"], **entry}})

    narrow = dataclasses.replace(head, outputs=(dataclasses.replace(head.outputs[0], shape=(1, 16, 16, 16)),))
    tiled_head = dataclasses.replace(head, extra={"tiling": TILING})
    for bad, expected in ((with_(vae_decoder=tiling(head="vae_mid")), "not another component"),
                          (with_(vae_decoder=tiling(head="vae_decoder")), "not another component"),
                          (with_(vae_decoder_head=narrow), "does not fit"),
                          (with_(vae_decoder_head=tiled_head), "must be untiled")):
        with pytest.raises(BundleError, match=expected):
            decoder_head(bad)
        with pytest.raises(BundleError, match=expected):  # when the bundle is loaded, before any denoising
            Pipeline(tiled_bundle, bad, SessionOptions())


def test_the_statistics_reach_every_chunk_and_each_chunk_passes_parity(tiled_bundle: Path):
    """The VAE is cut into several chunks: each chunk with GroupNorms reads the statistics inputs straight from the
    component's inputs, each GroupNorm's own statistics cross the cuts to the last chunk, and the parity gate (on
    the given-statistics path: the export example feeds gn_use_stats = 1) passes per chunk and for the whole."""
    manifest = load_manifest(tiled_bundle)
    for cid, n_chunks in (("vae_decoder", 3), ("vae_encoder", 2)):
        component = manifest.component(cid)
        assert len(component.chunks) == n_chunks
        readers = 0
        for chunk in component.chunks:
            sources = {t.name: t.source for t in chunk.inputs}
            if "gn_stats" in sources:
                readers += 1
                assert sources["gn_stats"] == "input:gn_stats" and sources["gn_use_stats"] == "input:gn_use_stats"
            assert chunk.parity.psnr_db >= TOL["export_min_psnr_db"], chunk.id
        assert readers == n_chunks
        last = component.chunks[-1]
        assert {t.name: t.source for t in component.outputs}["gn_tile_stats"] == f"{last.id}:gn_tile_stats"
        assert any(t.name.endswith(".norm1") for t in last.inputs)  # earlier chunks' statistics, by GroupNorm
        assert component.parity.psnr_db >= TOL["export_min_psnr_db"]


def torch_two_pass(scope: torch.nn.Module, fn: Callable[[np.ndarray], np.ndarray], x: np.ndarray,
                   scales: tuple[int, int]) -> np.ndarray:
    """The two-pass algorithm in PyTorch, with the bench's GroupNorm hooks: a tiled pass records every GroupNorm's
    statistics averaged over the tiles, a second tiled pass normalizes with them."""
    estimate: dict = {}
    with group_norms(scope, record=estimate):
        run_tiled(fn, x, Tiling(8, 8, 2), *scales)
    with group_norms(scope, fixed=estimate):
        return run_tiled(fn, x, Tiling(8, 8, 2), *scales)


def to_image(decoded: np.ndarray) -> np.ndarray:
    return np.transpose(np.clip(decoded / 2 + 0.5, 0, 1)[0], (1, 2, 0))


@pytest.fixture(scope="module")
def vae(tiny_model_dir: Path) -> torch.nn.Module:
    return load_module(open_model_folder(tiny_model_dir), "vae").eval()


@torch.no_grad()
def torch_decode(vae: torch.nn.Module, z: np.ndarray) -> np.ndarray:
    return vae.decode(torch.from_numpy(z)).sample.numpy()


@pytest.mark.parametrize("seed", [0, 1])
def test_two_pass_decode_equals_the_pytorch_two_pass(vae: torch.nn.Module, pipes: tuple[Pipeline, Pipeline],
                                                    no_head_bundle: Path, seed: int):
    """With the head whole (the default): the head on the whole latent, then the tail in two passes; with
    ``mid_block: tile``: the whole decoder in two passes."""
    tiled, _ = pipes
    latents = np.random.default_rng(seed).standard_normal((1, 4, 16, 16), dtype=np.float32)
    scaled = latents / np.float32(tiled.manifest.latent_scaling_factor)
    decoder = Decoder(vae)
    expected = to_image(torch_two_pass(vae.decoder, decoder.tail, decoder.head(scaled), (1, 8)))
    assert np.max(np.abs(tiled.decode(latents) - expected)) <= TOL["two_pass_vs_torch_max_abs"]
    no_head = to_image(torch_two_pass(vae.decoder, lambda z: torch_decode(vae, z), scaled, (1, 8)))
    assert np.max(np.abs(Pipeline.from_bundle(no_head_bundle).decode(latents) - no_head)) \
        <= TOL["two_pass_vs_torch_max_abs"]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_whole_head_comes_closer_to_the_untiled_decode(pipes: tuple[Pipeline, Pipeline], no_head_bundle: Path,
                                                           seed: int):
    """Two passes both; the mid block's attention over the whole latent instead of one tile's."""
    head, untiled = pipes
    no_head = Pipeline.from_bundle(no_head_bundle)
    latents = np.random.default_rng(seed).standard_normal((1, 4, 16, 16), dtype=np.float32)
    reference = untiled.decode(latents)
    assert psnr(reference, head.decode(latents)) > psnr(reference, no_head.decode(latents))


def test_two_pass_encode_equals_the_pytorch_two_pass(vae: torch.nn.Module, pipes: tuple[Pipeline, Pipeline]):
    tiled, _ = pipes
    runner = tiled.runner("vae_encoder")
    x = np.random.default_rng(0).uniform(-1, 1, (1, 3, 128, 128)).astype(np.float32)

    @torch.no_grad()
    def encode(tile: np.ndarray) -> np.ndarray:
        dist = vae.encode(torch.from_numpy(tile)).latent_dist
        return torch.cat([dist.mean, dist.logvar], dim=1).numpy()

    expected = torch_two_pass(vae.encoder, encode, x, (8, 1))
    got = call_tiled(runner.run_many, runner.component, x, TileIO("x", "latent", 8, 1))
    assert got.shape == (1, 8, 16, 16)
    assert np.max(np.abs(got - expected)) <= TOL["two_pass_vs_torch_max_abs"] * np.max(np.abs(expected))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_two_passes_come_closer_to_the_untiled_decode_than_one(pipes: tuple[Pipeline, Pipeline],
                                                              per_tile_bundle: Path, seed: int):
    """3×3 tiles of 8 latent pixels over a 16×16 latent (measured, seeds 0-2: one pass 24.8 / 27.5 / 26.4 dB,
    two passes 27.2 / 28.1 / 28.2 dB against the untiled decode)."""
    two_pass, untiled = pipes
    per_tile = Pipeline.from_bundle(per_tile_bundle)
    latents = np.random.default_rng(seed).standard_normal((1, 4, 16, 16), dtype=np.float32)
    reference = untiled.decode(latents)
    assert psnr(reference, two_pass.decode(latents)) > psnr(reference, per_tile.decode(latents))


def test_a_per_tile_bundle_behaves_as_before(vae: torch.nn.Module, per_tile_bundle: Path):
    """``group_norm: tile``: no statistics I/O, one pass, the blend of PyTorch tiles (only export error)."""
    manifest = load_manifest(per_tile_bundle)
    decoder, encoder = manifest.component("vae_decoder"), manifest.component("vae_encoder")
    assert decoder.extra["tiling"] == encoder.extra["tiling"] == {**TILING, "group_norm": "tile"}
    assert [t.name for t in decoder.inputs + decoder.outputs] == ["z", "image"]
    assert [t.name for t in encoder.inputs + encoder.outputs] == ["x", "latent"]
    pipe = Pipeline.from_bundle(per_tile_bundle)
    latents = np.random.default_rng(0).standard_normal((1, 4, 16, 16), dtype=np.float32)
    scaled = latents / np.float32(manifest.latent_scaling_factor)
    expected = to_image(run_tiled(lambda z: torch_decode(vae, z), scaled, Tiling(8, 8, 2), in_scale=1, out_scale=8))
    assert np.max(np.abs(pipe.decode(latents) - expected)) <= TOL["chunked_vs_unchunked_max_abs"]


def test_prefetch_opens_each_decoder_chunk_once_per_pass(tiled_bundle: Path, monkeypatch: pytest.MonkeyPatch):
    """The head runs once, then each pass runs all tiles chunk-major; the decoder hints its own first chunk after
    pass 1 and nothing after pass 2, so prefetch guesses right every time and opens nothing more."""
    opened: list[tuple[str, str]] = []
    inner = BACKENDS.get("onnx")

    def counted(path: Path, chunk: Any, options: Any) -> Any:
        opened.append((chunk.id, threading.current_thread().name))
        return inner.open(path, chunk, options)

    monkeypatch.setitem(BACKENDS._items, "backend::onnx", Backend(counted, streams=True))
    pipe = Pipeline.from_bundle(tiled_bundle, memory="prefetch")
    pipe.decode(np.zeros((1, 4, 16, 16), np.float32))
    pipe.close()
    head = [c.id for c in pipe.manifest.component("vae_decoder_head").chunks]
    chunks = [c.id for c in pipe.manifest.component("vae_decoder").chunks]
    assert [chunk for chunk, _ in opened] == head + chunks * 2
    assert all(thread.startswith("pocketsd-prefetch") for _, thread in opened[1:]), opened


@pytest.mark.parametrize("seed", [0, 1])
def test_tiled_image_is_close_to_the_untiled_one(pipes: tuple[Pipeline, Pipeline], seed: int):
    tiled, untiled = pipes
    latents = np.random.default_rng(seed).standard_normal((1, 4, 16, 16), dtype=np.float32)
    assert psnr(untiled.decode(latents), tiled.decode(latents)) >= TOL["tiled_tiny_min_psnr_db"]
    args = dict(prompt="a lighthouse", num_inference_steps=4, seed=seed, output_type="np")
    assert psnr(untiled(**args), tiled(**args)) >= TOL["tiled_tiny_min_psnr_db"]


def test_img2img_runs_tiled(pipes: tuple[Pipeline, Pipeline], monkeypatch: pytest.MonkeyPatch):
    """The encoder runs its 9 tiles twice: own statistics, then their average."""
    tiled, untiled = pipes
    init = untiled("a lighthouse", num_inference_steps=4, seed=3, output_type="np")
    args = dict(prompt="a lighthouse at night", image=init, strength=0.6, num_inference_steps=5, seed=4,
                output_type="np")
    encoder, passes = tiled.runner("vae_encoder"), []
    real = encoder.run_many
    monkeypatch.setattr(encoder, "run_many", lambda rows: passes.append([r["gn_use_stats"][0] for r in rows])
                        or real(rows))
    image = tiled(**args)
    assert passes == [[0.0] * 9, [1.0] * 9]
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
