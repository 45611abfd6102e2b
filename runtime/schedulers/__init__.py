"""numpy ports of diffusers' schedulers, equal to them step by step (the runtime never imports torch).

    sch = make_scheduler("euler", scheduler_config_json)  # the model's config; the port's diffusers defaults fill gaps
    schedule = sch.set_timesteps(30); state = sch.initial_state()
    for i in range(schedule.start_index(strength) if img2img else 0, len(schedule.timesteps)):
        x = sch.scale_model_input(schedule, latents, i)
        latents, state = sch.step(schedule, unet(x, schedule.timesteps[i]), i, latents, state, generator)
"""

from . import ddim, dpmpp_2m, dpmpp_2m_sde, euler, euler_ancestral, heun, lcm, lms, pndm, unipc  # noqa: F401  (each registers itself)
from .base import NoiseSource, Schedule, Scheduler, State
from .config import SchedulerConfig
from .registry import available, make_scheduler, register
from .sigmas import SigmaSchedule

__all__ = [
    "NoiseSource",
    "Schedule",
    "Scheduler",
    "SchedulerConfig",
    "SigmaSchedule",
    "State",
    "available",
    "make_scheduler",
    "register",
]
