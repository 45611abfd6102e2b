"""What every export backend provides (``Backend``), what its ``prepare`` step hands back (``Prepared``), and the
registry the exporter looks them up in."""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from pocketsd.errors import PresetError
from pocketsd.registry import Registry

if TYPE_CHECKING:
    from pocketsd.export.components import ComponentSpec, Dims
    from pocketsd.export.preset import Preset
    from pocketsd.export.write_component import ChunkWriter, ComponentJob


@dataclass(frozen=True)
class Fp32Reference:
    """The uncompressed fp32 component's outputs on the export inputs, where a lossy step ran in PyTorch before the
    cut (CoreML compression, fp16 weights). The component's whole-chain check compares with these, not with the
    compressed PyTorch model, so that its figure covers the lossy step and the conversion together."""

    outputs: tuple[np.ndarray, ...]
    min_psnr_db: float  # the lossy step's own gate (export/compression/quality_gates.py)


@dataclass
class Prepared:
    """A component's module made ready for capture, and what the planner and writer need to know about it."""

    model: Any
    weight_bytes: dict[str, int] | None = None  # stored bytes per parameter, when they differ from fp32
    compressed: set[str] = field(default_factory=set)  # parameters stored compressed (palettized / quantized)
    extra: dict[str, Any] = field(default_factory=dict)  # component-level figures for the manifest
    fp32: Fp32Reference | None = None  # the uncompressed outputs, where a lossy step ran before the cut


# (spec, model, dims, preset, seed, scratch): scratch is a folder for large temporary files, on the bundle's disk
Prepare = Callable[["ComponentSpec", Any, "Dims", "Preset", int, Path], Prepared]


@dataclass(frozen=True)
class Backend:
    name: str
    prepare: Prepare  # the backend's lossy step (compression, quantization), measured and gated; may do nothing
    writer: Callable[[ComponentJob], ChunkWriter]  # makes the chunk writer of one component


BACKENDS: Registry[Backend] = Registry("backend", PresetError)
_PACKAGES = ("onnx", "coreml")  # each registers itself on import


def backend_for(name: str) -> Backend:
    for package in _PACKAGES:
        importlib.import_module(f"pocketsd.export.backends.{package}")
    return BACKENDS.get(name)
