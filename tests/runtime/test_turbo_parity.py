"""Turbo-style sampling end to end against diffusers: one to four steps, guidance off, trailing timesteps, for every
scheduler (parity tier, same folder, latents and noise).

The model is ``tiny-turbo`` (SD-Turbo's scheduler config: Euler, ``timestep_spacing="trailing"``). Guidance 0 is
how Turbo models run (diffusers skips the negative prompt and runs the UNet once per step; so does pocketsd).
Tolerance: ``TOL["pipeline_min_psnr_db"]`` on the decoded image.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import TOL, random_model_and_bundle

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytestmark = [pytest.mark.export,
              pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")]

from pocketsd.export.parity import compare  # noqa: E402
from pocketsd.runtime.pipeline import Pipeline  # noqa: E402
from tests.runtime.test_pipeline_parity import PROMPT, TorchNoise  # noqa: E402
from tests.runtime.test_schedulers import DIFFUSERS  # noqa: E402


@pytest.fixture(scope="module")
def turbo_exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return random_model_and_bundle("tiny-turbo", tmp_path_factory)


@pytest.fixture(scope="module")
def turbo_model(turbo_exported) -> Path:
    return turbo_exported[0]


@pytest.fixture(scope="module")
def turbo_runtime(turbo_exported) -> Pipeline:
    return Pipeline.from_bundle(turbo_exported[1])


@pytest.fixture(scope="module")
def turbo_reference(turbo_model: Path):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(turbo_model, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_turbo_defaults(turbo_reference, turbo_runtime: Pipeline):
    assert turbo_reference.scheduler.config.timestep_spacing == "trailing"
    assert turbo_runtime.default_scheduler == "euler"


@pytest.mark.parametrize("steps", [1, 4])
@pytest.mark.parametrize("scheduler", sorted(DIFFUSERS))
def test_few_steps_without_guidance_match_diffusers(turbo_reference, turbo_runtime: Pipeline, scheduler: str,
                                                     steps: int):
    cls_name, overrides = DIFFUSERS[scheduler]
    config = dict(turbo_reference.scheduler.config)
    turbo_reference.scheduler = getattr(diffusers, cls_name).from_config(config, **overrides)
    try:
        latents = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(31))
        expected = turbo_reference(PROMPT, num_inference_steps=steps, guidance_scale=0.0, latents=latents.clone(),
                                   generator=torch.Generator().manual_seed(6), output_type="np").images[0]
    finally:
        turbo_reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(config)
    actual = turbo_runtime(PROMPT, num_inference_steps=steps, guidance_scale=0.0, scheduler=scheduler,
                           latents=latents.numpy(), generator=TorchNoise(6), output_type="np")
    assert compare(expected, actual).psnr_db >= TOL["pipeline_min_psnr_db"]
