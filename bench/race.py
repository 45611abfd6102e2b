"""The timed UNet calls of ``pocketsd bench``: workers started in groups that fit in memory, their calls interleaved.

Interleaving (A B C, C B A, A B C …) is what makes a ratio survive a machine whose speed drifts (this box's large
MatMul has read 101 and 168 GFLOP/s at the two ends of one run), so the ratios the bench reports must come from calls
that interleaved. The order turns round every round because the worker called first in a round measured slower: two
workers on the same OpenVINO bf16 UNet file (SD 1.5, 256², 16 rounds each way) read 0.985× with one of them always
first and 1.023× with the other first, 0.999× alternating; the fixed order had put the pace worker (below) first in
every round. Full-size workers take 6-10 GB each, so on a 24 GB box only about two run side by side, and grouping
by memory alone put the fastest pocketsd configuration and plain OpenVINO in different groups: their ratio was read
across minutes of drift. Hence two passes:

1. pocketsd's contenders, each in a group with its ``-1chunk`` twin (admission.py) where they fit side by side;
2. the peers, each in a group with a fresh worker of the fastest pocketsd contender of pass 1 (the *pace* worker), so
   that every peer's ratio to pocketsd is read from calls interleaved with its own (``vs_fastest`` in its row). A
   peer that does not fit beside the pace worker runs alone, and its row says that its ratio did not interleave.

A group is a pair at most (the load order, below, cancels out of a pair's ratio in two runs; a larger group's would
need as many runs as members).

Load order. On this box the worker loaded first in a group ran its calls 8-20 % slower than the one loaded after it,
whichever contender it was: two plain OpenVINO workers on the same SD 1.5 file at 256², 16 interleaved rounds,
0.440 vs 0.387 s and 0.446 vs 0.404 s; started in one order and loaded in the other, the one *loaded* first was the
slow one (0.445 vs 0.402 s); a reload of the first worker after the second had loaded did not mend it (0.387 vs
0.363 s). In 11 pairs of 11 the first loaded was the slower (a virtual machine: how the memory a process gets is
backed differs with what was free when it loaded; not established further). The pace worker, loaded first in every
peer's group, carried that penalty into every peer's ratio. So, with ``load_orders`` 2 (the default), every group of
two or more runs a second time with fresh workers loaded in the reverse order, and a row's median is the geometric
mean of its two runs' medians (``Row.median_s``): a penalty that multiplies the first-loaded worker's time cancels
out of every ratio. Each run's figures are kept (``median_by_load_order``, ``by_load_order``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pocketsd.bench.admission import admission_units, fits_unit_now
from pocketsd.bench.contenders import worker_command
from pocketsd.bench.worker_client import WorkerError, WorkerProcess

if TYPE_CHECKING:
    from pocketsd.bench.side_by_side import BenchRequest, Row

Tick = Callable[[str], None]
POCKETSD = "pocketsd"


def output_path(request: BenchRequest, row: Row, size: int) -> Path:
    return request.work / "outputs" / f"{row.contender.name}-{size}.npy"


def start(request: BenchRequest, row: Row, spec: dict, size: int, tick: Tick, log: str = "") -> WorkerProcess | None:
    """Start a contender's worker, load it twice and warm it up; None (with ``row.error``) if that failed."""
    name = row.contender.name
    worker = WorkerProcess(name, worker_command(row.contender, json.dumps(spec), request.optimum_python),
                           request.work / "logs" / f"{name}-{size}{log}.log")
    try:
        info = worker.request("info")
        row.figures.update(describe=info.get("describe"), versions=info.get("versions"))
        loads = {"cold_load_s": worker.request("load")["seconds"], "warm_load_s": worker.request("load")["seconds"]}
        for key, seconds in loads.items():  # the first load order's (a later run's would be after a page cache warmed)
            row.figures.setdefault(key, seconds)
        for _ in range(request.warmup):
            worker.request("call")
        tick(f"{name} loaded")
        return worker
    except WorkerError as exc:
        row.error = str(exc)
        worker.close()
        return None


class _Group:
    """The workers of one group: started one by one while they fit, then called in turn, then closed."""

    def __init__(self, request: BenchRequest, specs: dict[str, dict], size: int, tick: Tick, number: int) -> None:
        self.request, self.specs, self.size, self.tick, self.number = request, specs, size, tick, number
        self.live: list[tuple[Row, WorkerProcess]] = []
        self.logs: dict[int, str] = {}  # id(row) -> its log suffix, for the run in the reverse order
        self.peaks: list[float] = []
        self.unsaved: set[int] = set()  # the pace worker's output is its contender's, saved in pass 1

    def admit(self, row: Row, largest: float, log: str = "") -> float:
        """Start ``row``'s worker in this group; returns the largest peak RSS seen so far (bytes). A ``log`` suffix
        marks an extra worker of a contender already timed (the pace worker): its output is not saved again."""
        row.group = self.number
        if log:
            self.unsaved.add(id(row))
        worker = start(self.request, row, self.specs[row.contender.name], self.size, self.tick, log)
        if worker is None:
            return largest
        self.live.append((row, worker))
        self.logs[id(row)] = log
        row.runs.append([])
        try:
            peak = worker.request("stats")["peak_rss_mb"]
        except WorkerError as exc:
            row.error = str(exc)
            return largest
        row.figures.setdefault("peak_rss_admitted_mb", peak)  # what admission saw (admission.py's GROWTH)
        self.peaks.append(peak * 1e6)
        return max(largest, peak * 1e6)

    def interleave(self, keep_outputs: bool) -> None:
        for i in range(self.request.calls):
            for row, worker in self.live if i % 2 == 0 else self.live[::-1]:  # first and last in turn (see above)
                if row.error:
                    continue
                save = None
                if i == 0 and keep_outputs and id(row) not in self.unsaved:
                    save = output_path(self.request, row, self.size)
                if save:
                    save.parent.mkdir(parents=True, exist_ok=True)
                    save.unlink(missing_ok=True)  # never compare a stale output from an earlier run
                try:
                    answer = worker.request("call", **({"save": str(save)} if save else {}))
                except WorkerError as exc:
                    row.error = str(exc)
                    continue
                row.call_s.append(answer["seconds"])
                row.runs[-1].append(answer["seconds"])
                for chunk in answer.get("chunks", []):
                    row.chunk_s.setdefault(chunk["id"], []).append(chunk["seconds"])
                self.tick(f"{row.contender.name} call")

    def close(self) -> None:
        for row, worker in self.live:
            try:
                peak = worker.request("stats")["peak_rss_mb"]
                row.figures["peak_rss_calls_mb"] = max(peak, row.figures.get("peak_rss_calls_mb", 0.0))
            except WorkerError as exc:
                row.error = row.error or str(exc)
            worker.close()

    def run(self, keep_outputs: bool) -> None:
        """Interleave and close; then, with ``load_orders`` 2, the same rows once more in fresh workers loaded in the
        reverse order (module docstring). They fitted side by side once, so they fit again."""
        self.interleave(keep_outputs)
        self.close()
        loaded = [row for row, _ in self.live if not row.error]
        if self.request.load_orders < 2 or len(loaded) < 2:
            return
        again = _Group(self.request, self.specs, self.size, self.tick, self.number)
        for row in reversed(loaded):
            again.admit(row, 0.0, log=self.logs[id(row)] + "-reversed")
        again.interleave(keep_outputs=False)
        again.close()


def _fastest(rows: list[Row]) -> Row | None:
    timed = [r for r in rows if r.call_s and not r.error]
    return min(timed, key=lambda r: r.median_s()) if timed else None


def race(request: BenchRequest, rows: list[Row], specs: dict[str, dict], size: int, tick: Tick,
         keep_outputs: bool = True) -> None:
    """Every runnable row's UNet calls, interleaved within groups (module docstring); with ``keep_outputs``, each
    row's first output saved for the agreement check."""
    from pocketsd.bench.side_by_side import Row

    runnable = [r for r in rows if not r.skipped and not r.error]
    ours = [r for r in runnable if r.contender.kind == POCKETSD]
    peers = [r for r in runnable if r.contender.kind != POCKETSD]
    number, largest = 0, 0.0
    waiting = [[ours[i] for i in unit] for unit in admission_units([r.contender.name for r in ours])]
    while waiting:  # one contender, with its unchunked twin where there is one, per group
        number += 1
        group = _Group(request, specs, size, tick, number)
        row, *twin = waiting.pop(0)
        largest = group.admit(row, largest)
        if twin and fits_unit_now(group.peaks, largest, 1):
            largest = group.admit(twin[0], largest)
        elif twin:  # it leads the next group, alone
            waiting.insert(0, twin)
        group.run(keep_outputs)
    fastest = _fastest(ours)
    for row in peers:  # each peer beside a fresh pace worker
        number += 1
        group = _Group(request, specs, size, tick, number)
        # the pace worker only where a peer as large as it could fit beside it (its peak known from pass 1)
        pace_peak = fastest.figures.get("peak_rss_admitted_mb", 0.0) * 1e6 if fastest else 0.0
        pace = Row(fastest.contender) if fastest and fits_unit_now([pace_peak], pace_peak, 1) else None
        if pace:  # its own load figures stay out of the table: only its calls beside the peer are kept
            group.admit(pace, 0.0, log="-pace")
        # the peer counts as large as the pace worker, not as the largest of the run (pocketsd's fp32 OpenVINO
        # worker, by far the largest, would keep every peer from fitting beside the pace worker)
        if group.peaks and not fits_unit_now(group.peaks, max(group.peaks), 1):  # it runs alone after all
            group.close()
            group, pace = _Group(request, specs, size, tick, number), None
        group.admit(row, largest)
        group.run(keep_outputs)
        row.figures["vs_fastest"] = _pace_figures(fastest, pace, row)


def _pace_figures(fastest: Row | None, pace: Row | None, row: Row) -> dict[str, Any] | None:
    """The peer's median call against the fastest pocketsd contender's: from the pace worker's interleaved calls when
    there was one, else from pass 1's calls (minutes apart: ``interleaved`` False)."""
    if fastest is None or not row.call_s:
        return None
    interleaved = pace is not None and bool(pace.call_s) and not pace.error
    ours = (pace if interleaved and pace else fastest).median_s()
    theirs = row.median_s()
    figures = {"contender": fastest.contender.name, "interleaved": interleaved, "pocketsd_median_s": ours,
               "peer_median_s": theirs, "ratio": theirs / ours}
    if interleaved and pace:
        figures["pocketsd_call_s"] = pace.call_s
        figures["by_load_order"] = [peer / own for own, peer in zip(pace.run_medians(), row.run_medians())]
    return figures
