"""An SDXL bundle exported for CoreML goes into the Resources layout of Apple's Swift SDXL pipeline.

``tiny-sdxl`` with the ``mac`` preset's settings (without the VAE encoder, to keep the test short). On Linux the
mlpackages are checked structurally (coremltools cannot run them here); contract.py's ``MODELS_XL`` holds the
features Swift feeds and reads.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

pytest.importorskip("coremltools")
pytestmark = pytest.mark.export

from pocketsd.apple.contract import MODELS_XL  # noqa: E402
from pocketsd.apple.resources import check_layout, write_resources  # noqa: E402
from pocketsd.contract import TEXT_ENCODER_IO, UNET_IO  # noqa: E402
from pocketsd.errors import BundleError  # noqa: E402
from pocketsd.export.backends.coreml.check import read_spec  # noqa: E402
from pocketsd.runtime.manifest import load_manifest  # noqa: E402


@pytest.fixture(scope="module")
def xl_resources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pocketsd.export.exporter import ExportRequest, export_bundle
    from pocketsd.export.preset import load_preset
    from pocketsd.export.random_model import builtin_configs, write_random_model

    model = write_random_model(tmp_path_factory.mktemp("models") / "tiny-sdxl", builtin_configs("tiny-sdxl"))
    preset = dataclasses.replace(load_preset("mac"), components=("text_encoder", "unet", "vae_decoder"))
    bundle = export_bundle(ExportRequest(str(model), preset, tmp_path_factory.mktemp("b") / "xl", progress=False,
                                         warm_cache=False))
    out = tmp_path_factory.mktemp("apple") / "Resources"
    write_resources(bundle, out, compile_models=False)
    return out


def test_sdxl_resources_have_both_text_encoders_and_meet_the_contract(xl_resources: Path):
    names = {p.name for p in xl_resources.iterdir()}
    assert {"TextEncoder.mlpackage", "TextEncoder2.mlpackage", "Unet.mlpackage", "VAEDecoder.mlpackage",
            "vocab.json", "merges.txt", "manifest.json"} <= names
    assert check_layout(xl_resources) == []
    unet = read_spec(xl_resources / "Unet.mlpackage")
    assert {f.name for f in unet.inputs} >= {UNET_IO.text_embeds, UNET_IO.time_ids, UNET_IO.encoder_hidden_states}
    second = read_spec(xl_resources / "TextEncoder2.mlpackage")
    assert {f.name for f in second.outputs} == {TEXT_ENCODER_IO.hidden_embeds, TEXT_ENCODER_IO.pooled_outputs}
    # the second tokenizer (pad "!") travels with the layout, hash-checked like every file the manifest names
    manifest = load_manifest(xl_resources)
    assert "text_encoder_2" in manifest.tokenizer and manifest.dims["pooled_dim"] > 0


def test_a_layout_missing_the_second_text_encoder_is_named(xl_resources: Path, tmp_path: Path):
    import shutil

    broken = tmp_path / "R"
    shutil.copytree(xl_resources, broken)
    shutil.rmtree(broken / "TextEncoder2.mlpackage")
    with pytest.raises(BundleError, match="TextEncoder2.mlpackage"):
        check_layout(broken)
    assert [m.file for m in MODELS_XL][:2] == ["TextEncoder", "TextEncoder2"]
