"""A chunk session on OpenVINO: the second engine for a bundle's ONNX chunks (``--engine openvino``).

OpenVINO reads the chunk's own .onnx graph (never the onnxruntime-optimized one, which holds onnxruntime's operators)
and compiles it for the CPU. Imported only when this engine is chosen: ``openvino`` is an optional extra
(``pip install 'pocketsd[openvino]'``).

Compile settings, each chosen so that the engine computes what onnxruntime computes:
- ``INFERENCE_PRECISION_HINT: f32``: on CPUs with bf16 units OpenVINO would otherwise run fp32 models in bf16
  (its default there). That is what ``--engine openvino-bf16`` asks for, knowingly: about twice as fast on such a
  CPU, and no longer the fp32 computation the parity gate checked (README, "Engines", says by how much);
- ``DYNAMIC_QUANTIZATION_GROUP_SIZE: 0``: for int8 weights OpenVINO would otherwise quantize the activations too
  (measured on the tiny int8 bundle: max abs 0.02 from onnxruntime with it, 2e-6 without);
- ``PERFORMANCE_HINT: LATENCY``: one request at a time, all threads on it.

Compiled models are not cached on disk (onnxruntime's optimized graphs are: sessions.py). Measured on the SD 1.5
``cpu`` bundle at 512² (every component opened, three alternated runs each): with OpenVINO's ``CACHE_DIR`` a later
process loaded in 3.4-4.3 s instead of 5.8-8.1 s, but the first load took 18.8 s (a 4 GB blob written) and the cache
took 4 GB of disk per bundle and engine; the weightless ``CACHE_MODE: OPTIMIZE_SIZE`` loaded in 6.1 s, no better than
none. Break-even after about five loads, for a slower first one: not worth it.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np

from pocketsd.errors import BundleError
from pocketsd.runtime.manifest import Chunk


@functools.cache
def _core() -> Any:
    """One OpenVINO Core per process: chunks opened per use (stream, prefetch) share it."""
    return load_openvino().Core()


def load_openvino() -> Any:
    try:
        import openvino
    except ImportError:
        raise BundleError("engine 'openvino' needs the openvino package, which is not installed",
                          "pip install 'pocketsd[openvino]', or run with --engine onnxruntime",
                          code="engine") from None
    return openvino


def check_bf16() -> None:
    """Refuse ``openvino-bf16`` on a CPU without bf16 units, where OpenVINO would quietly compute in fp32."""
    capabilities = _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    if "BF16" not in capabilities:
        raise BundleError(f"engine 'openvino-bf16' needs a CPU with bf16 units (AVX512-BF16 or AMX); this one offers "
                          f"{', '.join(capabilities)}", "run with --engine openvino (fp32)", code="engine")


class OpenVinoSession:
    def __init__(self, path: Path, chunk: Chunk, threads: int = 0, bf16: bool = False) -> None:
        config = {"INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0,
                  "PERFORMANCE_HINT": "LATENCY"}
        if threads > 0:
            config["INFERENCE_NUM_THREADS"] = threads
        try:
            self._compiled = _core().compile_model(str(path), "CPU", config)
        except RuntimeError as exc:  # an operator its ONNX reader cannot convert, e.g. int4 DequantizeLinear
            failed = [line.strip() for line in str(exc).splitlines() if line.strip().startswith("--")]
            raise BundleError(f"OpenVINO cannot compile chunk {chunk.id}: {' '.join(failed) or str(exc)[:300]}",
                              "run this bundle with --engine onnxruntime", code="engine") from None
        self._outputs = [(t.name, self._compiled.output(t.name)) for t in chunk.outputs]
        self._request = self._compiled.create_infer_request()

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # share_inputs: the caller's arrays are read in place (the call is synchronous), not copied first;
        # share_outputs=False: copies, as the request's own output tensors are overwritten by its next run
        results = self._request.infer(feeds, share_inputs=True, share_outputs=False)
        return {name: results[port] for name, port in self._outputs}
