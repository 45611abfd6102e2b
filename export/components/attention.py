"""Attention forms (``attention::original``, ``attention::split_einsum``, ``attention::sliced``), set through
diffusers' public ``set_attn_processor`` API — never by patching ``forward``.

``original`` is diffusers' own processor (one fused scaled-dot-product attention over all heads): what onnxruntime
and the Mac GPU run best. ``split_einsum`` computes each head separately with explicit einsums and softmax, the idea
of Apple's SPLIT_EINSUM for the Neural Engine: many small matmuls it can schedule instead of one batched multi-head
matmul behind reshapes. ``sliced`` computes attention a block of queries at a time, so the (heads × queries × keys)
score matrix is never whole: a 512² image's self-attention holds 8 × 4096 × 4096 fp32 scores (512 MiB) per call
in SD 1.5; sliced, no score block exceeds ``slice_mb`` MiB. The slices are Python loops over static shapes, so
``torch.export`` and the ONNX exporter write them as that many small MatMul → Softmax → MatMul chains, one after
the other. All three compute the same function; tests hold them equal.

``split_einsum`` and ``sliced`` scale the scores by the layer's own ``attn.scale`` (as diffusers' ``AttnProcessor``
does); diffusers' ``AttnProcessor2_0`` (``original``) always uses ``head_dim ** -0.5``, which is the same number
for every Stable Diffusion layer (``scale_qk=True``).
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from pocketsd.errors import InternalError, PresetError
from pocketsd.registry import Registry

MIB = 1 << 20
SCORE_BYTES = 4  # the budget counts fp32 scores, the dtype the graph is captured in


class _ExplicitAttnProcessor:
    """diffusers' attention processor protocol with the projections, norms and residual of ``AttnProcessor``; a
    subclass says in ``attend`` how the projected queries meet keys and values (all (batch, tokens, channels),
    heads side by side on the channel axis) and applies ``norm_q`` / ``norm_k`` per head."""

    def __call__(self, attn: Any, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args: Any,
                 **kwargs: Any) -> torch.Tensor:
        if attention_mask is not None:
            raise InternalError(f"{type(self).__name__} does not take attention masks (Stable Diffusion uses none)")
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
        hidden_states = self.attend(attn, query, key, value, key.shape[-1] // attn.heads).to(query.dtype)
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if image_shape is not None:
            hidden_states = hidden_states.transpose(-1, -2).reshape(image_shape)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def attend(self, attn: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               head_dim: int) -> torch.Tensor:
        raise NotImplementedError


def _softmax(attn: Any, scores: torch.Tensor) -> torch.Tensor:
    """Softmax over keys, in fp32 where the layer asks for it (``upcast_softmax``), as diffusers does."""
    probs = scores.float().softmax(dim=-1) if attn.upcast_softmax else scores.softmax(dim=-1)
    return probs.to(scores.dtype)


def _scores(attn: Any, query: torch.Tensor, key: torch.Tensor) -> torch.Tensor:
    if attn.upcast_attention:
        query, key = query.float(), key.float()
    return torch.matmul(query, key.transpose(-1, -2)) * attn.scale


class SplitEinsumAttnProcessor(_ExplicitAttnProcessor):
    """One head at a time, sliced off the channel axis, with explicit einsums."""

    def attend(self, attn: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               head_dim: int) -> torch.Tensor:
        heads = []
        for i in range(attn.heads):
            part = slice(i * head_dim, (i + 1) * head_dim)
            q, k = query[..., part], key[..., part]
            if attn.norm_q is not None:
                q = attn.norm_q(q)
            if attn.norm_k is not None:
                k = attn.norm_k(k)
            if attn.upcast_attention:
                q, k = q.float(), k.float()
            weights = torch.einsum("bqd,bkd->bqk", q, k) * attn.scale
            heads.append(torch.einsum("bqk,bkd->bqd", _softmax(attn, weights).to(value.dtype), value[..., part]))
        return torch.cat(heads, dim=-1)


def query_slice_length(rows: int, queries: int, keys: int, slice_mb: float) -> int:
    """The most queries whose scores (rows × slice × keys fp32) fit in ``slice_mb`` MiB; at least 1."""
    per_query = rows * keys * SCORE_BYTES
    return max(1, min(queries, int(slice_mb * MIB) // per_query))


class SlicedAttnProcessor(_ExplicitAttnProcessor):
    """Attention over blocks of queries: each layer's block length is chosen from its static shapes so that one
    block's scores (batch × heads × block × keys × 4 bytes) stay within ``slice_mb`` MiB."""

    def __init__(self, slice_mb: float = 16.0) -> None:
        if not slice_mb > 0:
            raise InternalError(f"slice_mb must be positive, not {slice_mb}")
        self.slice_mb = slice_mb

    def attend(self, attn: Any, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               head_dim: int) -> torch.Tensor:
        batch = query.shape[0]
        query, key, value = (x.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for x in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        queries = query.shape[2]
        step = query_slice_length(batch * attn.heads, queries, key.shape[2], self.slice_mb)
        blocks = []
        for start in range(0, queries, step):
            scores = _scores(attn, query[:, :, start:start + step], key)
            blocks.append(torch.matmul(_softmax(attn, scores).to(value.dtype), value))
        out = blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=2)
        return out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)


def _original(slice_mb: float) -> Any:
    from diffusers.models.attention_processor import AttnProcessor2_0

    return AttnProcessor2_0()


ATTENTION: Registry[Callable[[float], Any]] = Registry("attention", PresetError)
ATTENTION.register("original")(_original)
ATTENTION.register("split_einsum")(lambda slice_mb: SplitEinsumAttnProcessor())
ATTENTION.register("sliced")(SlicedAttnProcessor)


def set_attention(model: torch.nn.Module, form: str, slice_mb: float = 16.0) -> None:
    """Give every attention layer of a diffusers UNet or VAE the processor of ``form`` (``slice_mb``: the score
    budget of ``sliced``, in MiB). ``sliced`` also runs each transformer block's feed-forward over token slices."""
    processor = ATTENTION.get(form)(slice_mb)
    if hasattr(model, "set_attn_processor"):
        model.set_attn_processor(processor)
    if form == "sliced":
        slice_feed_forward(model, slice_mb)


def feed_forward_slice_length(tokens: int, width: int, slice_mb: float) -> int:
    """The most tokens, dividing ``tokens`` (diffusers' chunking needs equal slices), whose widest feed-forward
    activation (tokens × width fp32) fits in ``slice_mb`` MiB; at least 1."""
    fit = max(1, int(slice_mb * MIB) // (width * SCORE_BYTES))
    return max(d for d in range(1, min(tokens, fit) + 1) if tokens % d == 0)


def slice_feed_forward(model: torch.nn.Module, slice_mb: float) -> None:
    """Bound the feed-forward of every transformer block as ``sliced`` bounds attention scores: at 512² an SD 1.5
    block's GEGLU makes a 4096 × 2560 fp32 projection (40 MiB) and four 20 MiB halves and products per row,
    more than any score block. diffusers computes a block's feed-forward in token chunks when asked
    (``set_chunk_feed_forward``); the chunk length depends on the block's token count, known only when it runs
    (at capture, at static shapes), so a pre-hook sets it from the block's input each call."""

    def choose(block: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        width = max(m.out_features for m in block.ff.modules() if isinstance(m, torch.nn.Linear))
        tokens = int(hidden.shape[1])
        length = feed_forward_slice_length(tokens, width, slice_mb)
        block.set_chunk_feed_forward(length if length < tokens else None, dim=1)

    for module in model.modules():
        if hasattr(module, "set_chunk_feed_forward") and isinstance(getattr(module, "ff", None), torch.nn.Module):
            module.register_forward_pre_hook(choose, with_kwargs=True)
