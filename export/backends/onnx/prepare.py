"""The ONNX backend's lossy step: weight quantization (int8 / int4) where the preset asks for it, done in PyTorch
before the cut and gated against fp32 (export/compression/onnx_weights.py); otherwise the module as it is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pocketsd.export.backends.base import Prepared
from pocketsd.export.components import ComponentSpec, Dims
from pocketsd.export.preset import Preset


def prepare(spec: ComponentSpec, model: Any, dims: Dims, preset: Preset, seed: int, scratch: Path) -> Prepared:
    config = preset.quantize.get(spec.settings_id)
    if config is None:
        return Prepared(model)
    from pocketsd.export.compression.onnx_weights import quantize_component

    done = quantize_component(spec, model, dims, config, seed)
    return Prepared(done.model, done.stored_bytes, done.compressed, {"quantization": done.report})
