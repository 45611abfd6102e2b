"""The runtime tokenizer (the bundle's tokenizer.json run by `tokenizers`): parity with transformers.CLIPTokenizer
in SD 1.5's and SD 2.x's configurations, the layout of the ids, truncation, and refusing what it cannot read.

The tokenizer.json is made as export makes it, from pocketsd's random CLIP tokenizer, so transformers is needed to
build it (no download); the reference is ``transformers.CLIPTokenizer``, the class diffusers' ``model_index.json``
names, loaded from the same folder.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pocketsd.errors import BundleError
from pocketsd.export.tokenizer_files import write_clip_tokenizer, write_tokenizer_json
from pocketsd.runtime.manifest import FileRef
from pocketsd.runtime.tokenizer import TOKENIZER_JSON, ClipTokenizer

PROMPTS = [
    "a photo of an astronaut riding a horse on mars",
    "",
    " ",
    "\n",
    "A PHOTO OF A CAT",
    "MiXeD CaSe Words And Names Like McDonald",
    "a red fox, sitting in snow; soft light: 85mm.",
    "hello!!! what?? yes... no---maybe",
    "wow! !! ! a!b !x",
    "(masterpiece:1.2), [best quality], {ultra detailed}",
    "a cat   with     lots of      spaces",
    "\ttabs\tand\nnewlines\r\nand\u00a0nbsp",
    "   leading and trailing whitespace   ",
    "numbers 0 1 22 333 4444 3.14159 1,000,000 2024-01-31",
    "a 4k 8k uhd hdr 35mm f/1.8 photo",
    "it's they're we've i'm you'll he'd don't",
    "IT'S THEY'RE WE'VE I'M YOU'LL HE'D",
    "the cat's toy's owner's house",
    "curly apostrophes: don’t it’s ‘quoted’",
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
    "<b>bold</b> &amp; <i>italic</i><br/> &lt;tag&gt;",
    '<div class="hero" style="color:red">a cat</div>',
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
    "日本の城、" * 40,
]
CONFIGS = {"sd15": "<|endoftext|>", "sd2": "!"}  # configuration → pad token


def model_tokenizer(path: Path, pad_token: str, vocab_size: int = 1024) -> Path:
    pytest.importorskip("transformers")
    write_clip_tokenizer(path, vocab_size=vocab_size, pad_token=pad_token)
    return path


def runtime_tokenizer(folder: Path, out: Path, max_length: int = 77) -> ClipTokenizer:
    """What export writes into the bundle, read as generate reads it."""
    return ClipTokenizer.from_file(write_tokenizer_json(folder, out / TOKENIZER_JSON, max_length), max_length)


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def configuration(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    path = model_tokenizer(tmp_path_factory.mktemp(request.param), CONFIGS[request.param])
    return request.param, path


@pytest.fixture(scope="module")
def sd15_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return model_tokenizer(tmp_path_factory.mktemp("sd15"), CONFIGS["sd15"])


@pytest.fixture(scope="module")
def tokenizer(sd15_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> ClipTokenizer:
    return runtime_tokenizer(sd15_dir, tmp_path_factory.mktemp("bundle"))


def reference_ids(path: Path, prompts: list[str], max_length: int = 77) -> np.ndarray:
    """What diffusers' StableDiffusionPipeline feeds its text encoder."""
    transformers = pytest.importorskip("transformers")
    reference = transformers.CLIPTokenizer.from_pretrained(path, local_files_only=True)
    return reference(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="np")[
        "input_ids"
    ]


def assert_same_rows(ours: np.ndarray, reference: np.ndarray, prompts: list[str]) -> None:
    assert ours.shape == reference.shape
    different = [prompt for prompt, a, b in zip(prompts, ours, reference) if not np.array_equal(a, b)]
    assert not different, f"ids differ from transformers for: {different}"


def test_enough_awkward_prompts() -> None:
    assert len(PROMPTS) >= 50 and len(set(PROMPTS)) == len(PROMPTS)


def test_ids_equal_transformers(configuration: tuple[str, Path], tmp_path: Path) -> None:
    _, folder = configuration
    ours = runtime_tokenizer(folder, tmp_path)
    assert_same_rows(ours.encode(PROMPTS), reference_ids(folder, PROMPTS), PROMPTS)


def test_pad_token_comes_from_the_models_configs(configuration: tuple[str, Path], tmp_path: Path) -> None:
    name, folder = configuration
    ours = runtime_tokenizer(folder, tmp_path)
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    assert ours.pad_id == {"sd15": vocab["<|endoftext|>"], "sd2": 0}[name]
    row = ours.encode("a cat")[0]
    assert row[0] == vocab["<|startoftext|>"] and np.all(row[-70:] == ours.pad_id)


def test_ids_equal_transformers_with_sd15_sized_vocab(tmp_path: Path) -> None:
    folder = model_tokenizer(tmp_path / "model", CONFIGS["sd15"], vocab_size=49408)
    ours = runtime_tokenizer(folder, tmp_path)
    assert ours.pad_id == 49407 and ours.backend.token_to_id("<|startoftext|>") == 49406
    assert_same_rows(ours.encode(PROMPTS), reference_ids(folder, PROMPTS), PROMPTS)


def test_ids_equal_transformers_with_shorter_max_length(sd15_dir: Path, tmp_path: Path) -> None:
    ours = runtime_tokenizer(sd15_dir, tmp_path, max_length=16)
    assert_same_rows(ours.encode(PROMPTS), reference_ids(sd15_dir, PROMPTS, max_length=16), PROMPTS)


def test_row_layout(tokenizer: ClipTokenizer) -> None:
    bos, eos = (tokenizer.backend.token_to_id(t) for t in ("<|startoftext|>", "<|endoftext|>"))
    ids = tokenizer.encode("a photo of a cat")
    assert ids.dtype == np.int64 and ids.shape == (1, 77)
    length = int(np.argmax(ids[0] == eos)) + 1
    assert ids[0, 0] == bos and 3 <= length < 77
    assert np.all(ids[0, length:] == tokenizer.pad_id)
    assert tokenizer.backend.decode(ids[0].tolist()).replace("</w>", " ").strip() == "a photo of a cat"


def test_empty_prompt_is_bos_eos_then_padding(tokenizer: ClipTokenizer) -> None:
    ids = tokenizer.encode([""])
    assert ids[0, :2].tolist() == [tokenizer.backend.token_to_id(t) for t in ("<|startoftext|>", "<|endoftext|>")]
    assert np.all(ids[0, 2:] == tokenizer.pad_id)
    assert tokenizer.encode([]).shape == (0, 77)


def test_batch_rows_equal_single_encodes(tokenizer: ClipTokenizer) -> None:
    batch = tokenizer.encode(PROMPTS[:8])
    assert batch.shape == (8, 77)
    for row, prompt in zip(batch, PROMPTS[:8]):
        np.testing.assert_array_equal(row, tokenizer.encode(prompt)[0])


def test_long_prompt_is_truncated_with_warning(tokenizer: ClipTokenizer, caplog: pytest.LogCaptureFixture) -> None:
    prompt = "a castle on a hill, " * 12 + "zebra unicorn"
    with caplog.at_level(logging.WARNING, logger="pocketsd.runtime.tokenizer"):
        ids = tokenizer.encode(["short prompt", prompt])
    eos = tokenizer.backend.token_to_id("<|endoftext|>")
    assert ids.shape == (2, 77) and ids[1, -1] == eos and ids[1, 0] == tokenizer.backend.token_to_id("<|startoftext|>")
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "zebra unicorn" in warnings[0] and "Prompt 1" in warnings[0]


def test_prompt_that_just_fits_gives_no_warning(tokenizer: ClipTokenizer, caplog: pytest.LogCaptureFixture) -> None:
    prompt = " ".join(["a"] * 75)  # "a</w>" is a base symbol: one token each
    with caplog.at_level(logging.WARNING, logger="pocketsd.runtime.tokenizer"):
        ids = tokenizer.encode(prompt)
    eos = tokenizer.backend.token_to_id("<|endoftext|>")
    assert not caplog.records
    assert ids[0, -1] == eos and ids[0, -2] != eos


def test_bundle_without_tokenizer_json_asks_for_a_re_export(sd15_dir: Path, tmp_path: Path) -> None:
    """A bundle written before tokenizer.json: its tokenizer/ folder holds only the model's own files."""
    for file in sd15_dir.iterdir():
        (tmp_path / file.name).write_bytes(file.read_bytes())
    with pytest.raises(BundleError, match=TOKENIZER_JSON) as error:
        ClipTokenizer.from_dir(tmp_path, max_length=77)
    assert error.value.code == "bundle-version" and "re-export" in error.value.hint
    entry = {"kind": "clip-bpe", "max_length": 77, "files": {"vocab.json": FileRef("tokenizer/vocab.json", "0", 1)}}
    with pytest.raises(BundleError, match="older pocketsd") as error:
        ClipTokenizer.from_manifest(tmp_path, entry)
    assert error.value.code == "bundle-version"


def test_from_manifest_reads_the_file_it_names(sd15_dir: Path, tmp_path: Path) -> None:
    write_tokenizer_json(sd15_dir, tmp_path / "elsewhere.json", 77)
    entry = {"max_length": 77, "files": {TOKENIZER_JSON: FileRef("elsewhere.json", "0", 1)}}
    assert ClipTokenizer.from_manifest(tmp_path, entry).encode("a cat").shape == (1, 77)
    with pytest.raises(BundleError, match="max_length is 64"):
        ClipTokenizer.from_manifest(tmp_path, {**entry, "max_length": 64})


def test_unreadable_file_is_a_bundle_error(tmp_path: Path) -> None:
    (tmp_path / TOKENIZER_JSON).write_text("{not json", encoding="utf-8")
    with pytest.raises(BundleError, match="tokenizers library"):
        ClipTokenizer.from_dir(tmp_path)


def test_file_without_padding_is_a_bundle_error(tokenizer: ClipTokenizer, tmp_path: Path) -> None:
    data = json.loads(tokenizer.backend.to_str())
    data["padding"] = None
    (tmp_path / TOKENIZER_JSON).write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(BundleError, match="pad and truncate"):
        ClipTokenizer.from_dir(tmp_path)


def test_runtime_tokenizer_imports_no_torch_or_transformers() -> None:
    code = (
        "import sys; import pocketsd.runtime.tokenizer; "
        "bad = {'torch', 'transformers', 'diffusers', 'yaml'} & set(sys.modules); assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
