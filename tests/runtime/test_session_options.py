"""onnxruntime session options per chunk: where a session gets an arena, a reuse plan or the shared arena, that
no session keeps a memory pattern or spins after a run, and that streamed sessions hand out arrays of their own."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pocketsd.runtime.manifest import Chunk, FileRef, load_manifest
from pocketsd.runtime.pipeline import Pipeline
from pocketsd.runtime.sessions import (
    ARENA_MAX_ACTIVATION_BYTES,
    RESIDENT_NO_REUSE_MAX_ACTIVATION_BYTES,
    SessionOptions,
    _uses_shared_arena,
    onnx_session_options,
    open_chunk,
)
from tests.runtime.test_execution import PREFIX_KERNELS_MAX_ABS, generate

pytestmark = pytest.mark.export  # the tiny bundle is made by the exporter



def _with_largest(value: object) -> Chunk:
    extra = {} if value is None else {"largest_activation_bytes": value}
    return Chunk("c", "onnx", FileRef("c.onnx", "0" * 64, 1), 0, (), (), (), extra=extra)


def _memory_settings(options: SessionOptions, largest: object) -> tuple[bool, bool, bool, bool]:
    so = onnx_session_options(options, _with_largest(largest))
    shared = _uses_shared_arena(so)
    return so.enable_cpu_mem_arena, so.enable_mem_reuse, so.enable_mem_pattern, shared


def test_the_arena_is_used_only_where_tensors_are_small():
    """Transient sessions: their own arena without the reuse plan up to ARENA_MAX_ACTIVATION_BYTES, else the plan
    without an arena; resident low-memory sessions: the process's shared arena without the plan up to their own
    limit, else the plan without an arena; a chunk that records no (or a malformed) size keeps onnxruntime's plan. No
    session keeps a memory pattern."""
    transient, low, default = SessionOptions(transient=True), SessionOptions(low_memory=True), SessionOptions()
    assert _memory_settings(transient, 1) == (True, False, False, False)
    assert _memory_settings(transient, ARENA_MAX_ACTIVATION_BYTES) == (True, False, False, False)
    for unknown in (ARENA_MAX_ACTIVATION_BYTES + 1, None, "big", 0):
        assert _memory_settings(transient, unknown) == (False, True, False, False)
    assert _memory_settings(low, RESIDENT_NO_REUSE_MAX_ACTIVATION_BYTES) == (True, False, False, True)
    for unknown in (RESIDENT_NO_REUSE_MAX_ACTIVATION_BYTES + 1, None, "big"):
        assert _memory_settings(low, unknown) == (False, True, False, False)
    # resident, not low-memory: onnxruntime's arena and reuse plan, but no memory pattern (onnx_session_options)
    for size in (1, None):
        assert _memory_settings(default, size) == (True, True, False, False)
    assert onnx_session_options(transient, None).enable_mem_reuse


def test_chunk_sessions_stop_spinning_when_a_run_returns():
    """A chained chunk's session must not keep spinning threads on the cores the next chunk's session runs on
    (onnx_session_options: 4 chunks 1.071× one chunk's time with the spin, 1.026× without), whatever its memory
    settings."""
    for options in (SessionOptions(), SessionOptions(low_memory=True), SessionOptions(transient=True),
                    SessionOptions(threads=1)):
        for largest in (1, None):
            so = onnx_session_options(options, _with_largest(largest))
            assert so.get_session_config_entry("session.force_spinning_stop") == "1"


def test_resident_low_memory_sessions_share_one_arena_and_give_the_same_picture(tiny_bundle: Path):
    """The tiny chunks are all small: every resident low-memory session uses the shared arena, and shrinks it after
    each run; other sessions run with onnxruntime's default run options."""
    chunk = next(c for c in load_manifest(tiny_bundle).component("unet").chunks if not c.per_row)
    shared = open_chunk(tiny_bundle, chunk, SessionOptions(low_memory=True))._run_options
    assert shared.get_run_config_entry("memory.enable_memory_arena_shrinkage") == "cpu:0"
    assert open_chunk(tiny_bundle, chunk, SessionOptions())._run_options is None
    shared = generate(Pipeline.from_bundle(tiny_bundle, low_memory=True))
    assert np.array_equal(shared, generate(Pipeline.from_bundle(tiny_bundle)))


def test_streamed_sessions_hand_out_arrays_of_their_own(tiny_bundle: Path):
    """Every ONNX chunk records its largest tensor (at least its largest output); a transient session with an arena
    copies its outputs out of it: an array still pointing into the arena would keep the arena alive after the
    session, and the UNet's skip connections would pin every early chunk's arena until the last chunk."""
    manifest = load_manifest(tiny_bundle)
    for component in manifest.components.values():
        for chunk in component.chunks:
            largest = chunk.extra["largest_activation_bytes"]
            assert isinstance(largest, int) and largest >= max(int(np.prod(t.shape)) * 4 for t in chunk.outputs)
    first = manifest.component("unet").chunks[0]
    assert onnx_session_options(SessionOptions(transient=True), first).enable_cpu_mem_arena
    rng = np.random.default_rng(0)  # not zeros: a GroupNorm over a constant input magnifies rounding 300-fold
    feeds = {t.name: rng.standard_normal(t.shape).astype(np.float32) for t in first.inputs}
    streamed = open_chunk(tiny_bundle, first, SessionOptions(transient=True)).run(feeds)
    resident = open_chunk(tiny_bundle, first, SessionOptions()).run(feeds)
    assert all(v.base is None and v.flags.owndata for v in streamed.values())
    assert all(np.abs(streamed[k] - resident[k]).max() <= PREFIX_KERNELS_MAX_ABS for k in resident)
