"""Sessions that run one chunk file: the backend interface and its onnxruntime implementation.

A backend is a callable ``(path, chunk, options) -> ChunkSession`` registered under the chunk's manifest ``format``.
The CoreML backend (usable on macOS) is imported only when a CoreML chunk is opened.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Protocol

import numpy as np

from pocketsd.errors import BundleError
from pocketsd.registry import Registry
from pocketsd.runtime.hashing import sha256_path
from pocketsd.runtime.manifest import Chunk

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionOptions:
    threads: int = 0  # 0: the backend's default (all cores)
    low_memory: bool = False  # onnxruntime: no memory arena / pattern planning (slower, smaller peak)
    compute_units: str = "all"  # CoreML: all | cpu_only | cpu_and_gpu | cpu_and_ne
    verify_hashes: bool = True


class ChunkSession(Protocol):
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


Backend = Callable[[Path, Chunk, SessionOptions], ChunkSession]
BACKENDS: Registry[Backend] = Registry("backend", BundleError)


class OnnxSession:
    def __init__(self, path: Path, options: SessionOptions, chunk: Chunk | None = None) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = options.threads
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.log_severity_level = 3
        if options.low_memory:
            so.enable_cpu_mem_arena = False
            so.enable_mem_pattern = False
        self._session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self._outputs = [o.name for o in self._session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return dict(zip(self._outputs, self._session.run(self._outputs, feeds)))


def _onnx_backend(path: Path, chunk: Chunk, options: SessionOptions) -> ChunkSession:
    return OnnxSession(path, options, chunk)


def _coreml_backend(path: Path, chunk: Chunk, options: SessionOptions) -> ChunkSession:
    from pocketsd.runtime.coreml_session import CoreMLSession  # usable on macOS only; a clear error elsewhere

    return CoreMLSession(path, chunk, options.compute_units)


BACKENDS.register("onnx")(_onnx_backend)


BACKENDS.register("mlpackage")(_coreml_backend)


def verify_chunk(bundle_dir: Path, chunk: Chunk) -> None:
    for ref in (chunk.file, *chunk.data_files):
        path = bundle_dir / ref.path
        if not path.exists():
            raise BundleError(f"{path} is missing (chunk {chunk.id})", "re-export or re-copy the bundle")
        if sha256_path(path) != ref.sha256:
            raise BundleError(f"{path} does not match its sha256 in the manifest (chunk {chunk.id}): the file is "
                              "corrupted or was changed", "re-export or re-copy the bundle")


def open_chunk(bundle_dir: Path, chunk: Chunk, options: SessionOptions) -> ChunkSession:
    """Verify a chunk's files against the manifest, then open it with the backend for its format."""
    if options.verify_hashes:
        verify_chunk(bundle_dir, chunk)
    log.debug("opening %s (%s)", chunk.id, chunk.file.path)
    return BACKENDS.get(chunk.format)(bundle_dir / chunk.file.path, chunk, options)
