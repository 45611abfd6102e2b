"""The model's noise schedule, read from a diffusers ``scheduler_config.json``.

A diffusers scheduler config mixes two kinds of keys. Keys that describe how the model was trained (betas,
prediction type, timestep spacing, ...) become fields of ``SchedulerConfig``. Keys that describe a sampler (solver
order, Karras sigmas, skipping PRK steps, ...) are chosen by the scheduler id instead (``dpmpp_2m_karras`` means
DPM++ 2M with Karras sigmas whatever the file says), so they are read past. A key this module does not know, or a
training key with a value the ports do not implement, is an error naming the key and the allowed values.

A training key the model's config does not set takes the default of the diffusers class that runs the sampler, as
``DDIMScheduler.from_config(config)`` does (``CLASS_DEFAULTS``): an SDXL config written by ``EulerDiscreteScheduler``
omits ``clip_sample``, which DDIM then takes as ``True``, not as SD 1.5's ``False``. Keys listed in the config's
``_use_default_values`` were never chosen by its author, so they take the running class's default too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Any, Literal, get_args

from pocketsd.errors import GenerateError, InternalError

BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]
PredictionType = Literal["epsilon", "v_prediction", "sample"]
TimestepSpacing = Literal["leading", "trailing", "linspace"]

# Bookkeeping, or sampler settings that the scheduler id decides (each port uses diffusers' defaults for its id).
_SAMPLER_KEYS = frozenset({
    "_class_name", "_diffusers_version", "_use_default_values",
    "skip_prk_steps", "solver_order", "algorithm_type", "solver_type", "lower_order_final", "euler_at_final",
    "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas",
    "interpolation_type", "final_sigmas_type", "lambda_min_clipped", "variance_type", "sigma_min", "sigma_max",
    "flow_shift", "use_dynamic_shifting", "time_shift_type", "shift_terminal", "predict_x0", "solver_p",
    "disable_corrector", "noise_sampler_seed", "dynamic_thresholding_ratio", "sample_max_value",
})

# Training keys whose only supported value is diffusers' default (anything else changes the math).
_FIXED_KEYS: dict[str, Any] = {
    "trained_betas": None,
    "rescale_betas_zero_snr": False,
    "thresholding": False,
    "timestep_type": "discrete",
}


# diffusers' own defaults (its ``__init__`` signatures, diffusers 0.3x) for the training keys above, per scheduler
# class. Written out because the runtime never imports diffusers; tests/runtime/test_schedulers.py checks the table
# against the installed diffusers' signatures, key by key.
_DDPM = {"num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear",
         "prediction_type": "epsilon", "steps_offset": 0}
CLASS_DEFAULTS: dict[str, dict[str, Any]] = {
    "DDIMScheduler": {**_DDPM, "timestep_spacing": "leading", "set_alpha_to_one": True, "clip_sample": True,
                      "clip_sample_range": 1.0},
    "PNDMScheduler": {**_DDPM, "timestep_spacing": "leading", "set_alpha_to_one": False},
    "EulerDiscreteScheduler": {**_DDPM, "timestep_spacing": "linspace"},
    "EulerAncestralDiscreteScheduler": {**_DDPM, "timestep_spacing": "linspace"},
    "DPMSolverMultistepScheduler": {**_DDPM, "timestep_spacing": "linspace"},
    "HeunDiscreteScheduler": {**_DDPM, "beta_start": 0.00085, "beta_end": 0.012, "timestep_spacing": "linspace",
                              "clip_sample": False, "clip_sample_range": 1.0},
    "LMSDiscreteScheduler": {**_DDPM, "timestep_spacing": "linspace"},
    "UniPCMultistepScheduler": {**_DDPM, "timestep_spacing": "linspace"},
    "LCMScheduler": {**_DDPM, "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
                     "timestep_spacing": "leading", "set_alpha_to_one": True, "clip_sample": False,
                     "clip_sample_range": 1.0, "original_inference_steps": 50, "timestep_scaling": 10.0},
}


@dataclass(frozen=True)
class SchedulerConfig:
    """The training noise schedule of a model; defaults are Stable Diffusion 1.x's."""

    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    beta_schedule: BetaSchedule = "scaled_linear"
    prediction_type: PredictionType = "epsilon"
    timestep_spacing: TimestepSpacing = "leading"
    steps_offset: int = 1
    set_alpha_to_one: bool = False
    clip_sample: bool = False
    clip_sample_range: float = 1.0
    original_inference_steps: int = 50  # LCM: length of the distillation schedule its timesteps are taken from
    timestep_scaling: float = 10.0  # LCM: scales t in the consistency boundary condition

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_field(f.name, f.type, getattr(self, f.name))
        # Values of the right type that the schedule math cannot honour: checked here, where the exporter checks the
        # model's config too (export/read_back.py), so that such a model is refused at export, not at first use.
        for name in ("beta_start", "beta_end"):
            if not getattr(self, name) < 1:  # alpha = 1 - beta must stay positive: sigma = sqrt((1 - ᾱ) / ᾱ)
                raise GenerateError(f"scheduler config key {name!r} = {getattr(self, name)!r} is not supported",
                                    hint="betas must be below 1 (Stable Diffusion 1.x: 0.00085 to 0.012)")
        if self.steps_offset >= self.num_train_timesteps:  # every timestep would lie past the trained ones
            raise GenerateError(f"scheduler config key 'steps_offset' = {self.steps_offset!r} is not supported",
                                hint=f"it must be below num_train_timesteps ({self.num_train_timesteps})")

    @classmethod
    def from_dict(cls, d: dict[str, Any], diffusers_class: str | None = None) -> SchedulerConfig:
        """Build from a diffusers scheduler config dict as ``diffusers_class`` would read it (its defaults for the
        keys ``d`` does not set; SD 1.x's when ``None``); raise ``GenerateError`` on anything unsupported."""
        if not isinstance(d, dict):
            raise GenerateError(f"a scheduler config must be a JSON object, not {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        chosen = d.get("_use_default_values", [])
        if not isinstance(chosen, list) or not all(isinstance(k, str) for k in chosen):
            raise GenerateError(f"scheduler config key '_use_default_values' = {chosen!r} is not a list of key names")
        if diffusers_class is not None and diffusers_class not in CLASS_DEFAULTS:
            raise InternalError(f"no diffusers defaults recorded for {diffusers_class!r}")
        kwargs = dict(CLASS_DEFAULTS.get(diffusers_class or "", {}))
        for key, value in d.items():
            if key in chosen:
                continue
            if key in known:
                kwargs[key] = value
            elif key in _FIXED_KEYS:
                if value != _FIXED_KEYS[key]:
                    raise GenerateError(
                        f"scheduler config key {key!r} = {value!r} is not supported",
                        hint=f"only {_FIXED_KEYS[key]!r} is implemented by the numpy schedulers",
                    )
            elif key not in _SAMPLER_KEYS:
                raise GenerateError(
                    f"unknown scheduler config key {key!r}",
                    hint=f"known keys: {', '.join(sorted(known | _FIXED_KEYS.keys()))} (+ sampler keys chosen by id)",
                )
        return cls(**kwargs)


def _check_field(name: str, annotation: str, value: Any) -> None:
    """Validate one field against its annotation (the module uses postponed annotations, so they are strings)."""
    choices = {"BetaSchedule": BetaSchedule, "PredictionType": PredictionType, "TimestepSpacing": TimestepSpacing}
    if annotation in choices:
        allowed = get_args(choices[annotation])
        if value not in allowed:
            raise GenerateError(
                f"scheduler config key {name!r} = {value!r} is not supported",
                hint=f"allowed values: {', '.join(allowed)}",
            )
    elif annotation == "bool":
        if not isinstance(value, bool):
            raise GenerateError(f"scheduler config key {name!r} must be true or false, got {value!r}")
    elif annotation == "int":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise GenerateError(f"scheduler config key {name!r} must be a non-negative integer, got {value!r}")
        if value == 0 and name != "steps_offset":
            raise GenerateError(f"scheduler config key {name!r} must be at least 1, got 0")
    elif annotation == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise GenerateError(f"scheduler config key {name!r} must be a non-negative number, got {value!r}")
