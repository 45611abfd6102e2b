"""UniPC (Zhao et al. 2023), a numpy port of diffusers' ``UniPCMultistepScheduler`` as models ship it.

Ported for diffusers' defaults: ``solver_order=2``, ``solver_type="bh2"``, ``predict_x0=True``, ``lower_order_final``,
no disabled corrector, ``final_sigmas_type="zero"``, default (interpolated) sigmas. Each step first corrects the
sample the previous step predicted (UniC, using this step's model output) and then predicts the next one (UniP).
The state is what diffusers keeps on the scheduler: the last two data predictions, the sample before the last
prediction and the order that prediction used. Hand-written because the runtime never imports torch; every
expression keeps diffusers' operation order in float32, and the 2x2 system of the second-order corrector is solved
in closed form (Cramer's rule) where diffusers calls ``torch.linalg.solve``: the two agree to float32 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import NoiseSource, Schedule, as_f32
from .dpmpp_2m import DPMPP2M, alpha_sigma, half_log_snr
from .registry import register

ONE, HALF = np.float32(1.0), np.float32(0.5)


@dataclass(frozen=True, eq=False)
class UniPCState:
    outputs: tuple[np.ndarray, ...] = ()  # data predictions of the last (at most two) steps, oldest first
    last_sample: np.ndarray | None = None  # the sample the last prediction started from
    last_order: int = 0  # the order of the last prediction (the corrector uses the same)
    lower_order_nums: int = 0  # steps taken since the (re)start, capped at the solver order


@register
class UniPC(DPMPP2M):
    """Reuses DPM-Solver's schedule and data prediction: diffusers' UniPC computes both the same way."""

    name = "unipc"
    diffusers_class = "UniPCMultistepScheduler"
    solver_order = 2

    def initial_state(self) -> UniPCState:
        return UniPCState()

    def step(
        self,
        schedule: Schedule,
        model_output: np.ndarray,
        step_index: int,
        sample: np.ndarray,
        state: UniPCState,
        generator: NoiseSource | None,
    ) -> tuple[np.ndarray, UniPCState]:
        model_output, sample = as_f32(model_output), as_f32(sample)
        sigmas = schedule.sigmas
        x0 = self._data_prediction(model_output, sample, sigmas[step_index])
        if step_index > 0 and state.last_sample is not None:
            sample = _corrector(sigmas, step_index, state, x0)
        outputs = (*state.outputs, x0)[-self.solver_order:]
        order = min(self.solver_order, len(schedule.timesteps) - step_index, state.lower_order_nums + 1)
        prev_sample = _predictor(sigmas, step_index, outputs, sample, order)
        return prev_sample, UniPCState(outputs=outputs, last_sample=sample, last_order=order,
                                       lower_order_nums=min(state.lower_order_nums + 1, self.solver_order))


def _lambda(sigma: np.float32) -> np.float32:
    return half_log_snr(*alpha_sigma(sigma))


def _phis(h: np.float32) -> tuple[np.float32, np.float32, np.float32, np.float32]:
    """``h_phi_1``, ``B_h`` (bh2) and the right-hand sides ``b1, b2`` of diffusers' UniPC update (``hh = -h``)."""
    hh = -h
    h_phi_1 = np.expm1(hh)
    b_h = np.expm1(hh)
    h_phi_k = h_phi_1 / hh - ONE
    b1 = h_phi_k * ONE / b_h
    h_phi_k = h_phi_k / hh - ONE / np.float32(2.0)
    b2 = h_phi_k * np.float32(2.0) / b_h
    return h_phi_1, b_h, b1, b2


def _predictor(sigmas: np.ndarray, i: int, outputs: tuple[np.ndarray, ...], x: np.ndarray, order: int) -> np.ndarray:
    """UniP-bh2 from sigma[i] to sigma[i+1] (``multistep_uni_p_bh_update``); ``outputs[-1]`` is this step's x0."""
    m0 = outputs[-1]
    alpha_t, sigma_t = alpha_sigma(sigmas[i + 1])
    alpha_s0, sigma_s0 = alpha_sigma(sigmas[i])
    with np.errstate(divide="ignore", invalid="ignore"):  # the last step goes to sigma 0: lambda_t = +inf
        h = half_log_snr(alpha_t, sigma_t) - half_log_snr(alpha_s0, sigma_s0)
        h_phi_1, b_h, _, _ = _phis(h)
    x_t_ = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
    if order == 1:
        return x_t_
    rk = (_lambda(sigmas[i - 1]) - half_log_snr(alpha_s0, sigma_s0)) / h
    d1 = (outputs[-2] - m0) / rk
    return x_t_ - alpha_t * b_h * (HALF * d1)


def _corrector(sigmas: np.ndarray, i: int, state: UniPCState, model_t: np.ndarray) -> np.ndarray:
    """UniC-bh2 (``multistep_uni_c_bh_update``): the sample at sigma[i], corrected with this step's x0."""
    m0, x = state.outputs[-1], state.last_sample
    alpha_t, sigma_t = alpha_sigma(sigmas[i])
    alpha_s0, sigma_s0 = alpha_sigma(sigmas[i - 1])
    lambda_s0 = half_log_snr(alpha_s0, sigma_s0)
    h = half_log_snr(alpha_t, sigma_t) - lambda_s0
    h_phi_1, b_h, b1, b2 = _phis(h)
    x_t_ = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
    d1_t = model_t - m0
    if state.last_order == 1:
        return x_t_ - alpha_t * b_h * (HALF * d1_t)
    rk = (_lambda(sigmas[i - 2]) - lambda_s0) / h
    d1 = (state.outputs[-2] - m0) / rk
    # R = [[1, 1], [rk, 1]], R @ (rho_0, rho_1) = (b1, b2)
    det = ONE - rk
    rho_0 = (b1 - b2) / det
    rho_1 = (b2 - rk * b1) / det
    return x_t_ - alpha_t * b_h * (rho_0 * d1 + rho_1 * d1_t)
