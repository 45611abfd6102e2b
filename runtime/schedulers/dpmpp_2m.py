"""DPM-Solver++(2M) (Lu et al. 2022), a numpy port of diffusers' ``DPMSolverMultistepScheduler``.

Hand-written so the runtime never imports torch. Ported for ``algorithm_type="dpmsolver++"``, ``solver_order=2``,
``solver_type="midpoint"``, ``lower_order_final=True`` and ``final_sigmas_type="zero"``: the first step after a
(re)start and the last step are first order, the others second order using the previous step's data prediction,
which is the only state. ``sigma_schedule`` picks default (interpolated) or Karras sigmas; it is set by the id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .base import NoiseSource, Schedule, Scheduler, as_f32
from .registry import register
from .sigmas import SigmaSchedule, interp_sigmas, karras_sigmas, sigma_to_t, train_sigmas


@dataclass(frozen=True, eq=False)
class DPMState:
    prev_x0: np.ndarray | None = None  # data prediction of the previous step; None right after a (re)start


def alpha_sigma(sigma: np.float32) -> tuple[np.float32, np.float32]:
    """VP ``alpha_t, sigma_t`` from a Karras sigma (diffusers' ``_sigma_to_alpha_sigma_t``)."""
    alpha = np.float32(1.0) / np.sqrt(sigma * sigma + np.float32(1.0))
    return alpha, sigma * alpha


def half_log_snr(alpha: np.float32, sigma: np.float32) -> np.float32:
    """Half log-SNR; +inf at sigma 0 (the last step), which the first-order update handles as diffusers does."""
    with np.errstate(divide="ignore"):
        return np.log(alpha) - np.log(sigma)


@register
class DPMPP2M(Scheduler):
    name = "dpmpp_2m"
    diffusers_class = "DPMSolverMultistepScheduler"
    sigma_schedule: ClassVar[SigmaSchedule] = "default"

    def _schedule(self, num_inference_steps: int) -> Schedule:
        train = train_sigmas(self.alphas_cumprod)
        if self.sigma_schedule == "karras":
            log_sigmas = np.log(train)
            sigmas = karras_sigmas(float(train[0]), float(train[-1]), num_inference_steps)
            timesteps = sigma_to_t(sigmas, log_sigmas)
            if self.config.beta_schedule != "squaredcos_cap_v2":
                timesteps = np.round(timesteps)
            sigmas = np.concatenate([sigmas, [0.0]]).astype(np.float32)
        else:
            timesteps = self._spaced_timesteps(num_inference_steps)
            sigmas = interp_sigmas(train, timesteps)
        return Schedule(
            timesteps=timesteps.astype(np.int64),
            sigmas=sigmas,
            init_noise_sigma=1.0,
            num_inference_steps=num_inference_steps,
        )

    def _spaced_timesteps(self, num_inference_steps: int) -> np.ndarray:
        """DPM's own spacing: ``linspace`` and ``leading`` space n+1 points and drop the last (t = 0)."""
        n_train, n = self.config.num_train_timesteps, num_inference_steps
        if self.config.timestep_spacing == "linspace":
            return np.linspace(0, n_train - 1, n + 1).round()[::-1][:-1].astype(np.int64)
        if self.config.timestep_spacing == "leading":
            step_ratio = n_train // (n + 1)
            return (np.arange(0, n + 1) * step_ratio)[::-1][:-1].astype(np.int64) + self.config.steps_offset
        return np.arange(n_train, 0, -n_train / n).round().astype(np.int64) - 1

    def _data_prediction(self, model_output: np.ndarray, sample: np.ndarray, sigma: np.float32) -> np.ndarray:
        """diffusers' ``convert_model_output`` for dpmsolver++: the model output as a prediction of x0."""
        if self.config.prediction_type == "sample":
            return model_output
        alpha_t, sigma_t = alpha_sigma(sigma)
        if self.config.prediction_type == "epsilon":
            return (sample - sigma_t * model_output) / alpha_t
        return alpha_t * sample - sigma_t * model_output

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
        last = step_index == len(schedule.timesteps) - 1
        if state.prev_x0 is None or last:
            prev_sample = _first_order(sigmas[step_index + 1], sigmas[step_index], sample, x0)
        else:
            s = sigmas[step_index + 1], sigmas[step_index], sigmas[step_index - 1]
            prev_sample = _second_order(s, sample, x0, state.prev_x0)
        return prev_sample, DPMState(prev_x0=x0)

    def initial_state(self) -> DPMState:
        return DPMState()

    def add_noise(self, schedule: Schedule, original: np.ndarray, noise: np.ndarray, step_index: int) -> np.ndarray:
        alpha_t, sigma_t = alpha_sigma(schedule.sigmas[step_index])
        return alpha_t * as_f32(original) + sigma_t * as_f32(noise)


def _first_order(sigma_next: np.float32, sigma_cur: np.float32, sample: np.ndarray, x0: np.ndarray) -> np.ndarray:
    """DPM-Solver++ first order (DDIM in data-prediction form)."""
    alpha_t, sigma_t = alpha_sigma(sigma_next)
    alpha_s, sigma_s = alpha_sigma(sigma_cur)
    h = half_log_snr(alpha_t, sigma_t) - half_log_snr(alpha_s, sigma_s)
    return (sigma_t / sigma_s) * sample - (alpha_t * (np.exp(-h) - np.float32(1.0))) * x0


def _second_order(
    sigmas: tuple[np.float32, np.float32, np.float32], sample: np.ndarray, m0: np.ndarray, m1: np.ndarray
) -> np.ndarray:
    """DPM-Solver++(2M) midpoint update from the current (m0) and previous (m1) data predictions."""
    (alpha_t, sigma_t), (alpha_s0, sigma_s0), (alpha_s1, sigma_s1) = (alpha_sigma(s) for s in sigmas)
    lambda_t, lambda_s0 = half_log_snr(alpha_t, sigma_t), half_log_snr(alpha_s0, sigma_s0)
    lambda_s1 = half_log_snr(alpha_s1, sigma_s1)
    h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
    r0 = h_0 / h
    d1 = (np.float32(1.0) / r0) * (m0 - m1)
    coeff = alpha_t * (np.exp(-h) - np.float32(1.0))
    return (sigma_t / sigma_s0) * sample - coeff * m0 - np.float32(0.5) * coeff * d1


@register
class DPMPP2MKarras(DPMPP2M):
    name = "dpmpp_2m_karras"
    sigma_schedule = "karras"
