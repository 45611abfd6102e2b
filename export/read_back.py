"""The export's last step: the runtime reads the bundle from the staging folder exactly as ``generate`` will.

A bundle the runtime would refuse (an unknown tensor dtype across a cut, broken wiring, a tokenizer it cannot build,
a scheduler config it cannot honour) must never be renamed into place. Manifest, wiring, file presence and tokenizer
are read through the runtime's own code, not re-checked here by other rules.
"""

from __future__ import annotations

from pathlib import Path

from pocketsd.errors import InternalError, ModelError, UserError
from pocketsd.runtime.manifest import Manifest, load_manifest


def read_back(bundle_dir: Path) -> Manifest:
    from pocketsd.runtime.pipeline import DEFAULT_SCHEDULERS
    from pocketsd.runtime.schedulers import SchedulerConfig, make_scheduler
    from pocketsd.runtime.tokenizer import ClipTokenizer

    try:
        manifest = load_manifest(bundle_dir)
        files = manifest.tokenizer["files"]
        ClipTokenizer.from_dir(bundle_dir / Path(files["vocab.json"].path).parent,
                               max_length=int(manifest.tokenizer["max_length"]))
    except UserError as exc:
        raise InternalError(f"the runtime refuses the bundle this export wrote: {exc.one_line()}") from exc
    try:
        config = SchedulerConfig.from_dict(manifest.scheduler["config"])
        make_scheduler(DEFAULT_SCHEDULERS.get(str(manifest.scheduler.get("class_name")), "euler"), config)
    except UserError as exc:
        raise ModelError(f"the model's scheduler config cannot be run by pocketsd's samplers: {exc.message}",
                         exc.hint) from None
    return manifest
