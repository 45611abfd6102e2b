"""The CoreML chunk writer: each chunk as an ML program (.mlpackage), checked structurally everywhere and by real
predictions where CoreML can run (macOS).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from pocketsd.export.backends.coreml.check import COMPRESSED_OPS, check_chunk, read_spec
from pocketsd.export.backends.coreml.convert import SPEC_VERSION, CoreMLTarget, write_mlpackage
from pocketsd.export.bundle_files import file_ref
from pocketsd.export.slicing import ChunkModule
from pocketsd.export.write_component import ComponentJob, spec_of
from pocketsd.runtime.manifest import Chunk
from pocketsd.runtime.sessions import SessionOptions

NOT_ON_LINUX = "not run: CoreML predictions need macOS (coremltools cannot run models on this platform)"


class CoreMLChunkWriter:
    format = "mlpackage"

    def __init__(self, job: ComponentJob) -> None:
        self.config = job.preset.coreml
        self.target = CoreMLTarget(self.config.deployment_target, job.preset.precision)

    def write(self, job: ComponentJob, cm: ChunkModule, example: list[torch.Tensor]) -> Chunk:
        inputs = tuple(spec_of(t) for t in cm.plan.inputs)
        outputs = tuple(spec_of(t) for t in cm.plan.outputs)
        path = job.folder / f"{cm.plan.id}.mlpackage"
        names = write_mlpackage(cm.module, example, inputs, outputs, path, self.target)
        report = read_spec(path)
        compressed = sum(1 for p in cm.plan.params if p in job.compressed)
        for problem in check_chunk(report, inputs, outputs, names, SPEC_VERSION[self.target.deployment_target],
                                   compressed, cm.plan.weight_bytes):
            job.gate.fail(cm.plan.id, problem)
        extra = {"coreml": {
            "feature_names": names, "deployment_target": self.target.deployment_target,
            "spec_version": report.spec_version, "compute_precision": self.target.precision,
            "compute_units": self.config.compute_units, "attention": self.config.attention,
            "compressed_ops": {op: report.ops[op] for op in COMPRESSED_OPS if op in report.ops},
            "compressed_layers": compressed, "weight_file_bytes": report.weight_file_bytes,
            "checks": "structure" if self.runnable() else "structure+predictions",
        }}
        return Chunk(id=cm.plan.id, format=self.format, file=file_ref(job.bundle_dir, path),
                     weight_bytes=cm.plan.weight_bytes, inputs=inputs, outputs=outputs, modules=cm.plan.modules,
                     extra=extra)

    def finish(self, chunk: Chunk, bundle_dir: Path) -> Chunk:
        return chunk

    def runnable(self) -> str | None:
        return None if sys.platform == "darwin" else NOT_ON_LINUX

    def session_options(self) -> SessionOptions:
        return SessionOptions(verify_hashes=False, compute_units="cpu_only")
