"""Inpainting end to end against diffusers' StableDiffusionInpaintPipeline (parity tier, same folder and noise).

Two models: ``tiny-inpaint`` (a 9-channel inpainting UNet, every scheduler) and the plain tiny model given a mask
(diffusers' 4-channel path: the unmasked area blended back after each step). Tolerance:
``TOL["pipeline_min_psnr_db"]`` on each decoded image.
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

from PIL import Image  # noqa: E402

from pocketsd.cli import main  # noqa: E402
from pocketsd.errors import GenerateError  # noqa: E402
from pocketsd.export.parity import compare  # noqa: E402
from pocketsd.runtime.pipeline import Pipeline  # noqa: E402
from tests.runtime.test_pipeline_parity import NEGATIVE, PROMPT, TorchNoise  # noqa: E402
from tests.runtime.test_schedulers import DIFFUSERS  # noqa: E402

SIZE = 128  # the tiny models' native size


def init_image() -> Image.Image:
    ramp = np.linspace(0, 255, SIZE * SIZE * 3).reshape(SIZE, SIZE, 3)
    return Image.fromarray(np.flipud(ramp).astype(np.uint8))


def mask_image() -> Image.Image:
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[20:90, 36:110] = 255  # not aligned to the 8-pixel latent grid: the nearest-neighbour pick matters
    mask[100:104, 4:60] = 200
    return Image.fromarray(mask, mode="L")


@pytest.fixture(scope="module")
def inpaint_exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return random_model_and_bundle("tiny-inpaint", tmp_path_factory)


@pytest.fixture(scope="module")
def inpaint_model(inpaint_exported) -> Path:
    return inpaint_exported[0]


@pytest.fixture(scope="module")
def inpaint_bundle(inpaint_exported) -> Path:
    return inpaint_exported[1]


@pytest.fixture(scope="module")
def inpaint_runtime(inpaint_bundle: Path) -> Pipeline:
    return Pipeline.from_bundle(inpaint_bundle)


def reference(folder: Path):
    pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(folder, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def inpaint_reference(inpaint_model: Path):
    return reference(inpaint_model)


def run_both(ref, ours: Pipeline, scheduler: str, **kwargs):
    cls_name, overrides = DIFFUSERS[scheduler]
    config = dict(ref.scheduler.config)
    ref.scheduler = getattr(diffusers, cls_name).from_config(config, **overrides)
    common = dict(image=init_image(), mask_image=mask_image(), negative_prompt=NEGATIVE, guidance_scale=7.0,
                  output_type="np", **kwargs)
    try:
        expected = ref(PROMPT, generator=torch.Generator().manual_seed(8), **common).images
    finally:
        ref.scheduler = diffusers.PNDMScheduler.from_config(config)
    actual = ours(PROMPT, scheduler=scheduler, generator=TorchNoise(8), **common)
    actual = actual if actual.ndim == 4 else actual[None]
    assert actual.shape == expected.shape
    for i in range(len(expected)):
        assert compare(expected[i], actual[i]).psnr_db >= TOL["pipeline_min_psnr_db"], f"image {i}"
    return actual


def test_the_bundle_has_a_9_channel_unet(inpaint_runtime: Pipeline):
    dims = inpaint_runtime.manifest.dims
    assert (dims["unet_in_channels"], dims["latent_channels"]) == (9, 4)
    assert inpaint_runtime.manifest.component("unet").inputs[0].shape[1] == 9


@pytest.mark.parametrize("scheduler", sorted(DIFFUSERS))
def test_inpainting_unet_matches_diffusers(inpaint_reference, inpaint_runtime: Pipeline, scheduler: str):
    run_both(inpaint_reference, inpaint_runtime, scheduler, num_inference_steps=6)


def test_inpainting_unet_with_strength_and_two_images(inpaint_reference, inpaint_runtime: Pipeline):
    run_both(inpaint_reference, inpaint_runtime, "euler_a", num_inference_steps=10, strength=0.6,
             num_images_per_prompt=2)


@pytest.mark.parametrize("scheduler,strength", [("euler", 1.0), ("ddim", 0.7), ("dpmpp_2m", 0.8)])
def test_plain_unet_with_a_mask_matches_diffusers(tiny_model_dir: Path, tiny_bundle: Path, scheduler, strength):
    actual = run_both(reference(tiny_model_dir), Pipeline.from_bundle(tiny_bundle), scheduler,
                      num_inference_steps=8, strength=strength)
    # the blend keeps the unmasked area: after the last step it is the image's own latents, decoded
    assert actual.shape == (1, SIZE, SIZE, 3)


def test_requests_that_do_not_fit_are_refused(inpaint_runtime: Pipeline, tiny_bundle: Path):
    with pytest.raises(GenerateError, match="is an inpainting UNet: it needs an image and a mask"):
        inpaint_runtime(PROMPT, num_inference_steps=2, seed=1)
    with pytest.raises(GenerateError, match="is an inpainting UNet"):
        inpaint_runtime(PROMPT, image=init_image(), num_inference_steps=2, seed=1)
    with pytest.raises(GenerateError, match="a mask needs the image it masks"):
        Pipeline.from_bundle(tiny_bundle)(PROMPT, mask_image=mask_image(), num_inference_steps=2, seed=1)
    with pytest.raises(GenerateError, match="mask is 64x32 .* exported for 128x128"):
        inpaint_runtime(PROMPT, image=init_image(), mask_image=np.zeros((32, 64), np.uint8), num_inference_steps=2)


def test_cli_inpaints_with_mask(inpaint_bundle: Path, inpaint_runtime: Pipeline, tmp_path: Path):
    init_image().save(tmp_path / "init.png")
    mask_image().save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    assert main(["generate", str(inpaint_bundle), "--prompt", PROMPT, "--init-image", str(tmp_path / "init.png"),
                 "--mask", str(tmp_path / "mask.png"), "--steps", "3", "--seed", "2", "--quiet",
                 "--out", str(out)]) == 0
    want = inpaint_runtime(PROMPT, image=init_image(), mask_image=mask_image(), num_inference_steps=3, seed=2)
    with Image.open(out) as got:
        assert np.array_equal(np.asarray(got), np.asarray(want))
