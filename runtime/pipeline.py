"""txt2img and img2img over a bundle, in the diffusers style, with numpy + onnxruntime (or OpenVINO) only.

    pipe = Pipeline.from_bundle("sd15-cpu")
    image = pipe("a lighthouse at dusk", num_inference_steps=20, seed=1)

The steps follow ``diffusers.StableDiffusionPipeline`` / ``StableDiffusionImg2ImgPipeline`` operation for operation
(prompt encoding, classifier-free guidance, scheduler loop, VAE scaling, image post-processing), so the same initial
noise gives the same picture. Random draws come from a ``NoiseSource`` (a numpy Generator seeded by ``seed``), in the
same order and shapes as diffusers draws them.
"""

from __future__ import annotations

import gc
import logging
import secrets
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from pocketsd.contract import MAX_IMAGES, UNET_IO, VAE_DECODER_IO, VAE_ENCODER_IO
from pocketsd.errors import BundleError, GenerateError
from pocketsd.heap import trimmer
from pocketsd.runtime.chain import ComponentRunner
from pocketsd.runtime.conditioning import Encoded, TextConditioning, is_lcm
from pocketsd.runtime.execution import (
    check_memory,
    check_streamable,
    chunk_opener,
    component_opener,
    default_memory,
    make_policy,
)
from pocketsd.runtime.images import image_to_array, to_pil
from pocketsd.runtime.inpaint import Inpainting, latent_mask, mask_to_array
from pocketsd.runtime.json_fields import Field
from pocketsd.runtime.manifest import MANIFEST_NAME, Manifest, load_manifest
from pocketsd.runtime.per_row import equal_rows_together
from pocketsd.runtime.request_checks import check_for_generation, check_request, finite
from pocketsd.runtime.schedulers import NoiseSource, make_scheduler
from pocketsd.runtime.sessions import SessionOptions, check_engine, open_workers, verify_chunk, verify_in_background
from pocketsd.runtime.tiling import TileIO, call_tiled, decoder_head

log = logging.getLogger(__name__)

# diffusers scheduler classes → our numpy ports; a bundle's own scheduler is the default, as in diffusers.
DEFAULT_SCHEDULERS = {
    "PNDMScheduler": "pndm", "DDIMScheduler": "ddim", "EulerDiscreteScheduler": "euler",
    "EulerAncestralDiscreteScheduler": "euler_a", "DPMSolverMultistepScheduler": "dpmpp_2m", "LCMScheduler": "lcm",
    "HeunDiscreteScheduler": "heun", "LMSDiscreteScheduler": "lms",
    "UniPCMultistepScheduler": "unipc",
}
StepCallback = Callable[[int, int, np.ndarray], None]  # (step done, steps in total, latents)


class Pipeline:
    def __init__(self, bundle_dir: Path, manifest: Manifest, options: SessionOptions,
                 memory: str = "resident") -> None:
        """``memory``: when chunk sessions are opened and released (runtime/execution.py): resident (all kept),
        stream (one alive at a time) or prefetch (stream, with the next chunk opened in the background)."""
        check_streamable(manifest, check_memory(memory))  # before any work
        check_engine(options.engine, (c.format for comp in manifest.components.values() for c in comp.chunks))
        self.bundle_dir = Path(bundle_dir)
        self.manifest = manifest
        self.memory = memory
        self.decoder_head = decoder_head(manifest)  # checked at load, not after the last denoising step
        self.options = replace(options, transient=memory != "resident")
        self.policy = make_policy(memory, chunk_opener(self.bundle_dir, self.options), self.options.low_memory,
                                  open_workers(self.bundle_dir, self.options),
                                  component_opener(self.bundle_dir, self.options))
        self._runners: dict[str, ComponentRunner] = {}
        self.text = TextConditioning(self.bundle_dir, manifest, self.runner, self._expect)
        self.tokenizer = self.text.tokenizer
        # every chunk's files are checked from now on, on a background thread, ahead of the opens that need them
        verify_in_background(self.bundle_dir, [c for comp in manifest.components.values() for c in comp.chunks],
                             self.options)

    @classmethod
    def from_bundle(cls, path: str | Path, *, threads: int | None = None, low_memory: bool | None = None,
                    compute_units: str | None = None, memory: str | None = None,
                    engine: str = "onnxruntime") -> "Pipeline":
        """``memory`` defaults to the bundle's preset (``runtime.memory``), else resident. ``engine`` runs the ONNX
        chunks: onnxruntime, openvino (the ``[openvino]`` extra), or openvino-bf16 (OpenVINO in bfloat16)."""
        manifest = load_manifest(path)
        config = Field(manifest.target, str(Path(path) / MANIFEST_NAME), "target").key("config", {})
        runtime = config.key("runtime", {})
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 0):
            raise GenerateError(f"threads must be an integer ≥ 0, got {threads!r}", "0 uses every core")
        options = SessionOptions(
            threads=runtime.key("threads", 0).int() if threads is None else threads,
            low_memory=runtime.key("low_memory", False).bool() if low_memory is None else bool(low_memory),
            compute_units=compute_units or config.key("coreml", {}).key("compute_units", "all").str(),
            engine=engine,
        )
        if memory is None:  # the preset's, unless the bundle is too large to keep open here (execution.py)
            memory = default_memory(manifest, check_memory(runtime.key("memory", "resident").str(), BundleError))
        return cls(Path(path), manifest, options, memory)

    def close(self) -> None:
        """Release every chunk session now (as garbage collection would), and give the freed memory back to the
        system; the pipeline cannot generate after.

        Without the trim, a pipeline opened after another was closed in the same process ran its UNet slower: glibc
        kept the first one's freed heap, and the second one's weights were laid out in it. SD 1.5 at 256², OpenVINO
        bf16, a worker process loading twice against plain OpenVINO on the same file, 16 alternating rounds: 0.971×
        as fast, 1.001× with the trim (0.999× loading once)."""
        self.policy.close()
        self._runners.clear()
        gc.collect()  # sessions still held by a reference cycle go now, before the trim
        trimmer()()

    @property
    def default_scheduler(self) -> str:
        """The bundle's own scheduler where we have a port of it (as diffusers does), else Euler."""
        return DEFAULT_SCHEDULERS.get(str(self.manifest.scheduler.get("class_name")), "euler")

    # -- components ------------------------------------------------------------------------------------------------
    def runner(self, component_id: str) -> ComponentRunner:
        """The component's chain of chunks. Resident: its sessions are opened (and hash-checked) here, once; stream
        and prefetch open each chunk when it runs (its files are still hash-checked only once per process)."""
        if component_id not in self._runners:
            self._runners[component_id] = ComponentRunner(self.manifest.component(component_id), self.policy)
        return self._runners[component_id]

    def _expect(self, component_id: str | None) -> None:
        """Tell the policy what the pipeline needs after the component that runs next (prefetch opens it early)."""
        self.policy.hint(self.manifest.component(component_id).chunks[0] if component_id else None)

    def verify(self) -> None:
        """Check every chunk file of every component against the manifest's sha256 now, not on first use."""
        for component in self.manifest.components.values():
            for chunk in component.chunks:
                verify_chunk(self.bundle_dir, chunk, self.options.disk_cache)

    def encode_prompt(self, prompt: str) -> np.ndarray:
        """Text states (1, S, C) for one prompt, as the UNet takes them (SDXL: both encoders' states)."""
        return self.text.encode(prompt).states

    def unet_context(self, states: np.ndarray) -> np.ndarray:
        """Text states (B, S, C) in the layout the bundle's UNet takes: Apple's (B, C, 1, S) where it says so."""
        return self.text.unet_layout(states)

    def unet(self, sample: np.ndarray, timestep: float, context: np.ndarray | dict[str, np.ndarray]) -> np.ndarray:
        """One model call for every row of ``sample``: as many calls as the exported UNet batch needs. A batch-2
        UNet without guidance (one row) gets the row twice and its first output kept. ``context``: the text states
        in the UNet's layout (``unet_context``), or every conditioning input by name, one row per sample row
        (``TextConditioning.unet_inputs``: SDXL adds ``text_embeds`` and ``time_ids``). Under stream/prefetch the
        calls run chunk-major, so each chunk is opened once per step, not once per call; the results are the same."""
        batch = int(self.manifest.dims["unet_batch"])
        runner = self.runner("unet")
        t = np.full((batch,), timestep, dtype=np.float32)
        conditioning = context if isinstance(context, dict) else {UNET_IO.encoder_hidden_states: context}
        if any(chunk.per_row for chunk in runner.component.chunks):  # equal rows into one call (runtime/per_row.py)
            order = equal_rows_together(sample)
            if (order != np.arange(len(order))).any():
                noise = self.unet(sample[order], timestep, {k: v[order] for k, v in conditioning.items()})
                return noise[np.argsort(order)]
        feeds = []
        for start in range(0, sample.shape[0], batch):
            rows = np.arange(start, start + batch).clip(max=sample.shape[0] - 1)
            feeds.append({UNET_IO.sample: np.ascontiguousarray(sample[rows]), UNET_IO.timestep: t,
                          **{name: np.ascontiguousarray(value[rows]) for name, value in conditioning.items()}})
        calls = runner.run_many(feeds) if self.policy.chunk_major else [runner(**f) for f in feeds]
        outputs = [out[UNET_IO.noise_pred][: min(batch, sample.shape[0] - start)]
                   for out, start in zip(calls, range(0, sample.shape[0], batch))]
        return np.concatenate(outputs, axis=0)

    # -- generation ------------------------------------------------------------------------------------------------
    def __call__(self, prompt: str, negative_prompt: str | None = None, num_inference_steps: int = 20,
                 guidance_scale: float = 7.5, scheduler: str | None = None, seed: int | None = None,
                 latents: np.ndarray | None = None, image: Any = None, strength: float | None = None, *,
                 mask_image: Any = None, generator: NoiseSource | None = None, callback: StepCallback | None = None,
                 output_type: str = "pil", num_images_per_prompt: int = 1) -> Any:
        """Generate one image, or a list of ``num_images_per_prompt`` images from one prompt (their latents drawn
        as one batch and denoised together, as diffusers does). ``image`` switches to img2img (then ``latents`` is
        ignored and ``strength`` used, 0.8 by default); ``image`` and ``mask_image`` to inpainting (white in the mask
        is repainted; ``strength`` 1.0 by default), which an inpainting bundle requires (runtime/inpaint.py).

        ``seed`` seeds a numpy generator (drawn at random and recorded when omitted); ``generator`` replaces it with
        any object that has ``standard_normal(shape, dtype)``. ``output_type``: ``pil`` or ``np`` (float32 HWC in
        [0, 1]; several images: one NHWC array). ``callback(step, total, latents)`` runs after every step."""
        if output_type not in ("pil", "np"):
            raise GenerateError(f"unknown output_type {output_type!r}", "use 'pil' or 'np'")
        n = num_images_per_prompt
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= MAX_IMAGES:
            raise GenerateError(f"num_images_per_prompt must be an integer from 1 to {MAX_IMAGES}, got {n!r}")
        if strength is None:
            strength = 1.0 if mask_image is not None else 0.8
        check_request(prompt, negative_prompt, guidance_scale, seed, strength if image is not None else None)
        uses_mask_channels = self._check_inpainting(image, mask_image)
        check_for_generation(self.manifest, str(self.bundle_dir / MANIFEST_NAME))
        sched = make_scheduler(scheduler or self.default_scheduler, self.manifest.scheduler["config"])
        schedule = sched.set_timesteps(num_inference_steps)  # a bad step count fails before any chunk runs
        if generator is None:
            generator = np.random.default_rng(secrets.randbelow(2**31) if seed is None else int(seed))
        # an LCM UNet takes the guidance scale as an input (TextConditioning.unet_inputs), not as a second batch
        guided = guidance_scale > 1.0 and not is_lcm(self.manifest)
        after_text = "unet" if image is None else "vae_encoder"
        # the prefetch policy is told what comes next: the text encoder(s) again for the negative prompt, or after
        again = guided and self.text.encodes_negative(negative_prompt)
        cond = self.text.encode(prompt, then=self.text.encoders[0] if again else after_text)
        rows = [_finite_text(cond, "")]
        if guided:
            rows.insert(0, _finite_text(self.text.negative(negative_prompt, cond, then=after_text),
                                        " for the negative prompt"))
        d = self.manifest.dims
        context = self.text.unet_inputs(rows, n, int(d["height"]), int(d["width"]), float(guidance_scale))
        if image is not None:
            start = schedule.start_index(strength)
            if start >= len(schedule.timesteps):
                raise GenerateError(f"strength {strength} with {num_inference_steps} steps leaves no step to run",
                                    "raise --strength or --steps")
            if mask_image is None:
                x = self._img2img_latents(image, sched, schedule, start, generator, n)
            else:
                x, inpaint = self._inpaint_latents(image, mask_image, sched, schedule, start, generator, n,
                                                   strength == 1.0, uses_mask_channels, guided)
        else:
            start = 0
            x = finite(self._initial_latents(latents, generator, n), "before the first step", "the initial noise")
            x = x * np.float32(schedule.init_noise_sigma)
        if mask_image is None:
            inpaint = None
        state = sched.initial_state()
        total = len(schedule.timesteps) - start
        for done, i in enumerate(range(start, len(schedule.timesteps)), start=1):
            model_in = sched.scale_model_input(schedule, x, i)
            if done == total:
                self._expect(self.decoder_head.id if self.decoder_head is not None else "vae_decoder")
            sample = np.concatenate([model_in] * 2) if guided else model_in
            if inpaint is not None:
                sample = inpaint.unet_input(sample)
            noise = self.unet(sample, schedule.timesteps[i], context)
            if guided:
                noise_uncond, noise_text = np.split(noise, 2)
                noise = noise_uncond + np.float32(guidance_scale) * (noise_text - noise_uncond)
            # NaN or inf here would run on silently and come out as a black or noise image: name the step instead
            # (np.isfinite over the latents: microseconds against a UNet call)
            finite(noise, f"step {done} of {total}", "the UNet output")
            x, state = sched.step(schedule, noise, i, x, state, generator)
            if inpaint is not None:
                x = inpaint.blend(sched, schedule, x, i)
            finite(x, f"step {done} of {total}", f"the {sched.__class__.__name__} update of the latents")
            if callback is not None:
                callback(done, total, x)
        images = []
        for row in range(n):  # gives prefetch its hints: the decoder again until the last image
            pixels = self.decode(x[row:row + 1], then="vae_decoder" if row < n - 1 else None)
            images.append(finite(pixels, "after the last step", "the VAE decoder output"))
        self.policy.release()
        if output_type == "np":
            return images[0] if n == 1 else np.stack(images)
        return to_pil(images[0]) if n == 1 else [to_pil(i) for i in images]

    def _latent_shape(self, n: int = 1) -> tuple[int, int, int, int]:
        d = self.manifest.dims
        return n, d["latent_channels"], d["latent_height"], d["latent_width"]

    def _initial_latents(self, latents: np.ndarray | None, generator: NoiseSource, n: int) -> np.ndarray:
        shape = self._latent_shape(n)
        if latents is None:
            return np.asarray(generator.standard_normal(shape, dtype=np.float32), dtype=np.float32)
        latents = np.asarray(latents, dtype=np.float32)
        if latents.shape != shape:
            raise GenerateError(f"latents have shape {list(latents.shape)}, the bundle needs {list(shape)}")
        return latents

    def _encode(self, pixels: np.ndarray, generator: NoiseSource, then: str) -> np.ndarray:
        """Image → scaled latents, sampled from the VAE's distribution (one draw from ``generator``)."""
        io = TileIO(VAE_ENCODER_IO.x, VAE_ENCODER_IO.latent, int(self.manifest.dims["vae_scale_factor"]), 1)
        moments = self._call_vae("vae_encoder", pixels, io, then=then)
        mean, logvar = np.split(moments, 2, axis=1)
        # diffusers' DiagonalGaussianDistribution: clamp the log-variance, std = exp(logvar / 2)
        std = np.exp(0.5 * np.clip(logvar, -30.0, 20.0)).astype(np.float32)
        eps = np.asarray(generator.standard_normal(mean.shape, dtype=np.float32), dtype=np.float32)
        return (mean + std * eps) * np.float32(self.manifest.latent_scaling_factor)

    def _img2img_latents(self, image: Any, sched: Any, schedule: Any, start: int, generator: NoiseSource,
                         n: int) -> np.ndarray:
        d = self.manifest.dims
        init = self._encode(image_to_array(image, d["height"], d["width"]), generator, then="unet")
        init = np.concatenate([init] * n)  # one encoding of the image for every image made, as diffusers
        noise = np.asarray(generator.standard_normal(init.shape, dtype=np.float32), dtype=np.float32)
        return sched.add_noise(schedule, init, noise, start)

    def _check_inpainting(self, image: Any, mask_image: Any) -> bool:
        """Whether the UNet takes the mask as input channels; refuses a request that does not fit the bundle."""
        d = self.manifest.dims
        uses_channels = int(d.get("unet_in_channels", d["latent_channels"])) != int(d["latent_channels"])
        if uses_channels and (image is None or mask_image is None):
            raise GenerateError("this bundle's UNet is an inpainting UNet: it needs an image and a mask",
                                "pass image= and mask_image= (generate --init-image PNG --mask PNG)")
        if mask_image is not None and image is None:
            raise GenerateError("a mask needs the image it masks", "pass image= too (generate --init-image PNG)")
        return uses_channels

    def _inpaint_latents(self, image: Any, mask_image: Any, sched: Any, schedule: Any, start: int,
                         generator: NoiseSource, n: int, strength_max: bool,
                         uses_channels: bool, guided: bool) -> tuple[np.ndarray, Inpainting]:
        """Initial latents and the inpainting inputs, drawing from ``generator`` in diffusers' order: the image's
        latents (where needed), the noise, then the masked image's latents."""
        d = self.manifest.dims
        pixels = image_to_array(image, d["height"], d["width"])
        mask = mask_to_array(mask_image, d["height"], d["width"])
        image_latents = None
        if not uses_channels or not strength_max:
            image_latents = np.concatenate([self._encode(pixels, generator, then="vae_encoder")] * n)
        noise = np.asarray(generator.standard_normal(self._latent_shape(n), dtype=np.float32), dtype=np.float32)
        if strength_max:
            x = noise * np.float32(schedule.init_noise_sigma)
        else:
            x = sched.add_noise(schedule, image_latents, noise, start)
        masked = self._encode(pixels * (mask < 0.5), generator, then="unet")
        small = np.concatenate([latent_mask(mask, int(d["vae_scale_factor"]))] * n)
        extra = None
        if uses_channels:  # one row per UNet row, built once: [negative] * n + [prompt] * n when guided
            rows = np.concatenate([small, np.concatenate([masked] * n)], axis=1)
            extra = np.concatenate([rows] * 2) if guided else rows
        return x, Inpainting(small, extra, image_latents, noise)

    def _call_vae(self, component_id: str, x: np.ndarray, io: TileIO, then: str | None) -> np.ndarray:
        """A VAE component over ``x``, tiled as its manifest entry says (runtime/tiling.py). Before its last pass the
        prefetch hint is ``then``, the component that runs next; before a first of two passes, the VAE itself."""
        runner = self.runner(component_id)
        return call_tiled(runner.run_many, runner.component, x, io,
                          before_pass=lambda last: self._expect(then if last else component_id))

    def decode(self, latents: np.ndarray, then: str | None = None) -> np.ndarray:
        """Latents → float32 HWC image in [0, 1], as diffusers' VAE decode and image post-processing. A tiled
        decoder (runtime/tiling.py) runs once per tile, its tiles blended; with whole-image GroupNorm statistics,
        twice per tile."""
        scaled = (latents / np.float32(self.manifest.latent_scaling_factor)).astype(np.float32)
        decoder, head = self.manifest.component("vae_decoder"), self.decoder_head
        if head is not None:  # run whole, then its output is tiled (the tiling entry's ``head``)
            self._expect("vae_decoder")
            runner = self.runner(head.id)
            scaled = runner(**{head.inputs[0].name: scaled})[head.outputs[0].name]
        io = TileIO(decoder.inputs[0].name, VAE_DECODER_IO.image, 1, int(self.manifest.dims["vae_scale_factor"]))
        image = self._call_vae("vae_decoder", scaled, io, then=then)
        image = np.clip(image / 2 + 0.5, 0.0, 1.0)
        return np.transpose(image[0], (1, 2, 0)).astype(np.float32)


def _finite_text(encoded: Encoded, whose: str) -> Encoded:
    finite(encoded.states, "before the first step", f"the text encoder output{whose}")
    if encoded.pooled is not None:
        finite(encoded.pooled, "before the first step", f"the second text encoder's pooled output{whose}")
    return encoded
