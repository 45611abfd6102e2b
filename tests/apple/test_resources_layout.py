"""The Resources layout loads in Apple's Swift StableDiffusionPipeline: names, features and shapes per contract.py."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest

pytest.importorskip("coremltools")
pytestmark = pytest.mark.export

from pocketsd.apple.contract import chained_inputs_ok, file_names  # noqa: E402
from pocketsd.apple.resources import NOT_COMPILED, check_layout, write_resources  # noqa: E402
from pocketsd.cli import main  # noqa: E402
from pocketsd.export.backends.coreml.check import read_spec  # noqa: E402
from pocketsd.runtime.manifest import load_manifest  # noqa: E402


@pytest.fixture(scope="module")
def resources(tiny_iphone_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("apple") / "Resources"
    write_resources(tiny_iphone_bundle, out)
    return out


def test_files_are_named_as_the_swift_loader_expects(resources: Path):
    names = sorted(p.name for p in resources.iterdir())
    for expected in ("TextEncoder.mlpackage", "UnetChunk1.mlpackage", "UnetChunk2.mlpackage", "VAEDecoder.mlpackage",
                     "VAEEncoder.mlpackage", "vocab.json", "merges.txt", "manifest.json"):
        assert expected in names
    assert "Unet.mlpackage" not in names  # with chunks present, Swift loads them instead


def test_layout_meets_the_contract(resources: Path):
    assert check_layout(resources) == []


def test_two_chunk_unet_chains_as_swift_feeds_it(resources: Path):
    first, second = (read_spec(resources / f"{n}.mlpackage") for n in ("UnetChunk1", "UnetChunk2"))
    assert {f.name for f in first.inputs} <= {"sample", "timestep", "encoder_hidden_states"}
    assert "sample" in {f.name for f in first.inputs}
    assert chained_inputs_ok([[f.name for f in first.inputs], [f.name for f in second.inputs]],
                             [[f.name for f in first.outputs], [f.name for f in second.outputs]],
                             ["sample", "timestep", "encoder_hidden_states"]) == []
    assert [f.name for f in second.outputs] == ["noise_pred"]
    encoder = read_spec(resources / "TextEncoder.mlpackage")
    assert (encoder.inputs[0].name, encoder.inputs[0].dtype) == ("input_ids", "float32")
    assert "last_hidden_state" in {f.name for f in encoder.outputs}


def test_our_manifest_in_resources_is_a_valid_bundle(resources: Path):
    manifest = load_manifest(resources)
    assert [c.file.path for c in manifest.component("unet").chunks] == ["UnetChunk1.mlpackage",
                                                                        "UnetChunk2.mlpackage"]
    assert manifest.tokenizer["files"]["vocab.json"].path == "vocab.json"


@pytest.mark.skipif(sys.platform == "darwin", reason="on macOS with Xcode the packages are compiled")
def test_off_macos_the_layout_says_it_is_not_compiled(resources: Path):
    report = json.loads((resources / "pocketsd-resources.json").read_text())
    assert set(report["files"].values()) == {NOT_COMPILED}
    assert not list(resources.glob("*.mlmodelc"))


def test_a_contract_breach_is_found(resources: Path, tmp_path: Path):
    broken = tmp_path / "Resources"
    shutil.copytree(resources, broken)
    (broken / "merges.txt").unlink()
    shutil.rmtree(broken / "UnetChunk2.mlpackage")
    shutil.copytree(broken / "UnetChunk1.mlpackage", broken / "UnetChunk2.mlpackage")
    manifest = json.loads((broken / "manifest.json").read_text())
    manifest["tokenizer"]["files"].pop("merges.txt")
    (broken / "manifest.json").write_text(json.dumps(manifest))
    problems = check_layout(broken)
    assert any("merges.txt" in p for p in problems) and any("Unet" in p for p in problems)


def test_more_chunks_than_swift_loads_is_one_clear_line(tiny_bundle: Path, tiny_iphone_bundle: Path, tmp_path: Path,
                                                        capsys):
    assert file_names("unet", 2) == ["UnetChunk1", "UnetChunk2"] and file_names("unet", 1) == ["Unet"]
    code = main(["apple-resources", str(tiny_bundle), "--out", str(tmp_path / "R")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "not CoreML" in err and not (tmp_path / "R").exists()
    four = tmp_path / "four"
    shutil.copytree(tiny_iphone_bundle, four)
    data = json.loads((four / "manifest.json").read_text())
    unet = data["components"]["unet"]["chunks"]
    data["components"]["unet"]["chunks"] = unet + [dict(unet[-1], id="unet.02"), dict(unet[-1], id="unet.03")]
    (four / "manifest.json").write_text(json.dumps(data))
    code = main(["apple-resources", str(four), "--out", str(tmp_path / "R")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "at most 2 chunk(s); this bundle has 4" in err and not (tmp_path / "R").exists()
