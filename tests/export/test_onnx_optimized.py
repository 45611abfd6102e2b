"""Optimized graphs stored at export: weights shared with the chunk, same outputs, used only by the onnxruntime
version that wrote them, hash-checked like every other file."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from pocketsd.errors import BundleError
from pocketsd.export.backends.onnx.optimized import write_optimized
from pocketsd.runtime import hashing, sessions
from pocketsd.runtime.manifest import MANIFEST_NAME, load_manifest
from pocketsd.runtime.pipeline import Pipeline
from pocketsd.runtime.sessions import OnnxSession, SessionOptions

pytestmark = pytest.mark.export  # the tiny bundle is made by the exporter


def external_locations(graph: Path) -> set[str]:
    model = onnx.load(str(graph), load_external_data=False)
    return {e.value for t in model.graph.initializer for e in t.external_data if e.key == "location"}


def random_feeds(session: OnnxSession) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for i in session._session.get_inputs():
        if "float" in i.type:
            feeds[i.name] = rng.standard_normal(i.shape).astype(np.float32)
        else:
            feeds[i.name] = rng.integers(0, 90, i.shape).astype(np.int64 if "int64" in i.type else np.int32)
    return feeds


def test_every_onnx_chunk_has_an_optimized_graph_sharing_its_weights(tiny_bundle: Path):
    manifest = load_manifest(tiny_bundle)
    for component in manifest.components.values():
        for chunk in component.chunks:
            opt = chunk.optimized
            assert opt is not None and (opt.engine, opt.version, opt.level) == ("onnxruntime", ort.__version__,
                                                                             "extended"), chunk.id
            # every tensor it reads is in the chunk's own data file or in the few it made: nothing stored twice
            own = sum(f.bytes for f in opt.data_files)
            assert own <= 0.05 * sum(f.bytes for f in chunk.data_files), (chunk.id, own)
            folder = Path(chunk.file.path).parent
            assert external_locations(tiny_bundle / opt.file.path) <= {
                Path(f.path).relative_to(folder).as_posix() for f in (*chunk.data_files, *opt.data_files)}


def test_the_optimized_graph_gives_the_original_graphs_outputs(tiny_bundle: Path):
    """Tolerance 1e-6: both are the same graph after onnxruntime's optimizer (observed: bit-identical)."""
    for chunk in load_manifest(tiny_bundle).component("unet").chunks:
        original = OnnxSession(tiny_bundle / chunk.file.path, SessionOptions(threads=1))
        optimized = OnnxSession(tiny_bundle / chunk.optimized.file.path, SessionOptions(threads=1))
        feeds = random_feeds(original)
        want, got = original.run(feeds), optimized.run(feeds)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=0, atol=1e-6, err_msg=f"{chunk.id}:{name}")


def test_tensors_the_optimizer_makes_get_a_file_of_their_own(tmp_path: Path):
    """W = A + B folds into a new tensor (its own file); C is used as stored (shared with the chunk's data)."""
    rng = np.random.default_rng(0)
    a, b, c = (rng.standard_normal((64, 64)).astype(np.float32) for _ in range(3))
    graph = helper.make_graph(
        [helper.make_node("Add", ["A", "B"], ["W"]), helper.make_node("MatMul", ["x", "W"], ["h"]),
         helper.make_node("MatMul", ["h", "C"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 64])],
        [numpy_helper.from_array(v, n) for n, v in (("A", a), ("B", b), ("C", c))])
    path = tmp_path / "toy.onnx"
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.save_model(model, str(path),
                    save_as_external_data=True, location="toy.onnx.data", size_threshold=1024)
    files = write_optimized(path)
    assert [f.name for f in files] == ["toy.optimized.onnx", "toy.optimized.onnx.data"]
    assert files[1].stat().st_size == a.nbytes  # only the folded A + B
    assert external_locations(files[0]) == {"toy.onnx.data", "toy.optimized.onnx.data"}
    x = rng.standard_normal((2, 64)).astype(np.float32)
    got = OnnxSession(files[0], SessionOptions(threads=1)).run({"x": x})["y"]
    np.testing.assert_allclose(got, x @ (a + b) @ c, rtol=1e-5, atol=1e-4)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no scratch left


def test_a_split_with_many_parts_made_by_the_optimizer_still_loads(tmp_path: Path):
    """200 Slices of one tensor become one Split (GatherSliceToSplitFusion) whose split sizes (1.6 KB) onnxruntime
    saves as external data, then cannot load ("Cannot parse data from external tensors"): SD 2.1's sliced attention
    at 768² under cpu-lowmem. Such small new tensors are stored in the graph instead."""
    parts = 200
    nodes, outputs = [], []
    for i in range(parts):
        starts, ends, axes = (numpy_helper.from_array(np.array([v], np.int64), f"{n}{i}")
                              for n, v in (("s", 2 * i), ("e", 2 * i + 2), ("a", 1)))
        nodes.append(helper.make_node("Constant", [], [f"s{i}"], value=starts))
        nodes.append(helper.make_node("Constant", [], [f"e{i}"], value=ends))
        nodes.append(helper.make_node("Constant", [], [f"a{i}"], value=axes))
        nodes.append(helper.make_node("Slice", ["x", f"s{i}", f"e{i}", f"a{i}"], [f"p{i}"]))
        outputs.append(f"p{i}")
    nodes.append(helper.make_node("Concat", outputs[::-1], ["y"], axis=1))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 2 * parts])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, 2 * parts])])
    path = tmp_path / "slices.onnx"
    onnx.save_model(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    files = write_optimized(path)
    saved = onnx.load(str(files[0]), load_external_data=False)
    assert any(n.op_type == "Split" for n in saved.graph.node), "the optimizer fused the slices into one Split"
    x = np.arange(3 * 2 * parts, dtype=np.float32).reshape(3, 2 * parts)
    got = OnnxSession(files[0], SessionOptions(threads=1)).run({"x": x})["y"]
    np.testing.assert_array_equal(got, np.concatenate(np.split(x, parts, axis=1)[::-1], axis=1))


def opened_graphs(monkeypatch) -> list[str]:
    opened: list[str] = []
    real = sessions.OnnxSession
    monkeypatch.setattr(sessions, "OnnxSession",
                        lambda path, options, chunk=None, graph_cache=None:
                        opened.append(Path(path).name) or real(path, options, chunk, graph_cache))
    return opened


def generate(bundle: Path) -> np.ndarray:
    return Pipeline.from_bundle(bundle)("a cat", num_inference_steps=2, seed=1, output_type="np")


@pytest.fixture()
def bundle_copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    return copy


def test_the_runtime_opens_optimized_graphs_of_its_own_version_only(bundle_copy: Path, monkeypatch):
    opened = opened_graphs(monkeypatch)
    image = generate(bundle_copy)
    assert opened and all(name.endswith(".optimized.onnx") for name in opened), opened
    manifest = json.loads((bundle_copy / MANIFEST_NAME).read_text())
    for component in manifest["components"].values():
        for chunk in component["chunks"]:
            chunk["optimized"]["version"] = "0.0.1"  # written by another onnxruntime
    (bundle_copy / MANIFEST_NAME).write_text(json.dumps(manifest))
    opened.clear()
    assert np.array_equal(generate(bundle_copy), image)
    assert opened and not [name for name in opened if name.endswith(".optimized.onnx")], opened


def test_a_corrupted_optimized_graph_fails_its_hash_check(bundle_copy: Path, monkeypatch):
    monkeypatch.setattr(hashing, "_DIGESTS", {})
    chunk = load_manifest(bundle_copy).component("unet").chunks[1]
    with open(bundle_copy / chunk.optimized.file.path, "r+b") as f:
        f.seek(10)
        f.write(b"\x00\x01\x02")
    with pytest.raises(BundleError, match=r"unet\.01\.optimized\.onnx does not match its sha256"):
        generate(bundle_copy)
