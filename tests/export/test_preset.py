"""Presets are strict: every built-in one parses and every mistake names the file, key path and allowed values."""

from __future__ import annotations

from pathlib import Path

import pytest

from pocketsd.errors import PresetError
from pocketsd.export.preset import VaeTiling, builtin_presets, load_preset, with_overrides
from pocketsd.export.split_strategies import SplitRequest


@pytest.mark.parametrize("name", builtin_presets())
def test_every_builtin_preset_parses(name: str):
    preset = load_preset(name)
    assert preset.name == name
    assert preset.parity.min_psnr_db > 0


def test_cpu_preset_is_four_unet_chunks_fp32():
    preset = load_preset("cpu")
    assert preset.split_for("unet") == SplitRequest(n_chunks=4, shared_prefix=True)
    assert preset.split_for("vae_decoder") == SplitRequest()
    assert (preset.backend, preset.precision, preset.unet_batch) == ("onnx", "fp32", 2)


def test_cpu_lowmem_has_a_budget_for_every_component():
    preset = load_preset("cpu-lowmem")
    budgets = {"unet": 30_000_000, "text_encoder": 72_000_000}  # a token table cannot be cut: SDXL's is 63.3 MB
    assert all(preset.split_for(c).max_bytes == budgets.get(c, 50_000_000) for c in preset.components)
    assert preset.unet_batch == 1 and preset.runtime.low_memory and preset.runtime.memory == "stream"
    assert all(preset.quantize[c].mode == "int8" for c in preset.components)
    assert preset.attention.form == "sliced" and preset.vae_tiling is not None


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize("text, expected", [
    ("backend: onnx\nsplit:\n  unet: {n_chunks: 4, max_mb: 3}\n", "split.unet must set exactly one"),
    ("backend: onnx\nsplit:\n  unet: {nchunks: 4}\n", "unknown key 'split.unet.nchunks'"),
    ("backend: onnx\nsplitt: {}\n", "unknown key 'splitt'"),
    ("backend: tpu\n", "backend is 'tpu'"),
    ("backend: onnx\nprecision: fp16\n", "precision is 'fp16'"),
    ("unet_batch: 3\n", "unet_batch is 3"),
    ("resolution: 500x512\n", "resolution is 500x512"),
    ("parity: {min_psnr_db: high}\n", "parity.min_psnr_db is 'high'"),
    ("split:\n  unet: {n_chunks: 0}\n", "split.unet.n_chunks is 0"),
    ("components: [unet, safety_checker]\n", "unknown component 'safety_checker'"),
    ("coreml: {deployment_target: iOS17}\n", "coreml is set but backend is not coreml"),
    ("vae_tiling: {tile: 32, overlap: 8, group_norm: whole}\n", "vae_tiling.group_norm is 'whole'"),
    ("vae_tiling: {tile: 32, group_norm: [image]}\n", "vae_tiling.group_norm is ['image']"),
    ("vae_tiling: {tile: 32, groupnorm: tile}\n", "unknown key 'vae_tiling.groupnorm'"),
    ("vae_tiling: {tile: 32, mid_block: half}\n", "vae_tiling.mid_block is 'half'"),
])
def test_preset_mistakes_name_file_and_key(tmp_path: Path, text: str, expected: str):
    with pytest.raises(PresetError) as err:
        load_preset(write(tmp_path, text))
    assert str(tmp_path / "p.yaml") in err.value.message
    assert expected in err.value.message


def test_unknown_key_lists_allowed_keys(tmp_path: Path):
    with pytest.raises(PresetError) as err:
        load_preset(write(tmp_path, "parity: {min_psnr: 3}\n"))
    assert "min_psnr_db" in err.value.hint


def test_unknown_preset_name_lists_builtins():
    with pytest.raises(PresetError) as err:
        load_preset("toaster")
    assert "cpu" in err.value.hint


def test_cli_overrides_are_checked_like_preset_keys():
    preset = with_overrides(load_preset("cpu"), {"unet": 2}, None, "256x384")
    assert preset.split_for("unet") == SplitRequest(n_chunks=2, shared_prefix=True)  # the preset's prefix kept
    assert preset.resolution == (256, 384)
    budget = with_overrides(load_preset("cpu"), None, 300, None)
    assert budget.split_for("unet") == SplitRequest(max_bytes=300_000_000, shared_prefix=True)
    with pytest.raises(PresetError, match="unknown component 'unetz'"):
        with_overrides(load_preset("cpu"), {"unetz": 2})
    with pytest.raises(PresetError, match="--resolution"):
        with_overrides(load_preset("cpu"), None, None, "big")


def test_vae_tiling_group_norm_defaults_to_whole_image_statistics(tmp_path: Path):
    assert load_preset(write(tmp_path, "vae_tiling: {tile: 24}\n")).vae_tiling == VaeTiling(24, 8, "image")
    per_tile = load_preset(write(tmp_path, "vae_tiling: {tile: 24, overlap: 4, group_norm: tile, mid_block: tile}\n"))
    assert per_tile.vae_tiling == VaeTiling(24, 4, "tile", "tile")
    assert per_tile.to_dict()["vae_tiling"] == {"tile": 24, "overlap": 4, "group_norm": "tile", "mid_block": "tile"}
    assert load_preset(write(tmp_path, "vae_tiling: {tile: 24}\n")).vae_tiling.mid_block == "whole"
    with pytest.raises(PresetError) as err:
        load_preset(write(tmp_path, "vae_tiling: {group_norm: global}\n"))
    assert err.value.one_line().count("\n") == 0 and err.value.hint == "allowed: image, tile"


def test_vae_tiling_is_refused_for_coreml_presets(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text("backend: coreml\nprecision: fp16\nvae_tiling: {tile: 32, overlap: 8}\n")
    with pytest.raises(PresetError, match="vae_tiling is set but backend is coreml"):
        load_preset(str(path))
