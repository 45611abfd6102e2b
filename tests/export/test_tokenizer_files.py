"""Tokenizer files pocketsd writes: the random models' tokenizer (deterministic bytes, CLIP's layout, any vocabulary
size, loads upstream) and a bundle's tokenizer.json (framing, padding and truncation set from the model's configs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pocketsd.errors import ModelError, OutputError
from pocketsd.export.tokenizer_files import byte_symbols, learn_merges, tokenizer_json, write_clip_tokenizer

transformers = pytest.importorskip("transformers")  # the merges are learned on CLIP's split as transformers builds it

FILES = ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]


def read_all(path: Path) -> dict[str, bytes]:
    return {file.name: file.read_bytes() for file in sorted(path.iterdir())}


def read_vocab(path: Path) -> dict[str, int]:
    return json.loads((path / "vocab.json").read_text(encoding="utf-8"))


def read_merges(path: Path) -> list[str]:
    return (path / "merges.txt").read_text(encoding="utf-8").splitlines()


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("small")
    write_clip_tokenizer(path, vocab_size=1024)
    return path


def test_two_writes_are_byte_identical(small: Path, tmp_path: Path) -> None:
    write_clip_tokenizer(tmp_path, vocab_size=1024)
    first = read_all(small)
    assert sorted(first) == FILES
    assert first == read_all(tmp_path)


@pytest.mark.parametrize("hash_seed", ["1", "2", "3"])
def test_writes_in_other_processes_are_byte_identical(small: Path, tmp_path: Path, hash_seed: str) -> None:
    """Each process also gets new random hash-map seeds inside tokenizers (Rust), whatever PYTHONHASHSEED says."""
    code = (
        "import sys; from pathlib import Path; from pocketsd.export.tokenizer_files import write_clip_tokenizer; "
        "write_clip_tokenizer(Path(sys.argv[1]), vocab_size=1024)"
    )
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "other")], check=True, env=env)
    assert read_all(tmp_path / "other") == read_all(small)


def test_vocab_follows_clip_layout(small: Path) -> None:
    vocab = read_vocab(small)
    tokens = sorted(vocab, key=vocab.__getitem__)
    assert len(vocab) == 1024 and sorted(vocab.values()) == list(range(1024))
    symbols = byte_symbols()
    assert len(set(symbols)) == 256 and symbols[0] == "!" and symbols[-1] == "Ń"  # CLIP's first and last byte
    assert tokens[:256] == symbols
    assert tokens[256:512] == [symbol + "</w>" for symbol in symbols]
    assert tokens[-2:] == ["<|startoftext|>", "<|endoftext|>"]
    merges = read_merges(small)
    assert merges[0] == "#version: 0.2" and len(merges) > 100
    made = list(dict.fromkeys(merge.replace(" ", "") for merge in merges[1:]))
    assert tokens[512:-2] == made  # the corpus gives more merges than 1024 tokens hold: no placeholders


def test_config_files_follow_sd15_and_sd2(small: Path, tmp_path: Path) -> None:
    config = json.loads((small / "tokenizer_config.json").read_text(encoding="utf-8"))
    special = json.loads((small / "special_tokens_map.json").read_text(encoding="utf-8"))
    assert config["model_max_length"] == 77 and config["do_lower_case"] is True
    assert config["tokenizer_class"] == "CLIPTokenizer"
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == ("<|startoftext|>", "<|endoftext|>",
                                                                                "<|endoftext|>")
    assert special["bos_token"]["content"] == "<|startoftext|>" and special["pad_token"] == "<|endoftext|>"
    write_clip_tokenizer(tmp_path, vocab_size=1024, pad_token="!")
    files = read_all(tmp_path)
    assert json.loads(files["special_tokens_map.json"])["pad_token"] == "!"
    assert {name: files[name] for name in FILES if name != "special_tokens_map.json"} == {
        name: data for name, data in read_all(small).items() if name != "special_tokens_map.json"}


def test_pads_to_sd15_vocab_size(small: Path, tmp_path: Path) -> None:
    write_clip_tokenizer(tmp_path, vocab_size=49408)
    vocab = read_vocab(tmp_path)
    assert len(vocab) == 49408 and sorted(vocab.values()) == list(range(49408))
    assert (vocab["<|startoftext|>"], vocab["<|endoftext|>"]) == (49406, 49407)
    assert vocab["<|unused_00000|>"] < vocab["<|startoftext|>"]
    merges = read_merges(tmp_path)
    assert merges[: len(read_merges(small))] == read_merges(small)
    assert all(merge.replace(" ", "") in vocab for merge in merges[1:])


def test_smallest_vocab_has_no_merges(tmp_path: Path) -> None:
    write_clip_tokenizer(tmp_path, vocab_size=514)
    assert read_merges(tmp_path) == ["#version: 0.2"]
    assert len(read_vocab(tmp_path)) == 514


def test_too_small_vocab_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="514"):
        write_clip_tokenizer(tmp_path, vocab_size=300)


def test_unwritable_folder_is_an_output_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError):
        write_clip_tokenizer(blocker / "tokenizer")


def test_learn_merges_breaks_ties_by_clip_vocab_order() -> None:
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers.models import BPE

    splitter = Tokenizer(BPE())
    splitter.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    assert learn_merges(["ab ab cd cd"], 2, splitter) == [("a", "b</w>"), ("c", "d</w>")]
    assert learn_merges(["cd cd ab ab"], 2, splitter) == [("a", "b</w>"), ("c", "d</w>")]
    assert learn_merges(["ab cd"], 5, splitter) == []  # every pair is seen once: below the minimum count


@pytest.mark.parametrize("class_name", ["CLIPTokenizer", "CLIPTokenizerFast"])
def test_loads_in_transformers(small: Path, class_name: str) -> None:
    if not hasattr(transformers, class_name):
        pytest.skip(f"transformers {transformers.__version__} has no {class_name}")
    tokenizer = getattr(transformers, class_name).from_pretrained(small)
    assert len(tokenizer) == 1024 and tokenizer.model_max_length == 77
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1022, 1023, 1023)
    ids = tokenizer("A Photo of a CAT!", padding="max_length", max_length=77, truncation=True).input_ids
    assert ids[0] == 1022 and len(ids) == 77
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of a cat !"


@pytest.mark.parametrize(("pad_token", "pad_id"), [("<|endoftext|>", 1023), ("!", 0)])
def test_tokenizer_json_frames_pads_and_truncates(tmp_path: Path, pad_token: str, pad_id: int) -> None:
    write_clip_tokenizer(tmp_path, vocab_size=1024, pad_token=pad_token)
    data = json.loads(tokenizer_json(tmp_path, 77))
    assert data["padding"]["strategy"] == {"Fixed": 77} and data["padding"]["direction"] == "Right"
    assert (data["padding"]["pad_id"], data["padding"]["pad_token"]) == (pad_id, pad_token)
    assert data["truncation"]["max_length"] == 77 and data["truncation"]["direction"] == "Right"
    single = data["post_processor"]["single"]
    assert [next(iter(piece.values()))["id"] for piece in single] == ["<|startoftext|>", "A", "<|endoftext|>"]
    assert json.loads(tokenizer_json(tmp_path, 16))["padding"]["strategy"] == {"Fixed": 16}
    assert tokenizer_json(tmp_path, 77) == tokenizer_json(tmp_path, 77)  # the same bytes on every export


def test_broken_tokenizer_folder_is_a_model_error(small: Path, tmp_path: Path) -> None:
    for name in FILES:
        (tmp_path / name).write_bytes((small / name).read_bytes())
    (tmp_path / "vocab.json").write_text("{broken", encoding="utf-8")
    with pytest.raises(ModelError, match="cannot read the tokenizer"):
        tokenizer_json(tmp_path, 77)


@pytest.mark.export
def test_loads_in_stable_diffusion_pipeline(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    write_clip_tokenizer(tmp_path / "tokenizer", vocab_size=1024)
    text_encoder = transformers.CLIPTextModel(
        transformers.CLIPTextConfig(
            vocab_size=1024, hidden_size=8, intermediate_size=16, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=77, projection_dim=8, bos_token_id=1022, eos_token_id=1023, pad_token_id=1023,
        )
    )
    text_encoder.save_pretrained(tmp_path / "text_encoder")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
    }
    (tmp_path / "model_index.json").write_text(json.dumps(index), encoding="utf-8")
    absent = dict.fromkeys(["unet", "vae", "scheduler", "safety_checker", "feature_extractor", "image_encoder"])
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path, requires_safety_checker=False, **absent)
    assert len(pipe.tokenizer) == 1024 and pipe.tokenizer.model_max_length == 77
    embeddings, _ = pipe.encode_prompt("a red fox in the snow", "cpu", 1, do_classifier_free_guidance=False)
    assert tuple(embeddings.shape) == (1, 77, 8)
