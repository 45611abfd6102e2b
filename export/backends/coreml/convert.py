"""Write one chunk as a CoreML ML program (``.mlpackage``), from the same chunk module the ONNX writer gets.

The chunk is re-captured with ``torch.export`` (core ATen, as coremltools requires) and converted with the preset's
deployment target and compute precision. Inputs and outputs are always fp32 at the chunk boundary, so precision is
never lost between chunks even when the chunk computes in fp16. Compression metadata that travels with the chunk's
weights (``_COREML_`` buffers, see ``slicing.py``) makes coremltools store the exact palettes chosen in PyTorch
(``coreml_palettes.py``).

CoreML feature names allow only ``[A-Za-z0-9_]``; the manifest keeps the plan's names (identical to the ONNX
bundle's) and records the CoreML name of each in the chunk's ``extra.coreml.feature_names``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from pocketsd.contract import DEPLOYMENT_TARGETS, DTYPES
from pocketsd.errors import InternalError
from pocketsd.export.backends.coreml.palettes import palettization_pipeline, take_palette_metadata
from pocketsd.export.backends.onnx.convert import quiet_exporter
from pocketsd.runtime.manifest import TensorSpec

log = logging.getLogger(__name__)

TARGETS = tuple(DEPLOYMENT_TARGETS)
# specificationVersion each deployment target writes (iOS16/macOS13: 7, iOS17/macOS14: 8, iOS18/macOS15: 9)
SPEC_VERSION = {name: target.spec_version for name, target in DEPLOYMENT_TARGETS.items()}
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
    """The numpy scalar type coremltools takes for a contract dtype name (``np.bool_`` for bool)."""
    if dtype not in DTYPES:
        raise InternalError(f"no CoreML dtype for {dtype!r}")
    return np.dtype(dtype).type


def write_mlpackage(module: torch.nn.Module, example_inputs: Sequence[torch.Tensor], inputs: Sequence[TensorSpec],
                    outputs: Sequence[TensorSpec], path: Path, target: CoreMLTarget) -> dict[str, str]:
    """Convert ``module`` to ``path`` (an .mlpackage folder); returns plan name → CoreML feature name."""
    import coremltools as ct

    names = feature_names([*inputs, *outputs])
    args = tuple(x.contiguous() for x in example_inputs)  # coremltools refuses non-contiguous example inputs
    palettes, removed = take_palette_metadata(module)
    try:
        with quiet_exporter(), torch.no_grad():
            program = torch.export.export(module, args, strict=False).run_decompositions({})
    finally:
        for owner, key, buffer in removed:  # the caller's module keeps its metadata
            owner.register_buffer(key, buffer)
    _drop_aliases(program)
    precision = ct.precision.FLOAT16 if target.precision == "fp16" else ct.precision.FLOAT32
    # Without ``package_dir`` coremltools converts into the system temp folder and deletes that copy only when the
    # process exits (atexit): an export kept every chunk's weights twice until it ended, and for good when killed.
    # Beside ``path`` the copy is in the export's staging folder, which a rerun removes after a kill.
    scratch = path.with_name(f"{path.stem}.converting.mlpackage")
    try:
        with warnings.catch_warnings(), _quiet_coremltools():
            warnings.simplefilter("ignore")
            model = ct.convert(
                program, convert_to="mlprogram",
                minimum_deployment_target=getattr(ct.target, target.deployment_target), compute_precision=precision,
                inputs=[ct.TensorType(name=names[s.name], shape=s.shape, dtype=_np_dtype(s.dtype)) for s in inputs],
                outputs=[ct.TensorType(name=names[s.name], dtype=np.float32 if s.dtype.startswith("float")
                                       else _np_dtype(s.dtype)) for s in outputs],
                pass_pipeline=palettization_pipeline(palettes, program), skip_model_load=True,
                package_dir=str(scratch),
            )
        model.short_description = f"pocketsd chunk ({len(inputs)} inputs, {len(outputs)} outputs)"
        model.save(str(path))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return names


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
