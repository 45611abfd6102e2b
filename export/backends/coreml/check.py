"""What can be checked of an .mlpackage without running it (Linux): its spec against the manifest.

coremltools on Linux converts and compresses but cannot predict, so each written chunk is reloaded as a spec and
checked: input/output names, shapes and dtypes as the manifest says, the deployment target, the number of
compressed-weight ops (lookup tables / dequantize) equal to the layers compressed in PyTorch, and the stored weight
file about as large as the bit widths predict. Numeric quality is measured in PyTorch with the same palettes.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from pocketsd.contract import DTYPE_BYTES
from pocketsd.runtime.manifest import TensorSpec

COMPRESSED_OPS = ("constexpr_lut_to_dense", "constexpr_affine_dequantize", "constexpr_blockwise_shift_scale")
WEIGHTS_FILE = Path("Data/com.apple.CoreML/weights/weight.bin")
# CoreML's ArrayFeatureType.ArrayDataType codes (FeatureTypes.proto): 0x10000 | bits for floats, 0x20000 | bits for
# ints. Of the contract's dtypes, a CoreML multi-array holds these three.
_COREML_ARRAY_DTYPES = ("float32", "float16", "int32")
_DTYPES = {(0x10000 if name.startswith("float") else 0x20000) | 8 * DTYPE_BYTES[name]: name
           for name in _COREML_ARRAY_DTYPES}


@dataclass(frozen=True)
class SpecReport:
    spec_version: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    ops: dict[str, int]
    weight_file_bytes: int

    @property
    def compressed_ops(self) -> int:
        return sum(self.ops.get(op, 0) for op in COMPRESSED_OPS)


def _features(features: Any) -> tuple[TensorSpec, ...]:
    return tuple(TensorSpec(f.name, _DTYPES.get(f.type.multiArrayType.dataType, str(f.type.multiArrayType.dataType)),
                            tuple(int(d) for d in f.type.multiArrayType.shape)) for f in features)


def _count_ops(operations: Any, counts: Counter) -> None:
    for op in operations:
        counts[op.type] += 1
        for block in op.blocks:
            _count_ops(block.operations, counts)


def read_spec(path: Path) -> SpecReport:
    import coremltools as ct

    spec = ct.utils.load_spec(str(path))
    counts: Counter = Counter()
    main = spec.mlProgram.functions["main"]
    _count_ops(main.block_specializations[main.opset].operations, counts)
    weights = path / WEIGHTS_FILE
    return SpecReport(int(spec.specificationVersion), _features(spec.description.input),
                      _features(spec.description.output), dict(counts),
                      weights.stat().st_size if weights.exists() else 0)


def check_chunk(report: SpecReport, inputs: Sequence[TensorSpec], outputs: Sequence[TensorSpec],
                names: dict[str, str], spec_version: int, compressed_layers: int,
                expected_weight_bytes: int) -> list[str]:
    """Every way the written package differs from what the manifest promises (empty: it matches)."""
    problems = []
    if report.spec_version != spec_version:
        problems.append(f"specificationVersion {report.spec_version}, expected {spec_version}")
    for kind, written, wanted in (("input", report.inputs, inputs), ("output", report.outputs, outputs)):
        expected = [(names[s.name], "float32" if s.dtype != "float32" and kind == "output" else s.dtype, s.shape)
                    for s in wanted]
        actual = [(s.name, s.dtype, s.shape) for s in written]
        if actual != expected:
            problems.append(f"{kind}s {actual} differ from the manifest's {expected}")
    # ``>=``: the lossless palettization pass may also pack a large constant of few values (e.g. a mask)
    if report.compressed_ops < compressed_layers:
        problems.append(f"{report.compressed_ops} compressed-weight ops for {compressed_layers} compressed layers")
    slack = 0.1 * expected_weight_bytes + 64 * report.ops.get("const", 0) + 4096  # blob alignment, small consts
    if abs(report.weight_file_bytes - expected_weight_bytes) > slack:
        problems.append(f"weight file is {report.weight_file_bytes} bytes, expected about {expected_weight_bytes}")
    return problems
