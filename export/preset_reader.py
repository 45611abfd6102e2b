"""Strict access to a preset's YAML: every key checked, every error naming the file and the key path."""

from __future__ import annotations

import math
from typing import Any

from pocketsd.errors import PresetError


class YamlReader:
    """Strict access to one YAML mapping, remembering the file and key path for error messages."""

    def __init__(self, data: Any, source: str, path: str = "") -> None:
        self.source, self.path = source, path
        if not isinstance(data, dict):
            self.fail("is empty" if data is None else f"must be a mapping, not {shown(data)}",
                      "write key: value lines here (see the presets in split_configs/)")
        self.data = data

    def fail(self, what: str, hint: str | None = None) -> None:
        where = f"{self.source}: {self.path or '<top>'}"
        raise PresetError(f"{where} {what}", hint)

    def only(self, allowed: tuple[str, ...]) -> None:
        for key in self.data:
            if key not in allowed:
                child = f"{self.path}.{key}" if self.path else str(key)
                raise PresetError(f"{self.source}: unknown key {child!r}", f"allowed here: {', '.join(allowed)}")

    def child(self, key: str) -> "YamlReader":
        value = self.data.get(key)  # absent or null: defaults; any other non-mapping is refused, not read as {}
        return YamlReader({} if value is None else value, self.source, f"{self.path}.{key}" if self.path else key)

    def choice(self, key: str, allowed: tuple[Any, ...], default: Any) -> Any:
        value = self.data.get(key, default)
        # by type too: 1 == True and 2.0 == 2 in Python, but `low_memory: 1` is not a boolean
        if not any(value == a and type(value) is type(a) for a in allowed):
            self.at(key).fail(f"is {value!r}", f"allowed: {', '.join(map(str, allowed))}")
        return value

    def number(self, key: str, default: Any, kind: type = int, minimum: float = 0) -> Any:
        value = self.data.get(key, default)
        if value is None:
            return None
        if (isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
                or (kind is int and value != int(value))):
            self.at(key).fail(f"is {value!r}, not a{'n integer' if kind is int else ' number'}")
        if value < minimum:
            self.at(key).fail(f"is {value}, below the minimum {minimum}")
        return kind(value)

    def at(self, key: str) -> "YamlReader":
        return YamlReader({}, self.source, f"{self.path}.{key}" if self.path else key)


def shown(value: Any) -> str:
    """A value as the error names it: its YAML kind, and the value where it is short."""
    kinds = {dict: "a mapping", list: "a list", str: "text", bool: "a boolean", int: "a number", float: "a number"}
    return kinds.get(type(value), type(value).__name__) + (f" ({value!r})" if len(repr(value)) <= 40 else "")
