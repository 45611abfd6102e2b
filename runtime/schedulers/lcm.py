"""Latent Consistency Model sampling (Luo et al. 2023), a numpy port of diffusers' ``LCMScheduler``.

Hand-written so the runtime never imports torch. Timesteps are a subset of the ``original_inference_steps``-long
distillation schedule (``timestep_spacing`` does not apply). Each step predicts x0 through the consistency
boundary condition, then re-noises it to the next timestep with fresh noise; like diffusers it draws one noise
tensor of the model output's shape at every step except the last.
"""

from __future__ import annotations

import numpy as np

from pocketsd.errors import GenerateError

from .base import NoiseSource, Schedule, Scheduler, State, as_f32, draw_noise, predict_x0_vp
from .registry import register
from .sigmas import vp_add_noise

_SIGMA_DATA = np.float32(0.5)


@register
class LCM(Scheduler):
    name = "lcm"
    diffusers_class = "LCMScheduler"

    def _schedule(self, num_inference_steps: int) -> Schedule:
        original_steps = self.config.original_inference_steps
        n_train = self.config.num_train_timesteps
        if original_steps > n_train or num_inference_steps > original_steps:
            raise GenerateError(
                f"LCM can take at most {min(original_steps, n_train)} steps, got {num_inference_steps}",
                hint="its timesteps are a subset of the original_inference_steps-long distillation schedule",
            )
        k = n_train // original_steps
        origin = (np.arange(1, original_steps + 1) * k - 1)[::-1]
        indices = np.floor(np.linspace(0, len(origin), num=num_inference_steps, endpoint=False)).astype(np.int64)
        timesteps = origin[indices].astype(np.int64)
        return Schedule(timesteps=timesteps, sigmas=None, init_noise_sigma=1.0, num_inference_steps=num_inference_steps)

    def _boundary_scalings(self, timestep: int) -> tuple[np.float32, np.float32]:
        """``c_skip, c_out`` of the consistency boundary condition (diffusers' float32 arithmetic)."""
        scaled = np.float32(timestep) * np.float32(self.config.timestep_scaling)
        sigma_data_sq = _SIGMA_DATA * _SIGMA_DATA
        denom = scaled * scaled + sigma_data_sq
        return sigma_data_sq / denom, scaled / np.sqrt(denom)

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
        timesteps = schedule.timesteps
        timestep = int(timesteps[step_index])
        prev_timestep = int(timesteps[step_index + 1]) if step_index + 1 < len(timesteps) else timestep
        alpha_prod = self.alphas_cumprod[timestep]
        alpha_prod_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod

        x0 = predict_x0_vp(self.config.prediction_type, model_output, sample, alpha_prod)
        if self.config.clip_sample:
            limit = self.config.clip_sample_range
            x0 = np.clip(x0, -limit, limit)
        c_skip, c_out = self._boundary_scalings(timestep)
        denoised = c_out * x0 + c_skip * sample

        if step_index == schedule.num_inference_steps - 1:
            return denoised, state
        noise = draw_noise(generator, model_output, self.name)
        beta_prod_prev = np.float32(1.0) - alpha_prod_prev
        return np.sqrt(alpha_prod_prev) * denoised + np.sqrt(beta_prod_prev) * noise, state

    def add_noise(self, schedule: Schedule, original: np.ndarray, noise: np.ndarray, step_index: int) -> np.ndarray:
        return vp_add_noise(self.alphas_cumprod, original, noise, schedule.timesteps[step_index])
