"""Cut a captured graph into the chunk modules a plan describes.

We copy each chunk's node range ourselves (``fx.Graph.node_copy``) instead of using ``torch.fx.passes.split_module``:
split_module chooses its own input/output order and names, and passes weights from the parent as arguments, while
the plan fixes the order and names and each chunk must own its weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from pocketsd.export.plan import ComponentPlan, PlannedChunk


@dataclass
class ChunkModule:
    plan: PlannedChunk
    module: fx.GraphModule


def _resolve(root: torch.nn.Module, target: str) -> Any:
    obj: Any = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def slice_chunk(graph_module: fx.GraphModule, chunk: PlannedChunk) -> fx.GraphModule:
    nodes = {node.name: node for node in graph_module.graph.nodes}
    ops = [node for node in graph_module.graph.nodes if node.op == "call_function"]
    graph = fx.Graph()
    owner = torch.nn.Module()
    env: dict[fx.Node, fx.Node] = {}
    for i, value in enumerate(chunk.input_values):
        placeholder = graph.placeholder(f"input_{i}")
        placeholder.meta = dict(nodes[value].meta)
        env[nodes[value]] = placeholder

    def lookup(node: fx.Node) -> fx.Node:
        if node in env:
            return env[node]
        if node.op != "get_attr":
            raise KeyError(f"{chunk.id}: {node.name} is read but neither an input nor computed in the chunk")
        attr = node.target.replace(".", "__")
        tensor = _resolve(graph_module, node.target)
        if isinstance(tensor, torch.nn.Parameter):
            owner.register_parameter(attr, tensor)
        else:
            owner.register_buffer(attr, tensor)
        copy = graph.get_attr(attr)
        copy.meta = dict(node.meta)
        env[node] = copy
        return copy

    for node in ops[chunk.op_start:chunk.op_end]:
        env[node] = graph.node_copy(node, lookup)
    graph.output(tuple(env[nodes[v]] for v in chunk.output_values))
    module = fx.GraphModule(owner, graph, class_name=f"Chunk_{chunk.id.replace('.', '_')}")
    return module.eval()


def slice_plan(graph_module: fx.GraphModule, plan: ComponentPlan) -> list[ChunkModule]:
    return [ChunkModule(chunk, slice_chunk(graph_module, chunk)) for chunk in plan.chunks]
