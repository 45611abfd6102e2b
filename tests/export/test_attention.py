"""Both attention forms compute the same function as diffusers' default, on a UNet and a VAE."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.export

from importlib import resources  # noqa: E402

from pocketsd.errors import PresetError  # noqa: E402
from pocketsd.export.components.attention import ATTENTION, set_attention  # noqa: E402

MAX_ABS = 1e-5


def config(name: str) -> dict:
    return json.loads((resources.files("pocketsd.export") / "model_configs" / "tiny" / f"{name}.json").read_text())


@pytest.mark.parametrize("form", ["split_einsum", "original"])
def test_unet_attention_forms_agree(form: str):
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**config("unet")).eval()
    args = (torch.randn(2, 4, 16, 16), torch.tensor([10.0, 500.0]), torch.randn(2, 77, 32))
    with torch.no_grad():
        expected = unet(*args).sample
        set_attention(unet, form)
        actual = unet(*args).sample
    assert (actual - expected).abs().max().item() <= MAX_ABS


def test_vae_mid_block_attention_agrees():
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(**config("vae")).eval()
    z = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        expected = vae.decode(z).sample
        set_attention(vae, "split_einsum")
        actual = vae.decode(z).sample
    assert (actual - expected).abs().max().item() <= MAX_ABS


def test_unknown_form_lists_the_known_ones():
    with pytest.raises(PresetError) as err:
        ATTENTION.get("flash")
    assert "flash" in err.value.message and "original, split_einsum" in err.value.hint
