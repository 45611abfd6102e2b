"""When chunk sessions are opened and released: the memory policy, the same for every backend.

Chunking a model saves memory only if the chunks are not all alive at once. A policy owns every chunk session of a
pipeline (all components share one policy) and runs chunks on request; the chunk chain (chain.py) never holds a
session itself.

- ``resident`` (the default): each chunk is opened once and kept. Peak memory = all weights; no reopen cost. Where
  the engine can join a component's chunks into one model (OpenVINO: openvino_session.merged_model), the component
  is opened as one session instead, and the cuts cost nothing.
- ``stream``: a chunk is opened, run and released, in every component, so at most one chunk session is alive in
  the whole process. Peak memory = the largest chunk (plus activations); every use pays an open.
- ``prefetch``: as ``stream``, but while a chunk runs the next one is opened on a background thread, so at most two
  are alive and the open overlaps the run. "Next" is the next chunk of the same component; after a component's
  last chunk, its first chunk again (the UNet's next step) unless the pipeline hints otherwise (``hint``).

Opening is per use under stream/prefetch, so several rows through one component (a batch-1 UNet under guidance) run
chunk-major (``chunk_major``): every chunk is opened once and runs all rows before the next chunk.
"""

from __future__ import annotations

import logging
import os
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from pocketsd.errors import BundleError, GenerateError, UserError
from pocketsd.heap import return_freed_memory_to_the_system
from pocketsd.heap import trimmer as _heap_trimmer
from pocketsd.runtime.manifest import Chunk, Component, Manifest
from pocketsd.runtime.sessions import BACKENDS, ChunkSession, SessionOptions, open_chunk, open_component

log = logging.getLogger(__name__)

Opener = Callable[[Chunk], ChunkSession]
WholeOpener = Callable[[Component], "ChunkSession | None"]  # a session for a whole component, where one can be made
OpenWorkers = Callable[[Sequence[Chunk]], int]  # how many of these chunks (one component's) to open at once
Feeds = dict[str, np.ndarray]
Outputs = dict[str, np.ndarray]


def chunk_opener(bundle_dir: str | Path, options: SessionOptions) -> Opener:
    """Open (after verifying its files once per process) one chunk of the bundle at ``bundle_dir``."""
    return partial(open_chunk, Path(bundle_dir), options=options)


def component_opener(bundle_dir: str | Path, options: SessionOptions) -> WholeOpener:
    """One session for a whole component of the bundle at ``bundle_dir``, where its engine can join the chunks
    (sessions.open_component), else None."""
    return partial(open_component, Path(bundle_dir), options=options)


class ExecutionPolicy:
    """Resident, stream and prefetch differ only in when sessions are opened and released (``run``)."""

    name = ""
    chunk_major = False  # opening is expensive: run every row through a chunk before the next chunk

    def __init__(self, opener: Opener) -> None:
        self._open = opener
        self._hinted = False
        self._hint: Chunk | None = None

    def prepare(self, component: Component) -> None:
        """A component's runner is being made: resident opens (and verifies) its chunks now, the others on use."""

    def run_whole(self, component: Component, feeds: Sequence[Feeds]) -> list[Outputs] | None:
        """Run all of ``component`` once per feed dict (its inputs in, its outputs out) where this policy holds one
        session for the whole of it; else None, and the runner chains the chunks."""
        return None

    def run(self, chunk: Chunk, following: Chunk | None, feeds: Sequence[Feeds]) -> list[Outputs]:
        """Run ``chunk`` once per feed dict. ``following`` is the chunk the pipeline will need next, if known."""
        raise NotImplementedError

    def hint(self, chunk: Chunk | None) -> None:
        """After the last chunk of the component that runs next, the pipeline needs ``chunk`` (None: nothing)."""
        self._hinted, self._hint = True, chunk

    def after_last(self, first: Chunk) -> Chunk | None:
        """What follows a component's last chunk: the pipeline's hint (used once), else the component's ``first``."""
        if self._hinted:
            self._hinted = False
            return self._hint
        return first

    def release(self) -> None:
        """Drop what should not outlive one generation (a prefetched session). Resident keeps its sessions."""

    def close(self) -> None:
        self.release()


class ResidentPolicy(ExecutionPolicy):
    name = "resident"

    def __init__(self, opener: Opener, low_memory: bool = False, open_workers: OpenWorkers = lambda _chunks: 1,
                 whole: WholeOpener | None = None) -> None:
        super().__init__(opener)
        self._sessions: dict[str, ChunkSession] = {}
        self._whole = whole  # one session per component where the engine joins chunks (OpenVINO), else chunk by chunk
        self._wholes: dict[str, ChunkSession] = {}
        self._open_workers = open_workers  # chunks of one component opened at once (``prepare``)
        # Sessions without a memory arena (``low_memory``) allocate their tensors with malloc, and glibc keeps freed
        # heap pages, fragmented between live blocks, so the VAE decode came on top of the UNet's leftovers: SD 1.5
        # cpu-int8 at 512² peaked at 1,469 MB (3 steps), 1,394 MB with a trim after each chunk run, at no cost in
        # time (4.9 → 4.7 s per step). The stream policy's fixed thresholds would make every tensor a fresh mapping
        # here (9.4 s per step), so only the trim.
        self._trim = _heap_trimmer() if low_memory else (lambda: None)

    def prepare(self, component: Component) -> None:
        """Open the whole component as one session where the engine can (``whole``); else every chunk not yet open:
        in order, or ``open_workers`` at a time (see ``make_policy``)."""
        if component.id in self._wholes:
            return
        if self._whole is not None:
            session = self._whole(component)
            if session is not None:
                self._wholes[component.id] = session
                return
        missing = [c for c in component.chunks if c.id not in self._sessions]
        workers = self._open_workers(missing)
        if workers <= 1 or len(missing) <= 1:
            for chunk in missing:
                self._session(chunk)
            return
        with ThreadPoolExecutor(workers, thread_name_prefix="pocketsd-open") as pool:
            for chunk, session in zip(missing, pool.map(self._open, missing)):  # the first error is raised here
                self._sessions[chunk.id] = session

    def _session(self, chunk: Chunk) -> ChunkSession:
        if chunk.id not in self._sessions:
            self._sessions[chunk.id] = self._open(chunk)
        return self._sessions[chunk.id]

    def run(self, chunk: Chunk, following: Chunk | None, feeds: Sequence[Feeds]) -> list[Outputs]:
        session = self._session(chunk)
        outputs = [session.run(f) for f in feeds]
        self._trim()
        return outputs

    def run_whole(self, component: Component, feeds: Sequence[Feeds]) -> list[Outputs] | None:
        session = self._wholes.get(component.id)
        if session is None:
            return None
        outputs = [session.run(f) for f in feeds]
        self._trim()
        return outputs

    def close(self) -> None:
        self._sessions.clear()
        self._wholes.clear()


def _return_freed_memory_to_the_system() -> Callable[[], None]:
    """With its memory arena off, onnxruntime allocates with malloc, and glibc keeps what a closed chunk freed
    (pocketsd/heap.py): measured on SD 1.5 at 512², 295 MB stayed resident between chunks with one chunk open at a
    time. A fixed threshold plus ``malloc_trim`` after each chunk brought that to 135 MB and the whole generate's
    peak from 572 MB to about 410 MB."""
    return return_freed_memory_to_the_system()


class StreamPolicy(ExecutionPolicy):
    name = "stream"
    chunk_major = True

    def __init__(self, opener: Opener) -> None:
        super().__init__(opener)
        self._trim = _return_freed_memory_to_the_system()

    def run(self, chunk: Chunk, following: Chunk | None, feeds: Sequence[Feeds]) -> list[Outputs]:
        session = self._open(chunk)  # the only reference: released when this call returns
        outputs = [session.run(f) for f in feeds]
        del session
        self._trim()
        return outputs


def _ready(session: ChunkSession) -> Future[ChunkSession]:
    done: Future[ChunkSession] = Future()
    done.set_result(session)
    return done


class PrefetchPolicy(ExecutionPolicy):
    name = "prefetch"
    chunk_major = True

    def __init__(self, opener: Opener) -> None:
        super().__init__(opener)
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pocketsd-prefetch")
        self._next: tuple[str, Future[ChunkSession]] | None = None
        self._trim = _return_freed_memory_to_the_system()

    def _take(self, chunk: Chunk) -> ChunkSession:
        """The prefetched session if it is ``chunk``'s (its open error, if any, is raised here: on first use), else
        one opened now, after a wrong guess has been waited for and dropped (at most two alive, never three)."""
        pending, self._next = self._next, None
        if pending is not None:
            chunk_id, future = pending
            if chunk_id == chunk.id:
                return future.result()
            log.debug("prefetched %s, but %s is needed: dropping it", chunk_id, chunk.id)
            future.exception()  # wait; an error is raised again if that chunk is used
        return self._open(chunk)

    def run(self, chunk: Chunk, following: Chunk | None, feeds: Sequence[Feeds]) -> list[Outputs]:
        session = self._take(chunk)
        if following is not None and following.id == chunk.id:  # needed again next (a one-chunk UNet): keep it
            self._next = (chunk.id, _ready(session))
        elif following is not None:
            self._next = (following.id, self._pool.submit(self._open, following))
        outputs = [session.run(f) for f in feeds]
        del session
        self._trim()
        return outputs

    def release(self) -> None:
        pending, self._next = self._next, None
        if pending is not None:
            pending[1].exception()  # let a background open finish before its session is dropped

    def close(self) -> None:
        self.release()
        self._pool.shutdown(wait=True)


POLICIES: dict[str, type[ExecutionPolicy]] = {p.name: p for p in (ResidentPolicy, StreamPolicy, PrefetchPolicy)}
MEMORY_POLICIES = tuple(POLICIES)  # resident (the default), stream, prefetch


def check_memory(name: str, error: type[UserError] = GenerateError) -> str:
    if name not in POLICIES:
        raise error(f"unknown memory policy {name!r}", f"choose one of: {', '.join(MEMORY_POLICIES)}")
    return name


# Resident memory on onnxruntime runs at about twice a bundle's weights and more (each open session keeps its own
# arena; at 512² SD 1.5's 3.4 GB UNet peaked at 12.8 GB, 9.4 GB since sessions keep no memory pattern). A bundle
# whose weights alone exceed half of the memory available is streamed unless the caller asked for resident: SDXL's
# `cpu` bundle at 1024² (13 GB of weights) was killed by the kernel on a 24 GB box when resident, and ran in 4.5 GB
# streamed.
RESIDENT_FACTOR = 2


def available_memory() -> int | None:
    """Bytes of memory available for new work (Linux ``MemAvailable``, else physical memory); None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return None


def default_memory(manifest: Manifest, preset_memory: str) -> str:
    """The policy a bundle runs under when the caller named none: its preset's, except that a resident bundle too
    large for this machine (``RESIDENT_FACTOR``) is streamed, with a warning saying so."""
    if preset_memory != "resident":
        return preset_memory
    weights = sum(c.weight_bytes for comp in manifest.components.values() for c in comp.chunks)
    available = available_memory()
    if available is None or RESIDENT_FACTOR * weights <= available:
        return preset_memory
    log.warning("keeping every chunk of this bundle open needs about %.1f GB (its weights: %.1f GB); %.1f GB are "
                "available: streaming the chunks instead (pass --memory resident to insist)",
                RESIDENT_FACTOR * weights / 1e9, weights / 1e9, available / 1e9)
    try:
        check_streamable(manifest, "stream")
    except UserError:  # CoreML chunks stream on no platform yet: resident is all there is
        return preset_memory
    return "stream"


def make_policy(name: str, opener: Opener, low_memory: bool = False, open_workers: OpenWorkers = lambda _chunks: 1,
                whole: WholeOpener | None = None) -> ExecutionPolicy:
    """The named policy; ``low_memory`` (sessions without a memory arena) makes a resident one trim the C heap, and
    a resident one opens a component's chunks ``open_workers(chunks)`` at a time (sessions.open_workers: the
    engine's and the graph cache's choice, pipeline.py), or the whole component as one session where ``whole``
    makes one."""
    policy = POLICIES[check_memory(name)]
    return ResidentPolicy(opener, low_memory, open_workers, whole) if policy is ResidentPolicy else policy(opener)


def check_streamable(manifest: Manifest, memory: str) -> None:
    """Refuse, before any work, a per-use policy on a bundle whose backend cannot open and release chunks per use."""
    if memory == "resident":
        return
    for component in manifest.components.values():
        for chunk in component.chunks:
            backend = BACKENDS.get(chunk.format)
            if not backend.streams:
                why = f" ({backend.why_no_stream})" if backend.why_no_stream else ""
                raise BundleError(
                    f"memory policy {memory!r} opens and releases each chunk per use, which {chunk.format!r} chunks "
                    f"cannot do on {sys.platform}{why}",
                    "export the model with an onnx preset (e.g. --preset cpu-lowmem) to run it here")
