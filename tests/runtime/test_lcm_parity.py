"""An LCM-distilled model end to end against diffusers' ``LatentConsistencyModelPipeline`` (parity tier).

The model is ``tiny-lcm``: the tiny SD 1.x model with a UNet that takes the guidance scale's embedding
(``time_cond_proj_dim``) and the LCM scheduler, as LCM Dreamshaper is. Guidance goes in as that input, never as a
second batch. Tolerance: ``TOL["pipeline_min_psnr_db"]`` on the decoded image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TOL, random_model_and_bundle

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytestmark = [pytest.mark.export,
              pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")]

from pocketsd.contract import UNET_IO  # noqa: E402
from pocketsd.export.parity import compare  # noqa: E402
from pocketsd.runtime.conditioning import guidance_embedding  # noqa: E402
from pocketsd.runtime.pipeline import Pipeline  # noqa: E402
from tests.runtime.test_pipeline_parity import PROMPT, TorchNoise  # noqa: E402


@pytest.fixture(scope="module")
def lcm_exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return random_model_and_bundle("tiny-lcm", tmp_path_factory)


@pytest.fixture(scope="module")
def lcm_runtime(lcm_exported) -> Pipeline:
    return Pipeline.from_bundle(lcm_exported[1])


@pytest.fixture(scope="module")
def lcm_reference(lcm_exported):
    pipe = diffusers.LatentConsistencyModelPipeline.from_pretrained(lcm_exported[0], safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_the_guidance_embedding_is_diffusers(lcm_reference):
    for scale, dim in ((8.5, 32), (1.0, 256), (3.0, 15)):
        want = lcm_reference.get_guidance_scale_embedding(torch.tensor([scale - 1.0]), embedding_dim=dim).numpy()
        # float32 sines of angles up to 7500 rad (one float32 step there: 5e-4 rad): numpy's and torch's differ by ulps
        np.testing.assert_allclose(guidance_embedding(scale, dim), want, rtol=0, atol=2e-4)


def test_the_bundle_says_lcm(lcm_runtime: Pipeline):
    inputs = {t.name: t.shape for t in lcm_runtime.manifest.component("unet").inputs}
    assert inputs[UNET_IO.timestep_cond][-1] == lcm_runtime.manifest.dims["time_cond_dim"] == 32
    assert lcm_runtime.default_scheduler == "lcm"


@pytest.mark.parametrize(("steps", "guidance"), [(1, 8.5), (2, 3.0), (4, 8.5)])
def test_lcm_txt2img_matches_diffusers(lcm_reference, lcm_runtime: Pipeline, steps: int, guidance: float):
    d = lcm_runtime.manifest.dims
    latents = torch.randn((1, 4, d["latent_height"], d["latent_width"]), generator=torch.Generator().manual_seed(5))
    expected = lcm_reference(PROMPT, num_inference_steps=steps, guidance_scale=guidance, latents=latents.clone(),
                             generator=torch.Generator().manual_seed(8), output_type="np").images[0]
    actual = lcm_runtime(PROMPT, num_inference_steps=steps, guidance_scale=guidance, latents=latents.numpy(),
                         generator=TorchNoise(8), output_type="np")
    parity = compare(expected, actual).psnr_db
    assert parity >= TOL["pipeline_min_psnr_db"]
    # the embedding is fed: another scale gives another picture, far further from diffusers' than rounding (random
    # tiny weights barely listen to it, so the gap, not an absolute figure)
    other = lcm_runtime(PROMPT, num_inference_steps=steps, guidance_scale=guidance + 4.0, latents=latents.numpy(),
                        generator=TorchNoise(8), output_type="np")
    assert compare(expected, other).psnr_db < parity - 10
