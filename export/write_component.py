"""Plan, cut, write and check one captured component; returns its manifest entry.

Writers obey the plan: boundaries come from ``split_strategies``; a backend's writer (``writer::onnx``,
``writer::coreml``) only converts each chunk module and checks the file it wrote. Where the backend can run here,
every chunk then runs on the inputs PyTorch fed it (per-chunk parity) and the whole chain runs end to end on the
backend's own outputs (component parity), one chunk session open at a time. Where it cannot (CoreML off macOS), the
manifest says so and the writer's structural checks and the PyTorch-simulated compression figures are the gate.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Protocol

import torch
from tqdm import tqdm

from pocketsd.export.capture import Captured
from pocketsd.export.parity import ParityGate, compare_all
from pocketsd.export.plan import BoundaryTensor, ComponentPlan, analyze_cuts, build_plan
from pocketsd.export.preset import Preset
from pocketsd.export.slicing import ChunkModule, slice_plan
from pocketsd.export.split_strategies import STRATEGIES
from pocketsd.registry import Registry
from pocketsd.runtime.manifest import Chunk, Component, TensorSpec
from pocketsd.runtime.sessions import SessionOptions, open_chunk

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
        """Write the chunk's file(s) under ``job.folder``, check them, and describe them (no parity yet)."""

    def runnable(self) -> str | None:
        """None if chunks can run on this machine, else the reason they cannot."""

    def session_options(self) -> SessionOptions: ...


WRITERS: Registry[Callable[[ComponentJob], ChunkWriter]] = Registry("writer")


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


def write_component(captured: Captured, preset: Preset, bundle_dir: Path, *, progress: bool = True,
                    weight_bytes: dict[str, int] | None = None, compressed: set[str] | None = None,
                    extra: dict | None = None) -> tuple[Component, ComponentPlan]:
    from pocketsd.export import coreml_chunks, onnx_chunks  # noqa: F401  (each registers its writer)

    plan = plan_component(captured, preset, weight_bytes)
    chunk_modules = slice_plan(captured.graph_module, plan)
    folder = bundle_dir / captured.spec.id
    folder.mkdir()
    job = ComponentJob(captured, plan, chunk_modules, reference_values(captured, chunk_modules), preset, folder,
                       bundle_dir, ParityGate(), progress, weight_bytes, set(compressed or ()), dict(extra or {}))
    component = _write_and_check(job, WRITERS.get(preset.backend)(job))
    job.gate.raise_if_failed()
    return component, plan


def _write_and_check(job: ComponentJob, writer: ChunkWriter) -> Component:
    captured, cid = job.captured, job.captured.spec.id
    not_run = writer.runnable()
    chained = {v: x.numpy() for v, x in zip(captured.summary.inputs, captured.example_inputs)}
    chunks = []
    for cm in tqdm(job.chunks, desc=f"  {cid}", unit="chunk", leave=False, disable=not job.progress):
        example = [job.values[v] for v in cm.plan.input_values]
        chunk = writer.write(job, cm, example)
        if not_run is None:
            session = open_chunk(job.bundle_dir, chunk, writer.session_options())
            names = [t.name for t in cm.plan.inputs]
            got = session.run({n: x.numpy() for n, x in zip(names, example)})
            figures = compare_all([job.values[v].numpy() for v in cm.plan.output_values],
                                  [got[t.name] for t in cm.plan.outputs])
            chunk = replace(chunk, parity=job.gate.check(cm.plan.id, figures, job.threshold))
            got = session.run({n: chained[v] for n, v in zip(names, cm.plan.input_values)})
            chained.update((v, got[t.name]) for v, t in zip(cm.plan.output_values, cm.plan.outputs))
            del session
        chunks.append(chunk)
    parity, extra = None, dict(job.extra)
    if not_run is None:
        figures = compare_all([r.numpy() for r in captured.reference_outputs],
                              [chained[v] for v in captured.summary.outputs])
        parity = job.gate.check(f"{cid} (whole)", figures, job.threshold)
    else:
        extra["parity_not_run"] = not_run
    return Component(id=cid, inputs=captured.inputs, outputs=tuple(spec_of(t) for t in job.plan.outputs),
                     chunks=tuple(chunks), parity=parity, extra=extra)
