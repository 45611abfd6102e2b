"""Non-square images and several images per prompt, end to end against diffusers (parity tier, same latents).

One bundle of the tiny model exported at a non-square size; diffusers runs the same folder at the same size with
``num_images_per_prompt``. Tolerance: ``TOL["pipeline_min_psnr_db"]`` on each decoded image, as the other parity tests.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from pocketsd.cli import main  # noqa: E402
from pocketsd.errors import GenerateError  # noqa: E402
from pocketsd.export.parity import compare  # noqa: E402
from pocketsd.runtime.images import read_png_params  # noqa: E402
from pocketsd.runtime.pipeline import Pipeline  # noqa: E402
from tests.conftest import TOL  # noqa: E402
from tests.runtime.test_pipeline_parity import NEGATIVE, PROMPT, TorchNoise  # noqa: E402

pytestmark = pytest.mark.export

HEIGHT, WIDTH = 96, 160  # the tiny model's native size is 128x128


@pytest.fixture(scope="module")
def wide_bundle(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pocketsd.export.exporter import ExportRequest, export_bundle
    from pocketsd.export.preset import load_preset, with_overrides

    preset = with_overrides(load_preset("cpu"), {"unet": 2}, None, f"{HEIGHT}x{WIDTH}")
    out = tmp_path_factory.mktemp("bundles") / "tiny-wide"
    return export_bundle(ExportRequest(str(tiny_model_dir), preset, out, progress=False, warm_cache=False))


@pytest.fixture(scope="module")
def wide(wide_bundle: Path) -> Pipeline:
    return Pipeline.from_bundle(wide_bundle)


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tiny_model_dir, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def assert_each_close(expected: np.ndarray, actual: np.ndarray, n: int) -> None:
    assert actual.shape == expected.shape == (n, HEIGHT, WIDTH, 3)
    for i in range(n):
        assert compare(expected[i], actual[i]).psnr_db >= TOL["pipeline_min_psnr_db"], f"image {i}"
    assert compare(actual[0], actual[1]).psnr_db < 30, "the images of one prompt must differ (their own noise)"


@pytest.mark.parametrize("scheduler,cls", [("euler", "EulerDiscreteScheduler"),
                                           ("euler_a", "EulerAncestralDiscreteScheduler")])
def test_non_square_txt2img_with_two_images_matches_diffusers(reference, wide: Pipeline, scheduler, cls):
    config = dict(reference.scheduler.config)
    reference.scheduler = getattr(diffusers, cls).from_config(config)
    try:
        expected = reference(PROMPT, negative_prompt=NEGATIVE, height=HEIGHT, width=WIDTH, num_inference_steps=8,
                             guidance_scale=7.0, num_images_per_prompt=2, generator=torch.Generator().manual_seed(5),
                             output_type="np").images
    finally:
        reference.scheduler = diffusers.PNDMScheduler.from_config(config)
    actual = wide(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=8, guidance_scale=7.0, scheduler=scheduler,
                  num_images_per_prompt=2, generator=TorchNoise(5), output_type="np")
    assert_each_close(expected, actual, 2)


def test_non_square_img2img_with_two_images_matches_diffusers(reference, wide: Pipeline):
    from PIL import Image

    img2img = diffusers.StableDiffusionImg2ImgPipeline(**reference.components)
    img2img.scheduler = diffusers.EulerDiscreteScheduler.from_config(reference.scheduler.config)
    img2img.set_progress_bar_config(disable=True)
    init = Image.fromarray(np.linspace(0, 255, HEIGHT * WIDTH * 3).reshape(HEIGHT, WIDTH, 3).astype(np.uint8))
    expected = img2img(PROMPT, image=init, strength=0.7, num_inference_steps=10, guidance_scale=6.0,
                       num_images_per_prompt=2, generator=torch.Generator().manual_seed(4), output_type="np").images
    actual = wide(PROMPT, image=init, strength=0.7, num_inference_steps=10, guidance_scale=6.0, scheduler="euler",
                  num_images_per_prompt=2, generator=TorchNoise(4), output_type="np")
    assert_each_close(expected, actual, 2)


def test_pil_output_is_a_list_of_images(wide: Pipeline):
    images = wide(PROMPT, num_inference_steps=2, seed=1, num_images_per_prompt=3)
    assert [im.size for im in images] == [(WIDTH, HEIGHT)] * 3
    single = wide(PROMPT, num_inference_steps=2, seed=1)
    assert single.size == (WIDTH, HEIGHT)


@pytest.mark.parametrize("n", [0, -1, 65, 2.0, True, "2"])
def test_bad_image_counts_are_refused(wide: Pipeline, n):
    with pytest.raises(GenerateError, match="num_images_per_prompt must be an integer from 1 to 64"):
        wide(PROMPT, num_inference_steps=2, seed=1, num_images_per_prompt=n)


def test_cli_num_images_writes_one_png_each(wide_bundle: Path, wide: Pipeline, tmp_path: Path):
    out = tmp_path / "pic.png"
    assert main(["generate", str(wide_bundle), "--prompt", PROMPT, "--steps", "3", "--seed", "9", "--num-images",
                 "2", "--quiet", "--out", str(out)]) == 0
    expected = wide(PROMPT, num_inference_steps=3, seed=9, num_images_per_prompt=2)
    from PIL import Image

    for index, want in enumerate(expected, start=1):
        path = tmp_path / f"pic-{index}.png"
        with Image.open(path) as got:
            assert np.array_equal(np.asarray(got), np.asarray(want)), path
        params = read_png_params(path)
        assert params["image_index"] == index and params["num_images"] == 2 and params["seed"] == 9
    assert not out.exists()
