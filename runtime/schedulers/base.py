"""The scheduler interface: an immutable ``Schedule`` and a ``Scheduler`` that steps with explicit state.

This is diffusers' scheduler interface ported to numpy (the runtime must not import torch) with its hidden mutable
state pulled out: ``set_timesteps`` returns a ``Schedule`` instead of storing one, the step index is passed in
instead of counted, and the only state that crosses steps (multistep history) is a value ``step`` takes and returns.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np

from pocketsd.errors import GenerateError, InternalError

from .config import SchedulerConfig
from .sigmas import alphas_cumprod

# What ``step`` carries from one call to the next: ``()`` for single-step schedulers, else a frozen dataclass.
State = Any


class NoiseSource(Protocol):
    """Anything that draws standard normal noise; ``numpy.random.Generator`` is one."""

    def standard_normal(self, size: Any, dtype: Any = ...) -> np.ndarray: ...


@dataclass(frozen=True, eq=False)
class Schedule:
    """The result of ``set_timesteps``: what the UNet is called with, in order, and the matching sigmas."""

    timesteps: np.ndarray
    sigmas: np.ndarray | None
    init_noise_sigma: float
    num_inference_steps: int
    order: int = 1

    def __post_init__(self) -> None:
        for array in (self.timesteps, self.sigmas):
            if array is not None:
                array.setflags(write=False)

    def start_index(self, strength: float) -> int:
        """First step index for img2img, as diffusers' ``StableDiffusionImg2ImgPipeline.get_timesteps``."""
        if not 0.0 <= strength <= 1.0:
            raise GenerateError(f"img2img strength must be between 0 and 1, got {strength}")
        n = self.num_inference_steps
        init_timestep = min(int(n * strength), n)
        t_start = max(n - init_timestep, 0)
        return t_start * self.order


class Scheduler:
    """Base of the numpy scheduler ports; subclasses register themselves under ``name``."""

    name: ClassVar[str]
    diffusers_class: ClassVar[str]  # the diffusers scheduler it ports: its defaults fill keys a config leaves out
    order: ClassVar[int] = 1
    prediction_types: ClassVar[tuple[str, ...]] = ("epsilon", "v_prediction", "sample")

    def __init__(self, config: SchedulerConfig) -> None:
        if config.prediction_type not in self.prediction_types:
            raise GenerateError(
                f"scheduler {self.name!r} does not support prediction_type {config.prediction_type!r}",
                hint=f"it supports: {', '.join(self.prediction_types)}",
            )
        self.config = config
        self.alphas_cumprod = alphas_cumprod(config)
        self.alphas_cumprod.setflags(write=False)
        # The alpha product used past t = 0 by DDPM-family steps.
        self.final_alpha_cumprod = np.float32(1.0) if config.set_alpha_to_one else self.alphas_cumprod[0]

    def set_timesteps(self, num_inference_steps: int) -> Schedule:
        self._check_steps(num_inference_steps)
        return self._schedule(num_inference_steps)

    def _schedule(self, num_inference_steps: int) -> Schedule:
        raise NotImplementedError

    def initial_state(self) -> State:
        return ()

    def scale_model_input(self, schedule: Schedule, sample: np.ndarray, step_index: int) -> np.ndarray:
        return sample

    def step(
        self,
        schedule: Schedule,
        model_output: np.ndarray,
        step_index: int,
        sample: np.ndarray,
        state: State,
        generator: NoiseSource | None,
    ) -> tuple[np.ndarray, State]:
        raise NotImplementedError

    def add_noise(self, schedule: Schedule, original: np.ndarray, noise: np.ndarray, step_index: int) -> np.ndarray:
        raise NotImplementedError

    def _check_steps(self, num_inference_steps: int) -> None:
        n_train = self.config.num_train_timesteps
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
            raise GenerateError(f"number of steps must be an integer, got {num_inference_steps!r}")
        if not 1 <= num_inference_steps <= n_train:
            raise GenerateError(
                f"number of steps must be between 1 and {n_train}, got {num_inference_steps}",
                hint="the model was trained with that many timesteps",
            )


def as_f32(array: np.ndarray) -> np.ndarray:
    """The array as float32 (no copy when it already is): diffusers steps in float32."""
    return np.asarray(array, dtype=np.float32)


def draw_noise(generator: NoiseSource | None, like: np.ndarray, scheduler: str) -> np.ndarray:
    """One standard normal tensor of ``like``'s shape, drawn the way diffusers' ``randn_tensor`` does (float32)."""
    if generator is None:
        raise InternalError(f"scheduler {scheduler!r} draws noise at every step but was given no generator")
    return as_f32(generator.standard_normal(like.shape, dtype=np.float32))


def predict_x0_vp(
    prediction_type: str, model_output: np.ndarray, sample: np.ndarray, alpha_prod: np.float32
) -> np.ndarray:
    """The predicted clean sample for DDPM-parameterised schedulers (DDIM, LCM), in diffusers' operation order."""
    beta_prod = np.float32(1.0) - alpha_prod
    if prediction_type == "epsilon":
        return (sample - np.sqrt(beta_prod) * model_output) / np.sqrt(alpha_prod)
    if prediction_type == "sample":
        return model_output
    return np.sqrt(alpha_prod) * sample - np.sqrt(beta_prod) * model_output
