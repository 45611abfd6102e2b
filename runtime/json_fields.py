"""Strict reading of a parsed JSON document (the bundle manifest): every value's type is checked where it is read.

A manifest is data from disk: damaged, hand-edited or hostile. Indexing it directly turns a string where a number
belongs into a ``TypeError`` deep in the runtime; reading it through :class:`Field` turns it into one
``BundleError`` that names the file and the key path (``components.unet.chunks[2].weight_bytes is a string, not an
integer``). Torch-free, no dependencies: the runtime's manifest reader uses it.
"""

from __future__ import annotations

import math
from typing import Any, Iterator

from pocketsd.errors import BundleError

REEXPORT = "the manifest is damaged or was edited; re-export the bundle or copy it again"
_MISSING = object()
_KINDS = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
          float: "a number", type(None): "null"}


def kind(value: Any) -> str:
    return _KINDS.get(type(value), type(value).__name__)


class Field:
    """One value of the document and its key path (``components.unet.chunks[0]``)."""

    def __init__(self, value: Any, where: str, path: str = "") -> None:
        self.value, self.where, self.path = value, where, path

    def fail(self, what: str, hint: str = REEXPORT) -> BundleError:
        return BundleError(f"{self.where} is malformed: {self.path or 'its top level'} {what}", hint)

    def _wrong(self, expected: str) -> BundleError:
        shown = repr(self.value) if isinstance(self.value, (str, int, float)) and len(repr(self.value)) < 40 else ""
        return self.fail(f"is {kind(self.value)}{' ' + shown if shown else ''}, not {expected}")

    def has(self, key: str) -> bool:
        return key in self.obj() and self.obj()[key] is not None

    def key(self, name: str, default: Any = _MISSING) -> "Field":
        """The value under ``name``; absent (or null, where a default is given) → ``default``, else an error."""
        obj = self.obj()
        path = f"{self.path}.{name}" if self.path else name
        if name not in obj or (obj[name] is None and default is not _MISSING):
            if default is _MISSING:
                raise Field(None, self.where, path).fail("is missing")
            return Field(default, self.where, path)
        return Field(obj[name], self.where, path)

    def obj(self) -> dict[str, Any]:
        if not isinstance(self.value, dict):
            raise self._wrong("an object")
        return self.value

    def items(self) -> Iterator[tuple[str, "Field"]]:
        """An object's entries; keys are strings in JSON, and anything else is refused, not converted."""
        for name, value in self.obj().items():
            if not isinstance(name, str):
                raise self.fail(f"has a key {name!r} that is not a string")
            yield name, Field(value, self.where, f"{self.path}.{name}" if self.path else name)

    def list(self) -> list["Field"]:
        if not isinstance(self.value, list):
            raise self._wrong("a list")
        return [Field(v, self.where, f"{self.path}[{i}]") for i, v in enumerate(self.value)]

    def str(self, *, empty: bool = False) -> str:
        if not isinstance(self.value, str) or (not empty and not self.value):
            raise self._wrong("a non-empty string" if not empty else "a string")
        return self.value

    def optional_str(self) -> str | None:
        return None if self.value is None else self.str()

    def int(self, minimum: int = 0) -> int:
        # bool is an int in Python, and 64.0 parses as a float: neither is what the exporter writes
        if isinstance(self.value, bool) or not isinstance(self.value, int):
            raise self._wrong("an integer")
        if self.value < minimum:
            raise self.fail(f"is {self.value}, below {minimum}")
        return self.value

    def number(self, *, finite: bool = True) -> float:
        if isinstance(self.value, bool) or not isinstance(self.value, (int, float)):
            raise self._wrong("a number")
        try:
            value = float(self.value)
        except OverflowError:  # an integer beyond any float
            raise self.fail("is too large a number") from None
        if finite and not math.isfinite(value):
            raise self.fail(f"is {value}, not a finite number")
        return value

    def bool(self) -> bool:
        if not isinstance(self.value, bool):
            raise self._wrong("true or false")
        return self.value
