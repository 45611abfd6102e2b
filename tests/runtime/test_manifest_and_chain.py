"""The manifest contract and the chunk chain, on hand-made two-chunk ONNX files (numpy + onnxruntime + onnx only)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pocketsd.errors import BundleError
from pocketsd.runtime.chain import ComponentRunner
from pocketsd.runtime.hashing import sha256_path, size_of
from pocketsd.runtime.manifest import Chunk, Component, FileRef, Manifest, TensorSpec, load_manifest, manifest_from_dict
from pocketsd.runtime.sessions import SessionOptions

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402


def write_model(path: Path, inputs: list[str], outputs: list[str], nodes: list) -> None:
    graph = helper.make_graph(
        nodes, path.stem,
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in inputs],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [2, 3]) for n in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # what every onnxruntime since 1.14 reads
    onnx.save(model, path)


def spec(name: str, source: str | None = None) -> TensorSpec:
    return TensorSpec(name, "float32", (2, 3), source)


def ref(bundle: Path, rel: str) -> FileRef:
    return FileRef(rel, sha256_path(bundle / rel), size_of(bundle / rel))


@pytest.fixture()
def bundle(tmp_path: Path) -> Path:
    """y = (a + b) * b, cut after the addition: chunk 1 reads 'b' straight from the component input."""
    (tmp_path / "toy").mkdir()
    add = helper.make_node("Add", ["a", "b"], ["toy.00/add"])
    write_model(tmp_path / "toy/c0.onnx", ["a", "b"], ["toy.00/add"], [add])
    mul = helper.make_node("Mul", ["toy.00/add", "b"], ["y"])
    write_model(tmp_path / "toy/c1.onnx", ["toy.00/add", "b"], ["y"], [mul])
    chunks = (
        Chunk("toy.00", "onnx", ref(tmp_path, "toy/c0.onnx"), 0, (spec("a", "input:a"), spec("b", "input:b")),
              (spec("toy.00/add"),), ("add",)),
        Chunk("toy.01", "onnx", ref(tmp_path, "toy/c1.onnx"), 0,
              (spec("toy.00/add", "toy.00:toy.00/add"), spec("b", "input:b")), (spec("y"),), ("mul",)),
    )
    component = Component("toy", (spec("a"), spec("b")), (spec("y", "toy.01:y"),), chunks)
    Manifest("1.0", {"name": "toy"}, {"preset": "test"}, {"height": 8}, 0.18215, {"files": {}}, {},
             {"toy": component}).write(tmp_path)
    return tmp_path


def test_round_trip_and_chain(bundle: Path):
    manifest = load_manifest(bundle)
    runner = ComponentRunner.open(bundle, manifest.component("toy"), SessionOptions())
    a = np.arange(6, dtype=np.float32).reshape(2, 3)
    b = np.full((2, 3), 2.0, dtype=np.float32)
    np.testing.assert_array_equal(runner(a=a, b=b)["y"], (a + b) * b)


def test_feed_of_the_wrong_shape_is_named(bundle: Path):
    runner = ComponentRunner.open(bundle, load_manifest(bundle).component("toy"), SessionOptions())
    with pytest.raises(BundleError, match=r"expects 'a' as float32\[2, 3\] but got float32\[3, 2\]"):
        runner(a=np.zeros((3, 2), np.float32), b=np.zeros((2, 3), np.float32))


def edit(bundle: Path, change) -> dict:
    data = json.loads((bundle / "manifest.json").read_text())
    change(data)
    return data


@pytest.mark.parametrize("change, message", [
    (lambda d: d["components"]["toy"]["chunks"][1]["inputs"][0].update(source="toy.07:nothing"),
     "comes from 'toy.07:nothing'"),
    (lambda d: d["components"]["toy"]["chunks"][1]["inputs"][0].update(shape=[2, 4]), "is float32[2, 4] but"),
    (lambda d: d["components"]["toy"]["chunks"][0]["inputs"][0].update(dtype="complex64"),
     "dtype is 'complex64', not one of float32"),
    (lambda d: d["components"]["toy"]["outputs"][0].update(source="toy.00:y"), "comes from 'toy.00:y'"),
    (lambda d: d.update(format="something-else"), "not a pocketsd bundle manifest"),
    (lambda d: d.update(schema_version="3.1"), "schema '3.1'"),
    (lambda d: d.pop("dims"), "malformed"),
])
def test_inconsistent_manifests_are_refused(bundle: Path, change, message: str):
    with pytest.raises(BundleError, match=message.replace("[", r"\[").replace("]", r"\]")):
        manifest_from_dict(edit(bundle, change))


def test_minor_version_bump_is_read(bundle: Path):
    assert manifest_from_dict(edit(bundle, lambda d: d.update(schema_version="1.9"))).schema_version == "1.9"


def test_missing_file_and_changed_bytes(bundle: Path):
    (bundle / "toy/c1.onnx").write_bytes((bundle / "toy/c1.onnx").read_bytes() + b"\0")
    manifest = load_manifest(bundle)
    with pytest.raises(BundleError, match="does not match its sha256"):
        ComponentRunner.open(bundle, manifest.component("toy"), SessionOptions())
    (bundle / "toy/c0.onnx").unlink()
    with pytest.raises(BundleError, match="c0.onnx is missing"):
        load_manifest(bundle)


def test_intermediates_are_released_after_their_last_use(bundle: Path):
    runner = ComponentRunner.open(bundle, load_manifest(bundle).component("toy"), SessionOptions())
    assert runner._release[0] == ["input:a"]  # 'a' is read by chunk 0 only; 'b' is read again by chunk 1
    assert sorted(runner._release[1]) == ["input:b", "toy.00:toy.00/add"]


def test_sha256_of_a_folder_covers_names_and_contents(tmp_path: Path):
    pkg = tmp_path / "m.mlpackage"
    (pkg / "Data").mkdir(parents=True)
    (pkg / "Data/w.bin").write_bytes(b"abc")
    first = sha256_path(pkg)
    (pkg / "Data/w.bin").rename(pkg / "Data/v.bin")
    assert sha256_path(pkg) != first and size_of(pkg) == 3
    assert replace(spec("x"), dtype="float16").nbytes == 12
