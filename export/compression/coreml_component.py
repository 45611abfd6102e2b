"""Compress a component in PyTorch before it is captured and cut (CoreML presets): compress first, then cut.

The preset's per-component compression config (global → op type → op name, or a mixed-bit recipe) is applied with
coremltools.optimize.torch; the weights then hold exactly what CoreML will store, so the component's quality is
measured here in PyTorch, and the planner balances chunks by their *stored* (compressed) bytes. That figure is a
gate (export/compression/quality_gates.py): below the recipe's threshold the export stops before anything is captured. A
component of an fp16 preset that is not compressed goes through here too, with no layers: its weights are rounded
through fp16, as the package stores them, and gated the same way.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pocketsd.export.capture import as_outputs, example_inputs, run_component
from pocketsd.export.components import ComponentSpec, Dims
from pocketsd.export.components.base import WRAPPED
from pocketsd.export.compression.coreml_optimize import (
    CompressionConfig,
    choose_mixed_bits,
    compress,
    resolve_layers,
    round_to_fp16,
    stored_weight_bytes,
)
from pocketsd.export.compression.quality_gates import GateRow, coreml_threshold, enforce
from pocketsd.export.parity import compare_all

log = logging.getLogger(__name__)


@dataclass
class Compressed:
    model: torch.nn.Module
    stored_bytes: dict[str, int]  # per parameter, qualified as the captured graph names it
    compressed: set[str]  # parameters stored compressed
    report: dict[str, Any]
    gate: GateRow  # the component against fp32 (export/compression/quality_gates.py), passed
    fp32_outputs: tuple[np.ndarray, ...]  # the uncompressed fp32 component's outputs on the seeded export inputs


def stored_bytes_only(model: torch.nn.Module, precision: str) -> dict[str, int]:
    return stored_weight_bytes(model, precision, prefix=f"{WRAPPED}.")


def compress_component(spec: ComponentSpec, model: torch.nn.Module, dims: Dims, config: CompressionConfig,
                       precision: str, seed: int = 0, scratch: Path | None = None) -> Compressed:
    """Compress ``model`` as ``config`` says (an empty config compresses nothing), round it through fp16 where the
    package computes in fp16, and gate the result against the fp32 model (``ParityError`` below the threshold).
    ``scratch``: where a mixed-bit search spills its palettes (default: ``tempfile``'s folder)."""
    if spec.subfolder == "vae":  # the decoder and the encoder share one VAE; compress a copy for this one
        model = copy.deepcopy(model)
    examples = example_inputs(spec, dims, seed)
    reference = run_component(spec, model, examples)
    fp32_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if config.mixed_bit is not None:
        # with autograd on: the search ranks layers by a gradient estimate of their effect on the output
        layers, mixed = choose_mixed_bits(model, lambda m: as_outputs(spec.make_wrapper(m).eval()(*examples)), config,
                                          scratch=scratch)
    else:
        layers, mixed = resolve_layers(model, config), None
    compress(model, layers)  # a no-op for layers the mixed-bit search already left in their chosen state
    if precision == "fp16":
        round_to_fp16(model)  # what the package stores (compress already did it for compressed components)
    fp32_outputs = tuple(r.detach().float().numpy() for r in reference)
    figures = compare_all(fp32_outputs, [x.detach().float().numpy() for x in run_component(spec, model, examples)])
    threshold = coreml_threshold(spec.id, layers, config.mixed_bit, config.min_psnr_db)
    step = "fp16 weights (simulated)" if not layers else f"{_recipe_text(layers)} compression (simulated)"
    row = GateRow(spec.id, step, f"{spec.id} ({'fp16' if not layers else 'compressed'} vs fp32)", figures.psnr_db,
                  figures.max_abs, threshold)
    log.info("%s: %d layers compressed, simulated PSNR %.1f dB (needs %.1f)", spec.id, len(layers), figures.psnr_db,
             threshold.min_psnr_db)
    enforce([row], "use more bits (or fewer compressed layers) for this component, or lower its min_psnr_db if "
                   "you accept the loss" if layers else "its weights do not survive fp16 (one beyond ±65504 is "
                   "inf): export with precision fp32, or lower its min_psnr_db if you accept the loss")
    stored = stored_bytes_only(model, precision)
    histogram: dict[str, int] = {}
    for layer in layers.values():
        key = f"{layer.mode}:{layer.nbits}"
        histogram[key] = histogram.get(key, 0) + 1
    report = {
        "psnr_db": figures.psnr_db, "min_psnr_db": threshold.min_psnr_db, "layers": len(layers), "modes": histogram,
        "fp32_weight_bytes": int(fp32_bytes), "stored_weight_bytes": int(sum(stored.values())),
        "simulated_in": "pytorch (coremltools.optimize.torch), same palettes as the mlpackages",
        **({"mixed_bit": mixed} if mixed else {}),
    }
    return Compressed(model, stored, {f"{WRAPPED}.{path}.weight" for path in layers}, report, row, fp32_outputs)


def _recipe_text(layers: dict) -> str:
    return "+".join(sorted({f"{c.mode}:{c.nbits}" for c in layers.values()}))
