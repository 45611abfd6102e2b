"""ONNX weight quantization (int8 / int4), done in PyTorch before capture: quantize first, then cut.

Every ``nn.Conv2d`` and ``nn.Linear`` weight (and the text encoder's token table) is replaced by its dequantized
values — ``q · scale`` with integer q, so exactly representable — and the component is measured against fp32 on the
seeded export inputs; below the preset's ``min_psnr_db`` the export fails closed. The planner then balances chunks
by the bytes each weight will take in the file, and ``onnx_quantize`` stores the same grid losslessly as int8 / int4
once the ONNX writer has written each chunk.

- int8: symmetric, one scale per output channel, ``scale = max|w| / 127`` (fp32), q in [-127, 127].
- int4: symmetric, blocks of ``block_size`` consecutive *input* channels (Conv2d [O, I, kh, kw]: along I for each
  (o, kh, kw); Linear [out, in]: along in), ``scale = max|block| / 7``, q in [-7, 7]; a partial last block is fine.
- The token embedding (``nn.Embedding`` as wide as the vocabulary) is int8 with one scale per row in either mode: it
  is gathered, not multiplied, so at run time only the looked-up rows are dequantized.
- Layers with fewer than ``MIN_WEIGHTS`` weights stay fp32: they save under 3 KB each while adding a node to run.
"""

from __future__ import annotations

import copy
import itertools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pocketsd.export.capture import example_inputs, run_component
from pocketsd.export.components import ComponentSpec, Dims
from pocketsd.export.components.base import WRAPPED
from pocketsd.export.compression.onnx_quantize import QMAX, quantize_chunk_file, stored_bytes
from pocketsd.export.compression.quality_gates import QUANT_MIN_PSNR_DB, GateRow, Threshold, enforce
from pocketsd.export.parity import Figures, compare_all
from pocketsd.export.preset import WeightQuantization

log = logging.getLogger(__name__)
MIN_WEIGHTS = 1024


@dataclass
class Quantized:
    model: nn.Module
    stored_bytes: dict[str, int]  # per parameter, qualified as the captured graph names it
    compressed: set[str]  # parameters stored quantized
    report: dict[str, Any]


def reference_run(spec: ComponentSpec, model: nn.Module, examples: tuple[torch.Tensor, ...]
                  ) -> tuple[tuple[torch.Tensor, ...], set[str]]:
    """The fp32 outputs, and the paths of the modules holding weights that the component ran (the VAE decoder
    and encoder each use half of one model)."""
    ran: set[str] = set()
    hooks = [module.register_forward_pre_hook(lambda _m, _a, path=path: ran.add(path))
             for path, module in model.named_modules() if any(True for _ in module.parameters(recurse=False))]
    try:
        return run_component(spec, model, examples), ran
    finally:
        for hook in hooks:
            hook.remove()


def quantizable_layers(model: nn.Module, vocab_size: int, used: set[str]) -> dict[str, tuple[str, nn.Module]]:
    """Module path → (kind, module) for every layer whose weight is quantized: conv, linear or embedding."""
    layers = {}
    for path, module in model.named_modules():
        if path not in used:
            continue
        if isinstance(module, nn.Conv2d):
            kind = "conv"
        elif isinstance(module, nn.Linear):
            kind = "linear"
        elif isinstance(module, nn.Embedding) and module.num_embeddings == vocab_size:
            kind = "embedding"
        else:
            continue
        if module.weight.numel() >= MIN_WEIGHTS:
            layers[path] = (kind, module)
    return layers


def _on_grid(groups: torch.Tensor, qmax: int) -> torch.Tensor:
    """Each row of ``groups`` [..., n] replaced by ``q · scale``, scale = max|row| / qmax."""
    scale = groups.abs().amax(dim=-1, keepdim=True) / qmax
    q = torch.clamp(torch.round(groups / torch.where(scale == 0, torch.ones_like(scale), scale)), -qmax, qmax)
    return q * scale


def _blocks_along_last(w: torch.Tensor, block: int, qmax: int) -> torch.Tensor:
    """Quantize in blocks of ``block`` along the last axis (zero-padded to a whole number of blocks)."""
    n = w.shape[-1]
    padded = nn.functional.pad(w, (0, -n % block))
    return _on_grid(padded.reshape(*w.shape[:-1], -1, block), qmax).reshape(padded.shape)[..., :n]


def fake_quantize(weight: torch.Tensor, kind: str, mode: str, block_size: int) -> torch.Tensor:
    """The dequantized values of ``weight`` under this kind's scheme (fp32, same shape)."""
    w = weight.detach().float()
    if kind == "embedding" or mode == "int8":
        return _on_grid(w.reshape(w.shape[0], -1), QMAX["int8"]).reshape(w.shape)
    if kind == "conv":  # blocks of input channels for each (o, kh, kw)
        return _blocks_along_last(w.permute(0, 2, 3, 1), block_size, QMAX[mode]).permute(0, 3, 1, 2).contiguous()
    return _blocks_along_last(w, block_size, QMAX[mode])


def _fp32_bytes(model: nn.Module) -> dict[str, int]:
    return {f"{WRAPPED}.{n}": t.numel() * t.element_size()
            for n, t in itertools.chain(model.named_parameters(), model.named_buffers())}


def _stored_bytes(model: nn.Module, layers: dict[str, tuple[str, nn.Module]], config: WeightQuantization
                  ) -> dict[str, int]:
    sizes = _fp32_bytes(model)
    for path, (kind, module) in layers.items():
        mode = "int8" if kind == "embedding" else config.mode
        sizes[f"{WRAPPED}.{path}.weight"] = stored_bytes(kind, mode, tuple(module.weight.shape), config.block_size)
    return sizes


def _report(model: nn.Module, used: set[str], stored: dict[str, int], config: WeightQuantization,
            figures: Figures, n_layers: int) -> dict[str, Any]:
    """The manifest's figures; sizes count the weights of the modules this component runs."""
    own = {f"{WRAPPED}.{path}.{leaf}" for path in used
           for leaf, _ in model.get_submodule(path).named_parameters(recurse=False)}
    return {
        "mode": config.mode, **({"block_size": config.block_size} if config.mode == "int4" else {}),
        "psnr_db": figures.psnr_db, "min_psnr_db": config.min_psnr_db,
        "layers": n_layers,
        "fp32_weight_bytes": int(sum(n for k, n in _fp32_bytes(model).items() if k in own)),
        "stored_weight_bytes": int(sum(n for k, n in stored.items() if k in own)),
        "measured_in": "pytorch, fake-quantized weights (the ONNX files store the same grid losslessly)",
    }


def _gate(spec: ComponentSpec, figures: Figures, config: WeightQuantization) -> GateRow:
    """Fail closed below the preset's quality threshold (export/compression/quality_gates.py), with the table."""
    default = QUANT_MIN_PSNR_DB[config.mode]
    threshold = Threshold(config.min_psnr_db, f"onnx:{config.mode}", f"quantize.{spec.id}.min_psnr_db",
                          config.min_psnr_db != default)
    row = GateRow(spec.id, f"{config.mode} weight quantization", f"{spec.id} ({config.mode} vs fp32)",
                  figures.psnr_db, figures.max_abs, threshold)
    enforce([row], ("use int8 or a smaller block_size for it" if config.mode == "int4" else
                    "leave it out of quantize (fp32)") + ", or lower min_psnr_db if you accept the loss")
    return row


def quantize_component(spec: ComponentSpec, model: nn.Module, dims: Dims, config: WeightQuantization,
                       seed: int = 0) -> Quantized:
    if spec.subfolder == "vae":  # the decoder and the encoder share one VAE; quantize a copy for this one
        model = copy.deepcopy(model)
    examples = example_inputs(spec, dims, seed)
    reference, used = reference_run(spec, model, examples)
    layers = quantizable_layers(model, dims.vocab_size, used)
    with torch.no_grad():
        for kind, module in layers.values():
            mode = "int8" if kind == "embedding" else config.mode
            module.weight.copy_(fake_quantize(module.weight, kind, mode, config.block_size))
    figures = compare_all([r.numpy() for r in reference], [x.numpy() for x in run_component(spec, model, examples)])
    stored = _stored_bytes(model, layers, config)
    report = _report(model, used, stored, config, figures, len(layers))
    log.info("%s: %s on %d layers, PSNR %.1f dB vs fp32, %.1f MB stored", spec.id, config.mode, len(layers),
             figures.psnr_db, report["stored_weight_bytes"] / 1e6)
    _gate(spec, figures, config)
    return Quantized(model, stored, {f"{WRAPPED}.{path}.weight" for path in layers}, report)


def store_chunk_quantized(files: list[Path], module: nn.Module, compressed: set[str], config: WeightQuantization,
                          chunk_id: str) -> tuple[list[Path], dict]:
    """After the ONNX writer wrote a chunk: store the chunk's quantized weights as int8 / int4 (``onnx_quantize``)."""
    expected = {n: t.detach().numpy() for n, t in itertools.chain(module.named_parameters(), module.named_buffers())
                if n in compressed}
    if not expected:
        return files, {}
    return quantize_chunk_file(files, expected, config.mode, config.block_size, chunk_id)
