"""How ``pocketsd bench`` talks to a contender's worker process, and what every worker feeds the UNet.

Each contender (pocketsd on a bundle, diffusers on PyTorch, a plain onnxruntime or OpenVINO session, optimum) runs in
its own process, so its peak RSS is its own and a crash or a missing package costs only that contender. The bench
sends one JSON object per line on the worker's stdin and reads one JSON object per line from its stdout:

    {"op": "load"}                      → {"ok": true, "seconds": 4.2}      (again: a warm reload in the same process)
    {"op": "call"}                      → {"ok": true, "seconds": 2.6, "chunks": [{"id": "unet.00", "seconds": …}]}
    {"op": "call", "save": "out.npy"}   → the same, and the noise prediction written to out.npy
    {"op": "generate", "steps": 20, "prompt": "…", "guidance": 7.5, "seed": 0}  → {"ok": true, "seconds": 61.0}
    {"op": "stats"}                     → {"ok": true, "peak_rss_mb": …, "rss_mb": …}
    {"op": "info"}                      → {"ok": true, "versions": {…}, "describe": "…"}
    {"op": "quit"}

A failure answers ``{"ok": false, "error": "<one line>"}`` and the worker goes on serving. Times are measured inside
the worker, so they exclude the pipe. This module imports only the standard library and numpy: workers that run in
another Python environment (optimum's, whose pins may clash with ours) import it by path, and it then loads the
tensor names from pocketsd/contract.py (standard library only) by path too.
"""

from __future__ import annotations

import importlib.util
import json
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np


def _contract() -> Any:
    """pocketsd.contract, imported, or where pocketsd is not installed loaded from its file beside this folder
    (``pocketsd/contract.py`` in the source tree, ``contract.py`` one level up once installed)."""
    try:
        import pocketsd.contract as contract

        return contract
    except ImportError:
        here = Path(__file__).resolve().parent
        path = next(p for p in (here.parent / "pocketsd" / "contract.py", here.parent / "contract.py") if p.exists())
        spec = importlib.util.spec_from_file_location("pocketsd_contract", path)
        module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
        sys.modules[spec.name] = module  # type: ignore[union-attr]  # dataclasses look their module up here
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        return module


UNET_IO = _contract().UNET_IO
Handler = Callable[[dict[str, Any]], dict[str, Any]]

PROMPT = "a lighthouse on a cliff at sunset, oil painting"
TIMESTEP = 500


def unet_inputs(latent_height: int, latent_width: int, batch: int = 2, latent_channels: int = 4,
                text_length: int = 77, text_hidden: int = 768, seed: int = 0) -> dict[str, np.ndarray]:
    """The inputs of one benchmarked UNet call, the same numbers in every worker, as in a guided step: one seeded
    latent in every row (a guided step runs the same latents with the negative and the positive text), the timestep
    ``TIMESTEP`` for every row (float32: a worker casts it to what its model takes) and seeded text states, one per
    row (their values do not change the time; their shapes do). A bundle with a shared prefix (runtime/per_row.py)
    runs that prefix once for the equal rows, as it does in a generation; the peers run it for each row."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((1, latent_channels, latent_height, latent_width), dtype=np.float32)
    return {UNET_IO.sample: np.repeat(latent, batch, axis=0),
            UNET_IO.timestep: np.full((batch,), TIMESTEP, dtype=np.float32),
            UNET_IO.encoder_hidden_states: rng.standard_normal((batch, text_length, text_hidden), dtype=np.float32)}


def memory_mb() -> dict[str, float]:
    """This process's peak and current resident memory (VmHWM, VmRSS), in MB."""
    fields: dict[str, float] = {}
    try:
        with open("/proc/self/status") as status:
            for line in status:
                key, _, value = line.partition(":")
                if key in ("VmHWM", "VmRSS"):
                    fields[key] = int(value.split()[0]) * 1024 / 1e6
    except OSError:  # not Linux: getrusage's peak (bytes on macOS)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        fields["VmHWM"] = peak / 1e6 if sys.platform == "darwin" else peak * 1024 / 1e6
    return {"peak_rss_mb": round(fields.get("VmHWM", 0.0), 1), "rss_mb": round(fields.get("VmRSS", 0.0), 1)}


def timed(run: Callable[[], Any]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def timed_call(run: Callable[[], Any], request: dict[str, Any],
               output: Callable[[Any], Any] = lambda result: result) -> dict[str, Any]:
    """Time one UNet call; with ``"save": PATH`` in the request, also write its output (``output(result)``, the
    noise prediction) there as float32 .npy, outside the timing, for the bench to compare contenders."""
    start = time.perf_counter()
    result = run()
    answer: dict[str, Any] = {"seconds": time.perf_counter() - start}
    if request.get("save"):
        np.save(request["save"], np.asarray(output(result), dtype=np.float32))
    return answer


def one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or "(no message)"
    return f"{type(exc).__name__}: {text[:400]}"


def serve(handlers: dict[str, Handler]) -> int:
    """Answer requests until ``quit`` or end of input. Anything a library prints goes to stderr: stdout carries only
    the answers."""
    answers = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    handlers = {"stats": lambda _request: memory_mb(), **handlers}
    for line in sys.stdin:
        request = json.loads(line)
        op = request.get("op")
        if op == "quit":
            break
        handler = handlers.get(op)
        try:
            if handler is None:
                raise ValueError(f"unknown op {op!r}")
            answer = {"ok": True, **handler(request)}
        except Exception as exc:  # reported to the bench as one line; the worker stays up for the next request
            answer = {"ok": False, "error": one_line(exc)}
        answers.write(json.dumps(answer) + "\n")
    return 0
