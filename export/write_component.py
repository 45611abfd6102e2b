"""Plan, cut and write one captured component: the part of the export that needs torch.

Writers obey the plan: boundaries come from ``split_strategies``; a backend's writer (export/backends/<name>/
writer.py) only converts each chunk module and checks the file it wrote. The reference value of every boundary
tensor is computed here, in PyTorch, and kept as numpy arrays, so that the model can be released before the
chunks are finished and run against them (``check_component.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from pocketsd.export.backends.base import Fp32Reference, backend_for
from pocketsd.export.capture import Captured
from pocketsd.export.parity import ParityGate
from pocketsd.export.plan import BoundaryTensor, ComponentPlan, analyze_cuts, build_plan
from pocketsd.export.preset import Preset
from pocketsd.export.slicing import ChunkModule, slice_plan
from pocketsd.export.split_strategies import STRATEGIES
from pocketsd.runtime.manifest import Chunk, TensorSpec
from pocketsd.runtime.sessions import SessionOptions

log = logging.getLogger(__name__)


@dataclass
class ComponentJob:
    """Everything a backend writer needs for one component."""

    captured: Captured
    plan: ComponentPlan
    chunks: list[ChunkModule]
    values: dict[str, torch.Tensor]  # reference value of every boundary tensor, by FX value name
    preset: Preset
    folder: Path  # <bundle>/<component id>/
    bundle_dir: Path
    gate: ParityGate
    progress: bool = True
    weight_bytes: dict[str, int] | None = None  # stored bytes per parameter, when they differ from fp32
    compressed: set[str] = field(default_factory=set)  # parameters stored compressed (palettized / int8)
    extra: dict = field(default_factory=dict)  # component-level figures (e.g. compression) for the manifest

    @property
    def threshold(self) -> float:
        return self.preset.parity.threshold(self.captured.spec.settings_id)


class ChunkWriter(Protocol):
    format: str

    def write(self, job: ComponentJob, chunk: ChunkModule, example: list[torch.Tensor]) -> Chunk:
        """Write the chunk's file(s) under ``job.folder``, check them, and describe them (no parity yet). The writer
        keeps no reference to ``job`` or ``chunk``: they hold the torch model, which goes before ``finish``."""

    def finish(self, chunk: Chunk, bundle_dir: Path) -> Chunk:
        """What the backend makes of a written chunk without torch (e.g. ONNX's optimized graph), before it runs."""

    def runnable(self) -> str | None:
        """None if chunks can run on this machine, else the reason they cannot."""

    def session_options(self) -> SessionOptions: ...


def spec_of(t: BoundaryTensor) -> TensorSpec:
    return TensorSpec(t.name, t.dtype, tuple(t.shape), t.source)


def plan_component(captured: Captured, preset: Preset, weight_bytes: dict[str, int] | None = None) -> ComponentPlan:
    request = preset.split_for(captured.spec.settings_id)
    summary = captured.summary
    table = analyze_cuts(summary, weight_bytes)
    positions, reason = STRATEGIES.get(request.strategy)(summary, table, request)
    return build_plan(summary, positions, strategy=f"split::{request.strategy}",
                      request={k: v for k, v in vars(request).items() if v is not None}, reason=reason,
                      output_names=[t.name for t in captured.outputs], input_names=[t.name for t in captured.inputs],
                      weight_bytes=weight_bytes)


def reference_values(captured: Captured, chunks: list[ChunkModule]) -> dict[str, torch.Tensor]:
    """Run the chunk modules in PyTorch, in order: every boundary tensor's reference value, by FX value name."""
    values = dict(zip(captured.summary.inputs, captured.example_inputs))
    with torch.no_grad():
        for chunk in chunks:
            results = chunk.module(*[values[v] for v in chunk.plan.input_values])
            values.update(zip(chunk.plan.output_values, results))
    return values


@dataclass
class WrittenComponent:
    """A component whose chunk files are written: what its checks need, as numpy arrays. Nothing here holds the
    torch model, so the exporter can let the model go before any chunk is run (``check_component.py``)."""

    id: str
    inputs: tuple[TensorSpec, ...]
    plan: ComponentPlan
    chunks: list[Chunk]
    values: dict[str, np.ndarray]  # reference value of every boundary tensor (and component input), by FX value
    input_values: tuple[str, ...]  # FX values of the component's inputs
    output_values: tuple[str, ...]  # FX values of the component's outputs
    reference_outputs: tuple[np.ndarray, ...]
    threshold: float
    writer: ChunkWriter
    gate: ParityGate
    extra: dict = field(default_factory=dict)
    fp32: Fp32Reference | None = None  # set by the exporter where a lossy step came before the cut


def write_component(captured: Captured, preset: Preset, bundle_dir: Path, *, progress: bool = True,
                    weight_bytes: dict[str, int] | None = None, compressed: set[str] | None = None,
                    extra: dict | None = None) -> WrittenComponent:
    """Plan, cut and write every chunk of ``captured`` (the part that needs torch); nothing is run yet."""
    plan = plan_component(captured, preset, weight_bytes)
    chunk_modules = slice_plan(captured.graph_module, plan)
    folder = bundle_dir / captured.spec.id
    folder.mkdir()
    job = ComponentJob(captured, plan, chunk_modules, reference_values(captured, chunk_modules), preset, folder,
                       bundle_dir, ParityGate(), progress, weight_bytes, set(compressed or ()), dict(extra or {}))
    writer = backend_for(preset.backend).writer(job)
    chunks = []
    for cm in tqdm(job.chunks, desc=f"  {captured.spec.id}", unit="chunk", leave=False, disable=not progress):
        chunks.append(writer.write(job, cm, [job.values[v] for v in cm.plan.input_values]))
    return WrittenComponent(
        id=captured.spec.id, inputs=captured.inputs, plan=plan, chunks=chunks,
        values={v: x.numpy() for v, x in job.values.items()}, input_values=tuple(captured.summary.inputs),
        output_values=tuple(captured.summary.outputs),
        reference_outputs=tuple(r.numpy() for r in captured.reference_outputs), threshold=job.threshold,
        writer=writer, gate=job.gate, extra=job.extra)
