"""Which contenders' workers run side by side: a group is only as many as fit in memory with room to spare.

Two checks, both needed:
- MemAvailable must exceed the largest worker so far × MEMORY_MARGIN, plus MEMORY_RESERVE for the bench itself. A
  worker grows past its peak after the warm-up while others run (arenas), and its mapped weights count in RSS and in
  the page cache alike: on SD 1.5 at 512² four workers admitted with a margin of 1.3× their RSS got one OOM-killed.
- MemAvailable alone is not enough: it counts as free the page cache that holds the running workers' memory-mapped
  weights (onnxruntime's cached optimized graphs, OpenVINO's and torch's mapped files), which the kernel then evicts
  and reads back between calls. Admitted on it alone, the 512² group of pocketsd-onnxruntime in 4 chunks, in 1
  chunk and plain onnxruntime (10.4 + 7.7 + 7.4 GB by the end, on a 25.3 GB box) ran 10.16, 9.20 and 8.94 s per
  UNet call; the two pocketsd bundles alone in one process, 8.88 and 8.55 s. So the workers' peaks, each grown by
  GROWTH (onnxruntime allocates its memory plan in the second run, after the warm-up call the peak is read at),
  and the newcomer counted as large as the largest so far, must also fit in MemTotal less the reserve.
"""

from __future__ import annotations

from typing import Sequence

from pocketsd.bench.machine import memory_available_bytes, memory_total_bytes

MEMORY_MARGIN = 1.6
MEMORY_RESERVE = 2e9
GROWTH = 1.5


def fits_another(peaks: Sequence[float], largest: float, available: float | None, total: float | None) -> bool:
    """Whether one more worker may start beside running ones whose peak RSS (bytes, read after their warm-up) are
    ``peaks``, the largest worker of the run so far being ``largest``, given MemAvailable and MemTotal (None where
    unknown: that check is skipped). The first of a group always may."""
    if not peaks:
        return True
    largest = max(largest, *peaks)
    if available is not None and available <= largest * MEMORY_MARGIN + MEMORY_RESERVE:
        return False
    return total is None or (sum(peaks) + largest) * GROWTH + MEMORY_RESERVE <= total


def fits_another_now(peaks: Sequence[float], largest: float) -> bool:
    """``fits_another`` with this machine's memory as the kernel reports it now."""
    return fits_another(peaks, largest, memory_available_bytes(), memory_total_bytes())


def admission_units(names: Sequence[str]) -> list[list[int]]:
    """Indices into ``names``, in order, grouped so that a contender and its ``-1chunk`` twin (the same engine on the
    unchunked bundle) are admitted to the same group: chunked against unchunked is only a fair ratio when their
    calls interleave. Every other contender is a unit of its own."""
    index = {name: i for i, name in enumerate(names)}
    units = []
    for i, name in enumerate(names):
        if name.endswith("-1chunk") and name.removesuffix("-1chunk") in index:
            continue  # admitted with its chunked contender
        twin = index.get(f"{name}-1chunk")
        units.append([i] if twin is None else [i, twin])
    return units


def fits_unit(peaks: Sequence[float], largest: float, members: int, available: float | None,
              total: float | None) -> bool:
    """Whether ``members`` more workers, each counted as large as the largest so far, fit beside ``peaks``. The
    first of a group always may start (else a pair larger than the box would never run): its twin is then checked
    against its real peak."""
    if not peaks:
        return True
    return fits_another([*peaks, *[largest] * (members - 1)], largest, available, total)


def fits_unit_now(peaks: Sequence[float], largest: float, members: int) -> bool:
    """``fits_unit`` with this machine's memory as the kernel reports it now."""
    return fits_unit(peaks, largest, members, memory_available_bytes(), memory_total_bytes())
