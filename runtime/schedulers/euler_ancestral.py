"""Euler ancestral, a numpy port of diffusers' ``EulerAncestralDiscreteScheduler``.

Hand-written so the runtime never imports torch. Same timesteps, sigmas and input scaling as Euler; each step goes
down to ``sigma_down`` deterministically and adds fresh noise of scale ``sigma_up``. Like diffusers it draws one
noise tensor of the model output's shape at every step, the last one included (where ``sigma_up`` is 0).
"""

from __future__ import annotations

import numpy as np

from .base import NoiseSource, Schedule, State, as_f32, draw_noise
from .euler import Euler
from .registry import register


@register
class EulerAncestral(Euler):
    name = "euler_a"
    diffusers_class = "EulerAncestralDiscreteScheduler"
    prediction_types = ("epsilon", "v_prediction")  # diffusers raises NotImplementedError for "sample"

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
        sigma_from = schedule.sigmas[step_index]
        sigma_to = schedule.sigmas[step_index + 1]
        x0 = self.predict_x0(model_output, sample, sigma_from)

        from_sq, to_sq = sigma_from * sigma_from, sigma_to * sigma_to
        sigma_up = np.sqrt(to_sq * (from_sq - to_sq) / from_sq)
        sigma_down = np.sqrt(to_sq - sigma_up * sigma_up)
        derivative = (sample - x0) / sigma_from
        prev_sample = sample + derivative * (sigma_down - sigma_from)
        noise = draw_noise(generator, model_output, self.name)
        return prev_sample + noise * sigma_up, state
