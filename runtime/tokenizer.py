"""CLIP's text tokenizer, without torch or transformers.

Stable Diffusion 1.x feeds its text encoder with the ids of OpenAI's CLIP tokenizer: a byte-level BPE whose words
end in ``</w>``, framed by ``<|startoftext|>`` and ``<|endoftext|>`` and padded to 77 ids. This module rebuilds that
tokenizer on the ``tokenizers`` library from the four files of a diffusers ``tokenizer/`` folder (``vocab.json``,
``merges.txt``, ``tokenizer_config.json``, ``special_tokens_map.json``), with the same normalizer, pre-tokenizer and
special tokens as ``transformers.CLIPTokenizer``, so that :meth:`ClipTokenizer.encode` returns exactly the ids of
``tokenizer(prompts, padding="max_length", max_length=77, truncation=True).input_ids``.

The export side (``pocketsd.export.tokenizer_files``) reuses :func:`clip_normalizer` and :func:`clip_pre_tokenizer`
to learn its merges, so both sides split text the same way.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers
from tokenizers.models import BPE

from pocketsd.errors import BundleError

logger = logging.getLogger(__name__)

VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
TOKENIZER_JSON_FILE = "tokenizer.json"

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"
MERGES_HEADER = "#version: 0.2"

# CLIP's word pattern: its two special tokens, English contractions, runs of letters, single digits, and runs of
# anything else that is not whitespace. Whitespace itself is dropped (the split keeps only the matches).
CLIP_WORD_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)


def clip_normalizer() -> normalizers.Normalizer:
    """NFC, every whitespace run to one space, then lowercase — as ``transformers.CLIPTokenizer`` does."""
    return normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )


def clip_pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """CLIP's word split followed by the byte-level mapping (bytes to printable unicode symbols)."""
    split = pre_tokenizers.Split(Regex(CLIP_WORD_PATTERN), behavior="removed", invert=True)
    return pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False)])


@dataclass(frozen=True)
class SpecialToken:
    """A special token; ``normalized`` tokens are found in a prompt after lowercasing, the others only verbatim."""

    content: str
    normalized: bool = False


@dataclass(frozen=True)
class SpecialTokens:
    """The special tokens a CLIP tokenizer frames and pads with.

    The defaults are what ``transformers.CLIPTokenizer`` makes of SD 1.5's files: bos, eos and unk are written
    there as normalized AddedTokens, pad as a plain string (so not normalized). eos, unk and pad are one token, and as
    transformers adds them in the order bos, eos, unk, pad, the last one's flag wins: ``<|ENDOFTEXT|>`` in a prompt
    is not eos, while ``<|STARTOFTEXT|>`` is bos.
    """

    bos: SpecialToken = SpecialToken(BOS_TOKEN, normalized=True)
    eos: SpecialToken = SpecialToken(EOS_TOKEN, normalized=True)
    unk: SpecialToken = SpecialToken(EOS_TOKEN, normalized=True)
    pad: SpecialToken = SpecialToken(EOS_TOKEN, normalized=False)

    def in_added_order(self) -> list[tuple[str, SpecialToken]]:
        return [("bos", self.bos), ("eos", self.eos), ("unk", self.unk), ("pad", self.pad)]


def build_clip_backend(
    vocab: dict[str, int], merges: list[tuple[str, str]], special: SpecialTokens = SpecialTokens()
) -> Tokenizer:
    """A ``tokenizers.Tokenizer`` that splits and merges like CLIP; it adds no bos/eos (the caller frames)."""
    model = BPE(
        vocab=vocab,
        merges=merges,
        dropout=None,
        continuing_subword_prefix="",
        end_of_word_suffix=END_OF_WORD,
        fuse_unk=False,
        unk_token=special.unk.content,
    )
    backend = Tokenizer(model)
    backend.normalizer = clip_normalizer()
    backend.pre_tokenizer = clip_pre_tokenizer()
    backend.decoder = decoders.ByteLevel()
    # Like transformers, a special token written inside a prompt is matched whole; one added again keeps the last flags.
    for _, token in special.in_added_order():
        backend.add_special_tokens([AddedToken(token.content, normalized=token.normalized, special=True)])
    return backend


class ClipTokenizer:
    """Turns prompts into the fixed-length int64 id rows that CLIP's text encoder takes."""

    def __init__(self, backend: Tokenizer, max_length: int, special: SpecialTokens = SpecialTokens()) -> None:
        if max_length < 2:
            raise BundleError(
                f"tokenizer max_length is {max_length}, but it must hold at least the bos and eos tokens",
                "set model_max_length in tokenizer_config.json to the text encoder's positions (77 for CLIP)",
            )
        self.backend = backend
        self.max_length = max_length
        self.special = special
        self.bos_id = _token_id(backend, special.bos.content, "bos")
        self.eos_id = _token_id(backend, special.eos.content, "eos")
        self.pad_id = _token_id(backend, special.pad.content, "pad")

    @classmethod
    def from_files(
        cls, vocab_path: Path, merges_path: Path, max_length: int, special: SpecialTokens = SpecialTokens()
    ) -> ClipTokenizer:
        """Builds the tokenizer from a ``vocab.json`` and a ``merges.txt``."""
        vocab, merges = _read_vocab(Path(vocab_path)), _read_merges(Path(merges_path))
        return cls._build(vocab, merges, max_length, special, Path(merges_path))

    @classmethod
    def from_dir(cls, path: Path, max_length: int | None = None) -> ClipTokenizer:
        """Builds the tokenizer from a diffusers-style ``tokenizer/`` folder.

        It reads ``vocab.json`` and ``merges.txt`` (SD 1.5's layout) or, when only that is there, ``tokenizer.json``
        (what transformers 5's ``save_pretrained`` writes), plus ``tokenizer_config.json`` and, if present,
        ``special_tokens_map.json``. ``max_length`` overrides ``model_max_length`` from ``tokenizer_config.json``.
        """
        path = Path(path)
        config = _read_json(path / CONFIG_FILE)
        special_map = _read_json(path / SPECIAL_TOKENS_FILE) if (path / SPECIAL_TOKENS_FILE).is_file() else {}
        if (path / VOCAB_FILE).is_file() or not (path / TOKENIZER_JSON_FILE).is_file():
            vocab, merges, added = _read_vocab(path / VOCAB_FILE), _read_merges(path / MERGES_FILE), []
        else:
            vocab, merges, added = _read_tokenizer_json(path / TOKENIZER_JSON_FILE)
        special = _special_tokens(config, special_map, added)
        if max_length is None:
            max_length = config.get("model_max_length")
            if not isinstance(max_length, int) or max_length > 1_000_000:
                raise BundleError(
                    f"{path / CONFIG_FILE} has no usable model_max_length (found {max_length!r})",
                    "set model_max_length to the text encoder's positions (77 for CLIP) or pass max_length",
                )
        return cls._build(vocab, merges, max_length, special, path)

    @classmethod
    def _build(
        cls, vocab: dict[str, int], merges: list[tuple[str, str]], max_length: int, special: SpecialTokens, where: Path
    ) -> ClipTokenizer:
        try:
            backend = build_clip_backend(vocab, merges, special)
        except Exception as exc:  # tokenizers raises a bare Exception for a merge whose token is not in the vocab
            raise BundleError(
                f"the tokenizer merges in {where} do not fit its vocabulary: {exc}",
                "re-export the bundle; every merge result must be a token of the vocabulary",
            ) from exc
        return cls(backend, max_length, special)

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, texts: str | list[str]) -> np.ndarray:
        """Ids of shape ``(batch, max_length)``: bos, the prompt's tokens, eos, then pad; too long prompts lose
        their tail (eos stays last) with a warning naming what was cut."""
        batch = [texts] if isinstance(texts, str) else list(texts)
        encodings = self.backend.encode_batch(batch, add_special_tokens=False)
        rows = np.full((len(batch), self.max_length), self.pad_id, dtype=np.int64)
        room = self.max_length - 2
        for row, (text, encoding) in enumerate(zip(batch, encodings)):
            ids = encoding.ids
            if len(ids) > room:
                self._warn_truncated(row, text, ids[room:])
                ids = ids[:room]
            rows[row, : len(ids) + 2] = [self.bos_id, *ids, self.eos_id]
        return rows

    def decode(self, ids: list[int] | np.ndarray) -> str:
        """Text of ``ids`` with the special tokens left out (words joined by single spaces)."""
        text = self.backend.decode([int(i) for i in ids], skip_special_tokens=True)
        return text.replace(END_OF_WORD, " ").strip()

    def _warn_truncated(self, row: int, text: str, dropped: list[int]) -> None:
        logger.warning(
            "Prompt %d was truncated because CLIP can only handle sequences up to %d tokens; "
            "%d tokens were dropped: %r (prompt starts %r)",
            row,
            self.max_length,
            len(dropped),
            self.decode(dropped),
            text[:40],
        )


def _token_id(backend: Tokenizer, token: str, role: str) -> int:
    token_id = backend.token_to_id(token)
    if token_id is None:
        raise BundleError(
            f"the tokenizer's {role} token {token!r} is not in {VOCAB_FILE}",
            "re-export the bundle, or fix the special tokens in tokenizer_config.json",
        )
    return token_id


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BundleError(
            f"tokenizer file {path} is missing", "re-export the bundle; its tokenizer/ folder is incomplete"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BundleError(f"tokenizer file {path} cannot be read: {exc}", "re-export the bundle") from exc


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(_read_text(path))
    except json.JSONDecodeError as exc:
        raise BundleError(f"tokenizer file {path} is not valid JSON: {exc}", "re-export the bundle") from exc
    if not isinstance(data, dict):
        raise BundleError(f"tokenizer file {path} must hold a JSON object", "re-export the bundle")
    return data


def _read_vocab(path: Path) -> dict[str, int]:
    vocab = _read_json(path)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in vocab.values()):
        raise BundleError(f"{path} must map token strings to integer ids", "re-export the bundle")
    return vocab


def _read_merges(path: Path) -> list[tuple[str, str]]:
    lines = _read_text(path).splitlines()
    if lines and lines[0].startswith("#version"):
        lines[0] = ""
    return [_merge(line, path, f"line {number}") for number, line in enumerate(lines, start=1) if line]


def _merge(entry: str | list, path: Path, where: str) -> tuple[str, str]:
    """One merge, written ``"left right"`` (merges.txt, older tokenizer.json) or ``["left", "right"]``."""
    parts = entry.split(" ") if isinstance(entry, str) else entry
    if not isinstance(parts, list) or len(parts) != 2 or not all(isinstance(p, str) and p for p in parts):
        raise BundleError(f"{path} {where} is not a merge 'left right': {entry!r}", "re-export the bundle")
    return parts[0], parts[1]


def _read_tokenizer_json(path: Path) -> tuple[dict[str, int], list[tuple[str, str]], list[dict]]:
    """Vocabulary, merges and added tokens of a ``tokenizers`` serialization of a BPE tokenizer."""
    data = _read_json(path)
    model = data.get("model")
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("merges"), list):
        raise BundleError(f"{path} does not hold a BPE tokenizer", "re-export the bundle with a CLIP tokenizer")
    vocab = model.get("vocab")
    if not isinstance(vocab, dict) or not all(isinstance(i, int) for i in vocab.values()):
        raise BundleError(f"{path} must map token strings to integer ids in model.vocab", "re-export the bundle")
    merges = [_merge(entry, path, f"merge {number}") for number, entry in enumerate(model["merges"])]
    added = [entry for entry in data.get("added_tokens") or [] if isinstance(entry, dict)]
    return vocab, merges, added


def _special_tokens(config: dict, special_map: dict, added: list[dict]) -> SpecialTokens:
    """The special tokens as transformers reads them: special_tokens_map.json overrides tokenizer_config.json unless
    the config lists ``added_tokens_decoder``; a plain string takes the flags of the added token of that content
    (from ``added_tokens_decoder`` or tokenizer.json) and is otherwise a token that is not normalized."""
    decoder = config.get("added_tokens_decoder")
    source = config if isinstance(decoder, dict) else {**config, **special_map}
    entries = [*added, *(entry for entry in (decoder or {}).values() if isinstance(entry, dict))]
    by_content = {entry.get("content"): entry for entry in entries}
    found = {}
    for key, default in SpecialTokens().in_added_order():
        value = source.get(f"{key}_token")
        value = by_content.get(value, value) if isinstance(value, str) else value
        if value is None:  # transformers falls back to CLIPTokenizer's defaults, plain strings
            found[key] = SpecialToken(default.content)
        elif isinstance(value, str):
            found[key] = SpecialToken(value)
        elif isinstance(value, dict) and isinstance(value.get("content"), str):
            found[key] = SpecialToken(value["content"], bool(value.get("normalized", False)))
        else:
            raise BundleError(f"the tokenizer's {key}_token is not a token: {value!r}", "re-export the bundle")
    return SpecialTokens(**found)
