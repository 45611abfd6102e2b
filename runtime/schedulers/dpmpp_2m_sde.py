"""DPM-Solver++(2M) SDE (Lu et al. 2022), a numpy port of diffusers' ``DPMSolverMultistepScheduler`` with
``algorithm_type="sde-dpmsolver++"`` (``solver_order=2``, ``solver_type="midpoint"``), with default or Karras sigmas.

The same multistep structure as ``dpmpp_2m`` (first order after a (re)start and at the last step, else second order
from the previous data prediction), with the stochastic update: every step draws one standard normal tensor, as
diffusers' ``step`` does, and adds ``sigma_t * sqrt(1 - exp(-2h))`` of it. Hand-written because the runtime never
imports torch; every expression keeps diffusers' operation order in float32.
"""

from __future__ import annotations

import numpy as np

from .base import NoiseSource, Schedule, as_f32, draw_noise
from .dpmpp_2m import DPMPP2M, DPMState, alpha_sigma, half_log_snr
from .registry import register

ONE, TWO = np.float32(1.0), np.float32(2.0)


@register
class DPMPP2MSDE(DPMPP2M):
    name = "dpmpp_2m_sde"

    def step(
        self,
        schedule: Schedule,
        model_output: np.ndarray,
        step_index: int,
        sample: np.ndarray,
        state: DPMState,
        generator: NoiseSource | None,
    ) -> tuple[np.ndarray, DPMState]:
        model_output, sample = as_f32(model_output), as_f32(sample)
        sigmas = schedule.sigmas
        x0 = self._data_prediction(model_output, sample, sigmas[step_index])
        noise = draw_noise(generator, model_output, self.name)
        alpha_t, sigma_t = alpha_sigma(sigmas[step_index + 1])
        alpha_s0, sigma_s0 = alpha_sigma(sigmas[step_index])
        h = half_log_snr(alpha_t, sigma_t) - half_log_snr(alpha_s0, sigma_s0)
        keep = sigma_t / sigma_s0 * np.exp(-h)
        towards = alpha_t * (ONE - np.exp(-TWO * h))
        spread = sigma_t * np.sqrt(ONE - np.exp(-TWO * h))
        last = step_index == len(schedule.timesteps) - 1
        if state.prev_x0 is None or last:
            prev_sample = keep * sample + towards * x0 + spread * noise
        else:
            alpha_s1, sigma_s1 = alpha_sigma(sigmas[step_index - 1])
            h_0 = half_log_snr(alpha_s0, sigma_s0) - half_log_snr(alpha_s1, sigma_s1)
            d1 = (ONE / (h_0 / h)) * (x0 - state.prev_x0)
            prev_sample = keep * sample + towards * x0 + np.float32(0.5) * towards * d1 + spread * noise
        return prev_sample, DPMState(prev_x0=x0)


@register
class DPMPP2MSDEKarras(DPMPP2MSDE):
    name = "dpmpp_2m_sde_karras"
    sigma_schedule = "karras"
