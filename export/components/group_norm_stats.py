"""Whole-image GroupNorm statistics for a tiled VAE component (``vae_tiling.group_norm: image``).

A tile normalized with its own GroupNorm statistics differs from the same pixels of the untiled image; the seams
blend, but every tile keeps its own brightness and contrast (33.7 dB image PSNR on the SD 1.5 VAE at tile 24).
Run twice instead: a first pass over all tiles reports each GroupNorm's per-tile statistics, the runtime averages them
over the tiles, and a second pass normalizes every tile with that estimate of the whole image's statistics (36.4 dB
on the exported SD 1.5 VAE at tile 24, overlap 8, whole decoder tiled; with its mid block whole, see vae_decoder.py,
the PyTorch figure is 40.9 dB; ``bench/activation_bounds.py``, ``bench/vae_tiling_quality.py``).

The exported component gets three extra tensors (names in the manifest's tiling entry, runtime/tiling.py):

- input ``gn_stats`` float32 ``[n_norms, batch, groups, 2]``: per GroupNorm and group, the mean and the mean square
  to normalize with (GroupNorms in ``named_modules`` order of the component's ``group_norm_scope``);
- input ``gn_use_stats`` float32 ``[1]``: 1 normalizes with ``gn_stats``, 0 with this tile's own statistics;
- output ``gn_tile_stats``, shaped as ``gn_stats``: this tile's own statistics of every GroupNorm, computed from its
  input as it occurs in this pass.

The GroupNorms of the scope are replaced by :class:`StatsGroupNorm` on a copy of the modules that hold them; every
other module (each conv and its weights) is shared with the original, so hooks and weight quantization that find
layers by identity still see them, and nothing of the caller's model changes. The wrapper hands the extra inputs to
the replacements and collects their statistics through a :class:`StatsBus` for the length of one forward.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from functools import partial
from typing import Any, Callable

import torch
from torch import nn

from pocketsd.errors import InternalError, ModelError
from pocketsd.export.components.base import WRAPPED, ComponentSpec, IOSpec

STATS_INPUT = "gn_stats"
USE_STATS_INPUT = "gn_use_stats"
STATS_OUTPUT = "gn_tile_stats"


class StatsBus:
    """What the GroupNorms of one forward share with their wrapper: the statistics to use, and their own."""

    def __init__(self, n_norms: int) -> None:
        self.n_norms = n_norms
        self.given: torch.Tensor | None = None  # [n_norms, batch, groups, 2]
        self.use_given: torch.Tensor | None = None  # [1]
        self.own: list[torch.Tensor | None] = []

    def open(self, given: torch.Tensor, use_given: torch.Tensor) -> None:
        self.given, self.use_given, self.own = given, use_given, [None] * self.n_norms

    def close(self) -> torch.Tensor:
        """Every GroupNorm's own statistics, stacked in index order (each must have run exactly once)."""
        missing = [i for i, s in enumerate(self.own) if s is None]
        own, self.given, self.use_given, self.own = self.own, None, None, []
        if missing:
            raise InternalError(f"GroupNorms {missing} did not run in this forward: their statistics are missing")
        return torch.stack(own)  # type: ignore[arg-type]


class StatsGroupNorm(nn.GroupNorm):
    """``nn.GroupNorm`` (sharing the replaced one's weight and bias) that reports its input's statistics and
    normalizes with them or with the bus's given ones, as ``gn_use_stats`` says."""

    def __init__(self, norm: nn.GroupNorm, index: int, bus: StatsBus) -> None:
        super().__init__(norm.num_groups, norm.num_channels, norm.eps, norm.affine)
        self.weight, self.bias = norm.weight, norm.bias
        # Hooks stay with the layer they were put on (shared, as the copied ancestors share theirs), so e.g. weight
        # quantization's census of the layers that ran still counts this one.
        self.__dict__.update({key: value for key, value in vars(norm).items() if "hooks" in key})
        self.index, self.bus = index, bus

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bus = self.bus
        if bus.given is None or bus.use_given is None or bus.own[self.index] is not None:
            raise InternalError(f"GroupNorm {self.index} ran outside its wrapper's forward, or twice in one")
        n, c = x.shape[:2]
        xg = x.reshape(n, self.num_groups, -1)
        # Mean and mean square, not a centred variance: x · x is the only full-size temporary, where (x - mean)²
        # holds two at once. Pass 1's own normalization only feeds the statistics of later layers (its output is
        # discarded), and fp32 E[x²] - E[x]² is ample for that.
        own = torch.stack([xg.mean(-1), (xg * xg).mean(-1)], dim=-1)
        bus.own[self.index] = own
        stats = torch.where(bus.use_given > 0.5, bus.given[self.index], own)
        mean = stats[..., 0]
        var = (stats[..., 1] - mean * mean).clamp(min=0.0)  # rounding can make E[x²] - E[x]² slightly negative
        # Folded into one scale and shift per channel, so the full-size work is one Mul and one Add, as for
        # onnxruntime's own GroupNorm decomposition: written out as (x - mean) · rsqrt(var + eps) · w + b, each
        # step allocated another full activation and the SD 1.5 VAE tile peaked at +411 MB instead of +182 MB.
        scale = torch.rsqrt(var + self.eps).repeat_interleave(c // self.num_groups, dim=1)  # [n, c]
        shift = -mean.repeat_interleave(c // self.num_groups, dim=1) * scale
        if self.affine:
            scale, shift = scale * self.weight, shift * self.weight + self.bias
        shape = (n, c) + (1,) * (x.ndim - 2)
        return x * scale.reshape(shape) + shift.reshape(shape)


def group_norms(model: nn.Module, scopes: tuple[str, ...]) -> list[tuple[str, nn.GroupNorm]]:
    """The GroupNorms under each path of ``scopes`` (a path may name a GroupNorm itself), as paths from ``model``,
    scope by scope in ``named_modules`` order: the order of ``gn_stats``' first axis."""
    found = []
    for scope in scopes:
        for path, m in model.get_submodule(scope).named_modules():
            if isinstance(m, nn.GroupNorm):
                found.append((f"{scope}.{path}" if path else scope, m))
    return found


def copy_replacing(root: nn.Module, replacements: dict[str, nn.Module]) -> nn.Module:
    """A copy of ``root`` with the submodule at each path of ``replacements`` swapped. Only the modules on the way
    to a swapped one are copied (shallow: their parameters, buffers and hooks stay shared); every other submodule
    is the original object."""
    clone = copy.copy(root)
    clone.__dict__["_modules"] = dict(root._modules)
    below: dict[str, dict[str, nn.Module]] = {}
    for path, module in replacements.items():
        head, _, rest = path.partition(".")
        if head not in root._modules:
            raise InternalError(f"{type(root).__name__} has no submodule {head!r}")
        if rest:
            below.setdefault(head, {})[rest] = module
        else:
            clone._modules[head] = module
    for head, inner in below.items():
        clone._modules[head] = copy_replacing(root._modules[head], inner)  # type: ignore[arg-type]
    return clone


class GroupNormStatsWrapper(nn.Module):
    """The component's own wrapper (``base``) over a copy of the model whose ``scope`` GroupNorms are
    :class:`StatsGroupNorm`; inputs: the base's, then ``gn_stats`` and ``gn_use_stats``; outputs: the base's,
    then ``gn_tile_stats``."""

    def __init__(self, model: nn.Module, base: Callable[[nn.Module], nn.Module], scope: tuple[str, ...]) -> None:
        super().__init__()
        norms = group_norms(model, scope)
        self.bus = StatsBus(len(norms))
        replacements = {path: StatsGroupNorm(norm, i, self.bus) for i, (path, norm) in enumerate(norms)}
        inner = base(copy_replacing(model, replacements))
        # The copy sits where the base wrapper holds the model, so module paths and weight names are unchanged.
        setattr(self, WRAPPED, getattr(inner, WRAPPED))
        self._base_forward = inner.forward  # the base's computation, called as a function (not a submodule)

    def forward(self, *args: torch.Tensor) -> tuple[torch.Tensor, ...]:
        *inputs, given, use_given = args
        self.bus.open(given, use_given)
        try:
            outputs = self._base_forward(*inputs)
        finally:
            own = self.bus.close()
        return (*(outputs if isinstance(outputs, tuple) else (outputs,)), own)


def group_norm_stats_spec(spec: ComponentSpec, model: Any) -> ComponentSpec:
    """``spec`` with the statistics I/O, sized from the GroupNorms of ``model``'s ``spec.group_norm_scope``."""
    if not spec.group_norm_scope:
        raise InternalError(f"{spec.id} has no group_norm_scope: it cannot take whole-image statistics")
    norms = group_norms(model, spec.group_norm_scope)
    groups = {norm.num_groups for _, norm in norms}
    if len(groups) != 1:
        raise ModelError(f"{spec.id}: its GroupNorms have {sorted(groups) or 'no'} group counts; whole-image "
                         "statistics need one count shared by all", "set vae_tiling.group_norm: tile for this model")
    shape = (len(norms), "batch", groups.pop(), 2)
    return replace(
        spec,
        inputs=(*spec.inputs, IOSpec(STATS_INPUT, "float32", shape, example="group_norm_stats"),
                IOSpec(USE_STATS_INPUT, "float32", ("one",), example="ones")),
        outputs=(*spec.outputs, IOSpec(STATS_OUTPUT, "float32", shape)),
        make_wrapper=partial(GroupNormStatsWrapper, base=spec.make_wrapper, scope=spec.group_norm_scope),
    )


def manifest_tiling_fields() -> dict[str, str]:
    """What the manifest's tiling entry adds for a component exported by :func:`group_norm_stats_spec`."""
    return {"group_norm": "image", "stats_input": STATS_INPUT, "use_stats_input": USE_STATS_INPUT,
            "stats_output": STATS_OUTPUT}
