"""The mixed-bit recipe: per-layer bits that keep the component above a PSNR budget in few forward passes."""

from __future__ import annotations

import copy
import gc
import math
import warnings

import pytest

torch = pytest.importorskip("torch")
ct = pytest.importorskip("coremltools")
pytestmark = pytest.mark.export

from torch import nn  # noqa: E402

from pocketsd.errors import PresetError  # noqa: E402
from pocketsd.export.compression import mixed_bit  # noqa: E402
from pocketsd.export.compression.coreml_optimize import (  # noqa: E402
    CompressionConfig,
    LayerCompression,
    compress,
    compression_buffers,
    parse_compression,
    resolve_layers,
    simulated_psnr,
)
from pocketsd.export.compression.mixed_bit import choose_mixed_bits  # noqa: E402
from tests.export.compression_helpers import KIND, SMALL_INPUT, config, run_small, run_unet, small, tiny_unet  # noqa: E402


# --------------------------------------------------------------------------------------------- mixed bits
def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_mixed_bits_meet_the_budget_with_fewer_bits_in_few_passes():
    reference = run_small(small())
    psnr = {}
    for nbits in (4, 8):
        model = small()
        compress(model, resolve_layers(model, config(mode="palettize", nbits=nbits)))
        psnr[nbits] = simulated_psnr(reference, run_small(model))
    budget = (psnr[4] + psnr[8]) / 2
    model = small()
    cfg = CompressionConfig(mixed_bit=parse_compression(
        {"mixed_bit": {"bits": [4, 6, 8], "min_psnr_db": budget}}, "u", "iOS17").mixed_bit)
    chosen, report = choose_mixed_bits(model, run_small, cfg)
    layers = len(chosen)
    assert layers == 3 and report["psnr_db"] >= budget
    assert simulated_psnr(reference, run_small(model)) == report["psnr_db"]
    assert report["average_bits"] < 8 and sum(report["bits_histogram"].values()) == layers
    assert report["forward_passes"] <= 2 + 3 * math.ceil(math.log2(layers + 1)) + 2
    assert report["proxy"] == "output_jacobian" and report["gradient_passes"] == 4
    again = small()
    compress(again, chosen)
    assert _same_state(model, again)  # the model is left as compress(model, chosen) leaves it
    state = copy.deepcopy(model)
    compress(model, chosen)
    assert _same_state(model, state)  # and compressing it again changes nothing


def test_mixed_bits_on_tiny_unet_keep_pins_and_exclusions():
    reference = run_unet(tiny_unet())
    model = tiny_unet()
    cfg = parse_compression({"mixed_bit": {"bits": [2, 4], "min_psnr_db": 20},
                             "op_name": {"conv_in": None, "conv_out": {"mode": "linear_int8"}}}, "u", "iOS17")
    chosen, report = choose_mixed_bits(model, run_unet, cfg)
    assert "conv_in" not in chosen and KIND not in compression_buffers(model.conv_in)
    assert chosen["conv_out"] == LayerCompression("linear_int8", 8, "per_channel")
    assert report["pinned"] == 1 and report["layers"] == len(chosen) - 1
    assert report["bits_histogram"]["2"] > 0 and report["bits_histogram"]["4"] > 0
    assert report["psnr_db"] >= 20 and simulated_psnr(reference, run_unet(model)) == report["psnr_db"]
    assert report["forward_passes"] <= 2 + math.ceil(math.log2(report["layers"] + 1))


def test_mixed_bits_to_an_average_take_the_least_damaging_layers_first():
    """``average_bits`` (Apple's recipe form, iphone-sdxl): narrowed in the ranking's order until the average per
    weight element reaches the target; one forward pass per width, and the PSNR reported is the model's."""
    reference = run_unet(tiny_unet())
    model = tiny_unet()
    cfg = parse_compression({"mixed_bit": {"bits": [4, 6], "average_bits": 4.5, "min_psnr_db": 10}}, "u", "iOS17")
    chosen, report = choose_mixed_bits(model, run_unet, cfg)
    assert 4.0 < report["average_bits"] <= 4.5
    assert report["bits_histogram"]["4"] > report["bits_histogram"]["6"] > 0
    assert report["forward_passes"] == 3  # the reference, all at 6 bits, the chosen mix
    assert simulated_psnr(reference, run_unet(model)) == report["psnr_db"]
    for bad in (3, 7, "4.5", True):
        with pytest.raises(PresetError, match="average_bits"):
            parse_compression({"mixed_bit": {"bits": [4, 6], "average_bits": bad, "min_psnr_db": 10}}, "u", "iOS17")


def test_mixed_bits_without_gradients_rank_by_weight_error():
    def run_no_grad(model):
        with torch.no_grad():
            return model(SMALL_INPUT)  # a bare tensor is one output

    model = small()
    cfg = parse_compression({"mixed_bit": {"bits": [2, 8], "min_psnr_db": 40}}, "u", "iOS17")
    chosen, report = choose_mixed_bits(model, run_no_grad, cfg)
    assert report["proxy"] == "weight_error" and report["gradient_passes"] == 0
    assert report["psnr_db"] >= 40 and len(chosen) == 3
    assert all(p.requires_grad for p in model.parameters())  # the probes' requires_grad changes are undone


def _live_tensor_bytes() -> int:
    """Bytes of every tensor storage Python holds (parameters, buffers, caches; not autograd's saved tensors).
    Only plain tensors: fake and functional ones, left in this worker by another test's ``torch.export``, hold no
    memory and have no data pointer."""
    storages = {}
    with warnings.catch_warnings():  # isinstance on torch's deprecated module attributes warns
        warnings.simplefilter("ignore")
        tensors = [obj for obj in gc.get_objects() if type(obj) in (torch.Tensor, torch.nn.Parameter)]
    for tensor in tensors:
        if tensor.device.type == "meta":
            continue
        storage = tensor.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def test_mixed_bits_hold_no_copy_of_the_weights_in_memory(monkeypatch: pytest.MonkeyPatch):
    """The originals and each width's palettes go to the spill file, read back a layer at a time: in memory the
    search holds the model and little more (held there, they were 1.5× the fp32 model, and the gradients 1× more:
    the full-size SDXL iphone-sdxl export was killed at 24.7 GB); a diffusers UNet recomputes its activations in the
    probes' backward passes; the file is closed at the end."""
    model = tiny_unet()
    before = _live_tensor_bytes()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    spills, during = [], []
    real_spill, real_measure = mixed_bit._Spill, mixed_bit._Search.measure

    class Recorded(real_spill):
        def __init__(self, folder) -> None:
            super().__init__(folder)
            spills.append(self)

    def measure(search):
        during.append(_live_tensor_bytes())
        return real_measure(search)

    checkpointed = []
    real_take = mixed_bit._Search._take

    def take(search, *args):
        if not checkpointed:
            checkpointed.append(search.model.is_gradient_checkpointing)
        return real_take(search, *args)

    monkeypatch.setattr(mixed_bit, "_Spill", Recorded)
    monkeypatch.setattr(mixed_bit._Search, "measure", measure)
    monkeypatch.setattr(mixed_bit._Search, "_take", take)
    cfg = parse_compression({"mixed_bit": {"bits": [4, 6], "average_bits": 4.5, "min_psnr_db": 10}}, "u", "iOS17")
    chosen, report = choose_mixed_bits(model, run_unet, cfg)
    (spill,) = spills
    searched = sum(m.weight.numel() for n, m in model.named_modules() if n in chosen)
    assert spill.bytes_written == 3 * 2 * searched  # fp16 originals, then the 6-bit and the 4-bit palettes
    assert len(during) == 2 and max(during) - before < 0.1 * model_bytes, (before, during, model_bytes)
    assert spill._file.closed and report["gradient_passes"] == 4
    assert all(p.grad is None for p in model.parameters())
    assert checkpointed == [True] and not model.is_gradient_checkpointing  # recomputed in the probes, then off again


def test_mixed_bits_out_of_reach_is_a_preset_error():
    cfg = parse_compression({"mixed_bit": {"bits": [2, 4], "min_psnr_db": 150}}, "test.yaml: unet", "iOS17")
    with pytest.raises(PresetError, match=r"test.yaml: unet.mixed_bit.min_psnr_db 150 is out of reach"):
        choose_mixed_bits(small(), run_small, cfg)


def test_simulated_psnr_matches_parity_definition():
    ref = [torch.tensor([1.0, -2.0, 0.5, 0.0])]
    assert simulated_psnr(ref, [ref[0].clone()]) == 200.0
    noisy = ref[0] + torch.tensor([0.02, -0.02, 0.02, -0.02])
    assert simulated_psnr(ref, [noisy]) == round(20 * math.log10(2.0 / 0.02), 2)
    assert simulated_psnr(ref + [ref[0]], [ref[0], noisy]) == simulated_psnr(ref, [noisy])  # worst output


@pytest.mark.slow
def test_parallel_kmeans_workers_start_under_pytest():
    model, serial = small(), small()
    layers = {"proj": LayerCompression("palettize", 4), "out": LayerCompression("palettize", 4)}
    compress(model, layers, workers=2)
    compress(serial, layers)
    assert _same_state(model, serial)
