"""Reduce a captured FX graph to plain data the split planner can reason about.

The planner is a pure function of this summary, so it can be tested without torch and its decisions saved as data.
Values are named by their FX node names only inside this summary; every name a user sees (chunk ids, boundary tensor
names) is derived from module paths instead.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping

from pocketsd.contract import DTYPE_BYTES, DTYPES
from pocketsd.export.components.base import WRAPPED

_DTYPES = {f"torch.{name}": name for name in DTYPES}  # str(tensor.dtype) → the contract's name


@dataclass(frozen=True)
class Value:
    """A tensor flowing between ops. ``module`` is the path of the module that produced it (readable name)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    module: str
    is_tensor: bool = True

    @property
    def nbytes(self) -> int:
        size = 1
        for dim in self.shape:
            size *= dim
        return size * DTYPE_BYTES.get(self.dtype, 4)


@dataclass(frozen=True)
class Op:
    name: str
    module: str
    reads: tuple[str, ...]
    params: tuple[str, ...]


@dataclass(frozen=True)
class GraphSummary:
    component: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    ops: tuple[Op, ...]
    values: Mapping[str, Value]
    param_bytes: Mapping[str, int]
    param_module: Mapping[str, str]

    @property
    def total_weight_bytes(self) -> int:
        return sum(self.param_bytes.values())


_PREFIX = re.compile(r"^(L\['self'\]\.)?" + re.escape(WRAPPED) + r"(\.|$)")


def module_path(node: Any) -> str:
    """The innermost module that ran ``node``, relative to the wrapped diffusers model ('' = its own forward)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return _PREFIX.sub("", path)


def _value_of(node: Any, module: str) -> Value:
    val = node.meta.get("val")
    if hasattr(val, "shape") and hasattr(val, "dtype"):
        dtype = _DTYPES.get(str(val.dtype), str(val.dtype))
        return Value(node.name, tuple(int(d) for d in val.shape), dtype, module)
    return Value(node.name, (), "object", module, is_tensor=False)


def _short_op_name(node: Any) -> str:
    target = getattr(node.target, "__name__", str(node.target))
    return target.split(".")[0]


def summarize(component: str, graph_module: Any) -> GraphSummary:
    """Summarize the unlifted graph of ``ExportedProgram.module()``: ops in order, values, parameters."""
    inputs, outputs, ops = [], [], []
    values: dict[str, Value] = {}
    param_bytes: dict[str, int] = {}
    param_module: dict[str, str] = {}
    getattr_target: dict[str, str] = {}
    last_module = ""
    for node in graph_module.graph.nodes:
        if node.op == "placeholder":
            inputs.append(node.name)
            values[node.name] = _value_of(node, "")
        elif node.op == "get_attr":
            getattr_target[node.name] = node.target
            tensor = graph_module.get_parameter(node.target) if _is_param(graph_module, node.target) else \
                _get_attr(graph_module, node.target)
            param_bytes[node.target] = tensor.numel() * tensor.element_size()
        elif node.op == "call_function":
            module = module_path(node) or last_module
            last_module = module
            reads, params = [], []
            for arg in node.all_input_nodes:
                if arg.name in getattr_target:
                    params.append(getattr_target[arg.name])
                    param_module.setdefault(getattr_target[arg.name], module)
                else:
                    reads.append(arg.name)
            ops.append(Op(node.name, module, tuple(dict.fromkeys(reads)), tuple(dict.fromkeys(params))))
            values[node.name] = _value_of(node, module_path(node) or _short_op_name(node))
        elif node.op == "output":
            flat = node.args[0] if isinstance(node.args[0], (tuple, list)) else (node.args[0],)
            outputs.extend(arg.name for arg in flat)
        else:
            raise NotImplementedError(f"unexpected FX node kind {node.op!r} ({node.name}) in {component}")
    return GraphSummary(component, tuple(inputs), tuple(outputs), tuple(ops), values, param_bytes, param_module)


def _is_param(graph_module: Any, target: str) -> bool:
    return target in dict(graph_module.named_parameters(remove_duplicate=False))


def _get_attr(graph_module: Any, target: str) -> Any:
    obj = graph_module
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
