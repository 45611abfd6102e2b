"""Heun (Karras et al. 2022, Algorithm 2 without churn), a numpy port of diffusers' ``HeunDiscreteScheduler``.

A second-order sampler: every step but the first calls the UNet twice, so its schedule repeats each timestep after
the first (``order = 2``), as diffusers' does. The first call of a pair takes an Euler step and remembers its slope;
the second corrects it with the mean of both slopes from the remembered sample. Ported with diffusers' defaults for
the sampler settings (default sigmas, no churn); hand-written because the runtime never imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import NoiseSource, Schedule, State, as_f32
from .euler import Euler
from .registry import register


@dataclass(frozen=True, eq=False)
class FirstHalf:
    """What the first call of a pair leaves for the second: its slope, its sigma step and the sample it started from."""

    derivative: np.ndarray
    dt: np.float32
    sample: np.ndarray


@register
class Heun(Euler):
    name = "heun"
    diffusers_class = "HeunDiscreteScheduler"
    order = 2

    def _schedule(self, num_inference_steps: int) -> Schedule:
        single = super()._schedule(num_inference_steps)
        t, s = single.timesteps, single.sigmas
        return Schedule(
            timesteps=np.concatenate([t[:1], np.repeat(t[1:], 2)]),
            sigmas=np.concatenate([s[:1], np.repeat(s[1:-1], 2), s[-1:]]),
            init_noise_sigma=single.init_noise_sigma,
            num_inference_steps=num_inference_steps,
            order=2,
        )

    def _x0(self, model_output: np.ndarray, sample: np.ndarray, sigma: np.float32) -> np.ndarray:
        x0 = self.predict_x0(model_output, sample, sigma)
        if self.config.clip_sample:
            limit = np.float32(self.config.clip_sample_range)
            x0 = np.clip(x0, -limit, limit)
        return x0

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
        sigmas = schedule.sigmas
        if not isinstance(state, FirstHalf):  # first call of a pair: an Euler step, remembered
            sigma = sigmas[step_index]
            derivative = (sample - self._x0(model_output, sample, sigma)) / sigma
            dt = sigmas[step_index + 1] - sigma
            return sample + derivative * dt, FirstHalf(derivative, dt, sample)
        sigma_next = sigmas[step_index]  # second call: the slope at the Euler step's end, averaged with the first
        derivative = (sample - self._x0(model_output, sample, sigma_next)) / sigma_next
        derivative = (state.derivative + derivative) / np.float32(2)
        return state.sample + derivative * state.dt, ()
