"""The ONNX chunk writer: each chunk as an .onnx graph and its weights file (``convert``), plus the graph
onnxruntime's optimizer makes of it (``optimized``), which the runtime opens instead when its onnxruntime version
wrote it."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import onnxruntime
import torch

from pocketsd.export.backends.onnx import convert
from pocketsd.export.backends.onnx.optimized import OPTIMIZED_LEVEL, write_optimized
from pocketsd.export.bundle_files import file_ref
from pocketsd.export.compression.onnx_weights import store_chunk_quantized
from pocketsd.export.slicing import ChunkModule
from pocketsd.export.write_component import ComponentJob, spec_of
from pocketsd.runtime.manifest import Chunk, OptimizedGraph
from pocketsd.runtime.sessions import ORT_ENGINE, SessionOptions


class OnnxChunkWriter:
    format = "onnx"

    def __init__(self, job: ComponentJob) -> None:
        del job  # each chunk's write gets the job; nothing of it is kept

    def write(self, job: ComponentJob, cm: ChunkModule, example: list[torch.Tensor]) -> Chunk:
        files = convert.write_chunk(cm.plan, cm.module, example, job.folder / f"{cm.plan.id}.onnx")
        extra: dict = {"largest_activation_bytes": cm.plan.largest_activation_bytes}
        quantization = job.preset.quantize.get(job.captured.spec.settings_id)
        if quantization is not None:  # onnx::int8_weights / onnx::int4_weights: store the grid PyTorch measured
            files, summary = store_chunk_quantized(files, cm.module, job.compressed, quantization, cm.plan.id)
            extra.update({"quantization": summary} if summary else {})
        refs = [file_ref(job.bundle_dir, f) for f in files]
        return Chunk(id=cm.plan.id, format=self.format, file=refs[0], data_files=tuple(refs[1:]),
                     weight_bytes=cm.plan.weight_bytes, inputs=tuple(spec_of(t) for t in cm.plan.inputs),
                     outputs=tuple(spec_of(t) for t in cm.plan.outputs), modules=cm.plan.modules, extra=extra)

    def finish(self, chunk: Chunk, bundle_dir: Path) -> Chunk:
        """onnxruntime's optimized graph of the chunk: after the torch model is gone, as it holds the weights once
        more while it optimizes."""
        optimized = [file_ref(bundle_dir, f) for f in write_optimized(bundle_dir / chunk.file.path)]
        return replace(chunk, optimized=OptimizedGraph(ORT_ENGINE, onnxruntime.__version__, OPTIMIZED_LEVEL,
                                                       optimized[0], tuple(optimized[1:])))

    def runnable(self) -> str | None:
        return None

    def session_options(self) -> SessionOptions:
        return SessionOptions(verify_hashes=False)
