"""Files of a bundle besides the chunks: tokenizer copies and the saved split plan, each with its sha256."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from pocketsd.export.model_loader import ModelFolder
from pocketsd.runtime.hashing import sha256_path, size_of
from pocketsd.runtime.manifest import FileRef

PLAN_NAME = "plan.json"


def file_ref(bundle_dir: Path, path: Path) -> FileRef:
    return FileRef(path=path.relative_to(bundle_dir).as_posix(), sha256=sha256_path(path), bytes=size_of(path))


def write_tokenizer(folder: ModelFolder, bundle_dir: Path, max_length: int) -> dict[str, Any]:
    target = bundle_dir / "tokenizer"
    target.mkdir()
    files = {}
    for name, source in folder.tokenizer_files().items():
        shutil.copyfile(source, target / name)
        files[name] = file_ref(bundle_dir, target / name)
    return {"kind": "clip-bpe", "files": files, "max_length": max_length}


def write_plan(bundle_dir: Path, plans: dict[str, Any]) -> Path:
    path = bundle_dir / PLAN_NAME
    path.write_text(json.dumps({"version": 1, "components": plans}, indent=2) + "\n")
    return path
