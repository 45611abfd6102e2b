"""Write one chunk as an ONNX file (``onnx::fp32``), named by the plan.

The chunk module is exported with the dynamo-based ``torch.onnx.export``; inputs and outputs get the plan's tensor
names. Weights go to an external data file only when the protobuf 2 GB limit demands it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import warnings
from pathlib import Path
from typing import Any, Sequence

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import torch
from onnxscript.optimizer import fold_constants

from pocketsd.errors import InternalError
from pocketsd.export.backends.onnx.files import save_chunk_model
from pocketsd.export.plan import PlannedChunk

log = logging.getLogger(__name__)


@contextlib.contextmanager
def quiet_exporter():
    """torch.onnx prints progress and version chatter on stdout; the CLI has its own progress bars."""
    noisy = [logging.getLogger(n) for n in ("torch.onnx", "torch._export", "torch.export", "onnxscript", "onnx_ir")]
    levels = [lg.level for lg in noisy]
    for lg in noisy:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(noisy, levels):
            lg.setLevel(level)


def _strip_trace_metadata(model: ir.Model) -> None:
    """The exporter records each node's Python stack trace and module path: local paths, and as many bytes as the
    weights of a small chunk. The bundle's plan already says which modules each chunk spans."""
    for node in ir.traversal.RecursiveGraphIterator(model.graph):
        node.metadata_props.clear()


def _fold_weight_transposes(node: ir.Node) -> bool | None:
    """Fold a Transpose of an initializer (True); leave every other decision to the folder's defaults (None)."""
    if node.op_type == "Transpose" and all(i is not None and i.const_value is not None for i in node.inputs):
        return True
    return None


_REGISTRIES: dict[int, Any] = {}


@contextlib.contextmanager
def one_torchlib_registry():
    """Let ``torch.onnx.export`` build its registry of torchlib functions once per opset, not on every call.

    It builds it anew for each export (0.41 s each here, 2.9 s of the tiny model's 17.9 s export of 7 chunks), and
    within an export only reads it; it is changed only for a ``custom_translation_table``, which pocketsd never
    passes. No option reuses one, so the classmethod is swapped for a cached one around our own calls only (torch is
    pinned exactly; if the private name moves, exports simply build it each time again)."""
    try:
        from torch.onnx._internal.exporter import _registration

        registry_class = _registration.ONNXRegistry
        build = registry_class.__dict__["from_torchlib"]
        default_opset = _registration._constants.TORCHLIB_OPSET
    except (ImportError, AttributeError, KeyError):
        yield
        return

    def cached(cls: type, opset_version: int = default_opset) -> Any:
        if opset_version not in _REGISTRIES:
            _REGISTRIES[opset_version] = build.__func__(cls, opset_version=opset_version)
        return _REGISTRIES[opset_version]

    registry_class.from_torchlib = classmethod(cached)
    try:
        yield
    finally:
        registry_class.from_torchlib = build


def write_onnx(module: torch.nn.Module, example_inputs: Sequence[torch.Tensor], input_names: Sequence[str],
               output_names: Sequence[str], path: Path) -> list[Path]:
    """Export ``module`` to ``path``; returns the files written (the .onnx and its weights file)."""
    with quiet_exporter(), torch.no_grad(), one_torchlib_registry():
        program = torch.onnx.export(
            module, tuple(example_inputs), dynamo=True, input_names=list(input_names),
            output_names=list(output_names), optimize=True, verify=False, report=False,
        )
        if program is None:
            raise InternalError("torch.onnx.export returned no program")
        _strip_trace_metadata(program.model)
        # A Linear applied to several token slices (feed-forward slicing) is written either with one transposed
        # copy of its weight per slice or with a Transpose of the weight at run time (the exporter's constant folding
        # skips large tensors). Fold weight transposes whatever their size, then merge identical initializers (the
        # pass's default also skips any over 1024 elements, which are exactly the ones that matter here).
        fold_constants(program.model, should_fold=_fold_weight_transposes)
        common_passes.DeduplicateInitializersPass(size_limit=1 << 62)(program.model)
        files = save_chunk_model(program.model, path)
        _let_go_of_weights(program.model.graph)
        return files


def _let_go_of_weights(graph: ir.Graph) -> None:
    """The exporter's initializers wrap the torch weights (no copy), and the graph outlives the export: onnxscript's
    rewrite rules keep the last graph they matched (``_graph`` of each module-level pattern matcher). Once the chunk
    is saved, let go of every weight it wrapped: else the last chunk's weights stay alive past the export, and with
    them the whole safetensors file mapping they came from (SD 1.5: 3.4 GB resident through every later chunk check
    and component). The exporter makes weights graph inputs first, and onnx_ir's count of graph inputs keeps every
    value that ever was one (at count 0), including weights that the optimizer folded away: those are reached
    through that count (private: ``test_onnx_export_lets_go_of_the_weights`` fails if it moves)."""
    stale = getattr(graph.inputs, "_ref_counter", {})
    for value in [*graph.initializers.values(), *stale]:
        value.const_value = None


def write_chunk(chunk: PlannedChunk, module: torch.nn.Module, example_inputs: Sequence[torch.Tensor],
                path: Path) -> list[Path]:
    return write_onnx(module, example_inputs, [t.name for t in chunk.inputs], [t.name for t in chunk.outputs], path)
