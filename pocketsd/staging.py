"""Write a folder completely or not at all: build it in a staging folder beside the target, rename when done.

Used for every folder pocketsd creates (random models, bundles, Apple Resources). The target must not exist or be
empty; on any failure, Ctrl-C included, the staging folder is removed and the target is left as it was.

A process killed outright (SIGKILL, power loss) cannot clean up: its staging folder stays, named
``.<target>.partial-<pid>-<random>``. The pid says whose it is, so the next ``staged_folder`` for the same target
removes those of processes that are gone (never a live one's: two exports may race for one target), and the
manifest reader refuses such a folder as "an interrupted export" (``abandoned_staging``) even where a manifest was
already written in it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from pocketsd.errors import OutputError

log = logging.getLogger(__name__)

_STAGING = re.compile(r"\.(?P<target>.+)\.partial-(?P<pid>\d+)-[^/]+")
# Errors of writing (not of reading the inputs): shown as an OutputError naming the target, not a traceback.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}
_DENIED = {errno.EACCES, errno.EPERM}


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    except OverflowError:  # not a pid at all
        return False
    return True


def abandoned_staging(folder: str | Path) -> str:
    """Why ``folder`` is the staging folder of a process that is gone ("process 123 is gone"), or "" if it is not."""
    match = _STAGING.fullmatch(Path(os.path.abspath(folder)).name)
    if match is None or _alive(int(match["pid"])):
        return ""
    return f"process {match['pid']} is gone"


def _remove_abandoned(out: Path) -> None:
    """Remove the staging folders a killed process left for ``out`` (same target name, process gone)."""
    with contextlib.suppress(OSError):
        for entry in out.parent.iterdir():
            match = _STAGING.fullmatch(entry.name)
            if match and match["target"] == out.name and entry.is_dir() and abandoned_staging(entry):
                log.info("removing %s, left by an interrupted run", entry)
                shutil.rmtree(entry, ignore_errors=True)


def _write_error(exc: OSError, staging: Path) -> bool:
    """Whether ``exc`` is a failure to write the staged folder (a full disk, a read-only or forbidden place)."""
    if exc.errno in _WRITE_ERRNOS:
        return True
    names = [str(n) for n in (exc.filename, exc.filename2) if n]
    return exc.errno in _DENIED and any(n.startswith(str(staging)) for n in names)


def check_target(target: str | Path, what: str = "folder") -> Path:
    """Refuse a target that exists and is not an empty folder (callers may check before any other work)."""
    out = Path(target)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputError(f"{out} already exists and is not empty", f"choose a new {what} folder or delete this one")
    return out


@contextlib.contextmanager
def staged_folder(target: str | Path, what: str = "folder") -> Iterator[Path]:
    out = check_target(target, what)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(out)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    except OSError as exc:
        raise OutputError(f"cannot write the {what} to {out}: {exc.strerror or exc}",
                          f"choose a {what} folder in a writable location") from None
    try:
        yield staging
        umask = os.umask(0)  # mkdtemp makes 0700; give the result what a plain mkdir would
        os.umask(umask)
        staging.chmod(0o777 & ~umask)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except OSError as exc:
        shutil.rmtree(staging, ignore_errors=True)
        final = {str(out), str(staging)}  # the rename into place
        if not (_write_error(exc, staging) or {str(exc.filename), str(exc.filename2)} & final):
            raise  # not a write of ours (a model file that cannot be read): the caller names it, or it is a bug
        raise OutputError(f"cannot write the {what} to {out}: {exc.strerror or exc}",
                          "free some disk space, or choose a writable folder on another disk") from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
