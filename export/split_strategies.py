"""Split strategies (``split::n_chunks``, ``split::max_bytes``, ``split::at_modules``): which valid cuts to take.

Each strategy reads the :class:`CutTable` of a component and returns cut positions plus the reason, in words, that
goes into the saved plan. Among cuts that satisfy the request they prefer those whose crossing activations are
smallest. Both searches are dynamic programs over the candidate cut points (vectorised over the predecessor, since an
SD 1.5 UNet has thousands of candidates).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from pocketsd.errors import PlanError
from pocketsd.export.graph_summary import GraphSummary
from pocketsd.export.plan import CutTable, describe_bytes
from pocketsd.registry import Registry


@dataclass(frozen=True)
class SplitRequest:
    """One component's split request, from a preset or the CLI. Exactly one of the first three fields is set (or
    none: one chunk). ``shared_prefix`` (the UNet of an ONNX preset with a batch-2 UNet): also cut off, as a chunk
    run once per distinct row, what both rows of a guided batch compute alike (export/shared_prefix.py)."""

    n_chunks: int | None = None
    max_bytes: int | None = None
    at_modules: tuple[str, ...] | None = None
    shared_prefix: bool = False

    def fields(self) -> dict[str, object]:
        """The fields that are set, for the saved plan and preset."""
        return {k: v for k, v in vars(self).items() if v is not None and v is not False}

    @property
    def strategy(self) -> str:
        if self.at_modules is not None:
            return "at_modules"
        if self.max_bytes is not None:
            return "max_bytes"
        return "n_chunks"


Strategy = Callable[[GraphSummary, CutTable, SplitRequest], tuple[list[int], str]]
STRATEGIES: Registry[Strategy] = Registry("split", PlanError)
# Chunk weights may exceed an equal share by this much to reach cheaper cut points; widened only if nothing fits.
_SLACKS = (0.25, 0.5, 1.0, float("inf"))
_TIE = 1e-6  # tie-break: per byte of imbalance, so balance only decides between equally cheap cuts


@STRATEGIES.register("n_chunks")
def split_n_chunks(summary: GraphSummary, table: CutTable, request: SplitRequest) -> tuple[list[int], str]:
    n = request.n_chunks or 1
    if n == 1:
        return [], "one chunk: no split requested"
    cand = table.candidates
    if len(cand) < n - 1:
        raise PlanError(
            f"{summary.component} cannot be cut into {n} chunks: it has only {len(cand)} valid cut points",
            f"ask for at most {len(cand) + 1} chunks for {summary.component}",
        )
    total = int(table.weight_before[-1])
    for slack in _SLACKS:
        cap = total / n * (1 + slack)
        cuts = _fewest_crossing(table, cand, n - 1, cap, total / n)
        if cuts is not None:
            return cuts, (f"{n} chunks: each within {slack:.0%} of an equal share of the weights "
                          f"({describe_bytes(total / n)}), at the cut points whose crossing activations are smallest")
    raise PlanError(f"{summary.component} cannot be cut into {n} chunks", "ask for fewer chunks")


def _fewest_crossing(table: CutTable, cand: np.ndarray, n_cuts: int, cap: float, share: float) -> list[int] | None:
    w = table.weight_before.astype(np.float64)
    end = len(w) - 1
    cost0 = table.crossing_bytes[cand] + _TIE * np.abs(w[cand] - share)
    best = np.where(w[cand] <= cap, cost0, np.inf)  # first cut: chunk 0 is [0, c)
    back = []
    for _ in range(n_cuts - 1):
        nxt = np.full(len(cand), np.inf)
        arg = np.zeros(len(cand), dtype=np.int64)
        for j in range(len(cand)):
            chunk = w[cand[j]] - w[cand[:j]]
            options = np.where(chunk <= cap, best[:j] + _TIE * np.abs(chunk - share), np.inf)
            if j and np.isfinite(options).any():
                arg[j] = int(np.argmin(options))
                nxt[j] = options[arg[j]] + table.crossing_bytes[cand[j]]
        back.append(arg)
        best = nxt
    last = w[end] - w[cand]
    final = np.where(last <= cap, best + _TIE * np.abs(last - share), np.inf)
    if not np.isfinite(final).any():
        return None
    j = int(np.argmin(final))
    picks = [j]
    for arg in reversed(back):
        j = int(arg[j])
        picks.append(j)
    return sorted(int(cand[k]) for k in picks)


@STRATEGIES.register("max_bytes")
def split_max_bytes(summary: GraphSummary, table: CutTable, request: SplitRequest) -> tuple[list[int], str]:
    budget = int(request.max_bytes or 0)
    stops = np.concatenate([[0], table.candidates, [len(table.weight_before) - 1]])
    w = table.weight_before.astype(np.float64)
    pieces = np.diff(w[stops])
    if pieces.max(initial=0) > budget:
        k = int(np.argmax(pieces))
        raise PlanError(*_too_small(summary, int(stops[k]), int(stops[k + 1]), int(pieces[k]), budget))
    # best[i]: (chunks, crossing) to cover ops before stops[i], folded into one number: chunks dominate.
    big = 1e15
    best = np.full(len(stops), np.inf)
    arg = np.zeros(len(stops), dtype=np.int64)
    best[0] = 0.0
    for i in range(1, len(stops)):
        fits = w[stops[i]] - w[stops[:i]] <= budget
        options = np.where(fits, best[:i], np.inf)
        arg[i] = int(np.argmin(options))
        cross = table.crossing_bytes[stops[i]] if i < len(stops) - 1 else 0
        best[i] = options[arg[i]] + big + cross
    cuts, i = [], len(stops) - 1
    while i > 0:
        i = int(arg[i])
        if i > 0:
            cuts.append(int(stops[i]))
    n = len(cuts) + 1
    return sorted(cuts), (f"at most {describe_bytes(budget)} of weights per chunk: the fewest chunks ({n}) that fit, "
                          "at the cut points whose crossing activations are smallest")


def _too_small(summary: GraphSummary, start: int, end: int, size: int, budget: int) -> tuple[str, str]:
    params = {p for op in summary.ops[start:end] for p in op.params}
    largest = max(params, key=lambda p: summary.param_bytes[p])
    layer = summary.param_module.get(largest, largest)
    first, last = summary.ops[start].module, summary.ops[end - 1].module
    span = first if first == last else f"{first} … {last}"
    return (
        f"{summary.component}: the smallest piece that cannot be cut, {span}, holds {describe_bytes(size)} of weights "
        f"(largest layer {layer}: {describe_bytes(summary.param_bytes[largest])}), more than the "
        f"{describe_bytes(budget)} per-chunk budget",
        f"raise the budget to at least {int(np.ceil(size / 1e6)) + 1} MB",
    )


@STRATEGIES.register("at_modules")
def split_at_modules(summary: GraphSummary, table: CutTable, request: SplitRequest) -> tuple[list[int], str]:
    positions = []
    for module in request.at_modules or ():
        hits = [i for i, op in enumerate(summary.ops) if op.module == module or op.module.startswith(module + ".")]
        if not hits:
            tops = sorted({op.module.split(".")[0] for op in summary.ops if op.module})
            raise PlanError(f"{summary.component} has no module {module!r} to cut at",
                            f"top-level modules: {', '.join(tops)}")
        p = hits[0]
        if p == 0:
            raise PlanError(f"cutting {summary.component} before {module!r} leaves an empty first chunk",
                            "name a module that is not the first")
        if not table.valid[p]:
            raise PlanError(f"{summary.component} cannot be cut before {module!r}: a weight or a non-tensor value "
                            "is used on both sides", "name a neighbouring module")
        positions.append(p)
    if len(set(positions)) != len(positions):
        raise PlanError(f"{summary.component}: two of the modules {list(request.at_modules or ())} give the same cut",
                        "name each boundary once")
    return sorted(positions), f"cut before the modules asked for: {', '.join(request.at_modules or ())}"
