"""sha256 of a bundle file, or of a folder such as an ``.mlpackage`` (relative paths and contents, in sorted order)."""

from __future__ import annotations

import hashlib
from pathlib import Path

_BLOCK = 1 << 20


def _feed_file(digest: "hashlib._Hash", path: Path) -> None:
    with path.open("rb") as handle:
        while block := handle.read(_BLOCK):
            digest.update(block)


def sha256_path(path: str | Path) -> str:
    path = Path(path)
    digest = hashlib.sha256()
    if path.is_dir():
        for item in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(item.relative_to(path).as_posix().encode() + b"\0")
            _feed_file(digest, item)
    else:
        _feed_file(digest, path)
    return digest.hexdigest()


def size_of(path: str | Path) -> int:
    path = Path(path)
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size
