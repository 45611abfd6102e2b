"""CLIP text encoder: token ids → per-token hidden states (and the pooled end-of-text state).

Tensor names, dtypes and shapes are those of Apple's Swift StableDiffusionPipeline (float32 ``input_ids`` →
``last_hidden_state``, ``pooled_outputs``) in every backend: one contract for ONNX bundles and the Apple layout.
"""

from __future__ import annotations

import torch

from pocketsd.contract import TEXT_ENCODER_IO as IO
from pocketsd.export.components.base import WRAPPED, ComponentSpec, IOSpec


class TextEncoderWrapper(torch.nn.Module):
    def __init__(self, text_encoder: torch.nn.Module) -> None:
        super().__init__()
        setattr(self, WRAPPED, text_encoder)

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # ids come in as float32 (exact up to 2^24), as Apple's pipeline feeds CoreML; one contract for all backends
        out = getattr(self, WRAPPED)(input_ids.long(), return_dict=True)
        return out.last_hidden_state, out.pooler_output


SPEC = ComponentSpec(
    id="text_encoder",
    subfolder="text_encoder",
    inputs=(IOSpec(IO.input_ids, "float32", ("batch", "text_length"), example="tokens"),),
    outputs=(
        IOSpec(IO.last_hidden_state, "float32", ("batch", "text_length", "text_hidden")),
        IOSpec(IO.pooled_outputs, "float32", ("batch", "text_hidden")),
    ),
    make_wrapper=TextEncoderWrapper,
)
