"""Writes a CLIP-style tokenizer that pocketsd learns itself, so tiny test models need no download.

The four files follow the layout of the ``tokenizer/`` folder of Stable Diffusion 1.5 (openai/clip-vit-large-patch14):
``vocab.json``, ``merges.txt`` (``#version: 0.2`` header), ``special_tokens_map.json`` and ``tokenizer_config.json``,
and they load with ``transformers.CLIPTokenizer`` and inside ``diffusers.StableDiffusionPipeline``.

The vocabulary is laid out as CLIP's is: ids 0-255 are the 256 byte-level symbols, 256-511 the same symbols with the
end-of-word suffix ``</w>``, then one token per merge in merge order, then (only when the corpus yields too few
merges) unused placeholder tokens, and last ``<|startoftext|>`` and ``<|endoftext|>``. Any text therefore encodes,
and the vocabulary can be padded to exactly the text encoder's embedding size (49408 for SD 1.5).

The merges are learned from ``model_configs/tokenizer_corpus.txt`` by a small BPE learner here rather than by
``tokenizers.trainers.BpeTrainer``: that trainer breaks ties between equally frequent pairs in hash-map order, so its
merges change from one process to the next, and these files must be byte-identical on every run. The words are cut
with the runtime's own CLIP normalizer and pre-tokenizer, so training and encoding split text the same way.
"""

from __future__ import annotations

import heapq
import json
import logging
from collections import Counter, defaultdict
from collections.abc import Iterable
from importlib import resources
from pathlib import Path

from pocketsd.errors import InternalError, ModelError, OutputError
from pocketsd.runtime.tokenizer import (
    BOS_TOKEN,
    CONFIG_FILE,
    END_OF_WORD,
    EOS_TOKEN,
    MERGES_FILE,
    MERGES_HEADER,
    SPECIAL_TOKENS_FILE,
    VOCAB_FILE,
    clip_normalizer,
    clip_pre_tokenizer,
)

logger = logging.getLogger(__name__)

CORPUS_RESOURCE = "model_configs/tokenizer_corpus.txt"
CLIP_MODEL_MAX_LENGTH = 77
SD15_VOCAB_SIZE = 49408
MIN_MERGE_FREQUENCY = 2
BASE_SYMBOLS = 256
MIN_VOCAB_SIZE = 2 * BASE_SYMBOLS + 2  # byte symbols, the same with </w>, bos and eos
PLACEHOLDER_PREFIX = "<|unused_"
PLACEHOLDER = PLACEHOLDER_PREFIX + "{:05d}|>"

Pair = tuple[str, str]


def write_clip_tokenizer(
    out_dir: Path, vocab_size: int = 1024, *, model_max_length: int = CLIP_MODEL_MAX_LENGTH
) -> None:
    """Writes the four tokenizer files of a CLIP-style tokenizer with exactly ``vocab_size`` tokens into ``out_dir``.

    The same arguments give byte-identical files on every run and every machine.
    """
    if vocab_size < MIN_VOCAB_SIZE:
        raise ModelError(
            f"a CLIP tokenizer needs at least {MIN_VOCAB_SIZE} tokens, the text encoder asks for {vocab_size}",
            f"use a text encoder config with vocab_size >= {MIN_VOCAB_SIZE} (SD 1.5 uses {SD15_VOCAB_SIZE})",
        )
    merges = learn_merges(_corpus_lines(), max_new_tokens=vocab_size - MIN_VOCAB_SIZE)
    vocab = build_vocab(merges, vocab_size)
    files = {
        VOCAB_FILE: json.dumps(vocab, ensure_ascii=False) + "\n",
        MERGES_FILE: "\n".join([MERGES_HEADER, *(f"{left} {right}" for left, right in merges)]) + "\n",
        SPECIAL_TOKENS_FILE: _to_json(_special_tokens_map()),
        CONFIG_FILE: _to_json(_tokenizer_config(model_max_length)),
    }
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (out_dir / name).write_bytes(text.encode("utf-8"))
    except OSError as exc:
        raise OutputError(f"cannot write the tokenizer into {out_dir}: {exc}", "choose a writable folder") from exc
    placeholders = sum(token.startswith(PLACEHOLDER_PREFIX) for token in vocab)
    logger.info(
        "wrote a CLIP tokenizer (%d tokens, %d merges, %d placeholders) to %s",
        vocab_size,
        len(merges),
        placeholders,
        out_dir,
    )


def learn_merges(lines: Iterable[str], max_new_tokens: int) -> list[Pair]:
    """Byte-level BPE merges learned from ``lines``, deterministically.

    Each step merges the most frequent adjacent pair; ties go to the smallest pair in string order. Learning stops
    when ``max_new_tokens`` distinct tokens were made or no pair occurs ``MIN_MERGE_FREQUENCY`` times.
    """
    word_counts = _word_counts(lines)
    words = [_symbols(word) for word in word_counts]
    freqs = list(word_counts.values())
    counts: Counter[Pair] = Counter()
    where: defaultdict[Pair, set[int]] = defaultdict(set)
    for index, symbols in enumerate(words):
        _count_pairs(symbols, freqs[index], index, counts, where)
    heap = [(-count, pair) for pair, count in counts.items()]
    heapq.heapify(heap)
    merges: list[Pair] = []
    made: set[str] = set()
    while heap and len(made) < max_new_tokens:
        negative, pair = heapq.heappop(heap)
        if -negative != counts.get(pair, 0):
            continue  # stale entry: the count changed since it was pushed
        if -negative < MIN_MERGE_FREQUENCY:
            break
        merges.append(pair)
        made.add(pair[0] + pair[1])
        touched = _apply_merge(pair, words, freqs, counts, where)
        for changed in sorted(touched):
            if counts.get(changed, 0) > 0:
                heapq.heappush(heap, (-counts[changed], changed))
    return merges


def build_vocab(merges: list[Pair], vocab_size: int) -> dict[str, int]:
    """CLIP's vocabulary layout for ``merges``, padded with placeholders to exactly ``vocab_size`` tokens."""
    tokens = _base_symbols()
    tokens += [symbol + END_OF_WORD for symbol in tokens]
    tokens += [left + right for left, right in merges]
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


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's and CLIP's map from each byte to a printable unicode symbol, in CLIP's vocabulary order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping = {byte: chr(byte) for byte in printable}
    extra = 0
    for byte in range(BASE_SYMBOLS):
        if byte not in mapping:
            mapping[byte] = chr(BASE_SYMBOLS + extra)
            extra += 1
    return mapping


def _base_symbols() -> list[str]:
    return list(bytes_to_unicode().values())


def _corpus_lines() -> list[str]:
    text = resources.files("pocketsd.export").joinpath(CORPUS_RESOURCE).read_text(encoding="utf-8")
    return [line for line in text.splitlines() if line.strip() and not line.startswith("#")]


def _word_counts(lines: Iterable[str]) -> dict[str, int]:
    """Byte-level words of ``lines`` as CLIP cuts them, with their counts, in first-seen order."""
    normalizer, pre_tokenizer = clip_normalizer(), clip_pre_tokenizer()
    counts: dict[str, int] = {}
    for line in lines:
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line)):
            counts[word] = counts.get(word, 0) + 1
    return counts


def _symbols(word: str) -> list[str]:
    symbols = list(word)
    symbols[-1] += END_OF_WORD
    return symbols


def _count_pairs(
    symbols: list[str], freq: int, index: int, counts: Counter[Pair], where: defaultdict[Pair, set[int]]
) -> None:
    for pair in zip(symbols, symbols[1:]):
        counts[pair] += freq
        where[pair].add(index)


def _apply_merge(
    pair: Pair, words: list[list[str]], freqs: list[int], counts: Counter[Pair], where: defaultdict[Pair, set[int]]
) -> set[Pair]:
    """Merges ``pair`` in every word holding it, updating the pair counts; returns the pairs whose count changed."""
    touched: set[Pair] = set()
    merged = pair[0] + pair[1]
    for index in sorted(where.pop(pair, ())):
        old = words[index]
        for old_pair in zip(old, old[1:]):
            counts[old_pair] -= freqs[index]
            touched.add(old_pair)
        new: list[str] = []
        i = 0
        while i < len(old):
            if i + 1 < len(old) and (old[i], old[i + 1]) == pair:
                new.append(merged)
                i += 2
            else:
                new.append(old[i])
                i += 1
        words[index] = new
        _count_pairs(new, freqs[index], index, counts, where)
        touched.update(zip(new, new[1:]))
    counts.pop(pair, None)
    touched.discard(pair)
    return touched


def _added_token(content: str) -> dict:
    return {"content": content, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}


def _special_tokens_map() -> dict:
    return {
        "bos_token": _added_token(BOS_TOKEN),
        "eos_token": _added_token(EOS_TOKEN),
        "pad_token": EOS_TOKEN,
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
