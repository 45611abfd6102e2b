"""The external-data file names inside an ONNX graph, read without the ``onnx`` package.

An ONNX file whose weights live beside it names each weight file in its tensors (``external_data`` entry
``location``), and onnxruntime and OpenVINO open whatever that names, relative to the graph's folder: ``../x``,
``/etc/x``, or "*/_ORT_MEM_ADDR_/*" (onnxruntime's tag for a raw memory address). The sha256 in the manifest does
not help against a bundle made to do that: its author wrote the hashes too. So before a chunk is opened, every
location in its graph must be one of the files the manifest lists for that chunk, which ``load_manifest`` has
checked to lie inside the bundle and ``verify_chunk`` has hashed.

Why a small protobuf walk here and not ``onnx.load(load_external_data=False)``: the runtime must not import onnx
(thin, torch-free installs), and onnxruntime has no API that lists a model's external files before opening it,
which is too late. The walk is cheap: it descends only into the messages that can hold a tensor (graph, node,
attribute, function, sparse tensor) and skips every other field by its length, weights included; a file without
the bytes ``location`` anywhere (protobuf stores strings verbatim) is not walked at all.
"""

from __future__ import annotations

import functools
import mmap
import posixpath
from pathlib import Path

from pocketsd.errors import BundleError
from pocketsd.runtime.manifest import Chunk

# message → {field number: message type of that field}; only the paths that lead to a TensorProto (onnx.proto3)
_MODEL, _GRAPH, _NODE, _ATTR, _FUNC, _TENSOR, _SPARSE, _TRAINING, _ENTRY = range(9)
_CHILDREN: dict[int, dict[int, int]] = {
    _MODEL: {7: _GRAPH, 20: _TRAINING, 25: _FUNC},
    _TRAINING: {1: _GRAPH, 2: _GRAPH},
    _GRAPH: {1: _NODE, 5: _TENSOR, 15: _SPARSE},
    _NODE: {5: _ATTR},
    _FUNC: {7: _NODE, 11: _ATTR},
    _ATTR: {5: _TENSOR, 6: _GRAPH, 10: _TENSOR, 11: _GRAPH, 22: _SPARSE, 23: _SPARSE},
    _SPARSE: {1: _TENSOR, 2: _TENSOR},
    _TENSOR: {13: _ENTRY},  # external_data: repeated StringStringEntryProto {key = 1, value = 2}
}
_MAX_DEPTH = 64  # subgraphs nest (If/Loop bodies); a file nesting deeper is not a real model


class _Malformed(Exception):
    pass


def _varint(buf: memoryview, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise _Malformed
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _walk(buf: memoryview, start: int, end: int, kind: int, found: list[str], depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise _Malformed
    children = _CHILDREN.get(kind, {})
    entry: dict[int, str] = {}
    pos = start
    while pos < end:
        tag, pos = _varint(buf, pos, end)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            _, pos = _varint(buf, pos, end)
        elif wire == 1 or wire == 5:
            pos += 8 if wire == 1 else 4
        elif wire == 2:
            size, pos = _varint(buf, pos, end)
            if pos + size > end:
                raise _Malformed
            if kind == _ENTRY and field in (1, 2):
                entry[field] = bytes(buf[pos:pos + size]).decode("utf-8", "replace")
            elif field in children:
                _walk(buf, pos, pos + size, children[field], found, depth + 1)
            pos += size
        else:  # groups (wire types 3, 4) are not used by ONNX; 6, 7 do not exist
            raise _Malformed
    if pos != end:
        raise _Malformed
    if kind == _ENTRY and entry.get(1) == "location":
        found.append(entry.get(2, ""))


@functools.lru_cache(maxsize=256)
def _locations(path: str, size: int, mtime_ns: int) -> tuple[str, ...]:
    """Every external-data location in the ONNX file at ``path`` (cached per file version: size and mtime)."""
    if size == 0:
        return ()
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
        if data.find(b"location") < 0:
            return ()
        found: list[str] = []
        view = memoryview(data)
        try:
            _walk(view, 0, len(data), _MODEL, found, 0)
        except _Malformed:
            raise BundleError(f"{path} is not a valid ONNX file", "re-export or re-copy the bundle") from None
        finally:
            view.release()
    return tuple(found)


def external_locations(graph: Path) -> tuple[str, ...]:
    stat = graph.stat()
    return _locations(str(graph), stat.st_size, stat.st_mtime_ns)


def check_external_data(bundle_dir: Path, graph_path: str, allowed: set[str], chunk_id: str) -> None:
    """Refuse a chunk whose graph (``graph_path``, relative to the bundle) reads a file the manifest does not list
    for the chunk (``allowed``: bundle-relative paths)."""
    folder = posixpath.dirname(graph_path)
    listed = {posixpath.normpath(p) for p in allowed}
    for location in external_locations(bundle_dir / graph_path):
        target = posixpath.normpath(posixpath.join(folder, location))
        if location.startswith("/") or "\\" in location or "\0" in location or target not in listed:
            raise BundleError(
                f"{bundle_dir / graph_path} (chunk {chunk_id}) reads weights from {location!r}, which is not one of "
                "the chunk's files in the manifest",
                "a bundle reads only its own files; this one was not written by pocketsd export, do not use it",
                code="bundle-path")


def check_chunk_refs(bundle_dir: Path, chunk: Chunk) -> None:
    """An ONNX chunk's graphs (its own, and its optimized one) read weights only from the chunk's own files."""
    if chunk.format != "onnx":
        return
    allowed = {ref.path for ref in chunk.files}
    for graph in (chunk.file, *((chunk.optimized.file,) if chunk.optimized is not None else ())):
        check_external_data(bundle_dir, graph.path, allowed, chunk.id)
