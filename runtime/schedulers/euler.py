"""Euler (Karras et al. 2022, Algorithm 2 without churn), a numpy port of diffusers' ``EulerDiscreteScheduler``.

Hand-written so the runtime never imports torch. Ported with diffusers' defaults for the sampler settings:
``interpolation_type="linear"``, default sigmas, ``final_sigmas_type="zero"`` and ``s_churn=0`` (no noise drawn).
"""

from __future__ import annotations

import numpy as np

from .base import NoiseSource, Schedule, Scheduler, State, as_f32
from .registry import register
from .sigmas import interp_sigmas, spaced_timesteps, train_sigmas


@register
class Euler(Scheduler):
    name = "euler"
    diffusers_class = "EulerDiscreteScheduler"

    def _schedule(self, num_inference_steps: int) -> Schedule:
        timesteps = spaced_timesteps(self.config, num_inference_steps).astype(np.float32)
        sigmas = interp_sigmas(train_sigmas(self.alphas_cumprod), timesteps)
        max_sigma = sigmas.max()
        if self.config.timestep_spacing == "leading":
            init_noise_sigma = np.sqrt(max_sigma * max_sigma + np.float32(1.0))
        else:
            init_noise_sigma = max_sigma
        return Schedule(
            timesteps=timesteps,
            sigmas=sigmas,
            init_noise_sigma=float(init_noise_sigma),
            num_inference_steps=num_inference_steps,
        )

    def scale_model_input(self, schedule: Schedule, sample: np.ndarray, step_index: int) -> np.ndarray:
        sigma = schedule.sigmas[step_index]
        return as_f32(sample) / np.sqrt(sigma * sigma + np.float32(1.0))

    def predict_x0(self, model_output: np.ndarray, sample: np.ndarray, sigma: np.float32) -> np.ndarray:
        """The denoised estimate at ``sigma``, in diffusers' operation order."""
        if self.config.prediction_type == "epsilon":
            return sample - sigma * model_output
        if self.config.prediction_type == "sample":
            return model_output
        sigma_sq_1 = sigma * sigma + np.float32(1.0)
        return model_output * (-sigma / np.sqrt(sigma_sq_1)) + sample / sigma_sq_1

    def step(
        self,
        schedule: Schedule,
        model_output: np.ndarray,
        step_index: int,
        sample: np.ndarray,
        state: State,
        generator: NoiseSource | None,
    ) -> tuple[np.ndarray, State]:
        model_output, sample = as_f32(model_output), as_f32(sample)
        sigma = schedule.sigmas[step_index]
        x0 = self.predict_x0(model_output, sample, sigma)
        derivative = (sample - x0) / sigma
        dt = schedule.sigmas[step_index + 1] - sigma
        return sample + derivative * dt, state

    def add_noise(self, schedule: Schedule, original: np.ndarray, noise: np.ndarray, step_index: int) -> np.ndarray:
        return as_f32(original) + as_f32(noise) * schedule.sigmas[step_index]
