"""LMS (linear multistep on the probability-flow ODE, Karras et al. 2022), a numpy port of diffusers'
``LMSDiscreteScheduler`` (order 4, default sigmas).

Each step integrates the Lagrange polynomial through the last (up to) four slopes over the next sigma interval.
diffusers integrates it numerically with scipy's ``quad``; the integrand is a polynomial of degree ≤ 3, so here it is
integrated exactly with ``numpy.polynomial`` (the runtime depends on neither scipy nor torch).
"""

from __future__ import annotations

import numpy as np
from numpy.polynomial import polynomial as P

from .base import NoiseSource, Schedule, State, as_f32
from .euler import Euler
from .registry import register

ORDER = 4


def lms_coefficient(sigmas: np.ndarray, order: int, index: int, current: int) -> float:
    """∫ from sigmas[index] to sigmas[index + 1] of the Lagrange basis polynomial of node ``index - current`` over the
    nodes ``index, index - 1, …, index - order + 1`` (diffusers' ``get_lms_coefficient``)."""
    poly = np.array([1.0])
    anchor = float(sigmas[index - current])
    for k in range(order):
        if k == current:
            continue
        node = float(sigmas[index - k])
        poly = P.polymul(poly, np.array([-node, 1.0]) / (anchor - node))
    antiderivative = P.polyint(poly)
    return float(P.polyval(float(sigmas[index + 1]), antiderivative) - P.polyval(float(sigmas[index]), antiderivative))


@register
class LMS(Euler):
    name = "lms"
    diffusers_class = "LMSDiscreteScheduler"

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
        derivative = (sample - self.predict_x0(model_output, sample, sigma)) / sigma
        derivatives = (*state, derivative)[-ORDER:]  # the state: the last slopes, oldest first
        order = min(step_index + 1, ORDER)  # as diffusers: by step index (an img2img start has fewer slopes)
        coefficients = [lms_coefficient(schedule.sigmas, order, step_index, k) for k in range(order)]
        total: np.ndarray | float = 0.0
        for coefficient, slope in zip(coefficients, reversed(derivatives)):
            total = total + coefficient * slope  # Python floats: float32 arithmetic, as diffusers' torch scalars
        return sample + total, derivatives
