"""Arithmetic of a bundle's graphs and of the machine: FLOPs counted from ONNX graphs, and the GFLOP/s a large fp32
MatMul reaches, so that a measured time says how close to the CPU's ceiling a model runs.

    python -m pocketsd.bench.flops BUNDLE [--component unet] [--threads 0]

Counted: Conv, ConvTranspose, MatMul, FusedMatMul and Gemm (multiply-adds × 2), from the static shapes the graphs
carry; everything else (norms, softmax, elementwise) is bandwidth, not arithmetic, and is left out, as FLOP counts of
convolutional networks usually do. onnx's shape inference gives the shapes; no library counts FLOPs of an ONNX graph
(onnx-tool does, but pins old onnx), hence the count here.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnx
from onnx import TensorProto, helper

from pocketsd.errors import BundleError
from pocketsd.runtime.manifest import load_manifest


def _shapes(model: onnx.ModelProto) -> dict[str, list[int]]:
    inferred = onnx.shape_inference.infer_shapes(model)
    graph = inferred.graph
    shapes = {}
    for value in (*graph.input, *graph.value_info, *graph.output):
        dims = value.type.tensor_type.shape.dim
        if dims and all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = [d.dim_value for d in dims]
    for init in graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


def _attr(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _matmul(a: list[int], b: list[int], trans_a: int = 0, trans_b: int = 0) -> int:
    m, k = (a[-1], a[-2]) if trans_a else (a[-2], a[-1])
    n = b[-2] if trans_b else b[-1]
    batch = math.prod(np.broadcast_shapes(tuple(a[:-2]), tuple(b[:-2]))) if len(a) > 2 or len(b) > 2 else 1
    return 2 * batch * m * n * k


_COUNTED = ("Conv", "ConvTranspose", "MatMul", "FusedMatMul", "Gemm")


def graph_flops(path: Path) -> int:
    """FLOPs of one run of the graph at ``path`` (weights need not be loaded: only their shapes are read)."""
    model = onnx.load(str(path), load_external_data=False)
    shapes = _shapes(model)
    total = 0
    for node in (n for n in model.graph.node if n.op_type in _COUNTED):
        a, b = (shapes.get(i) for i in node.input[:2])
        out = shapes.get(node.output[0])
        if a is None or b is None or (node.op_type == "Conv" and out is None):
            raise BundleError(f"{path}: {node.op_type} {node.name} has no static input/output shapes to count",
                              "count an fp32 bundle: onnx's shape inference does not know onnxruntime's operators")
        if node.op_type == "Conv":  # weight [Cout, Cin/g, kh, kw]: each output value is Cin/g·kh·kw multiply-adds
            total += 2 * math.prod(out) * math.prod(b[1:])
        elif node.op_type == "ConvTranspose":  # weight [Cin, Cout/g, kh, kw]: each input value scatters a kernel
            total += 2 * math.prod(a) * math.prod(b[1:])
        else:
            total += _matmul(a, b, _attr(node, "transA", 0), _attr(node, "transB", 0))
    return total


def component_flops(bundle: Path, component: str) -> int:
    """FLOPs of one call of a bundle component (all its chunks, the chunks' own graphs): the model's work, the same
    for every contender, so a per-row chunk (exported at one row, runtime/per_row.py) counts once per row of the
    batch, although the runtime runs it once for equal rows."""
    manifest = load_manifest(bundle)
    chunks = manifest.component(component).chunks
    rows = int(manifest.dims.get("unet_batch", 1)) if component == "unet" else 1
    return sum(graph_flops(bundle / c.file.path) * (rows if c.per_row else 1) for c in chunks if c.format == "onnx")


def matmul_ceiling(threads: int = 0, size: int = 4096, repeats: int = 3, engine: str = "onnxruntime") -> dict[str, Any]:
    """GFLOP/s of a ``size``³ MatMul with ``threads`` (0: all cores): the best of ``repeats`` after a warm-up run, as
    the CPU's practical ceiling. ``engine`` "onnxruntime" runs it in fp32; "openvino-bf16" in OpenVINO with bf16
    inference precision, the ceiling of the bf16 engines (fp32 in and out, bf16 arithmetic, as theirs)."""
    graph = helper.make_graph([helper.make_node("MatMul", ["a", "b"], ["c"])], "mm",
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, [size, size]) for n in "ab"],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [size, size])])
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "mm.onnx"
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
        run = _openvino_bf16_runner(path, threads) if engine == "openvino-bf16" else _onnxruntime_runner(path, threads)
    rng = np.random.default_rng(0)
    feeds = {n: rng.standard_normal((size, size), dtype=np.float32) for n in "ab"}
    run(feeds)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        run(feeds)
        best = min(best, time.perf_counter() - start)
    return {"size": size, "threads": threads, "engine": engine, "best_s": round(best, 4),
            "gflops": round(2 * size**3 / best / 1e9, 1)}


def _onnxruntime_runner(path: Path, threads: int) -> Callable[[dict[str, np.ndarray]], Any]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return lambda feeds: session.run(None, feeds)


def _openvino_bf16_runner(path: Path, threads: int) -> Callable[[dict[str, np.ndarray]], Any]:
    import openvino

    config: dict[str, Any] = {"INFERENCE_PRECISION_HINT": "bf16", "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    request = openvino.Core().compile_model(str(path), "CPU", config).create_infer_request()
    return lambda feeds: request.infer(feeds, share_inputs=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pocketsd.bench.flops", description=__doc__.split("\n")[0])
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--component", default="unet")
    parser.add_argument("--threads", type=int, default=0)
    args = parser.parse_args(argv)
    flops = component_flops(args.bundle, args.component)
    print(json.dumps({"bundle": str(args.bundle), "component": args.component, "gflop_per_call": round(flops / 1e9, 2),
                      "matmul_ceiling": matmul_ceiling(args.threads)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
