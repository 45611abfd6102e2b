"""The parity gate: exported chunks and components against PyTorch, on seeded inputs.

PSNR is ``20·log10(peak / rmse)`` with ``peak = max |reference|``; identical outputs report ``PSNR_CAP`` so the
figure stays a number in JSON. Failures are collected and raised once, with a table of everything below threshold.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from pocketsd.errors import ParityError
from pocketsd.runtime.manifest import Parity

PSNR_CAP = 200.0


@dataclass(frozen=True)
class Figures:
    psnr_db: float
    max_abs: float


def compare(reference: np.ndarray, actual: np.ndarray) -> Figures:
    ref = np.asarray(reference, dtype=np.float64)
    got = np.asarray(actual, dtype=np.float64)
    if ref.shape != got.shape:
        raise ParityError(f"output shape {list(got.shape)} differs from PyTorch's {list(ref.shape)}")
    diff = got - ref
    max_abs = float(np.max(np.abs(diff))) if diff.size else 0.0
    mse = float(np.mean(diff * diff)) if diff.size else 0.0
    peak = float(np.max(np.abs(ref))) if ref.size else 0.0
    if not np.all(np.isfinite(got)):
        return Figures(0.0, float("inf"))
    if mse == 0.0:
        return Figures(PSNR_CAP, max_abs)
    psnr = 20 * np.log10(max(peak, 1e-12) / np.sqrt(mse))
    return Figures(round(min(float(psnr), PSNR_CAP), 2), max_abs)


def compare_all(references: Sequence[np.ndarray], actuals: Sequence[np.ndarray]) -> Figures:
    """Worst case over several outputs: the lowest PSNR and the largest max-abs error."""
    figures = [compare(r, a) for r, a in zip(references, actuals)]
    return Figures(min(f.psnr_db for f in figures), max(f.max_abs for f in figures))


@dataclass
class ParityGate:
    rows: list[tuple[str, Figures, float]] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)  # non-numeric failures (a file not as promised)

    def fail(self, what: str, problem: str) -> None:
        self.problems.append((what, problem))

    def check(self, what: str, figures: Figures, min_psnr_db: float) -> Parity:
        self.rows.append((what, figures, min_psnr_db))
        return Parity(psnr_db=figures.psnr_db, max_abs=figures.max_abs, min_psnr_db=min_psnr_db)

    @property
    def failures(self) -> list[tuple[str, Figures, float]]:
        return [row for row in self.rows if not row[1].psnr_db >= row[2]]

    def raise_if_failed(self) -> None:
        failed = self.failures
        if self.problems:
            lines = [f"{what:<28} {problem}" for what, problem in self.problems]
            raise ParityError(f"{len(self.problems)} written file(s) are not what the manifest promises "
                              f"(first: {self.problems[0][0]}: {self.problems[0][1]})",
                              "this is likely a converter problem; please report it with the table below",
                              details="\n".join(lines))
        if not failed:
            return
        lines = [f"{'what':<28} {'PSNR dB':>9} {'needs':>7} {'max abs':>10}"]
        lines += [f"{what:<28} {f.psnr_db:>9.2f} {need:>7.1f} {f.max_abs:>10.3g}" for what, f, need in failed]
        raise ParityError(
            f"{len(failed)} of {len(self.rows)} parity checks are below threshold (worst: {failed[0][0]})",
            "the export does not match PyTorch; lower the preset's parity.min_psnr_db only if you accept that",
            details="\n".join(lines),
        )
