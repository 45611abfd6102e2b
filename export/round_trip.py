"""Round trip at export: one denoising step through the runtime, from the staging folder, before the rename.

Parity proves each component against PyTorch; it does not prove that the runtime can put them together: the
manifest's wiring between components, the UNet's context layout, the tiling entries, the scheduler. So the export
ends as ``generate`` begins: ``Pipeline`` (the runtime's own code, torch-free) opens the staged bundle, encodes a
prompt, makes ONE UNet call (guided where the UNet takes a batch of 2, so still one call), takes one scheduler step
and decodes the latents; the VAE encoder then encodes that image as img2img would. A bundle without the whole text
encoder → UNet → decoder path runs each of its components on its own (the UNet on seeded inputs of its declared
shapes). Every output must be finite. A failure raises (``InternalError`` naming the stage, with the runtime's error
as its cause; ``ParityError`` for non-finite values), the staging folder goes, nothing is written.

Cost: chunks are opened one at a time (memory ``stream``; CoreML, which cannot stream, resident), files hash-checked
against the manifest, no per-user cache touched (the staging path dies with the rename). On the tiny model it adds
well under a second; on SD 1.5 at 512² about one UNet call and one VAE decode (~7 s + ~6 s on 2 cores) plus opening
the chunks. CoreML chunks run only on macOS; elsewhere the round trip is skipped and the reason logged.
"""

from __future__ import annotations

import gc
import logging
import sys
import time
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np

from pocketsd.contract import UNET_IO, VAE_ENCODER_IO
from pocketsd.errors import BundleError, InternalError, ParityError, UserError
from pocketsd.runtime.execution import check_streamable
from pocketsd.runtime.manifest import Manifest, TensorSpec
from pocketsd.runtime.pipeline import Pipeline
from pocketsd.runtime.schedulers import make_scheduler
from pocketsd.runtime.sessions import SessionOptions
from pocketsd.runtime.tiling import TileIO, call_tiled

log = logging.getLogger(__name__)
PROMPT = "a lighthouse at dusk"
STEPS = 20  # the schedule generate uses by default; only its first step runs
GUIDANCE = 7.5
_PIPELINE_PATH = ("text_encoder", "unet", "vae_decoder")
T = TypeVar("T")


def not_runnable(manifest: Manifest) -> str | None:
    """Why the bundle's chunks cannot run on this machine, or None."""
    formats = {c.format for comp in manifest.components.values() for c in comp.chunks}
    if "mlpackage" in formats and sys.platform != "darwin":
        return "CoreML chunks run only on macOS"
    return None


def round_trip(bundle_dir: Path, manifest: Manifest) -> float | None:
    """Run one step of the bundle through the runtime; returns the seconds it took, or None where it cannot run."""
    reason = not_runnable(manifest)
    if reason is not None:
        log.info("round trip skipped: %s", reason)
        return None
    started = time.perf_counter()
    runtime = manifest.target.get("config", {}).get("runtime", {})
    options = SessionOptions(threads=int(runtime.get("threads", 0)), low_memory=bool(runtime.get("low_memory")),
                             compute_units="cpu_only", disk_cache=False)
    pipe = _stage("opening the bundle", lambda: Pipeline(bundle_dir, manifest, options, _memory(manifest)))
    try:
        outputs = _run_all(pipe, manifest)
    finally:
        pipe.close()
        del pipe
        gc.collect()
    bad = [name for name, value in outputs.items() if not np.isfinite(value).all()]
    if bad:
        raise ParityError(f"one step through the runtime gives non-finite values in {', '.join(bad)}",
                          "the chunks pass parity on the export inputs but overflow in use; for an fp16 preset "
                          "try precision fp32, or report it")
    seconds = time.perf_counter() - started
    log.info("round trip: one step through the runtime in %.2f s", seconds)
    return seconds


def _stage(what: str, run: Callable[[], T]) -> T:
    try:
        return run()
    except Exception as exc:  # noqa: BLE001 - any failure means the bundle cannot generate: say where, keep the cause
        text = exc.one_line() if isinstance(exc, UserError) else f"{type(exc).__name__}: {' '.join(str(exc).split())}"
        raise InternalError(f"the bundle this export wrote cannot generate: {what} failed: {text[:400]}") from exc


def _memory(manifest: Manifest) -> str:
    """One chunk alive at a time where the backend can (ONNX): the step's peak stays that of the largest chunk."""
    try:
        check_streamable(manifest, "stream")
    except BundleError:
        return "resident"
    return "stream"


def _run_all(pipe: Pipeline, manifest: Manifest) -> dict[str, np.ndarray]:
    """Every component once: the txt2img path as one step where the bundle has it, else each on its own."""
    components, rng = manifest.components, np.random.default_rng(0)
    d = manifest.dims
    latents = (1, int(d["latent_channels"]), int(d["latent_height"]), int(d["latent_width"]))
    outputs: dict[str, np.ndarray] = {}
    if all(c in components for c in _PIPELINE_PATH):
        outputs["image"] = _stage("one step (text encoder → UNet → scheduler → VAE decoder)",
                                  lambda: _one_step(pipe, manifest, latents, rng))
    else:
        if "text_encoder" in components:
            outputs["text_encoder"] = _stage("text_encoder", lambda: pipe.encode_prompt(PROMPT))
        if "unet" in components:
            runner = pipe.runner("unet")
            feeds = {s.name: _example(s, rng) for s in runner.component.inputs}
            outputs["unet"] = _stage("unet", lambda: runner(**feeds)[UNET_IO.noise_pred])
        if "vae_decoder" in components:
            z = rng.standard_normal(latents, dtype=np.float32)
            outputs["image"] = _stage("vae_decoder", lambda: pipe.decode(z))
    if "vae_encoder" in components:
        image = outputs.get("image", rng.uniform(size=(int(d["height"]), int(d["width"]), 3)))
        outputs["vae_encoder"] = _stage("vae_encoder", lambda: _encode(pipe, manifest, image))
    return outputs


def _one_step(pipe: Pipeline, manifest: Manifest, latents: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """``Pipeline.__call__``'s first step and its decode, as one UNet call: guided where the UNet takes a batch of 2
    (both rows in the one call it makes anyway), unguided where it takes 1."""
    guided = int(manifest.dims["unet_batch"]) == 2
    sched = make_scheduler(pipe.default_scheduler, manifest.scheduler["config"])
    schedule = sched.set_timesteps(STEPS)
    cond = pipe.text.encode(PROMPT)
    rows = [pipe.text.negative(None, cond, then="unet"), cond] if guided else [cond]
    context = pipe.text.unet_inputs(rows, 1, int(manifest.dims["height"]), int(manifest.dims["width"]))
    x = rng.standard_normal(latents, dtype=np.float32) * np.float32(schedule.init_noise_sigma)
    model_in = sched.scale_model_input(schedule, x, 0)
    extra = int(manifest.dims.get("unet_in_channels", latents[1])) - latents[1]
    if extra:  # an inpainting UNet: a mask and masked-image latents as its extra channels
        model_in = np.concatenate([model_in, rng.standard_normal((1, extra, *latents[2:]), dtype=np.float32)], axis=1)
    noise = pipe.unet(np.concatenate([model_in] * 2) if guided else model_in, schedule.timesteps[0], context)
    if guided:
        uncond, text = np.split(noise, 2)
        noise = uncond + np.float32(GUIDANCE) * (text - uncond)
    x, _state = sched.step(schedule, noise, 0, x, sched.initial_state(), rng)
    return pipe.decode(x)


def _encode(pipe: Pipeline, manifest: Manifest, image: np.ndarray) -> np.ndarray:
    """The VAE encoder as img2img calls it (``Pipeline._img2img_latents``): tiled as its manifest entry says."""
    pixels = np.ascontiguousarray((np.asarray(image, dtype=np.float32) * 2 - 1).transpose(2, 0, 1)[None])
    runner = pipe.runner("vae_encoder")
    io = TileIO(VAE_ENCODER_IO.x, VAE_ENCODER_IO.latent, int(manifest.dims["vae_scale_factor"]), 1)
    return call_tiled(runner.run_many, runner.component, pixels, io)


def _example(spec: TensorSpec, rng: np.random.Generator) -> np.ndarray:
    if spec.dtype.startswith("float"):
        return rng.standard_normal(spec.shape).astype(spec.dtype)
    return np.zeros(spec.shape, dtype=spec.dtype)  # token ids
