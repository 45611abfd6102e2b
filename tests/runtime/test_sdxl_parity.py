"""SDXL end to end against diffusers' ``StableDiffusionXLPipeline``, for every scheduler (parity tier: same folder,
same latents and noise).

The model is ``tiny-sdxl``: SDXL's family at the tiny size (two text encoders, the second with its projection and
``!`` as pad token; penultimate hidden states; a UNet with ``text_time`` added conditioning; Euler, leading
timesteps). Tolerance: ``TOL["pipeline_min_psnr_db"]`` on the decoded image.
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
from pocketsd.runtime.pipeline import Pipeline  # noqa: E402
from pocketsd.runtime.schedulers import available  # noqa: E402
from tests.runtime.test_pipeline_parity import NEGATIVE, PROMPT, TorchNoise  # noqa: E402
from tests.runtime.test_schedulers import DIFFUSERS  # noqa: E402


@pytest.fixture(scope="module")
def xl_exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return random_model_and_bundle("tiny-sdxl", tmp_path_factory)


@pytest.fixture(scope="module")
def xl_runtime(xl_exported) -> Pipeline:
    return Pipeline.from_bundle(xl_exported[1])


@pytest.fixture(scope="module")
def xl_reference(xl_exported):
    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(xl_exported[0])
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _latents(runtime: Pipeline, n: int = 1, seed: int = 21):
    d = runtime.manifest.dims
    return torch.randn((n, 4, d["latent_height"], d["latent_width"]), generator=torch.Generator().manual_seed(seed))


def _both(reference, runtime: Pipeline, scheduler: str | None = None, **kwargs) -> tuple[np.ndarray, np.ndarray]:
    """The same request through diffusers and the runtime; ``scheduler`` swaps diffusers' scheduler to its twin."""
    latents = kwargs.pop("latents")
    config = dict(reference.scheduler.config)
    if scheduler is not None:
        cls_name, overrides = DIFFUSERS[scheduler]
        reference.scheduler = getattr(diffusers, cls_name).from_config(config, **overrides)
    try:
        expected = reference(latents=latents.clone(), generator=torch.Generator().manual_seed(4), output_type="np",
                             **kwargs).images
    finally:
        reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(config)
    actual = runtime(latents=latents.numpy(), generator=TorchNoise(4), output_type="np", scheduler=scheduler,
                     **kwargs)
    return expected, actual


def test_the_model_is_sdxl_shaped(xl_reference, xl_runtime: Pipeline):
    assert xl_reference.unet.config.addition_embed_type == "text_time"
    assert xl_reference.tokenizer_2.pad_token == "!" and xl_reference.tokenizer.pad_token != "!"
    assert xl_reference.config.force_zeros_for_empty_prompt
    m = xl_runtime.manifest
    assert set(m.components) == {"text_encoder", "text_encoder_2", "unet", "vae_decoder", "vae_encoder"}
    assert {t.name for t in m.component("unet").inputs} >= {UNET_IO.text_embeds, UNET_IO.time_ids}
    assert m.dims["text_hidden"] == m.dims["text_hidden_1"] + m.dims["text_hidden_2"]
    assert m.latent_scaling_factor == pytest.approx(0.13025)
    assert xl_runtime.default_scheduler == "euler"
    assert sorted(DIFFUSERS) == sorted(available()), "every registered scheduler has a diffusers twin below"


@pytest.mark.parametrize("scheduler", sorted(DIFFUSERS))
def test_sdxl_txt2img_matches_diffusers(xl_reference, xl_runtime: Pipeline, scheduler: str):
    expected, actual = _both(xl_reference, xl_runtime, scheduler, prompt=PROMPT, negative_prompt=NEGATIVE,
                             num_inference_steps=6, guidance_scale=7.0, latents=_latents(xl_runtime))
    assert compare(expected[0], actual).psnr_db >= TOL["pipeline_min_psnr_db"]


def test_sdxl_without_negative_prompt_guides_against_zeros_as_diffusers(xl_reference, xl_runtime: Pipeline):
    expected, actual = _both(xl_reference, xl_runtime, prompt=PROMPT, num_inference_steps=4, guidance_scale=5.0,
                             latents=_latents(xl_runtime))
    assert compare(expected[0], actual).psnr_db >= TOL["pipeline_min_psnr_db"]
    # and that is not what the empty negative prompt gives
    _, with_empty = _both(xl_reference, xl_runtime, prompt=PROMPT, negative_prompt="", num_inference_steps=4,
                          guidance_scale=5.0, latents=_latents(xl_runtime))
    assert compare(actual, with_empty).psnr_db < TOL["pipeline_min_psnr_db"]


def test_sdxl_several_images_unguided_matches_diffusers(xl_reference, xl_runtime: Pipeline):
    """Turbo's way (one step, guidance off, as SDXL-Turbo runs), two images from one prompt."""
    expected, actual = _both(xl_reference, xl_runtime, "euler_a", prompt=PROMPT, num_inference_steps=1,
                             guidance_scale=0.0, num_images_per_prompt=2, latents=_latents(xl_runtime, 2))
    assert actual.shape == expected.shape
    for want, got in zip(expected, actual):
        assert compare(want, got).psnr_db >= TOL["pipeline_min_psnr_db"]


def test_sdxl_lora_fused_at_export_matches_diffusers(xl_exported, xl_runtime: Pipeline, tmp_path: Path):
    """A LoRA on the UNet and both text encoders (SDXL's diffusers layout), fused at export as ``fuse_lora``."""
    from pocketsd.cli import main
    from tests.export.test_lora import fuse_by_hand, make_sdxl_lora

    model = xl_exported[0]
    lora = make_sdxl_lora(model, tmp_path)

    reference = diffusers.StableDiffusionXLPipeline.from_pretrained(model)
    reference.set_progress_bar_config(disable=True)
    state, alphas = diffusers.StableDiffusionXLPipeline.lora_state_dict(str(lora))
    diffusers.StableDiffusionXLPipeline.load_lora_into_unet(state, alphas, reference.unet)
    reference.unet.fuse_lora(lora_scale=0.7)
    fuse_by_hand(reference.text_encoder, lora, 0.7)
    fuse_by_hand(reference.text_encoder_2, lora, 0.7, prefix="text_encoder_2")

    args = ["export", "--quiet", "--no-warm-cache", "--model", str(model), "--out", str(tmp_path / "b"),
            "--lora", f"{lora}:0.7"]
    assert main(args) == 0
    fused = Pipeline.from_bundle(tmp_path / "b")
    kwargs = dict(prompt=PROMPT, negative_prompt=NEGATIVE, num_inference_steps=3, guidance_scale=5.0,
                  latents=_latents(fused))
    expected, actual = _both(reference, fused, **kwargs)
    parity = compare(expected[0], actual).psnr_db
    assert parity >= TOL["pipeline_min_psnr_db"]
    plain = xl_runtime(**{**kwargs, "latents": _latents(fused).numpy()}, generator=TorchNoise(4), output_type="np")
    assert compare(plain, actual).psnr_db < parity - 10, "the LoRA must change the picture"


def test_sdxl_img2img_matches_diffusers(xl_reference, xl_runtime: Pipeline):
    from PIL import Image

    img2img = diffusers.StableDiffusionXLImg2ImgPipeline(**xl_reference.components)
    img2img.set_progress_bar_config(disable=True)
    d = xl_runtime.manifest.dims
    init = Image.fromarray(np.linspace(0, 255, d["height"] * d["width"] * 3).reshape(d["height"], d["width"], 3)
                           .astype(np.uint8))
    kwargs = dict(image=init, strength=0.6, negative_prompt=NEGATIVE, num_inference_steps=10, guidance_scale=6.0)
    expected = img2img(PROMPT, generator=torch.Generator().manual_seed(3), output_type="np", **kwargs).images[0]
    actual = xl_runtime(PROMPT, generator=TorchNoise(3), output_type="np", **kwargs)
    assert compare(expected, actual).psnr_db >= TOL["pipeline_min_psnr_db"]


@pytest.mark.parametrize("steps", [1, 4])
def test_sdxl_turbo_configuration_matches_diffusers(xl_exported, xl_reference, tmp_path: Path, steps: int):
    """SDXL-Turbo is SDXL's architecture with Euler ancestral on trailing timesteps, 1-4 steps, guidance off: the
    tiny-sdxl bundle with ``tiny-sdxl-turbo``'s scheduler config (what its export writes in the manifest)."""
    import json
    import shutil

    from pocketsd.export.random_model import builtin_configs

    turbo = builtin_configs("tiny-sdxl-turbo").scheduler
    bundle = tmp_path / "turbo"
    shutil.copytree(xl_exported[1], bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["scheduler"] = {"class_name": turbo["_class_name"], "config": turbo}
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    runtime = Pipeline.from_bundle(bundle)
    assert runtime.default_scheduler == "euler_a"
    config = dict(xl_reference.scheduler.config)
    xl_reference.scheduler = diffusers.EulerAncestralDiscreteScheduler.from_config(turbo)
    try:
        latents = _latents(runtime)
        expected = xl_reference(PROMPT, num_inference_steps=steps, guidance_scale=0.0, latents=latents.clone(),
                                generator=torch.Generator().manual_seed(4), output_type="np").images[0]
    finally:
        xl_reference.scheduler = diffusers.EulerDiscreteScheduler.from_config(config)
    actual = runtime(PROMPT, num_inference_steps=steps, guidance_scale=0.0, latents=latents.numpy(),
                     generator=TorchNoise(4), output_type="np")
    assert compare(expected, actual).psnr_db >= TOL["pipeline_min_psnr_db"]
