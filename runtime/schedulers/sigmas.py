"""Beta, alpha and sigma math shared by the scheduler ports.

Hand-written numpy ports of the helpers every diffusers scheduler repeats in its constructor and ``set_timesteps``
(the runtime must not import torch). Arrays stay float32 where diffusers holds float32 tensors, and each operation
keeps diffusers' order, so the ports agree with it to a few float32 ulps. Bit equality is not on offer: torch's
MKL-backed float32 sqrt/exp/log are not correctly rounded (about one result in five is an ulp off numpy's).
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np

from .config import SchedulerConfig

SigmaSchedule = Literal["default", "karras"]


def betas(config: SchedulerConfig) -> np.ndarray:
    """The training betas, float32, as diffusers builds them from ``beta_schedule``."""
    n = config.num_train_timesteps
    if config.beta_schedule == "linear":
        return _linspace_f32(config.beta_start, config.beta_end, n)
    if config.beta_schedule == "scaled_linear":
        root = _linspace_f32(config.beta_start**0.5, config.beta_end**0.5, n)
        return root * root  # diffusers squares the float32 tensor
    return _cosine_betas(n)


def _linspace_f32(start: float, end: float, n: int) -> np.ndarray:
    """``torch.linspace(start, end, n, dtype=torch.float32)`` bit for bit.

    torch's CPU kernel computes ``start + step * i`` for the first half and ``end - step * (n - 1 - i)`` for the
    second, in float32 with a float32 step, and the compiler fuses each into one FMA (a single rounding). The
    products are exact in float64, so float64 arithmetic rounded once to float32 reproduces it; ``np.linspace``
    differs from it by an ulp in about a third of the entries.
    """
    start32, end32 = np.float32(start), np.float32(end)
    if n == 1:
        return np.array([start32])
    step = np.float64((end32 - start32) / np.float32(n - 1))
    i = np.arange(n)
    from_start = np.float64(start32) + step * i
    from_end = np.float64(end32) - step * (n - 1 - i)
    return np.where(i < n // 2, from_start, from_end).astype(np.float32)


def _cosine_betas(n: int, max_beta: float = 0.999) -> np.ndarray:
    """diffusers' ``betas_for_alpha_bar`` with the cosine transform (``squaredcos_cap_v2``), in Python floats."""

    def alpha_bar(t: float) -> float:
        return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    out = [min(1 - alpha_bar((i + 1) / n) / alpha_bar(i / n), max_beta) for i in range(n)]
    return np.asarray(out, dtype=np.float32)


def alphas_cumprod(config: SchedulerConfig) -> np.ndarray:
    """Cumulative product of ``1 - beta``, float32.

    torch's CPU ``cumprod`` accumulates float32 in double, so this does too; a float32 running product drifts by a
    few ulps over 1000 steps.
    """
    alphas = np.float32(1.0) - betas(config)
    return np.cumprod(alphas.astype(np.float64)).astype(np.float32)


def train_sigmas(alphas_cumprod: np.ndarray) -> np.ndarray:
    """Karras-style sigma for every training timestep, ascending in t, float32: ``sqrt((1 - a) / a)``."""
    return np.sqrt((np.float32(1.0) - alphas_cumprod) / alphas_cumprod)


def spaced_timesteps(config: SchedulerConfig, num_inference_steps: int) -> np.ndarray:
    """Descending timesteps for ``timestep_spacing``, float64 and not rounded for ``linspace``.

    This is the spacing DDIM, Euler and PNDM share; callers round and cast as their diffusers class does.
    """
    n_train, n = config.num_train_timesteps, num_inference_steps
    if config.timestep_spacing == "linspace":
        return np.linspace(0, n_train - 1, n)[::-1].copy()
    if config.timestep_spacing == "leading":
        step_ratio = n_train // n
        return (np.arange(0, n) * step_ratio)[::-1].astype(np.float64) + config.steps_offset
    step_ratio = n_train / n
    return np.round(np.arange(n_train, 0, -step_ratio)) - 1


def karras_sigmas(sigma_min: float, sigma_max: float, num_inference_steps: int, rho: float = 7.0) -> np.ndarray:
    """Karras et al. (2022) sigmas from ``sigma_max`` down to ``sigma_min``, float64 (``_convert_to_karras``)."""
    ramp = np.linspace(0, 1, num_inference_steps)
    min_inv_rho = sigma_min ** (1 / rho)
    max_inv_rho = sigma_max ** (1 / rho)
    return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho


def sigma_to_t(sigmas: np.ndarray, log_sigmas: np.ndarray) -> np.ndarray:
    """Fractional training timestep of each sigma, by interpolating in log-sigma (diffusers' ``_sigma_to_t``)."""
    log_sigma = np.log(np.maximum(sigmas, 1e-10))
    dists = log_sigma - log_sigmas[:, np.newaxis]
    low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
    high_idx = low_idx + 1
    low, high = log_sigmas[low_idx], log_sigmas[high_idx]
    w = np.clip((low - log_sigma) / (low - high), 0, 1)
    return ((1 - w) * low_idx + w * high_idx).reshape(sigmas.shape)


def interp_sigmas(train: np.ndarray, timesteps: np.ndarray) -> np.ndarray:
    """Sigmas at (possibly fractional) timesteps with a final 0 appended, float32, as diffusers' ``np.interp``."""
    sigmas = np.interp(timesteps, np.arange(0, len(train)), train)
    return np.concatenate([sigmas, [0.0]]).astype(np.float32)


def vp_add_noise(alphas_cumprod: np.ndarray, original: np.ndarray, noise: np.ndarray, timestep: int) -> np.ndarray:
    """Forward diffusion ``sqrt(a_t) x0 + sqrt(1 - a_t) noise`` (DDPM-family ``add_noise``), float32."""
    alpha_prod = alphas_cumprod[int(timestep)]
    original = np.asarray(original, dtype=np.float32)
    noise = np.asarray(noise, dtype=np.float32)
    return np.sqrt(alpha_prod) * original + np.sqrt(np.float32(1.0) - alpha_prod) * noise
