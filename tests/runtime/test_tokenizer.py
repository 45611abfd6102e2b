"""The torch-free CLIP tokenizer: layout of the ids, truncation, errors, and parity with transformers.CLIPTokenizer."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pocketsd.errors import BundleError
from pocketsd.export.tokenizer_files import write_clip_tokenizer
from pocketsd.runtime.tokenizer import ClipTokenizer

PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "",
    " ",
    "A PHOTO OF A CAT",
    "MiXeD CaSe Words And Names Like McDonald",
    "a red fox, sitting in snow; soft light: 85mm.",
    "hello!!! what?? yes... no---maybe",
    "(masterpiece:1.2), [best quality], {ultra detailed}",
    "a cat   with     lots of      spaces",
    "\ttabs\tand\nnewlines\r\nand\u00a0nbsp",
    "   leading and trailing whitespace   ",
    "numbers 0 1 22 333 4444 3.14159 1,000,000 2024-01-31",
    "a 4k 8k uhd hdr 35mm f/1.8 photo",
    "it's they're we've i'm you'll he'd don't",
    "IT'S THEY'RE WE'VE I'M YOU'LL HE'D",
    "the cat's toy's owner's house",
    "'quoted' \"double quoted\" `backticks`",
    "café naïve résumé façade",
    "Ünïcödé ÀÉÎÕÜ straße",
    "İstanbul ǅungla ß ẞ",
    "日本語のプロンプト 東京の夜景",
    "中文提示词 一只猫",
    "한국어 프롬프트",
    "Привет мир, красивый закат",
    "مرحبا بالعالم",
    "emoji 😀🚀🔥 and 👩‍👩‍👧 family and 🇯🇵 flag",
    "a🐱b🐶c",
    "math ∑ ∫ √ ∞ ≈ ≠ and arrows → ← ↑",
    "fullwidth ＡＢＣ ｄｅｆ １２３",
    "ligatures ﬁ ﬂ and fractions ½ ¾",
    "combining e\u0301 vs precomposed é",
    "zero\u200bwidth space and soft\u00adhyphen",
    "control chars \x00 \x07 \x1b end",
    "<|startoftext|> inside a prompt",
    "a prompt with <|endoftext|> inside",
    "<|STARTOFTEXT|> and <|ENDOFTEXT|> in upper case",
    "<|endoftext|><|startoftext|>glued<|endoftext|>",
    "x<|startoftext|>y",
    "<| not a special token |>",
    "</w> end of word marker written out",
    "url https://example.com/a?b=c&d=e#frag",
    "email someone@example.org and #hashtag @mention",
    "snake_case and kebab-case and CamelCase",
    "a\\backslash and /slash and |pipe|",
    "$100 €50 £20 ¥1000 ₹500",
    "1st 2nd 3rd 4th 21st century",
    "ALL CAPS LANDSCAPE, DRAMATIC LIGHTING, 8K!!!",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "word " * 90,
    "a very long prompt about a castle, " * 12,
]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tokenizer")
    write_clip_tokenizer(path, vocab_size=1024)
    return path


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path) -> ClipTokenizer:
    return ClipTokenizer.from_dir(tokenizer_dir)


def reference_ids(path: Path, prompts: list[str], max_length: int = 77) -> np.ndarray:
    """What diffusers' StableDiffusionPipeline feeds its text encoder."""
    transformers = pytest.importorskip("transformers")
    reference = transformers.CLIPTokenizer.from_pretrained(path)
    return reference(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="np")[
        "input_ids"
    ]


def assert_same_rows(ours: np.ndarray, reference: np.ndarray, prompts: list[str]) -> None:
    assert ours.shape == reference.shape
    different = [prompt for prompt, a, b in zip(prompts, ours, reference) if not np.array_equal(a, b)]
    assert not different, f"ids differ from transformers for: {different}"


def test_ids_equal_transformers(tokenizer: ClipTokenizer, tokenizer_dir: Path) -> None:
    assert_same_rows(tokenizer.encode(PROMPTS), reference_ids(tokenizer_dir, PROMPTS), PROMPTS)


def test_ids_equal_transformers_with_sd15_sized_vocab(tmp_path: Path) -> None:
    write_clip_tokenizer(tmp_path, vocab_size=49408)
    ours = ClipTokenizer.from_dir(tmp_path)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (49406, 49407, 49407)
    assert_same_rows(ours.encode(PROMPTS), reference_ids(tmp_path, PROMPTS), PROMPTS)


def test_ids_equal_transformers_with_shorter_max_length(tokenizer_dir: Path) -> None:
    ours = ClipTokenizer.from_dir(tokenizer_dir, max_length=16)
    assert_same_rows(ours.encode(PROMPTS), reference_ids(tokenizer_dir, PROMPTS, max_length=16), PROMPTS)


def test_reads_tokenizer_json_as_transformers_saves_it(tokenizer_dir: Path, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    transformers.CLIPTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp_path)
    (tmp_path / "vocab.json").unlink(missing_ok=True)
    (tmp_path / "merges.txt").unlink(missing_ok=True)
    assert (tmp_path / "tokenizer.json").is_file()
    assert_same_rows(ClipTokenizer.from_dir(tmp_path).encode(PROMPTS), reference_ids(tmp_path, PROMPTS), PROMPTS)


def test_row_layout(tokenizer: ClipTokenizer) -> None:
    ids = tokenizer.encode("a photo of a cat")
    assert ids.dtype == np.int64 and ids.shape == (1, 77)
    length = int(np.argmax(ids[0] == tokenizer.eos_id)) + 1
    assert ids[0, 0] == tokenizer.bos_id
    assert 3 <= length < 77
    assert np.all(ids[0, length:] == tokenizer.pad_id)
    assert tokenizer.decode(ids[0]) == "a photo of a cat"


def test_empty_prompt_is_bos_eos_then_padding(tokenizer: ClipTokenizer) -> None:
    ids = tokenizer.encode([""])
    assert ids[0, :2].tolist() == [tokenizer.bos_id, tokenizer.eos_id]
    assert np.all(ids[0, 2:] == tokenizer.pad_id)


def test_batch_rows_equal_single_encodes(tokenizer: ClipTokenizer) -> None:
    batch = tokenizer.encode(PROMPTS[:8])
    assert batch.shape == (8, 77)
    for row, prompt in zip(batch, PROMPTS[:8]):
        np.testing.assert_array_equal(row, tokenizer.encode(prompt)[0])


def test_any_text_encodes_without_unknown_tokens(tokenizer: ClipTokenizer) -> None:
    text = bytes(range(256)).decode("latin-1") + "😀𝔘𝔫𝔦𝔠𝔬𝔡𝔢"
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    assert encoding.ids and tokenizer.eos_id not in encoding.ids


def test_long_prompt_is_truncated_with_warning(tokenizer: ClipTokenizer, caplog: pytest.LogCaptureFixture) -> None:
    prompt = "a castle on a hill, " * 12 + "zebra unicorn"
    with caplog.at_level(logging.WARNING, logger="pocketsd.runtime.tokenizer"):
        ids = tokenizer.encode(["short prompt", prompt])
    assert ids.shape == (2, 77) and ids[1, -1] == tokenizer.eos_id and ids[1, 0] == tokenizer.bos_id
    warnings = [record for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    message = warnings[0].getMessage()
    total = len(tokenizer.backend.encode(prompt, add_special_tokens=False).ids)
    assert f"{total - 75} tokens were dropped" in message
    assert "zebra unicorn" in message and "Prompt 1" in message


def test_prompt_that_just_fits_gives_no_warning(tokenizer: ClipTokenizer, caplog: pytest.LogCaptureFixture) -> None:
    prompt = " ".join(["a"] * 75)  # "a</w>" is a base symbol: one token each
    with caplog.at_level(logging.WARNING, logger="pocketsd.runtime.tokenizer"):
        ids = tokenizer.encode(prompt)
    assert not caplog.records
    assert ids[0, -1] == tokenizer.eos_id and ids[0, -2] != tokenizer.eos_id


@pytest.mark.parametrize("name", ["vocab.json", "merges.txt", "tokenizer_config.json"])
def test_missing_file_names_it(tokenizer_dir: Path, tmp_path: Path, name: str) -> None:
    for file in tokenizer_dir.iterdir():
        if file.name != name:
            (tmp_path / file.name).write_bytes(file.read_bytes())
    with pytest.raises(BundleError, match=name):
        ClipTokenizer.from_dir(tmp_path)


def test_merges_that_do_not_fit_the_vocab_are_a_bundle_error(tokenizer_dir: Path, tmp_path: Path) -> None:
    for file in tokenizer_dir.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    with (tmp_path / "merges.txt").open("a", encoding="utf-8") as merges:
        merges.write("zq xj</w>\n")
    with pytest.raises(BundleError, match="merges"):
        ClipTokenizer.from_dir(tmp_path)


def test_config_without_max_length_needs_an_explicit_one(tokenizer_dir: Path, tmp_path: Path) -> None:
    for file in tokenizer_dir.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    del config["model_max_length"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    with pytest.raises(BundleError, match="model_max_length"):
        ClipTokenizer.from_dir(tmp_path)
    assert ClipTokenizer.from_dir(tmp_path, max_length=32).encode("a cat").shape == (1, 32)


def test_from_files(tokenizer_dir: Path, tokenizer: ClipTokenizer) -> None:
    ours = ClipTokenizer.from_files(tokenizer_dir / "vocab.json", tokenizer_dir / "merges.txt", max_length=77)
    np.testing.assert_array_equal(ours.encode(PROMPTS), tokenizer.encode(PROMPTS))


def test_runtime_tokenizer_imports_no_torch_or_transformers() -> None:
    code = (
        "import sys; import pocketsd.runtime.tokenizer; "
        "bad = {'torch', 'transformers', 'diffusers'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
