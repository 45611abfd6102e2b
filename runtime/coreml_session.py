"""CoreML chunks on macOS: an ``MLModel`` behind the runtime's chunk-session interface.

Importable anywhere, usable only on macOS (coremltools cannot run predictions elsewhere): constructing a session on
another platform is a clear :class:`BundleError`. The model is loaded lazily on the first call, with the compute
units from the preset or the command line. Feeds and results use the manifest's tensor names; the chunk's
``extra.coreml.feature_names`` maps them to the package's CoreML feature names.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import numpy as np

from pocketsd.contract import COMPUTE_UNITS, DEFAULT_COMPUTE_UNITS
from pocketsd.errors import BundleError
from pocketsd.runtime.manifest import Chunk


class CoreMLSession:
    def __init__(self, path: Path, chunk: Chunk, compute_units: str = DEFAULT_COMPUTE_UNITS) -> None:
        if sys.platform != "darwin":
            raise BundleError(f"{path.name} is a CoreML model, which runs only on macOS",
                              "on this machine, export a bundle with an onnx preset (e.g. --preset cpu)")
        if compute_units not in COMPUTE_UNITS:
            raise BundleError(f"unknown compute units {compute_units!r}", f"known: {', '.join(COMPUTE_UNITS)}")
        self.path, self.compute_units = path, compute_units
        self.names: dict[str, str] = dict(chunk.extra.get("coreml", {}).get("feature_names", {}))
        self._outputs = [t.name for t in chunk.outputs]
        self._model: Any = None

    def _load(self) -> Any:
        import coremltools as ct  # the runtime part of coremltools; never its converters

        units = getattr(ct.ComputeUnit, COMPUTE_UNITS[self.compute_units])
        return ct.models.MLModel(str(self.path), compute_units=units)

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self._model is None:
            self._model = self._load()
        result = self._model.predict({self.names.get(k, k): v for k, v in feeds.items()})
        return {name: np.asarray(result[self.names.get(name, name)], dtype=np.float32) for name in self._outputs}
