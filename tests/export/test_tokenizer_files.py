"""The tokenizer pocketsd writes itself: deterministic bytes, CLIP's layout, any vocabulary size, loads upstream."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pocketsd.errors import ModelError, OutputError
from pocketsd.export.tokenizer_files import bytes_to_unicode, learn_merges, write_clip_tokenizer

FILES = ["merges.txt", "special_tokens_map.json", "tokenizer_config.json", "vocab.json"]


def read_all(path: Path) -> dict[str, bytes]:
    return {file.name: file.read_bytes() for file in sorted(path.iterdir())}


def read_vocab(path: Path) -> dict[str, int]:
    return json.loads((path / "vocab.json").read_text(encoding="utf-8"))


def read_merges(path: Path) -> list[str]:
    return (path / "merges.txt").read_text(encoding="utf-8").splitlines()


def test_two_writes_are_byte_identical(tmp_path: Path) -> None:
    write_clip_tokenizer(tmp_path / "a", vocab_size=1024)
    write_clip_tokenizer(tmp_path / "b", vocab_size=1024)
    first = read_all(tmp_path / "a")
    assert sorted(first) == FILES
    assert first == read_all(tmp_path / "b")


@pytest.mark.parametrize("hash_seed", ["1", "2"])
def test_writes_in_other_processes_are_byte_identical(tmp_path: Path, hash_seed: str) -> None:
    code = (
        "import sys; from pathlib import Path; from pocketsd.export.tokenizer_files import write_clip_tokenizer; "
        "write_clip_tokenizer(Path(sys.argv[1]), vocab_size=1024)"
    )
    env = {**os.environ, "PYTHONHASHSEED": hash_seed}
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "other")], check=True, env=env)
    write_clip_tokenizer(tmp_path / "here", vocab_size=1024)
    assert read_all(tmp_path / "other") == read_all(tmp_path / "here")


def test_vocab_follows_clip_layout(tmp_path: Path) -> None:
    write_clip_tokenizer(tmp_path, vocab_size=1024)
    vocab = read_vocab(tmp_path)
    tokens = sorted(vocab, key=vocab.__getitem__)
    assert len(vocab) == 1024 and sorted(vocab.values()) == list(range(1024))
    symbols = list(bytes_to_unicode().values())
    assert len(set(symbols)) == 256
    assert tokens[:256] == symbols
    assert tokens[256:512] == [symbol + "</w>" for symbol in symbols]
    assert tokens[-2:] == ["<|startoftext|>", "<|endoftext|>"]
    merges = read_merges(tmp_path)
    assert merges[0] == "#version: 0.2"
    assert len(merges) - 1 == 1024 - 514
    assert tokens[512:-2] == [merge.replace(" ", "") for merge in merges[1:]]


def test_config_files_follow_sd15(tmp_path: Path) -> None:
    write_clip_tokenizer(tmp_path, vocab_size=1024)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text(encoding="utf-8"))
    special = json.loads((tmp_path / "special_tokens_map.json").read_text(encoding="utf-8"))
    assert config["model_max_length"] == 77 and config["do_lower_case"] is True
    assert config["tokenizer_class"] == "CLIPTokenizer"
    assert (config["bos_token"], config["eos_token"], config["pad_token"]) == (
        "<|startoftext|>",
        "<|endoftext|>",
        "<|endoftext|>",
    )
    assert special["bos_token"]["content"] == "<|startoftext|>" and special["pad_token"] == "<|endoftext|>"


def test_pads_to_sd15_vocab_size(tmp_path: Path) -> None:
    write_clip_tokenizer(tmp_path / "small", vocab_size=1024)
    write_clip_tokenizer(tmp_path / "sd15", vocab_size=49408)
    vocab = read_vocab(tmp_path / "sd15")
    assert len(vocab) == 49408 and sorted(vocab.values()) == list(range(49408))
    assert (vocab["<|startoftext|>"], vocab["<|endoftext|>"]) == (49406, 49407)
    assert vocab["<|unused_00000|>"] < vocab["<|startoftext|>"]
    merges = read_merges(tmp_path / "sd15")
    assert merges[: len(read_merges(tmp_path / "small"))] == read_merges(tmp_path / "small")
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


def test_learn_merges_breaks_ties_by_string_order() -> None:
    assert learn_merges(["ab ab cd cd"], max_new_tokens=2) == [("a", "b</w>"), ("c", "d</w>")]
    assert learn_merges(["cd cd ab ab"], max_new_tokens=2) == [("a", "b</w>"), ("c", "d</w>")]
    assert learn_merges(["ab cd"], max_new_tokens=5) == []  # every pair is seen once: below the minimum count


@pytest.mark.parametrize("class_name", ["CLIPTokenizer", "CLIPTokenizerFast"])
def test_loads_in_transformers(tmp_path: Path, class_name: str) -> None:
    transformers = pytest.importorskip("transformers")
    if not hasattr(transformers, class_name):
        pytest.skip(f"transformers {transformers.__version__} has no {class_name}")
    write_clip_tokenizer(tmp_path, vocab_size=1024)
    tokenizer = getattr(transformers, class_name).from_pretrained(tmp_path)
    assert len(tokenizer) == 1024 and tokenizer.model_max_length == 77
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1022, 1023, 1023)
    ids = tokenizer("A Photo of a CAT!", padding="max_length", max_length=77, truncation=True).input_ids
    assert ids[0] == 1022 and len(ids) == 77
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a photo of a cat !"


@pytest.mark.export
def test_loads_in_stable_diffusion_pipeline(tmp_path: Path) -> None:
    pytest.importorskip("torch")
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
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
