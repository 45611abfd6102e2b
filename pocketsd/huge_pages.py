"""Run a process's C heap on 2 MiB pages (Linux transparent huge pages, through glibc's ``glibc.malloc.hugetlb``).

Where the kernel hands out huge pages only to memory that asks for them (``/sys/kernel/mm/transparent_hugepage/
enabled`` set to ``madvise``, the default of Debian and Ubuntu), glibc's malloc asks for them only when the
``glibc.malloc.hugetlb=1`` tunable is in the environment at process start (glibc 2.35 and later). OpenVINO's
weights and activations come from malloc; on 4 KiB pages each UNet call walks the page tables for every one of them.
SD 1.5 at 256², UNet batch 2, OpenVINO bf16, the same file in two processes, 16 calls interleaved: 0.410 s a call
on 4 KiB pages, 0.371 s with the tunable (1.107×), the same resident size (5.74 GB, 1.4 GB of it on huge pages).
onnxruntime gains nothing measurable from it (1.02×, within the spread).

A tunable is read once, when the process starts, so the CLI's ``generate`` starts itself again with it set (an exec
of the same command line, before anything is loaded); the bench starts pocketsd's workers with it and each peer in
the environment the bench was given (see bench/contenders.py). ``POCKETSD_HUGE_PAGES=0`` turns it off. A program that
uses ``Pipeline`` in its own process sets ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` itself, before it starts.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable, Mapping

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "POCKETSD_HUGE_PAGES"  # "0": keep 4 KiB pages
# Set by pocketsd where it added TUNABLE to an environment, so that what it started can tell its own setting from
# one the user made (the bench gives the peers the user's environment, not pocketsd's).
ADDED = "POCKETSD_ADDED_HUGE_PAGES"
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode(path: Path = THP_MODE) -> str:
    """The kernel's transparent huge page mode (``always``, ``madvise``, ``never``), or "" where there is none."""
    try:
        text = path.read_text()
    except OSError:
        return ""
    return text[text.find("[") + 1:text.find("]")] if "[" in text else ""


def glibc_version() -> tuple[int, int]:
    """(major, minor) of the C library if it is glibc, else (0, 0)."""
    try:
        name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # type: ignore[union-attr]
        major, minor = version.split(".")[:2]
        return (int(major), int(minor)) if name == "glibc" else (0, 0)
    except (AttributeError, ValueError, OSError):
        return (0, 0)


def applies(env: Mapping[str, str], mode: Callable[[], str] = thp_mode,
            glibc: Callable[[], tuple[int, int]] = glibc_version) -> bool:
    """Whether adding the tunable to ``env`` would change anything: Linux with glibc 2.35+, a kernel that gives huge
    pages (not ``never``), not turned off, and not set already."""
    return (sys.platform.startswith("linux") and env.get(OPT_OUT, "1") != "0" and TUNABLE not in tunables(env)
            and mode() in ("always", "madvise") and glibc() >= (2, 35))


def tunables(env: Mapping[str, str]) -> list[str]:
    return [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]


def with_huge_pages(env: Mapping[str, str], **checks: Callable) -> dict[str, str]:
    """``env`` with the tunable added where it applies (and ADDED set), else unchanged."""
    out = dict(env)
    if applies(env, **checks):
        out["GLIBC_TUNABLES"] = ":".join([*tunables(env), TUNABLE])
        out[ADDED] = "1"
    return out


def as_given(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` without what pocketsd added to it: the environment its user gave."""
    out = dict(env)
    if out.pop(ADDED, None):
        kept = [t for t in tunables(env) if t != TUNABLE]
        if kept:
            out["GLIBC_TUNABLES"] = ":".join(kept)
        else:
            out.pop("GLIBC_TUNABLES", None)
    return out


def restart_with_huge_pages() -> None:
    """Start this process again, same interpreter and command line, with the tunable set where it applies; return
    (doing nothing) where it does not or where the exec fails. Call it before loading anything large."""
    if applies(os.environ):
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            os.execve(sys.executable, list(sys.orig_argv), with_huge_pages(os.environ))
        except OSError:  # keep 4 KiB pages rather than fail: the run is the same, a little slower
            return
