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


# ---------------------------------------------------------------------------------------------------------------
# Hash once per process. A chunk opened per use (``--memory stream``) would otherwise be re-hashed on every reopen,
# which for a UNet means reading every weight byte twice per step. A file's digest is kept while the file is
# unchanged by what the kernel tells us for free: resolved path, size, mtime_ns and inode (of every file inside a
# folder such as an ``.mlpackage``). A rewrite or a replacement changes at least one of these and is hashed again;
# an in-place edit that restores size and mtime_ns to the nanosecond is not noticed (that needs intent).

_DIGESTS: dict[tuple[object, ...], str] = {}


def _stat_key(path: Path) -> tuple[object, ...]:
    path = path.resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return (str(path), *((str(f), s.st_size, s.st_mtime_ns, s.st_ino) for f in files for s in (f.stat(),)))


def sha256_once(path: str | Path) -> str:
    """``sha256_path(path)``, computed once per process for as long as the file (or folder) is unchanged."""
    key = _stat_key(Path(path))
    digest = _DIGESTS.get(key)
    if digest is None:
        digest = _DIGESTS[key] = sha256_path(path)
    return digest


def forget_digests() -> None:
    """Drop every remembered digest (tests; a caller that wants a full re-check)."""
    _DIGESTS.clear()
