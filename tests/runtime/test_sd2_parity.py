"""SD 2.x end to end against diffusers, for every scheduler (parity tier, same folder, same latents and noise).

The model is ``tiny-sd21``: SD 2.1's family at the tiny size (v-prediction with DDIM's config, upcast attention,
linear projections, GELU text encoder, ``!`` as pad token). Tolerance: ``TOL["pipeline_min_psnr_db"]`` on the
decoded image.
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
from pocketsd.runtime.schedulers import available  # noqa: E402
from tests.runtime.test_pipeline_parity import NEGATIVE, PROMPT, TorchNoise  # noqa: E402
from tests.runtime.test_schedulers import DIFFUSERS  # noqa: E402


@pytest.fixture(scope="module")
def sd2_exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return random_model_and_bundle("tiny-sd21", tmp_path_factory)


@pytest.fixture(scope="module")
def sd2_model(sd2_exported) -> Path:
    return sd2_exported[0]


@pytest.fixture(scope="module")
def sd2_runtime(sd2_exported) -> Pipeline:
    return Pipeline.from_bundle(sd2_exported[1])


@pytest.fixture(scope="module")
def sd2_reference(sd2_model: Path):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(sd2_model, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_model_is_sd2_shaped(sd2_reference, sd2_runtime: Pipeline):
    assert sd2_reference.unet.config.upcast_attention and sd2_reference.unet.config.use_linear_projection
    assert sd2_reference.scheduler.config.prediction_type == "v_prediction"
    assert sd2_reference.tokenizer.pad_token == "!"
    assert sd2_runtime.default_scheduler == "ddim"
    assert sorted(DIFFUSERS) == sorted(available()), "every registered scheduler has a diffusers twin below"


@pytest.mark.parametrize("scheduler", sorted(DIFFUSERS))
def test_sd2_txt2img_matches_diffusers(sd2_reference, sd2_runtime: Pipeline, scheduler: str):
    cls_name, overrides = DIFFUSERS[scheduler]
    config = dict(sd2_reference.scheduler.config)
    sd2_reference.scheduler = getattr(diffusers, cls_name).from_config(config, **overrides)
    try:
        shape = (1, 4, sd2_runtime.manifest.dims["latent_height"], sd2_runtime.manifest.dims["latent_width"])
        latents = torch.randn(shape, generator=torch.Generator().manual_seed(21))
        expected = sd2_reference(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=6, guidance_scale=7.0,
                                 latents=latents.clone(), generator=torch.Generator().manual_seed(4),
                                 output_type="np").images[0]
    finally:
        sd2_reference.scheduler = diffusers.DDIMScheduler.from_config(config)
    actual = sd2_runtime(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=6, guidance_scale=7.0,
                         scheduler=scheduler, latents=latents.numpy(), generator=TorchNoise(4), output_type="np")
    assert compare(expected, actual).psnr_db >= TOL["pipeline_min_psnr_db"]
