"""Property-based fuzz of the manifest reader: whatever JSON it is given, it returns a Manifest or raises BundleError
(the user-error kind the CLI prints as one line), never KeyError, TypeError, AttributeError, ValueError, ...

Three sources, 5,500 cases in all (derandomized, so every run checks the same ones): random JSON documents under
a valid header, one to three mutations of a realistic manifest (a key removed, a value replaced by random JSON, a
value wrapped in a list or turned into text), and random bytes as manifest.json through ``load_manifest``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from pocketsd.errors import BundleError  # noqa: E402
from pocketsd.runtime.manifest import (  # noqa: E402
    FORMAT,
    SCHEMA_VERSION,
    Chunk,
    Component,
    FileRef,
    Manifest,
    OptimizedGraph,
    Parity,
    TensorSpec,
    load_manifest,
    manifest_from_dict,
)

SHA = "ab" * 32
FUZZ = settings(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))


def ref(path: str) -> FileRef:
    return FileRef(path, SHA, 10)


def realistic() -> dict[str, Any]:
    """A manifest shaped as the exporter writes one: two components, chunk wiring, data files, an optimized graph,
    parity figures, a tiling entry, tokenizer files and a plan."""
    lat, txt = TensorSpec("sample", "float32", (2, 4, 16, 16)), TensorSpec("states", "float32", (2, 77, 32))
    unet = Component(
        "unet", (lat, txt, TensorSpec("timestep", "float32", (2,))),
        (TensorSpec("noise_pred", "float32", (2, 4, 16, 16), "unet.01:noise_pred"),),
        (Chunk("unet.00", "onnx", ref("unet/unet.00.onnx"), 100,
               (TensorSpec("sample", "float32", (2, 4, 16, 16), "input:sample"),
                TensorSpec("timestep", "float32", (2,), "input:timestep")),
               (TensorSpec("unet.00/down", "float16", (2, 8, 8, 8)),), ("down_blocks.0",),
               (ref("unet/unet.00.onnx.data"),), Parity(80.0, 1e-6, 60.0), {"largest_activation_bytes": 4096},
               OptimizedGraph("onnxruntime", "1.20.0", "basic", ref("unet/unet.00.opt.onnx"))),
         Chunk("unet.01", "onnx", ref("unet/unet.01.onnx"), 100,
               (TensorSpec("unet.00/down", "float16", (2, 8, 8, 8), "unet.00:unet.00/down"),
                TensorSpec("states", "float32", (2, 77, 32), "input:states")),
               (TensorSpec("noise_pred", "float32", (2, 4, 16, 16)),), ("up_blocks.0",))),
        Parity(float("inf"), 0.0, 60.0))
    vae = Component(
        "vae_decoder", (TensorSpec("z", "float32", (1, 4, 16, 16)),),
        (TensorSpec("image", "float32", (1, 3, 128, 128), "vae_decoder.00:image"),),
        (Chunk("vae_decoder.00", "onnx", ref("vae_decoder/vae_decoder.00.onnx"), 50,
               (TensorSpec("z", "float32", (1, 4, 16, 16), "input:z"),),
               (TensorSpec("image", "float32", (1, 3, 128, 128)),), ()),),
        extra={"tiling": {"space": "latent", "tile_height": 8, "tile_width": 8, "overlap": 2}})
    manifest = Manifest(SCHEMA_VERSION, {"name": "tiny"}, {"preset": "cpu", "config": {"runtime": {"threads": 0}}},
                        {"height": 128, "width": 128, "latent_height": 16, "latent_width": 16, "unet_batch": 2},
                        0.18215, {"max_length": 77, "files": {"vocab.json": ref("tokenizer/vocab.json")}},
                        {"class_name": "PNDMScheduler", "config": {"num_train_timesteps": 1000}},
                        {"unet": unet, "vae_decoder": vae}, ref("plan.json"), "pocketsd test")
    return json.loads(json.dumps(manifest.to_dict()))


BASE = realistic()
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def read(document: Any) -> None:
    """The property: a Manifest whose derived values all work, or a BundleError; anything else fails the test."""
    try:
        manifest = manifest_from_dict(document, "fuzz.json")
    except BundleError as exc:
        assert exc.one_line().startswith("error[bundle")
        return
    manifest.all_files()
    for component in manifest.components.values():
        for chunk in component.chunks:
            chunk.files
            sum(t.nbytes for t in (*chunk.inputs, *chunk.outputs))


def test_the_realistic_manifest_reads():
    assert manifest_from_dict(copy.deepcopy(BASE)).components["unet"].chunks[0].optimized is not None


@settings(FUZZ, max_examples=1500)
@given(body=st.dictionaries(st.sampled_from(sorted(BASE)), json_values, max_size=10))
def test_random_documents_under_a_valid_header(body: dict[str, Any]):
    read({**body, "format": FORMAT, "schema_version": SCHEMA_VERSION})


@settings(FUZZ, max_examples=500)
@given(document=json_values)
def test_random_documents(document: Any):
    read(document)


def paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path into a JSON value (the root excluded)."""
    found = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        found.append((*prefix, key))
        found += paths(child, (*prefix, key))
    return found


PATHS = paths(BASE)
MUTATIONS = ("remove", "replace", "wrap", "text", "null")


@settings(FUZZ, max_examples=3000)
@given(edits=st.lists(st.tuples(st.sampled_from(PATHS), st.sampled_from(MUTATIONS), json_values),
                      min_size=1, max_size=3))
def test_mutations_of_a_real_manifest(edits: list[tuple[tuple, str, Any]]):
    document = copy.deepcopy(BASE)
    for path, mutation, value in edits:
        parent: Any = document
        for key in path[:-1]:
            try:
                parent = parent[key]
            except (KeyError, IndexError, TypeError):  # an earlier edit removed or replaced this path
                parent = None
                break
        key = path[-1]
        # an earlier edit may have removed the path, or wrapped a mapping in a list (a name no longer indexes it)
        if isinstance(parent, list):
            if not isinstance(key, int) or key >= len(parent):
                continue
        elif not isinstance(parent, dict) or key not in parent:
            continue
        old = parent[path[-1]]
        if mutation == "remove":
            del parent[path[-1]]
        else:
            parent[path[-1]] = {"replace": value, "wrap": [old], "text": str(old), "null": None}[mutation]
    read(document)


@settings(FUZZ, max_examples=500)
@given(data=st.binary(max_size=200) | st.text(max_size=200).map(str.encode))
def test_random_bytes_as_manifest_json(data: bytes, tmp_path_factory: pytest.TempPathFactory):
    folder = tmp_path_factory.getbasetemp() / "fuzz-bytes"
    folder.mkdir(exist_ok=True)
    (folder / "manifest.json").write_bytes(data)
    with pytest.raises(BundleError):
        load_manifest(folder)


def test_deeply_nested_json_is_a_bundle_error(tmp_path: Path):
    (tmp_path / "manifest.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(BundleError, match="not valid JSON|not an object"):
        load_manifest(tmp_path)


# -- the external-data locations inside an ONNX graph (runtime/onnx_refs.py): a torch-free protobuf walk


def _external(name: str, location: str) -> Any:
    from onnx import TensorProto, helper

    tensor = helper.make_tensor(name, TensorProto.FLOAT, [1], [0.0])
    tensor.ClearField("float_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "4")):
        tensor.external_data.add(key=key, value=value)
    return tensor


def _graph_with(location: str, where: str) -> Any:
    """A model whose one external tensor sits ``where``: an initializer, a Constant's attribute, or a Constant inside
    an If node's branch (a subgraph)."""
    from onnx import TensorProto, helper

    const = helper.make_node("Constant", [], ["c"], value=_external("w", location))
    branch = helper.make_graph([const], "branch", [], [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1])])
    nodes = {"initializer": [], "attribute": [const],
             "subgraph": [helper.make_node("If", ["cond"], ["c"], then_branch=branch, else_branch=branch)]}[where]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("c", TensorProto.FLOAT, [1])],
                              initializer=[_external("w", location)] if where == "initializer" else [])
    return helper.make_model(graph)


@pytest.mark.parametrize("where", ["initializer", "attribute", "subgraph"])
@pytest.mark.parametrize("location, allowed", [("c.onnx.data", True), ("./c.onnx.data", True),
                                               ("../c.onnx.data", False), ("/etc/hostname", False),
                                               ("other.data", False), ("*/_ORT_MEM_ADDR_/*", False)])
def test_external_data_must_be_a_file_of_the_chunk(tmp_path: Path, where: str, location: str, allowed: bool):
    pytest.importorskip("onnx")
    from pocketsd.runtime.onnx_refs import check_external_data, external_locations

    (tmp_path / "unet").mkdir()
    (tmp_path / "unet/c.onnx").write_bytes(_graph_with(location, where).SerializeToString())
    assert external_locations(tmp_path / "unet/c.onnx") == (location,) * (2 if where == "subgraph" else 1)
    check = lambda: check_external_data(tmp_path, "unet/c.onnx", {"unet/c.onnx", "unet/c.onnx.data"}, "unet.00")  # noqa: E731
    if allowed:
        check()
    else:
        with pytest.raises(BundleError, match="not one of the chunk's files"):
            check()


@settings(FUZZ, max_examples=500)
@given(head=st.binary(max_size=60), tail=st.binary(max_size=60))
def test_random_bytes_as_an_onnx_graph(head: bytes, tail: bytes, tmp_path_factory: pytest.TempPathFactory):
    """Garbage around the bytes ``location`` (so the walk runs): it reads or refuses, never crashes."""
    from pocketsd.runtime.onnx_refs import check_external_data

    folder = tmp_path_factory.getbasetemp() / "fuzz-onnx"
    folder.mkdir(exist_ok=True)
    (folder / "c.onnx").write_bytes(head + b"\x0a\x08location\x12\x06c.data" + tail)
    try:
        check_external_data(folder, "c.onnx", {"c.onnx", "c.data"}, "x.00")
    except BundleError:
        pass
