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
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, NoReturn, Sequence

from pocketsd.errors import InternalError, PresetError

if TYPE_CHECKING:
    import torch
    from torch import nn

log = logging.getLogger(__name__)

MODES = ("palettize", "linear_int8")
PALETTE_BITS = (2, 3, 4, 6, 8)
GRANULARITIES = {"palettize": ("per_tensor", "per_grouped_channel"), "linear_int8": ("per_channel",)}
OP_TYPES = ("Linear", "Conv2d")
META = "_COREML_"
META_VERSION = f"{META}/metadata_version"
# Deployment targets as the iOS release with the same CoreML opset. Compression needs 16; grouped or 3-bit palettes 18.
TARGET_LEVELS = {"iOS15": 15, "iOS16": 16, "iOS17": 17, "iOS18": 18, "iOS26": 26,
                 "macOS12": 15, "macOS13": 16, "macOS14": 17, "macOS15": 18, "macOS26": 26}
_BATCH_ELEMENTS = 32_000_000  # weights per coremltools call: bounds the copy coremltools makes of what it compresses


@dataclass(frozen=True)
class LayerCompression:
    """What one Linear/Conv2d layer gets. An empty granularity means the mode's default (the first allowed)."""

    mode: str
    nbits: int = 8
    granularity: str = ""
    group_size: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise InternalError(f"unknown compression mode {self.mode!r}")
        if not self.granularity:
            object.__setattr__(self, "granularity", GRANULARITIES[self.mode][0])
        problem = _layer_problem(self.mode, self.nbits, self.granularity, self.group_size)
        if problem:
            raise InternalError(f"invalid {self}: {problem[0]} {problem[1]} ({problem[2]})")


@dataclass(frozen=True)
class MixedBit:
    bits: tuple[int, ...]  # candidate palettization bit widths, ascending
    min_psnr_db: float  # the component's simulated output must stay at or above this
    granularity: str = "per_tensor"
    group_size: int = 0

    def layer(self, nbits: int) -> LayerCompression:
        return LayerCompression("palettize", nbits, self.granularity, self.group_size)


@dataclass(frozen=True)
class CompressionConfig:
    """One component's config. ``source`` is where it was read from (``file: key path``), for error messages."""

    global_config: LayerCompression | None = None
    op_type: Mapping[str, LayerCompression | None] = field(default_factory=dict)
    op_name: Mapping[str, LayerCompression | None] = field(default_factory=dict)
    mixed_bit: MixedBit | None = None
    weight_threshold: int = 2048
    source: str = field(default="", compare=False)


def _layer_problem(mode: str, nbits: Any, granularity: Any, group_size: int) -> tuple[str, str, str] | None:
    """(key, what is wrong, what is allowed) for an impossible layer config, or None."""
    allowed_bits = PALETTE_BITS if mode == "palettize" else (8,)
    if isinstance(nbits, bool) or nbits not in allowed_bits:
        return "nbits", f"is {nbits!r}", f"{mode} allows nbits: {', '.join(map(str, allowed_bits))}"
    if granularity not in GRANULARITIES[mode]:
        return "granularity", f"is {granularity!r}", f"{mode} allows: {', '.join(GRANULARITIES[mode])}"
    if granularity == "per_grouped_channel" and not group_size > 0:
        return "group_size", "is missing", "per_grouped_channel needs group_size > 0 (output channels per palette)"
    if granularity != "per_grouped_channel" and group_size:
        return "group_size", f"is {group_size}", "group_size only goes with granularity per_grouped_channel"
    return None


def _fail(where: str, path: str, what: str, hint: str | None = None) -> NoReturn:
    raise PresetError(f"{where}.{path} {what}" if path else f"{where} {what}", hint)


def _mapping(data: Any, where: str, path: str, allowed: Sequence[str] | None) -> dict:
    if not isinstance(data, dict):
        _fail(where, path, f"must be a mapping, not {type(data).__name__}")
    for key in data:
        if allowed is not None and key not in allowed:
            _fail(where, f"{path}.{key}" if path else str(key), "is not a known key", f"allowed: {', '.join(allowed)}")
    return data


def _integer(value: Any, where: str, path: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(where, path, f"is {value!r}", f"an integer >= {minimum}")
    return value


def _parse_layer(data: Any, where: str, path: str, level: int) -> LayerCompression | None:
    if data is None:
        return None
    _mapping(data, where, path, ("mode", "nbits", "granularity", "group_size"))
    mode = data.get("mode")
    if mode not in MODES:
        _fail(where, f"{path}.mode", f"is {mode!r}" if "mode" in data else "is missing", f"allowed: {', '.join(MODES)}")
    if mode == "palettize" and "nbits" not in data:
        _fail(where, f"{path}.nbits", "is missing", f"palettize needs nbits: {', '.join(map(str, PALETTE_BITS))}")
    nbits = data.get("nbits", 8)
    granularity = data.get("granularity", GRANULARITIES[mode][0])
    group_size = _integer(data.get("group_size", 0), where, f"{path}.group_size", 0)
    problem = _layer_problem(mode, nbits, granularity, group_size)
    if problem:
        _fail(where, f"{path}.{problem[0]}", problem[1], problem[2])
    _check_target(where, path, granularity, (nbits,) if mode == "palettize" else (), level)
    return LayerCompression(mode, nbits, granularity, group_size)


def _check_target(where: str, path: str, granularity: str, palette_bits: Sequence[int], level: int) -> None:
    if level < 16:
        _fail(where, path, "needs deployment target iOS16/macOS13 or newer", "raise coreml.deployment_target")
    if granularity == "per_grouped_channel" and level < 18:
        _fail(where, f"{path}.granularity", "per_grouped_channel needs deployment target iOS18/macOS15",
              "use granularity per_tensor, or deployment_target iOS18/macOS15")
    if 3 in palette_bits and level < 18:
        _fail(where, f"{path}.nbits", "3-bit palettes need deployment target iOS18/macOS15",
              "use nbits 2, 4, 6 or 8, or deployment_target iOS18/macOS15")


def _parse_mixed(data: Any, where: str, level: int) -> MixedBit:
    _mapping(data, where, "mixed_bit", ("bits", "min_psnr_db", "granularity", "group_size"))
    bits = data.get("bits")
    if (not isinstance(bits, list) or len(bits) < 2 or len(set(bits)) != len(bits)
            or any(isinstance(b, bool) or b not in PALETTE_BITS for b in bits)):
        _fail(where, "mixed_bit.bits", f"is {bits!r}",
              f"a list of at least two different bit widths from {', '.join(map(str, PALETTE_BITS))}, e.g. [4, 6, 8]")
    psnr = data.get("min_psnr_db")
    if isinstance(psnr, bool) or not isinstance(psnr, (int, float)) or not psnr > 0:
        _fail(where, "mixed_bit.min_psnr_db", f"is {psnr!r}", "a positive number of dB, e.g. 30")
    granularity = data.get("granularity", "per_tensor")
    group_size = _integer(data.get("group_size", 0), where, "mixed_bit.group_size", 0)
    problem = _layer_problem("palettize", 8, granularity, group_size)
    if problem:
        _fail(where, f"mixed_bit.{problem[0]}", problem[1], problem[2])
    _check_target(where, "mixed_bit", granularity, bits, level)
    return MixedBit(tuple(sorted(bits)), float(psnr), granularity, group_size)


def parse_compression(data: Any, where: str, deployment_target: str) -> CompressionConfig:
    """One component's compression block from YAML, e.g. ``{global: {mode: palettize, nbits: 6}, op_name: {conv_in:
    null}}`` or ``{mixed_bit: {bits: [4, 6, 8], min_psnr_db: 30}}``. Errors name ``where`` plus the key path."""
    level = TARGET_LEVELS.get(deployment_target)
    if level is None:
        _fail(where, "", f"cannot check against deployment target {deployment_target!r}",
              f"known targets: {', '.join(TARGET_LEVELS)}")
    _mapping(data, where, "", ("global", "op_type", "op_name", "mixed_bit", "weight_threshold"))
    if data.get("global") is not None and data.get("mixed_bit") is not None:
        _fail(where, "mixed_bit", "cannot be combined with global", "choose one: a fixed global config or mixed_bit")
    op_type = _mapping(data.get("op_type") or {}, where, "op_type", OP_TYPES)
    op_name = _mapping(data.get("op_name") or {}, where, "op_name", None)
    return CompressionConfig(
        global_config=_parse_layer(data.get("global"), where, "global", level),
        op_type={k: _parse_layer(v, where, f"op_type.{k}", level) for k, v in op_type.items()},
        op_name={str(k): _parse_layer(v, where, f"op_name.{k}", level) for k, v in op_name.items()},
        mixed_bit=_parse_mixed(data["mixed_bit"], where, level) if data.get("mixed_bit") is not None else None,
        weight_threshold=_integer(data.get("weight_threshold", 2048), where, "weight_threshold", 0),
        source=where,
    )


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
        from coremltools.optimize.torch.quantization import (ModulePostTrainingQuantizerConfig,
                                                             PostTrainingQuantizer, PostTrainingQuantizerConfig)

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


def compress(model: nn.Module, layers: Mapping[str, LayerCompression], *, workers: int = 1) -> nn.Module:
    """Compress ``layers`` (module path → config) IN PLACE and return ``model``; an empty mapping changes nothing.

    Afterwards each layer's weight holds its simulated values and its ``_COREML_`` buffers describe the palette or
    scale; every fp32 parameter is rounded through fp16. Recompressing a layer replaces its earlier compression.
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
    with _quiet_coremltools():
        for mode in MODES:
            names = [n for n, c in layers.items() if c.mode == mode]
            for batch in _batches(names, found):
                for module in batch.values():
                    drop_compression_buffers(module)
                _run_coremltools(batch, layers, workers)
                done += len(batch)
                log.debug("compressed %d of %d layers", done, len(layers))
    not_done = [n for n in layers if f"{META}/weight/compression_type" not in compression_buffers(found[n])]
    if not_done:
        raise InternalError(f"coremltools left {len(not_done)} layers uncompressed: {not_done[:5]}")
    if META_VERSION not in dict(model.named_buffers(recurse=False)):
        model.register_buffer(META_VERSION, torch.tensor(1))
    round_to_fp16(model)
    kinds = sorted({f"{c.mode} {c.nbits}-bit {c.granularity}" for c in layers.values()})
    log.info("compressed %d layers (%s) in %.1f s", len(layers), ", ".join(kinds), time.perf_counter() - started)
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
                      cfg: CompressionConfig, *, workers: int = 1) -> tuple[dict[str, LayerCompression], dict]:
    """Per-layer palette widths for a ``mixed_bit`` config; see ``mixed_bit.py``. Leaves ``model`` compressed."""
    from pocketsd.export.mixed_bit import choose_mixed_bits as choose

    return choose(model, run, cfg, workers=workers)
