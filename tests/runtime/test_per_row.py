"""Per-row chunks (runtime/per_row.py): run once per distinct row, stacked; wired and checked by the manifest."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from pocketsd.errors import BundleError
from pocketsd.runtime.chain import ComponentRunner
from pocketsd.runtime.execution import chunk_opener, component_opener, make_policy
from pocketsd.runtime.manifest import Chunk, FileRef, TensorSpec, load_manifest, manifest_from_dict
from pocketsd.runtime.per_row import PerRowSession, equal_rows_together
from pocketsd.runtime.pipeline import Pipeline
from pocketsd.runtime.sessions import SessionOptions
from tests.conftest import TOL


class Doubler:
    """A one-row session that doubles ``x``, counting its calls."""

    def __init__(self) -> None:
        self.calls = 0

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        assert feeds["x"].shape[0] == 1
        self.calls += 1
        return {"y": feeds["x"] * 2}


def per_row_chunk() -> Chunk:
    ref = FileRef("c.onnx", "0" * 64, 0)
    return Chunk("c.00", "onnx", ref, 0, (TensorSpec("x", "float32", (1, 3), "input:x"),),
                 (TensorSpec("y", "float32", (1, 3)),), (), per_row=True)


def test_equal_rows_run_once_and_every_row_gets_its_output():
    inner = Doubler()
    session = PerRowSession(inner, per_row_chunk())
    x = np.array([[1, 2, 3], [1, 2, 3], [4, 5, 6], [1, 2, 3]], np.float32)
    got = session.run({"x": x})
    np.testing.assert_array_equal(got["y"], x * 2)
    assert inner.calls == 2  # rows 0, 1 and 3 are equal


def guided_rows(component, seed: int, same: bool) -> dict[str, np.ndarray]:
    """A UNet feed: different text rows; the latents equal in both rows (a guided step) or not."""
    rng = np.random.default_rng(seed)
    feeds = {}
    for spec in component.inputs:
        value = rng.standard_normal(spec.shape).astype(spec.dtype)
        if spec.name == "timestep":
            value = np.full(spec.shape, 801.0, spec.dtype)
        elif spec.name == "sample" and same:
            value = np.repeat(value[:1], spec.shape[0], axis=0)
        feeds[spec.name] = value
    return feeds


@pytest.mark.parametrize("engine", ["onnxruntime", "openvino"])
def test_a_row_gives_the_same_output_whatever_row_it_shares_the_batch_with(tiny_bundle: Path, engine: str):
    """Row 0 of (a, b) equals row 0 of (a, a): the prefix run once for equal rows and twice for different ones
    computes each row alike (within the chunked-vs-unchunked tolerance), resident chunk by chunk, streamed, and on
    OpenVINO as the prefix's session before the rest's joined model."""
    if engine == "openvino":
        pytest.importorskip("openvino")
    component = load_manifest(tiny_bundle).component("unet")
    options = SessionOptions(engine=engine)
    policies = [make_policy("resident", chunk_opener(tiny_bundle, options),
                            whole=component_opener(tiny_bundle, options))]
    if engine == "onnxruntime":
        policies.append(make_policy("stream", chunk_opener(tiny_bundle, options)))
    else:
        assert type(policies[0]._whole(component)).__name__ == "PrefixedSession"
    different = guided_rows(component, 0, same=False)
    same = dict(different, sample=np.repeat(different["sample"][:1], 2, axis=0))
    for policy in policies:
        runner = ComponentRunner(component, policy)
        a, b = runner(**different)["noise_pred"], runner(**same)["noise_pred"]
        assert np.abs(a[0] - b[0]).max() <= TOL["chunked_vs_unchunked_max_abs"]
        assert np.abs(b[0] - b[1]).max() > 1e-3  # the text still makes the rows differ
        assert np.abs(a[1] - b[1]).max() > 1e-3  # and so do the latents


def edit(bundle: Path, change) -> dict:
    data = json.loads((bundle / "manifest.json").read_text())
    change(data["components"]["unet"]["chunks"])
    return data


@pytest.mark.parametrize("change, message", [
    (lambda c: c[0]["outputs"][0].update(shape=[2, *c[0]["outputs"][0]["shape"][1:]]), "not one row"),
    (lambda c: c[0]["inputs"][1].update(shape=[1, 7, 7, 7]), "is float32[1, 7, 7, 7] but input:sample is"),
    # a one-row chunk fed the whole batch
    (lambda c: c[0].update(per_row=False), "is float32[1] but input:timestep is float32[2]"),
    (lambda c: c[0].update(per_row="yes"), "per_row is a string 'yes', not true or false"),
])
def test_inconsistent_per_row_wiring_is_refused(tiny_bundle: Path, change, message: str):
    with pytest.raises(BundleError, match=message.replace("[", r"\[").replace("]", r"\]")):
        manifest_from_dict(edit(tiny_bundle, change))


def test_equal_rows_are_put_together():
    a, b, c = (np.full((1, 2), v, np.float32) for v in (1, 2, 3))
    order = equal_rows_together(np.concatenate([a, b, c, a, b, c]))
    assert order.tolist() == [0, 3, 1, 4, 2, 5]
    assert equal_rows_together(np.concatenate([a, a, b])).tolist() == [0, 1, 2]


class Counting:
    def __init__(self, inner) -> None:
        self.inner, self.calls = inner, 0

    def run(self, feeds):
        self.calls += 1
        return self.inner.run(feeds)


def test_a_guided_step_of_two_images_runs_the_prefix_once_per_image(tiny_bundle: Path):
    """[x1, x2, x1, x2] (negative, then positive text) goes to the batch-2 UNet as (x1, x1), (x2, x2); the outputs
    come back in the caller's order."""
    pipe = Pipeline.from_bundle(tiny_bundle)
    runner = pipe.runner("unet")
    prefix = runner.policy._sessions["unet.00"]
    prefix.inner = counter = Counting(prefix.inner)
    rng = np.random.default_rng(0)
    d = pipe.manifest.dims
    x = rng.standard_normal((2, d["latent_channels"], d["latent_height"], d["latent_width"])).astype(np.float32)
    context = pipe.unet_context(rng.standard_normal((4, d["text_length"], d["text_hidden"])).astype(np.float32))
    sample = np.concatenate([x, x])
    noise = pipe.unet(sample, 801.0, context)
    assert counter.calls == 2
    for i in range(4):  # each row as if alone in its call
        alone = pipe.unet(sample[i:i + 1], 801.0, context[i:i + 1])
        assert np.abs(noise[i] - alone[0]).max() <= TOL["chunked_vs_unchunked_max_abs"]
