"""CoreML weight compression, done in PyTorch before capture: palettization (k-means LUT) and linear int8.

A component's config has three levels (global → op type → op name, ``null`` = leave alone) or, instead of a global
bit width, a ``mixed_bit`` search (``mixed_bit.py``). ``compress`` runs ``coremltools.optimize.torch`` on the chosen
``nn.Linear``/``nn.Conv2d`` layers in place: each weight then holds its simulated (de-palettized / dequantized)
values, so PyTorch measures the bundle's quality, and ``_COREML_`` buffers beside it make ``ct.convert`` store
exactly that palette or int8 grid. Parameters, palettes and scales are rounded through fp16, so the package's weights
equal the PyTorch ones bit for bit. ``stored_weight_bytes`` is what each weight costs in the package (chunks balance
on it). torch and coremltools are imported inside the functions that need them, so presets parse without them.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import logging
import math
import os
import time
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

from pocketsd.errors import InternalError, PresetError
from pocketsd.heap import trimmer

if TYPE_CHECKING:
    from pathlib import Path

    import torch
    from torch import nn

from pocketsd.export.compression.coreml_config import (  # noqa: F401  (re-exported)
    META,
    META_VERSION,
    MODES,
    OP_TYPES,
    PALETTE_BITS,
    TARGET_LEVELS,
    CompressionConfig,
    LayerCompression,
    MixedBit,
    parse_compression,
)

log = logging.getLogger(__name__)
_BATCH_ELEMENTS = 32_000_000  # weights per coremltools call: bounds the copy coremltools makes of what it compresses

def compressible_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every ``nn.Linear`` / ``nn.Conv2d`` (subclasses included) by module path."""
    from torch import nn

    return {name: m for name, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}


def _groups_fit(config: LayerCompression, module: nn.Module) -> bool:
    return config.granularity != "per_grouped_channel" or module.weight.shape[0] % config.group_size == 0


def plan_layers(model: nn.Module, cfg: CompressionConfig) -> tuple[dict[str, LayerCompression], list[str]]:
    """(fixed configs by module path, paths left to the mixed-bit search). The global level (or the mixed-bit search
    standing in for it) skips layers below ``weight_threshold`` and layers whose output channels a group size does
    not divide; an op-type config also obeys those; an op-name config is explicit and is applied as written."""
    from torch import nn

    layers = compressible_layers(model)
    for name, config in cfg.op_name.items():
        if name not in layers:
            close = difflib.get_close_matches(name, list(layers), n=4, cutoff=0.4) or list(layers)[:4]
            raise PresetError(f"{cfg.source or 'compression'}.op_name.{name} is not a Linear/Conv2d in this model",
                              f"module paths look like: {', '.join(close)}")
        if config is not None and not _groups_fit(config, layers[name]):
            raise PresetError(f"{cfg.source or 'compression'}.op_name.{name}: group_size {config.group_size} does not "
                              f"divide its {layers[name].weight.shape[0]} output channels", "use per_tensor here")
    fixed, searched = {}, []
    for name, module in layers.items():
        if name in cfg.op_name:
            if cfg.op_name[name] is not None:
                fixed[name] = cfg.op_name[name]
            continue
        eligible = module.weight.numel() >= cfg.weight_threshold
        op_type = "Linear" if isinstance(module, nn.Linear) else "Conv2d"
        if op_type in cfg.op_type:
            config = cfg.op_type[op_type]
            if config is not None and eligible and _groups_fit(config, module):
                fixed[name] = config
        elif cfg.mixed_bit is not None:
            if eligible and _groups_fit(cfg.mixed_bit.layer(max(cfg.mixed_bit.bits)), module):
                searched.append(name)
        elif cfg.global_config is not None and eligible and _groups_fit(cfg.global_config, module):
            fixed[name] = cfg.global_config
    return fixed, searched


def resolve_layers(model: nn.Module, cfg: CompressionConfig) -> dict[str, LayerCompression]:
    """Module path → config for every layer a fixed config compresses. With ``mixed_bit`` these are only the layers
    op_type/op_name pin; ``choose_mixed_bits`` returns the full set."""
    return plan_layers(model, cfg)[0]


def compression_buffers(module: nn.Module, leaf: str = "weight") -> dict[str, torch.Tensor]:
    prefix = f"{META}/{leaf}/"
    return {name: buf for name, buf in module.named_buffers(recurse=False) if name.startswith(prefix)}


def drop_compression_buffers(module: nn.Module) -> None:
    for name in [n for n, _ in module.named_buffers(recurse=False) if n.startswith(f"{META}/")]:
        delattr(module, name)


def round_to_fp16(model: nn.Module) -> None:
    """Round every fp32 parameter, palette and scale through fp16: what ct.convert stores is then exactly these."""
    import torch

    with torch.no_grad():
        tensors = [p for p in model.parameters()]
        tensors += [b for n, b in model.named_buffers() if f"{META}/" in n and b.is_floating_point()]
        for t in tensors:
            if t.dtype == torch.float32:
                t.copy_(t.half().float())


@contextlib.contextmanager
def _quiet_coremltools() -> Iterator[None]:
    """coremltools.optimize.torch logs INFO per layer and draws a tqdm bar on stderr: keep both to ourselves. Spawned
    k-means workers read the level from the environment when they import coremltools."""
    logger, env_key = logging.getLogger("coremltools.optimize.torch"), "COREMLTOOLS_OPTIMIZE_TORCH_LOG_LEVEL"
    level, env_before, captured = logger.level, os.environ.get(env_key), io.StringIO()
    logger.setLevel(max(level, logging.WARNING))
    os.environ.setdefault(env_key, "warning")
    try:
        with contextlib.redirect_stderr(captured):
            yield
    finally:
        logger.setLevel(level)
        if env_before is None:
            os.environ.pop(env_key, None)
        log.debug("coremltools stderr: %s", captured.getvalue().strip()[-2000:])


def _palettizer_config(config: LayerCompression, module: nn.Module) -> Any:
    from coremltools.optimize.torch.palettization import ModulePostTrainingPalettizerConfig

    peak = float(module.weight.detach().abs().max()) or 1.0
    # coremltools rounds weights to `rounding_precision` decimals before its k-means (default 4, which would leave a
    # layer of small weights fewer grid points than palette entries): keep >= 4 grid points per entry on average.
    digits = max(4, math.ceil(math.log10(2 * 2**config.nbits / peak)))
    grouped = config.granularity == "per_grouped_channel"
    return ModulePostTrainingPalettizerConfig(n_bits=config.nbits, granularity=config.granularity,
                                              group_size=config.group_size if grouped else None,
                                              rounding_precision=digits)


def _run_coremltools(batch: dict[str, nn.Module], layers: Mapping[str, LayerCompression], workers: int) -> None:
    """Compress one batch of layers in place, through a throwaway parent that holds just them (coremltools copies
    the model it is given, and matches ``module_name_configs`` as regular expressions)."""
    from torch import nn

    holder, configs = nn.Module(), {}
    for i, (name, module) in enumerate(batch.items()):
        holder.add_module(f"m{i}", module)
        configs[f"m{i}"] = layers[name]
    if all(c.mode == "palettize" for c in configs.values()):
        from coremltools.optimize.torch.palettization import PostTrainingPalettizer, PostTrainingPalettizerConfig

        cfg = PostTrainingPalettizerConfig(
            module_name_configs={k: _palettizer_config(c, getattr(holder, k)) for k, c in configs.items()})
        try:
            PostTrainingPalettizer(holder, cfg).compress(num_kmeans_workers=workers, inplace=True)
        except EOFError as exc:  # a spawned worker died while starting: it re-ran an unguarded __main__
            raise InternalError("coremltools' k-means worker processes failed to start; a script that calls "
                                "compress(workers > 1) needs `if __name__ == \"__main__\":`") from exc
    else:
        from coremltools.optimize.torch.quantization import (
            ModulePostTrainingQuantizerConfig,
            PostTrainingQuantizer,
            PostTrainingQuantizerConfig,
        )

        one = ModulePostTrainingQuantizerConfig(weight_dtype="int8", granularity="per_channel",
                                                quantization_scheme="symmetric")
        PostTrainingQuantizer(holder, PostTrainingQuantizerConfig(module_name_configs={k: one for k in configs})
                              ).compress(inplace=True)
        for module in batch.values():
            _exact_int8(module)


def _exact_int8(module: nn.Module) -> None:
    """Make the dequantized weight what CoreML computes: int8 × fp16 scale, multiplied in fp16 (NOTES 2b)."""
    import torch

    with torch.no_grad():
        scale = compression_buffers(module)[f"{META}/weight/quantization_scale"]
        half = scale.half()
        half[half == 0] = 1.0  # a channel too small for an fp16 scale becomes exact zeros
        weight = module.weight
        shape = (-1,) + (1,) * (weight.dim() - 1)
        q = torch.round(weight / half.float().reshape(shape)).clamp(-128, 127)
        weight.copy_((q.half() * half.reshape(shape)).float())
        scale.copy_(half.float())


def _batches(names: Sequence[str], modules: Mapping[str, nn.Module]) -> Iterator[dict[str, nn.Module]]:
    batch: dict[str, nn.Module] = {}
    size = 0  # weights in the batch
    for name in names:
        batch[name] = modules[name]
        size += modules[name].weight.numel()
        if size >= _BATCH_ELEMENTS:
            yield batch
            batch, size = {}, 0
    if batch:
        yield batch


def _holds(module: nn.Module, config: LayerCompression) -> bool:
    """Whether the layer already holds exactly this compression, metadata and weights agreeing. Redoing it would
    shift its palette a little (coremltools rounds weights before its k-means), so ``compress`` leaves it."""
    import torch

    meta = {k.rsplit("/", 1)[1]: v for k, v in compression_buffers(module).items()}
    kind, weight = meta["compression_type"].tolist() if "compression_type" in meta else [], module.weight.detach()
    if config.mode == "palettize" and kind == [2]:
        lut, groups = meta["lut"], weight.shape[0] // config.group_size if config.group_size else 1
        if lut.shape[-2] != 2 ** config.nbits or lut.shape[0] != groups:
            return False
        values, flat = lut.flatten().unique(), weight.flatten()  # is every weight a palette entry? (isin is slow)
        return bool((values[torch.searchsorted(values, flat).clamp_(max=values.numel() - 1)] == flat).all())
    if config.mode == "linear_int8" and kind == [3]:
        scale = meta["quantization_scale"].reshape((-1,) + (1,) * (weight.dim() - 1))
        return torch.equal(weight, (torch.round(weight / scale).clamp(-128, 127).half() * scale.half()).float())
    return False


def _write_back(batch: Mapping[str, nn.Module], kept: Mapping[str, torch.Tensor]) -> None:
    """Put each compressed weight back into the tensor coremltools replaced, so that compression is in place in memory
    too. A weight loaded from safetensors lives in the file's (private) mapping: replaced, its pages stay resident
    beside the new tensor as long as any weight of the file is alive (SD 1.5's UNet: 3.4 GB twice, 8.4 GB peak for
    the iphone preset); written over, they become the weight's own pages."""
    import torch

    with torch.no_grad():
        for name, module in batch.items():
            if module.weight.data_ptr() != kept[name].data_ptr():
                kept[name].copy_(module.weight.detach())
                module.weight.data = kept[name]


def compress(model: nn.Module, layers: Mapping[str, LayerCompression], *, workers: int = 1) -> nn.Module:
    """Compress ``layers`` (module path → config) IN PLACE and return ``model``; an empty mapping changes nothing.

    Afterwards each layer's weight holds its simulated values and its ``_COREML_`` buffers describe the palette or
    scale; every fp32 parameter is rounded through fp16. A layer that already holds exactly its config is left as it
    is (so compressing again, e.g. after ``choose_mixed_bits``, changes nothing); another config replaces it.
    ``workers > 1`` runs coremltools' k-means in that many spawned processes (the calling script needs the usual
    ``if __name__ == "__main__":`` guard); the default runs it in this process.
    """
    import torch

    if not layers:
        return model
    found = compressible_layers(model)
    missing = [n for n in layers if n not in found]
    if missing:
        raise InternalError(f"not Linear/Conv2d layers of this model: {missing[:5]}")
    started, done = time.perf_counter(), 0
    todo = {n: c for n, c in layers.items() if not _holds(found[n], c)}
    # coremltools' copies and k-means buffers are freed after each batch, but glibc keeps them (pocketsd/heap.py):
    # measured on SD 1.5's UNet, the mixed-bit search's two widths peaked 3.5 GB above the model with the heap
    # trimmed after each width, 2.0 GB with it trimmed after each batch too
    trim = trimmer()
    with _quiet_coremltools():
        for mode in MODES:
            names = [n for n, c in todo.items() if c.mode == mode]
            for batch in _batches(names, found):
                for module in batch.values():
                    drop_compression_buffers(module)
                kept = {name: module.weight.detach() for name, module in batch.items()}
                _run_coremltools(batch, layers, workers)
                _write_back(batch, kept)
                del kept
                trim()
                done += len(batch)
                log.debug("compressed %d of %d layers", done, len(todo))
    not_done = [n for n in layers if f"{META}/weight/compression_type" not in compression_buffers(found[n])]
    if not_done:
        raise InternalError(f"coremltools left {len(not_done)} layers uncompressed: {not_done[:5]}")
    if META_VERSION not in dict(model.named_buffers(recurse=False)):
        model.register_buffer(META_VERSION, torch.tensor(1))
    round_to_fp16(model)
    kinds = sorted({f"{c.mode} {c.nbits}-bit {c.granularity}" for c in layers.values()})
    log.info("compressed %d layers (%s) in %.1f s; %d already were", len(todo), ", ".join(kinds),
             time.perf_counter() - started, len(layers) - len(todo))
    return model


def _compressed_bytes(module: nn.Module, leaf: str, numel: int, element: int) -> int | None:
    buffers = {k.rsplit("/", 1)[1]: v for k, v in compression_buffers(module, leaf).items()}
    if "compression_type" not in buffers:
        return None
    kinds = [int(v) for v in buffers["compression_type"].flatten()]
    if kinds == [2]:
        lut = buffers["lut"]
        nbits = math.ceil(math.log2(lut.shape[-2]))
        return math.ceil(numel * nbits / 8) + lut.numel() * element
    if kinds == [3]:
        bits = int(buffers["quantization_n_bits"])
        zero = buffers["zero_point"].numel() if "zero_point" in buffers else 0
        return math.ceil(numel * bits / 8) + buffers["quantization_scale"].numel() * element + zero
    raise InternalError(f"unsupported coremltools compression type {kinds} on {type(module).__name__}.{leaf}")


def stored_weight_bytes(model: nn.Module, precision: str, prefix: str = "") -> dict[str, int]:
    """Bytes each parameter and buffer will take in the CoreML package, keyed by ``prefix`` + qualified name.

    Palettized: packed indices (ceil(numel·nbits/8)) + the palette; int8: numel + one scale per channel. Palettes and
    scales are stored at the model's precision. Anything else: numel × 2 (fp16) or × 4 (fp32); integer buffers are
    stored as int32. ``_COREML_`` metadata is not stored and is left out. Blob alignment (64 B each) is not counted.
    """
    import torch

    if precision not in ("fp16", "fp32"):
        raise InternalError(f"unknown precision {precision!r}")
    element = 2 if precision == "fp16" else 4
    compressed: dict[int, int] = {}
    for module in model.modules():
        for leaf, param in module.named_parameters(recurse=False):
            size = _compressed_bytes(module, leaf, param.numel(), element)
            if size is not None:
                compressed[id(param)] = size
    sizes = {prefix + n: compressed.get(id(p), p.numel() * element) for n, p in model.named_parameters()}
    for name, buf in model.named_buffers():
        if f"{META}/" in name:
            continue
        per = element if buf.is_floating_point() else 1 if buf.dtype in (torch.bool, torch.uint8, torch.int8) else 4
        sizes[prefix + name] = buf.numel() * per
    return sizes


def simulated_psnr(reference: Sequence[torch.Tensor], compressed: Sequence[torch.Tensor]) -> float:
    """Worst PSNR over the outputs (``parity.compare``: 20·log10(max|ref| / rmse), identical → 200)."""
    from pocketsd.export.parity import compare

    if len(reference) != len(compressed) or not reference:
        raise InternalError(f"{len(compressed)} outputs to compare with {len(reference)} reference outputs")
    return min(compare(r.detach().float().cpu().numpy(), c.detach().float().cpu().numpy()).psnr_db
               for r, c in zip(reference, compressed))


def choose_mixed_bits(model: nn.Module, run: Callable[[nn.Module], Sequence[torch.Tensor]],
                      cfg: CompressionConfig, *, workers: int = 1,
                      scratch: Path | None = None) -> tuple[dict[str, LayerCompression], dict]:
    """Per-layer palette widths for a ``mixed_bit`` config; see ``mixed_bit.py``. Leaves ``model`` compressed."""
    from pocketsd.export.compression.mixed_bit import choose_mixed_bits as choose

    return choose(model, run, cfg, workers=workers, scratch=scratch)
