"""Cut a captured graph into the chunk modules a plan describes.

We copy each chunk's node range ourselves (``fx.Graph.node_copy``) instead of using ``torch.fx.passes.split_module``:
split_module chooses its own input/output order and names, and passes weights from the parent as arguments, while
the plan fixes the order and names and each chunk must own its weights. Weights keep their qualified names, and each
carries along the ``_COREML_`` compression metadata its module holds for it (coremltools matches ``x.weight`` with
``x._COREML_/weight/...``), so a chunk converts with exactly the palettes the whole component was compressed with.
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


COREML_PREFIX = "_COREML_"


def _compression_metadata(root: torch.nn.Module, target: str) -> dict[str, torch.Tensor]:
    """The ``_COREML_`` buffers that describe parameter ``target`` (and the model-wide version tag beside them)."""
    module_path, _, leaf = target.rpartition(".")
    try:
        module = root.get_submodule(module_path) if module_path else root
    except AttributeError:
        return {}
    found = {}
    for name, buffer in module.named_buffers(recurse=False):
        if name.startswith(f"{COREML_PREFIX}/{leaf}/"):
            found[f"{module_path}.{name}" if module_path else name] = buffer
    return found


def slice_chunk(graph_module: fx.GraphModule, chunk: PlannedChunk) -> fx.GraphModule:
    nodes = {node.name: node for node in graph_module.graph.nodes}
    ops = [node for node in graph_module.graph.nodes if node.op == "call_function"]
    graph = fx.Graph()
    weights: dict[str, Any] = {}
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
        weights[node.target] = _resolve(graph_module, node.target)
        copy = graph.get_attr(node.target)
        copy.meta = dict(node.meta)
        env[node] = copy
        return copy

    for node in ops[chunk.op_start:chunk.op_end]:
        env[node] = graph.node_copy(node, lookup)
    graph.output(tuple(env[nodes[v]] for v in chunk.output_values))
    module = fx.GraphModule(weights, graph, class_name=f"Chunk_{chunk.id.replace('.', '_')}")
    for target in list(weights):
        for name, buffer in _compression_metadata(graph_module, target).items():
            owner, _, leaf = name.rpartition(".")
            module.get_submodule(owner).register_buffer(leaf, buffer)
    return module.eval()


def slice_plan(graph_module: fx.GraphModule, plan: ComponentPlan) -> list[ChunkModule]:
    return [ChunkModule(chunk, slice_chunk(graph_module, chunk)) for chunk in plan.chunks]
