"""Run one component by chaining its chunks as the manifest wires them.

Each chunk input is fed from a component input or an earlier chunk's output (its ``source``); every feed's dtype and
shape is checked against the manifest before the call, and intermediate tensors are dropped after their last use.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from pocketsd.errors import BundleError
from pocketsd.runtime.manifest import Component, TensorSpec
from pocketsd.runtime.sessions import ChunkSession, SessionOptions, open_chunk


def _check(owner: str, spec: TensorSpec, value: np.ndarray) -> None:
    if value.dtype != np.dtype(spec.dtype) or tuple(value.shape) != spec.shape:
        raise BundleError(
            f"{owner} expects {spec.name!r} as {spec.dtype}{list(spec.shape)} but got "
            f"{value.dtype}{list(value.shape)}",
            "the bundle was exported for other shapes (resolution, batch); re-export it or match its dims",
        )


class ComponentRunner:
    def __init__(self, component: Component, sessions: Sequence[ChunkSession]) -> None:
        if len(sessions) != len(component.chunks):
            raise BundleError(f"{component.id}: {len(sessions)} sessions for {len(component.chunks)} chunks")
        self.component = component
        self.sessions = list(sessions)
        self._release = self._last_uses()

    @classmethod
    def open(cls, bundle_dir: Path, component: Component, options: SessionOptions) -> "ComponentRunner":
        return cls(component, [open_chunk(Path(bundle_dir), chunk, options) for chunk in component.chunks])

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

    def __call__(self, **inputs: np.ndarray) -> dict[str, np.ndarray]:
        values: dict[str, np.ndarray] = {}
        for spec in self.component.inputs:
            if spec.name not in inputs:
                raise BundleError(f"{self.component.id} needs input {spec.name!r}")
            _check(self.component.id, spec, inputs[spec.name])
            values[f"input:{spec.name}"] = inputs[spec.name]
        for chunk, session, release in zip(self.component.chunks, self.sessions, self._release):
            feeds = {}
            for spec in chunk.inputs:
                value = values[spec.source or ""]
                _check(chunk.id, spec, value)
                feeds[spec.name] = value
            outputs = session.run(feeds)
            for spec in chunk.outputs:
                values[f"{chunk.id}:{spec.name}"] = outputs[spec.name]
            for source in release:
                values.pop(source, None)
        return {spec.name: values[spec.source or ""] for spec in self.component.outputs}
