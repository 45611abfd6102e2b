"""Attention forms (``attention::original``, ``attention::split_einsum``), set through diffusers' public
``set_attn_processor`` API — never by patching ``forward``.

``original`` is diffusers' own processor (one fused scaled-dot-product attention over all heads): what onnxruntime
and the Mac GPU run best. ``split_einsum`` computes each head separately with explicit einsums and softmax, the idea
of Apple's SPLIT_EINSUM for the Neural Engine: many small matmuls it can schedule instead of one batched multi-head
matmul behind reshapes. Both compute the same function; a test holds them equal.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from pocketsd.errors import InternalError, PresetError
from pocketsd.registry import Registry


class SplitEinsumAttnProcessor:
    """diffusers' attention processor protocol, one head at a time."""

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        if attention_mask is not None:
            raise InternalError("split_einsum attention does not take attention masks (Stable Diffusion uses none)")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        if image_shape is not None:
            b, c, h, w = image_shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        head_dim = key.shape[-1] // attn.heads
        heads = []
        for i in range(attn.heads):
            part = slice(i * head_dim, (i + 1) * head_dim)
            q, k = query[..., part], key[..., part]
            if attn.norm_q is not None:
                q = attn.norm_q(q)
            if attn.norm_k is not None:
                k = attn.norm_k(k)
            weights = torch.einsum("bqd,bkd->bqk", q, k) * (head_dim ** -0.5)
            heads.append(torch.einsum("bqk,bkd->bqd", weights.softmax(dim=-1), value[..., part]))
        hidden_states = attn.to_out[1](attn.to_out[0](torch.cat(heads, dim=-1)))
        if image_shape is not None:
            hidden_states = hidden_states.transpose(-1, -2).reshape(image_shape)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def _original() -> Any:
    from diffusers.models.attention_processor import AttnProcessor2_0

    return AttnProcessor2_0()


ATTENTION: Registry[Callable[[], Any]] = Registry("attention", PresetError)
ATTENTION.register("original")(_original)
ATTENTION.register("split_einsum")(SplitEinsumAttnProcessor)


def set_attention(model: torch.nn.Module, form: str, slice_mb: float = 16.0) -> None:
    """Give every attention layer of a diffusers UNet or VAE the processor of ``form``."""
    if hasattr(model, "set_attn_processor"):
        model.set_attn_processor(ATTENTION.get(form)())
