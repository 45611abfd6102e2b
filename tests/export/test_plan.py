"""The split planner on hand-made graph summaries: pure data in, plan out (no torch needed)."""

from __future__ import annotations

import numpy as np
import pytest

from pocketsd.errors import PlanError
from pocketsd.export.graph_summary import GraphSummary, Op, Value
from pocketsd.export.plan import analyze_cuts, build_plan
from pocketsd.export.split_strategies import STRATEGIES, SplitRequest


def chain_summary(widths: list[int], weights: list[int], *, shared: tuple[int, int] | None = None,
                  skip: tuple[int, int] | None = None) -> GraphSummary:
    """ops m0..m{n-1} in a line; op i writes a float32 [widths[i]] value and owns a weight of weights[i] bytes.
    ``shared`` makes two ops read the same weight; ``skip`` adds a skip connection from op a to op b."""
    ops, values, params = [], {"x": Value("x", (widths[0],), "float32", "")}, {}
    prev = "x"
    for i, (width, weight) in enumerate(zip(widths, weights)):
        reads = [prev] + ([f"v{skip[0]}"] if skip and i == skip[1] else [])
        param = f"w{shared[0]}" if shared and i == shared[1] else f"w{i}"
        params.setdefault(param, weight)
        ops.append(Op(f"v{i}", f"m{i}", tuple(reads), (param,)))
        values[f"v{i}"] = Value(f"v{i}", (width,), "float32", f"m{i}")
        prev = f"v{i}"
    return GraphSummary("toy", ("x",), (prev,), tuple(ops), values, params, {p: f"m{p[1:]}" for p in params})


def plan_of(summary: GraphSummary, request: SplitRequest):
    table = analyze_cuts(summary)
    positions, reason = STRATEGIES.get(request.strategy)(summary, table, request)
    return build_plan(summary, positions, strategy=request.strategy, request={}, reason=reason,
                      output_names=["y"], input_names=["x"])


def test_crossing_bytes_and_validity():
    s = chain_summary([4, 100, 2, 100], [10, 10, 10, 10], skip=(0, 3))
    table = analyze_cuts(s)
    # cut before op p: v(p-1) crosses, plus v0 while the skip to op 3 is pending
    assert list(table.crossing_bytes[1:4]) == [16, 400 + 16, 8 + 16]
    assert list(table.candidates) == [1, 2, 3]


def test_n_chunks_prefers_the_narrowest_cut_within_the_balance_slack():
    s = chain_summary([100, 100, 2, 100, 100, 100], [10] * 6)
    plan = plan_of(s, SplitRequest(n_chunks=2))
    assert [c["before_op"] for c in plan.cuts] == [3]  # v2 (8 bytes) crosses, not a 400-byte tensor
    assert [c.weight_bytes for c in plan.chunks] == [30, 30]


def test_n_chunks_respects_weight_balance_over_a_cheaper_lopsided_cut():
    s = chain_summary([2] + [100] * 9, [10] * 10)  # the cheapest cut (after op 0) leaves 10/90 of the weights
    plan = plan_of(s, SplitRequest(n_chunks=2))
    weights = [c.weight_bytes for c in plan.chunks]
    assert max(weights) <= 1.25 * sum(weights) / 2


def test_each_weight_belongs_to_exactly_one_chunk():
    s = chain_summary([8] * 6, [10] * 6, shared=(1, 4))  # op 4 reuses op 1's weight: no cut between them
    table = analyze_cuts(s)
    assert list(table.candidates) == [1, 5]
    plan = plan_of(s, SplitRequest(n_chunks=3))
    owners = [p for c in plan.chunks for p in c.params]
    assert sorted(owners) == sorted(set(owners))


def test_more_chunks_than_cut_points_is_a_plan_error():
    s = chain_summary([8] * 4, [10] * 4)
    with pytest.raises(PlanError, match="only 3 valid cut points"):
        plan_of(s, SplitRequest(n_chunks=9))


def test_budget_below_the_largest_layer_names_the_layer_and_size():
    s = chain_summary([8] * 4, [1_000_000, 5_000_000, 1_000_000, 1_000_000])
    with pytest.raises(PlanError) as err:
        plan_of(s, SplitRequest(max_bytes=2_000_000))
    assert "m1" in err.value.message and "5.0 MB" in err.value.message
    assert "at least 6 MB" in err.value.hint


def test_max_bytes_uses_the_fewest_chunks_that_fit():
    s = chain_summary([8] * 8, [1_000_000] * 8)
    plan = plan_of(s, SplitRequest(max_bytes=3_000_000))
    assert len(plan.chunks) == 3
    assert all(c.weight_bytes <= 3_000_000 for c in plan.chunks)


def test_at_modules_cuts_before_named_modules_and_rejects_unknown_ones():
    s = chain_summary([8] * 5, [10] * 5)
    plan = plan_of(s, SplitRequest(at_modules=("m2", "m4")))
    assert [c.op_start for c in plan.chunks] == [0, 2, 4]
    with pytest.raises(PlanError, match="no module 'nope'"):
        plan_of(s, SplitRequest(at_modules=("nope",)))
    with pytest.raises(PlanError, match="empty first chunk"):
        plan_of(s, SplitRequest(at_modules=("m0",)))


def test_boundary_names_are_readable_stable_and_wired():
    s = chain_summary([8] * 5, [10] * 5, skip=(0, 4))
    plan = plan_of(s, SplitRequest(at_modules=("m2",)))
    first, second = plan.chunks
    assert first.id == "toy.00" and second.id == "toy.01"
    assert [t.name for t in first.outputs] == ["toy.00/m0", "toy.00/m1"]
    assert {t.name: t.source for t in second.inputs} == {"toy.00/m1": "toy.00:toy.00/m1",
                                                         "toy.00/m0": "toy.00:toy.00/m0"}
    assert first.inputs[0].source == "input:x"
    assert plan.outputs[0].name == "y" and plan.outputs[0].source == "toy.01:y"
    again = plan_of(s, SplitRequest(at_modules=("m2",)))
    assert again.to_dict() == plan.to_dict()


def test_plan_weights_add_up():
    s = chain_summary([8] * 7, list(np.arange(1, 8) * 100))
    plan = plan_of(s, SplitRequest(n_chunks=3))
    assert sum(c.weight_bytes for c in plan.chunks) == plan.total_weight_bytes == s.total_weight_bytes
