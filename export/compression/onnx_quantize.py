"""``onnx::int8_weights`` / ``onnx::int4_weights``: store a written chunk's quantized weights as int8 / int4.

``onnx_weights.py`` fake-quantizes the weights in PyTorch before capture, so the chunk file that the ONNX
writer wrote holds fp32 weights lying exactly on an int8 / int4 grid. This pass finds them by consumer and input slot,
matches each with the PyTorch parameter it came from (by value: the exporter renames transposed Linear weights
``val_N``), recomputes integers and scales from the stored values — refusing, as our bug, any weight that is not
exactly representable — and rewrites the chunk so that only integers and scales are stored:

  ===========================  ====================================================================================
  Conv, input 1                DequantizeLinear → Conv. int8: one scale per output channel (axis 0); int4: blocks
                               of B input channels (axis 1, ``block_size`` B, opset 21, a partial last block).
                               A weight over 16 MiB of fp32: one such pair per output-channel range, then Concat
  MatMul input 1 [K, N]; Gemm  int8: DequantizeLinear of [N, K] (one scale per output channel, axis 0) →
  input 1 (transA 0, α = β = 1)  com.microsoft FusedMatMul (transB) / Gemm (transB), per ≤ 16 MiB output range, then
                               Concat. int4: com.microsoft MatMulNBits, blocks along K (Gemm's bias as its bias)
  Gather input 0 (token table) com.microsoft GatherBlockQuantized, bits 8, one scale per row
  ===========================  ====================================================================================

Why these forms (measured with onnxruntime 1.31, CPU):

- onnxruntime does not constant-fold DequantizeLinear at session load (its constant folding skips DQ nodes unless
  ``session.disable_quant_qdq`` is set, which the runtime must never do), so Conv weights stay int8 / int4 in memory:
  a 150 MB-fp32 UNet chunk opens at 108 MB peak RSS in int8 against 357 MB in fp32. There is no weight-only
  quantized Conv kernel: each run dequantizes Conv weights into the arena (onnxruntime's default order runs many DQs
  ahead of their Convs; still 376 MB peak against 574 MB; ``execution_order = PRIORITY_BASED`` is worse, 539 MB,
  as fused nodes get late indices) and runs the Conv in fp32 without NCHWc prepacking: 1.1-1.25x the fp32 time.
- MatMul, int4: onnxruntime fuses DequantizeLinear → MatMul into MatMulNBits by itself at load, but computes it
  at the session's ``session.qdq_matmulnbits_accuracy_level`` (default 4: activations quantized to int8; 0.48 max
  abs on a 768-wide random layer, i.e. not the graph PyTorch checked). We write MatMulNBits with no
  ``accuracy_level`` (fp32 compute), so chunks match PyTorch whatever the runtime's session options; with weight
  prepacking (resident sessions) its 4-bit kernel runs at fp32 MatMul speed. ``MatMulNBitsQuantizer``
  (onnxruntime.quantization) computes its own scales from fp32 weights; we must keep exactly the grid PyTorch
  measured, so the packing (a few numpy lines) is written here.
- MatMul, int8: MatMulNBits has no fast 8-bit fp32 kernel. Each call dequantizes the whole weight into a buffer of
  its own outside onnxruntime's arena, so every call also page-faults that buffer in (1280×10240 at 64 tokens:
  30 ms against 6 ms in fp32). A DequantizeLinear's output comes from the session's allocator instead (reused by
  the second guidance row of a streamed chunk), and FusedMatMul with ``transB`` (which onnxruntime does not fuse
  back into MatMulNBits, unlike DQ → MatMul or DQ → Transpose → MatMul) multiplies in fp32: SD 1.5's streamed
  UNet step at 512² took 5.7-5.9 s instead of 7.0-7.3 s, and int8 [N, K] with one scale per channel is also the
  smaller file. Each use gets its own DequantizeLinear (integers stored once): no fp32 weight lives across slices.
- Gather: GatherBlockQuantized gathers int8 rows and scales only those, so the fp32 table never exists at run time
  (a DequantizeLinear of the table would build all of it on every run). uint8 with its default zero point 128 holds
  q + 128 exactly; ``block_size`` is the row length rounded up to a power of two, i.e. one scale per row. Checked
  bit-exact against PyTorch's fake-quantized embedding.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import ml_dtypes
import numpy as np
import onnx_ir as ir
from onnxscript import version_converter

from pocketsd.errors import InternalError
from pocketsd.export.backends.onnx.files import save_chunk_model

log = logging.getLogger(__name__)

QMAX = {"int8": 127, "int4": 7}
MS_DOMAIN = "com.microsoft"
DEQUANTIZED_PIECE_BYTES = 16 * 2**20  # most fp32 bytes of a Conv or int8 Linear weight dequantized at once


# ---- stored bytes: what each quantized weight costs in the file (the planner balances chunks by these) ----

def stored_bytes(kind: str, mode: str, shape: tuple[int, ...], block_size: int) -> int:
    """Bytes of a quantized weight in the chunk file. ``shape`` is PyTorch's ([O, I, kh, kw], [out, in], [V, D])."""
    numel = int(np.prod(shape))
    if kind == "embedding":
        return numel + 4 * shape[0]
    if mode == "int8" and kind in ("conv", "linear"):  # int8 [out, ...] and one fp32 scale per output channel
        return numel + 4 * shape[0]
    if kind == "conv":
        out, inp, *kernel = shape
        return -(-numel // 2) + 4 * out * int(np.prod(kernel)) * -(-inp // block_size)
    if kind == "linear":  # int4 MatMulNBits: K padded to whole blocks, one scale per block
        n, k = shape
        blocks = -(-k // block_size)
        return n * blocks * block_size // 2 + 4 * n * blocks
    raise InternalError(f"unknown weight kind {kind!r}")


# ---- exact integers and scales from dequantized values ----

def recover_grid(groups: np.ndarray, qmax: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """``groups`` [..., n] fp32, each row ``q · s`` for integers |q| ≤ qmax and one fp32 scale s per row → (q int8,
    s fp32) with ``q · s`` equal to ``groups`` bit for bit. The scale is found from the row's peak (s ≈ peak / qmax,
    tried at ±2 ulp since the division may not round-trip); a row no scale reproduces is our bug."""
    rows = groups.reshape(-1, groups.shape[-1])
    base = (np.abs(rows).max(axis=-1) / np.float32(qmax)).astype(np.float32)
    scale, q_out = np.zeros_like(base), np.zeros(rows.shape, np.int8)
    todo = np.arange(len(rows))  # rows not yet reproduced exactly
    for step in (0, 1, -1, 2, -2):
        s = base[todo]
        for _ in range(abs(step)):
            s = np.nextafter(s, np.float32(np.inf if step > 0 else -np.inf)).astype(np.float32)
        sub = rows if len(todo) == len(rows) else rows[todo]
        q = np.clip(np.rint(sub / np.where(s == 0, np.float32(1), s)[:, None]), -qmax, qmax)
        exact = np.all(q.astype(np.float32) * s[:, None] == sub, axis=-1)
        scale[todo[exact]], q_out[todo[exact]] = s[exact], q[exact].astype(np.int8)
        todo = todo[~exact]
        if not len(todo):
            return q_out.reshape(groups.shape), scale.reshape(groups.shape[:-1])
    raise InternalError(f"{what}: weight group {int(todo[0])} is not on an int grid with |q| ≤ {qmax} (PyTorch "
                        "fake-quantized it; did the exporter change it?)")


def _pad_last(x: np.ndarray, multiple: int) -> np.ndarray:
    extra = -x.shape[-1] % multiple
    return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, extra)]) if extra else x


def conv_weight(w: np.ndarray, mode: str, block: int, what: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """Conv weight [O, I, kh, kw] → (q, scale, DequantizeLinear attributes)."""
    out, inp = w.shape[:2]
    if mode == "int8":
        q, s = recover_grid(w.reshape(out, -1), QMAX[mode], what)
        return q.reshape(w.shape), s, {"axis": 0}
    by_input = _pad_last(np.transpose(w, (0, 2, 3, 1)), block)  # [O, kh, kw, I'] with I' a multiple of block
    q, s = recover_grid(by_input.reshape(*by_input.shape[:3], -1, block), QMAX[mode], what)
    q = q.reshape(by_input.shape)[..., :inp].transpose(0, 3, 1, 2)
    return np.ascontiguousarray(q), np.ascontiguousarray(s.transpose(0, 3, 1, 2)), {"axis": 1, "block_size": block}


def matmul_nbits_weight(w_nk: np.ndarray, block: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Linear weight [N, K] on the int4 grid → MatMulNBits B (uint8 [N, k_blocks, block / 2]) and scales
    [N, k_blocks]."""
    n, k = w_nk.shape
    padded = _pad_last(w_nk, block).reshape(n, -1, block)
    q, scales = recover_grid(padded, QMAX["int4"], what)
    u = (q.astype(np.int16) + 8).astype(np.uint8)  # MatMulNBits' default zero point for 4 bits is 8
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8), scales  # low nibble first


# ---- the graph rewrite ----

@dataclass
class _Rewrite:
    graph: ir.Graph
    mode: str
    block_size: int
    chunk_id: str
    by_value: Mapping[tuple, str]  # (shape, sha1 of the bytes) → parameter name, in the layout the ONNX uses
    done: dict[str, str] = field(default_factory=dict)  # parameter name → op written
    min_opset: int = 0

    def initializer(self, array: np.ndarray, name: str, dtype: ir.DataType | None = None) -> ir.Value:
        value = ir.Value(name=name, const_value=ir.Tensor(array, dtype=dtype, name=name))
        value.shape, value.dtype = value.const_value.shape, value.const_value.dtype
        self.graph.register_initializer(value)
        return value


def _key(array: np.ndarray) -> tuple:
    return tuple(array.shape), hashlib.sha1(np.ascontiguousarray(array).tobytes()).hexdigest()


def _candidate(usage: ir.Usage) -> str | None:
    """Which rewrite an initializer's use calls for: by consumer op and input slot."""
    node, slot = usage.node, usage.idx
    if node.domain not in ("", "ai.onnx"):
        return None
    attrs = {k: a.value for k, a in node.attributes.items()}
    if node.op_type == "Conv" and slot == 1:
        return "conv"
    if node.op_type == "MatMul" and slot == 1:
        return "matmul"
    if node.op_type == "Gemm" and slot == 1 and not attrs.get("transA", 0) and attrs.get("alpha", 1.0) == 1.0 \
            and attrs.get("beta", 1.0) == 1.0:
        return "gemm_t" if attrs.get("transB", 0) else "gemm"
    if node.op_type == "Gather" and slot == 0 and attrs.get("axis", 0) == 0:
        return "gather"
    return None


def output_pieces(out_channels: int, channel_bytes: int, limit: int | None = None) -> list[tuple[int, int]]:
    """Output-channel ranges [a, b) of at most ``limit`` (default DEQUANTIZED_PIECE_BYTES) dequantized fp32 bytes
    each, as equal as possible."""
    limit = limit or DEQUANTIZED_PIECE_BYTES
    per_piece = max(1, limit // channel_bytes)
    n = -(-out_channels // per_piece)  # equal pieces of at most ceil(out / n) ≤ per_piece channels
    bounds = [i * out_channels // n for i in range(n + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _sliceable_bias(node: ir.Node) -> bool:
    bias = node.inputs[2] if len(node.inputs) > 2 else None
    return bias is None or bias.const_value is not None


def _rewrite_conv(rw: _Rewrite, value: ir.Value, w: np.ndarray, name: str) -> None:
    q, s, attrs = conv_weight(w, rw.mode, rw.block_size, f"{rw.chunk_id}: {name}")
    dtype = ir.DataType.INT8 if rw.mode == "int8" else ir.DataType.INT4
    pieces = output_pieces(w.shape[0], 4 * int(np.prod(w.shape[1:])))
    uses = list(value.uses())
    if len(pieces) > 1 and all(u.node.op_type == "Conv" and u.node.attributes.get_int("group", 1) == 1
                               and _sliceable_bias(u.node) for u in uses):
        for usage in uses:
            _split_conv(rw, usage.node, q, s, attrs, dtype, pieces, name)
    else:
        dq = _dequantize(rw, q, s, attrs, dtype, name, value)
        value.replace_all_uses_with(dq.outputs[0])
    rw.min_opset = max(rw.min_opset, 21 if rw.mode == "int4" else 19)
    rw.done[name] = "DequantizeLinear"


def _dequantize(rw: _Rewrite, q: np.ndarray, s: np.ndarray, attrs: dict, dtype: ir.DataType, name: str,
                like: ir.Value | None = None) -> ir.Node:
    qv = rw.initializer(q if rw.mode == "int8" else q.astype(ml_dtypes.int4), f"{name}.{rw.mode}", dtype)
    sv = rw.initializer(s, f"{name}.scale")
    return _dequantize_stored(rw, qv, sv, attrs, name, like.shape if like is not None else ir.Shape(list(q.shape)))


def _dequantize_stored(rw: _Rewrite, qv: ir.Value, sv: ir.Value, attrs: dict, name: str, shape: ir.Shape) -> ir.Node:
    dq = ir.node("DequantizeLinear", [qv, sv], attributes=attrs, name=f"{name}.dequantize")
    dq.outputs[0].name, dq.outputs[0].dtype, dq.outputs[0].shape = f"{name}.dequantized", ir.DataType.FLOAT, shape
    # At the head of the node list, not before the Conv: onnxruntime orders execution by a depth-first walk back
    # from the outputs that visits a node's highest-index input first, so a DequantizeLinear placed late in the
    # list runs early and its fp32 weight stays alive until its Conv. Placed first, each runs just before its Conv
    # (16 int8 512×512×3×3 Convs: 100 MB peak instead of 235 MB, for 151 MB of fp32 weights).
    rw.graph.insert_before(next(iter(rw.graph)), dq)
    return dq


def _split_conv(rw: _Rewrite, conv: ir.Node, q: np.ndarray, s: np.ndarray, attrs: dict, dtype: ir.DataType,
                pieces: list[tuple[int, int]], name: str) -> None:
    """One Conv → a Conv per output-channel range, each with its own DequantizeLinear, then Concat.

    onnxruntime has no weight-only quantized Conv: each run dequantizes the whole fp32 weight before the Conv, and
    for wide layers (Cout ≥ 1280 here) the Conv also expands its whole input (im2col). SD 1.5's 2560→1280 3×3 Conv at
    32² peaks 208 MB above its input that way; in pieces of ≤ 16 MiB, 19 MB, bit-identical, and faster (197 vs 247
    ms: the smaller Convs take MLAS's segmented path)."""
    bias = conv.inputs[2] if len(conv.inputs) > 2 else None
    outputs = []
    for i, (a, b) in enumerate(pieces):
        dq = _dequantize(rw, q[a:b], s[a:b], attrs, dtype, f"{name}.{i}")
        inputs = [conv.inputs[0], dq.outputs[0]]
        if bias is not None:
            inputs.append(rw.initializer(bias.const_value.numpy()[a:b], f"{bias.name}.{i}"))
        piece = ir.node("Conv", inputs, attributes={k: a_.value for k, a_ in conv.attributes.items()},
                        name=f"{conv.name}.{i}")
        piece.outputs[0].dtype = conv.outputs[0].dtype
        outputs.append(piece)
    concat = ir.node("Concat", [p.outputs[0] for p in outputs], attributes={"axis": 1}, name=f"{conv.name}.concat")
    concat.outputs[0].shape, concat.outputs[0].dtype = conv.outputs[0].shape, conv.outputs[0].dtype
    ir.convenience.replace_nodes_and_values(rw.graph, conv, [conv], [*outputs, concat], conv.outputs,
                                            concat.outputs)
    if bias is not None and not bias.uses() and bias.name in rw.graph.initializers:
        rw.graph.initializers.pop(bias.name)


def _replace_node(rw: _Rewrite, old: ir.Node, new: ir.Node) -> None:
    ir.convenience.replace_nodes_and_values(rw.graph, old, [old], [new], old.outputs, new.outputs)


def _gemm_bias(rw: _Rewrite, node: ir.Node, n: int) -> ir.Value | None:
    bias = node.inputs[2] if node.op_type == "Gemm" and len(node.inputs) > 2 else None  # MatMul: none
    if bias is not None and (bias.shape is None or tuple(bias.shape) != (n,)):
        raise InternalError(f"{rw.chunk_id}: Gemm {node.name} has a bias of shape {bias.shape}, not [{n}]")
    return bias


def _rewrite_linear(rw: _Rewrite, value: ir.Value, w_nk: np.ndarray, name: str) -> None:
    if rw.mode == "int8":
        _rewrite_linear_int8(rw, value, w_nk, name)
        return
    n, k = w_nk.shape
    packed, scales = matmul_nbits_weight(w_nk, rw.block_size, f"{rw.chunk_id}: {name}")
    bv = rw.initializer(packed, f"{name}.{rw.mode}")
    sv = rw.initializer(scales, f"{name}.scale")
    for usage in list(value.uses()):
        old = usage.node
        bias = _gemm_bias(rw, old, n)
        inputs = [old.inputs[0], bv, sv] + ([None, None, bias] if bias is not None else [])  # no zero points
        new = ir.node("MatMulNBits", inputs, domain=MS_DOMAIN,
                      attributes={"K": k, "N": n, "bits": 4, "block_size": rw.block_size}, name=f"{old.name}.nbits")
        _replace_node(rw, old, new)
    rw.done[name] = "MatMulNBits"


def _rewrite_linear_int8(rw: _Rewrite, value: ir.Value, w_nk: np.ndarray, name: str) -> None:
    """Each MatMul / Gemm using the weight → per output range [a, b): DequantizeLinear(int8 [b - a, K]) →
    FusedMatMul(x, ·, transB) or Gemm(x, ·, bias[a:b], transB), then Concat on the last axis (see the module
    docstring). The integers and scales are stored once; every use dequantizes its own copy."""
    (n, k), (q, s) = w_nk.shape, recover_grid(w_nk, QMAX["int8"], f"{rw.chunk_id}: {name}")
    pieces = output_pieces(n, 4 * k)
    stored = [(rw.initializer(q[a:b], f"{name}.{i}.int8" if len(pieces) > 1 else f"{name}.int8"),
               rw.initializer(s[a:b], f"{name}.{i}.scale" if len(pieces) > 1 else f"{name}.scale"))
              for i, (a, b) in enumerate(pieces)]
    for u, usage in enumerate(list(value.uses())):
        old = usage.node
        bias = _gemm_bias(rw, old, n)
        if bias is not None and len(pieces) > 1 and bias.const_value is None:
            raise InternalError(f"{rw.chunk_id}: Gemm {old.name} has a computed bias; its weight cannot be split")
        products = []
        for i, ((a, b), (qv, sv)) in enumerate(zip(pieces, stored)):
            dq = _dequantize_stored(rw, qv, sv, {"axis": 0}, f"{name}.use{u}.{i}", ir.Shape([b - a, k]))
            if old.op_type == "Gemm":
                piece_bias = bias if bias is None or len(pieces) == 1 else \
                    rw.initializer(bias.const_value.numpy()[a:b], f"{bias.name}.{i}")
                inputs = [old.inputs[0], dq.outputs[0]] + ([piece_bias] if piece_bias is not None else [])
                product = ir.node("Gemm", inputs, attributes={"transB": 1}, name=f"{old.name}.{i}")
            else:
                product = ir.node("FusedMatMul", [old.inputs[0], dq.outputs[0]], domain=MS_DOMAIN,
                                  attributes={"transB": 1}, name=f"{old.name}.{i}")
            product.outputs[0].dtype = ir.DataType.FLOAT
            products.append(product)
        new = products
        if len(products) > 1:
            new = [*products, ir.node("Concat", [p.outputs[0] for p in products], attributes={"axis": -1},
                                      name=f"{old.name}.concat")]
        new[-1].outputs[0].shape, new[-1].outputs[0].dtype = old.outputs[0].shape, old.outputs[0].dtype
        ir.convenience.replace_nodes_and_values(rw.graph, old, [old], new, old.outputs, new[-1].outputs)
        if bias is not None and len(pieces) > 1 and not bias.uses() and bias.name in rw.graph.initializers:
            rw.graph.initializers.pop(bias.name)
    rw.min_opset = max(rw.min_opset, 19)
    rw.done[name] = "DequantizeLinear"


def _rewrite_gather(rw: _Rewrite, value: ir.Value, table: np.ndarray, name: str) -> None:
    q, s = recover_grid(table, QMAX["int8"], f"{rw.chunk_id}: {name}")
    dv = rw.initializer((q.astype(np.int16) + 128).astype(np.uint8), f"{name}.int8")
    sv = rw.initializer(s[:, None], f"{name}.scale")
    block = max(16, 1 << (table.shape[1] - 1).bit_length())  # the whole row in one block
    for usage in list(value.uses()):
        old = usage.node
        new = ir.node("GatherBlockQuantized", [dv, old.inputs[1], sv], domain=MS_DOMAIN, name=f"{old.name}.q8",
                      attributes={"bits": 8, "block_size": block, "gather_axis": 0, "quantize_axis": 1})
        _replace_node(rw, old, new)
    rw.done[name] = "GatherBlockQuantized"


def _rewrite_one(rw: _Rewrite, value: ir.Value) -> None:
    kinds = {_candidate(u) for u in value.uses()}
    if len(kinds) != 1 or None in kinds or value.const_value is None:
        return
    kind = kinds.pop()
    array = value.const_value.numpy()
    if array.dtype != np.float32 or array.ndim not in (2, 4):
        return
    # the layout PyTorch holds: Linear [out, in]; MatMul and Gemm without transB store [in, out]
    as_torch = array.T if kind in ("matmul", "gemm") else array
    name = rw.by_value.get(_key(as_torch))
    if name is None or name in rw.done:
        return
    if kind == "conv" and array.ndim == 4:
        _rewrite_conv(rw, value, array, name)
    elif kind == "gather" and array.ndim == 2:
        _rewrite_gather(rw, value, array, name)
    elif kind in ("matmul", "gemm", "gemm_t") and array.ndim == 2:
        _rewrite_linear(rw, value, np.ascontiguousarray(as_torch), name)
    else:
        return
    rw.graph.initializers.pop(value.name)


def quantize_chunk_file(files: list[Path], expected: Mapping[str, np.ndarray], mode: str, block_size: int,
                        chunk_id: str) -> tuple[list[Path], dict]:
    """Rewrite the chunk file ``files[0]`` in place so that the weights named in ``expected`` (PyTorch parameter →
    its fake-quantized fp32 value) are stored as ``mode``. Returns the files now making up the chunk and a summary
    for the manifest. Every expected weight must be found and converted exactly, else InternalError."""
    path = files[0]
    model = ir.load(path)
    if len(files) > 1:
        ir.external_data.load_to_model(model)
    if mode == "int4" and model.opset_imports.get("", 0) < 21:  # DequantizeLinear of int4 in blocks needs 21
        version_converter.convert_version(model, 21, fallback=False)
    rw = _Rewrite(model.graph, mode, block_size, chunk_id, {_key(a): n for n, a in expected.items()})
    for value in list(model.graph.initializers.values()):
        _rewrite_one(rw, value)
    missing = sorted(set(expected) - set(rw.done))
    if missing:
        raise InternalError(f"{chunk_id}: {len(missing)} weight(s) quantized in PyTorch have no matching initializer "
                            f"in the ONNX file (first: {missing[0]}); the exporter changed or re-laid them out")
    if rw.min_opset > model.opset_imports.get("", 0):
        raise InternalError(f"{chunk_id}: DequantizeLinear needs opset {rw.min_opset}, the graph has "
                            f"{model.opset_imports.get('')}")
    if any(node.domain == MS_DOMAIN for node in model.graph):
        model.opset_imports[MS_DOMAIN] = 1
    return _save(model, files), _summary(rw)


def _save(model: ir.Model, files: list[Path]) -> list[Path]:
    for old in files[1:]:
        old.unlink()
    return save_chunk_model(model, files[0])


def _summary(rw: _Rewrite) -> dict:
    ops: dict[str, int] = {}
    for op in rw.done.values():
        ops[op] = ops.get(op, 0) + 1
    return {"weights": rw.mode, **({"block_size": rw.block_size} if rw.mode == "int4" else {}),
            "layers": len(rw.done), "ops": dict(sorted(ops.items()))}
