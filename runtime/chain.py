"""Run one component by chaining its chunks as the manifest wires them.

Each chunk input is fed from a component input or an earlier chunk's output (its ``source``); every feed's dtype and
shape is checked against the manifest before the call, and intermediate tensors are dropped after their last use.
Sessions come from an execution policy (execution.py), which decides when each chunk is opened and released.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from pocketsd.errors import BundleError
from pocketsd.runtime.execution import ExecutionPolicy, Feeds, chunk_opener, make_policy
from pocketsd.runtime.manifest import Chunk, Component, TensorSpec
from pocketsd.runtime.per_row import row_shape_matches
from pocketsd.runtime.sessions import SessionOptions


def _check(owner: str, spec: TensorSpec, value: np.ndarray, per_row: bool = False) -> None:
    shape_ok = row_shape_matches(spec, value) if per_row else tuple(value.shape) == spec.shape
    if value.dtype != np.dtype(spec.dtype) or not shape_ok:
        raise BundleError(
            f"{owner} expects {spec.name!r} as {spec.dtype}{list(spec.shape)} but got "
            f"{value.dtype}{list(value.shape)}",
            "the bundle was exported for other shapes (resolution, batch); re-export it or match its dims",
        )


class ComponentRunner:
    def __init__(self, component: Component, policy: ExecutionPolicy) -> None:
        self.component = component
        self.policy = policy
        self._release = self._last_uses()
        policy.prepare(component)  # resident: every chunk (or the whole component) opened and hash-checked now

    @classmethod
    def open(cls, bundle_dir: Path, component: Component, options: SessionOptions,
             memory: str = "resident") -> "ComponentRunner":
        """A runner with its own policy. A pipeline shares one policy across its components instead."""
        return cls(component, make_policy(memory, chunk_opener(bundle_dir, options), options.low_memory))

    def _last_uses(self) -> list[list[str]]:
        """For each chunk, the sources no later chunk or component output reads."""
        last: dict[str, int] = {}
        for i, chunk in enumerate(self.component.chunks):
            for spec in chunk.inputs:
                last[spec.source or ""] = i
        for spec in self.component.outputs:
            last[spec.source or ""] = len(self.component.chunks)
        release: list[list[str]] = [[] for _ in self.component.chunks]
        for source, i in last.items():
            if i < len(release):
                release[i].append(source)
        return release

    def _bind(self, inputs: Feeds) -> dict[str, np.ndarray]:
        values: dict[str, np.ndarray] = {}
        for spec in self.component.inputs:
            if spec.name not in inputs:
                raise BundleError(f"{self.component.id} needs input {spec.name!r}")
            _check(self.component.id, spec, inputs[spec.name])
            values[f"input:{spec.name}"] = inputs[spec.name]
        return values

    @staticmethod
    def _feeds(chunk: Chunk, values: dict[str, np.ndarray]) -> Feeds:
        feeds = {}
        for spec in chunk.inputs:
            value = values[spec.source or ""]
            _check(chunk.id, spec, value, chunk.per_row)
            feeds[spec.name] = value
        return feeds

    def run_many(self, rows: Sequence[Feeds]) -> list[dict[str, np.ndarray]]:
        """Several input sets through the chain chunk-major: each chunk is used once for all of them (opened once
        under stream/prefetch) before the next. Each result equals a call with that input set alone."""
        values = [self._bind(row) for row in rows]
        whole = self.policy.run_whole(self.component, [{spec.name: v[f"input:{spec.name}"]
                                                        for spec in self.component.inputs} for v in values])
        if whole is not None:
            return [{spec.name: out[spec.name] for spec in self.component.outputs} for out in whole]
        chunks = self.component.chunks
        for i, (chunk, release) in enumerate(zip(chunks, self._release)):
            following = chunks[i + 1] if i + 1 < len(chunks) else self.policy.after_last(chunks[0])
            outputs = self.policy.run(chunk, following, [self._feeds(chunk, v) for v in values])
            for row_values, row_outputs in zip(values, outputs):
                for spec in chunk.outputs:
                    row_values[f"{chunk.id}:{spec.name}"] = row_outputs[spec.name]
                for source in release:
                    row_values.pop(source, None)
            del outputs
        return [{spec.name: v[spec.source or ""] for spec in self.component.outputs} for v in values]

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        return self.run_many([inputs])[0]
