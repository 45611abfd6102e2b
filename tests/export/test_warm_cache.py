"""The export leaves onnxruntime's graph cache warm (exporter._warm_cache, sessions.warm_graph_cache): every ONNX
chunk's optimized graph is cached for the bundle in its final folder; ``warm_cache=False`` writes none, and a failure
while warming leaves the bundle whole.

The cache folder is a fresh one per test, and the tiny bundle's chunks are cached by lowering the size floor (real
ones start at 16 MiB), as in tests/runtime/test_cold_start.py. The tests where nothing is cached export the VAE
decoder alone (3 s here, the whole cpu preset 18 s).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

pytest.importorskip("torch")
pytestmark = pytest.mark.export

from pocketsd.export.exporter import ExportRequest, export_bundle  # noqa: E402
from pocketsd.export.preset import load_preset, preset_from_dict, preset_text  # noqa: E402
from pocketsd.runtime import graph_cache, hashing, sessions  # noqa: E402
from pocketsd.runtime.manifest import load_manifest  # noqa: E402
from pocketsd.runtime.sessions import SessionOptions  # noqa: E402


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh cache folder, caching every file and chunk of the tiny bundle; no digest remembered in-process."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(hashing.NO_CACHE_ENV, raising=False)
    monkeypatch.setattr(hashing, "CACHE_MIN_BYTES", 0)
    monkeypatch.setattr(graph_cache, "CACHE_MIN_BYTES", 0)
    monkeypatch.setattr(hashing, "_DIGESTS", {})
    return tmp_path / "xdg" / "pocketsd" / "onnxruntime"


def export(model: Path, out: Path, warm_cache: bool = True, decoder_only: bool = False) -> Path:
    preset = load_preset("cpu")
    if decoder_only:
        preset = preset_from_dict({**yaml.safe_load(preset_text("cpu")[0]), "components": ["vae_decoder"]}, "test")
    return export_bundle(ExportRequest(str(model), preset, out, progress=False, warm_cache=warm_cache))


def graph_entries(bundle: Path) -> dict[str, Path]:
    """Each ONNX chunk's graph cache entry, as a load of the bundle looks it up."""
    options = SessionOptions()
    found = {}
    for component in load_manifest(bundle).components.values():
        for chunk in component.chunks:
            assert chunk.format == "onnx"
            entry = graph_cache.graph_entry(sessions.onnx_graph(bundle, chunk), chunk, options)
            assert entry is not None
            found[chunk.id] = entry
    return found


def test_the_export_caches_every_chunks_optimized_graph(tiny_model_dir: Path, tmp_path: Path, cache: Path,
                                                          monkeypatch: pytest.MonkeyPatch):
    bundle = export(tiny_model_dir, tmp_path / "bundle")
    entries = graph_entries(bundle)
    assert {"unet.00", "unet.03", "vae_encoder.00"} <= set(entries)  # every component, the encoder too
    assert all(hashing.sealed(entry) for entry in entries.values())
    assert sorted(p.name for p in cache.iterdir()) == sorted(e.name for e in entries.values())
    # it ran on the final folder: a later process finds every chunk file's digest there and hashes nothing
    monkeypatch.setattr(hashing, "_DIGESTS", {})
    hashed: list[Path] = []
    monkeypatch.setattr(hashing, "sha256_path", lambda path: hashed.append(path) or "")
    for component in load_manifest(bundle).components.values():
        for chunk in component.chunks:
            sessions.verify_chunk(bundle, chunk)
    assert hashed == []
    # warming again finds them all
    assert sessions.warm_graph_cache(bundle, load_manifest(bundle)) == len(entries)


def test_no_warm_cache_writes_no_graph(tiny_model_dir: Path, tmp_path: Path, cache: Path):
    bundle = export(tiny_model_dir, tmp_path / "bundle", warm_cache=False, decoder_only=True)
    assert not any(hashing.sealed(entry) for entry in graph_entries(bundle).values())
    assert not cache.exists() or not any(cache.iterdir())


def test_a_failure_while_warming_keeps_the_bundle(tiny_model_dir: Path, tmp_path: Path, cache: Path,
                                                   monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture):
    def broken(*_args: object) -> None:
        raise OSError("disk on fire\nsecond line")

    monkeypatch.setattr(sessions, "open_chunk", broken)
    with caplog.at_level(logging.WARNING, logger="pocketsd.export.exporter"):
        bundle = export(tiny_model_dir, tmp_path / "bundle", decoder_only=True)
    assert bundle == tmp_path / "bundle"
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert "graph cache not warmed (OSError: disk on fire second line)" in warning and "\n" not in warning
    manifest = load_manifest(bundle)  # whole: every file named is there and matches its sha256
    for component in manifest.components.values():
        for chunk in component.chunks:
            sessions.verify_chunk(bundle, chunk)
    assert not list(tmp_path.glob(".bundle.partial-*"))
    assert not cache.exists() or not any(cache.iterdir())


@pytest.mark.parametrize("flag, warm", [([], True), (["--no-warm-cache"], False)])
def test_the_cli_warms_unless_told_not_to(flag: list[str], warm: bool, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch):
    from pocketsd import cli
    from pocketsd.export import exporter

    requests: list[ExportRequest] = []
    monkeypatch.setattr(exporter, "export_bundle", lambda request: requests.append(request) or request.out)
    assert cli.main(["export", "--model", "tiny", "--out", str(tmp_path / "b"), "--quiet", *flag]) == 0
    assert [r.warm_cache for r in requests] == [warm]
