"""A second engine for ONNX chunks: OpenVINO gives onnxruntime's pictures; a bad engine request is one clear line."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from pocketsd.cli import main
from pocketsd.errors import BundleError
from pocketsd.runtime.chain import ComponentRunner
from pocketsd.runtime.execution import chunk_opener, component_opener, make_policy
from pocketsd.runtime.manifest import MANIFEST_NAME, load_manifest
from pocketsd.runtime.pipeline import Pipeline
from pocketsd.runtime.sessions import SessionOptions

pytestmark = pytest.mark.export  # the tiny bundle is made by the exporter
needs_openvino = pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                                    reason="openvino is not installed (the [openvino] extra; `make install` has it)")


def generate(bundle: Path, **kwargs) -> np.ndarray:
    pipe = Pipeline.from_bundle(bundle, **kwargs)
    return pipe("a cat", negative_prompt="fog", num_inference_steps=3, seed=1, output_type="np")


@needs_openvino
@pytest.mark.parametrize("memory", ["resident", "stream"])
def test_openvino_gives_onnxruntimes_picture(tiny_bundle: Path, memory: str, monkeypatch):
    """Each chunk agrees with onnxruntime to ~1e-5 (fp32, same graph); 3 steps and a decode: ≤ 1e-3 on [0, 1].
    Resident, a component of several chunks is compiled as one model; streamed, chunk by chunk."""
    from pocketsd.runtime import openvino_session

    compiled: list[str] = []
    real = openvino_session._compile

    def counted(model, owner, threads, bf16):
        compiled.append(owner)
        return real(model, owner, threads, bf16)

    monkeypatch.setattr(openvino_session, "_compile", counted)
    want = generate(tiny_bundle, memory=memory)
    assert not compiled
    got = generate(tiny_bundle, memory=memory, engine="openvino")
    unet = load_manifest(tiny_bundle).component("unet").chunks
    joined = [c for c in unet if not c.per_row]  # the shared prefix (runtime/per_row.py) is compiled on its own
    assert len(joined) >= 4 and "chunk vae_decoder.00" in compiled  # one chunk: compiled as it is
    if memory == "resident":
        assert f"unet (its {len(joined)} chunks as one model)" in compiled
        assert [owner for owner in compiled if owner.startswith("chunk unet.")] == [f"chunk {unet[0].id}"]
    else:
        assert "chunk unet.03" in compiled and not any(owner.startswith("unet ") for owner in compiled)
    assert np.abs(got - want).max() <= 1e-3


@needs_openvino
@pytest.mark.parametrize("engine", ["openvino", "openvino-bf16"])
def test_chunks_compiled_as_one_model_equal_the_chain(tiny_bundle: Path, engine: str):
    """The merged UNet (openvino_session.merged_model) computes what its chunks chained one by one compute: fp32
    within 1e-5 (measured: identical); bf16 within 0.05 (measured 0.021-0.028 on outputs of std 0.2: each is bf16
    arithmetic, rounded at other points); every output is named as the manifest names it."""
    if engine == "openvino-bf16" and not _has_bf16_units():
        pytest.skip("this CPU has no bf16 units (AVX512-BF16 or AMX)")
    component = load_manifest(tiny_bundle).component("unet")
    options = SessionOptions(engine=engine)
    whole = make_policy("resident", chunk_opener(tiny_bundle, options), whole=component_opener(tiny_bundle, options))
    merged = ComponentRunner(component, whole)
    chained = ComponentRunner(component, make_policy("resident", chunk_opener(tiny_bundle, options)))
    assert not whole._sessions and list(whole._wholes) == ["unet"]  # no chunk opened on its own
    rng = np.random.default_rng(0)
    rows = [{spec.name: (rng.standard_normal(spec.shape) * (100 if spec.name == "timestep" else 1)).astype(spec.dtype)
             for spec in component.inputs} for _ in range(2)]
    got, want = merged.run_many(rows), chained.run_many(rows)
    for g, w in zip(got, want):
        assert set(g) == {spec.name for spec in component.outputs}
        for name in w:
            assert np.abs(g[name] - w[name]).max() <= (1e-5 if engine == "openvino" else 0.05), name


def _has_bf16_units() -> bool:
    if importlib.util.find_spec("openvino") is None:
        return False
    from pocketsd.runtime.openvino_session import _core

    return "BF16" in _core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


@needs_openvino
@pytest.mark.skipif(not _has_bf16_units(), reason="this CPU has no bf16 units (AVX512-BF16 or AMX)")
def test_openvino_bf16_computes_in_bf16_close_to_fp32(tiny_bundle: Path):
    """bf16 is a real change of arithmetic (the picture differs) that stays near fp32's: measured max abs 0.017 on
    [0, 1] for the tiny model (64², 3 steps); bounded at 0.1."""
    want = generate(tiny_bundle, engine="openvino")
    got = generate(tiny_bundle, engine="openvino-bf16")
    assert 0 < np.abs(got - want).max() <= 0.1


@needs_openvino
def test_openvino_bf16_without_bf16_units_is_one_line(tiny_bundle: Path, tmp_path: Path, capsys, monkeypatch):
    from pocketsd.runtime import openvino_session

    class NoBf16Core:
        def get_property(self, device: str, name: str) -> list[str]:
            return ["FP32", "INT8"]

    monkeypatch.setattr(openvino_session, "_core", lambda: NoBf16Core())
    code, err = cli(capsys, tiny_bundle, tmp_path / "x.png", "--engine", "openvino-bf16")
    assert code == 2 and len(err.splitlines()) == 1 and "needs a CPU with bf16 units" in err
    assert "--engine openvino" in err and not (tmp_path / "x.png").exists()


def cli(capsys, bundle: Path, out: Path, *extra: str) -> tuple[int, str]:
    code = main(["generate", str(bundle), "--prompt", "a cat", "--steps", "2", "--out", str(out), "--quiet", *extra])
    return code, capsys.readouterr().err.strip()


@needs_openvino
def test_cli_engine_openvino_writes_the_png(tiny_bundle: Path, tmp_path: Path, capsys):
    code, err = cli(capsys, tiny_bundle, tmp_path / "ov.png", "--engine", "openvino", "--seed", "1")
    assert code == 0 and (tmp_path / "ov.png").stat().st_size > 0, err


def test_an_unknown_engine_is_one_line(tiny_bundle: Path, tmp_path: Path, capsys):
    code, err = cli(capsys, tiny_bundle, tmp_path / "x.png", "--engine", "tensorrt")
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "unknown engine 'tensorrt'" in err and "onnxruntime, openvino" in err
    assert not (tmp_path / "x.png").exists()


def test_a_missing_engine_package_is_one_line(tiny_bundle: Path, tmp_path: Path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    code, err = cli(capsys, tiny_bundle, tmp_path / "x.png", "--engine", "openvino")
    assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err
    assert "needs the openvino package" in err and "pocketsd[openvino]" in err


def test_another_engine_for_coreml_chunks_is_refused(tiny_bundle: Path, tmp_path: Path):
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    manifest = json.loads((copy / MANIFEST_NAME).read_text())
    manifest["components"]["unet"]["chunks"][0]["format"] = "mlpackage"
    (copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="engine 'openvino' runs ONNX chunks, and this bundle has mlpackage chunks"):
        Pipeline.from_bundle(copy, engine="openvino")
