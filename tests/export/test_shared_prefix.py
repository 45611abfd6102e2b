"""The shared prefix of a guided UNet (export/shared_prefix.py): found on the captured graph, cut as a per-row chunk
exported at batch 1, and refused where it cannot apply."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from pocketsd.errors import PresetError  # noqa: E402
from pocketsd.export.capture import capture  # noqa: E402
from pocketsd.export.exporter import component_spec, resolve_dims  # noqa: E402
from pocketsd.export.model_loader import load_module, open_model_folder  # noqa: E402
from pocketsd.export.preset import load_preset, preset_text, with_overrides  # noqa: E402
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
    assert rows is not None and rows.prefix == prefix  # attention not sliced: the same ops
    assert [op.name for op in rows.summary.ops[:prefix.ops]] == [op.name for op in summary.ops[:prefix.ops]]
    assert rows.summary.values[rows.summary.inputs[0]].shape[0] == 1


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


def test_sliced_attention_makes_another_prefix_at_one_row_with_the_same_boundary(tiny_model_dir: Path,
                                                                                  tiny_bundle: Path, tmp_path: Path):
    """Sliced attention cuts the queries by bytes, so one row takes fewer slices than two: the batch-1 prefix holds
    fewer ops (the full-size cpu-int8 UNet: 382 against 702). Its chunk still has the batch's boundary, and the
    bundle computes the UNet of the plain cpu bundle."""
    from pocketsd.export.exporter import ExportRequest, export_bundle
    from pocketsd.runtime.chain import ComponentRunner
    from pocketsd.runtime.sessions import SessionOptions

    preset = tmp_path / "sliced.yaml"
    # the first self-attention's scores: 4 heads × 256² fp32 = 1 MiB a row, so two rows take two slices, one row one
    preset.write_text(preset_text("cpu")[0] + "attention: {form: sliced, slice_mb: 1.5}\n")
    bundle = export_bundle(ExportRequest(str(tiny_model_dir), load_preset(str(preset)), tmp_path / "b",
                                         progress=False, warm_cache=False))
    plan = json.loads((bundle / "plan.json").read_text())["components"]["unet"]
    assert plan["chunks"][0]["op_end"] < plan["cuts"][0]["before_op"]  # fewer ops at one row
    got, want = (load_manifest(b).component("unet") for b in (bundle, tiny_bundle))
    assert got.chunks[0].per_row and [t.name for t in got.chunks[0].outputs] == [t.name for t in want.chunks[0].outputs]
    rng = np.random.default_rng(0)
    feeds = {t.name: rng.standard_normal(t.shape).astype(t.dtype) for t in want.inputs}
    feeds["timestep"] = np.full(want.inputs[1].shape, 801.0, np.float32)
    feeds["sample"] = np.repeat(feeds["sample"][:1], 2, axis=0)
    a, b = (ComponentRunner.open(x, c, SessionOptions())(**feeds)["noise_pred"]
            for x, c in ((bundle, got), (tiny_bundle, want)))
    assert np.abs(a - b).max() <= TOL["chunked_vs_unchunked_max_abs"]
