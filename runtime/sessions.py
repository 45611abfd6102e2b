"""Sessions that run one chunk file: the backend interface and its onnxruntime implementation.

A backend is registered under the chunk's manifest ``format``: how to open a chunk (``(path, chunk, options) ->
ChunkSession``) and whether its chunks may be opened and released per use (``streams``), which the ``stream`` and
``prefetch`` memory policies need (see execution.py). The CoreML backend (usable on macOS) is imported only when a
CoreML chunk is opened.
"""

from __future__ import annotations

import gc
import logging
import sys
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

import numpy as np

from pocketsd.errors import BundleError
from pocketsd.registry import Registry
from pocketsd.runtime.graph_cache import cacheable, cached_session, graph_entry
from pocketsd.runtime.hashing import (
    mismatched,
    sealed,
)
from pocketsd.runtime.manifest import Chunk, Component, Manifest
from pocketsd.runtime.onnx_refs import check_chunk_refs
from pocketsd.runtime.per_row import PerRowSession

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SessionOptions:
    threads: int = 0  # 0: the backend's default (all cores)
    low_memory: bool = False  # onnxruntime: no per-session arena nor pattern planning (onnx_session_options)
    compute_units: str = "all"  # CoreML: all | cpu_only | cpu_and_gpu | cpu_and_ne
    verify_hashes: bool = True
    # The per-user caches of hashing.py (verified digests, optimized graphs), used only for chunks
    # whose files are verified (``verify_hashes``); POCKETSD_NO_CACHE=1 also turns them off.
    disk_cache: bool = True
    engine: str = "onnxruntime"  # what runs ONNX chunks: onnxruntime | openvino | openvino-bf16 (ENGINES)
    # Opened for one use and released (memory policies stream/prefetch): nothing that only pays off over many runs,
    # i.e. no memory-pattern planning, no weight prepacking (a packed copy of every MatMul weight), and a memory
    # arena only where it lives and dies with the session (``onnx_session_options``).
    transient: bool = False


class ChunkSession(Protocol):
    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]: ...


@dataclass(frozen=True)
class Backend:
    """How chunks of one manifest format are opened, and whether they can be opened and released per use."""

    open: Callable[[Path, Chunk, SessionOptions], ChunkSession]  # (bundle folder, chunk, options)
    streams: bool
    why_no_stream: str = ""  # where ``streams`` is false: why, for the error message


BACKENDS: Registry[Backend] = Registry("backend", BundleError)


def onnx_session_options(options: SessionOptions, chunk: Chunk | None = None) -> Any:
    """The ``onnxruntime.SessionOptions`` a chunk is opened with (memory settings from ``options`` and the chunk's
    recorded largest tensor, see below)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = options.threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    # Each session has a thread pool of its own, whose threads keep spinning for a while after a run, waiting for
    # more work. In a chain the next run is another session's, and those spinning threads took the cores from it:
    # SD 1.5 at 256², UNet batch 2, one process, 12 calls interleaved, 4 chunks took 1.071× the time of 1 chunk;
    # with the spin stopped as each run returns (it still spins within a run), 1.026×, and the unchunked session
    # kept its speed (1.002×). Spinning off altogether: 1.050×, and the unchunked session 2 % slower. A process-wide
    # thread pool did as well (1.014×), but onnxruntime then refuses every session in the process (the exporter's,
    # a user's) that keeps threads of its own.
    so.add_session_config_entry("session.force_spinning_stop", "1")
    # No memory-pattern plan, in any session. The plan is made from the first two runs and then kept as one block per
    # session, beside what the arena already holds from those runs: resident chunk sessions each kept both. SD 1.5
    # cpu at 512², batch-2 UNet calls in one process (two rounds, 8 calls each): with the plan the 5 chunk sessions
    # peaked at 11.1 GB, their first two calls took 6.3-13.4 s, then 3.83-4.01 s; without it 7.4 GB, 5.4-7.8 s and
    # 3.81-4.01 s; the unchunked session 7.4 GB with it, 5.9 GB without, at the same speed. A 4-step generation
    # from the chunked bundle: 33.6 s and 12.6 GB with the plan, 25.2 s and 8.9 GB without. The arena itself stays:
    # without it (tensors from malloc) the UNet call took 5.0-5.7 s.
    so.enable_mem_pattern = False
    if options.low_memory or options.transient:
        so.enable_cpu_mem_arena = False
    if options.transient:
        so.add_session_config_entry("session.disable_prepacking", "1")
        if _largest_activation_within(chunk, ARENA_MAX_ACTIVATION_BYTES):
            so.enable_mem_reuse = False
            so.enable_cpu_mem_arena = True
    elif options.low_memory and _largest_activation_within(chunk, RESIDENT_NO_REUSE_MAX_ACTIVATION_BYTES):
        so.enable_mem_reuse = False
        so.enable_cpu_mem_arena = True
        so.add_session_config_entry("session.use_env_allocators", "1")
        _register_shared_arena()
    return so


def _uses_shared_arena(so: Any) -> bool:
    try:
        return so.get_session_config_entry("session.use_env_allocators") == "1"
    except RuntimeError:  # never set
        return False


_SHARED_ARENA = threading.Lock()
_shared_arena_registered = False


def _register_shared_arena() -> None:
    """One onnxruntime memory arena for the whole process, which resident low-memory sessions share (see
    RESIDENT_NO_REUSE_MAX_ACTIVATION_BYTES). It grows by what is asked (no doubling), and its sessions shrink it
    after each run: it holds what the running chunk needs, not each chunk's own peak."""
    global _shared_arena_registered
    import onnxruntime as ort

    with _SHARED_ARENA:
        if _shared_arena_registered:
            return
        config = ort.OrtArenaCfg({"max_mem": 0, "arena_extend_strategy": 1, "initial_chunk_size_bytes": 1 << 20,
                                  "max_dead_bytes_per_chunk": -1, "initial_growth_chunk_size_bytes": 1 << 20})
        info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
        ort.create_and_register_allocator(info, config)
        _shared_arena_registered = True


class OnnxSession:
    def __init__(self, path: Path, options: SessionOptions, chunk: Chunk | None = None,
                 graph_cache: Path | None = None) -> None:
        """``graph_cache``: the cache entry of this chunk's fully optimized graph (``graph_entry``): opened if it is
        there, else written by this open."""
        import onnxruntime as ort

        so = onnx_session_options(options, chunk)
        # From a path, never from bytes: onnxruntime then reads the file itself (and memory-maps external data)
        # instead of holding a second copy of every weight for the duration of the load.
        if graph_cache is None:
            self._session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        else:
            size = chunk.weight_bytes if chunk is not None else 0
            self._session = cached_session(path, lambda: onnx_session_options(options, chunk), graph_cache, size)
        self._outputs = [o.name for o in self._session.get_outputs()]
        # An output array shares its buffer with onnxruntime, and a buffer from the arena keeps the whole arena
        # alive: the UNet's skip connections would pin every early chunk's arena until the last chunk. A copy
        # (a few MB) lets each arena go with its session.
        self._own_outputs = options.transient and so.enable_cpu_mem_arena
        # A session on the shared arena gives the arena's free regions back after each run, so that one component's
        # leftovers (the UNet's) do not stay under the next one's peak (the VAE decode's); see
        # RESIDENT_NO_REUSE_MAX_ACTIVATION_BYTES for the figures.
        self._run_options = None
        if _uses_shared_arena(so):
            self._run_options = ort.RunOptions()
            self._run_options.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self._session.run(self._outputs, feeds, self._run_options)
        if self._own_outputs:
            outputs = [np.array(o, copy=True) for o in outputs]
        return dict(zip(self._outputs, outputs))


# A transient session's allocation, measured on SD 1.5 at 512² (one chunk, alone, above its inputs):
# - onnxruntime's reuse plan gives each freed buffer to a later tensor of the same size and keeps it allocated in
#   between: the last UNet chunk held 150 MiB where at most 46 MiB were ever live (+174 MB, 0.80 s);
# - without the plan every tensor is freed at its last use, and a per-session arena (gone with the session) keeps
#   those allocations cheap: +108 MB, 0.65 s. Without plan or arena every tensor is a fresh mmap: +69 MB, 1.6 s;
# - the arena splits and keeps its regions, so where single tensors are large it holds more than the plan: the VAE
#   decoder tile (36 MiB tensors) +175 MB with the plan, +270 MB with the arena.
# The exporter records each chunk's largest tensor; up to this size the arena is used.
ARENA_MAX_ACTIVATION_BYTES = 16 * 2**20
# Resident sessions under ``low_memory`` where tensors are at most this large drop the reuse plan and share one
# process-wide arena (``_register_shared_arena``); larger ones keep the plan and get no arena. Measured on SD 1.5
# cpu-int8 at 512² (batch-2 UNet chunks of 5-30 MiB tensors, VAE tiles of 31 MiB), 2 steps, three runs each:
# - no arena, plan on: 1,633 MB at 20 steps (each resident session's plan keeps its own buffers);
# - no arena, no plan: every tensor from malloc, and glibc's heap fragments unpredictably: 1,413-1,595 MB between
#   runs of the same bundle (1,750 MB once at 20 steps);
# - one shared arena, no plan: 1,261 MB through the UNet and 1,444 MB with the decode, the same in every run, with
#   an eighth of the page faults and no loss of time (1,510 MB at 20 steps in a `generate` process);
# - and the arena shrunk after each run (OnnxSession): 1,261 MB through the UNet and 1,336 MB with the decode, at
#   the same speed (the freed regions are faulted in again: 4.4 GB of faults instead of 0.4).
# The VAE tile at tile 32 (64 MiB tensors) keeps its plan.
RESIDENT_NO_REUSE_MAX_ACTIVATION_BYTES = 32 * 2**20


def _largest_activation_within(chunk: Chunk | None, limit: int) -> bool:
    largest = chunk.extra.get("largest_activation_bytes") if chunk is not None else None
    return isinstance(largest, int) and 0 < largest <= limit


ORT_ENGINE = "onnxruntime"
OPENVINO_BF16 = "openvino-bf16"
ENGINES = (ORT_ENGINE, "openvino", OPENVINO_BF16)  # for ONNX chunks; CoreML chunks run on CoreML


def check_engine(name: str, formats: Iterable[str] = ()) -> str:
    """Refuse, before any work, an unknown or uninstalled engine, or another engine than onnxruntime for a bundle
    with chunks of other ``formats`` than onnx (CoreML chunks run on CoreML)."""
    if name not in ENGINES:
        raise BundleError(f"unknown engine {name!r}", f"choose one of: {', '.join(ENGINES)}", code="engine")
    if name == ORT_ENGINE:
        return name
    other = sorted(set(formats) - {"onnx"})
    if other:
        raise BundleError(f"engine {name!r} runs ONNX chunks, and this bundle has {', '.join(other)} chunks",
                          "run it without --engine, or export the model with an onnx preset", code="engine")
    from pocketsd.runtime.openvino_session import check_bf16, load_openvino

    load_openvino()  # a missing package is named here, not at the first chunk
    if name == OPENVINO_BF16:
        check_bf16()
    return name


def onnx_graph(bundle_dir: Path, chunk: Chunk) -> Path:
    """The graph onnxruntime opens: the chunk's optimized graph if this onnxruntime version wrote it, else the chunk's
    own (which onnxruntime then optimizes at load, as for any model)."""
    import onnxruntime as ort

    optimized = chunk.optimized
    if optimized is not None and optimized.engine == ORT_ENGINE and optimized.version == ort.__version__:
        return bundle_dir / optimized.file.path
    if optimized is not None:
        log.debug("%s: optimized graph is for %s %s, this is %s: optimizing at load", chunk.id, optimized.engine,
                  optimized.version, ort.__version__)
    return bundle_dir / chunk.file.path


def _onnx_open(bundle_dir: Path, chunk: Chunk, options: SessionOptions) -> ChunkSession:
    if options.engine != ORT_ENGINE:
        from pocketsd.runtime.openvino_session import OpenVinoSession

        return OpenVinoSession.chunk(bundle_dir / chunk.file.path, chunk, options.threads,
                                     bf16=options.engine == OPENVINO_BF16)
    graph = onnx_graph(bundle_dir, chunk)
    return OnnxSession(graph, options, chunk, graph_entry(graph, chunk, options))


def _coreml_open(bundle_dir: Path, chunk: Chunk, options: SessionOptions) -> ChunkSession:
    from pocketsd.runtime.coreml_session import CoreMLSession  # usable on macOS only; a clear error elsewhere

    return CoreMLSession(bundle_dir / chunk.file.path, chunk, options.compute_units)


BACKENDS.register("onnx")(Backend(_onnx_open, streams=True))
# On macOS an MLModel can be loaded per use like an onnxruntime session; elsewhere CoreML cannot run at all.
BACKENDS.register("mlpackage")(Backend(_coreml_open, streams=sys.platform == "darwin",
                                       why_no_stream="CoreML models run only on macOS"))


def verify_chunk(bundle_dir: Path, chunk: Chunk, disk_cache: bool = True) -> None:
    """Check a chunk's files against the manifest's sha256: each file is hashed once per process while unchanged,
    and with ``disk_cache`` not at all where an earlier process verified this very file (hashing.py)."""
    for ref in chunk.files:
        path = bundle_dir / ref.path
        if not path.exists():
            raise BundleError(f"{path} is missing (chunk {chunk.id})", "re-export or re-copy the bundle")
    bad = mismatched([(bundle_dir / ref.path, ref.sha256) for ref in chunk.files], disk_cache)
    if bad:
        raise BundleError(f"{bad[0]} does not match its sha256 in the manifest (chunk {chunk.id}): the file is "
                          "corrupted or was changed", "re-export or re-copy the bundle")
    check_chunk_refs(bundle_dir, chunk)


def open_workers(bundle_dir: Path, options: SessionOptions) -> Callable[[Sequence[Chunk]], int]:
    """How many of a component's chunks to open at once (execution.ResidentPolicy.prepare), given those chunks.

    OpenVINO: two. It compiles two in less time than one after the other (SD 1.5 cpu at 512², the UNet's four
    chunks, no caches, alternated: 3.23-3.29 s vs 4.50-4.97 s); resident OpenVINO components of several chunks are
    now compiled as one model instead (open_component).

    onnxruntime: ``CACHED_OPEN_WORKERS`` where every chunk opens from its cached optimized graph (or is too small to
    be cached), else one. Optimizing at load, two sessions took longer than one after the other (8.9-10.5 s vs
    3.8-6.7 s for every chunk: both build their weights and fault the same process's memory at once). From the
    cache an open is mostly reading the graph's weights and packing some of them, which overlaps well:
    SD 1.5 cpu at 512², a fresh process loading the whole bundle with its cache files evicted from the page cache
    first (as after a long run of other work), five rounds interleaved: 1.94-2.60 s (median 2.08) one at a time,
    1.39-1.56 s (1.46) two at a time, 1.12-1.44 s (1.30) three at a time, on 2 cores; the same peak RSS."""

    def workers(chunks: Sequence[Chunk]) -> int:
        if options.engine != ORT_ENGINE:
            return 2
        return CACHED_OPEN_WORKERS if all(_cheap_to_open(bundle_dir, c, options) for c in chunks) else 1

    return workers


CACHED_OPEN_WORKERS = 3


def _cheap_to_open(bundle_dir: Path, chunk: Chunk, options: SessionOptions) -> bool:
    """An ONNX chunk onnxruntime opens without optimizing a large graph: its optimized graph is cached, or it is
    smaller than anything the cache keeps."""
    if chunk.format != "onnx":
        return False
    if not cacheable(chunk):
        return True
    entry = graph_entry(onnx_graph(bundle_dir, chunk), chunk, options)
    return entry is not None and sealed(entry)


def verify_in_background(bundle_dir: Path, chunks: Sequence[Chunk], options: SessionOptions) -> None:
    """Check ``chunks``' files on a background thread, in order, so that each chunk's open finds its files checked
    (or waits for the hash under way) instead of hashing them itself: hashing then overlaps the opens. On SD 1.5
    cpu without the digest cache (2.3 s of hashing), opening the text encoder, UNet and VAE decoder took 10.1-11.5 s
    with the hashing in line and 6.6-7.5 s with it ahead. A failure here is left for the chunk's own open to raise."""
    if not options.verify_hashes or not chunks:
        return

    def verify_all() -> None:
        for chunk in chunks:
            try:
                verify_chunk(bundle_dir, chunk, options.disk_cache)
            except Exception as exc:  # noqa: BLE001 - raised again, in the caller's thread, when the chunk opens
                log.debug("%s: %s (left for its open)", chunk.id, exc)

    threading.Thread(target=verify_all, name="pocketsd-verify", daemon=True).start()


def open_chunk(bundle_dir: Path, chunk: Chunk, options: SessionOptions) -> ChunkSession:
    """Verify a chunk's files against the manifest, then open it with the backend for its format."""
    if options.verify_hashes:
        verify_chunk(bundle_dir, chunk, options.disk_cache)
    else:  # unhashed files are still kept inside the bundle
        check_chunk_refs(bundle_dir, chunk)
    log.debug("opening %s (%s)", chunk.id, chunk.file.path)
    session = BACKENDS.get(chunk.format).open(bundle_dir, chunk, options)
    return PerRowSession(session, chunk) if chunk.per_row else session


def open_component(bundle_dir: Path, component: Component, options: SessionOptions) -> ChunkSession | None:
    """One session for all of ``component``'s chunks, where the engine can join them into one model (OpenVINO:
    openvino_session.merged_model, after every chunk's files are verified); None where it cannot (onnxruntime, other
    formats) or need not (one chunk): the component's chunks are then opened one by one. Per-row chunks that take
    only component inputs (a shared prefix, runtime/per_row.py) stay sessions of their own, run before the rest's
    joined model (``PrefixedSession``)."""
    chunks = component.chunks
    if options.engine == ORT_ENGINE or len(chunks) < 2 or any(c.format != "onnx" for c in chunks):
        return None
    for chunk in chunks:
        if options.verify_hashes:
            verify_chunk(bundle_dir, chunk, options.disk_cache)
        else:
            check_chunk_refs(bundle_dir, chunk)
    from pocketsd.runtime.openvino_session import OpenVinoSession, PrefixedSession

    bf16 = options.engine == OPENVINO_BF16
    rows = [c for c in chunks if c.per_row]
    if not rows:
        log.debug("opening %s's %d chunks as one model", component.id, len(chunks))
        return OpenVinoSession.component(bundle_dir, component, options.threads, bf16=bf16)
    if any(not (spec.source or "").startswith("input:") for chunk in rows for spec in chunk.inputs):
        return None  # a per-row chunk after others: not a prefix, chained chunk by chunk
    rest = replace(component, chunks=tuple(c for c in chunks if not c.per_row))
    log.debug("opening %s's %d per-row chunk(s) and its %d others as one model", component.id, len(rows),
              len(rest.chunks))
    prefix = [(chunk, open_chunk(bundle_dir, chunk, options)) for chunk in rows]
    return PrefixedSession(prefix, OpenVinoSession.component(bundle_dir, rest, options.threads, bf16=bf16))


def graph_cache_chunks(bundle_dir: Path, manifest: Manifest, options: SessionOptions = SessionOptions()) -> list[Chunk]:
    """The ONNX chunks whose optimized graph onnxruntime's cache keeps (``graph_entry``: caches on, hashes
    verified, chunk large enough)."""
    return [chunk for component in manifest.components.values() for chunk in component.chunks
            if chunk.format == "onnx" and graph_entry(onnx_graph(bundle_dir, chunk), chunk, options) is not None]


def warm_graph_cache(bundle_dir: Path, manifest: Manifest, options: SessionOptions = SessionOptions(),
                     on_chunk: Callable[[Chunk], None] = lambda _chunk: None) -> int:
    """Open each of ``graph_cache_chunks`` once on onnxruntime, as a load does, so that its optimized graph is cached
    now and not at the first load (SD 1.5 cpu at 512²: 22.6 s cold, 2.9 s with the cache). Run on the bundle in its
    final folder: the digests verified on the way are recorded for those paths. One session at a time, so memory
    stays that of the largest chunk. Returns how many chunks' graphs are in the cache afterwards."""
    options = replace(options, engine=ORT_ENGINE)
    cached = 0
    for chunk in graph_cache_chunks(bundle_dir, manifest, options):
        session = open_chunk(bundle_dir, chunk, options)
        del session  # its arena and weights go before the next chunk's
        gc.collect()
        entry = graph_entry(onnx_graph(bundle_dir, chunk), chunk, options)
        cached += entry is not None and sealed(entry)
        on_chunk(chunk)
    return cached
