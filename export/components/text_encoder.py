"""CLIP text encoder: token ids → per-token hidden states (and the pooled end-of-text state)."""

from __future__ import annotations

import torch

from pocketsd.export.components.base import WRAPPED, ComponentSpec, IOSpec


class TextEncoderWrapper(torch.nn.Module):
    def __init__(self, text_encoder: torch.nn.Module) -> None:
        super().__init__()
        setattr(self, WRAPPED, text_encoder)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = getattr(self, WRAPPED)(input_ids, return_dict=True)
        return out.last_hidden_state, out.pooler_output


SPEC = ComponentSpec(
    id="text_encoder",
    subfolder="text_encoder",
    inputs=(IOSpec("input_ids", "int64", ("batch", "text_length"), example="tokens"),),
    outputs=(
        IOSpec("last_hidden_state", "float32", ("batch", "text_length", "text_hidden")),
        IOSpec("pooled_output", "float32", ("batch", "text_hidden")),
    ),
    make_wrapper=TextEncoderWrapper,
)
