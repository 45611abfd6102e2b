"""sha256 of a bundle file, or of a folder such as an ``.mlpackage`` (relative paths and contents, in sorted order),
and the checks that keep a bundle's files from being hashed more often than needed (see below)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

log = logging.getLogger(__name__)

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
# unchanged by what the kernel tells us for free: resolved path, device, inode, size, mtime_ns and ctime_ns (of
# every file inside a folder such as an ``.mlpackage``). A write or a replacement changes at least one of these and
# the file is hashed again. ctime cannot be set back by a program (``utime`` sets mtime, and itself moves ctime), so
# an edit that restores the size and the mtime to the nanosecond is noticed too. A file asked for by two threads at
# once is hashed by the first, and the second waits for its result.

_DIGESTS: dict[tuple[object, ...], str] = {}
_PENDING: dict[tuple[object, ...], Future[str]] = {}
_LOCK = threading.Lock()


def _stat_key(path: Path) -> tuple[object, ...]:
    path = path.resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return (str(path), *((str(f), s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns)
                         for f in files for s in (f.stat(),)))


def _digest_for(key: tuple[object, ...], path: Path) -> str:
    """The digest of ``path`` as of ``key``: remembered, being computed by another thread (waited for), or computed."""
    with _LOCK:
        digest = _DIGESTS.get(key)
        if digest is not None:
            return digest
        pending = _PENDING.get(key)
        mine = pending is None
        if mine:
            pending = _PENDING[key] = Future()
    if not mine:
        return pending.result()
    try:
        digest = sha256_path(path)
    except BaseException as exc:
        pending.set_exception(exc)
        raise
    finally:
        with _LOCK:
            _PENDING.pop(key, None)
    with _LOCK:
        _DIGESTS[key] = digest
    pending.set_result(digest)
    return digest


def sha256_once(path: str | Path) -> str:
    """``sha256_path(path)``, computed once per process for as long as the file (or folder) is unchanged."""
    path = Path(path)
    return _digest_for(_stat_key(path), path)


def forget_digests() -> None:
    """Drop every remembered digest (tests; a caller that wants a full re-check)."""
    _DIGESTS.clear()


# ---------------------------------------------------------------------------------------------------------------
# The on-disk caches, in one per-user folder (``cache_dir``): verified digests (below) and onnxruntime's optimized
# graphs (graph_cache.py; OpenVINO's compiled models are not cached: openvino_session.py says why). POCKETSD_NO_CACHE=1,
# or ``SessionOptions(disk_cache=False)``, turns both off: every process then hashes every file once and optimizes
# every chunk, as before. Only chunks and files of CACHE_MIN_BYTES or more are cached: below that, a
# hash or an optimization takes milliseconds, and the cache stays a few dozen entries per bundle.
#
# The digest cache: a bundle's weights checked by an earlier process are not read again. Hashing the SD 1.5 cpu
# bundle's 3.4 GB took 2.3 s of a 12-13 s cold load; with the cache a later process only stats the files.
# An entry says "this file, as the kernel described it then, had the manifest's sha256". Its name is the sha256 of
# that description (the stat key above: resolved path, device, inode, size, mtime_ns, ctime_ns of every file) plus
# the sha256 the manifest expects, and its content is the description itself. A file whose description differs in
# any field is hashed again, so a rewrite, a replacement, a copy or a `touch` are all hashed; a mismatch is never
# recorded, so a tampered file is refused in every process. The trust trade-off: whoever can write the cache folder
# (the same user, who could as well edit the bundle) can make a changed file pass, and a filesystem that reports
# the same inode, size, mtime and ctime for changed content (some network and FUSE filesystems) would not be
# noticed. Where that matters, set POCKETSD_NO_CACHE=1.

CACHE_MIN_BYTES = 16 * 2**20
DIGEST_CACHE_MAX_ENTRIES = 4096  # past this, the oldest half is removed (each entry is a few hundred bytes)
NO_CACHE_ENV = "POCKETSD_NO_CACHE"


def cache_dir() -> Path:
    """pocketsd's per-user cache folder: ``$XDG_CACHE_HOME/pocketsd``, else ``~/.cache/pocketsd``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "pocketsd"


def disk_cache_enabled(wanted: bool = True) -> bool:
    """``wanted`` (the caller's option) and not turned off by POCKETSD_NO_CACHE."""
    return wanted and os.environ.get(NO_CACHE_ENV, "") in ("", "0")


def _entry(key: tuple[object, ...], expected: str) -> tuple[Path, str]:
    text = json.dumps([key, expected])
    return cache_dir() / "digests" / hashlib.sha256(text.encode()).hexdigest(), text


def _cached(key: tuple[object, ...], expected: str) -> bool:
    path, text = _entry(key, expected)
    try:
        return path.read_text() == text
    except (OSError, UnicodeDecodeError):
        return False


def _record(key: tuple[object, ...], expected: str) -> None:
    path, text = _entry(key, expected)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        partial.write_text(text)
        os.replace(partial, path)  # atomic: a reader sees the whole entry or none
        _prune(path.parent)
    except OSError as exc:  # a read-only or full home: the check still happened, it is just not remembered
        log.debug("digest cache not written (%s)", exc)


def _prune(folder: Path) -> None:
    names = os.listdir(folder)
    if len(names) <= DIGEST_CACHE_MAX_ENTRIES:
        return
    entries = []
    for name in names:
        try:
            entries.append((os.stat(folder / name).st_mtime_ns, name))
        except OSError:
            continue
    for _, name in sorted(entries)[: len(entries) - DIGEST_CACHE_MAX_ENTRIES // 2]:
        try:
            os.unlink(folder / name)
        except OSError:
            continue


def matches_sha256(path: str | Path, expected: str, disk_cache: bool = True) -> bool:
    """Whether ``path`` (a file or a folder) has the sha256 ``expected``: hashed once per process while unchanged,
    and, with ``disk_cache`` (and POCKETSD_NO_CACHE unset), not at all where an earlier process found this
    very file (same stat description) to match."""
    path = Path(path)
    key = _stat_key(path)
    with _LOCK:
        known = _DIGESTS.get(key)
    if known is not None:
        return known == expected
    use_disk = disk_cache_enabled(disk_cache) and sum(int(f[3]) for f in key[1:]) >= CACHE_MIN_BYTES
    if use_disk and _cached(key, expected):
        with _LOCK:
            _DIGESTS[key] = expected
        return True
    match = _digest_for(key, path) == expected
    if match and use_disk:
        _record(key, expected)
    return match


def mismatched(files: Sequence[tuple[Path, str]], disk_cache: bool = True, workers: int = 0) -> list[Path]:
    """The paths among ``(path, expected sha256)`` that do not match, checked on ``workers`` threads (0: one per
    core; hashlib releases the GIL while it hashes), the largest files first so that they do not finish last."""
    if not files:
        return []
    workers = workers or os.cpu_count() or 1
    if workers == 1 or len(files) == 1:
        return [p for p, sha in files if not matches_sha256(p, sha, disk_cache)]
    order = sorted(files, key=lambda f: -_size_or_zero(f[0]))
    with ThreadPoolExecutor(max_workers=min(workers, len(files)), thread_name_prefix="pocketsd-hash") as pool:
        results = dict(zip((p for p, _ in order), pool.map(lambda f: matches_sha256(f[0], f[1], disk_cache), order)))
    return [p for p, _ in files if not results[p]]


def _size_or_zero(path: Path) -> int:
    try:
        return size_of(path)
    except OSError:
        return 0


# ---------------------------------------------------------------------------------------------------------------
# Cache entries that are folders of derived files (an optimized graph and its weights): built in a staging folder,
# sealed with the stat description of every file in it, then renamed into place, so that a reader sees a whole
# entry or none. An entry is used only while every file still matches its seal (same trust as the digest cache:
# a file changed after it was written is noticed by its size, mtime or ctime, and the entry is rebuilt). Such
# entries are large (a copy of a chunk's weights): one is written only where the disk keeps CACHE_FREE_MARGIN free
# after it, and past CACHE_MAX_BYTES the least recently used ones are removed (``prune``).

_SEAL = "sealed.json"
CACHE_MAX_BYTES = 20 * 2**30
CACHE_FREE_MARGIN = 2 * 2**30


def _describe(folder: Path) -> list[list[object]]:
    return [[p.relative_to(folder).as_posix(), s.st_dev, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns]
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != _SEAL for s in (p.stat(),)]


def sealed(entry: Path) -> bool:
    """Whether ``entry`` is a whole cache entry (``seal``) whose files are unchanged since it was sealed."""
    try:
        return json.loads((entry / _SEAL).read_text()) == _describe(entry)
    except (OSError, ValueError):
        return False


def staging_for(entry: Path, size: int) -> Path | None:
    """A new, empty folder next to ``entry`` to build it in (``seal`` moves it into place), or None where the disk
    would keep less than CACHE_FREE_MARGIN free after ``size`` more bytes."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    if shutil.disk_usage(entry.parent).free < size + CACHE_FREE_MARGIN:
        return None
    return Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}.partial-"))


def used(entry: Path) -> None:
    """Mark ``entry`` as just used (its folder's mtime), for ``prune``."""
    try:
        os.utime(entry)
    except OSError:
        pass


def prune(folder: Path, max_bytes: int = CACHE_MAX_BYTES) -> None:
    """Remove the least recently used entries of ``folder`` until the rest hold at most ``max_bytes``, and staging
    folders left by a process that died more than an hour ago."""
    entries = []
    for path in folder.iterdir():
        try:
            stamp = path.stat().st_mtime
            if path.name.startswith(".") and ".partial-" in path.name:
                if stamp < time.time() - 3600:
                    discard(path)
                continue
            entries.append((stamp, sum(f.stat().st_size for f in path.rglob("*") if f.is_file()), path))
        except OSError:
            continue
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries, key=lambda e: e[0]):
        if total <= max_bytes:
            break
        discard(path)
        total -= size


def seal(staging: Path, entry: Path) -> bool:
    """Record every file of ``staging`` and rename it to ``entry`` (replacing an entry that is not ``sealed``).
    False, and ``staging`` removed, where another process sealed ``entry`` first or the disk refused."""
    try:
        (staging / _SEAL).write_text(json.dumps(_describe(staging)))
        if entry.exists() and not sealed(entry):
            shutil.rmtree(entry, ignore_errors=True)
        os.rename(staging, entry)
        prune(entry.parent)
        return True
    except OSError as exc:
        log.debug("cache entry %s not kept (%s)", entry, exc)
        shutil.rmtree(staging, ignore_errors=True)
        return False


def discard(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
