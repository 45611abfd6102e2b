"""Tokenizer files pocketsd writes: a bundle's ``tokenizer.json``, and the CLIP-style tokenizer of random models.

A bundle's ``tokenizer.json`` is the model's own tokenizer as transformers loads it from ``vocab.json`` +
``merges.txt`` + its configs (the fast CLIP tokenizer: CLIP's normalizer, word split, byte-level BPE and special
tokens), saved by the ``tokenizers`` library with what diffusers asks for at each call set in the file: bos/eos
framing, truncation to the text encoder's length, and padding to it with the pad token the model's configs name (SD 1.5
pads with ``<|endoftext|>``, SD 2.x with ``!``, id 0). The runtime then only loads the file and encodes.

Random models (``pocketsd random-model``, the tests' tiny model) get a tokenizer without a download, written in the
layout of SD 1.5's ``tokenizer/`` folder (``vocab.json``, ``merges.txt`` with its ``#version: 0.2`` header,
``special_tokens_map.json``, ``tokenizer_config.json``). The vocabulary is laid out as CLIP's is: ids 0-255 the
byte-level symbols, 256-511 the same with the end-of-word suffix ``</w>``, then the merged tokens in merge order, then
(when the corpus yields too few merges) unused placeholders, and last ``<|startoftext|>`` and ``<|endoftext|>``. So any
text encodes, and the vocabulary fills exactly the text encoder's embedding table (49408 tokens for SD 1.5). The
merges are learned from ``model_configs/tokenizer_corpus.txt`` by ``tokenizers``' own BPE trainer, on words cut by
CLIP's split as transformers builds it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from importlib import resources
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer

from pocketsd.errors import InternalError, ModelError, OutputError

logger = logging.getLogger(__name__)

VOCAB_FILE = "vocab.json"
MERGES_FILE = "merges.txt"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_FILE = "special_tokens_map.json"
MERGES_HEADER = "#version: 0.2"
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
END_OF_WORD = "</w>"

CORPUS_RESOURCE = "model_configs/tokenizer_corpus.txt"
CLIP_MODEL_MAX_LENGTH = 77
SD15_VOCAB_SIZE = 49408
MIN_MERGE_FREQUENCY = 2
BASE_SYMBOLS = 256
MIN_VOCAB_SIZE = 2 * BASE_SYMBOLS + 2  # byte symbols, the same with </w>, bos and eos
PLACEHOLDER_PREFIX = "<|unused_"
PLACEHOLDER = PLACEHOLDER_PREFIX + "{:05d}|>"

Pair = tuple[str, str]


# -- a bundle's tokenizer.json ---------------------------------------------------------------------------------------


def load_clip_tokenizer(tokenizer_dir: Path) -> Any:
    """The tokenizer of a diffusers ``tokenizer/`` folder as transformers' fast CLIP tokenizer, read from disk only."""
    import transformers

    # transformers 5 folded CLIPTokenizerFast into CLIPTokenizer (now backed by tokenizers); 4.x has both classes
    cls = getattr(transformers, "CLIPTokenizerFast", None) or transformers.CLIPTokenizer
    try:
        tokenizer = cls.from_pretrained(str(tokenizer_dir), local_files_only=True)
    except Exception as exc:  # transformers and tokenizers raise many kinds for a broken folder; all are the user's
        raise ModelError(f"transformers cannot read the tokenizer in {tokenizer_dir}: {type(exc).__name__}: {exc}",
                         "copy the tokenizer/ folder of the original model into the model folder") from None
    if not getattr(tokenizer, "is_fast", False):
        raise InternalError(f"transformers {transformers.__version__} gave no fast tokenizer for {tokenizer_dir}")
    return tokenizer


def tokenizer_json(tokenizer_dir: Path, max_length: int) -> str:
    """The text of a bundle's ``tokenizer.json``: ids of ``tokenizer(prompt, padding="max_length",
    max_length=max_length, truncation=True)`` from ``Tokenizer.from_str(text).encode(prompt).ids``."""
    tokenizer = load_clip_tokenizer(tokenizer_dir)
    tokens = {"bos": tokenizer.bos_token, "eos": tokenizer.eos_token, "pad": tokenizer.pad_token}
    vocab = tokenizer.get_vocab()  # with the added tokens
    missing = [role for role, token in tokens.items() if token not in vocab]
    if missing:
        raise ModelError(f"the tokenizer in {tokenizer_dir} has no {' or '.join(missing)} token in its vocabulary "
                         f"({tokens})", "copy the tokenizer/ folder of the original model into the model folder")
    ids = {role: vocab[token] for role, token in tokens.items()}
    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())  # a copy: transformers' object stays as it is
    bos, eos = tokens["bos"], tokens["eos"]
    # Stated here rather than inherited, so the framing does not depend on the transformers version that exported.
    backend.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", special_tokens=[(bos, ids["bos"]), (eos, ids["eos"])]
    )
    backend.enable_truncation(max_length=max_length)
    backend.enable_padding(length=max_length, pad_id=ids["pad"], pad_token=tokens["pad"])
    if tokenizer.model_max_length != max_length:
        logger.info("the tokenizer's model_max_length is %s; padding to the text encoder's %d positions",
                    tokenizer.model_max_length, max_length)
    return backend.to_str(pretty=True)


def write_tokenizer_json(tokenizer_dir: Path, out_path: Path, max_length: int) -> Path:
    out_path = Path(out_path)
    try:
        out_path.write_text(tokenizer_json(Path(tokenizer_dir), max_length) + "\n", encoding="utf-8")
    except OSError as exc:
        raise OutputError(f"cannot write {out_path}: {exc}", "choose a writable folder") from exc
    return out_path


# -- the tokenizer of random models ------------------------------------------------------------------------------


def write_clip_tokenizer(
    out_dir: Path, vocab_size: int = 1024, *, model_max_length: int = CLIP_MODEL_MAX_LENGTH, pad_token: str = EOS_TOKEN,
    corpus: Iterable[str] | None = None,
) -> None:
    """Writes the four tokenizer files of a CLIP-style tokenizer with exactly ``vocab_size`` tokens into ``out_dir``.

    ``pad_token="!"`` writes SD 2.x's configuration: its ``special_tokens_map.json`` names ``!`` (id 0) as the pad
    token, which overrides the ``<|endoftext|>`` of its ``tokenizer_config.json``. The same arguments give
    byte-identical files on every run and every machine. ``corpus``: the lines to learn the merges on (default: the
    shipped ``tokenizer_corpus.txt``), e.g. the captions of a model's training set.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ModelError(
            f"a CLIP tokenizer needs at least {MIN_VOCAB_SIZE} tokens, the text encoder asks for {vocab_size}",
            f"use a text encoder config with vocab_size >= {MIN_VOCAB_SIZE} (SD 1.5 uses {SD15_VOCAB_SIZE})",
        )
    out_dir = Path(out_dir)
    configs = {SPECIAL_TOKENS_FILE: _special_tokens_map(pad_token), CONFIG_FILE: _tokenizer_config(model_max_length)}
    # First the byte symbols alone, so that transformers builds CLIP's own word split to learn the merges on.
    _write_files(out_dir, build_vocab([], MIN_VOCAB_SIZE), [], configs)
    splitter = load_clip_tokenizer(out_dir).backend_tokenizer
    merges = learn_merges(_corpus_lines() if corpus is None else list(corpus), vocab_size - MIN_VOCAB_SIZE, splitter)
    vocab = build_vocab(merges, vocab_size)
    _write_files(out_dir, vocab, merges, configs)
    placeholders = sum(token.startswith(PLACEHOLDER_PREFIX) for token in vocab)
    logger.info("wrote a CLIP tokenizer (%d tokens, %d merges, %d placeholders) to %s", vocab_size, len(merges),
                placeholders, out_dir)


def learn_merges(lines: Iterable[str], max_new_tokens: int, splitter: Tokenizer) -> list[Pair]:
    """Byte-level BPE merges learned from ``lines`` (cut into words by ``splitter``'s normalizer and pre-tokenizer)
    until ``max_new_tokens`` tokens were made or no pair occurs ``MIN_MERGE_FREQUENCY`` times."""
    trainee = Tokenizer(BPE(end_of_word_suffix=END_OF_WORD))
    trainee.normalizer = splitter.normalizer
    trainee.pre_tokenizer = splitter.pre_tokenizer
    symbols = _base_symbols()
    trainer = BpeTrainer(
        vocab_size=len(symbols) + max_new_tokens,
        min_frequency=MIN_MERGE_FREQUENCY,
        show_progress=False,
        # The trainer numbers a symbol it meets with </w> in hash-map order, and ties between equally frequent
        # pairs go to the smaller ids: giving it every symbol up front, in CLIP's order, makes the merges the same
        # in every process.
        special_tokens=symbols,
        end_of_word_suffix=END_OF_WORD,
    )
    trainee.train_from_iterator(list(lines), trainer)
    merges = json.loads(trainee.to_str())["model"]["merges"]
    return [tuple(merge.split(" ")) if isinstance(merge, str) else tuple(merge) for merge in merges]


def build_vocab(merges: list[Pair], vocab_size: int) -> dict[str, int]:
    """CLIP's vocabulary layout for ``merges``, padded with placeholders to exactly ``vocab_size`` tokens."""
    tokens = [*_base_symbols(), *(left + right for left, right in merges)]
    tokens = list(dict.fromkeys(tokens))  # two merges may make the same token; it keeps its first id
    missing = vocab_size - 2 - len(tokens)
    if missing < 0:
        raise InternalError(f"{len(merges)} merges do not fit a vocabulary of {vocab_size} tokens")
    tokens += [PLACEHOLDER.format(i) for i in range(missing)]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != vocab_size:
        raise InternalError(f"the tokenizer vocabulary has {len(vocab)} tokens, expected {vocab_size}")
    return vocab


def byte_symbols() -> list[str]:
    """The 256 byte-level symbols in CLIP's vocabulary order (GPT-2's byte-to-unicode map: the printable bytes stand
    for themselves, the others map to U+0100 onwards in byte order, so code-point order is CLIP's order)."""
    return sorted(pre_tokenizers.ByteLevel.alphabet())


def _base_symbols() -> list[str]:
    symbols = byte_symbols()
    return [*symbols, *(symbol + END_OF_WORD for symbol in symbols)]


def _corpus_lines() -> list[str]:
    text = resources.files("pocketsd.export").joinpath(CORPUS_RESOURCE).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _write_files(out_dir: Path, vocab: dict[str, int], merges: list[Pair], configs: dict[str, dict]) -> None:
    files = {
        VOCAB_FILE: json.dumps(vocab, ensure_ascii=False) + "\n",
        MERGES_FILE: "\n".join([MERGES_HEADER, *(f"{left} {right}" for left, right in merges)]) + "\n",
        **{name: _to_json(config) for name, config in configs.items()},
    }
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (out_dir / name).write_bytes(text.encode("utf-8"))
    except OSError as exc:
        raise OutputError(f"cannot write the tokenizer into {out_dir}: {exc}", "choose a writable folder") from exc


def _added_token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def set_pad_token(folder: Path, pad_token: str) -> None:
    """Name ``pad_token`` as the pad token of the tokenizer in ``folder`` (its special_tokens_map.json), as SDXL's
    second tokenizer is its first with ``!`` as the pad token."""
    path = Path(folder) / SPECIAL_TOKENS_FILE
    special = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else _special_tokens_map(pad_token)
    special["pad_token"] = pad_token
    path.write_bytes(_to_json(special).encode("utf-8"))


def _special_tokens_map(pad_token: str) -> dict:
    return {
        "bos_token": _added_token(BOS_TOKEN),
        "eos_token": _added_token(EOS_TOKEN),
        "pad_token": pad_token,
        "unk_token": _added_token(EOS_TOKEN),
    }


def _tokenizer_config(model_max_length: int) -> dict:
    return {
        "add_prefix_space": False,
        "bos_token": BOS_TOKEN,
        "clean_up_tokenization_spaces": False,
        "do_lower_case": True,
        "eos_token": EOS_TOKEN,
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": EOS_TOKEN,
        "tokenizer_class": "CLIPTokenizer",
        "unk_token": EOS_TOKEN,
    }


def _to_json(data: dict) -> str:
    return json.dumps(data, indent=2, ensure_ascii=False) + "\n"
