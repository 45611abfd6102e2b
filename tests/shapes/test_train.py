"""The training script still trains: a few steps of each stage write a folder diffusers loads (the shipped model, of
the same architecture, is exported in test_shapes_model.py).

It is not a check that the committed weights are reproduced bit for bit (that takes `make train-tiny`, 40 min)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.export


@pytest.fixture(scope="module")
def quick_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pocketsd.shapes.train import QUICK, train

    return train(tmp_path_factory.mktemp("shapes") / "model", QUICK, progress=False)


def test_a_quick_run_writes_a_diffusers_folder(quick_model: Path):
    import diffusers
    import torch

    from pocketsd.shapes.train import QUICK

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(quick_model, safety_checker=None,
                                                             requires_safety_checker=False, local_files_only=True)
    image = pipe("a red circle on the left, blue background", num_inference_steps=2, height=64, width=64,
                 generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert image.shape == (64, 64, 3) and np.isfinite(image).all()
    record = json.loads((quick_model / "training.json").read_text())
    assert record["config"]["unet_steps"] == QUICK.unet_steps and record["command"] == "make train-tiny"
    assert pipe.vae.config.scaling_factor != 0.18215  # set from the VAE's own latents
    # the shipped sampler is DPM++ 2M on the training's noise schedule (train.SAMPLER_CONFIG)
    assert type(pipe.scheduler).__name__ == "DPMSolverMultistepScheduler"
    assert pipe.scheduler.config.beta_schedule == "scaled_linear" and pipe.scheduler.config.beta_end == 0.012


def test_every_caption_word_is_one_token(quick_model: Path):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(quick_model / "tokenizer")
    ids = tokenizer("a purple triangle at the bottom, white background").input_ids
    assert len(ids) == 2 + 9  # bos, a purple triangle at the bottom , white background, eos


def test_training_into_a_full_folder_is_refused(tmp_path: Path):
    from pocketsd.errors import UserError
    from pocketsd.shapes.train import QUICK, train

    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(UserError):
        train(tmp_path / "taken", QUICK, progress=False)
    assert (tmp_path / "taken" / "x").read_text() == "x"


def test_the_vae_loss_weighs_the_shape_not_the_background():
    from pocketsd.shapes.scenes import BACKGROUNDS, Scene, draw_batch
    from pocketsd.shapes.train import FOREGROUND_WEIGHT, _images, _shape_weights

    scenes = [Scene("square", "red", "left", "blue"), Scene("circle", "white", "center", "black")]
    weights = _shape_weights(scenes, _images(scenes, seed=0))[:, 0].numpy()
    drawn = draw_batch(scenes, seed=0)
    for scene, w, image in zip(scenes, weights, drawn):
        shape = (image != np.asarray(BACKGROUNDS[scene.background])).any(-1)
        assert np.array_equal(w == FOREGROUND_WEIGHT, shape) and np.all(w[~shape] == 1.0)
        assert 0.04 < shape.mean() < 0.15  # the shape's share of the picture
