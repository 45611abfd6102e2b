"""What every bench script shares: peak memory in bytes, and printing (and optionally saving) its JSON result."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any


def peak_rss_bytes(children: bool = False) -> int:
    """Peak resident memory of this process (or of its finished children), from getrusage."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF).ru_maxrss
    return int(usage if sys.platform == "darwin" else usage * 1024)  # macOS reports bytes, Linux kilobytes


def emit(result: dict[str, Any], json_path: Path | None) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if json_path:
        json_path.write_text(text + "\n")
