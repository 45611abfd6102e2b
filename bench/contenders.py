"""Who ``pocketsd bench`` races: pocketsd's bundles on each engine, and the peers a user would otherwise run.

Every contender runs the same model (one diffusers folder, or bundles exported from it), at the same resolution,
threads and UNet inputs. ``uses`` says what it runs: the chunked bundle (the preset's cut), the unchunked bundle
(the same preset with the UNet in one chunk), the diffusers folder itself, or optimum's own export of it.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from pocketsd.errors import UserError

OPTIMUM_PYTHON_ENV = "POCKETSD_OPTIMUM_PYTHON"


@dataclass(frozen=True)
class Contender:
    name: str
    kind: str  # worker kind (worker.py), or "optimum" (optimum_worker.py)
    uses: str  # "chunked" | "unchunked" (bundles), "model" (the diffusers folder), "optimum" (its own export)
    engine: str = ""  # pocketsd's engine for bundle kinds
    packages: tuple[str, ...] = ()  # import names it needs in our environment
    generates: bool = True  # runs end to end (the plain ONNX sessions are a UNet alone)


# "-1chunk": the same engine on the unchunked bundle, to show what chunking costs (UNet calls only).
CONTENDERS = (
    Contender("pocketsd-onnxruntime", "pocketsd", "chunked", "onnxruntime", ("onnxruntime",)),
    Contender("pocketsd-onnxruntime-1chunk", "pocketsd", "unchunked", "onnxruntime", ("onnxruntime",), False),
    Contender("onnxruntime", "onnxruntime", "unchunked", packages=("onnxruntime",), generates=False),
    Contender("pocketsd-openvino", "pocketsd", "chunked", "openvino", ("openvino",)),
    Contender("pocketsd-openvino-1chunk", "pocketsd", "unchunked", "openvino", ("openvino",), False),
    Contender("pocketsd-openvino-bf16", "pocketsd", "chunked", "openvino-bf16", ("openvino",)),
    Contender("pocketsd-openvino-bf16-1chunk", "pocketsd", "unchunked", "openvino-bf16", ("openvino",), False),
    Contender("openvino", "openvino", "unchunked", packages=("openvino",), generates=False),
    Contender("diffusers-torch", "diffusers", "model", packages=("torch", "diffusers", "transformers")),
    Contender("optimum", "optimum", "optimum"),
)


def by_names(names: list[str] | None) -> list[Contender]:
    """The contenders named (all by default), in the bench's order."""
    if not names:
        return list(CONTENDERS)
    known = {c.name: c for c in CONTENDERS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise UserError(f"unknown contender {unknown[0]!r}", f"known: {', '.join(known)}", code="bench")
    return [c for c in CONTENDERS if c.name in names]


def optimum_python(given: str | None) -> Path | None:
    """The Python of optimum's environment: ``--optimum-python``, else $POCKETSD_OPTIMUM_PYTHON, else the
    ``.venv-optimum`` that ``make bench-env-optimum`` creates in the current folder; None if none exists."""
    for candidate in (given, os.environ.get(OPTIMUM_PYTHON_ENV), ".venv-optimum/bin/python"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
        if candidate and candidate is given:
            raise UserError(f"--optimum-python {given}: no such file", "give the python of optimum's venv",
                            code="bench")
    return None


def skip_reason(contender: Contender, optimum: Path | None) -> str | None:
    """Why a contender cannot run here (a package is not installed), or None."""
    if contender.kind == "optimum":
        return None if optimum else ("optimum is not installed: run `make bench-env-optimum`, or give "
                                     f"--optimum-python / ${OPTIMUM_PYTHON_ENV}")
    missing = [p for p in contender.packages if importlib.util.find_spec(p) is None]
    return f"{', '.join(missing)} is not installed" if missing else None


def worker_command(contender: Contender, spec_json: str, optimum: Path | None) -> list[str]:
    if contender.kind == "optimum":
        return [str(optimum), str(Path(__file__).with_name("optimum_worker.py")), spec_json]
    return [sys.executable, "-m", "pocketsd.bench.worker", spec_json]
