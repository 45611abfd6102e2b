"""The shipped, trained ``shapes`` model: ``--model shapes`` exports it, and its bundle draws what it is asked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pocketsd.cli import main
from pocketsd.shapes.judge import adherence, judge
from pocketsd.shapes.scenes import prompt_set

pytestmark = pytest.mark.export
PROMPTS = 12


@pytest.fixture(scope="module")
def shapes_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes") / "bundle"
    assert main(["export", "--model", "shapes", "--preset", "cpu", "--out", str(out), "--quiet"]) == 0
    return out


def test_the_bundle_draws_its_prompts(shapes_bundle: Path):
    """The first 12 prompts of the bench's fixed set, 20 steps, each its own seed, the model's own sampler (DPM++ 2M):
    all three attributes right on 11 (measured), bound 10. A guard that the shipped weights draw their prompts, not the
    issue's claim of 90 % (the bench measures all 405 scenes: README, "The built-in models")."""
    from pocketsd.runtime.pipeline import Pipeline

    pipe = Pipeline.from_bundle(shapes_bundle)
    scenes = prompt_set(PROMPTS)
    images = [pipe(s.caption, num_inference_steps=20, seed=i, output_type="np") for i, s in enumerate(scenes)]
    assert all(image.shape == (64, 64, 3) for image in images)
    rates = adherence([judge(image, scene) for image, scene in zip(images, scenes)])
    assert rates["all"] >= 10 / PROMPTS, rates


def test_the_bundle_names_its_source(shapes_bundle: Path):
    from pocketsd.runtime.manifest import load_manifest

    manifest = load_manifest(shapes_bundle)
    assert manifest.model["name"] == "shapes" and "trained" in manifest.model["source"]
    assert manifest.dims["height"] == 64 and manifest.dims["vae_scale_factor"] == 4


def test_the_bundle_samples_with_dpmpp_2m_by_default(shapes_bundle: Path):
    """The model ships DPM++ 2M (of the first 120 bench prompts PNDM drew 75 % right, DPM++ 2M 88 %: train.py)."""
    from pocketsd.runtime.pipeline import Pipeline

    assert Pipeline.from_bundle(shapes_bundle).default_scheduler == "dpmpp_2m"


def test_a_missing_shapes_model_is_one_line(tmp_path: Path, capsys, monkeypatch):
    import pocketsd.shapes

    monkeypatch.setattr(pocketsd.shapes, "__file__", str(tmp_path / "nowhere" / "__init__.py"))
    code = main(["export", "--model", "shapes", "--preset", "cpu", "--out", str(tmp_path / "b"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "the trained shapes model is missing" in err
    assert "make train-tiny" in err and not (tmp_path / "b").exists()


def test_the_judge_finds_random_pictures_wrong():
    """The same check that passes the model fails noise: the judge is not lenient."""
    rng = np.random.default_rng(0)
    scenes = prompt_set(PROMPTS)
    noise = [rng.random((64, 64, 3)) for _ in scenes]
    assert adherence([judge(image, scene) for image, scene in zip(noise, scenes)])["all"] == 0
