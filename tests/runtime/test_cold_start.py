"""Cold start: the per-user caches (verified digests, onnxruntime's optimized graphs) and the opens around them give
the same outputs as a plain open, refuse a changed file as before, and can be turned off. No timing here: the
figures are in README ("Cold start").

"A later process" is simulated by forgetting the per-process digests; the cache folder is a fresh one per test, and
the tiny bundle's chunks are cached by lowering the size floor (real ones start at 16 MiB).
"""

from __future__ import annotations

import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from pocketsd.errors import BundleError
from pocketsd.runtime import execution, graph_cache, hashing, sessions
from pocketsd.runtime.manifest import load_manifest
from pocketsd.runtime.pipeline import Pipeline
from pocketsd.runtime.sessions import SessionOptions, open_chunk

pytestmark = pytest.mark.export  # the tiny bundle is made by the exporter


def background_checks_done() -> None:
    """Wait for the pipelines' background hashing (sessions.verify_in_background): the cache folder is per test."""
    for thread in threading.enumerate():
        if thread.name == "pocketsd-verify":
            thread.join()


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch):
    """A fresh cache folder, caching every file and chunk of the tiny bundle; no digest remembered in-process."""
    background_checks_done()
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(hashing.NO_CACHE_ENV, raising=False)
    monkeypatch.setattr(hashing, "CACHE_MIN_BYTES", 0)
    monkeypatch.setattr(graph_cache, "CACHE_MIN_BYTES", 0)
    monkeypatch.setattr(hashing, "_DIGESTS", {})
    yield tmp_path / "xdg" / "pocketsd"
    background_checks_done()


@pytest.fixture()
def hashed(monkeypatch) -> list[str]:
    calls: list[str] = []
    real = hashing.sha256_path
    monkeypatch.setattr(hashing, "sha256_path", lambda path: calls.append(str(path)) or real(path))
    return calls


@pytest.fixture()
def bundle(tiny_bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    return copy


def later_process(monkeypatch) -> None:
    background_checks_done()
    monkeypatch.setattr(hashing, "_DIGESTS", {})


def verify_all(bundle: Path, disk_cache: bool = True) -> None:
    for component in load_manifest(bundle).components.values():
        for chunk in component.chunks:
            sessions.verify_chunk(bundle, chunk, disk_cache)


def generate(pipe: Pipeline) -> np.ndarray:
    return pipe("a cat", negative_prompt="fog", num_inference_steps=2, guidance_scale=7.5, scheduler="euler",
                seed=1, output_type="np")


def test_a_later_process_does_not_hash_a_verified_file_again(bundle: Path, hashed: list[str], monkeypatch):
    verify_all(bundle)
    first = list(hashed)
    assert any("unet.03.onnx" in p for p in first) and len(first) == len(set(first))
    later_process(monkeypatch)
    verify_all(bundle)
    assert hashed == first


@pytest.mark.parametrize("restore_mtime", [False, True])
def test_the_digest_cache_refuses_a_changed_file(bundle: Path, hashed: list[str], monkeypatch, restore_mtime: bool):
    """Same size, and even the same mtime (set back with utime): ctime still moves, so the file is hashed again."""
    verify_all(bundle)
    chunk = load_manifest(bundle).component("unet").chunks[1]
    path = bundle / chunk.data_files[0].path
    before = path.stat()
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    if restore_mtime:
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert path.stat().st_size == before.st_size
    for _ in range(2):  # a mismatch is never recorded: refused in every later process
        later_process(monkeypatch)
        with pytest.raises(BundleError, match=r"unet\.01\.onnx\.data does not match its sha256"):
            sessions.verify_chunk(bundle, chunk)
    assert hashed.count(str(path)) == 3


def test_a_tampered_file_is_refused_on_open_with_every_cache_warm(bundle: Path, monkeypatch):
    generate(Pipeline.from_bundle(bundle))  # digests and optimized graphs cached
    chunk = load_manifest(bundle).component("unet").chunks[2]
    path = bundle / chunk.data_files[0].path
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    later_process(monkeypatch)
    pipe = Pipeline.from_bundle(bundle)
    with pytest.raises(BundleError, match=r"unet\.02\.onnx\.data does not match its sha256"):
        pipe.runner("unet")


@pytest.mark.parametrize("how", ["env", "option"])
def test_the_caches_can_be_turned_off(bundle: Path, cache: Path, hashed: list[str], monkeypatch, how: str):
    if how == "env":
        monkeypatch.setenv(hashing.NO_CACHE_ENV, "1")
    options = SessionOptions(disk_cache=how == "env")  # the env var wins over the default
    chunk = load_manifest(bundle).component("unet").chunks[0]
    open_chunk(bundle, chunk, options)
    verify_all(bundle, disk_cache=options.disk_cache)
    later_process(monkeypatch)
    open_chunk(bundle, chunk, options)
    assert not cache.exists()
    assert hashed.count(str(bundle / chunk.data_files[0].path)) == 2  # once per process, as before the cache


def test_an_unwritable_cache_folder_only_costs_the_cache(bundle: Path, cache: Path, monkeypatch):
    cache.parent.mkdir(parents=True)
    cache.write_text("not a folder")
    want = generate(Pipeline.from_bundle(bundle, memory="resident"))
    later_process(monkeypatch)
    assert np.array_equal(generate(Pipeline.from_bundle(bundle)), want)


@pytest.mark.parametrize("memory", ["resident", "stream"])
def test_the_cached_optimized_graph_gives_the_same_picture(bundle: Path, cache: Path, monkeypatch, memory: str):
    monkeypatch.setenv(hashing.NO_CACHE_ENV, "1")
    want = generate(Pipeline.from_bundle(bundle, memory=memory))
    monkeypatch.delenv(hashing.NO_CACHE_ENV)
    written = generate(Pipeline.from_bundle(bundle, memory=memory))  # writes each chunk's graph
    entries = sorted(p.name.split("-")[0] for p in (cache / "onnxruntime").iterdir())
    assert entries == sorted(c.id for comp in load_manifest(bundle).components.values() for c in comp.chunks
                             if comp.id != "vae_encoder")
    assert all(hashing.sealed(p) for p in (cache / "onnxruntime").iterdir())
    later_process(monkeypatch)
    opened: list[str] = []
    monkeypatch.setattr(graph_cache, "sealed", lambda entry: opened.append(entry.name) or hashing.sealed(entry))
    read = generate(Pipeline.from_bundle(bundle, memory=memory))  # reads them
    assert opened and np.array_equal(written, want) and np.array_equal(read, want)


def test_a_changed_cache_entry_is_rebuilt(bundle: Path, cache: Path, monkeypatch):
    chunk = load_manifest(bundle).component("unet").chunks[1]
    rng = np.random.default_rng(0)
    feeds = {t.name: rng.standard_normal(t.shape).astype(t.dtype) for t in chunk.inputs}
    want = open_chunk(bundle, chunk, SessionOptions(disk_cache=False)).run(feeds)
    open_chunk(bundle, chunk, SessionOptions())
    (entry,) = (cache / "onnxruntime").iterdir()
    data = entry / "model.onnx.data"
    data.write_bytes(bytes(len(data.read_bytes())))  # every weight zeroed, same size
    assert not hashing.sealed(entry)
    got = open_chunk(bundle, chunk, SessionOptions()).run(feeds)  # not used: rebuilt from the bundle
    assert hashing.sealed(entry)
    assert all(np.array_equal(got[k], want[k]) for k in want)


def test_a_file_asked_for_by_two_threads_is_hashed_once(bundle: Path, hashed: list[str]):
    chunk = load_manifest(bundle).component("unet").chunks[0]
    files = [(bundle / ref.path, ref.sha256) for ref in chunk.files]
    start = threading.Barrier(4)

    def check() -> list[Path]:
        start.wait()
        return hashing.mismatched(files, disk_cache=False, workers=2)

    threads = [threading.Thread(target=lambda: results.append(check())) for _ in range(4)]
    results: list[list[Path]] = []
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [[]] * 4
    assert sorted(hashed) == sorted(str(p) for p, _ in files)


def test_parallel_hashing_names_the_mismatched_files_in_order(bundle: Path):
    refs = [ref for comp in load_manifest(bundle).components.values() for c in comp.chunks for ref in c.files]
    files = [(bundle / ref.path, ref.sha256 if i % 3 else "0" * 64) for i, ref in enumerate(refs)]
    want = [p for i, (p, _) in enumerate(files) if i % 3 == 0]
    assert hashing.mismatched(files, disk_cache=False, workers=2) == want
    assert hashing.mismatched(files, disk_cache=False, workers=1) == want


def opening_threads(monkeypatch) -> list[str]:
    """From now on, the name of the thread each chunk is opened on (the policies open through execution.open_chunk)."""
    threads: list[str] = []
    real = sessions.open_chunk

    def counted(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(execution, "open_chunk", counted)
    return threads


def test_opening_chunks_two_at_a_time_gives_the_same_picture(bundle: Path, monkeypatch):
    want = generate(Pipeline.from_bundle(bundle))
    threads = opening_threads(monkeypatch)
    pipe = Pipeline.from_bundle(bundle)
    pipe.policy = execution.make_policy("resident", execution.chunk_opener(bundle, pipe.options),
                                         open_workers=lambda _chunks: 2)
    assert np.array_equal(generate(pipe), want)
    assert any(name.startswith("pocketsd-open") for name in threads), threads


def test_onnxruntime_opens_chunks_at_once_only_where_their_graphs_are_cached(bundle: Path, monkeypatch):
    unet = load_manifest(bundle).component("unet").chunks
    workers = sessions.open_workers(bundle, SessionOptions())
    assert workers(unet) == 1  # nothing cached yet: each open optimizes its graph, one at a time
    Pipeline.from_bundle(bundle).runner("unet")  # caches every UNet chunk's optimized graph
    later_process(monkeypatch)
    assert workers(unet) == sessions.CACHED_OPEN_WORKERS > 1
    assert sessions.open_workers(bundle, SessionOptions(disk_cache=False))(unet) == 1  # the cache is not used
    monkeypatch.setattr(graph_cache, "CACHE_MIN_BYTES", 2**62)
    assert workers(unet) == sessions.CACHED_OPEN_WORKERS  # too small to be cached: cheap to optimize at load
    assert sessions.open_workers(bundle, SessionOptions(engine="openvino"))(unet) == 2


def test_a_later_process_opens_cached_chunks_at_once_with_the_same_picture(bundle: Path, monkeypatch):
    want = generate(Pipeline.from_bundle(bundle))  # the first load optimizes and caches, one chunk at a time
    later_process(monkeypatch)
    threads = opening_threads(monkeypatch)
    assert np.array_equal(generate(Pipeline.from_bundle(bundle)), want)
    unet = load_manifest(bundle).component("unet").chunks
    assert sum(name.startswith("pocketsd-open") for name in threads) == len(unet)


def test_a_bad_chunk_opened_two_at_a_time_raises_the_bundle_error(bundle: Path):
    path = bundle / load_manifest(bundle).component("unet").chunks[3].data_files[0].path
    path.write_bytes(bytes(path.stat().st_size))
    pipe = Pipeline.from_bundle(bundle)
    pipe.policy = execution.make_policy("resident", execution.chunk_opener(bundle, pipe.options),
                                         open_workers=lambda _chunks: 2)
    with pytest.raises(BundleError, match=r"unet\.03\.onnx\.data does not match its sha256"):
        pipe.runner("unet")


def test_no_graph_is_cached_where_the_disk_is_nearly_full(bundle: Path, cache: Path, monkeypatch):
    monkeypatch.setattr(hashing, "CACHE_FREE_MARGIN", 2**62)
    chunk = load_manifest(bundle).component("unet").chunks[0]
    rng = np.random.default_rng(0)
    feeds = {t.name: rng.standard_normal(t.shape).astype(t.dtype) for t in chunk.inputs}
    got = open_chunk(bundle, chunk, SessionOptions()).run(feeds)
    want = open_chunk(bundle, chunk, SessionOptions(disk_cache=False)).run(feeds)
    assert all(np.array_equal(got[k], want[k]) for k in want)
    assert not any((cache / "onnxruntime").iterdir())


def test_prune_keeps_the_most_recently_used_entries_within_the_cap(tmp_path: Path):
    for i, name in enumerate(["old", "mid", "new"]):
        entry = tmp_path / name
        entry.mkdir()
        (entry / "model.onnx.data").write_bytes(bytes(100))
        os.utime(entry, (1000 + i, 1000 + i))
    stale = tmp_path / ".new.partial-x"  # left by a process that died
    stale.mkdir()
    os.utime(stale, (1000, 1000))
    hashing.used(tmp_path / "old")  # just used: now the most recent
    hashing.prune(tmp_path, max_bytes=250)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new", "old"]
