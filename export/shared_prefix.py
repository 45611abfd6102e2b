"""The shared prefix of a guided UNet: what both rows of its batch compute alike, cut off as a chunk run once per row.

In a guided step the UNet's rows share the latents and the timestep and differ only in their text inputs, so every
op before the first that reads a text input (through any chain of ops) computes the same in both rows. Split presets
ask for it with ``shared_prefix: true`` (split_configs/); the runtime runs that chunk once per distinct row
(runtime/per_row.py). No library finds this cut: it is a property of how the runtime calls the graph, so it is
written here, on the FX graph the planner already reads.

The text does not enter at the first op of the captured graph: the wrapper's layout change of the text states
(export/components/unet.py) comes first, weightless. ``hoist`` moves such ops (each reads only text inputs or
other such ops, so no shared op depends on them) to just before the first weighted op that reads the text (SD 1.5:
``attn2.to_k`` of the first down block), and the prefix is everything before them: the time embedding, ``conv_in``,
the first ResNet, the first self-attention and ``attn2.to_q``. Where the text enters before any block (SDXL: its
pooled text embeddings join the time embedding), there is no prefix worth a chunk, and none is made.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from torch import fx

from pocketsd.contract import UNET_IO

log = logging.getLogger(__name__)

# Inputs that are equal in every row of a guided batch (a UNet's sample and timestep); the others vary by row.
SHARED_INPUTS = (UNET_IO.sample, UNET_IO.timestep)
# A prefix is worth a chunk only if it reaches into the first block, past the time embedding and conv_in.
_BLOCKS = "down_blocks."


@dataclass(frozen=True)
class Prefix:
    ops: int  # the number of call_function ops (GraphSummary.ops) before the cut
    hoisted: int  # the text-reading weightless ops moved from before the cut to after it


def hoist(graph_module: fx.GraphModule, varying: set[str], module_of: dict[str, str]) -> Prefix | None:
    """Reorder ``graph_module`` in place so that its ops that read none of the ``varying`` placeholders (by node
    name), up to the first weighted op that does, come first; the prefix they form, or None (graph untouched)
    where it covers no block. ``module_of``: each op's module path, as the planner labels it."""
    graph = graph_module.graph
    nodes = list(graph.nodes)
    tainted = {n for n in nodes if n.op == "placeholder" and n.name in varying}
    moved: list[fx.Node] = []
    prefix: list[fx.Node] = []
    first = None
    for node in (n for n in nodes if n.op == "call_function"):
        if not any(arg in tainted for arg in node.all_input_nodes):
            prefix.append(node)
            continue
        tainted.add(node)
        if any(arg.op == "get_attr" for arg in node.all_input_nodes):
            first = node
            break
        moved.append(node)
    if first is None or not any(module_of.get(n.name, "").startswith(_BLOCKS) for n in prefix):
        return None
    for node in moved:
        first.prepend(node)
    graph.lint()
    graph_module.recompile()
    log.info("shared prefix: %d ops before %s (%d text-reading ops moved after it)", len(prefix),
             module_of.get(first.name, first.name), len(moved))
    return Prefix(len(prefix), len(moved))
