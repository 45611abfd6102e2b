"""Plan, cut and write one captured component: the part of the export that needs torch.

Writers obey the plan: boundaries come from ``split_strategies``; a backend's writer (export/backends/<name>/
writer.py) only converts each chunk module and checks the file it wrote. The reference value of every boundary
tensor is computed here, in PyTorch, and kept as numpy arrays, so that the model can be released before the
chunks are finished and run against them (``check_component.py``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm import tqdm

from pocketsd.errors import InternalError, PlanError
from pocketsd.export.backends.base import Fp32Reference, backend_for
from pocketsd.export.capture import Captured
from pocketsd.export.parity import ParityGate
from pocketsd.export.plan import (
    BoundaryTensor,
    ComponentPlan,
    CutTable,
    PlannedChunk,
    analyze_cuts,
    build_plan,
    describe_bytes,
)
from pocketsd.export.preset import Preset
from pocketsd.export.slicing import ChunkModule, slice_chunk, slice_plan
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
    if captured.prefix is not None:
        positions, reason = _with_prefix(captured, table, positions, reason, request.max_bytes)
    plan = build_plan(summary, positions, strategy=f"split::{request.strategy}",
                      request=request.fields(), reason=reason,
                      output_names=[t.name for t in captured.outputs], input_names=[t.name for t in captured.inputs],
                      weight_bytes=weight_bytes)
    return plan if captured.prefix is None else _per_row_first(captured, plan, weight_bytes)


def _with_prefix(captured: Captured, table: CutTable, positions: list[int], reason: str,
                 budget: int | None) -> tuple[list[int], str]:
    """The strategy's cuts after the shared prefix, and the prefix's own cut (within a ``max_bytes`` budget)."""
    assert captured.prefix is not None
    end = captured.prefix.ops
    if table.clean is None or not table.clean[end]:
        raise InternalError(f"{captured.spec.id}: the shared prefix ends where a weight or a non-tensor value "
                            "crosses the cut")
    if budget is not None and table.weight_before[end] > budget:
        raise PlanError(f"{captured.spec.id}: its shared prefix holds {describe_bytes(table.weight_before[end])} of "
                        f"weights, more than the {describe_bytes(budget)} per-chunk budget",
                        "raise the budget, or remove shared_prefix from the preset's split")
    kept = sorted(p for p in positions if p > end)
    return [end, *kept], (f"{reason}; before them the shared prefix ({end} ops before the text enters), a chunk "
                          "run once per distinct row")


def _row_chunk(captured: Captured, plan: ComponentPlan, weight_bytes: dict[str, int] | None) -> PlannedChunk:
    """The shared prefix planned on the batch-1 graph: its boundary at one row's shapes, its values named as in
    that graph (for slicing it)."""
    assert captured.rows is not None
    return build_plan(captured.rows.summary, [captured.rows.prefix.ops], strategy=plan.strategy, request=plan.request,
                      reason=plan.reason, output_names=[t.name for t in captured.outputs],
                      input_names=[t.name for t in captured.inputs], weight_bytes=weight_bytes).chunks[0]


def _per_row_first(captured: Captured, plan: ComponentPlan, weight_bytes: dict[str, int] | None) -> ComponentPlan:
    """``plan`` with its first chunk, the shared prefix, as the batch-1 graph has it: the same boundary tensors
    (names, order, and all but the batch of their shapes) at one row's shapes. Its values keep the batch graph's
    names, which the reference values and the later chunks use (``slice_component`` slices it by its own)."""
    rows, first = _row_chunk(captured, plan, weight_bytes), plan.chunks[0]
    ends = [[(t.name, t.dtype, t.shape[1:]) for t in c.inputs + c.outputs] for c in (rows, first)]
    if ends[0] != ends[1]:
        raise InternalError(f"{captured.spec.id}: the shared prefix captured at batch 1 has another boundary than at "
                            f"the batch ({[t.name for t in rows.outputs]} vs {[t.name for t in first.outputs]})")
    chunk = replace(rows, per_row=True, input_values=first.input_values, output_values=first.output_values)
    return replace(plan, chunks=(chunk, *plan.chunks[1:]))


def slice_component(captured: Captured, plan: ComponentPlan,
                    weight_bytes: dict[str, int] | None = None) -> list[ChunkModule]:
    """The plan's chunk modules: a per-row chunk cut from the batch-1 graph, the others from the captured one."""
    modules = iter(slice_plan(captured.graph_module,
                              replace(plan, chunks=tuple(c for c in plan.chunks if not c.per_row))))
    return [ChunkModule(c, slice_chunk(captured.rows.graph_module, _row_chunk(captured, plan, weight_bytes)))
            if c.per_row and captured.rows is not None else next(modules) for c in plan.chunks]


def _run_chunk(chunk: ChunkModule, feeds: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    if not chunk.plan.per_row:
        return tuple(chunk.module(*feeds))
    rows = [chunk.module(*[x[r:r + 1] for x in feeds]) for r in range(len(feeds[0]))]
    return tuple(torch.cat(parts) for parts in zip(*rows))


def reference_values(captured: Captured, chunks: list[ChunkModule]) -> dict[str, torch.Tensor]:
    """Run the chunk modules in PyTorch, in order: every boundary tensor's reference value, by FX value name (a
    per-row chunk's outputs: its rows' outputs stacked, as the runtime stacks them)."""
    values = dict(zip(captured.summary.inputs, captured.example_inputs))
    with torch.no_grad():
        for chunk in chunks:
            results = _run_chunk(chunk, [values[v] for v in chunk.plan.input_values])
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
    chunk_modules = slice_component(captured, plan, weight_bytes)
    folder = bundle_dir / captured.spec.id
    folder.mkdir()
    job = ComponentJob(captured, plan, chunk_modules, reference_values(captured, chunk_modules), preset, folder,
                       bundle_dir, ParityGate(), progress, weight_bytes, set(compressed or ()), dict(extra or {}))
    writer = backend_for(preset.backend).writer(job)
    chunks = []
    for cm in tqdm(job.chunks, desc=f"  {captured.spec.id}", unit="chunk", leave=False, disable=not progress):
        example = [job.values[v][:1] if cm.plan.per_row else job.values[v] for v in cm.plan.input_values]
        chunk = writer.write(job, cm, example)
        chunks.append(replace(chunk, per_row=True) if cm.plan.per_row else chunk)
    return WrittenComponent(
        id=captured.spec.id, inputs=captured.inputs, plan=plan, chunks=chunks,
        values={v: x.numpy() for v, x in job.values.items()}, input_values=tuple(captured.summary.inputs),
        output_values=tuple(captured.summary.outputs),
        reference_outputs=tuple(r.numpy() for r in captured.reference_outputs), threshold=job.threshold,
        writer=writer, gate=job.gate, extra=job.extra)
