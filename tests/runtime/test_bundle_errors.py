"""A damaged or foreign bundle, or a bad request, gives one clear line and a non-zero exit."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from PIL import Image

from pocketsd.cli import main
from pocketsd.runtime.images import read_png_params
from pocketsd.runtime.manifest import load_manifest

pytestmark = pytest.mark.export


@pytest.fixture()
def bundle(tiny_bundle: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, copy)
    return copy


def generate(capsys, bundle: Path, out: Path, *extra: str) -> tuple[int, str]:
    code = main(["generate", str(bundle), "--prompt", "a cat", "--steps", "2", "--seed", "1", "--out", str(out),
                 "--quiet", *extra])
    return code, capsys.readouterr().err.strip()


def assert_one_line(code: int, err: str, *needles: str) -> None:
    assert code == 2 and len(err.splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


def test_missing_chunk(bundle: Path, tmp_path: Path, capsys):
    chunk = load_manifest(bundle).component("unet").chunks[2].file.path
    (bundle / chunk).unlink()
    code, err = generate(capsys, bundle, tmp_path / "x.png")
    assert_one_line(code, err, chunk, "missing")
    assert not (tmp_path / "x.png").exists()


def test_one_byte_changed(bundle: Path, tmp_path: Path, capsys):
    chunk = load_manifest(bundle).component("unet").chunks[1].file.path
    data = bytearray((bundle / chunk).read_bytes())
    data[len(data) // 2] ^= 0x01
    (bundle / chunk).write_bytes(bytes(data))
    code, err = generate(capsys, bundle, tmp_path / "x.png")
    assert_one_line(code, err, chunk, "sha256")


def test_manifest_of_a_future_major_version(bundle: Path, tmp_path: Path, capsys):
    path = bundle / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest["schema_version"] = "2.0"
    path.write_text(json.dumps(manifest))
    code, err = generate(capsys, bundle, tmp_path / "x.png")
    assert_one_line(code, err, "schema '2.0'", "reads 1.x")


def test_unknown_scheduler(tiny_bundle: Path, tmp_path: Path, capsys):
    code, err = generate(capsys, tiny_bundle, tmp_path / "x.png", "--scheduler", "ddpm")
    assert_one_line(code, err, "unknown scheduler 'ddpm'", "euler")


def test_init_image_of_the_wrong_size(tiny_bundle: Path, tmp_path: Path, capsys):
    Image.new("RGB", (64, 48)).save(tmp_path / "small.png")
    code, err = generate(capsys, tiny_bundle, tmp_path / "x.png", "--init-image", str(tmp_path / "small.png"))
    assert_one_line(code, err, "64x48", "128x128")


def test_not_a_bundle(tmp_path: Path, capsys):
    code, err = generate(capsys, tmp_path, tmp_path / "x.png")
    assert_one_line(code, err, "manifest.json")


def test_same_seed_gives_byte_identical_png_with_parameters(tiny_bundle: Path, tmp_path: Path, capsys):
    assert generate(capsys, tiny_bundle, tmp_path / "a.png", "--negative-prompt", "fog")[0] == 0
    assert generate(capsys, tiny_bundle, tmp_path / "b.png", "--negative-prompt", "fog")[0] == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    params = read_png_params(tmp_path / "a.png")
    assert params["prompt"] == "a cat" and params["seed"] == 1 and params["negative_prompt"] == "fog"
    assert generate(capsys, tiny_bundle, tmp_path / "c.png", "--seed", "2")[0] == 0
    assert (tmp_path / "a.png").read_bytes() != (tmp_path / "c.png").read_bytes()


def test_img2img_from_the_cli(tiny_bundle: Path, tmp_path: Path, capsys):
    Image.new("RGB", (128, 128), (200, 40, 40)).save(tmp_path / "red.png")
    code, _ = generate(capsys, tiny_bundle, tmp_path / "x.png", "--init-image", str(tmp_path / "red.png"),
                       "--strength", "0.5", "--scheduler", "ddim")
    assert code == 0 and read_png_params(tmp_path / "x.png")["strength"] == 0.5
