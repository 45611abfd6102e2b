"""Each ONNX chunk also as onnxruntime's optimizer leaves it, so opening a chunk skips that work (``Chunk.optimized``).

onnxruntime saves the graph it made (``optimized_model_filepath``), but it writes every weight again, which would
double the bundle. Most tensors come out of the optimizer unchanged, so the saved graph's external data are pointed
back at the chunk's own weights file and only the tensors the optimizer made (folded constants, fused biases) go to
a file of their own. Nothing in onnx or onnxruntime shares one weights file between two graphs, hence this module.

The graph is saved at ORT_ENABLE_EXTENDED, the highest level onnxruntime supports saving for use elsewhere: the ALL
level adds layout transforms for the CPU it runs on (NCHWc blocks sized to its vector width), which onnxruntime
applies at load anyway. The saved graph uses onnxruntime's own operators (FusedMatMul, ...) and is only valid for the
onnxruntime version that wrote it: the manifest records that version and the runtime falls back to the chunk's
original graph under any other (runtime/sessions.py).
"""

from __future__ import annotations

import hashlib
import mmap
import tempfile
from pathlib import Path
from typing import Iterator

import onnx

OPTIMIZED_LEVEL = "extended"
OPTIMIZED_SUFFIX = ".optimized.onnx"
_ALIGN = 4096  # tensors start on page boundaries in the new data file, as onnxruntime's memory-mapping prefers
_INLINE_MAX = 64 * 1024  # new integer tensors up to this size are stored in the graph itself (_point_back)
_SHAPE_TYPES = (onnx.TensorProto.INT64, onnx.TensorProto.INT32)


def optimized_path(chunk_path: Path) -> Path:
    """``unet.05.onnx`` → ``unet.05.optimized.onnx`` (beside it, so relative data locations stay valid)."""
    return chunk_path.with_name(chunk_path.name.removesuffix(".onnx") + OPTIMIZED_SUFFIX)


def write_optimized(chunk_path: Path) -> list[Path]:
    """Write the optimized graph of the chunk at ``chunk_path``; returns its files (the graph, then its own data
    file if the optimizer made any tensor that the chunk's data file does not hold)."""
    import onnxruntime as ort

    out = optimized_path(chunk_path)
    own = out.with_name(out.name + ".data")
    with tempfile.TemporaryDirectory(dir=chunk_path.parent, prefix=".optimizing-") as tmp:
        saved = Path(tmp) / out.name
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        so.optimized_model_filepath = str(saved)
        so.log_severity_level = 3
        so.add_session_config_entry("session.optimized_model_external_initializers_file_name", saved.name + ".data")
        so.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        ort.InferenceSession(str(chunk_path), so, providers=["CPUExecutionProvider"])
        model = onnx.load(str(saved), load_external_data=False)
        originals = _tensors_by_digest(chunk_path)
        wrote_own = _point_back(model, Path(tmp), originals, own)
    _constant_nodes_first(model)
    onnx.save_model(model, str(out))
    return [out, own] if wrote_own else [out]


def _constant_nodes_first(model: onnx.ModelProto) -> None:
    """Put the nodes that read only initializers (an int8 weight's DequantizeLinear) first, as the exporter writes
    them; the rest keep onnxruntime's order. onnxruntime's execution order follows the file's, and in the order it
    saves (each DequantizeLinear beside its MatMul) a streamed SD 1.5 cpu-lowmem chunk peaked 9-20 MB higher with a
    third more page faults (whole generate: 293 vs 271 MB, 6.2 vs 6.0 s per step); in this order it runs as the
    exporter's graph does, to the MB."""
    constants = {i.name for i in model.graph.initializer}
    nodes = list(model.graph.node)
    first = [n for n in nodes if all(not i or i in constants for i in n.input)]
    rest = [n for n in nodes if not all(not i or i in constants for i in n.input)]
    del model.graph.node[:]
    model.graph.node.extend(first + rest)


def _external(tensor: onnx.TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in tensor.external_data}


def _initializers(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    yield from model.graph.initializer  # chunks have no subgraphs (If/Loop bodies)


def _digest(data: bytes | memoryview) -> bytes:
    return hashlib.blake2b(data, digest_size=20).digest()


class _Files:
    """Memory maps of a graph's external data files, by location."""

    def __init__(self, folder: Path) -> None:
        self.folder, self._maps = folder, {}

    def read(self, info: dict[str, str]) -> memoryview:
        location = info["location"]
        if location not in self._maps:
            with open(self.folder / location, "rb") as f:
                self._maps[location] = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        offset = int(info.get("offset", 0))
        length = int(info["length"]) if "length" in info else len(self._maps[location]) - offset
        return memoryview(self._maps[location])[offset:offset + length]

    def close(self) -> None:
        for mapped in self._maps.values():
            mapped.close()
        self._maps.clear()


def _tensors_by_digest(chunk_path: Path) -> dict[bytes, dict[str, str]]:
    model = onnx.load(str(chunk_path), load_external_data=False)
    files = _Files(chunk_path.parent)
    found = {}
    for tensor in _initializers(model):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            info = _external(tensor)
            data = files.read(info)
            found[_digest(data)] = {"location": info["location"], "offset": str(int(info.get("offset", 0))),
                                    "length": str(len(data))}
            data.release()
    files.close()
    return found


def _point_back(model: onnx.ModelProto, folder: Path, originals: dict[bytes, dict[str, str]], own: Path) -> bool:
    """Re-point each external tensor of ``model`` (saved in ``folder``) at an identical tensor of the chunk's own
    data, or copy it into ``own``. Returns whether ``own`` was written."""
    files = _Files(folder)
    offset = 0
    with open(own, "wb") as out:
        for tensor in _initializers(model):
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            data = files.read(_external(tensor))
            target = originals.get(_digest(data))
            if target is None and tensor.data_type in _SHAPE_TYPES and len(data) <= _INLINE_MAX:
                # An integer tensor the optimizer made goes inline: onnxruntime writes any over 1 KiB to the data
                # file, then cannot load the graph it saved when one is a shape input (the split sizes of a Split
                # from GatherSliceToSplitFusion: "Cannot parse data from external tensors"), as SD 2.1's sliced
                # attention at 768² makes (over 128 slices).
                del tensor.external_data[:]
                tensor.data_location = onnx.TensorProto.DEFAULT
                tensor.raw_data = bytes(data)
                data.release()
                continue
            if target is None:
                offset = -(-offset // _ALIGN) * _ALIGN
                out.seek(offset)
                out.write(data)
                target = {"location": own.name, "offset": str(offset), "length": str(len(data))}
                offset += len(data)
            data.release()
            del tensor.external_data[:]
            for key, value in target.items():
                tensor.external_data.add(key=key, value=value)
    files.close()
    if offset == 0:
        own.unlink()
        return False
    return True
