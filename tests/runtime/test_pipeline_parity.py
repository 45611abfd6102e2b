"""End-to-end parity: the runtime's image equals diffusers' StableDiffusionPipeline on the same diffusers folder.

Both get the same prompt, negative prompt, scheduler, steps, guidance and the same random draws (the runtime is fed
torch's draws through a replaying noise source), and the tiny bundle's UNet is in 4 chunks.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TOL

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.export

from pocketsd.export.parity import compare  # noqa: E402
from pocketsd.runtime.manifest import load_manifest  # noqa: E402
from pocketsd.runtime.pipeline import Pipeline  # noqa: E402

DIFFUSERS_CLASS = {
    "euler": "EulerDiscreteScheduler", "ddim": "DDIMScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler", "pndm": "PNDMScheduler", "heun": "HeunDiscreteScheduler",
    "lms": "LMSDiscreteScheduler", "dpmpp_2m_sde_karras": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}
OVERRIDES = {"dpmpp_2m_sde_karras": {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}}
PROMPT, NEGATIVE = "a lighthouse on a cliff at sunset, oil painting", "blurry, low quality"


class TorchNoise:
    """Draws exactly what diffusers' randn_tensor draws from a CPU torch.Generator with the same seed."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def standard_normal(self, size, dtype=np.float32) -> np.ndarray:
        return torch.randn(tuple(size), generator=self.generator, dtype=torch.float32).numpy()


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.model_config = dict(pipe.scheduler.config)  # the folder's own config: every test's scheduler starts from it
    return pipe


@pytest.fixture(scope="module")
def runtime(tiny_bundle: Path) -> Pipeline:
    assert len(load_manifest(tiny_bundle).component("unet").chunks) >= 3
    return Pipeline.from_bundle(tiny_bundle)


def with_scheduler(pipe, name: str):
    cls = getattr(diffusers, DIFFUSERS_CLASS[name])
    pipe.scheduler = cls.from_config(pipe.model_config, **OVERRIDES.get(name, {}))
    return pipe


@pytest.mark.parametrize("scheduler", ["euler", "ddim", "dpmpp_2m", "euler_a", "pndm", "heun", "lms",
                                       "dpmpp_2m_sde_karras", "unipc"])
def test_txt2img_matches_diffusers(reference, runtime: Pipeline, scheduler: str):
    shape = (1, 4, runtime.manifest.dims["latent_height"], runtime.manifest.dims["latent_width"])
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(11))
    expected = with_scheduler(reference, scheduler)(
        PROMPT, negative_prompt=NEGATIVE, num_inference_steps=12, guidance_scale=7.5, latents=latents.clone(),
        generator=torch.Generator().manual_seed(5), output_type="np").images[0]
    actual = runtime(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=12, guidance_scale=7.5,
                     scheduler=scheduler, latents=latents.numpy(), generator=TorchNoise(5), output_type="np")
    assert compare(expected, actual).psnr_db >= TOL["pipeline_min_psnr_db"]


@pytest.mark.parametrize("scheduler", ["euler", "ddim", "heun", "unipc"])
def test_img2img_matches_diffusers(reference, runtime: Pipeline, scheduler: str):
    img2img = diffusers.StableDiffusionImg2ImgPipeline(**reference.components)
    img2img.set_progress_bar_config(disable=True)
    img2img.model_config = reference.model_config
    size = (runtime.manifest.dims["width"], runtime.manifest.dims["height"])
    gradient = np.linspace(0, 255, size[0] * size[1] * 3).reshape(size[1], size[0], 3).astype(np.uint8)
    from PIL import Image

    init = Image.fromarray(gradient)
    expected = with_scheduler(img2img, scheduler)(
        PROMPT, image=init, strength=0.6, negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=6.0,
        generator=torch.Generator().manual_seed(3), output_type="np").images[0]
    actual = runtime(PROMPT, image=init, strength=0.6, negative_prompt=NEGATIVE, num_inference_steps=10,
                     guidance_scale=6.0, scheduler=scheduler, generator=TorchNoise(3), output_type="np")
    assert compare(expected, actual).psnr_db >= TOL["pipeline_min_psnr_db"]


def test_without_guidance_matches_diffusers(reference, runtime: Pipeline):
    latents = torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(2))
    expected = with_scheduler(reference, "euler")(PROMPT, num_inference_steps=6, guidance_scale=1.0,
                                                  latents=latents.clone(), output_type="np").images[0]
    actual = runtime(PROMPT, num_inference_steps=6, guidance_scale=1.0, scheduler="euler", latents=latents.numpy(),
                     output_type="np")
    assert compare(expected, actual).psnr_db >= TOL["pipeline_min_psnr_db"]


def test_two_batch_1_unet_calls_equal_one_batch_2_call(tiny_model_dir: Path, runtime: Pipeline, tmp_path: Path):
    """cpu-lowmem style (unet_batch 1: guidance as two calls) gives the cpu preset's picture."""
    from pocketsd.export.exporter import ExportRequest, export_bundle
    from pocketsd.export.preset import load_preset

    preset = load_preset("cpu")
    preset = type(preset)(**{**vars(preset), "unet_batch": 1, "components": ("text_encoder", "unet", "vae_decoder")})
    single = Pipeline.from_bundle(export_bundle(ExportRequest(str(tiny_model_dir), preset, tmp_path / "b1",
                                                              progress=False, warm_cache=False)))
    assert single.manifest.dims["unet_batch"] == 1
    kwargs = dict(negative_prompt=NEGATIVE, num_inference_steps=5, scheduler="euler", seed=3, output_type="np")
    assert compare(runtime(PROMPT, **kwargs), single(PROMPT, **kwargs)).psnr_db >= TOL["pipeline_min_psnr_db"]
