"""The ``shapes`` model: a small text-to-image latent diffusion model pocketsd trains itself (train.py) on procedural
captioned scenes (scenes.py), and the judge that says whether a picture shows its prompt (judge.py).

Its trained weights ship in ``model/``, a standard diffusers folder; ``--model shapes`` names it wherever
``--model tiny`` works.
"""

from __future__ import annotations

from pathlib import Path

from pocketsd.errors import ModelError

NAME = "shapes"


def model_folder() -> Path:
    """The shipped diffusers folder of the trained ``shapes`` model."""
    folder = Path(__file__).resolve().parent / "model"
    if not (folder / "model_index.json").is_file():
        raise ModelError(f"the trained shapes model is missing from {folder}",
                         "reinstall pocketsd, or train it again with `make train-tiny`", code="model")
    return folder
