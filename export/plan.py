"""The split plan: where each component is cut, as data every backend obeys.

``analyze_cuts`` finds the valid cut points of a graph (a module boundary where no weight is used on both sides and
only tensors cross) and what crosses each one; a strategy (``split_strategies``) picks among them; ``build_plan`` turns
the chosen positions into chunks with readable, stable boundary tensor names. All of it is pure: summary in, plan out.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

import numpy as np

from pocketsd.errors import InternalError
from pocketsd.export.graph_summary import GraphSummary


@dataclass(frozen=True)
class CutTable:
    """Per position p (a cut before op p, 1 <= p < len(ops)): validity and crossing activation bytes."""

    valid: np.ndarray  # bool[len(ops) + 1]
    crossing_bytes: np.ndarray  # int64[len(ops) + 1]
    weight_before: np.ndarray  # int64[len(ops) + 1]: weight bytes of the ops before position p
    labels: tuple[str, ...]  # module of the op after the cut
    clean: np.ndarray | None = None  # bool[len(ops) + 1]: no weight on both sides, only tensors cross (valid or not)

    @property
    def candidates(self) -> np.ndarray:
        return np.flatnonzero(self.valid)


@dataclass(frozen=True)
class BoundaryTensor:
    name: str
    dtype: str
    shape: tuple[int, ...]
    source: str | None = None  # for chunk inputs: input:<name> or <chunk id>:<tensor name>


@dataclass(frozen=True)
class PlannedChunk:
    id: str
    op_start: int
    op_end: int
    weight_bytes: int
    modules: tuple[str, ...]
    inputs: tuple[BoundaryTensor, ...]
    outputs: tuple[BoundaryTensor, ...]
    params: tuple[str, ...]
    input_values: tuple[str, ...] = ()  # FX value behind each input, aligned with ``inputs`` (for the slicer)
    output_values: tuple[str, ...] = ()  # likewise for ``outputs``
    largest_activation_bytes: int = 0  # the largest tensor an op of the chunk produces (runtime/sessions.py)
    per_row: bool = False  # cut from the batch-1 graph and run once per row (export/shared_prefix.py)


@dataclass(frozen=True)
class ComponentPlan:
    component: str
    strategy: str
    request: dict[str, Any]
    reason: str
    total_weight_bytes: int
    cuts: tuple[dict[str, Any], ...]
    chunks: tuple[PlannedChunk, ...]
    outputs: tuple[BoundaryTensor, ...]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for chunk in data["chunks"]:
            for internal in ("params", "input_values", "output_values"):
                chunk.pop(internal)
        return data


def analyze_cuts(summary: GraphSummary, weight_bytes: dict[str, int] | None = None) -> CutTable:
    """Sweep the ops once, tracking live values and open parameters, to score every position."""
    weights = dict(summary.param_bytes) if weight_bytes is None else weight_bytes
    n = len(summary.ops)
    index = {op.name: i for i, op in enumerate(summary.ops)}
    last_use: dict[str, int] = {}
    param_span: dict[str, list[int]] = {}
    for i, op in enumerate(summary.ops):
        for name in op.reads:
            last_use[name] = i
        for p in op.params:
            param_span.setdefault(p, [i, i])[1] = i
    for name in summary.outputs:
        last_use[name] = n  # component outputs stay live to the end
    # delta arrays: +bytes at the position after definition, -bytes after the last use
    cross = np.zeros(n + 2, dtype=np.int64)
    bad = np.zeros(n + 2, dtype=np.int64)
    for name, end in last_use.items():
        if name not in index:
            continue  # a component input: bound directly from the caller, never crosses a cut
        start = index[name] + 1
        if end >= start:
            value = summary.values[name]
            cross[start] += value.nbytes
            cross[end + 1] -= value.nbytes
            if not value.is_tensor:
                bad[start] += 1
                bad[end + 1] -= 1
    for first, last in param_span.values():
        if last > first:
            bad[first + 1] += 1
            bad[last + 1] -= 1
    crossing = np.cumsum(cross)[: n + 1]
    blocked = np.cumsum(bad)[: n + 1] > 0
    per_op = np.zeros(n + 1, dtype=np.int64)
    for p, (first, _) in param_span.items():
        per_op[first + 1] += weights.get(p, 0)
    weight_before = np.cumsum(per_op)
    modules = [op.module for op in summary.ops]
    valid = np.zeros(n + 1, dtype=bool)
    for p in range(1, n):
        valid[p] = not blocked[p] and modules[p] != modules[p - 1]
    labels = tuple(modules[p] if p < n else "<end>" for p in range(n + 1))
    return CutTable(valid, crossing, weight_before, labels, ~blocked)


def _readable(module: str, fallback: str) -> str:
    return module or fallback


def build_plan(
    summary: GraphSummary,
    positions: Sequence[int],
    *,
    strategy: str,
    request: dict[str, Any],
    reason: str,
    output_names: Sequence[str],
    input_names: Sequence[str],
    weight_bytes: dict[str, int] | None = None,
) -> ComponentPlan:
    """Cut ``summary`` before each op index in ``positions`` and name everything that crosses."""
    weights = dict(summary.param_bytes) if weight_bytes is None else weight_bytes
    table = analyze_cuts(summary, weights)
    bounds = [0, *sorted(positions), len(summary.ops)]
    if len(set(bounds)) != len(bounds):
        raise InternalError(f"duplicate or empty cut positions {bounds}")
    comp = summary.component
    producer = {op.name: i for i, op in enumerate(summary.ops)}
    # names of values as the outside world sees them: component I/O keep their spec names
    public = dict(zip(summary.inputs, input_names))
    public.update(zip(summary.outputs, output_names))
    readers: dict[str, list[int]] = {}
    for i, op in enumerate(summary.ops):
        for name in op.reads:
            readers.setdefault(name, []).append(i)
    tensor_name: dict[str, str] = {}
    source_of: dict[str, str] = {summary.inputs[i]: f"input:{public[v]}" for i, v in enumerate(summary.inputs)}
    chunks = []
    for k, (start, end) in enumerate(zip(bounds, bounds[1:])):
        chunk_id = f"{comp}.{k:02d}"
        inputs, input_values, seen = [], [], set()
        for op in summary.ops[start:end]:
            for name in op.reads:
                if name in seen or (name in producer and start <= producer[name] < end):
                    continue
                seen.add(name)
                value = summary.values[name]
                inputs.append(BoundaryTensor(tensor_name.get(name, public.get(name, name)), value.dtype, value.shape,
                                             source_of[name]))
                input_values.append(name)
        outputs, output_values, used_names = [], [], {}
        for i in range(start, end):
            name = summary.ops[i].name
            later = any(r >= end for r in readers.get(name, ())) or name in summary.outputs
            if not later:
                continue
            value = summary.values[name]
            label = public.get(name) or _unique(f"{chunk_id}/{_readable(value.module, name)}", used_names)
            tensor_name[name] = label
            source_of[name] = f"{chunk_id}:{label}"
            outputs.append(BoundaryTensor(label, value.dtype, value.shape))
            output_values.append(name)
        params = tuple(dict.fromkeys(p for op in summary.ops[start:end] for p in op.params))
        chunks.append(PlannedChunk(
            id=chunk_id, op_start=start, op_end=end,
            weight_bytes=int(table.weight_before[end] - table.weight_before[start]),
            modules=_spanned_modules(summary, start, end), inputs=tuple(inputs), outputs=tuple(outputs),
            params=params, input_values=tuple(input_values), output_values=tuple(output_values),
            largest_activation_bytes=max((summary.values[op.name].nbytes for op in summary.ops[start:end]
                                          if op.name in summary.values), default=0),
        ))
    cuts = tuple({"before_op": p, "before_module": table.labels[p], "crossing_bytes": int(table.crossing_bytes[p])}
                 for p in bounds[1:-1])
    outs = tuple(BoundaryTensor(public[o], summary.values[o].dtype, summary.values[o].shape, source_of[o])
                 for o in summary.outputs)
    return ComponentPlan(comp, strategy, request, reason, int(sum(weights.values())), cuts, tuple(chunks), outs)


def _unique(label: str, used: dict[str, int]) -> str:
    count = used.get(label, 0)
    used[label] = count + 1
    return label if count == 0 else f"{label}#{count}"


def _spanned_modules(summary: GraphSummary, start: int, end: int) -> tuple[str, ...]:
    """The blocks a chunk covers, in order: module paths up to their first index (``down_blocks.1``,
    ``mid_block.resnets.0``, ``text_model.encoder.layers.3``), or two levels where there is none."""
    spans: dict[str, None] = {}
    for op in summary.ops[start:end]:
        if op.module:
            parts = op.module.split(".")
            cut = next((i + 1 for i, part in enumerate(parts) if part.isdigit()), 2)
            spans.setdefault(".".join(parts[:cut]), None)
    return tuple(spans)


def describe_bytes(n: float) -> str:
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"
