"""CLIP's text tokenizer at run time: the bundle's ``tokenizer.json``, run by the ``tokenizers`` library.

The exporter saves the model's own tokenizer as transformers loads it, with everything diffusers asks for at each call
already set in the file: bos/eos framing, truncation to the text encoder's length and padding to it with the model's
pad token (SD 1.5 pads with ``<|endoftext|>``, SD 2.x with ``!``). See ``pocketsd.export.tokenizer_files``. So no
tokenizer rule is written here: this module loads the file, encodes, and turns the ids into the int64 rows that
CLIP's text encoder takes.

Bundles written before the tokenizer was saved this way have no ``tokenizer.json``; they are refused with a hint to
re-export rather than served by a second, hand-written tokenizer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Encoding, Tokenizer

from pocketsd.errors import BundleError

logger = logging.getLogger(__name__)

TOKENIZER_JSON = "tokenizer.json"
REEXPORT = "re-export the bundle with this pocketsd (`pocketsd export`)"


class ClipTokenizer:
    """Turns prompts into the fixed-length int64 id rows that CLIP's text encoder takes."""

    def __init__(self, backend: Tokenizer, where: str = TOKENIZER_JSON) -> None:
        padding, truncation = backend.padding, backend.truncation
        length = padding.get("length") if padding else None
        if length is None or not truncation or truncation.get("max_length") != length:
            raise BundleError(f"{where} does not pad and truncate every prompt to one length", REEXPORT)
        self.backend = backend
        self.max_length = int(length)
        self.pad_id = int(padding["pad_id"])

    @classmethod
    def from_file(cls, path: str | Path, max_length: int | None = None) -> ClipTokenizer:
        """The tokenizer in ``path``; ``max_length``, when given, is what the text encoder takes and must match."""
        path = Path(path)
        if not path.is_file():
            raise BundleError(f"{path} is missing: bundles written before pocketsd saved its tokenizer as "
                              f"{TOKENIZER_JSON} cannot be read", REEXPORT, code="bundle-version")
        try:
            backend = Tokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a bare Exception for a file it cannot parse
            raise BundleError(f"{path} is not a tokenizer the tokenizers library can read: {exc}", REEXPORT) from None
        tokenizer = cls(backend, str(path))
        if max_length is not None and tokenizer.max_length != max_length:
            raise BundleError(f"{path} pads to {tokenizer.max_length} ids, but the manifest's max_length is "
                              f"{max_length}", REEXPORT)
        return tokenizer

    @classmethod
    def from_manifest(cls, bundle_dir: str | Path, entry: dict[str, Any]) -> ClipTokenizer:
        """The tokenizer a manifest's ``tokenizer`` entry names (its ``files`` hold FileRefs)."""
        ref = entry.get("files", {}).get(TOKENIZER_JSON)
        if ref is None:
            raise BundleError(f"{bundle_dir}: the manifest's tokenizer names no {TOKENIZER_JSON}, so an older "
                              "pocketsd wrote the bundle", REEXPORT, code="bundle-version")
        return cls.from_file(Path(bundle_dir) / ref.path, int(entry["max_length"]))

    @classmethod
    def from_dir(cls, path: str | Path, max_length: int | None = None) -> ClipTokenizer:
        """The ``tokenizer.json`` in ``path`` (a bundle's ``tokenizer/`` folder)."""
        return cls.from_file(Path(path) / TOKENIZER_JSON, max_length)

    def encode(self, texts: str | list[str]) -> np.ndarray:
        """Ids of shape ``(batch, max_length)``: bos, the prompt's tokens, eos, then pad; too long prompts lose
        their tail (eos stays last) with a warning naming what was cut, as diffusers warns."""
        batch = [texts] if isinstance(texts, str) else list(texts)
        encodings = self.backend.encode_batch(batch)
        for row, (text, encoding) in enumerate(zip(batch, encodings)):
            if encoding.overflowing:
                self._warn_truncated(row, text, encoding)
        return np.array([encoding.ids for encoding in encodings], dtype=np.int64).reshape(len(batch), self.max_length)

    def _warn_truncated(self, row: int, text: str, encoding: Encoding) -> None:
        # The last kept prompt token sits just before eos; its offsets point into the prompt as given.
        kept_until = encoding.offsets[self.max_length - 2][1]
        logger.warning(
            "Prompt %d was truncated because CLIP can only handle sequences up to %d tokens; dropped: %r",
            row,
            self.max_length,
            text[kept_until:].strip(),
        )
