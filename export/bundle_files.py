"""Files of a bundle besides the chunks: the tokenizer and the saved split plan, each with its sha256."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from pocketsd.export.model_loader import ModelFolder
from pocketsd.export.tokenizer_files import write_tokenizer_json
from pocketsd.runtime.hashing import sha256_path, size_of
from pocketsd.runtime.manifest import FileRef
from pocketsd.runtime.tokenizer import TOKENIZER_JSON

PLAN_NAME = "plan.json"


def file_ref(bundle_dir: Path, path: Path) -> FileRef:
    return FileRef(path=path.relative_to(bundle_dir).as_posix(), sha256=sha256_path(path), bytes=size_of(path))


def write_tokenizer(folder: ModelFolder, bundle_dir: Path, max_length: int) -> dict[str, Any]:
    """The runtime reads ``tokenizer.json``; the model's own files are copied beside it for Apple's Swift pipeline
    (``vocab.json``, ``merges.txt``) and to show where the tokenizer came from. An SDXL model's second tokenizer
    (its own pad token) is written the same way under ``tokenizer_2/`` and named in the entry's ``text_encoder_2``."""
    entries = [_write_one_tokenizer(folder, sub, bundle_dir, max_length) for sub in folder.tokenizers]
    return {**entries[0], **({"text_encoder_2": entries[1]} if len(entries) > 1 else {})}


def _write_one_tokenizer(folder: ModelFolder, subfolder: str, bundle_dir: Path, max_length: int) -> dict[str, Any]:
    target = bundle_dir / subfolder
    target.mkdir()
    written = []
    for name, source in folder.tokenizer_files(subfolder).items():
        shutil.copyfile(source, target / name)
        written.append(target / name)
    written.append(write_tokenizer_json(folder.path / subfolder, target / TOKENIZER_JSON, max_length))
    files = {path.name: file_ref(bundle_dir, path) for path in written}
    return {"kind": "clip-bpe", "files": files, "max_length": max_length}


def write_plan(bundle_dir: Path, plans: dict[str, Any]) -> Path:
    path = bundle_dir / PLAN_NAME
    path.write_text(json.dumps({"version": 1, "components": plans}, indent=2) + "\n")
    return path
