"""Plan, cut, write and check one captured component; returns its manifest entry.

Writers obey the plan: the boundaries come from ``split_strategies``, the backend only converts each chunk module.
Every chunk is run on the reference inputs PyTorch fed it, and the whole chain end to end on its own outputs; the
figures go into the manifest and the preset's thresholds gate them.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from pocketsd.errors import PresetError
from pocketsd.export import onnx_writer
from pocketsd.export.bundle_files import file_ref
from pocketsd.export.capture import Captured
from pocketsd.export.parity import ParityGate, compare_all
from pocketsd.export.plan import ComponentPlan, analyze_cuts, build_plan
from pocketsd.export.preset import Preset
from pocketsd.export.slicing import ChunkModule, slice_plan
from pocketsd.export.split_strategies import STRATEGIES
from pocketsd.runtime.manifest import Chunk, Component, TensorSpec
from pocketsd.runtime.sessions import SessionOptions, open_chunk

log = logging.getLogger(__name__)


def plan_component(captured: Captured, preset: Preset, weight_bytes: dict[str, int] | None = None) -> ComponentPlan:
    request = preset.split_for(captured.spec.id)
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


def _spec(t) -> TensorSpec:
    return TensorSpec(t.name, t.dtype, tuple(t.shape), t.source)


def write_component(captured: Captured, preset: Preset, bundle_dir: Path, *, progress: bool = True
                    ) -> tuple[Component, ComponentPlan]:
    if preset.backend != "onnx":
        raise PresetError(f"backend {preset.backend!r} is not available in this build of pocketsd", "use backend: onnx")
    cid = captured.spec.id
    plan = plan_component(captured, preset)
    chunk_modules = slice_plan(captured.graph_module, plan)
    values = reference_values(captured, chunk_modules)
    folder = bundle_dir / cid
    folder.mkdir()
    gate, threshold = ParityGate(), preset.parity.threshold(cid)
    # The end-to-end chain runs alongside, fed by onnxruntime's own outputs, so one chunk session is open at a time.
    chained = {v: x.numpy() for v, x in zip(captured.summary.inputs, captured.example_inputs)}
    chunks = []
    for cm in tqdm(chunk_modules, desc=f"  {cid}", unit="chunk", leave=False, disable=not progress):
        example = [values[v] for v in cm.plan.input_values]
        files = onnx_writer.write_chunk(cm.plan, cm.module, example, folder / f"{cm.plan.id}.onnx")
        refs = [file_ref(bundle_dir, f) for f in files]
        chunk = Chunk(id=cm.plan.id, format="onnx", file=refs[0], data_files=tuple(refs[1:]),
                      weight_bytes=cm.plan.weight_bytes, inputs=tuple(_spec(t) for t in cm.plan.inputs),
                      outputs=tuple(_spec(t) for t in cm.plan.outputs), modules=cm.plan.modules)
        session = open_chunk(bundle_dir, chunk, SessionOptions(verify_hashes=False))
        names = [t.name for t in cm.plan.inputs]
        got = session.run({n: x.numpy() for n, x in zip(names, example)})
        figures = compare_all([values[v].numpy() for v in cm.plan.output_values], [got[t.name] for t in cm.plan.outputs])
        chunks.append(replace(chunk, parity=gate.check(cm.plan.id, figures, threshold)))
        got = session.run({n: chained[v] for n, v in zip(names, cm.plan.input_values)})
        chained.update((v, got[t.name]) for v, t in zip(cm.plan.output_values, cm.plan.outputs))
        del session
    figures = compare_all([r.numpy() for r in captured.reference_outputs], [chained[v] for v in captured.summary.outputs])
    component = Component(id=cid, inputs=captured.inputs, outputs=tuple(_spec(t) for t in plan.outputs),
                          chunks=tuple(chunks), parity=gate.check(f"{cid} (whole)", figures, threshold))
    log.info("%s: %d chunk(s), worst chunk PSNR %.1f dB, component PSNR %.1f dB", cid, len(chunks),
             min(c.parity.psnr_db for c in chunks), figures.psnr_db)
    gate.raise_if_failed()
    return component, plan
