"""Small models and inputs shared by the compression tests."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from torch import nn  # noqa: E402

from pocketsd.export.compression.coreml_optimize import CompressionConfig, LayerCompression  # noqa: E402

LUT, SCALE, KIND = "_COREML_/weight/lut", "_COREML_/weight/quantization_scale", "_COREML_/weight/compression_type"


class Small(nn.Module):
    """conv_a is below the default threshold (4·8·9 = 288 weights); the rest are above it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv_a = nn.Conv2d(4, 8, 3, padding=1)
        self.conv_b = nn.Conv2d(8, 32, 3, padding=1)
        self.proj = nn.Linear(32, 96)
        self.out = nn.Linear(96, 32)
        self.norm = nn.LayerNorm(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_b(torch.relu(self.conv_a(x)))  # [B, 32, H, W]
        h = h.flatten(2).transpose(1, 2)  # [B, HW, 32]
        return self.norm(h + self.out(torch.nn.functional.gelu(self.proj(h))))


def small() -> Small:
    torch.manual_seed(0)
    return Small().eval()


SMALL_INPUT = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))


def tiny_unet():
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32).eval()


_g = torch.Generator().manual_seed(1)
UNET_INPUTS = (torch.randn(1, 4, 16, 16, generator=_g), torch.tensor([10.0]), torch.randn(1, 77, 32, generator=_g))


def run_unet(model):  # autograd stays on: choose_mixed_bits ranks layers with gradients
    return [model(*UNET_INPUTS, return_dict=False)[0]]


def run_small(model):
    return [model(SMALL_INPUT)]


def assert_fp16_exact(t: torch.Tensor) -> None:
    assert torch.equal(t, t.half().float())


def config(**global_config) -> CompressionConfig:
    return CompressionConfig(global_config=LayerCompression(**global_config))
