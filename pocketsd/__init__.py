"""pocketsd: cut Stable Diffusion into verified chunks, and run them without torch.

``from pocketsd import Pipeline`` is the runtime's entry point. It is loaded on first use (PEP 562), so that
``import pocketsd`` (the CLI, the exporter) does not pull in numpy and onnxruntime before it needs them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"
__all__ = ["Pipeline", "__version__"]

if TYPE_CHECKING:
    from pocketsd.runtime.pipeline import Pipeline


def __getattr__(name: str) -> Any:
    if name == "Pipeline":
        from pocketsd.runtime.pipeline import Pipeline

        globals()["Pipeline"] = Pipeline  # later lookups skip this function
        return Pipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
