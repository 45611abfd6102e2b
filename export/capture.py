"""Capture one component at static shapes with ``torch.export`` and run it once for reference outputs."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from pocketsd.contract import DTYPES
from pocketsd.errors import InternalError
from pocketsd.export.components.base import ComponentSpec, Dims, IOSpec
from pocketsd.export.graph_summary import GraphSummary, summarize
from pocketsd.export.shared_prefix import SHARED_INPUTS, Prefix, hoist
from pocketsd.runtime.manifest import TensorSpec

log = logging.getLogger(__name__)
_TORCH_DTYPES = {name: getattr(torch, name) for name in DTYPES}


@dataclass
class Captured:
    spec: ComponentSpec
    graph_module: fx.GraphModule
    summary: GraphSummary
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    example_inputs: tuple[torch.Tensor, ...]
    reference_outputs: tuple[torch.Tensor, ...]
    # With a shared prefix (export/shared_prefix.py): where it ends, and the graph captured at batch 1 (reordered
    # alike) that its per-row chunk is cut from.
    prefix: Prefix | None = None
    rows: RowGraph | None = None


@dataclass
class RowGraph:
    """The component captured again at batch 1, for its per-row chunk. Its prefix ends at the same place but may hold
    other ops than the batch's: sliced attention (components/attention.py) cuts the queries by bytes, so a row
    takes fewer slices than the batch."""

    graph_module: fx.GraphModule
    summary: GraphSummary
    prefix: Prefix


def example_value(io: IOSpec, shape: tuple[int, ...], dims: Dims, generator: torch.Generator) -> torch.Tensor:
    """A seeded example input of the kind the component sees in real use."""
    if io.example == "tokens":
        ids = torch.randint(0, dims.vocab_size - 2, shape, generator=generator)
        ids[..., 0] = dims.vocab_size - 2  # <|startoftext|> sits just before <|endoftext|> in CLIP vocabularies
        ids[..., shape[-1] // 2:] = dims.vocab_size - 1
        return ids.to(_TORCH_DTYPES[io.dtype])
    if io.example == "timestep":
        return torch.full(shape, 981.0, dtype=_TORCH_DTYPES[io.dtype])
    if io.example == "time_ids":  # SDXL's (original size, crop corner, target size) of an uncropped image
        row = torch.tensor([dims.height, dims.width, 0, 0, dims.height, dims.width], dtype=_TORCH_DTYPES[io.dtype])
        return row.expand(shape).clone()
    if io.example == "guidance_embedding":  # sin/cos of a guidance scale, as the runtime computes it
        from pocketsd.runtime.conditioning import guidance_embedding

        row = torch.from_numpy(guidance_embedding(8.5, shape[-1]))
        return row.expand(shape).clone().to(_TORCH_DTYPES[io.dtype])
    if io.example == "image":
        return torch.rand(shape, generator=generator) * 2 - 1
    if io.example == "ones":
        return torch.ones(shape, dtype=_TORCH_DTYPES[io.dtype])
    if io.example == "group_norm_stats":  # [..., 2]: a mean and a mean square with a variance in [0.5, 2]
        mean = torch.randn(shape[:-1], generator=generator) * 0.5
        var = 0.5 + 1.5 * torch.rand(shape[:-1], generator=generator)
        return torch.stack([mean, mean * mean + var], dim=-1).to(_TORCH_DTYPES[io.dtype])
    return torch.randn(shape, generator=generator, dtype=_TORCH_DTYPES[io.dtype])


def example_inputs(spec: ComponentSpec, dims: Dims, seed: int = 0) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(example_value(io, spec.shape(io, dims), dims, generator) for io in spec.inputs)


def as_outputs(result: Any) -> tuple[torch.Tensor, ...]:
    """A model's result as a tuple of tensors: one tensor, or a tuple or list of them."""
    return (result,) if isinstance(result, torch.Tensor) else tuple(result)


def run_component(spec: ComponentSpec, model: torch.nn.Module, examples: tuple[torch.Tensor, ...]
                  ) -> tuple[torch.Tensor, ...]:
    """The component's outputs in eager PyTorch (through its wrapper), always as a tuple."""
    with torch.no_grad():
        return as_outputs(spec.make_wrapper(model).eval()(*examples))


def _export(spec: ComponentSpec, model: torch.nn.Module, examples: tuple[torch.Tensor, ...],
            shared_prefix: bool) -> tuple[fx.GraphModule, GraphSummary, Prefix | None]:
    """The component's graph at the examples' shapes, its summary and, where asked for, its shared prefix (the graph
    then reordered so that the prefix comes first)."""
    log.info("capturing %s with torch.export at %s", spec.id, [tuple(x.shape) for x in examples])
    with torch.no_grad():
        exported = torch.export.export(spec.make_wrapper(model).eval(), examples, strict=False)
        graph_module = exported.module(check_guards=False)
    summary = summarize(spec.id, graph_module)
    if not shared_prefix:
        return graph_module, summary, None
    varying = {fx_name for fx_name, io in zip(summary.inputs, spec.inputs) if io.name not in SHARED_INPUTS}
    prefix = hoist(graph_module, varying, {op.name: op.module for op in summary.ops})
    return graph_module, summarize(spec.id, graph_module) if prefix else summary, prefix


def capture(spec: ComponentSpec, model: torch.nn.Module, dims: Dims, seed: int = 0,
            shared_prefix: bool = False) -> Captured:
    """``shared_prefix``: find the prefix both rows of a guided batch compute alike, and capture the component at
    batch 1 too, for that prefix's per-row chunk (none where the batch is one row or there is no prefix)."""
    examples = example_inputs(spec, dims, seed)
    graph_module, summary, prefix = _export(spec, model, examples, shared_prefix and spec.batch(dims) > 1)
    rows = None
    if prefix is not None:
        row_examples = tuple(x[:1] for x in examples)
        row_module, row_summary, row_prefix = _export(spec, model, row_examples, True)
        if row_prefix is None:
            raise InternalError(f"{spec.id}: a shared prefix at batch {len(examples[0])} but none at batch 1")
        rows = RowGraph(row_module, row_summary, row_prefix)
    reference = run_component(spec, model, examples)
    inputs = tuple(TensorSpec(io.name, io.dtype, tuple(x.shape)) for io, x in zip(spec.inputs, examples))
    outputs = tuple(TensorSpec(io.name, io.dtype, tuple(y.shape)) for io, y in zip(spec.outputs, reference))
    return Captured(spec, graph_module, summary, inputs, outputs, examples, tuple(r.detach() for r in reference),
                    prefix, rows)
