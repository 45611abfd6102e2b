"""Write a folder completely or not at all: build it in a staging folder beside the target, rename when done.

Used for every folder pocketsd creates (random models, bundles, Apple Resources). The target must not exist or be
empty; on any failure, Ctrl-C included, the staging folder is removed and the target is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from pocketsd.errors import OutputError


@contextlib.contextmanager
def staged_folder(target: str | Path, what: str = "folder") -> Iterator[Path]:
    out = Path(target)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputError(f"{out} already exists and is not empty", f"choose a new {what} folder or delete this one")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
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
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
