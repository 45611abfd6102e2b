"""The CoreML backend's lossy step: the preset's compression (palettes, linear int8, mixed-bit), or fp16 weights
alone, applied with coremltools.optimize.torch, measured and gated against fp32
(export/compression/coreml_component.py). An fp32 component compressed nowhere goes through unchanged."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pocketsd.export.backends.base import Fp32Reference, Prepared
from pocketsd.export.components import ComponentSpec, Dims
from pocketsd.export.preset import Preset


def prepare(spec: ComponentSpec, model: Any, dims: Dims, preset: Preset, seed: int, scratch: Path) -> Prepared:
    from pocketsd.export.compression.coreml_component import compress_component, stored_bytes_only
    from pocketsd.export.compression.coreml_config import CompressionConfig

    config = preset.coreml.compression.get(spec.settings_id)
    if config is None and preset.precision != "fp16":
        return Prepared(model, stored_bytes_only(model, preset.precision))
    done = compress_component(spec, model, dims, config or CompressionConfig(), preset.precision, seed,
                              scratch=scratch)
    fp16 = {**done.gate.manifest_entry(), "simulated_in": "pytorch, weights rounded through fp16 as stored"}
    extra = {"compression": done.report} if done.compressed else {"fp16": fp16}
    return Prepared(done.model, done.stored_bytes, done.compressed, extra,
                    Fp32Reference(done.fp32_outputs, done.gate.threshold.min_psnr_db))
