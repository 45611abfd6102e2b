"""Model folders as people download them: fp16-variant weights, sharded weights, both, and a chosen ``--variant``.

Each folder is the tiny model saved again by diffusers' / transformers' own ``save_pretrained`` (``variant=``,
``max_shard_size=``), so the file names are exactly what those libraries write. What pocketsd loads must equal the
original weights exactly (fp16 variants: the original rounded to fp16, as ``.half().float()``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

from pocketsd.errors import ModelError  # noqa: E402
from pocketsd.export.model_loader import WEIGHT_FILES, load_module, open_model_folder, weight_layouts  # noqa: E402

SUBS = ("unet", "vae", "text_encoder")


def _cls(sub: str):
    return {"unet": diffusers.UNet2DConditionModel, "vae": diffusers.AutoencoderKL,
            "text_encoder": transformers.CLIPTextModel}[sub]


def resave(src: Path, dst: Path, *, variant: str | None = None, shard: str | None = None, keep_full: bool = False):
    """``src`` copied to ``dst`` with each sub-model saved again as asked (fp16 when ``variant`` is given)."""
    shutil.copytree(src, dst)
    for sub in SUBS:
        model = _cls(sub).from_pretrained(src / sub)
        if not keep_full:
            (dst / sub / WEIGHT_FILES[sub]).unlink()
        if variant is not None:
            model = model.to(torch.float16)
        kwargs = {"max_shard_size": shard} if shard else {}
        model.save_pretrained(dst / sub, variant=variant, safe_serialization=True, **kwargs)
    return dst


def state(sub_model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in sub_model.state_dict().items()}


@pytest.fixture(scope="module")
def originals(tiny_model_dir: Path) -> dict[str, dict[str, torch.Tensor]]:
    folder = open_model_folder(tiny_model_dir)
    return {sub: state(load_module(folder, sub)) for sub in SUBS}


def assert_loaded(path: Path, originals, *, fp16: bool, variant: str | None = None) -> None:
    folder = open_model_folder(path, variant)
    for sub in SUBS:
        loaded = state(load_module(folder, sub))
        assert loaded.keys() == originals[sub].keys()
        for key, expected in originals[sub].items():
            if fp16 and expected.is_floating_point():
                expected = expected.half().float()
            assert loaded[key].dtype == torch.float32, key
            assert torch.equal(loaded[key], expected), f"{sub}: {key} differs from the original"


def test_fp16_variant_only_is_detected_and_loaded_in_float32(tiny_model_dir, originals, tmp_path):
    path = resave(tiny_model_dir, tmp_path / "fp16", variant="fp16")
    assert open_model_folder(path).variants == {sub: "fp16" for sub in SUBS}
    assert_loaded(path, originals, fp16=True)


def test_sharded_weights_load_whole(tiny_model_dir, originals, tmp_path):
    path = resave(tiny_model_dir, tmp_path / "sharded", shard="30KB")
    for sub in SUBS:
        assert len(list((path / sub).glob("*-of-*.safetensors"))) >= 2, f"{sub} was not sharded"
        assert weight_layouts(path / sub) == {None: WEIGHT_FILES[sub] + ".index.json"}
    assert open_model_folder(path).variants == {sub: None for sub in SUBS}
    assert_loaded(path, originals, fp16=False)


def test_sharded_fp16_variant(tiny_model_dir, originals, tmp_path):
    path = resave(tiny_model_dir, tmp_path / "both", variant="fp16", shard="30KB")
    assert weight_layouts(path / "unet") == {"fp16": "diffusion_pytorch_model.safetensors.index.fp16.json"}
    assert_loaded(path, originals, fp16=True)


def test_variant_flag_picks_the_variant_over_full_weights(tiny_model_dir, originals, tmp_path):
    path = resave(tiny_model_dir, tmp_path / "full+fp16", variant="fp16", keep_full=True)
    assert open_model_folder(path).variants == {sub: None for sub in SUBS}  # full precision by default
    assert_loaded(path, originals, fp16=False)
    assert_loaded(path, originals, fp16=True, variant="fp16")


def test_missing_variant_and_missing_shard_are_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ModelError, match="variant 'fp16' is not there") as info:
        open_model_folder(tiny_model_dir, "fp16")
    assert "leave out --variant" in info.value.hint
    path = resave(tiny_model_dir, tmp_path / "sharded", shard="30KB")
    index = json.loads((path / "unet" / "diffusion_pytorch_model.safetensors.index.json").read_text())
    (path / "unet" / sorted(set(index["weight_map"].values()))[-1]).unlink()
    with pytest.raises(ModelError, match="holds incomplete sharded weights"):
        open_model_folder(path)


def test_export_of_a_sharded_fp16_folder_records_the_variant(tiny_model_dir, tmp_path):
    from pocketsd.export.exporter import ExportRequest, export_bundle
    from pocketsd.export.preset import load_preset, with_overrides
    from pocketsd.runtime.manifest import load_manifest

    path = resave(tiny_model_dir, tmp_path / "both", variant="fp16", shard="30KB")
    preset = with_overrides(load_preset("cpu"), {"unet": 1, "text_encoder": 1, "vae_decoder": 1, "vae_encoder": 1},
                            None, None)
    out = export_bundle(ExportRequest(str(path), preset, tmp_path / "bundle", progress=False, warm_cache=False))
    # the export's own parity gate compared every chunk with these fp16-rounded weights, and its round trip ran a step
    assert load_manifest(out).model["weights_variants"] == {sub: "fp16" for sub in ("text_encoder", "unet", "vae")}
