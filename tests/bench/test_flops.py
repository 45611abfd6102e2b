"""FLOPs counted from ONNX graphs: exact on hand-made graphs, equal to PyTorch's own count on the tiny UNet."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from pocketsd.bench.flops import component_flops, graph_flops, main, matmul_ceiling
from pocketsd.runtime.manifest import load_manifest

pytestmark = pytest.mark.export


def test_each_counted_operator_is_exact(tmp_path: Path):
    w = lambda name, *shape: numpy_helper.from_array(np.zeros(shape, np.float32), name)  # noqa: E731
    nodes = [
        helper.make_node("Conv", ["x", "cw"], ["c"], pads=[1, 1, 1, 1], group=2),       # 2·(1·8·6·6)·(2·3·3)
        helper.make_node("ConvTranspose", ["c", "tw"], ["t"], strides=[2, 2]),         # 2·(1·8·6·6)·(3·2·2)
        helper.make_node("Flatten", ["t"], ["f"]),
        helper.make_node("Gemm", ["f", "gw"], ["g"], transB=1),                        # 2·1·10·(3·12·12)
        helper.make_node("Reshape", ["g", "shape"], ["r"]),
        helper.make_node("MatMul", ["r", "mw"], ["y"]),                                # 2·2·(5·1)·7
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 7])],
        [w("cw", 8, 2, 3, 3), w("tw", 8, 3, 2, 2), w("gw", 10, 3 * 12 * 12), w("mw", 2, 1, 7),
         numpy_helper.from_array(np.array([2, 5, 1], np.int64), "shape")])
    path = tmp_path / "g.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))
    expected = 2 * 288 * 18 + 2 * 288 * 12 + 2 * 10 * 432 + 2 * 2 * 5 * 7
    assert graph_flops(path) == expected


def test_the_tiny_unet_count_equals_pytorchs(tiny_model_dir: Path, tiny_bundle: Path):
    """torch's FlopCounterMode counts the same operators (convolutions and matrix products) on the same call."""
    import torch
    from diffusers.models.attention_processor import AttnProcessor
    from torch.utils.flop_counter import FlopCounterMode

    from pocketsd.export.model_loader import load_module, open_model_folder

    unet = load_module(open_model_folder(tiny_model_dir), "unet").eval()
    unet.set_attn_processor(AttnProcessor())  # explicit matrix products: FlopCounterMode has no CPU SDPA formula
    inputs = {t.name: t for t in load_manifest(tiny_bundle).component("unet").inputs}
    sample = torch.zeros(inputs["sample"].shape)
    batch, channels, _, tokens = inputs["encoder_hidden_states"].shape  # the bundle's [B, C, 1, S] layout
    hidden = torch.zeros(batch, tokens, channels)
    timestep = torch.zeros(inputs["timestep"].shape)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        unet(sample, timestep, encoder_hidden_states=hidden)
    assert component_flops(tiny_bundle, "unet") == counter.get_total_flops()


def test_the_matmul_ceiling_and_the_cli(tiny_bundle: Path, capsys):
    ceiling = matmul_ceiling(threads=1, size=256, repeats=2)
    assert ceiling["gflops"] > 0 and ceiling["best_s"] > 0
    assert main([str(tiny_bundle)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["gflop_per_call"] > 0 and out["matmul_ceiling"]["size"] == 4096


def test_the_bf16_matmul_ceiling_runs_on_openvino():
    pytest.importorskip("openvino", reason="the bf16 ceiling is measured with OpenVINO (the [openvino] extra)")
    ceiling = matmul_ceiling(threads=1, size=256, repeats=2, engine="openvino-bf16")
    assert ceiling["engine"] == "openvino-bf16" and ceiling["gflops"] > 0 and ceiling["best_s"] > 0
