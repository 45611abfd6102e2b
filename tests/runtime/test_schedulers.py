"""The numpy schedulers equal diffusers' step by step (parity tier), plus their registry and config contracts.

Both sides get the same model outputs (a fixed function of diffusers' scaled input and the timestep) and the same
noise (a torch.Generator on the diffusers side, an identically seeded one behind a ``NoiseSource`` on ours). Each
side keeps its own latents, so rounding differences accumulate over the run as they would in a real generation.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import (  # noqa: E402
    StableDiffusionImg2ImgPipeline,
)

from pocketsd.errors import GenerateError, InternalError  # noqa: E402
from pocketsd.runtime.schedulers import SchedulerConfig, available, make_scheduler, register  # noqa: E402
from pocketsd.runtime.schedulers.config import CLASS_DEFAULTS  # noqa: E402
from pocketsd.runtime.schedulers.ddim import DDIM  # noqa: E402

# Max abs difference allowed against diffusers, for every comparison in this file (scaled only as stated below).
MAX_ABS = {"timesteps": 0.0, "sigmas": 1e-6, "init_noise_sigma": 1e-6, "sample": 1e-5}

# The one exception, stated: the SDE samplers' samples may differ by 4x MAX_ABS["sample"]. torch's sqrt of a 0-d
# float32 tensor is not always correctly rounded (sqrt(151.87312) comes out 1 ulp below numpy's, so alpha_t = 1 /
# sqrt(sigma^2 + 1) differs by 1 ulp), and the stochastic update re-weights x0 = (x - sigma_t eps) / alpha_t at
# every step instead of letting it fade: over 25 steps the difference grows steadily to 2.8e-5 (no jump anywhere).
SAMPLE_SLACK = {"dpmpp_2m_sde": 4.0, "dpmpp_2m_sde_karras": 4.0}

SHAPE = (2, 4, 8, 8)
STEP_COUNTS = (4, 25)

# SD 1.5's scheduler_config.json as diffusers loads it (PNDM's defaults filled in).
SD15 = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
}
CONFIGS = {
    "sd15": SD15,
    # SD 2.x (768, v-prediction) with the two other spacings.
    "v_trailing": {**SD15, "prediction_type": "v_prediction", "timestep_spacing": "trailing"},
    "v_linspace": {**SD15, "prediction_type": "v_prediction", "timestep_spacing": "linspace"},
    # Configs that leave keys out: each class fills them with its own defaults, as diffusers' from_config does.
    # SD's betas written by an Euler-class author who set nothing else (DDIM then clips x0 and sets alpha to one).
    "euler_minimal": {"_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012,
                      "beta_schedule": "scaled_linear"},
    "empty": {},  # every key from the running class
    # Keys the author never chose (diffusers' _use_default_values): the running class's defaults, not the values.
    "use_default_values": {**SD15, "_use_default_values": ["timestep_spacing", "steps_offset", "clip_sample"]},
}

# Registry id -> (diffusers class, from_config overrides that select the sampler the id stands for).
DIFFUSERS = {
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_sde_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "lcm": ("LCMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "unipc": ("UniPCMultistepScheduler", {"solver_order": 2, "solver_type": "bh2", "predict_x0": True}),
}
IDS = sorted(DIFFUSERS)

# diffusers' schedulers call np.array(tensor) in a way numpy 2 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")


class TorchNoise:
    """A ``NoiseSource`` replaying a seeded torch.Generator, drawing as diffusers' ``randn_tensor`` does."""

    def __init__(self, seed: int) -> None:
        self.generator = torch.Generator().manual_seed(seed)

    def standard_normal(self, size, dtype=np.float32) -> np.ndarray:
        return torch.randn(tuple(size), generator=self.generator, dtype=torch.float32).numpy()


def fake_unet(x: np.ndarray, t: float, i: int, prediction_type: str, alphas_cumprod: np.ndarray) -> np.ndarray:
    """A deterministic stand-in for the UNet: a denoiser whose x0 guess depends on its input and the step.

    Its output is consistent with its input the way a trained model's is (eps = (x - sqrt(a) x0) / sqrt(1 - a)),
    so latents stay at their usual scale instead of random-walking away, as a structureless output would. It knows
    the training schedule (``alphas_cumprod``) of the config under test, as a model trained with it would.
    """
    alpha = np.interp(float(t), np.arange(len(alphas_cumprod)), alphas_cumprod)
    rng = np.random.default_rng(1000 + i)
    x0 = 0.7 * np.tanh(x.astype(np.float64)) + 0.3 * rng.standard_normal(x.shape)
    eps = (x - np.sqrt(alpha) * x0) / np.sqrt(1 - alpha)
    out = {"epsilon": eps, "sample": x0, "v_prediction": np.sqrt(alpha) * eps - np.sqrt(1 - alpha) * x0}
    return out[prediction_type].astype(np.float32)


def make_pair(sid: str, config: dict, n: int):
    cls_name, overrides = DIFFUSERS[sid]
    theirs = getattr(diffusers, cls_name).from_config(config, **overrides)
    theirs.set_timesteps(n)
    ours = make_scheduler(sid, config)
    return theirs, ours, ours.set_timesteps(n)


def _sigma_max(alphas_cumprod) -> float:
    last = float(alphas_cumprod[-1])
    return ((1 - last) / last) ** 0.5


_SD15_SIGMA_MAX = _sigma_max(diffusers.DDIMScheduler.from_config(SD15).alphas_cumprod.double())


def rounding_scale(theirs) -> float:
    """``MAX_ABS`` was set on SD's noise schedule (sigma_max 14.6). float32 rounding grows with sigma_max: the sigma
    samplers start from noise that large and the DDPM ones divide by sqrt(alpha_bar) to predict x0. A schedule
    noisier than SD's (diffusers' default linear betas: sigma_max 157) is held to ``MAX_ABS`` times the ratio;
    every config with SD's betas to exactly ``MAX_ABS``."""
    return max(1.0, _sigma_max(theirs.alphas_cumprod.double()) / _SD15_SIGMA_MAX)


def assert_close(kind: str, ours, theirs, where: str = "", scale: float = 1.0) -> None:
    ours = np.asarray(ours, dtype=np.float64)
    theirs = np.asarray(theirs.numpy() if isinstance(theirs, torch.Tensor) else theirs, dtype=np.float64)
    assert ours.shape == theirs.shape, f"{kind}{where}: shape {ours.shape} != {theirs.shape}"
    diff = float(np.max(np.abs(ours - theirs))) if ours.size else 0.0
    bound = MAX_ABS[kind] * scale
    assert diff <= bound, f"{kind}{where}: max abs {diff:.3g} > {bound:.3g}"


def assert_same_schedule(theirs, schedule) -> None:
    assert schedule.timesteps.dtype == theirs.timesteps.numpy().dtype
    assert_close("timesteps", schedule.timesteps, theirs.timesteps)
    if schedule.sigmas is not None:
        assert_close("sigmas", schedule.sigmas, theirs.sigmas, scale=rounding_scale(theirs))
    assert_close("init_noise_sigma", schedule.init_noise_sigma, float(theirs.init_noise_sigma),
                 scale=rounding_scale(theirs))


def drive(theirs, ours, schedule, x_theirs, x_ours: np.ndarray, start: int) -> None:
    """Run both schedulers from ``start`` to the end with shared model outputs and noise; compare every step."""
    takes_generator = "generator" in theirs.step.__code__.co_varnames
    gen_theirs, gen_ours = torch.Generator().manual_seed(7), TorchNoise(7)
    state = ours.initial_state()
    alphas = theirs.alphas_cumprod.double().numpy()
    scale = rounding_scale(theirs) * SAMPLE_SLACK.get(ours.name, 1.0)
    for i in range(start, len(schedule.timesteps)):
        t = theirs.timesteps[i]
        scaled = theirs.scale_model_input(x_theirs, t)
        assert_close("sample", ours.scale_model_input(schedule, x_ours, i), scaled, f" (scaled input, step {i})",
                     scale)
        eps = fake_unet(scaled.numpy(), float(t), i, theirs.config.prediction_type, alphas)
        kwargs = {"generator": gen_theirs} if takes_generator else {}
        x_theirs = theirs.step(torch.from_numpy(eps), t, x_theirs, **kwargs).prev_sample
        x_ours, state = ours.step(schedule, eps, i, x_ours, state, gen_ours)
        assert x_ours.dtype == np.float32
        assert_close("sample", x_ours, x_theirs, f" (step {i}, t={float(t)})", scale)


@pytest.mark.parametrize("n", STEP_COUNTS)
@pytest.mark.parametrize("config_name", sorted(CONFIGS))
@pytest.mark.parametrize("sid", IDS)
def test_txt2img_matches_diffusers(sid: str, config_name: str, n: int) -> None:
    theirs, ours, schedule = make_pair(sid, CONFIGS[config_name], n)
    assert_same_schedule(theirs, schedule)
    latents = np.random.default_rng(0).standard_normal(SHAPE, dtype=np.float32)
    x_theirs = torch.from_numpy(latents) * theirs.init_noise_sigma
    x_ours = latents * schedule.init_noise_sigma
    assert_close("sample", x_ours, x_theirs, " (initial latents)", rounding_scale(theirs))
    drive(theirs, ours, schedule, x_theirs, x_ours, start=0)


@pytest.mark.parametrize("strength", (0.55, 1.0))
@pytest.mark.parametrize("config_name", ("sd15", "v_trailing"))
@pytest.mark.parametrize("sid", IDS)
def test_img2img_matches_diffusers(sid: str, config_name: str, strength: float) -> None:
    n = 10
    theirs, ours, schedule = make_pair(sid, CONFIGS[config_name], n)
    # diffusers' own img2img code slices the timesteps and sets the scheduler's begin index.
    pipe = SimpleNamespace(scheduler=theirs)
    timesteps, _ = StableDiffusionImg2ImgPipeline.get_timesteps(pipe, n, strength, "cpu")
    start = schedule.start_index(strength)
    assert start == len(theirs.timesteps) - len(timesteps)

    rng = np.random.default_rng(1)
    init, noise = (rng.standard_normal(SHAPE, dtype=np.float32) for _ in range(2))
    x_theirs = theirs.add_noise(torch.from_numpy(init), torch.from_numpy(noise), timesteps[:1].repeat(SHAPE[0]))
    x_ours = ours.add_noise(schedule, init, noise, start)
    assert_close("sample", x_ours, x_theirs, " (add_noise)", rounding_scale(theirs))
    drive(theirs, ours, schedule, x_theirs, x_ours, start)


@pytest.mark.parametrize("sid", ("ddim", "dpmpp_2m", "euler", "lcm"))
def test_sample_prediction_matches_diffusers(sid: str) -> None:
    theirs, ours, schedule = make_pair(sid, {**SD15, "prediction_type": "sample"}, 6)
    latents = np.random.default_rng(2).standard_normal(SHAPE, dtype=np.float32)
    drive(theirs, ours, schedule, torch.from_numpy(latents) * theirs.init_noise_sigma,
          latents * schedule.init_noise_sigma, start=0)


@pytest.mark.parametrize("sid", ("euler_a", "pndm"))
def test_sample_prediction_unsupported_where_diffusers_lacks_it(sid: str) -> None:
    with pytest.raises(GenerateError, match="prediction_type"):
        make_scheduler(sid, SchedulerConfig(prediction_type="sample"))


def test_every_registered_id_has_a_parity_test() -> None:
    assert available() == IDS


def test_unknown_scheduler_lists_known_ids() -> None:
    with pytest.raises(GenerateError) as info:
        make_scheduler("ddpm", SchedulerConfig())
    line = info.value.one_line()
    assert "'ddpm'" in line
    assert all(sid in line for sid in IDS)


def test_duplicate_registration_raises() -> None:
    class Impostor(DDIM):
        name = "ddim"

    with pytest.raises(RuntimeError, match="registered twice"):
        register(Impostor)
    assert type(make_scheduler("ddim", SchedulerConfig())) is DDIM
    assert type(make_scheduler("sched::ddim", SchedulerConfig())) is DDIM


@pytest.mark.parametrize("class_name", sorted(CLASS_DEFAULTS))
def test_class_defaults_are_diffusers_signature_defaults(class_name: str) -> None:
    defaults = getattr(diffusers, class_name)().config  # built with no arguments: its registered defaults
    ours = CLASS_DEFAULTS[class_name]
    expected = {f.name: defaults[f.name] for f in dataclasses.fields(SchedulerConfig) if f.name in defaults}
    assert ours == expected


def test_every_port_names_the_diffusers_class_it_ports() -> None:
    for sid in IDS:
        cls = type(make_scheduler(sid, SD15))
        assert cls.diffusers_class == DIFFUSERS[sid][0] and cls.diffusers_class in CLASS_DEFAULTS


def test_a_config_without_clip_sample_gets_ddims_default_not_sd15s() -> None:
    config = CONFIGS["euler_minimal"]
    assert make_scheduler("ddim", config).config.clip_sample is True
    assert make_scheduler("ddim", config).config.set_alpha_to_one is True
    assert make_scheduler("euler", config).config.timestep_spacing == "linspace"
    assert make_scheduler("lcm", {}).config.beta_schedule == "scaled_linear"


def test_use_default_values_must_list_key_names() -> None:
    with pytest.raises(GenerateError, match="_use_default_values"):
        make_scheduler("ddim", {**SD15, "_use_default_values": "clip_sample"})


def test_config_from_dict_reads_sd15() -> None:
    config = SchedulerConfig.from_dict(SD15)
    assert config == SchedulerConfig()  # SD 1.5's values are the defaults


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("beta_schedule", "foo", "linear, scaled_linear, squaredcos_cap_v2"),
        ("prediction_type", "flow_prediction", "epsilon, v_prediction, sample"),
        ("timestep_spacing", "even", "leading, trailing, linspace"),
        ("clip_sample", "no", "true or false"),
        ("num_train_timesteps", 0, "at least 1"),
        ("trained_betas", [0.1, 0.2], "None"),
        ("rescale_betas_zero_snr", True, "False"),
        ("warp_drive", 9, "known keys"),
    ],
)
def test_config_from_dict_rejects_bad_values(key: str, value, expected: str) -> None:
    with pytest.raises(GenerateError) as info:
        SchedulerConfig.from_dict({**SD15, key: value})
    line = info.value.one_line()
    assert repr(key) in line and expected in line


def test_bad_requests_are_user_errors() -> None:
    with pytest.raises(GenerateError, match="between 1 and 1000"):
        make_scheduler("euler", SchedulerConfig()).set_timesteps(0)
    with pytest.raises(GenerateError, match="at most 50"):
        make_scheduler("lcm", SchedulerConfig()).set_timesteps(51)
    with pytest.raises(GenerateError, match="strength"):
        make_scheduler("ddim", SchedulerConfig()).set_timesteps(10).start_index(1.5)


def test_schedule_is_immutable_and_noise_needs_a_generator() -> None:
    sch = make_scheduler("euler_a", SchedulerConfig())
    schedule = sch.set_timesteps(5)
    with pytest.raises(ValueError):
        schedule.timesteps[0] = 0
    x = np.zeros(SHAPE, dtype=np.float32)
    with pytest.raises(InternalError, match="generator"):
        sch.step(schedule, x, 0, x, sch.initial_state(), None)
    out, _ = sch.step(schedule, x, 0, x, sch.initial_state(), np.random.default_rng(0))
    assert out.dtype == np.float32 and out.shape == SHAPE


def test_schedulers_import_without_torch() -> None:
    code = (
        "import sys\n"
        "for banned in ('torch', 'diffusers', 'transformers'): sys.modules[banned] = None\n"
        "import numpy as np\n"
        "from pocketsd.runtime.schedulers import SchedulerConfig, available, make_scheduler\n"
        "for sid in available():\n"
        "    sch = make_scheduler(sid, SchedulerConfig()); schedule = sch.set_timesteps(3)\n"
        "    x = np.ones((1, 4, 2, 2), np.float32)\n"
        "    sch.step(schedule, x, 0, x, sch.initial_state(), np.random.default_rng(0))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
