"""How a chunk's palettized weights are stored in its ML program: the palettes chosen in PyTorch, exactly.

``compress_component`` palettized the weights in PyTorch, so each holds only its palette's values and ``_COREML_``
buffers beside it describe the palette. With those buffers, coremltools' torch frontend finds each weight's indices
by comparing every weight with every palette entry at once (``numel × 2^bits`` temporaries: 7.5 GB for one SD 1.5
convolution at 6 bits), so they are taken off the module before conversion (``take_palette_metadata``) and the
palettization pass recovers palettes and indices from the values instead.

coremltools' own ``unique`` mode does that with ``np.unique(axis=0)`` on an ``[n, 1]`` array, which numpy sorts as
a structured dtype: 13 of the iphone preset's 19 minutes on SD 1.5 went to that sort. ``unique_lut`` gives the same
palette (the distinct values, ascending, zero-padded to ``2^nbits``), the same indices and the same ``nbits`` (the
smallest coremltools supports for the count, the largest over a weight's groups), in linear time: the weights are
fp16 values held in fp32, so their distinct bit patterns are counted with one ``bincount``. Each palettized weight
gets it as an op-name config (the const op is named after the ExportedProgram's placeholder for the parameter); no
other constant is touched.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pocketsd.errors import InternalError

SUPPORTED_NBITS = (1, 2, 3, 4, 6, 8)  # what coremltools' palettization stores (palettize_weights._SUPPORTED_NBITS)


@dataclass(frozen=True)
class Palette:
    """One palettized weight as the chunk holds it."""

    groups: int  # 1: one palette per tensor; else one per group of output channels (axis 0)
    out_channels: int
    nbits: int  # what coremltools' ``unique`` mode would choose for these values


def unique_values(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(flat, return_inverse=True)`` for a 1-D array; in linear time where every value is an fp16."""
    if flat.dtype == np.float32:
        half = flat.astype(np.float16)
        if np.array_equal(half.astype(np.float32), flat):
            bits = half.view(np.uint16)
            present = np.flatnonzero(np.bincount(bits, minlength=1 << 16)).astype(np.uint16)
            values, slot = np.unique(present.view(np.float16), return_inverse=True)  # ±0 merge as in np.unique
            table = np.zeros(1 << 16, dtype=np.intp)
            table[present] = slot
            return values.astype(np.float32), table[bits]
    return np.unique(flat, return_inverse=True)


def bits_for(count: int) -> int:
    for nbits in SUPPORTED_NBITS:
        if count <= 1 << nbits:
            return nbits
    raise InternalError(f"a palettized weight holds {count} distinct values, more than 8 bits can index")


def unique_lut(values: np.ndarray, nbits: int) -> tuple[np.ndarray, np.ndarray]:
    """coremltools ``lut_function``: the distinct values of one group (ascending, zero-padded) and its indices."""
    unique, inverse = unique_values(values.reshape(-1))
    lut = np.zeros(1 << nbits, dtype=values.dtype)
    lut[:len(unique)] = unique
    return lut, inverse.astype(np.uint8)


def _nbits(weight: torch.Tensor, groups: int) -> int:
    data = weight.detach().numpy()
    return max(bits_for(len(unique_values(g.reshape(-1))[0])) for g in np.split(data, groups, axis=0))


def take_palette_metadata(module: torch.nn.Module
                          ) -> tuple[dict[str, Palette], list[tuple[torch.nn.Module, str, torch.Tensor]]]:
    """Remove the palette metadata of palettized weights (see the module docstring); returns each palettized
    weight by qualified name, and what was removed (to put back). int8 metadata stays (cheap to convert)."""
    found, removed = {}, []
    for name, sub in module.named_modules():
        buffers = dict(sub.named_buffers(recurse=False))
        for key, lut in list(buffers.items()):
            if not (key.startswith("_COREML_/") and key.endswith("/lut")):
                continue
            leaf = key.split("/")[1]
            weight = getattr(sub, leaf)
            groups = int(lut.shape[0])
            found[f"{name}.{leaf}" if name else leaf] = Palette(groups, weight.shape[0], _nbits(weight, groups))
            for other in [k for k in buffers if k.startswith(f"_COREML_/{leaf}/")]:
                removed.append((sub, other, buffers[other]))
                delattr(sub, other)
    return found, removed


def palettization_pipeline(palettes: dict[str, Palette], program: Any) -> Any:
    """The default palettization pipeline, with each palettized weight of ``program`` (an ExportedProgram of the
    chunk) stored as its exact palette; None when the chunk has none."""
    if not palettes:
        return None
    import coremltools as ct
    import coremltools.optimize.coreml as cto

    placeholders = {fqn: name for name, fqn in program.graph_signature.inputs_to_parameters.items()}
    missing = sorted(set(palettes) - set(placeholders))
    if missing:
        raise InternalError(f"palettized weights that the exported chunk does not hold as parameters: {missing[:3]}")
    configs = {}
    for fqn, palette in palettes.items():
        grouped = ({"granularity": "per_grouped_channel", "group_size": palette.out_channels // palette.groups}
                   if palette.groups > 1 else {})
        configs[placeholders[fqn]] = cto.OpPalettizerConfig(
            mode="custom", lut_function=functools.partial(unique_lut, nbits=palette.nbits), weight_threshold=0,
            **grouped)
    pipeline = ct.PassPipeline.DEFAULT_PALETTIZATION
    pipeline.set_options("compression::palettize_weights", {"config": cto.OptimizationConfig(op_name_configs=configs)})
    return pipeline
