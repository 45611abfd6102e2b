"""The export's last steps: the runtime reads the bundle from the staging folder exactly as ``generate`` will.

A bundle the runtime would refuse (an unknown tensor dtype across a cut, broken wiring, a tokenizer it cannot build,
a scheduler config it cannot honour) must never be renamed into place. Manifest, wiring, file presence and tokenizer
are read through the runtime's own code, not re-checked here by other rules. The scheduler config is also checked
first, before any weight is loaded (``check_scheduler``): a model the samplers cannot run is refused in seconds,
not after the export's minutes. Then ``round_trip.py`` runs one denoising step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pocketsd.errors import InternalError, ModelError, UserError
from pocketsd.runtime.manifest import Manifest, load_manifest


def check_scheduler(class_name: Any, config: dict[str, Any], where: str) -> None:
    """Refuse, in one line, a scheduler config the runtime's samplers cannot honour: the runtime's own parser
    (``SchedulerConfig.from_dict``) and the default sampler the runtime would pick for ``class_name``."""
    from pocketsd.runtime.pipeline import DEFAULT_SCHEDULERS
    from pocketsd.runtime.schedulers import make_scheduler

    try:
        make_scheduler(DEFAULT_SCHEDULERS.get(str(class_name), "euler"), config)
    except UserError as exc:
        raise ModelError(f"{where}: pocketsd's samplers cannot run this scheduler config: {exc.message}",
                         exc.hint) from None


def read_back(bundle_dir: Path) -> Manifest:
    from pocketsd.runtime.tokenizer import ClipTokenizer

    try:
        manifest = load_manifest(bundle_dir)
        files = manifest.tokenizer["files"]
        ClipTokenizer.from_dir(bundle_dir / Path(files["vocab.json"].path).parent,
                               max_length=int(manifest.tokenizer["max_length"]))
    except UserError as exc:
        raise InternalError(f"the runtime refuses the bundle this export wrote: {exc.one_line()}") from exc
    check_scheduler(manifest.scheduler.get("class_name"), manifest.scheduler["config"], "the bundle's manifest")
    return manifest
