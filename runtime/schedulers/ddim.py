"""DDIM (Song et al. 2020), a numpy port of diffusers' ``DDIMScheduler`` with ``eta = 0`` (deterministic).

Hand-written so the runtime never imports torch; every operation follows diffusers' order in float32.
"""

from __future__ import annotations

import numpy as np

from .base import NoiseSource, Schedule, Scheduler, State, as_f32, predict_x0_vp
from .registry import register
from .sigmas import spaced_timesteps, vp_add_noise


@register
class DDIM(Scheduler):
    name = "ddim"
    diffusers_class = "DDIMScheduler"

    def _schedule(self, num_inference_steps: int) -> Schedule:
        timesteps = np.round(spaced_timesteps(self.config, num_inference_steps)).astype(np.int64)
        return Schedule(timesteps=timesteps, sigmas=None, init_noise_sigma=1.0, num_inference_steps=num_inference_steps)

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
        timestep = int(schedule.timesteps[step_index])
        # diffusers steps back by the nominal ratio, whatever the spacing.
        prev_timestep = timestep - self.config.num_train_timesteps // schedule.num_inference_steps
        alpha_prod = self.alphas_cumprod[timestep]
        alpha_prod_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_prod = np.float32(1.0) - alpha_prod

        x0 = predict_x0_vp(self.config.prediction_type, model_output, sample, alpha_prod)
        if self.config.prediction_type == "epsilon":
            eps = model_output
        elif self.config.prediction_type == "sample":
            eps = (sample - np.sqrt(alpha_prod) * x0) / np.sqrt(beta_prod)
        else:
            eps = np.sqrt(alpha_prod) * model_output + np.sqrt(beta_prod) * sample
        if self.config.clip_sample:
            limit = self.config.clip_sample_range
            x0 = np.clip(x0, -limit, limit)

        direction = np.sqrt(np.float32(1.0) - alpha_prod_prev) * eps
        return np.sqrt(alpha_prod_prev) * x0 + direction, state

    def add_noise(self, schedule: Schedule, original: np.ndarray, noise: np.ndarray, step_index: int) -> np.ndarray:
        return vp_add_noise(self.alphas_cumprod, original, noise, schedule.timesteps[step_index])
