"""``pocketsd bench``: pocketsd and its peers on the same model, side by side, in one run.

For each resolution: the bundles are exported from the model (a child process each: wall time, peak RSS); every
contender (contenders.py) is started in its own worker process, loaded twice (cold: the first load in a fresh
process; warm: a reload in the same process), warmed up, and then the UNet calls of all contenders that fit in
memory together are interleaved — A B C, C B A, A B C … — so that a drifting machine slows them alike: pocketsd's
contenders first, then the peers, each group of peers beside a fresh worker of the fastest pocketsd contender
(race.py says why). The result says which group each was in. End-to-end generation runs each contender alone in a
fresh process, whose peak RSS (VmHWM) is the configuration's; pocketsd on onnxruntime also loads alone in one with
an empty cache folder (a bundle copied to a new machine). The UNet's FLOPs are counted from its graph, and a large
fp32 MatMul gives the machine's ceiling in the same run.

A contender that is not installed is reported as skipped with the reason; one that fails mid-run is reported with
its one-line error, and the others finish.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pocketsd.bench.all_presets import run_child
from pocketsd.bench.contenders import Contender, skip_reason, worker_command
from pocketsd.bench.flops import component_flops, matmul_ceiling
from pocketsd.bench.low_memory import component_disk_bytes
from pocketsd.bench.machine import machine_info
from pocketsd.bench.race import output_path, race
from pocketsd.bench.worker_client import WorkerError, WorkerProcess
from pocketsd.bench.worker_protocol import PROMPT
from pocketsd.contract import UNET_IO
from pocketsd.runtime.manifest import load_manifest

Tick = Callable[[str], None]


@dataclass(frozen=True)
class BenchRequest:
    model: str  # a diffusers folder, "tiny" (the built-in random model) or "shapes" (the built-in trained one)
    contenders: tuple[Contender, ...]
    work: Path  # bundles, optimum's export and worker logs go here
    resolutions: tuple[int, ...] = (256, 512)
    preset: str = "cpu"
    calls: int = 5
    warmup: int = 1
    steps: int = 20  # end-to-end denoising steps; 0: no end-to-end runs
    threads: int = 0  # 0: all cores, for every contender
    reuse_bundles: bool = False
    optimum_python: Path | None = None
    matmul_size: int = 4096  # the ceiling's MatMul is size³
    batch_one: bool = True  # also time pocketsd's chunked UNet at batch 1 (one unguided step) at the largest size
    load_orders: int = 2  # 2: every group of workers runs again, loaded in the reverse order (race.py says why)


@dataclass
class Row:
    """One contender at one resolution: what it measured, or why it did not."""

    contender: Contender
    group: int = 0
    figures: dict[str, Any] = field(default_factory=dict)
    call_s: list[float] = field(default_factory=list)
    runs: list[list[float]] = field(default_factory=list)  # call_s, split by the group run (load order) they came from
    chunk_s: dict[str, list[float]] = field(default_factory=dict)
    skipped: str | None = None
    error: str | None = None

    def run_medians(self) -> list[float]:
        """The median call of each group run (load order) the row was timed in."""
        return [statistics.median(run) for run in self.runs if run]

    def median_s(self) -> float:
        """The median UNet call; with calls from both load orders (race.py), the geometric mean of each order's
        median, so that the order's effect cancels out of every ratio instead of landing on one contender."""
        medians = self.run_medians() or [statistics.median(self.call_s)]
        return math.prod(medians) ** (1 / len(medians))

    def to_dict(self) -> dict[str, Any]:
        c = self.contender
        out: dict[str, Any] = {"contender": c.name, "kind": c.kind, "engine": c.engine, "uses": c.uses,
                               "group": self.group, **self.figures}
        if self.call_s:
            out["unet_call_s"] = {"median": self.median_s(), "min": min(self.call_s),
                                  "max": max(self.call_s), "stdev": statistics.pstdev(self.call_s),
                                  "all": self.call_s}
            if len(self.run_medians()) > 1:
                out["unet_call_s"]["median_by_load_order"] = self.run_medians()
        if self.chunk_s:
            out["chunk_s_median"] = {k: statistics.median(v) for k, v in self.chunk_s.items()}
        if self.skipped:
            out["skipped"] = self.skipped
        if self.error:
            out["error"] = self.error
        return out


def _model_folder(request: BenchRequest) -> str:
    from pocketsd.export.random_model import BUILTIN_MODELS, builtin_model_folder

    if request.model not in BUILTIN_MODELS:
        return request.model
    return str(builtin_model_folder(request.model, request.work))


def _bundle(request: BenchRequest, model: str, size: int, uses: str, tick: Tick,
            preset: str | None = None) -> dict[str, Any]:
    """Export (or with ``reuse_bundles``, find) the chunked or unchunked bundle at ``size``² (with ``preset``, the
    request's preset unless given)."""
    path = request.work / f"{Path(request.preset).stem}-{size}-{uses}"
    info: dict[str, Any] = {"path": str(path)}
    if request.reuse_bundles and (path / "manifest.json").is_file():
        info["export"] = {"reused": "bundle from an earlier run (--reuse-bundles): export not timed"}
    else:
        if path.exists():
            shutil.rmtree(path)
        command = ["export", "--model", model, "--preset", preset or request.preset, "--out", str(path), "--quiet",
                   "--resolution", f"{size}x{size}", *(["--chunks", "unet=1"] if uses == "unchunked" else [])]
        info["export"] = run_child(command)
    tick(f"export {uses} {size}²")
    if "exit_code" in info["export"] and info["export"]["exit_code"] != 0:
        info["error"] = f"export failed: {info['export'].get('last_line', 'see the log')}"
        return info
    manifest = load_manifest(path)
    info.update(disk_bytes=sum(component_disk_bytes(path).values()), unet_chunks=len(manifest.component("unet").chunks),
                dims=manifest.dims, unet_onnx=str(path / manifest.component("unet").chunks[0].file.path),
                context_layout="bc1s" if len(next(t for t in manifest.component("unet").inputs
                                                   if t.name == UNET_IO.encoder_hidden_states).shape) == 4 else "bsc")
    return info


def _spec(request: BenchRequest, contender: Contender, model: str, size: int,
          bundles: dict[str, Any]) -> dict[str, Any]:
    any_bundle = next(b for b in bundles.values() if "dims" in b)
    dims = any_bundle["dims"]
    spec = {"kind": contender.kind, "engine": contender.engine, "threads": request.threads, "model": model,
            "height": size, "width": size, "latent_height": dims["latent_height"], "latent_width": dims["latent_width"],
            "unet_batch": dims["unet_batch"], "latent_channels": dims["latent_channels"],
            "text_length": dims["text_length"], "text_hidden": dims["text_hidden"],
            "export_dir": str(request.work / "optimum-export")}
    if contender.uses in bundles:
        bundle = bundles[contender.uses]
        spec.update(bundle=bundle["path"], onnx=bundle.get("unet_onnx"), context_layout=bundle.get("context_layout"))
    return spec


def _optimum_export(request: BenchRequest, contender: Contender, spec: dict[str, Any], tick: Tick) -> dict[str, Any]:
    """optimum's own export of the model, in a worker of its own (its peak RSS is the export's), once per run."""
    with WorkerProcess(contender.name, worker_command(contender, json.dumps(spec), request.optimum_python),
                       request.work / "logs" / "optimum-export.log") as worker:
        try:
            answer = worker.request("export")
            info: dict[str, Any] = {"path": spec["export_dir"]}
            if answer.get("exported"):
                info["export"] = {"wall_s": answer["seconds"], "peak_rss_mb": worker.request("stats")["peak_rss_mb"]}
            else:
                info["export"] = {"reused": "exported earlier in this run (or kept by --reuse-bundles): not timed"}
        except WorkerError as exc:
            info = {"error": f"optimum export failed: {exc}"}
    tick("optimum export")
    return info


def _agreement(request: BenchRequest, rows: list[Row], size: int) -> None:
    """Each contender's noise prediction (its first timed call, same inputs) against diffusers on PyTorch (else the
    first contender that produced one): the proof that every contender computed the same model, and how closely."""
    import numpy as np

    paths = {r.contender.name: output_path(request, r, size) for r in rows if not r.error}
    outputs = {name: np.load(path) for name, path in paths.items() if path.is_file()}
    reference = "diffusers-torch" if "diffusers-torch" in outputs else next(iter(outputs), None)
    if reference is None:
        return
    want = outputs[reference].astype(np.float64)
    for row in rows:
        got = outputs.get(row.contender.name)
        if got is None or got.shape != want.shape:
            continue
        error = got.astype(np.float64) - want
        peak = float(np.abs(want).max()) or 1.0
        mse = float(np.mean(error**2))
        row.figures["vs_reference"] = {"reference": reference, "max_abs": float(np.abs(error).max()),
                                       "psnr_db": None if mse == 0 else float(10 * np.log10(peak**2 / mse))}



def _end_to_end(request: BenchRequest, row: Row, spec: dict, size: int, tick: Tick) -> None:
    """A fresh process that loads and generates once: end-to-end time and the configuration's peak RSS."""
    name = row.contender.name
    with WorkerProcess(name, worker_command(row.contender, json.dumps(spec), request.optimum_python),
                       request.work / "logs" / f"{name}-{size}-generate.log") as worker:
        try:
            # a later process: what the runtime's on-disk caches (digests, optimized graphs) save on a second start
            row.figures["load_new_process_s"] = worker.request("load")["seconds"]
            answer = worker.request("generate", steps=request.steps, prompt=PROMPT, guidance=7.5, seed=0)
            row.figures["generate_s"] = answer["seconds"]
            row.figures["peak_rss_generate_mb"] = worker.request("stats")["peak_rss_mb"]
        except WorkerError as exc:
            row.figures["generate_error"] = str(exc)
    tick(f"{name} generate")


def _loads_without_cache(contender: Contender) -> bool:
    """pocketsd on onnxruntime, end to end: the contender whose cold start the export's cache warming shortens."""
    return contender.kind == "pocketsd" and contender.engine == "onnxruntime" and contender.generates


def _first_load_no_cache(request: BenchRequest, row: Row, spec: dict, size: int, tick: Tick) -> None:
    """A fresh process with an empty cache folder (the worker's ``fresh_cache``): the first load on a machine that
    never opened the bundle (one copied there), where the export has not warmed the cache as it does for
    ``cold_load_s``."""
    name = row.contender.name
    command = worker_command(row.contender, json.dumps({**spec, "fresh_cache": True}), request.optimum_python)
    with WorkerProcess(name, command, request.work / "logs" / f"{name}-{size}-no-cache.log") as worker:
        try:
            row.figures["first_load_no_cache_s"] = worker.request("load")["seconds"]
        except WorkerError as exc:
            row.figures["first_load_no_cache_error"] = str(exc)
    tick(f"{name} load without cache")


def one_resolution(request: BenchRequest, model: str, size: int, tick: Tick) -> dict[str, Any]:
    rows = [Row(c, skipped=skip_reason(c, request.optimum_python)) for c in request.contenders]
    needed = sorted({r.contender.uses for r in rows if not r.skipped and r.contender.uses in ("chunked", "unchunked")})
    bundles = {uses: _bundle(request, model, size, uses, tick) for uses in needed}
    for row in rows:
        bundle = bundles.get(row.contender.uses, {})
        if "error" in bundle and not row.skipped:
            row.error = bundle["error"]
        elif bundle:
            row.figures.update(bundle_disk_bytes=bundle["disk_bytes"], unet_chunks=bundle["unet_chunks"])
    if not any("dims" in b for b in bundles.values()):  # the peers need the dims too: export the chunked one
        bundles["chunked"] = _bundle(request, model, size, "chunked", tick)
    if "dims" not in bundles.get("chunked", {}) and not any("dims" in b for b in bundles.values()):
        for row in (r for r in rows if not r.skipped):
            row.error = row.error or bundles["chunked"].get("error", "no bundle")
        return {"size": size, "bundles": bundles, "rows": [r.to_dict() for r in rows]}
    specs = {r.contender.name: _spec(request, r.contender, model, size, bundles) for r in rows}
    for row in (r for r in rows if r.contender.uses == "optimum" and not r.skipped):
        bundles["optimum"] = _optimum_export(request, row.contender, specs[row.contender.name], tick)
        row.error = bundles["optimum"].get("error")
    race(request, rows, specs, size, tick)
    _agreement(request, rows, size)
    for row in (r for r in rows if not r.skipped and not r.error):  # each alone, after the interleaved calls
        if request.steps > 0 and row.contender.generates:
            _end_to_end(request, row, specs[row.contender.name], size, tick)
        if _loads_without_cache(row.contender):
            _first_load_no_cache(request, row, specs[row.contender.name], size, tick)
    counted = next((b for b in bundles.values() if "dims" in b), None)  # a pocketsd bundle: same UNet as the peers
    flops = component_flops(Path(counted["path"]), "unet") if counted else None
    return {"size": size, "bundles": bundles, "unet_gflop_per_call": flops / 1e9 if flops else None,
            "rows": [r.to_dict() for r in rows]}


def _batch_one_contenders(request: BenchRequest) -> list[Contender]:
    return [c for c in request.contenders if c.kind == "pocketsd" and c.uses == "chunked"]


def batch_one(request: BenchRequest, model: str, size: int, tick: Tick) -> dict[str, Any]:
    """pocketsd's chunked UNet at batch 1 (one unguided step, e.g. guidance 1.0), where the arithmetic per weight is
    half of batch 2's: its GFLOP/s against the MatMul ceiling. The bundle is the preset's with ``unet_batch: 1``."""
    import yaml

    from pocketsd.export.preset import preset_text

    data = yaml.safe_load(preset_text(request.preset)[0])
    data.update(name=f"{data.get('name', 'preset')}-batch1", unet_batch=1)
    for split in (data.get("split") or {}).values():  # a batch-1 UNet has no second row to share a prefix with
        if isinstance(split, dict):
            split.pop("shared_prefix", None)
    preset = request.work / f"{Path(request.preset).stem}-batch1.yaml"
    preset.parent.mkdir(parents=True, exist_ok=True)
    preset.write_text(yaml.safe_dump(data))
    bundles = {"batch1": _bundle(request, model, size, "batch1", tick, preset=str(preset))}
    rows = [Row(c, skipped=skip_reason(c, request.optimum_python)) for c in _batch_one_contenders(request)]
    if "error" in bundles["batch1"]:
        for row in rows:
            row.error = row.error or bundles["batch1"]["error"]
        return {"size": size, "bundles": bundles, "rows": [r.to_dict() for r in rows]}
    bundles["chunked"] = bundles.pop("batch1")
    specs = {r.contender.name: _spec(request, r.contender, model, size, bundles) for r in rows}
    for row in rows:
        row.figures.update(unet_chunks=bundles["chunked"]["unet_chunks"])
    ceilings = _ceilings_now(request, rows, tick)  # just before and just after the calls: the box may drift
    race(request, rows, specs, size, tick, keep_outputs=False)
    for engine, ceiling in _ceilings_now(request, rows, tick).items():
        ceilings[engine] += ceiling
    flops = component_flops(Path(bundles["chunked"]["path"]), "unet")
    return {"size": size, "bundles": {"batch1": bundles["chunked"]}, "unet_gflop_per_call": flops / 1e9,
            "matmul_ceiling": ceilings, "rows": [r.to_dict() for r in rows]}


def _ceiling_engines(rows: list[Row]) -> list[str]:
    """The fp32 ceiling always; the bf16 one (OpenVINO) when a bf16 contender runs."""
    bf16 = any("bf16" in r.contender.engine and not r.skipped and not r.error for r in rows)
    return ["onnxruntime", *(["openvino-bf16"] if bf16 else [])]


def _ceilings_now(request: BenchRequest, rows: list[Row], tick: Tick) -> dict[str, list[dict[str, Any]]]:
    ceilings = {}
    for engine in _ceiling_engines(rows):
        ceilings[engine] = [matmul_ceiling(request.threads, request.matmul_size, engine=engine)]
        tick("matmul ceiling")
    return ceilings


def run_bench(request: BenchRequest, tick: Tick) -> dict[str, Any]:
    request.work.mkdir(parents=True, exist_ok=True)
    result: dict[str, Any] = {"machine": machine_info(), "model": request.model, "preset": request.preset,
                              "threads": request.threads, "calls": request.calls, "warmup": request.warmup,
                              "load_orders": request.load_orders,
                              "steps": request.steps, "contenders": [c.name for c in request.contenders]}
    result["matmul_ceiling"] = [matmul_ceiling(request.threads, request.matmul_size)]
    tick("matmul ceiling")
    model = _model_folder(request)
    if not request.reuse_bundles:  # optimum's export is made once per run, for every resolution
        shutil.rmtree(request.work / "optimum-export", ignore_errors=True)
    result["resolutions"] = [one_resolution(request, model, size, tick) for size in request.resolutions]
    if request.batch_one and request.resolutions:
        result["batch_one"] = batch_one(request, model, max(request.resolutions), tick)
    # again at the end: the machine may drift
    result["matmul_ceiling"].append(matmul_ceiling(request.threads, request.matmul_size))
    tick("matmul ceiling")
    return result


def ticks_expected(request: BenchRequest) -> int:
    timed = request.load_orders * (1 + request.calls)  # a worker's "loaded" tick and its calls, in each load order
    per_size = 2 + len(request.contenders) * (timed + (1 if request.steps else 0))
    if any(c.kind == "pocketsd" for c in request.contenders):  # at most one pace worker per peer (race.py)
        per_size += sum(c.kind != "pocketsd" for c in request.contenders) * timed
    per_size += sum(_loads_without_cache(c) for c in request.contenders)
    contenders = _batch_one_contenders(request)
    ceilings = 2 * (1 + any("bf16" in c.engine for c in contenders))
    batch_one = (1 + ceilings + len(contenders) * request.load_orders * (1 + request.calls)) if request.batch_one else 0
    return 2 + per_size * len(request.resolutions) + batch_one

