"""What export, runtime, Apple layout and bench agree on, as data, in one place: dtypes, CoreML deployment targets and
compute units, and the tensor names of each component's inputs and outputs.

Standard library only (no torch, onnx or numpy): the torch-free runtime imports it, ``import pocketsd`` stays light,
and bench/worker_protocol.py loads this file by path in environments that have no pocketsd. Every other table of
these (numpy or torch dtypes, CoreML spec versions, compute-unit names) is derived from here where it is used.

The tensor names are those of Apple's Swift ``StableDiffusionPipeline`` and of every bundle on disk: changing one
breaks existing bundles and the Apple layout.
"""

from __future__ import annotations

from dataclasses import dataclass

# Tensor dtypes a bundle may declare, by name (numpy's and ONNX's names), and their size in bytes.
# bool: e.g. a causal mask crossing a text-encoder cut.
DTYPE_BYTES = {"float32": 4, "float16": 2, "int64": 8, "int32": 4, "bool": 1}
DTYPES = tuple(DTYPE_BYTES)


@dataclass(frozen=True)
class DeploymentTarget:
    """A CoreML deployment target: ``level`` is the iOS release with the same CoreML opset (macOS13 → 16),
    ``spec_version`` the ``specificationVersion`` an ML program converted for it is written with."""

    name: str
    level: int
    spec_version: int


# The deployment targets CoreML presets accept. Compression needs level 16; grouped or 3-bit palettes need 18.
DEPLOYMENT_TARGETS = {t.name: t for t in (
    DeploymentTarget("iOS16", 16, 7), DeploymentTarget("iOS17", 17, 8), DeploymentTarget("iOS18", 18, 9),
    DeploymentTarget("macOS13", 16, 7), DeploymentTarget("macOS14", 17, 8), DeploymentTarget("macOS15", 18, 9),
)}
DEFAULT_DEPLOYMENT_TARGET = "iOS17"


def targets_at(level: int) -> str:
    """The targets of one level as users read them, e.g. ``iOS18/macOS15``."""
    return "/".join(t.name for t in DEPLOYMENT_TARGETS.values() if t.level == level)


# Where CoreML runs a model: the names presets and ``--compute-units`` take → coremltools' ``ct.ComputeUnit`` member.
COMPUTE_UNITS = {"all": "ALL", "cpu_only": "CPU_ONLY", "cpu_and_gpu": "CPU_AND_GPU", "cpu_and_ne": "CPU_AND_NE"}
DEFAULT_COMPUTE_UNITS = "all"  # the runtime's default on macOS


@dataclass(frozen=True)
class TextEncoderIO:
    """CLIP text encoder: float32 token ids → per-token hidden states and the pooled end-of-text state."""

    input_ids: str = "input_ids"
    last_hidden_state: str = "last_hidden_state"
    pooled_outputs: str = "pooled_outputs"
    # SDXL's encoders give the UNet their penultimate layer's states (Apple's name), and the second its projection
    hidden_embeds: str = "hidden_embeds"


@dataclass(frozen=True)
class UnetIO:
    """UNet: (noisy latents, timestep, text states) → the model output (epsilon or v)."""

    sample: str = "sample"
    timestep: str = "timestep"
    encoder_hidden_states: str = "encoder_hidden_states"
    noise_pred: str = "noise_pred"
    # SDXL's added conditioning: the second text encoder's pooled projection, and the six size/crop numbers
    text_embeds: str = "text_embeds"
    time_ids: str = "time_ids"
    # an LCM-distilled UNet's guidance-scale embedding (diffusers' ``timestep_cond``)
    timestep_cond: str = "timestep_cond"


@dataclass(frozen=True)
class VaeDecoderIO:
    """VAE decoder: scaled latents ``z`` → ``image`` in [-1, 1]."""

    z: str = "z"
    image: str = "image"


@dataclass(frozen=True)
class VaeEncoderIO:
    """VAE encoder: image ``x`` in [-1, 1] → ``latent`` (mean and log-variance stacked on channels)."""

    x: str = "x"
    latent: str = "latent"


TEXT_ENCODER_IO = TextEncoderIO()
UNET_IO = UnetIO()
VAE_DECODER_IO = VaeDecoderIO()
VAE_ENCODER_IO = VaeEncoderIO()

# Images one generate call makes from one prompt (each is one row of every UNet call): checked by the CLI before the
# bundle is loaded and by the pipeline.
MAX_IMAGES = 64
