"""PNDM / PLMS (Liu et al. 2022), a numpy port of diffusers' ``PNDMScheduler`` with ``skip_prk_steps=True`` as in SD.

Hand-written so the runtime never imports torch. With PRK steps skipped diffusers runs linear multistep (PLMS) from
the start: its timesteps repeat the second one, and the first two calls form one Heun-like step (the second call
averages both model outputs and restarts from the first call's sample). That bookkeeping is ``PNDMState``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import NoiseSource, Schedule, Scheduler, as_f32
from .registry import register
from .sigmas import spaced_timesteps, vp_add_noise


@dataclass(frozen=True, eq=False)
class PNDMState:
    counter: int = 0  # steps taken since the start (diffusers' ``counter``)
    ets: tuple[np.ndarray, ...] = ()  # last (at most four) model outputs
    cur_sample: np.ndarray | None = None  # the first call's sample, reused by the second call


@register
class PNDM(Scheduler):
    name = "pndm"
    diffusers_class = "PNDMScheduler"
    prediction_types = ("epsilon", "v_prediction")

    def _schedule(self, num_inference_steps: int) -> Schedule:
        ascending = np.round(spaced_timesteps(self.config, num_inference_steps)[::-1]).astype(np.int64)
        plms = np.concatenate([ascending[:-1], ascending[-2:-1], ascending[-1:]])[::-1].copy()
        return Schedule(timesteps=plms, sigmas=None, init_noise_sigma=1.0, num_inference_steps=num_inference_steps)

    def initial_state(self) -> PNDMState:
        return PNDMState()

    def step(
        self,
        schedule: Schedule,
        model_output: np.ndarray,
        step_index: int,
        sample: np.ndarray,
        state: PNDMState,
        generator: NoiseSource | None,
    ) -> tuple[np.ndarray, PNDMState]:
        model_output, sample = as_f32(model_output), as_f32(sample)
        ratio = self.config.num_train_timesteps // schedule.num_inference_steps
        timestep = int(schedule.timesteps[step_index])
        prev_timestep = timestep - ratio
        ets, cur_sample = state.ets, state.cur_sample
        if state.counter != 1:
            ets = ets[-3:] + (model_output,)
        else:
            prev_timestep, timestep = timestep, timestep + ratio

        if len(ets) == 1 and state.counter == 0:
            cur_sample = sample
        elif len(ets) == 1 and state.counter == 1:
            model_output = (model_output + ets[-1]) / 2
            sample, cur_sample = cur_sample, None
        elif len(ets) == 2:
            model_output = (3 * ets[-1] - ets[-2]) / 2
        elif len(ets) == 3:
            model_output = (23 * ets[-1] - 16 * ets[-2] + 5 * ets[-3]) / 12
        else:
            model_output = (1 / 24) * (55 * ets[-1] - 59 * ets[-2] + 37 * ets[-3] - 9 * ets[-4])

        prev_sample = self._prev_sample(sample, timestep, prev_timestep, model_output)
        return prev_sample, PNDMState(counter=state.counter + 1, ets=ets, cur_sample=cur_sample)

    def _prev_sample(
        self, sample: np.ndarray, timestep: int, prev_timestep: int, model_output: np.ndarray
    ) -> np.ndarray:
        """Formula (9) of the PNDM paper, as diffusers' ``_get_prev_sample``."""
        alpha_prod = self.alphas_cumprod[timestep]
        alpha_prod_prev = self.alphas_cumprod[prev_timestep] if prev_timestep >= 0 else self.final_alpha_cumprod
        beta_prod = np.float32(1.0) - alpha_prod
        beta_prod_prev = np.float32(1.0) - alpha_prod_prev
        if self.config.prediction_type == "v_prediction":
            model_output = np.sqrt(alpha_prod) * model_output + np.sqrt(beta_prod) * sample
        sample_coeff = np.sqrt(alpha_prod_prev / alpha_prod)
        denom = alpha_prod * np.sqrt(beta_prod_prev) + np.sqrt(alpha_prod * beta_prod * alpha_prod_prev)
        return sample_coeff * sample - (alpha_prod_prev - alpha_prod) * model_output / denom

    def add_noise(self, schedule: Schedule, original: np.ndarray, noise: np.ndarray, step_index: int) -> np.ndarray:
        return vp_add_noise(self.alphas_cumprod, original, noise, schedule.timesteps[step_index])
