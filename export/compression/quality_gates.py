"""Quality gates of the lossy export steps: a component against its own fp32 self, failing closed below a threshold.

Every lossy step has a minimum PSNR (``20·log10(max|ref| / rmse)`` on the seeded export inputs, worst output), by
recipe, in ``DEFAULT_MIN_PSNR_DB`` below; a preset overrides it per component (``quantize.<c>.min_psnr_db`` for ONNX,
``coreml.compression.<c>.min_psnr_db`` for CoreML). Below it the export raises ``ParityError`` with the table of
measured vs required figures before anything is captured, and the staging folder goes with it.

Where the defaults come from: the SD 1.5 architecture with random weights (``pocketsd random-model sd15``), which is
the worst case (no structure for a palette or a grid to exploit; trained weights measure higher), and the built-in
tiny model the tests export. Each default sits several dB below the lowest figure measured for its recipe, so that it
catches a step gone wrong (a k-means that collapsed, a grid coarser than asked for, a layer blown up, an fp16
overflow) without failing a recipe that works as intended. Each lost bit of a palette or grid costs about 6 dB.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

from pocketsd.errors import InternalError, ParityError
from pocketsd.export.compression.coreml_config import LayerCompression, MixedBit

# ONNX weight quantization, calibrated on SD 1.5 with random weights at 256x256, seed 0: int8 — UNet 50.4, text
# encoder 42.4, VAE decoder 50.0, encoder 50.0 dB; int4 (blocks of 32..256) — UNet 25.4-25.7, text encoder
# 18.8-20.5, VAE 25.3-25.7 dB. 35 dB catches an int8 grid coarser by 1-2 bits (or an int4 one), 15 dB an int4 grid
# gone wrong, with >= 3.8 dB to spare on every component.
QUANT_MIN_PSNR_DB = {"int8": 35.0, "int4": 15.0}

# CoreML, simulated in PyTorch with the palettes / grids the packages store (every weight rounded through fp16):
# palettize per_tensor on the SD 1.5 UNet with random weights: 6-bit 39.2 dB (512x512), 4-bit 26.7 dB (256x256);
# 8, 3 and 2 bits from ~6 dB per bit (8: ~51, 3: ~20.7, 2: ~14.7). Grouped palettes (per_grouped_channel) only
# measure higher. See the report of this change for the tiny model's figures. linear_int8 is per output channel,
# the same grid as ONNX int8. fp16: weights rounded through fp16 lose ~2^-11 relative (60+ dB); 30 dB only
# catches what is really broken (a weight beyond fp16's 65504 gives inf), and is the CoreML presets' parity too.
_PALETTE_MIN_PSNR_DB = {8: 40.0, 6: 30.0, 4: 18.0, 3: 12.0, 2: 6.0}
DEFAULT_MIN_PSNR_DB: dict[str, float] = {
    **{f"onnx:{mode}": db for mode, db in QUANT_MIN_PSNR_DB.items()},
    **{f"coreml:palettize:{bits}": db for bits, db in _PALETTE_MIN_PSNR_DB.items()},
    "coreml:linear_int8:8": 35.0,
    "coreml:fp16": 30.0,
}


def default_min_psnr_db(recipe: str) -> float:
    if recipe not in DEFAULT_MIN_PSNR_DB:
        raise InternalError(f"no quality gate for recipe {recipe!r}; known: {', '.join(DEFAULT_MIN_PSNR_DB)}")
    return DEFAULT_MIN_PSNR_DB[recipe]


@dataclass(frozen=True)
class Threshold:
    min_psnr_db: float
    recipe: str  # the table key it comes from, e.g. ``coreml:palettize:6``, or ``mixed_bit``
    key: str  # the preset key that overrides it
    from_preset: bool  # set in the preset, not the table's default

    def describe(self) -> str:
        if self.from_preset:
            return f"the preset's {self.key} of {self.min_psnr_db:.1f} dB"
        return (f"the default {self.min_psnr_db:.1f} dB for {self.recipe} (set {self.key} to change it)")


def coreml_threshold(component: str, layers: Mapping[str, LayerCompression], mixed: MixedBit | None,
                     override: float | None) -> Threshold:
    """The gate of a CoreML component: the preset's ``min_psnr_db``, else the mixed-bit budget (the search keeps the
    output at or above it by construction), else the default of the narrowest recipe among its layers (the layers at
    the fewest bits dominate the error); a component compressed nowhere is gated as fp16."""
    key = f"coreml.compression.{component}.min_psnr_db"
    if override is not None:
        return Threshold(float(override), "preset", key, True)
    if mixed is not None:
        return Threshold(mixed.min_psnr_db, "mixed_bit", f"coreml.compression.{component}.mixed_bit.min_psnr_db",
                         True)
    recipes = {f"coreml:{c.mode}:{c.nbits}" for c in layers.values()} or {"coreml:fp16"}
    recipe = min(recipes, key=default_min_psnr_db)
    return Threshold(default_min_psnr_db(recipe), recipe, key, False)


def combined_db(*thresholds: float) -> float:
    """The PSNR two independent losses leave together: their noise powers add (30 dB and 30 dB make 27.0 dB)."""
    return round(-10 * math.log10(sum(10 ** (-t / 10) for t in thresholds)), 2)


@dataclass(frozen=True)
class GateRow:
    component: str
    step: str  # what was measured, e.g. "palettize:6 (simulated)" or "int8 weight quantization"
    label: str  # the table's first column, e.g. "unet (int8 vs fp32)"
    psnr_db: float
    max_abs: float
    threshold: Threshold

    @property
    def passed(self) -> bool:
        return self.psnr_db >= self.threshold.min_psnr_db  # NaN fails

    def manifest_entry(self) -> dict[str, float | str]:
        return {"psnr_db": self.psnr_db, "min_psnr_db": self.threshold.min_psnr_db, "recipe": self.threshold.recipe}


def table(rows: Sequence[GateRow]) -> str:
    lines = [f"{'what':<28} {'PSNR dB':>9} {'needs':>7} {'max abs':>10}"]
    lines += [f"{r.label:<28} {r.psnr_db:>9.2f} {r.threshold.min_psnr_db:>7.1f} {r.max_abs:>10.3g}" for r in rows]
    return "\n".join(lines)


def enforce(rows: Sequence[GateRow], hint: str) -> None:
    """Fail closed: a ``ParityError`` naming the first failing component, its figure and the threshold, with every
    row (passed ones too) in the table."""
    failed = [r for r in rows if not r.passed]
    if not failed:
        return
    first = failed[0]
    raise ParityError(f"{first.component}: {first.step} gives {first.psnr_db:.2f} dB against fp32 (PyTorch), below "
                      f"{first.threshold.describe()}", hint, details=table(rows))
