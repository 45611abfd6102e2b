"""Compress a component in PyTorch before it is captured and cut (CoreML presets): compress first, then cut.

The preset's per-component compression config (global → op type → op name, or a mixed-bit recipe) is applied with
coremltools.optimize.torch; the weights then hold exactly what CoreML will store, so the component's quality is
measured here in PyTorch, and the planner balances chunks by their *stored* (compressed) bytes.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any

import torch

from pocketsd.export.capture import example_inputs, run_component
from pocketsd.export.components import ComponentSpec, Dims
from pocketsd.export.components.base import WRAPPED
from pocketsd.export.compression import (
    CompressionConfig,
    choose_mixed_bits,
    compress,
    resolve_layers,
    simulated_psnr,
    stored_weight_bytes,
)

log = logging.getLogger(__name__)


@dataclass
class Compressed:
    model: torch.nn.Module
    stored_bytes: dict[str, int]  # per parameter, qualified as the captured graph names it
    compressed: set[str]  # parameters stored compressed
    report: dict[str, Any]


def _outputs(result: Any) -> tuple[torch.Tensor, ...]:
    return result if isinstance(result, tuple) else (result,)


def stored_bytes_only(model: torch.nn.Module, precision: str) -> dict[str, int]:
    return stored_weight_bytes(model, precision, prefix=f"{WRAPPED}.")


def compress_component(spec: ComponentSpec, model: torch.nn.Module, dims: Dims, config: CompressionConfig,
                       precision: str, seed: int = 0) -> Compressed:
    if spec.subfolder == "vae":  # the decoder and the encoder share one VAE; compress a copy for this one
        model = copy.deepcopy(model)
    examples = example_inputs(spec, dims, seed)
    reference = run_component(spec, model, examples)
    fp32_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if config.mixed_bit is not None:
        # with autograd on: the search ranks layers by a gradient estimate of their effect on the output
        layers, mixed = choose_mixed_bits(model, lambda m: _outputs(spec.make_wrapper(m).eval()(*examples)), config)
    else:
        layers, mixed = resolve_layers(model, config), None
    compress(model, layers)  # a no-op for layers the mixed-bit search already left in their chosen state
    psnr = simulated_psnr(reference, run_component(spec, model, examples))
    stored = stored_bytes_only(model, precision)
    histogram: dict[str, int] = {}
    for layer in layers.values():
        key = f"{layer.mode}:{layer.nbits}"
        histogram[key] = histogram.get(key, 0) + 1
    report = {
        "psnr_db": round(psnr, 2), "layers": len(layers), "modes": histogram,
        "fp32_weight_bytes": int(fp32_bytes), "stored_weight_bytes": int(sum(stored.values())),
        "simulated_in": "pytorch (coremltools.optimize.torch), same palettes as the mlpackages",
        **({"mixed_bit": mixed} if mixed else {}),
    }
    log.info("%s: compressed %d layers, simulated PSNR %.1f dB, %.1f MB stored", spec.id, len(layers), psnr,
             report["stored_weight_bytes"] / 1e6)
    return Compressed(model, stored, {f"{WRAPPED}.{path}.weight" for path in layers}, report)
