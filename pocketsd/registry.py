"""Registries with namespaced ids (``split::n_chunks``, ``onnx::fp32``, ...).

A duplicate registration is our bug and raises at import; an unknown id is the user's and lists the known ones.
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

from pocketsd.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, namespace: str, error: type[UserError] = UserError) -> None:
        self.namespace = namespace
        self._items: dict[str, T] = {}
        self._error = error

    def register(self, name: str) -> Callable[[T], T]:
        key = f"{self.namespace}::{name}"

        def add(item: T) -> T:
            if key in self._items:
                raise RuntimeError(f"{key} is registered twice")
            self._items[key] = item
            return item

        return add

    def get(self, name: str) -> T:
        key = name if "::" in name else f"{self.namespace}::{name}"
        try:
            return self._items[key]
        except KeyError:
            raise self._error(f"unknown {self.namespace} id {name!r}", f"known: {', '.join(self.names())}") from None

    def names(self) -> list[str]:
        return sorted(k.split("::", 1)[1] for k in self._items)

    def ids(self) -> list[str]:
        return sorted(self._items)
