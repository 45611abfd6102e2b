"""Every attention form computes the same function as diffusers' default, on a UNet and a VAE; sliced attention
keeps its score blocks within budget in the exported ONNX graph and in the order onnxruntime runs them."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.export

from importlib import resources  # noqa: E402
from pathlib import Path  # noqa: E402

from pocketsd.errors import PresetError  # noqa: E402
from pocketsd.export.components.attention import (  # noqa: E402
    ATTENTION,
    MIB,
    SlicedAttnProcessor,
    SplitEinsumAttnProcessor,
    feed_forward_slice_length,
    query_slice_length,
    set_attention,
)

MAX_ABS = 1e-5


def config(name: str, arch: str = "tiny") -> dict:
    return json.loads((resources.files("pocketsd.export") / "model_configs" / arch / f"{name}.json").read_text())


# sliced: 0.01 MiB cuts the tiny UNet's self-attention (2 × 8 heads × 256 keys) into one-query blocks and the VAE's
# mid-block attention (64 queries × 64 keys) into 40 + 24; 0.2 MiB into blocks of 12 and whole
# tiny-sd21: SD 2.x's upcast attention, linear projections and per-block head counts; every form must keep the
# module's own scale (head width 16 there, 4 in tiny)
@pytest.mark.parametrize("arch", ["tiny", "tiny-sd21"])
@pytest.mark.parametrize("form, slice_mb", [("split_einsum", 16.0), ("original", 16.0), ("sliced", 0.01),
                                            ("sliced", 0.2)])
def test_unet_attention_forms_agree(form: str, slice_mb: float, arch: str):
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**config("unet", arch)).eval()
    assert unet.config.upcast_attention == (arch == "tiny-sd21")
    args = (torch.randn(2, 4, 16, 16), torch.tensor([10.0, 500.0]), torch.randn(2, 77, 32))
    with torch.no_grad():
        expected = unet(*args).sample
        set_attention(unet, form, slice_mb=slice_mb)
        actual = unet(*args).sample
    assert (actual - expected).abs().max().item() <= MAX_ABS


def test_feed_forward_slices_divide_the_tokens_and_fit_the_budget():
    # SD 1.5 at 512²: 4096 tokens, GEGLU projection 2560 wide → 16 MiB holds 1638 tokens → 1024 (divides 4096)
    assert feed_forward_slice_length(4096, 2560, 16.0) == 1024
    assert feed_forward_slice_length(64, 2560, 16.0) == 64  # fits whole: no slicing
    assert feed_forward_slice_length(4096, 2560, 0.0001) == 1  # at least one token
    assert feed_forward_slice_length(100, 2560, 0.5) == 50  # the largest divisor that fits (51 would)


def test_sliced_form_slices_the_feed_forward_of_every_transformer_block():
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**config("unet")).eval()
    set_attention(unet, "sliced", slice_mb=0.01)
    with torch.no_grad():
        unet(torch.randn(1, 4, 16, 16), torch.tensor([10.0]), torch.randn(1, 77, 32))
    blocks = [m for m in unet.modules() if hasattr(m, "set_chunk_feed_forward") and hasattr(m, "ff")]
    assert blocks and all(b._chunk_size is not None and b._chunk_dim == 1 for b in blocks)


@pytest.mark.parametrize("form, slice_mb", [("split_einsum", 16.0), ("sliced", 0.01), ("sliced", 0.001)])
def test_vae_mid_block_attention_agrees(form: str, slice_mb: float):
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(**config("vae")).eval()
    z, x = torch.randn(1, 4, 8, 8), torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        expected = vae.decode(z).sample, vae.encode(x).latent_dist.mean
        set_attention(vae, form, slice_mb=slice_mb)
        actual = vae.decode(z).sample, vae.encode(x).latent_dist.mean
    for a, e in zip(actual, expected):
        assert (a - e).abs().max().item() <= MAX_ABS


@pytest.mark.parametrize("scale_qk", [True, False])
@pytest.mark.parametrize("cross", [False, True])
def test_explicit_forms_handle_every_attention_option(scale_qk: bool, cross: bool):
    """Spatial norm, group norm, 4-D input, norm_cross, residual, rescale, upcasts and the layer's own ``scale``,
    against diffusers' ``AttnProcessor`` (which uses ``attn.scale``, as ours do; ``AttnProcessor2_0`` does not)."""
    from diffusers.models.attention_processor import Attention, AttnProcessor

    torch.manual_seed(0)
    attn = Attention(32, cross_attention_dim=16 if cross else None, heads=4, dim_head=8, norm_num_groups=8,
                     spatial_norm_dim=4, cross_attention_norm="layer_norm" if cross else None,
                     residual_connection=True, rescale_output_factor=2.0, scale_qk=scale_qk, upcast_softmax=True,
                     upcast_attention=True).eval()
    x, temb = torch.randn(2, 32, 8, 8), torch.randn(2, 4, 4, 4)
    context = torch.randn(2, 10, 16) if cross else None
    with torch.no_grad():
        attn.set_processor(AttnProcessor())
        expected = attn(x, context, temb=temb)
        for processor in (SlicedAttnProcessor(0.0001), SplitEinsumAttnProcessor()):
            attn.set_processor(processor)
            assert (attn(x, context, temb=temb) - expected).abs().max().item() <= MAX_ABS, processor


def test_query_slice_length_keeps_scores_within_budget():
    assert query_slice_length(8, 4096, 4096, 16.0) == 128  # SD 1.5 at 512²: 8 heads × 128 × 4096 × 4 B = 16 MiB
    assert query_slice_length(16, 4096, 4096, 16.0) == 64  # batch 2 counts as heads
    assert query_slice_length(8, 4096, 4096, 0.001) == 1  # at least one query
    assert query_slice_length(8, 77, 77, 16.0) == 77  # never more than there are
    for rows, queries, keys, mb in [(8, 4096, 77, 1.0), (1, 1024, 1024, 0.3), (16, 256, 256, 0.01)]:
        step = query_slice_length(rows, queries, keys, mb)
        assert step == 1 or rows * step * keys * 4 <= mb * MIB < rows * (step + 1) * keys * 4


def test_unknown_form_lists_the_known_ones():
    with pytest.raises(PresetError) as err:
        ATTENTION.get("flash")
    assert "flash" in err.value.message and "original, sliced, split_einsum" in err.value.hint


def _sliced_vae_decoder_onnx(tmp_path: Path, slice_mb: float) -> Path:
    """The tiny VAE decoder at a 8×8 latent (64 queries and keys in its mid-block attention), sliced, as ONNX."""
    from pocketsd.export.backends.onnx.convert import write_onnx
    from pocketsd.export.capture import capture
    from pocketsd.export.components import SD_COMPONENTS, Dims

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(**config("vae")).eval()
    set_attention(vae, "sliced", slice_mb=slice_mb)
    dims = Dims(height=64, width=64, latent_channels=4, vae_scale_factor=8, text_length=77, text_hidden=32,
                vocab_size=1000, unet_batch=1)
    captured = capture(SD_COMPONENTS["vae_decoder"], vae, dims)
    path = tmp_path / "vae_decoder.onnx"
    write_onnx(captured.graph_module, captured.example_inputs, ["z"], ["image"], path)
    return path


def score_tensors(path: Path, keys: int) -> list[tuple[str, str, list[int]]]:
    """(op, node name, output shape) of every MatMul / Softmax whose output runs over ``keys`` keys."""
    import onnx

    model = onnx.shape_inference.infer_shapes(onnx.load(path))
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in model.graph.value_info}
    return [(node.op_type, node.name, shapes[node.output[0]]) for node in model.graph.node
            if node.op_type in ("MatMul", "Softmax") and shapes.get(node.output[0], [0])[-1:] == [keys]
            and len(shapes[node.output[0]]) == 4]


def test_sliced_onnx_has_no_score_block_over_budget(tmp_path: Path):
    slice_mb = 0.001  # 1048 bytes: 4 queries × 64 keys × 4 B per block → 16 blocks
    scores = score_tensors(_sliced_vae_decoder_onnx(tmp_path, slice_mb), keys=64)
    assert [op for op, _, _ in scores].count("Softmax") == 16
    for op, name, shape in scores:
        size = 1
        for dim in shape:
            size *= dim
        assert size * 4 <= slice_mb * MIB, (op, name, shape)


def test_onnxruntime_runs_the_slices_one_after_another(tmp_path: Path):
    """Each block's scores are consumed (probabilities × values) before the next block's scores are computed,
    in onnxruntime's own execution order (from its profile, after its graph optimizations)."""
    import json

    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "profile")
    session = ort.InferenceSession(str(_sliced_vae_decoder_onnx(tmp_path, 0.001)), options,
                                   providers=["CPUExecutionProvider"])
    session.run(None, {"z": np.random.default_rng(0).standard_normal((1, 4, 8, 8), dtype=np.float32)})
    events = json.loads(Path(session.end_profiling()).read_text())
    ops = [e["args"]["op_name"] for e in events if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    order = [op for op in ops if op in ("Softmax", "MatMul")]
    assert order.count("Softmax") == 16
    softmaxes = [i for i, op in enumerate(order) if op == "Softmax"]
    for a, b in zip(softmaxes, softmaxes[1:]):
        assert order[a + 1] == "MatMul" and a + 1 < b  # this block's probabilities × values, before the next block
