"""Bad inputs give one clear line, a non-zero exit, and nothing left behind in --out or beside it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pocketsd.cli import main

pytest.importorskip("torch")
pytestmark = pytest.mark.export


def run_export(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["export", "--quiet", *args])
    err = capsys.readouterr().err.strip()
    return code, err


def assert_clean_failure(code: int, err: str, out: Path, expected: str) -> None:
    assert code == 2
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error[") and expected in err
    assert not out.exists() or not any(out.iterdir())
    assert not [p for p in out.parent.iterdir() if ".partial-" in p.name]


def test_missing_model_folder(tmp_path: Path, capsys):
    out = tmp_path / "b"
    code, err = run_export(capsys, "--model", str(tmp_path / "nope"), "--out", str(out))
    assert_clean_failure(code, err, out, "does not exist")


def test_model_folder_missing_a_component(tmp_path: Path, tiny_model_dir: Path, capsys):
    model = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, model)
    shutil.rmtree(model / "vae")
    out = tmp_path / "b"
    code, err = run_export(capsys, "--model", str(model), "--out", str(out))
    assert_clean_failure(code, err, out, "missing its VAE")


def test_unknown_preset_key(tmp_path: Path, tiny_model_dir: Path, capsys):
    preset = tmp_path / "mine.yaml"
    preset.write_text("backend: onnx\nsplit:\n  unet: {n_chunks: 4}\nturbo: true\n")
    out = tmp_path / "b"
    code, err = run_export(capsys, "--model", str(tiny_model_dir), "--preset", str(preset), "--out", str(out))
    assert_clean_failure(code, err, out, "unknown key 'turbo'")
    assert str(preset) in err


def test_impossible_chunk_request(tmp_path: Path, tiny_model_dir: Path, capsys):
    out = tmp_path / "b"
    code, err = run_export(capsys, "--model", str(tiny_model_dir), "--out", str(out), "--chunks", "unet=5000")
    assert_clean_failure(code, err, out, "cannot be cut into 5000 chunks")


def test_budget_below_a_layer(tmp_path: Path, tiny_model_dir: Path, capsys):
    out = tmp_path / "b"
    code, err = run_export(capsys, "--model", str(tiny_model_dir), "--out", str(out), "--max-chunk-mb", "0.01")
    assert_clean_failure(code, err, out, "per-chunk budget")


def test_unwritable_output(tmp_path: Path, tiny_model_dir: Path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    code, err = run_export(capsys, "--model", str(tiny_model_dir), "--out", str(blocker / "bundle"))
    assert code == 2 and len(err.splitlines()) == 1 and "cannot write the bundle" in err
    assert blocker.read_text() == "not a folder"


def test_existing_non_empty_output_is_not_overwritten(tmp_path: Path, tiny_model_dir: Path, capsys):
    out = tmp_path / "b"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, err = run_export(capsys, "--model", str(tiny_model_dir), "--out", str(out))
    assert code == 2 and "already exists" in err and (out / "keep.txt").read_text() == "mine"


def test_parity_below_threshold_fails_with_a_table_and_leaves_nothing(tmp_path: Path, tiny_model_dir: Path, capsys):
    preset = tmp_path / "strict.yaml"
    preset.write_text("backend: onnx\ncomponents: [text_encoder]\nparity: {min_psnr_db: 250}\n")
    out = tmp_path / "b"
    code = main(["export", "--quiet", "--model", str(tiny_model_dir), "--preset", str(preset), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[0].startswith("error[parity]") and "below threshold" in err[0]
    assert "PSNR dB" in err[1] and any("text_encoder.00" in line for line in err[2:])
    assert not out.exists() and not [p for p in tmp_path.iterdir() if ".partial-" in p.name]
