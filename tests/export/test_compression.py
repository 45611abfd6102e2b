"""CoreML weight compression in PyTorch: palettes, int8 grids, three config levels, sizes, conversion, mixed bits."""

from __future__ import annotations

import collections
import copy
import math
import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ct = pytest.importorskip("coremltools")
pytestmark = pytest.mark.export

from torch import nn  # noqa: E402

from pocketsd.errors import PresetError  # noqa: E402
from pocketsd.export.compression.coreml_optimize import (  # noqa: E402
    CompressionConfig,
    LayerCompression,
    compress,
    compression_buffers,
    parse_compression,
    resolve_layers,
    simulated_psnr,
    stored_weight_bytes,
)
from tests.export.compression_helpers import (  # noqa: E402
    KIND,
    LUT,
    SCALE,
    SMALL_INPUT,
    assert_fp16_exact,
    config,
    run_unet,
    small,
    tiny_unet,
)


# --------------------------------------------------------------------------------------------- palettes and grids
@pytest.mark.parametrize("nbits", [2, 4, 6, 8])
def test_per_tensor_palette_has_at_most_2_pow_n_fp16_values(nbits: int):
    model = small()
    layers = resolve_layers(model, config(mode="palettize", nbits=nbits))
    assert sorted(layers) == ["conv_b", "out", "proj"]  # conv_a is below the 2048-weight threshold
    assert compress(model, layers) is model
    for name in layers:
        module = model.get_submodule(name)
        weight, lut = module.weight.detach(), compression_buffers(module)[LUT]
        assert weight.unique().numel() <= 2 ** nbits
        assert lut.shape == (1,) * weight.dim() + (2 ** nbits, 1)
        assert set(weight.unique().tolist()) <= set(lut.flatten().tolist())
        assert_fp16_exact(weight)
        assert_fp16_exact(lut)
    assert KIND not in compression_buffers(model.conv_a)
    for param in model.parameters():  # the uncompressed ones too (NOTES gotcha F)
        assert_fp16_exact(param.detach())


def test_grouped_palette_per_group_of_output_channels_on_tiny_unet():
    model = tiny_unet()
    layers = resolve_layers(model, config(mode="palettize", nbits=4, granularity="per_grouped_channel", group_size=8))
    assert "conv_out" not in layers  # 4 output channels: a group size of 8 cannot divide them
    assert len(layers) > 40
    compress(model, layers)
    for name in layers:
        module = model.get_submodule(name)
        weight, lut = module.weight.detach(), compression_buffers(module)[LUT]
        assert lut.shape[0] == weight.shape[0] // 8 and lut.shape[-2:] == (16, 1)
        for group in weight.reshape(weight.shape[0] // 8, -1):
            assert group.unique().numel() <= 16
        assert_fp16_exact(weight)


def test_linear_int8_is_int8_times_fp16_scale_per_output_channel():
    model = small()
    original = {n: p.detach().clone() for n, p in model.named_parameters()}
    layers = resolve_layers(model, config(mode="linear_int8"))
    assert layers["proj"] == LayerCompression("linear_int8", 8, "per_channel")
    compress(model, layers)
    for name in layers:
        module = model.get_submodule(name)
        weight, scale = module.weight.detach(), compression_buffers(module)[SCALE]
        assert scale.numel() == weight.shape[0]
        scale = scale.reshape((-1,) + (1,) * (weight.dim() - 1))
        assert_fp16_exact(scale)
        q = torch.round(weight / scale)
        assert q.abs().max() <= 128
        assert torch.equal(weight, (q.half() * scale.half()).float())  # fp16 × fp16, as CoreML dequantizes
        before = original[f"{name}.weight"]  # off by half a step, the fp16 scale's error and the fp16 product's
        assert ((weight - before).abs() <= scale * (0.5 + 128 * 2 ** -11) + before.abs() * 2 ** -11).all()


def test_palettized_tiny_unet_psnr_grows_with_bits():
    reference = run_unet(tiny_unet())
    psnr = {}
    for nbits in (2, 4):
        model = tiny_unet()
        compress(model, resolve_layers(model, config(mode="palettize", nbits=nbits)))
        psnr[nbits] = simulated_psnr(reference, run_unet(model))
    assert 5 < psnr[2] < psnr[4] < 60


def test_compress_nothing_is_a_no_op_and_recompressing_replaces():
    model = small()
    before = copy.deepcopy(model.state_dict())
    assert compress(model, {}) is model
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    compress(model, {"proj": LayerCompression("palettize", 8)})
    once = copy.deepcopy(model.state_dict())
    compress(model, {"proj": LayerCompression("palettize", 8)})  # already holds it: nothing moves
    assert all(torch.equal(once[k], v) for k, v in model.state_dict().items())
    compress(model, {"proj": LayerCompression("palettize", 2)})
    assert compression_buffers(model.proj)[KIND].tolist() == [2]
    assert model.proj.weight.unique().numel() <= 4
    compress(model, {"proj": LayerCompression("linear_int8")})
    assert LUT not in compression_buffers(model.proj) and compression_buffers(model.proj)[KIND].tolist() == [3]


# --------------------------------------------------------------------------------------------- config levels
def test_three_levels_global_then_op_type_then_op_name():
    model = tiny_unet()
    cfg = parse_compression({
        "global": {"mode": "palettize", "nbits": 6},
        "op_type": {"Conv2d": {"mode": "linear_int8"}},
        "op_name": {"conv_in": None, "down_blocks.0.attentions.0.proj_in": {"mode": "palettize", "nbits": 4},
                    "time_embedding.linear_1": {"mode": "palettize", "nbits": 8}},
        "weight_threshold": 4096,
    }, "test.yaml: coreml.compression.unet", "iOS17")
    layers = resolve_layers(model, cfg)
    modules = dict(model.named_modules())
    assert "conv_in" not in layers  # op_name null
    assert layers["down_blocks.0.attentions.0.proj_in"] == LayerCompression("palettize", 4)  # op_name beats op_type
    assert layers["time_embedding.linear_1"] == LayerCompression("palettize", 8)  # 4·128 weights: named, so kept
    assert layers["down_blocks.1.resnets.0.conv1"] == LayerCompression("linear_int8", 8, "per_channel")  # op_type
    assert "conv_out" not in layers  # 4·64·9 weights: below the threshold
    assert layers["down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2"] == LayerCompression("palettize", 6)
    for name, module in modules.items():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and name not in cfg.op_name:
            assert (name in layers) == (module.weight.numel() >= 4096), name
    no_conv = parse_compression({"global": {"mode": "palettize", "nbits": 4}, "op_type": {"Conv2d": None}}, "t",
                                "iOS17")
    assert all(isinstance(modules[n], nn.Linear) for n in resolve_layers(model, no_conv))


def test_unknown_op_name_lists_real_paths():
    cfg = parse_compression({"global": {"mode": "palettize", "nbits": 4}, "op_name": {"down_blocks.0.attention": None}},
                            "test.yaml: coreml.compression.unet", "iOS17")
    with pytest.raises(PresetError) as error:
        resolve_layers(tiny_unet(), cfg)
    assert "test.yaml: coreml.compression.unet.op_name.down_blocks.0.attention" in error.value.message
    assert "down_blocks.0.attentions.0" in error.value.hint


@pytest.mark.parametrize("data, path, hint", [
    ({"globl": {}}, "u.globl", "allowed: global, op_type"),
    ({"global": {"mode": "palettise", "nbits": 4}}, "u.global.mode", "palettize, linear_int8"),
    ({"global": {"mode": "palettize"}}, "u.global.nbits", "2, 3, 4, 6, 8"),
    ({"global": {"mode": "palettize", "nbits": 5}}, "u.global.nbits", "2, 3, 4, 6, 8"),
    ({"global": {"mode": "linear_int8", "nbits": 4}}, "u.global.nbits", "8"),
    ({"global": {"mode": "linear_int8", "granularity": "per_tensor"}}, "u.global.granularity", "per_channel"),
    ({"global": {"mode": "palettize", "nbits": 4, "granularity": "per_grouped_channel"}}, "u.global.group_size",
     "group_size > 0"),
    ({"global": {"mode": "palettize", "nbits": 4, "group_size": 8}}, "u.global.group_size", "per_grouped_channel"),
    ({"op_type": {"Conv1d": None}}, "u.op_type.Conv1d", "Linear, Conv2d"),
    ({"op_name": {"conv_in": {"mode": "palettize", "nbits": 4, "lut": 1}}}, "u.op_name.conv_in.lut", "allowed"),
    ({"weight_threshold": -1}, "u.weight_threshold", ">= 0"),
    ({"mixed_bit": {"bits": [4], "min_psnr_db": 30}}, "u.mixed_bit.bits", "at least two"),
    ({"mixed_bit": {"bits": [4, 5], "min_psnr_db": 30}}, "u.mixed_bit.bits", "at least two"),
    ({"mixed_bit": {"bits": [4, 8]}}, "u.mixed_bit.min_psnr_db", "dB"),
    ({"mixed_bit": {"bits": [4, 8], "min_psnr_db": 30, "extra": 1}}, "u.mixed_bit.extra", "allowed"),
    ({"global": {"mode": "palettize", "nbits": 4}, "mixed_bit": {"bits": [4, 8], "min_psnr_db": 30}},
     "u.mixed_bit", "choose one"),
])
def test_parse_errors_name_the_key_path(data, path, hint):
    with pytest.raises(PresetError) as error:
        parse_compression(data, "u", "iOS18")
    assert error.value.message.startswith(path + " ") or error.value.message.startswith(path + ":")
    assert hint in error.value.hint


@pytest.mark.parametrize("data, path", [
    ({"global": {"mode": "palettize", "nbits": 4, "granularity": "per_grouped_channel", "group_size": 8}},
     "u.global.granularity"),
    ({"mixed_bit": {"bits": [4, 8], "min_psnr_db": 30, "granularity": "per_grouped_channel", "group_size": 8}},
     "u.mixed_bit.granularity"),
    ({"op_name": {"conv_in": {"mode": "palettize", "nbits": 3}}}, "u.op_name.conv_in.nbits"),
])
def test_grouped_and_3_bit_palettes_need_ios18(data, path):
    for target in ("iOS17", "macOS14"):
        with pytest.raises(PresetError, match="iOS18/macOS15") as error:
            parse_compression(data, "u", target)
        assert error.value.message.startswith(path)
    assert parse_compression(data, "u", "iOS18") == parse_compression(data, "u", "macOS15")
    with pytest.raises(PresetError, match="iOS16/macOS13"):
        parse_compression({"global": {"mode": "linear_int8"}}, "u", "iOS15")
    with pytest.raises(PresetError, match="deployment target 'iOS 17'") as error:
        parse_compression({}, "u", "iOS 17")
    assert "iOS17" in error.value.hint


def test_parse_mixed_bit_and_defaults():
    cfg = parse_compression({"mixed_bit": {"bits": [8, 4, 6], "min_psnr_db": 30}}, "u", "iOS17")
    assert cfg.mixed_bit.bits == (4, 6, 8) and cfg.mixed_bit.min_psnr_db == 30.0 and cfg.global_config is None
    assert parse_compression({}, "u", "iOS17") == CompressionConfig()
    assert resolve_layers(small(), CompressionConfig()) == {}


# --------------------------------------------------------------------------------------------- sizes
def test_stored_weight_bytes_for_4_6_8_bit_int8_and_fp16():
    model = small()
    model.register_buffer("steps", torch.arange(10))
    plain16, plain32 = stored_weight_bytes(model, "fp16"), stored_weight_bytes(model, "fp32", prefix="model.")
    assert plain16["proj.weight"] == 96 * 32 * 2 and plain32["model.proj.weight"] == 96 * 32 * 4
    assert plain16["steps"] == 40 and plain16.keys() == {n for n, _ in model.named_parameters()} | {"steps"}
    compress(model, {"conv_b": LayerCompression("palettize", 4), "proj": LayerCompression("palettize", 6),
                     "out": LayerCompression("palettize", 8), "conv_a": LayerCompression("linear_int8")})
    sizes = stored_weight_bytes(model, "fp16", prefix="model.")
    assert sizes["model.conv_b.weight"] == math.ceil(32 * 8 * 9 * 4 / 8) + 16 * 2
    assert sizes["model.proj.weight"] == math.ceil(96 * 32 * 6 / 8) + 64 * 2
    assert sizes["model.out.weight"] == 32 * 96 + 256 * 2
    assert sizes["model.conv_a.weight"] == 8 * 4 * 9 + 8 * 2
    assert sizes["model.proj.bias"] == 96 * 2 and sizes["model.norm.weight"] == 32 * 2
    assert not any("_COREML_" in name for name in sizes)
    assert sizes.keys() == {"model." + n for n in plain16}


# --------------------------------------------------------------------------------------------- conversion
def _op_counts(spec) -> collections.Counter:
    function = spec.mlProgram.functions["main"]
    counts = collections.Counter()

    def walk(ops):
        for op in ops:
            counts[op.type] += 1
            for block in op.blocks:
                walk(block.operations)

    walk(function.block_specializations[function.opset].operations)
    return counts


CONVERSIONS = {
    "iOS17": ({"conv_b": LayerCompression("palettize", 4), "proj": LayerCompression("palettize", 6),
               "out": LayerCompression("linear_int8")},
              {"constexpr_lut_to_dense": 2, "constexpr_affine_dequantize": 1}),
    "iOS18": ({"conv_b": LayerCompression("palettize", 4, "per_grouped_channel", 8),
               "proj": LayerCompression("palettize", 3), "out": LayerCompression("linear_int8")},
              {"constexpr_lut_to_dense": 2, "constexpr_blockwise_shift_scale": 1}),
}


@pytest.mark.parametrize("target", sorted(CONVERSIONS))
def test_converted_package_stores_exactly_the_torch_weights_in_the_predicted_bytes(tmp_path, target: str):
    from coremltools.converters.mil.frontend.milproto.load import load as milproto_load

    """Through the exporter's own writer: palettized layers go through the lossless unique palettization pass,
    int8 through its metadata; either way the package holds exactly the PyTorch weights."""
    from pocketsd.export.backends.coreml.convert import CoreMLTarget, write_mlpackage
    from pocketsd.runtime.manifest import TensorSpec

    layers, expected_ops = CONVERSIONS[target]
    model = compress(small(), layers)
    expected_weights = {name: model.get_submodule(name).weight.detach().numpy().astype(np.float16) for name in layers}
    with torch.no_grad():
        out_shape = tuple(model(SMALL_INPUT).shape)
    path = str(tmp_path / "small.mlpackage")
    write_mlpackage(model, [SMALL_INPUT], [TensorSpec("x", "float32", tuple(SMALL_INPUT.shape))],
                    [TensorSpec("y", "float32", out_shape)], Path(path), CoreMLTarget(target, "fp16"))
    spec = ct.utils.load_spec(path)
    counts = _op_counts(spec)
    assert {op: counts[op] for op in counts if op.startswith("constexpr_")} == expected_ops
    weights_dir = os.path.join(path, "Data/com.apple.CoreML/weights")
    stored = sum(stored_weight_bytes(model, "fp16").values())
    # each blob is 64-byte aligned with a 64-byte header: a few % on a model this small
    assert abs(os.path.getsize(os.path.join(weights_dir, "weight.bin")) - stored) <= 0.05 * stored + 64 * 20
    decoded = milproto_load(spec, specification_version=spec.specificationVersion, file_weights_dir=weights_dir)
    dense = {op.name: op.materialized_val_inference() for op in decoded.functions["main"].operations
             if op.op_type.startswith("constexpr_") and op.outputs[0].child_ops}
    for name in layers:
        [value] = [v for k, v in dense.items() if k.startswith(f"p_{name}_weight")]
        assert np.array_equal(value, expected_weights[name]), name
