"""Mixed-bit palettization: the fewest bits per layer that keep the component's output above a PSNR budget.

A forward pass of an SD UNet takes seconds and it has hundreds of layers, so nothing here runs a pass per layer.
Each eligible layer is palettized once per candidate width; the k-means results are cached as fp16 weights plus
their ``_COREML_`` buffers. Starting from every layer at the widest width, each narrower width in turn takes the
longest prefix of a ranking of the layers still one width above it that keeps the measured PSNR within budget,
found by binary search (about ``log2(layers)`` passes per width).

The ranking is by estimated output damage per weight element (bytes saved), cheapest first. The estimate is the
linearised output change ``‖J_l ΔW_l‖²``: for a random probe ``v ~ N(0, I)``, ``E[(v·J_l ΔW_l)²] = ‖J_l ΔW_l‖²``, and
``v·J_l ΔW_l = ⟨∂(v·f)/∂W_l, ΔW_l⟩``. So ``PROBES`` backward passes rank all layers at every width. If ``run`` gives
no gradients (it disables autograd), the ranking falls back to each palette's relative weight error. On the tiny
test UNet at a 30 dB budget this ranking reaches 4.3 average bits where the weight-error ranking stops at 5.9.

Passes: 1 (reference) + 1 (all widest) + at most ``ceil(log2(n + 1))`` per narrower width, plus ``PROBES`` backward.
"""

from __future__ import annotations

import logging
from typing import Callable, Sequence

import torch
from torch import nn

from pocketsd.errors import InternalError, PresetError
from pocketsd.export.capture import as_outputs
from pocketsd.export.compression.coreml_optimize import (
    CompressionConfig,
    LayerCompression,
    compress,
    compressible_layers,
    compression_buffers,
    drop_compression_buffers,
    plan_layers,
    round_to_fp16,
    simulated_psnr,
)

log = logging.getLogger(__name__)

PROBES = 4
Run = Callable[[nn.Module], Sequence[torch.Tensor]]
Palette = tuple[torch.Tensor, dict[str, torch.Tensor]]  # fp16 simulated weight, its _COREML_ buffers


class _Search:
    """The model with its searched layers switchable between cached palettes, and pass counters."""

    def __init__(self, model: nn.Module, run: Run, names: list[str]) -> None:
        self.model, self.run = model, run
        layers = compressible_layers(model)
        self.modules = {n: layers[n] for n in names}
        self.cache: dict[int, dict[str, Palette]] = {}
        self.current: dict[str, int] = {}
        self.passes, self.gradient_passes = 1, 0  # the reference pass
        with torch.no_grad():
            self.reference = [t.detach().clone() for t in as_outputs(run(model))]

    def measure(self) -> float:
        self.passes += 1
        with torch.no_grad():
            return simulated_psnr(self.reference, as_outputs(self.run(self.model)))

    def set_bits(self, bits: dict[str, int]) -> None:
        with torch.no_grad():
            for name, nbits in bits.items():
                if self.current.get(name) != nbits:
                    self.modules[name].weight.copy_(self.cache[nbits][name][0].float())
                    self.current[name] = nbits

    def palettize_all(self, widths: Sequence[int], config: CompressionConfig, workers: int) -> dict[int, dict]:
        """k-means every searched layer at every width; returns the fallback proxy, relative squared weight error."""
        originals = {n: m.weight.detach().half().clone() for n, m in self.modules.items()}  # fp16-exact already
        errors: dict[int, dict[str, float]] = {}
        for nbits in widths:
            with torch.no_grad():
                for name, module in self.modules.items():
                    module.weight.copy_(originals[name].float())
            compress(self.model, {n: config.mixed_bit.layer(nbits) for n in self.modules}, workers=workers)
            self.cache[nbits], errors[nbits] = {}, {}
            for name, module in self.modules.items():
                weight = module.weight.detach()
                buffers = {k: v.clone() for k, v in compression_buffers(module).items()}
                self.cache[nbits][name] = (weight.half().clone(), buffers)
                original = originals[name].float()
                errors[nbits][name] = float((weight - original).pow(2).sum() / original.pow(2).sum().clamp_min(1e-30))
            self.current = dict.fromkeys(self.modules, nbits)
        return errors

    def sensitivity(self, widths: Sequence[int]) -> dict[int, dict[str, float]] | None:
        """Per width and layer, ``‖J ΔW‖²`` per weight element for moving from the widest palette (module docstring);
        None if ``run`` gives no gradients."""
        widest, weights = widths[0], [m.weight for m in self.modules.values()]
        self.set_bits(dict.fromkeys(self.modules, widest))
        estimate = {w: dict.fromkeys(self.modules, 0.0) for w in widths[1:]}
        generator, flags = torch.Generator().manual_seed(0), [w.requires_grad for w in weights]
        try:
            for weight in weights:
                weight.requires_grad_(True)
            for _ in range(PROBES):
                with torch.enable_grad():
                    outputs = as_outputs(self.run(self.model))
                    if not outputs or not all(o.requires_grad for o in outputs):
                        return None
                    probe = sum((o * torch.randn(o.shape, generator=generator).to(o)).sum() for o in outputs)
                    grads = torch.autograd.grad(probe, weights, allow_unused=True)
                self.gradient_passes += 1
                self._accumulate(estimate, grads, widest)
        finally:
            for weight, flag in zip(weights, flags):
                weight.requires_grad_(flag)
        return estimate

    def _accumulate(self, estimate: dict[int, dict[str, float]], grads: Sequence, widest: int) -> None:
        with torch.no_grad():
            for (name, module), grad in zip(self.modules.items(), grads):
                if grad is None:  # the layer does not reach the outputs
                    continue
                base = self.cache[widest][name][0].float()
                for nbits, per_layer in estimate.items():
                    change = float(((self.cache[nbits][name][0].float() - base) * grad).sum())
                    per_layer[name] += change * change / PROBES / module.weight.numel()

    def install(self, bits: dict[str, int]) -> None:
        """The final state: weights and ``_COREML_`` buffers of the chosen palettes, as ``compress`` leaves them."""
        self.set_bits(bits)
        for name, nbits in bits.items():
            module = self.modules[name]
            drop_compression_buffers(module)
            for key, value in self.cache[nbits][name][1].items():
                module.register_buffer(key, value.clone())


def _longest_prefix(search: _Search, bits: dict[str, int], ranked: list[str], narrower: int,
                    budget: float, psnr: float) -> tuple[int, float]:
    """Binary search for the most layers of ``ranked`` (in order) that can take ``narrower`` within budget."""
    wider = {n: bits[n] for n in ranked}
    low, high, best = 0, len(ranked), psnr
    while low < high:
        mid = (low + high + 1) // 2
        search.set_bits({**wider, **dict.fromkeys(ranked[:mid], narrower)})
        measured = search.measure()
        log.debug("mixed bits: %d of %d layers at %d bits -> %.2f dB", mid, len(ranked), narrower, measured)
        if measured >= budget:
            low, best = mid, measured
        else:
            high = mid - 1
    return low, best


def _prefix_for_average(bits: dict[str, int], sizes: dict[str, int], ranked: list[str], narrower: int,
                        target: float) -> int:
    """How many layers of ``ranked`` (in order) take ``narrower`` bits before the average per weight element reaches
    ``target``: the recipe form of a bits budget (``mixed_bit.average_bits``); no forward pass needed."""
    total = sum(sizes.values())
    stored = sum(bits[n] * sizes[n] for n in bits)
    for count, name in enumerate(ranked):
        if total == 0 or stored / total <= target:
            return count
        stored -= (bits[name] - narrower) * sizes[name]
    return len(ranked)


def choose_mixed_bits(model: nn.Module, run: Run, cfg: CompressionConfig, *,
                      workers: int = 1) -> tuple[dict[str, LayerCompression], dict]:
    """Pick per-layer palette widths from ``cfg.mixed_bit.bits`` so that ``simulated_psnr(run(uncompressed),
    run(compressed)) >= min_psnr_db`` with as few bits as the search finds. Layers pinned by op_type/op_name keep
    their configs (compressed first, so every measurement includes them); excluded layers stay out.

    ``run(model)`` returns the component's outputs on fixed example inputs; leave autograd on inside it, so the
    ranking can use gradients. The model is left exactly as ``compress(model, chosen)`` leaves it (no need to
    compress again). Returns the chosen configs (pinned and searched) and a report: bits_histogram, psnr_db,
    forward_passes, gradient_passes, proxy, average_bits (per weight element of the searched layers), layers, pinned,
    min_psnr_db. Raises PresetError if even the widest palette misses the budget.
    """
    mixed = cfg.mixed_bit
    if mixed is None:
        raise InternalError("choose_mixed_bits needs a config with mixed_bit")
    pinned, names = plan_layers(model, cfg)
    search = _Search(model, run, names)  # runs the reference pass on the untouched model
    compress(model, pinned, workers=workers)
    round_to_fp16(model)  # also when nothing is pinned: every measurement sees the fp16-rounded parameters
    widths = sorted(mixed.bits, reverse=True)
    errors = search.palettize_all(widths, cfg, workers)
    proxy = search.sensitivity(widths) if names else None
    bits = dict.fromkeys(names, widths[0])
    search.set_bits(bits)
    psnr = search.measure()
    if psnr < mixed.min_psnr_db:
        raise PresetError(f"{cfg.source or 'compression'}.mixed_bit.min_psnr_db {mixed.min_psnr_db:g} is out of "
                          f"reach: with every layer at {widths[0]} bits the output is at {psnr:.2f} dB",
                          "lower min_psnr_db, add a wider bit width, or exclude sensitive layers with op_name: null")
    sizes = {n: search.modules[n].weight.numel() for n in names}
    for wider, narrower in zip(widths, widths[1:]):
        rank = (proxy or errors)[narrower]
        ranked = sorted((n for n in names if bits[n] == wider), key=lambda n: rank[n])
        if mixed.average_bits is None:
            count, psnr = _longest_prefix(search, bits, ranked, narrower, mixed.min_psnr_db, psnr)
        else:
            count = _prefix_for_average(bits, sizes, ranked, narrower, mixed.average_bits)
            search.set_bits({**bits, **dict.fromkeys(ranked[:count], narrower)})
            psnr = search.measure()
        bits.update(dict.fromkeys(ranked[:count], narrower))
        log.info("mixed bits: %d of %d layers take %d bits (%.2f dB)", count, len(ranked), narrower, psnr)
    search.install(bits)
    chosen = {**pinned, **{n: mixed.layer(b) for n, b in bits.items()}}
    report = _report(search, bits, mixed.bits, psnr, cfg, len(pinned))
    report["proxy"] = "output_jacobian" if proxy is not None else "weight_error"
    return chosen, report


def _report(search: _Search, bits: dict[str, int], widths: Sequence[int], psnr: float,
            cfg: CompressionConfig, pinned: int) -> dict:
    sizes = {n: search.modules[n].weight.numel() for n in bits}
    total = sum(sizes.values())
    average = sum(bits[n] * sizes[n] for n in bits) / total if total else 0.0
    return {
        "bits_histogram": {str(w): sum(1 for b in bits.values() if b == w) for w in sorted(widths)},
        "psnr_db": psnr,
        "forward_passes": search.passes,
        "gradient_passes": search.gradient_passes,
        "average_bits": round(average, 3),
        "layers": len(bits),
        "pinned": pinned,
        "min_psnr_db": cfg.mixed_bit.min_psnr_db,
    }
