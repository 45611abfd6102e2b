"""The contract with Apple's open-source Swift ``StableDiffusionPipeline`` (apple/ml-stable-diffusion), as data.

What its Resources loader expects of each file: names (``StableDiffusionPipeline+Resources.swift``), and the
features each model is fed and read by (``TextEncoder.swift``, ``Unet.swift``, ``Decoder.swift``,
``Encoder.swift``, ``ManagedMLModel.swift``). Shapes use the bundle's dims. ``check_layout`` tests a written
Resources folder against it; apple/README.md explains each row.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

from pocketsd.contract import TEXT_ENCODER_IO, UNET_IO

# dims → shape, per feature; "batch" is the UNet batch (1: two calls per step for guidance, 2: one call)
Shape = Callable[[dict[str, int]], tuple[int, ...]]


@dataclass(frozen=True)
class Feature:
    name: str | None  # None: the Swift code takes the first feature, whatever its name
    dtype: str
    shape: Shape


@dataclass(frozen=True)
class ModelContract:
    file: str  # without extension: .mlmodelc once compiled (what Swift loads), .mlpackage before
    component: str
    required: bool
    inputs: tuple[Feature, ...]
    outputs: tuple[Feature, ...]  # features the Swift code reads; others may exist
    single_output: bool = False


def _latent(d: dict[str, int]) -> tuple[int, ...]:
    return (d["unet_batch"], d["latent_channels"], d["latent_height"], d["latent_width"])


MODELS: tuple[ModelContract, ...] = (
    ModelContract("TextEncoder", "text_encoder", True,
                  (Feature(None, "float32", lambda d: (1, d["text_length"])),),
                  (Feature(TEXT_ENCODER_IO.last_hidden_state, "float32",
                           lambda d: (1, d["text_length"], d["text_hidden"])),)),
    ModelContract("Unet", "unet", True,
                  (Feature(UNET_IO.sample, "float32", lambda d: (d["unet_batch"], d.get("unet_in_channels",
                                                                                   d["latent_channels"]),
                                                                 d["latent_height"], d["latent_width"])),
                   Feature(UNET_IO.timestep, "float32", lambda d: (d["unet_batch"],)),
                   Feature(UNET_IO.encoder_hidden_states, "float32",
                           lambda d: (d["unet_batch"], d["text_hidden"], 1, d["text_length"]))),
                  (Feature(None, "float32", _latent),), single_output=True),
    ModelContract("VAEDecoder", "vae_decoder", True,
                  (Feature(None, "float32",
                           lambda d: (1, d["latent_channels"], d["latent_height"], d["latent_width"])),),
                  (Feature(None, "float32", lambda d: (1, 3, d["height"], d["width"])),)),
    ModelContract("VAEEncoder", "vae_encoder", False,
                  (Feature(None, "float32", lambda d: (1, 3, d["height"], d["width"])),),
                  (Feature(None, "float32",
                           lambda d: (1, 2 * d["latent_channels"], d["latent_height"], d["latent_width"])),)),
)

# SDXL (Apple's StableDiffusionXLPipeline, TextEncoderXL.swift): both text encoders give hidden_embeds and
# pooled_outputs; the UNet also takes text_embeds (the second encoder's pooled projection) and time_ids.
def _text_xl(file: str, component: str, width: str, pooled: str) -> ModelContract:
    return ModelContract(file, component, True, (Feature(None, "float32", lambda d: (1, d["text_length"])),),
                         (Feature(TEXT_ENCODER_IO.hidden_embeds, "float32",
                                  lambda d: (1, d["text_length"], d[width])),
                          Feature(TEXT_ENCODER_IO.pooled_outputs, "float32", lambda d: (1, d[pooled]))))


_SD_UNET = MODELS[1]
MODELS_XL: tuple[ModelContract, ...] = (
    _text_xl("TextEncoder", "text_encoder", "text_hidden_1", "text_hidden_1"),
    _text_xl("TextEncoder2", "text_encoder_2", "text_hidden_2", "pooled_dim"),
    ModelContract("Unet", "unet", True,
                  (*_SD_UNET.inputs,
                   Feature(UNET_IO.text_embeds, "float32", lambda d: (d["unet_batch"], d["pooled_dim"])),
                   Feature(UNET_IO.time_ids, "float32", lambda d: (d["unet_batch"], 6))),
                  _SD_UNET.outputs, single_output=True),
    *MODELS[2:],
)


def models_for(components: Sequence[str]) -> tuple[ModelContract, ...]:
    """The contract of a bundle's family: SDXL's when it has a second text encoder."""
    return MODELS_XL if "text_encoder_2" in components else MODELS


TOKENIZER_FILES = ("vocab.json", "merges.txt")
MAX_UNET_CHUNKS = 2  # UnetChunk1 + UnetChunk2; the Swift loader looks for no third
UNET_CHUNK_FILES = ("UnetChunk1", "UnetChunk2")


def file_names(component: str, n_chunks: int) -> list[str]:
    """The Resources names of a component's chunks: one model, or (UNet only) UnetChunk1/UnetChunk2."""
    model = next(m for m in (*MODELS, *MODELS_XL) if m.component == component)
    if n_chunks == 1:
        return [model.file]
    if component == "unet" and n_chunks <= MAX_UNET_CHUNKS:
        return list(UNET_CHUNK_FILES[:n_chunks])
    raise ValueError(f"{component} in {n_chunks} chunks has no name in Apple's layout")


def chained_inputs_ok(stage_inputs: Sequence[Sequence[str]], stage_outputs: Sequence[Sequence[str]],
                      model_inputs: Sequence[str]) -> list[str]:
    """Swift feeds stage k+1 with stage k's outputs merged over the model's original inputs, by name."""
    problems = []
    for k in range(1, len(stage_inputs)):
        available = set(stage_outputs[k - 1]) | set(model_inputs)
        missing = [name for name in stage_inputs[k] if name not in available]
        if missing:
            problems.append(f"chunk {k + 1} needs {missing}, which neither chunk {k} nor the UNet inputs provide")
    return problems
