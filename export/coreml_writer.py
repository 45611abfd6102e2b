"""Write one chunk as a CoreML ML program (``.mlpackage``), from the same chunk module the ONNX writer gets.

The chunk is re-captured with ``torch.export`` (core ATen, as coremltools requires) and converted with the preset's
deployment target and compute precision. Inputs and outputs are always fp32 at the chunk boundary, so precision is
never lost between chunks even when the chunk computes in fp16. Compression metadata that travels with the chunk's
weights (``_COREML_`` buffers, see ``slicing.py``) makes coremltools store the exact palettes chosen in PyTorch.

CoreML feature names allow only ``[A-Za-z0-9_]``; the manifest keeps the plan's names (identical to the ONNX
bundle's) and records the CoreML name of each in the chunk's ``extra.coreml.feature_names``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from pocketsd.errors import InternalError
from pocketsd.export.onnx_writer import quiet_exporter
from pocketsd.runtime.manifest import TensorSpec

log = logging.getLogger(__name__)

TARGETS = ("iOS16", "iOS17", "iOS18", "macOS13", "macOS14", "macOS15")
# specificationVersion each deployment target writes (iOS16/macOS13: 7, iOS17/macOS14: 8, iOS18/macOS15: 9)
SPEC_VERSION = {"iOS16": 7, "macOS13": 7, "iOS17": 8, "macOS14": 8, "iOS18": 9, "macOS15": 9}
_RESERVED = {"fp16", "fp32", "fp64", "int8", "int16", "int32", "int64", "uint8", "bool", "tensor", "state", "list",
             "tuple", "dict", "string", "bf16", "uint16", "uint32", "uint64", "int4", "uint4"}


def coreml_name(name: str) -> str:
    """A readable CoreML feature name: ``unet.00/down_blocks.1#1`` → ``unet_00__down_blocks_1_n1``."""
    text = name.replace("/", "__").replace("#", "_n")
    text = re.sub(r"[^A-Za-z0-9_]", "_", text)
    if not re.match(r"[A-Za-z_]", text):
        text = f"t_{text}"
    return f"{text}_" if text in _RESERVED else text


def feature_names(specs: Sequence[TensorSpec]) -> dict[str, str]:
    """Plan name → CoreML name for one chunk's inputs and outputs; refuses a collision rather than renaming."""
    names = {spec.name: coreml_name(spec.name) for spec in specs}
    if len(set(names.values())) != len(names):
        raise InternalError(f"two tensor names map to one CoreML name: {names}")
    return names


@dataclass(frozen=True)
class CoreMLTarget:
    deployment_target: str
    precision: str  # fp16 | fp32


def _np_dtype(dtype: str) -> Any:
    return {"float32": np.float32, "float16": np.float16, "int32": np.int32, "bool": np.bool_}[dtype]


def write_mlpackage(module: torch.nn.Module, example_inputs: Sequence[torch.Tensor], inputs: Sequence[TensorSpec],
                    outputs: Sequence[TensorSpec], path: Path, target: CoreMLTarget) -> dict[str, str]:
    """Convert ``module`` to ``path`` (an .mlpackage folder); returns plan name → CoreML feature name."""
    import coremltools as ct

    names = feature_names([*inputs, *outputs])
    args = tuple(x.contiguous() for x in example_inputs)  # coremltools refuses non-contiguous example inputs
    palettes, removed = _take_palette_metadata(module)
    try:
        with quiet_exporter(), torch.no_grad():
            program = torch.export.export(module, args, strict=False).run_decompositions({})
    finally:
        for owner, key, buffer in removed:  # the caller's module keeps its metadata
            owner.register_buffer(key, buffer)
    _drop_aliases(program)
    precision = ct.precision.FLOAT16 if target.precision == "fp16" else ct.precision.FLOAT32
    with warnings.catch_warnings(), _quiet_coremltools():
        warnings.simplefilter("ignore")
        model = ct.convert(
            program, convert_to="mlprogram", minimum_deployment_target=getattr(ct.target, target.deployment_target),
            compute_precision=precision,
            inputs=[ct.TensorType(name=names[s.name], shape=s.shape, dtype=_np_dtype(s.dtype)) for s in inputs],
            outputs=[ct.TensorType(name=names[s.name], dtype=np.float32 if s.dtype.startswith("float")
                                   else _np_dtype(s.dtype)) for s in outputs],
            pass_pipeline=_unique_palettization(palettes), skip_model_load=True,
        )
    model.short_description = f"pocketsd chunk ({len(inputs)} inputs, {len(outputs)} outputs)"
    model.save(str(path))
    return names


@dataclass(frozen=True)
class _Palette:
    numel: int
    groups: int  # 1: one palette per tensor; else one per group of output channels
    out_channels: int


def _take_palette_metadata(module: torch.nn.Module
                           ) -> tuple[dict[str, _Palette], list[tuple[torch.nn.Module, str, torch.Tensor]]]:
    """Remove the palette metadata of palettized weights; returns how each was palettized and what was removed.

    With the metadata, coremltools' torch frontend finds each weight's palette indices by comparing every weight
    with every palette entry at once (``numel × 2^bits`` temporaries: 7.5 GB for one SD 1.5 convolution at 6 bits).
    The weights already hold exactly their palette values, so the ``unique`` palettization pass, which uses
    ``np.unique``, recovers the same palettes and indices in linear memory. int8 metadata stays (cheap to convert).
    """
    found, removed = {}, []
    for name, sub in module.named_modules():
        buffers = dict(sub.named_buffers(recurse=False))
        for key, lut in list(buffers.items()):
            if not (key.startswith("_COREML_/") and key.endswith("/lut")):
                continue
            leaf = key.split("/")[1]
            weight = getattr(sub, leaf)
            found[f"{name}.{leaf}" if name else leaf] = _Palette(weight.numel(), int(lut.shape[0]), weight.shape[0])
            for other in [k for k in buffers if k.startswith(f"_COREML_/{leaf}/")]:
                removed.append((sub, other, buffers[other]))
                delattr(sub, other)
    return found, removed


def _unique_palettization(palettes: dict[str, _Palette]) -> Any:
    """The default pipeline plus lossless ``unique`` palettization sized to this chunk's palettized weights."""
    if not palettes:
        return None
    import coremltools as ct
    import coremltools.optimize.coreml as cto

    groups = {p.out_channels // p.groups for p in palettes.values() if p.groups > 1}
    if len(groups) > 1:
        raise InternalError(f"one chunk holds palettes grouped by {sorted(groups)} channels; use one group size")
    grouped = {"granularity": "per_grouped_channel", "group_size": groups.pop()} if groups else {}
    # weight_threshold is exclusive: weights with more elements than it are palettized
    config = cto.OpPalettizerConfig(mode="unique", weight_threshold=min(p.numel for p in palettes.values()) - 1,
                                    **grouped)
    pipeline = ct.PassPipeline.DEFAULT_PALETTIZATION
    pipeline.set_options("compression::palettize_weights", {"config": cto.OptimizationConfig(global_config=config)})
    return pipeline


def _drop_aliases(program: Any) -> None:
    """coremltools has no conversion for ``aten.alias`` (a view that changes nothing, e.g. from CLIP's pooling);
    read the aliased tensor directly instead. Written here because no pass in torch or coremltools removes them."""
    graph = program.graph_module.graph
    for node in list(graph.nodes):
        if node.op == "call_function" and node.target == torch.ops.aten.alias.default:
            node.replace_all_uses_with(node.args[0])
            graph.erase_node(node)
    program.graph_module.recompile()


@contextlib.contextmanager
def _quiet_coremltools() -> Iterator[None]:
    """coremltools logs every conversion pass and draws tqdm bars on stderr with no switch to turn them off; the
    CLI has its own progress bars. Exceptions still propagate."""
    logger = logging.getLogger("coremltools")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)
