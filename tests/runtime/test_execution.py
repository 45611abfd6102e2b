"""Memory policies (resident / stream / prefetch): same pictures, bounded live sessions, hashing once, clear refusals.

Live sessions are counted by wrapping the onnx backend (never by timing): a session is alive from the backend's
return until the runtime drops its last reference.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pocketsd.cli import main
from pocketsd.errors import BundleError, GenerateError
from pocketsd.runtime import execution, hashing
from pocketsd.runtime.chain import ComponentRunner
from pocketsd.runtime.manifest import load_manifest
from pocketsd.runtime.pipeline import Pipeline
from pocketsd.runtime.sessions import (
    BACKENDS,
    Backend,
    SessionOptions,
)
from tests.conftest import TOL

pytestmark = pytest.mark.export  # the tiny bundle is made by the exporter


class Census:
    """Wraps the onnx backend: which chunks were opened, how many sessions are alive now and at most."""

    def __init__(self, inner: Backend) -> None:
        self.inner, self.lock = inner, threading.Lock()
        self.alive = self.peak = 0
        self.opened: list[str] = []
        self.threads: list[str] = []

    def open(self, path, chunk, options):
        session = self.inner.open(path, chunk, options)
        with self.lock:
            self.alive += 1
            self.peak = max(self.peak, self.alive)
            self.opened.append(chunk.id)
            self.threads.append(threading.current_thread().name)
        return Counted(session, self)


class Counted:
    def __init__(self, inner, census: Census) -> None:
        self.inner, self.census = inner, census

    def run(self, feeds):
        return self.inner.run(feeds)

    def __del__(self):
        with self.census.lock:
            self.census.alive -= 1


@pytest.fixture()
def census(monkeypatch) -> Census:
    counted = Census(BACKENDS.get("onnx"))
    monkeypatch.setitem(BACKENDS._items, "backend::onnx", Backend(counted.open, streams=True))
    return counted


@pytest.fixture()
def hashed(monkeypatch) -> list[str]:
    """Every file sha256 is computed for, from an empty per-process cache."""
    calls: list[str] = []
    real = hashing.sha256_path
    monkeypatch.setattr(hashing, "_DIGESTS", {})
    monkeypatch.setattr(hashing, "sha256_path", lambda path: calls.append(str(path)) or real(path))
    return calls


@pytest.fixture()
def bundle_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    return copy


def generate(pipe: Pipeline, steps: int = 3) -> np.ndarray:
    return pipe("a cat", negative_prompt="fog", num_inference_steps=steps, guidance_scale=7.5, scheduler="euler",
                seed=1, output_type="np")


# Streamed sessions do not prepack their weights (``SessionOptions.transient``), and for the shared prefix's one-row
# shapes onnxruntime then takes other MatMul kernels: the prefix's outputs differ by up to 1.1e-6 from a resident
# session's (measured on the tiny and the shapes bundles), which is where the policies' results part. Every other
# chunk computes bit for bit alike under every policy.
PREFIX_KERNELS_MAX_ABS = TOL["chunked_vs_unchunked_max_abs"]


def test_every_policy_gives_the_same_picture(tiny_bundle: Path):
    images = {m: generate(Pipeline.from_bundle(tiny_bundle, memory=m)) for m in ("resident", "stream", "prefetch")}
    assert np.abs(images["resident"] - images["stream"]).max() <= PREFIX_KERNELS_MAX_ABS
    assert np.array_equal(images["stream"], images["prefetch"])


def test_stream_keeps_one_session_alive_and_opens_each_chunk_per_use(tiny_bundle: Path, census: Census):
    pipe = Pipeline.from_bundle(tiny_bundle, memory="stream")
    generate(pipe, steps=3)
    unet = [c.id for c in pipe.manifest.component("unet").chunks]
    assert census.peak == 1 and census.alive == 0
    assert census.opened == ["text_encoder.00"] * 2 + unet * 3 + ["vae_decoder.00"]


def test_prefetch_keeps_at_most_two_alive_and_guesses_right(tiny_bundle: Path, census: Census):
    pipe = Pipeline.from_bundle(tiny_bundle, memory="prefetch")
    generate(pipe, steps=3)
    unet = [c.id for c in pipe.manifest.component("unet").chunks]
    assert census.peak <= 2 and census.alive == 0  # 2 while a chunk runs and the next opens (if not done first)
    # the one-chunk text encoder is kept for the negative prompt; no open is wasted on a wrong guess
    assert census.opened == ["text_encoder.00"] + unet * 3 + ["vae_decoder.00"]
    # every open after the first happened in the background
    assert all(name.startswith("pocketsd-prefetch") for name in census.threads[1:]), census.threads


def test_resident_opens_every_chunk_once(tiny_bundle: Path, census: Census):
    pipe = Pipeline.from_bundle(tiny_bundle)
    generate(pipe, steps=3)
    generate(pipe, steps=2)
    assert sorted(census.opened) == sorted(set(census.opened)) and census.alive == len(census.opened)


@pytest.mark.parametrize("low_memory", [False, True])
def test_resident_trims_the_c_heap_after_each_run_only_without_an_arena(tiny_bundle: Path, monkeypatch,
                                                                        low_memory: bool):
    trims: list[int] = []
    monkeypatch.setattr(execution, "_heap_trimmer", lambda: lambda: trims.append(1))
    pipe = Pipeline.from_bundle(tiny_bundle, low_memory=low_memory)
    generate(pipe, steps=2)
    runs = 2 + 2 * len(pipe.manifest.component("unet").chunks) + 1  # two prompts, 2 steps, one decode
    assert len(trims) == (runs if low_memory else 0)


@pytest.mark.parametrize("memory", ["stream", "prefetch"])
def test_chunk_major_unet_opens_each_chunk_once_per_step_with_the_same_result(tiny_bundle: Path, census: Census,
                                                                              memory: str):
    """Four rows through the batch-2 UNet are two calls per step: chunk-major, each chunk opens once for both."""
    rng = np.random.default_rng(0)
    d = load_manifest(tiny_bundle).dims
    sample = rng.standard_normal((4, d["latent_channels"], d["latent_height"], d["latent_width"]), dtype=np.float32)
    resident = Pipeline.from_bundle(tiny_bundle, memory="resident")
    context = resident.unet_context(rng.standard_normal((4, 77, d["text_hidden"]), dtype=np.float32))
    expected = resident.unet(sample, 500.0, context)
    census.opened.clear()
    pipe = Pipeline.from_bundle(tiny_bundle, memory=memory)
    pipe.policy.hint(None)
    got = pipe.unet(sample, 500.0, context)
    assert np.abs(got - expected).max() <= PREFIX_KERNELS_MAX_ABS
    assert census.opened == [c.id for c in pipe.manifest.component("unet").chunks]


def test_run_many_equals_row_major(tiny_bundle: Path):
    component = load_manifest(tiny_bundle).component("unet")
    rng = np.random.default_rng(1)
    rows = [{t.name: rng.standard_normal(t.shape, dtype=np.float32) for t in component.inputs} for _ in range(3)]
    row_major = ComponentRunner.open(tiny_bundle, component, SessionOptions())
    expected = [row_major(**row) for row in rows]
    for memory in ("resident", "stream", "prefetch"):
        got = ComponentRunner.open(tiny_bundle, component, SessionOptions(), memory).run_many(rows)
        assert all(np.array_equal(g["noise_pred"], e["noise_pred"]) for g, e in zip(got, expected)), memory


def test_each_file_is_hashed_once_per_process(tiny_bundle: Path, hashed: list[str]):
    pipe = Pipeline.from_bundle(tiny_bundle, memory="stream")
    generate(pipe, steps=4)
    generate(pipe, steps=2)
    Pipeline.from_bundle(tiny_bundle, memory="prefetch")("a dog", num_inference_steps=2, seed=2, output_type="np")
    assert len(hashed) == len(set(hashed)) and any("unet.03" in path for path in hashed)


def test_a_changed_file_is_hashed_again(bundle_copy: Path, hashed: list[str]):
    chunk = bundle_copy / load_manifest(bundle_copy).component("unet").chunks[0].file.path
    pipe = Pipeline.from_bundle(bundle_copy, memory="stream")
    generate(pipe, steps=1)
    stat = chunk.stat()
    os.utime(chunk, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    generate(pipe, steps=1)
    assert hashed.count(str(chunk)) == 2


@pytest.mark.parametrize("memory", ["stream", "prefetch"])
def test_a_corrupted_chunk_fails_on_first_use(bundle_copy: Path, memory: str):
    chunk = bundle_copy / load_manifest(bundle_copy).component("unet").chunks[1].file.path
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0x01
    chunk.write_bytes(bytes(data))
    pipe = Pipeline.from_bundle(bundle_copy, memory=memory)
    with pytest.raises(BundleError, match=r"unet\.01\.onnx does not match its sha256"):
        generate(pipe, steps=1)


def cli(capsys, bundle: Path, out: Path, *extra: str) -> tuple[int, str]:
    code = main(["generate", str(bundle), "--prompt", "a cat", "--steps", "2", "--seed", "1", "--out", str(out),
                 "--quiet", *extra])
    return code, capsys.readouterr().err.strip()


def test_cli_low_memory_gives_the_same_png(tiny_bundle: Path, tmp_path: Path, capsys):
    assert cli(capsys, tiny_bundle, tmp_path / "resident.png")[0] == 0
    assert cli(capsys, tiny_bundle, tmp_path / "low.png", "--low-memory")[0] == 0
    assert cli(capsys, tiny_bundle, tmp_path / "prefetch.png", "--memory", "prefetch")[0] == 0
    pixels = {name: np.asarray(Image.open(tmp_path / f"{name}.png"), np.int16)
              for name in ("low", "prefetch", "resident")}
    for name in ("low", "prefetch"):  # both streamed: PREFIX_KERNELS_MAX_ABS may round a pixel the other way
        assert np.abs(pixels[name] - pixels["resident"]).max() <= 1, name


@pytest.mark.parametrize("extra, needle", [
    (("--memory", "lean"), "unknown memory policy 'lean'"),
    (("--memory", "prefetch", "--low-memory"), "--low-memory means --memory stream"),
])
def test_cli_bad_memory_request_is_one_line(tiny_bundle: Path, tmp_path: Path, capsys, extra, needle):
    code, err = cli(capsys, tiny_bundle, tmp_path / "x.png", *extra)
    assert code == 2 and len(err.splitlines()) == 1 and needle in err, err


def edit_manifest(bundle: Path, change) -> None:
    data = json.loads((bundle / "manifest.json").read_text())
    change(data)
    (bundle / "manifest.json").write_text(json.dumps(data))


@pytest.mark.skipif(sys.platform == "darwin", reason="CoreML chunks can stream on macOS")
def test_coreml_chunks_cannot_stream_off_macos(bundle_copy: Path, tmp_path: Path, capsys, hashed: list[str]):
    def to_coreml(data):
        for component in data["components"].values():
            for chunk in component["chunks"]:
                chunk["format"] = "mlpackage"

    edit_manifest(bundle_copy, to_coreml)
    code, err = cli(capsys, bundle_copy, tmp_path / "x.png", "--low-memory")
    assert code == 2 and len(err.splitlines()) == 1, err
    assert "'mlpackage'" in err and "onnx preset" in err and "Traceback" not in err
    assert hashed == []  # refused before any work
    with pytest.raises(BundleError, match="'prefetch'"):
        Pipeline.from_bundle(bundle_copy, memory="prefetch")


def test_the_default_comes_from_the_bundle_preset(bundle_copy: Path):
    assert Pipeline.from_bundle(bundle_copy).memory == "resident"
    edit_manifest(bundle_copy, lambda d: d["target"]["config"]["runtime"].update(memory="prefetch"))
    assert Pipeline.from_bundle(bundle_copy).memory == "prefetch"
    assert Pipeline.from_bundle(bundle_copy, memory="resident").memory == "resident"
    edit_manifest(bundle_copy, lambda d: d["target"]["config"]["runtime"].update(memory="lean"))
    with pytest.raises(BundleError, match="unknown memory policy 'lean'"):
        Pipeline.from_bundle(bundle_copy)
    edit_manifest(bundle_copy, lambda d: d["target"]["config"].pop("runtime"))  # a bundle from before the key
    assert Pipeline.from_bundle(bundle_copy).memory == "resident"
    with pytest.raises(GenerateError, match="unknown memory policy"):
        Pipeline.from_bundle(bundle_copy, memory="lean")


RSS_SCRIPT = r"""
import sys
from pocketsd.runtime.pipeline import Pipeline
pipe = Pipeline.from_bundle(sys.argv[1], memory=sys.argv[2])
pipe("a cat", negative_prompt="fog", num_inference_steps=3, guidance_scale=7.5, seed=1, output_type="np")
print([line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")][0])
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc (Linux)")
def test_stream_peak_memory_is_not_above_resident(tiny_bundle: Path):
    def peak_kb(memory: str) -> int:
        result = subprocess.run([sys.executable, "-c", RSS_SCRIPT, str(tiny_bundle), memory], capture_output=True,
                                text=True, timeout=300, check=True)
        return int(result.stdout.split()[-1])

    resident, stream = peak_kb("resident"), peak_kb("stream")
    assert stream <= resident + 4 * 1024, (stream, resident)  # tiny chunks: only a few MB apart, so 4 MB of slack



def test_a_bundle_too_large_to_keep_open_here_is_streamed(tiny_bundle: Path, monkeypatch, caplog):
    """Resident needs about RESIDENT_FACTOR × the weights (SDXL's cpu bundle was killed for memory on a 24 GB box):
    with less available and no policy asked for, the chunks are streamed and a warning says so; asked-for wins."""
    manifest = load_manifest(tiny_bundle)
    weights = sum(c.weight_bytes for comp in manifest.components.values() for c in comp.chunks)
    monkeypatch.setattr(execution, "available_memory", lambda: execution.RESIDENT_FACTOR * weights - 1)
    with caplog.at_level("WARNING"):
        assert execution.default_memory(manifest, "resident") == "stream"
    assert "streaming the chunks instead" in caplog.text
    assert execution.default_memory(manifest, "prefetch") == "prefetch"
    assert Pipeline.from_bundle(tiny_bundle).memory == "stream"
    assert Pipeline.from_bundle(tiny_bundle, memory="resident").memory == "resident"
    monkeypatch.setattr(execution, "available_memory", lambda: execution.RESIDENT_FACTOR * weights)
    assert execution.default_memory(manifest, "resident") == "resident"
    monkeypatch.setattr(execution, "available_memory", lambda: None)  # unknown: the preset's
    assert execution.default_memory(manifest, "resident") == "resident"


def test_available_memory_is_read_on_this_machine():
    available = execution.available_memory()
    assert available is not None and 0 < available < 1 << 50


def test_closing_a_pipeline_frees_its_sessions_then_trims_the_heap(tiny_bundle: Path, monkeypatch):
    """A pipeline opened after another was closed ran slower on the first one's leftover heap (Pipeline.close): the
    trim comes after every session of the closed pipeline is gone."""
    import weakref

    from pocketsd.runtime import pipeline as pipeline_module

    pipe = Pipeline.from_bundle(tiny_bundle)
    for component in pipe.manifest.components:
        pipe.runner(component)
    sessions = [weakref.ref(s) for s in pipe.policy._sessions.values()]
    assert len(sessions) >= 4
    alive_at_trim: list[int] = []
    monkeypatch.setattr(pipeline_module, "trimmer",
                        lambda: lambda: alive_at_trim.append(sum(ref() is not None for ref in sessions)))
    pipe.close()
    assert alive_at_trim == [0]
