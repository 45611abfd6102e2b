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

Memory: beside the model, the search holds no copy of its weights. The originals and every width's palettized
weights (fp16) go to an unlinked temporary file (``_Spill``) and are read back one layer at a time, each layer's
gradient is used and dropped as the backward pass reaches it, a diffusers model recomputes its blocks' activations
in the backward pass instead of keeping them (``sensitivity``), and the C heap is trimmed after each width, probe
and k-means batch (pocketsd/heap.py). Held in memory, the copies were 1.5× the fp32 model and the gradients 1×:
for SDXL's UNet (10.3 GB in fp32) 26 GB, its activations at 768² 8 GB more, and glibc kept up to 0.9× the model
of freed k-means buffers: the full-size ``iphone-sdxl`` export was killed on a 24 GB machine, three times.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path
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
from pocketsd.heap import trimmer

log = logging.getLogger(__name__)

PROBES = 4
Run = Callable[[nn.Module], Sequence[torch.Tensor]]
ORIGINAL = 0  # the _Spill key of a layer's weight before any palette (a width is >= 1)


class _Spill:
    """fp16 tensors in an unlinked temporary file in ``folder`` (an export passes its staging folder, beside the
    bundle; else ``tempfile``'s: ``$TMPDIR`` or /tmp, which may be memory), read back on demand. Unlinked at once,
    it is gone with the process however that ends. The page cache may keep what fits, but it is not the process's
    memory. Written by hand: the tensors are written once and read layer by layer, which safetensors' files (one
    header written before any tensor) and ``np.memmap`` (mapped pages count in the process's resident memory) do
    not fit."""

    def __init__(self, folder: Path | None = None) -> None:
        self._file = tempfile.TemporaryFile(prefix=".mixed-bit-spill-", dir=folder)
        self._where: dict[tuple[int, str], tuple[int, tuple[int, ...]]] = {}
        self._end = 0
        self.bytes_written = 0

    def put(self, key: tuple[int, str], tensor: torch.Tensor) -> None:
        data = tensor.detach().to(torch.float16).contiguous().numpy()
        self._file.seek(self._end)
        self._file.write(memoryview(data.reshape(-1).view("uint8")))
        self._where[key] = (self._end, tuple(tensor.shape))
        self._end += data.nbytes
        self.bytes_written += data.nbytes

    def get(self, key: tuple[int, str]) -> torch.Tensor:
        offset, shape = self._where[key]
        out = torch.empty(shape, dtype=torch.float16)
        view = memoryview(out.numpy().reshape(-1).view("uint8"))
        self._file.seek(offset)
        if self._file.readinto(view) != len(view):
            raise InternalError(f"mixed-bit spill file: short read for {key}")
        return out

    def close(self) -> None:
        self._file.close()


class _Search:
    """The model with its searched layers switchable between spilled palettes, and pass counters."""

    def __init__(self, model: nn.Module, run: Run, names: list[str], scratch: Path | None) -> None:
        self.model, self.run = model, run
        layers = compressible_layers(model)
        self.modules = {n: layers[n] for n in names}
        self.spill = _Spill(scratch)
        self.buffers: dict[int, dict[str, dict[str, torch.Tensor]]] = {}  # width → layer → _COREML_ buffers
        self.current: dict[str, int] = {}
        self.passes, self.gradient_passes = 1, 0  # the reference pass
        self.trim = trimmer()  # what each width and each probe freed goes back to the system (pocketsd/heap.py)
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
                    self.modules[name].weight.copy_(self.spill.get((nbits, name)))
                    self.current[name] = nbits

    def palettize_all(self, widths: Sequence[int], config: CompressionConfig, workers: int) -> dict[int, dict]:
        """k-means every searched layer at every width; returns the fallback proxy, relative squared weight error."""
        for name, module in self.modules.items():
            self.spill.put((ORIGINAL, name), module.weight)  # fp16-exact already
        errors: dict[int, dict[str, float]] = {}
        for i, nbits in enumerate(widths):
            if i:
                with torch.no_grad():
                    for name, module in self.modules.items():
                        module.weight.copy_(self.spill.get((ORIGINAL, name)))
            compress(self.model, {n: config.mixed_bit.layer(nbits) for n in self.modules}, workers=workers)
            self.buffers[nbits], errors[nbits] = {}, {}
            for name, module in self.modules.items():
                weight = module.weight.detach()
                self.buffers[nbits][name] = {k: v.clone() for k, v in compression_buffers(module).items()}
                self.spill.put((nbits, name), weight)
                original = self.spill.get((ORIGINAL, name)).float()
                errors[nbits][name] = float((weight - original).pow(2).sum() / original.pow(2).sum().clamp_min(1e-30))
            self.current = dict.fromkeys(self.modules, nbits)
            self.trim()
        return errors

    def sensitivity(self, widths: Sequence[int]) -> dict[int, dict[str, float]] | None:
        """Per width and layer, ``‖J ΔW‖²`` per weight element for moving from the widest palette (module docstring);
        None if ``run`` gives no gradients. Only the searched weights take gradients, and each is used and dropped
        as the backward pass reaches it (a hook), so at most one layer's gradient is held at a time."""
        widest = widths[0]
        self.set_bits(dict.fromkeys(self.modules, widest))
        estimate = {w: dict.fromkeys(self.modules, 0.0) for w in widths[1:]}
        generator = torch.Generator().manual_seed(0)
        params = list(self.model.parameters())
        flags = [p.requires_grad for p in params]
        searched = {id(m.weight): name for name, m in self.modules.items()}
        handles = []
        # diffusers' gradient checkpointing: each block's activations are recomputed in the backward pass instead of
        # kept from the forward one (the same values; one more forward pass per probe). Measured on SDXL's UNet at
        # 768² in fp32: a probe peaks at 13.1 GB with it, 18.5 GB without (10.3 GB of weights).
        checkpointing = (getattr(self.model, "_supports_gradient_checkpointing", False)
                         and not getattr(self.model, "is_gradient_checkpointing", True))
        try:
            if checkpointing:
                self.model.enable_gradient_checkpointing()
            for p in params:
                p.requires_grad_(id(p) in searched)
            for p in params:
                if id(p) in searched:
                    handles.append(p.register_post_accumulate_grad_hook(
                        lambda p, name=searched[id(p)]: self._take(estimate, name, p, widest)))
            for _ in range(PROBES):
                with torch.enable_grad():
                    outputs = as_outputs(self.run(self.model))
                    if not outputs or not all(o.requires_grad for o in outputs):
                        return None
                    probe = sum((o * torch.randn(o.shape, generator=generator).to(o)).sum() for o in outputs)
                    del outputs
                    probe.backward()
                del probe
                self.gradient_passes += 1
                self.trim()
        finally:
            if checkpointing:
                self.model.disable_gradient_checkpointing()
            for handle in handles:
                handle.remove()
            for p, flag in zip(params, flags):
                p.grad = None
                p.requires_grad_(flag)
        return estimate

    def _take(self, estimate: dict[int, dict[str, float]], name: str, weight: torch.Tensor, widest: int) -> None:
        """One layer's share of one probe: ``⟨∂(v·f)/∂W, ΔW⟩²`` for each narrower width; then its gradient goes."""
        with torch.no_grad():
            grad, weight.grad = weight.grad, None
            base = self.spill.get((widest, name)).float()
            for nbits, per_layer in estimate.items():
                change = float(((self.spill.get((nbits, name)).float() - base) * grad).sum())
                per_layer[name] += change * change / PROBES / weight.numel()

    def install(self, bits: dict[str, int]) -> None:
        """The final state: weights and ``_COREML_`` buffers of the chosen palettes, as ``compress`` leaves them."""
        self.set_bits(bits)
        for name, nbits in bits.items():
            module = self.modules[name]
            drop_compression_buffers(module)
            for key, value in self.buffers[nbits][name].items():
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


def choose_mixed_bits(model: nn.Module, run: Run, cfg: CompressionConfig, *, workers: int = 1,
                      scratch: Path | None = None) -> tuple[dict[str, LayerCompression], dict]:
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
    search = _Search(model, run, names, scratch)  # runs the reference pass on the untouched model
    try:
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
                              "lower min_psnr_db, add a wider bit width, or exclude sensitive layers with "
                              "op_name: null")
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
    finally:
        search.spill.close()
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
