"""How a chunk's ONNX files are laid out on disk (torch-free: the writer and the quantization pass both save here)."""

from __future__ import annotations

from pathlib import Path

import onnx_ir as ir


def save_chunk_model(model: ir.Model, path: Path) -> list[Path]:
    """Save a chunk as ``path`` (the graph) and ``path.data`` (its weights); returns the files that exist.

    The weights always go to their own file: onnxruntime memory-maps external data and uses the tensors in place,
    where an inline .onnx is parsed and copied (measured on a 105 MB chunk: 137 MB vs 199 MB peak to open and run
    it, and 0.20 s vs 0.30 s to open). It also keeps every chunk clear of protobuf's 2 GB message limit."""
    data = path.with_name(path.name + ".data")
    ir.save(model, path, external_data=data.name)
    return [path, data] if data.exists() else [path]

