"""Finish and check one written component, with no torch model alive; returns its manifest entry.

Each chunk gets what its backend makes without torch (``ChunkWriter.finish``: ONNX's optimized graph). Where the
backend can run here, every chunk then runs on the inputs PyTorch fed it (per-chunk parity) and the whole chain runs
end to end on the backend's own outputs (component parity), one chunk session open at a time. Where it cannot
(CoreML off macOS), the manifest says so and the writer's structural checks and the PyTorch-simulated compression
figures are the gate. The exporter calls this after the component's torch model is released: the model and one
chunk's session are never in memory together.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pocketsd.export.compression.quality_gates import combined_db
from pocketsd.export.parity import compare_all
from pocketsd.export.write_component import WrittenComponent, spec_of
from pocketsd.runtime.manifest import Component
from pocketsd.runtime.sessions import open_chunk


def whole_reference(written: WrittenComponent) -> tuple[str, tuple[np.ndarray, ...], float]:
    """(row label, reference outputs, threshold) of the whole-chain check. Where a lossy step ran before the cut
    (CoreML compression or fp16 weights), the reference is the uncompressed fp32 model and the threshold the PSNR
    the parity threshold and the lossy step's gate leave together (their noise powers add: the iphone preset's
    30 dB parity with its 6-bit palettes' 30 dB gate needs 27.0 dB). Per-chunk checks keep the compressed model's
    boundary values: a chunk's own figure is its conversion alone."""
    if written.fp32 is None:
        return f"{written.id} (whole)", written.reference_outputs, written.threshold
    return (f"{written.id} (whole vs fp32)", written.fp32.outputs,
            combined_db(written.threshold, written.fp32.min_psnr_db))


def check_component(written: WrittenComponent, bundle_dir: Path, progress: bool = True) -> Component:
    writer, gate = written.writer, written.gate
    not_run = writer.runnable()
    values = written.values
    chained = {v: values[v] for v in written.input_values}  # then each chunk's outputs, as the backend made them
    chunks = []
    for chunk, planned in tqdm(list(zip(written.chunks, written.plan.chunks)), desc=f"  {written.id} (check)",
                               unit="chunk", leave=False, disable=not progress):
        chunk = writer.finish(chunk, bundle_dir)
        if not_run is None:
            session = open_chunk(bundle_dir, chunk, writer.session_options())
            names = [t.name for t in planned.inputs]
            got = session.run({n: values[v] for n, v in zip(names, planned.input_values)})
            figures = compare_all([values[v] for v in planned.output_values], [got[t.name] for t in planned.outputs])
            chunk = replace(chunk, parity=gate.check(planned.id, figures, written.threshold))
            got = session.run({n: chained[v] for n, v in zip(names, planned.input_values)})
            # copies: an output array shares its buffer with the session's memory arena and would keep it alive
            # (SD 1.5 cpu, the UNet's four chunk checks: 6.9 GB peak without them, 3.9 GB with them)
            chained.update((v, np.array(got[t.name], copy=True)) for v, t in zip(planned.output_values,
                                                                                   planned.outputs))
            del session, got
        chunks.append(chunk)
    parity, extra = None, dict(written.extra)
    if not_run is None:
        what, reference, threshold = whole_reference(written)
        figures = compare_all(list(reference), [chained[v] for v in written.output_values])
        parity = gate.check(what, figures, threshold)
    else:
        extra["parity_not_run"] = not_run
    gate.raise_if_failed()
    return Component(id=written.id, inputs=written.inputs, outputs=tuple(spec_of(t) for t in written.plan.outputs),
                     chunks=tuple(chunks), parity=parity, extra=extra)
