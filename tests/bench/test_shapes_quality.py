"""The quality bench's parts on the shipped shapes model: its untrained twin, its scaled low-memory preset, its table
(the 405-prompt run itself is `python -m pocketsd.bench.shapes_quality`, README "Quality on trained weights")."""

from __future__ import annotations

import filecmp
from pathlib import Path

import pytest

from pocketsd.bench import shapes_quality

pytestmark = pytest.mark.export


def test_the_untrained_twin_has_random_weights_and_the_trained_tokenizer(tmp_path: Path):
    from safetensors.numpy import load_file

    from pocketsd.shapes import model_folder

    trained = model_folder()
    twin = shapes_quality.untrained_copy(trained, tmp_path / "twin")
    assert not filecmp.dircmp(trained / "tokenizer", twin / "tokenizer").diff_files
    name = "diffusion_pytorch_model.safetensors"
    a, b = load_file(trained / "unet" / name), load_file(twin / "unet" / name)
    assert a.keys() == b.keys() and any((a[k] != b[k]).any() for k in a)


def test_the_scaled_low_memory_preset_tiles_and_slices_at_16_latents(tmp_path: Path):
    from pocketsd.export.preset import load_preset

    preset = load_preset(str(shapes_quality.lowmem_preset(tmp_path)))
    assert preset.vae_tiling.tile == 8 and preset.vae_tiling.overlap == 4
    assert preset.attention.form == "sliced" and preset.attention.slice_mb == 0.01
    assert preset.runtime.memory == "stream"  # the rest is cpu-lowmem's


def test_the_table_gives_every_attribute():
    row = {"row": "cpu-int8", "path": "bundle", "psnr_db": 32.44, "unet_bytes": 4952407,
           "adherence": {"colour": 0.8583, "shape": 0.8333, "position": 0.9417, "all": 0.7333}}
    table = shapes_quality.markdown([row], shapes_quality.Settings(120, 20, 7.5))
    assert "| cpu-int8 | bundle | 4.95 MB | 32.4 dB | 86% | 83% | 94% | **73%** |" in table


def test_the_untrained_twin_samples_as_the_trained_model_does(tmp_path: Path):
    import json

    from pocketsd.shapes import model_folder

    twin = shapes_quality.untrained_copy(model_folder(), tmp_path / "twin")
    config = json.loads((twin / "scheduler" / "scheduler_config.json").read_text())
    shipped = json.loads((model_folder() / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == shipped["_class_name"] == "DPMSolverMultistepScheduler"
    assert {k: config.get(k) for k in shipped if not k.startswith("_")} == \
        {k: v for k, v in shipped.items() if not k.startswith("_")}


@pytest.mark.parametrize("prompts", ["0", "406", "-3"])
def test_a_prompt_count_out_of_range_is_one_line(tmp_path: Path, prompts: str):
    with pytest.raises(SystemExit, match=r"--prompts is -?\d+: give 1 to 405"):
        shapes_quality.main(["--work", str(tmp_path / "w"), "--prompts", prompts, "--out", str(tmp_path / "o")])
    assert not (tmp_path / "w").exists() and not (tmp_path / "o").exists()

