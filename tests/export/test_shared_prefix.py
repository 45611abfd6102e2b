"""The shared prefix of a guided UNet (export/shared_prefix.py): found on the captured graph, cut as a per-row chunk
exported at batch 1, and refused where it cannot apply."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pocketsd.errors import PresetError  # noqa: E402
from pocketsd.export.capture import capture  # noqa: E402
from pocketsd.export.exporter import component_spec, resolve_dims  # noqa: E402
from pocketsd.export.model_loader import load_module, open_model_folder  # noqa: E402
from pocketsd.export.preset import load_preset, with_overrides  # noqa: E402
from pocketsd.export.random_model import builtin_configs, write_random_model  # noqa: E402
from pocketsd.export.shared_prefix import SHARED_INPUTS  # noqa: E402
from pocketsd.runtime.manifest import load_manifest  # noqa: E402
from tests.conftest import TOL  # noqa: E402


def captured_unet(model_dir: Path):
    folder = open_model_folder(model_dir)
    preset = load_preset("cpu")
    dims = resolve_dims(folder, preset)
    unet = load_module(folder, "unet")
    return capture(component_spec("unet", unet, dims, preset), unet, dims, shared_prefix=True), unet


def text_readers(summary, varying: set[str]) -> set[int]:
    """Indices of the ops that read (through any chain) one of the ``varying`` inputs."""
    tainted, hits = set(varying), set()
    for i, op in enumerate(summary.ops):
        if any(r in tainted for r in op.reads):
            tainted.add(op.name)
            hits.add(i)
    return hits


def test_the_prefix_reads_no_text_and_the_reordered_graph_computes_the_same(tiny_model_dir: Path):
    captured, _ = captured_unet(tiny_model_dir)
    prefix, summary = captured.prefix, captured.summary
    assert prefix is not None and prefix.hoisted > 0  # the wrapper's layout change of the text moved after it
    varying = {fx for fx, io in zip(summary.inputs, captured.spec.inputs) if io.name not in SHARED_INPUTS}
    readers = text_readers(summary, varying)
    assert min(readers) == prefix.ops  # nothing before the cut reads the text; the op right after it does
    assert any(op.module.startswith("down_blocks.0") for op in summary.ops[:prefix.ops])
    with torch.no_grad():  # the reordered graph is still the UNet
        got = captured.graph_module(*captured.example_inputs)
    np.testing.assert_allclose(got[0].numpy() if isinstance(got, (tuple, list)) else got.numpy(),
                               captured.reference_outputs[0].numpy(), atol=1e-5)
    rows = captured.rows  # captured again at batch 1, reordered alike
    assert rows is not None
    assert [op.name for op in rows.summary.ops[:prefix.ops]] == [op.name for op in summary.ops[:prefix.ops]]
    assert rows.summary.values[summary.inputs[0]].shape[0] == 1


def test_no_prefix_where_the_text_enters_before_any_block(tmp_path: Path):
    """SDXL: the pooled text embeddings join the time embedding, which the first ResNet reads."""
    model = write_random_model(tmp_path / "sdxl", builtin_configs("tiny-sdxl"))
    captured, _ = captured_unet(model)
    assert captured.prefix is None and captured.rows is None


def test_the_bundle_runs_the_prefix_as_a_per_row_chunk(tiny_bundle: Path):
    unet = load_manifest(tiny_bundle).component("unet")
    first, rest = unet.chunks[0], unet.chunks[1:]
    assert first.per_row and not any(c.per_row for c in rest)
    assert {t.name for t in first.inputs} == set(SHARED_INPUTS)
    assert all(t.shape[0] == 1 for t in (*first.inputs, *first.outputs))
    assert len(rest) == 4  # the preset's four chunks after it
    assert first.parity is not None and first.parity.psnr_db >= TOL["export_min_psnr_db"]
    plan = (tiny_bundle / "plan.json").read_text()
    assert '"per_row": true' in plan and "shared prefix" in plan


@pytest.mark.parametrize("text, expected", [
    ("backend: coreml\nprecision: fp16\nsplit:\n  unet: {n_chunks: 2, shared_prefix: true}\n",
     "is only for onnx presets"),
    ("unet_batch: 1\nsplit:\n  unet: {n_chunks: 2, shared_prefix: true}\n", "needs unet_batch: 2"),
    ("split:\n  vae_decoder: {n_chunks: 2, shared_prefix: true}\n", "is only for the unet"),
    ("split:\n  unet: {n_chunks: 2, shared_prefix: yes please}\n", "shared_prefix is 'yes please'"),
    ("split:\n  unet: {shared_prefix: true}\n", "must set exactly one of n_chunks"),
])
def test_shared_prefix_mistakes_are_named(tmp_path: Path, text: str, expected: str):
    path = tmp_path / "p.yaml"
    path.write_text(text)
    with pytest.raises(PresetError, match=expected):
        load_preset(str(path))


def test_overrides_keep_the_prefix_except_for_one_chunk():
    cpu = load_preset("cpu")
    assert cpu.split_for("unet").shared_prefix
    assert with_overrides(cpu, {"unet": 6}).split_for("unet").shared_prefix
    assert with_overrides(cpu, max_chunk_mb=50).split_for("unet").shared_prefix
    assert not with_overrides(cpu, {"unet": 1}).split_for("unet").shared_prefix  # the unchunked model
    assert cpu.to_dict()["split"]["unet"] == {"n_chunks": 4, "shared_prefix": True}
    assert not load_preset("cpu-lowmem").split_for("unet").shared_prefix  # its UNet runs one row per call


def test_a_budget_smaller_than_the_prefix_is_one_line(tiny_model_dir: Path):
    """(On the planner's step that adds the prefix's cut: the tiny UNet's largest uncuttable piece is larger than
    its prefix, so a whole export would stop at the budget check for that piece first.)"""
    from pocketsd.errors import PlanError
    from pocketsd.export.plan import analyze_cuts
    from pocketsd.export.write_component import _with_prefix

    captured, _ = captured_unet(tiny_model_dir)
    table = analyze_cuts(captured.summary)
    end = captured.prefix.ops
    prefix_bytes = int(table.weight_before[end])
    cuts, reason = _with_prefix(captured, table, [end - 5, end + 40], "asked", prefix_bytes)
    assert cuts == [end, end + 40] and reason.startswith("asked; before them the shared prefix")
    with pytest.raises(PlanError, match="its shared prefix holds .* more than the .* per-chunk budget"):
        _with_prefix(captured, table, [], "asked", prefix_bytes - 1)
