"""Compression configs of CoreML presets: frozen dataclasses and their strict YAML parser.

Three levels per component (global → op type → op name, ``null`` = leave alone) or a ``mixed_bit`` search instead of a
global bit width. Every mistake is a PresetError naming the file, the key path and what is allowed; combinations the
deployment target cannot store (grouped or 3-bit palettes before iOS 18 / macOS 15) are refused here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, NoReturn, Sequence

from pocketsd.contract import DEPLOYMENT_TARGETS, targets_at
from pocketsd.errors import InternalError, PresetError

MODES = ("palettize", "linear_int8")
PALETTE_BITS = (2, 3, 4, 6, 8)
GRANULARITIES = {"palettize": ("per_tensor", "per_grouped_channel"), "linear_int8": ("per_channel",)}
OP_TYPES = ("Linear", "Conv2d")
META = "_COREML_"
META_VERSION = f"{META}/metadata_version"
# Deployment targets as the iOS release with the same CoreML opset (pocketsd/contract.py).
TARGET_LEVELS = {name: target.level for name, target in DEPLOYMENT_TARGETS.items()}
_COMPRESSION, _GROUPED = 16, 18  # the levels compression, and grouped or 3-bit palettes, need


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
    # a bits target instead of the fewest bits within min_psnr_db (which stays the gate): Apple's recipe form
    average_bits: float | None = None

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
    min_psnr_db: float | None = None  # the quality gate; None: quality_gates.py's default for the recipe
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


def _psnr(value: Any, where: str, path: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        _fail(where, path, f"is {value!r}", "a positive number of dB, e.g. 30")
    return float(value)


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
    if level < _COMPRESSION:
        _fail(where, path, f"needs deployment target {targets_at(_COMPRESSION)} or newer",
              "raise coreml.deployment_target")
    grouped = targets_at(_GROUPED)
    if granularity == "per_grouped_channel" and level < _GROUPED:
        _fail(where, f"{path}.granularity", f"per_grouped_channel needs deployment target {grouped}",
              f"use granularity per_tensor, or deployment_target {grouped}")
    if 3 in palette_bits and level < _GROUPED:
        _fail(where, f"{path}.nbits", f"3-bit palettes need deployment target {grouped}",
              f"use nbits 2, 4, 6 or 8, or deployment_target {grouped}")


def _parse_mixed(data: Any, where: str, level: int) -> MixedBit:
    _mapping(data, where, "mixed_bit", ("bits", "min_psnr_db", "granularity", "group_size", "average_bits"))
    bits = data.get("bits")
    if (not isinstance(bits, list) or len(bits) < 2 or len(set(bits)) != len(bits)
            or any(isinstance(b, bool) or b not in PALETTE_BITS for b in bits)):
        _fail(where, "mixed_bit.bits", f"is {bits!r}",
              f"a list of at least two different bit widths from {', '.join(map(str, PALETTE_BITS))}, e.g. [4, 6, 8]")
    psnr = _psnr(data.get("min_psnr_db"), where, "mixed_bit.min_psnr_db")
    granularity = data.get("granularity", "per_tensor")
    group_size = _integer(data.get("group_size", 0), where, "mixed_bit.group_size", 0)
    problem = _layer_problem("palettize", 8, granularity, group_size)
    if problem:
        _fail(where, f"mixed_bit.{problem[0]}", problem[1], problem[2])
    _check_target(where, "mixed_bit", granularity, bits, level)
    average = data.get("average_bits")
    if average is not None and (isinstance(average, bool) or not isinstance(average, (int, float))
                                or not min(bits) <= average <= max(bits)):
        _fail(where, "mixed_bit.average_bits", f"is {average!r}",
              f"a number of bits from {min(bits)} to {max(bits)} (the widths in bits), e.g. 4.5")
    return MixedBit(tuple(sorted(bits)), psnr, granularity, group_size,
                    None if average is None else float(average))


def parse_compression(data: Any, where: str, deployment_target: str) -> CompressionConfig:
    """One component's compression block from YAML, e.g. ``{global: {mode: palettize, nbits: 6}, op_name: {conv_in:
    null}}`` or ``{mixed_bit: {bits: [4, 6, 8], min_psnr_db: 30}}``. Errors name ``where`` plus the key path."""
    level = TARGET_LEVELS.get(deployment_target)
    if level is None:
        _fail(where, "", f"cannot check against deployment target {deployment_target!r} (compression needs "
                         f"{targets_at(_COMPRESSION)} or newer)", f"known targets: {', '.join(TARGET_LEVELS)}")
    _mapping(data, where, "", ("global", "op_type", "op_name", "mixed_bit", "weight_threshold", "min_psnr_db"))
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
        min_psnr_db=_psnr(data["min_psnr_db"], where, "min_psnr_db") if data.get("min_psnr_db") is not None else None,
        source=where,
    )
