"""onnxruntime's fully optimized graphs, cached per user and machine (hashing.py's cache folder).

Opening a chunk optimizes it at ORT_ENABLE_ALL; the level-3 part of that (the NCHWc layout, which copies every conv
weight into blocks) is most of the open: on SD 1.5 cpu at 512², unet.01 (1 GB) opens in 1.67 s, 0.08 s at the level
the bundle's graph was stored at. The graph onnxruntime leaves (``optimized_model_filepath``) opens in 0.08-0.10 s,
its weights memory-mapped from the saved file, and gives the same outputs to the bit (max abs 0.0, all 4 UNet
chunks). It holds operators for this CPU's vector width and this onnxruntime version, so these are in its key, with
the sha256 of every chunk file (verified before). The first open writes it: a copy of the chunk's weights on disk
(3.4 GB for SD 1.5 cpu) and about 1.5 s per GB, once. Entries are sealed (hashing.seal): one whose files changed
since is rebuilt.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pocketsd.runtime.hashing import (
    CACHE_MIN_BYTES,
    cache_dir,
    discard,
    disk_cache_enabled,
    seal,
    sealed,
    staging_for,
    used,
)
from pocketsd.runtime.manifest import Chunk

if TYPE_CHECKING:
    from pocketsd.runtime.sessions import SessionOptions

log = logging.getLogger(__name__)

_GRAPH = "model.onnx"


@functools.cache
def _cpu_id() -> str:
    """What the optimized graph depends on: the CPU's architecture and instruction-set flags."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as info:
            flags = next((line for line in info if line.startswith(("flags", "Features"))), "")
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()} {' '.join(sorted(flags.split(':')[-1].split()))}"


def cacheable(chunk: Chunk) -> bool:
    """Large enough for its optimized graph to be cached (below CACHE_MIN_BYTES optimizing at load costs little)."""
    return sum(ref.bytes for ref in chunk.files) >= CACHE_MIN_BYTES


def graph_entry(graph: Path, chunk: Chunk, options: SessionOptions) -> Path | None:
    """Where this chunk's fully optimized graph is cached, or None where it is not: small chunks, caches turned off,
    files not verified (the key, which holds the sha256 of every chunk file, would not vouch for them)."""
    import onnxruntime as ort

    if not (options.verify_hashes and disk_cache_enabled(options.disk_cache)):
        return None
    if not cacheable(chunk):
        return None
    key = [ort.__version__, _cpu_id(), "ORT_ENABLE_ALL", graph.name, [ref.sha256 for ref in chunk.files]]
    return cache_dir() / "onnxruntime" / f"{chunk.id}-{hashlib.sha256(json.dumps(key).encode()).hexdigest()[:32]}"


def cached_session(graph: Path, session_options: Callable[[], Any], entry: Path, size: int) -> Any:
    """A session on the cached optimized graph at ``entry``; else one on ``graph`` that writes it there. Where the
    write fails (a full disk), a plain session on ``graph``."""
    import onnxruntime as ort

    providers = ["CPUExecutionProvider"]
    so = session_options()
    if sealed(entry):
        used(entry)
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # done when it was written
        try:
            return ort.InferenceSession(str(entry / _GRAPH), so, providers=providers)
        except Exception as exc:  # noqa: BLE001 - removed meanwhile by another process's prune: written again
            log.info("%s: cached graph unusable (%s)", entry.name, exc)
            so = session_options()
    try:
        staging = staging_for(entry, size)
    except OSError as exc:  # the cache folder cannot be written
        log.info("%s: optimized graph not cached (%s)", graph.name, exc)
        staging = None
    if staging is None:  # or the disk is nearly full: open as without a cache
        return ort.InferenceSession(str(graph), so, providers=providers)
    so.optimized_model_filepath = str(staging / _GRAPH)
    so.add_session_config_entry("session.optimized_model_external_initializers_file_name", f"{_GRAPH}.data")
    try:
        session = ort.InferenceSession(str(graph), so, providers=providers)
    except Exception as exc:  # noqa: BLE001 - the cache must never stop a load; a bad graph fails again below
        log.info("%s: optimized graph not cached (%s)", graph.name, exc)
        discard(staging)
        return ort.InferenceSession(str(graph), session_options(), providers=providers)
    seal(staging, entry)
    return session
