"""Give the C heap's freed memory back to the system (glibc's ``mallopt`` and ``malloc_trim``; elsewhere nothing).

glibc raises its mmap threshold each time a large mmapped block is freed, so after the first few large tensors the
next ones (up to 32 MB each) come from the heap, and freed heap memory stays with the process. Two places pay for it:
a low-memory ``generate`` that opens one chunk at a time (runtime/execution.py) and the mixed-bit search of an
export, which makes and frees a palette per layer and width (export/compression/mixed_bit.py). No library exposes
these two calls, hence ctypes.
"""

from __future__ import annotations

import ctypes
import sys
from typing import Any, Callable

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def _glibc() -> Any:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:  # another C library (musl): it has neither call
        return None


def trimmer() -> Callable[[], None]:
    """The call that gives the C heap's free pages back to the system (glibc's ``malloc_trim``; else nothing)."""
    libc = _glibc()
    return (lambda: libc.malloc_trim(0)) if libc is not None else (lambda: None)


def return_freed_memory_to_the_system() -> Callable[[], None]:
    """Make the C allocator give freed blocks of 64 KB and more back at once (a fixed mmap threshold, which also
    stops glibc raising it), and return the call that trims what is left. For the whole process, from now on."""
    libc = _glibc()
    if libc is None:
        return lambda: None
    libc.mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
    libc.mallopt(_M_TRIM_THRESHOLD, 64 * 1024)
    return trimmer()
