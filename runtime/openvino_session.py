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

Resident chunks of one component are compiled as one model (``merged_model``): their graphs joined where the
manifest wires them, so that OpenVINO plans the whole UNet at once, as it would an unchunked export. Measured on SD
1.5 ``cpu`` at 256² (UNet batch 2, bf16, one process, 12 calls interleaved): the 4 chunks one after the other took
0.327 s a call, merged 0.322 s, the unchunked file 0.318-0.320 s (within the calls' spread of the merged model).
Streamed chunks are compiled one at a time, as before: they exist to bound memory.

Compiled models are not cached on disk (onnxruntime's optimized graphs are: graph_cache.py). Measured on the SD 1.5
``cpu`` bundle at 512² (every component opened, three alternated runs each): with OpenVINO's ``CACHE_DIR`` a later
process loaded in 3.4-4.3 s instead of 5.8-8.1 s, but the first load took 18.8 s (a 4 GB blob written) and the cache
took 4 GB of disk per bundle and engine; the weightless ``CACHE_MODE: OPTIMIZE_SIZE`` loaded in 6.1 s, no better than
none. Break-even after about five loads, for a slower first one: not worth it.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from pocketsd.errors import BundleError
from pocketsd.runtime.manifest import Chunk, Component


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


def _compile(model: Any, owner: str, threads: int, bf16: bool) -> Any:
    """``model`` (a graph's path, or an ``openvino.Model``) compiled for the CPU with the settings above."""
    config = {"INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32", "DYNAMIC_QUANTIZATION_GROUP_SIZE": 0,
              "PERFORMANCE_HINT": "LATENCY"}
    if threads > 0:
        config["INFERENCE_NUM_THREADS"] = threads
    try:
        return _core().compile_model(str(model) if isinstance(model, Path) else model, "CPU", config)
    except RuntimeError as exc:
        raise _cannot(owner, exc) from None


def _cannot(owner: str, exc: RuntimeError) -> BundleError:
    """OpenVINO's refusal (e.g. an operator its ONNX reader cannot convert: int4 DequantizeLinear) in one line."""
    failed = [line.strip() for line in str(exc).splitlines() if line.strip().startswith("--")]
    return BundleError(f"OpenVINO cannot compile {owner}: {' '.join(failed) or str(exc)[:300]}",
                       "run this bundle with --engine onnxruntime", code="engine")


def _names(port: Any) -> set[str]:
    return set(port.get_tensor().get_names())


def merged_model(bundle_dir: Path, component: Component) -> Any:
    """``component``'s chunks as one ``openvino.Model``: each chunk's ONNX graph read, each of its inputs joined to
    what the manifest says feeds it (a component input, or an earlier chunk's output), and the component's outputs
    made the model's results, named as the manifest names them. The weights are the chunks' own; nothing is
    written. (onnx.compose would merge the ONNX files instead, but builds the whole model in one protobuf, which
    cannot hold more than 2 GB: SD 1.5's UNet is 3.4 GB.)"""
    ov = load_openvino()
    produced: dict[str, Any] = {}  # a manifest source ("input:x", "unet.00:y") -> the OpenVINO port that makes it
    parameters: list[Any] = []
    for chunk in component.chunks:
        try:
            model = _core().read_model(str(bundle_dir / chunk.file.path))
        except RuntimeError as exc:
            raise _cannot(f"chunk {chunk.id}", exc) from None
        inputs = {name: p for p in model.get_parameters() for name in _names(p.output(0))}
        outputs = {name: r.input_value(0) for r in model.get_results()
                   for name in _names(r.output(0)) | _names(r.input_value(0))}
        for spec in chunk.inputs:
            parameter = inputs.get(spec.name)
            if parameter is None or spec.source is None:
                raise BundleError(f"chunk {chunk.id}'s graph has no input {spec.name!r}, which the manifest wires",
                                  "re-export the bundle")
            if spec.source in produced:
                parameter.output(0).replace(produced[spec.source])
            else:  # a component input, first read here (check_wiring has vouched for every other source)
                produced[spec.source] = parameter.output(0)
                parameters.append(parameter)
        for spec in chunk.outputs:
            if spec.name not in outputs:
                raise BundleError(f"chunk {chunk.id}'s graph has no output {spec.name!r}, which the manifest lists",
                                  "re-export the bundle")
            produced[f"{chunk.id}:{spec.name}"] = outputs[spec.name]
    results = []
    for spec in component.outputs:
        result = ov.opset13.result(produced[spec.source or ""])
        result.output(0).get_tensor().set_names({spec.name})
        results.append(result)
    return ov.Model(results, parameters, component.id)


class OpenVinoSession:
    """One compiled model and its infer request: a chunk's graph (``chunk``), or a whole component's
    (``component``, from ``merged_model``). ``run`` takes and gives tensors by their manifest names."""

    def __init__(self, compiled: Any, outputs: Sequence[str]) -> None:
        self._compiled = compiled
        self._outputs = [(name, compiled.output(name)) for name in outputs]
        self._inputs = {name for port in compiled.inputs for name in port.get_names()}
        self._request = compiled.create_infer_request()

    @classmethod
    def chunk(cls, path: Path, chunk: Chunk, threads: int = 0, bf16: bool = False) -> "OpenVinoSession":
        return cls(_compile(path, f"chunk {chunk.id}", threads, bf16), [t.name for t in chunk.outputs])

    @classmethod
    def component(cls, bundle_dir: Path, component: Component, threads: int = 0,
                  bf16: bool = False) -> "OpenVinoSession":
        model = merged_model(bundle_dir, component)
        compiled = _compile(model, f"{component.id} (its {len(component.chunks)} chunks as one model)", threads, bf16)
        del model  # the compiled model holds what it needs
        return cls(compiled, [t.name for t in component.outputs])

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        # share_inputs: the caller's arrays are read in place (the call is synchronous), not copied first;
        # share_outputs=False: copies, as the request's own output tensors are overwritten by its next run
        feeds = {name: value for name, value in feeds.items() if name in self._inputs}
        results = self._request.infer(feeds, share_inputs=True, share_outputs=False)
        return {name: results[port] for name, port in self._outputs}


class PrefixedSession:
    """Per-row chunks (``prefix``: each with its session, run for each distinct row) and then the rest of the
    component as one model, fed the component's inputs and the prefix's outputs by their manifest names."""

    def __init__(self, prefix: Sequence[tuple[Chunk, Any]], rest: OpenVinoSession) -> None:
        self._prefix = list(prefix)
        self._rest = rest

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        values = dict(feeds)
        for chunk, session in self._prefix:
            values.update(session.run({t.name: values[t.name] for t in chunk.inputs}))
        return self._rest.run(values)
