"""Single-file checkpoints in SD 1.x's, SD 2.x's and SDXL's original layouts (export/original_layout.py,
export/open_clip_layout.py, export/single_file.py).

The writer's SD 1.x file read back by diffusers' own pipeline-level single-file loader gives exactly the folder's
tensors; the architecture is read from the keys and shapes (tiny vs tiny-inpaint vs tiny-sd21 vs tiny-sdxl); the
converted folder equals the original one file for file (SD 2.x and SDXL included: the same bytes, hence the same
bundle); an SD 2.x file needs --prediction-type; and the bundle exported from the file equals the bundle exported
from the folder, chunk for chunk, apart from the recorded source.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytestmark = pytest.mark.export

from safetensors.numpy import load_file as load_numpy  # noqa: E402
from safetensors.numpy import save_file as save_numpy  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from pocketsd.cli import main  # noqa: E402
from pocketsd.errors import ModelError, UserError  # noqa: E402
from pocketsd.export.exporter import ExportRequest, export_bundle  # noqa: E402
from pocketsd.export.model_loader import WEIGHT_FILES  # noqa: E402
from pocketsd.export.original_layout import write_original_layout  # noqa: E402
from pocketsd.export.preset import load_preset  # noqa: E402
from pocketsd.export.random_model import builtin_configs, write_random_model  # noqa: E402
from pocketsd.export.single_file import convert_single_file, detect_arch, open_single_file, read_shapes  # noqa: E402
from pocketsd.runtime.manifest import load_manifest  # noqa: E402

ARCHS = ("tiny", "tiny-inpaint", "tiny-sd21", "tiny-sdxl")


@pytest.fixture(scope="module")
def checkpoints(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """arch → (its random diffusers folder, that folder written as one original-layout file)."""
    tmp = tmp_path_factory.mktemp("single-file")
    models = {"tiny": tiny_model_dir, **{arch: write_random_model(tmp / arch, builtin_configs(arch))
                                         for arch in ARCHS[1:]}}
    return {arch: (model, write_original_layout(model, tmp / f"{arch}.safetensors")) for arch, model in models.items()}


def _folder_tensors(model: Path, sub: str) -> dict[str, torch.Tensor]:
    return load_file(str(model / sub / WEIGHT_FILES[sub]))


# SD 1.x only: diffusers' SDXL pipeline loader gives the second text encoder the first one's tensors when both are as
# wide (tiny-sdxl's are), and its SD 2.x loader drops the skipped text-encoder layer only for 24-layer encoders, so
# pocketsd converts OpenCLIP encoders itself (single_file._open_clip_text_encoder); those files' conversions are
# checked byte for byte against the folder below
@pytest.mark.parametrize("arch", ARCHS[:2])
def test_diffusers_single_file_loader_reads_back_the_folder_exactly(arch: str, checkpoints):
    model, file = checkpoints[arch]
    keys = load_numpy(str(file)).keys()
    assert {k.split(".")[0] for k in keys} == {"model", "first_stage_model", "cond_stage_model"}
    assert "first_stage_model.decoder.mid.attn_1.q.weight" in keys  # the original names, not diffusers'
    pipeline = getattr(diffusers, json.loads((model / "model_index.json").read_text())["_class_name"])
    pipe = pipeline.from_single_file(str(file), config=str(model), local_files_only=True)
    for sub in ("unet", "vae", "text_encoder"):
        expected, got = _folder_tensors(model, sub), getattr(pipe, sub).state_dict()
        assert set(got) == set(expected), sub
        for name, tensor in expected.items():
            assert got[name].dtype == tensor.dtype and got[name].shape == tensor.shape, name
            assert torch.equal(got[name], tensor), name  # max abs difference 0, bit for bit


@pytest.mark.parametrize("arch", ARCHS)
def test_the_architecture_is_read_from_keys_and_shapes(arch: str, checkpoints):
    _, file = checkpoints[arch]
    assert detect_arch(file, read_shapes(file)) == arch


@pytest.mark.parametrize("arch", ARCHS)
def test_the_converted_folder_equals_the_original_file_for_file(arch: str, checkpoints, tmp_path: Path):
    model, file = checkpoints[arch]
    out = convert_single_file(file, arch, model / "tokenizer", tmp_path / "converted")
    original = sorted(p.relative_to(model) for p in model.rglob("*") if p.is_file())
    assert sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()) == original
    for rel in original:
        assert (out / rel).read_bytes() == (model / rel).read_bytes(), rel


def _fake(tmp_path: Path, tensors: dict[str, tuple[int, ...]], name: str = "x.safetensors") -> Path:
    save_numpy({k: np.zeros(shape, np.float32) for k, shape in tensors.items()}, str(tmp_path / name))
    return tmp_path / name


def _refusal(file: Path) -> str:
    with pytest.raises(ModelError) as info:
        detect_arch(file, read_shapes(file))
    return info.value.one_line()


def test_unrelated_keys_are_refused(tmp_path: Path):
    line = _refusal(_fake(tmp_path, {"alpha": (2,), "beta.weight": (3, 3)}))
    assert line.startswith("error[unknown-checkpoint]: x.safetensors matches no architecture pocketsd knows")
    assert "tiny, tiny-inpaint, sd15, sd15-inpaint" in line


def test_a_lora_is_pointed_to_lora(tmp_path: Path):
    line = _refusal(_fake(tmp_path, {"lora_unet_down_blocks_0.lora_down.weight": (4, 32)}))
    assert "matches no architecture" in line and "give it to --lora" in line


def test_the_sd2_file_has_openclip_names_and_what_sd2_files_carry_besides(checkpoints):
    model, file = checkpoints["tiny-sd21"]
    keys = load_numpy(str(file)).keys()
    layers = builtin_configs("tiny-sd21").text_encoder["num_hidden_layers"]
    assert "cond_stage_model.model.token_embedding.weight" in keys
    assert "cond_stage_model.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    # the layer SD 2.x skips (diffusers' text encoder has one layer fewer), the projection and temperature: ignored
    assert f"cond_stage_model.model.transformer.resblocks.{layers}.attn.in_proj_weight" in keys
    assert {"cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale"} <= set(keys)


def test_an_sd2_file_needs_its_prediction_type(checkpoints, tmp_path: Path):
    model, file = checkpoints["tiny-sd21"]
    with pytest.raises(ModelError) as info, ExitStack() as stack:
        open_single_file(str(file), str(model / "tokenizer"), None, stack)
    line = info.value.one_line()
    assert line.startswith("error[prediction-type]") and "SD 2.x" in line and "--prediction-type v_prediction" in line
    out = convert_single_file(file, "tiny-sd21", model / "tokenizer", tmp_path / "eps", prediction_type="epsilon")
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "epsilon"
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (model / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()


def test_the_sdxl_file_has_sgm_names_and_openclip_second_encoder(checkpoints):
    keys = load_numpy(str(checkpoints["tiny-sdxl"][1])).keys()
    assert {".".join(k.split(".")[:3]) for k in keys if k.startswith("conditioner.")} == {
        "conditioner.embedders.0", "conditioner.embedders.1"}
    assert "model.diffusion_model.label_emb.0.0.weight" in keys
    assert "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight" in keys
    assert "conditioner.embedders.1.model.text_projection" in keys and not any("q_proj" in k for k in keys
                                                                                if ".embedders.1." in k)


def test_an_sdxl_file_with_a_missing_tensor_names_it(checkpoints, tmp_path: Path):
    tensors = load_numpy(str(checkpoints["tiny-sdxl"][1]))
    del tensors["conditioner.embedders.1.model.ln_final.weight"]
    save_numpy(tensors, str(tmp_path / "cut.safetensors"))
    line = _refusal(tmp_path / "cut.safetensors")
    assert "closest is tiny-sdxl, but conditioner.embedders.1.model.ln_final.weight is missing" in line


def test_a_tensor_of_another_shape_names_the_closest_arch(checkpoints, tmp_path: Path):
    tensors = load_numpy(str(checkpoints["tiny"][1]))
    key = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    tensors[key] = tensors[key][:, :, 0, 0]  # a linear projection (SD 2.x's kind) where SD 1.x has a 1x1 conv
    save_numpy(tensors, str(tmp_path / "linear.safetensors"))
    line = _refusal(tmp_path / "linear.safetensors")
    assert "matches no architecture" in line and "a UNet of 4 input channels and width 32" in line
    assert f"closest is tiny, but {key} is (32, 32) here, (32, 32, 1, 1) in tiny" in line


@pytest.mark.parametrize("files, message", [
    ({"vocab.json": json.dumps({"<|startoftext|>": 49406, "<|endoftext|>": 49407}), "merges.txt": "#version: 0.2\n"},
     "has token ids up to 49407, but the text encoder of tiny.safetensors has 1024 token embeddings"),
    ({"merges.txt": "not a pair\n"}, "transformers cannot read the tokenizer in"),
    ({"vocab.json": "[1, 2]"}, "holds a JSON list, not an object"),
])
def test_a_bad_tokenizer_is_refused(files: dict[str, str], message: str, checkpoints, tmp_path: Path):
    model, file = checkpoints["tiny"]
    tokenizer = Path(shutil.copytree(model / "tokenizer", tmp_path / "tokenizer"))
    for name, text in files.items():
        (tokenizer / name).write_text(text)
    out = tmp_path / "b"
    with pytest.raises(ModelError, match="tokenizer") as info:
        export_bundle(ExportRequest(str(file), load_preset("cpu"), out, progress=False, warm_cache=False,
                                    tokenizer=str(tokenizer)))
    assert message in info.value.one_line() and not out.exists()


def test_a_failure_after_the_conversion_leaves_nothing(checkpoints, tmp_path: Path, monkeypatch):
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))  # where the converted folder is made
    model, file = checkpoints["tiny"]
    preset = dataclasses.replace(load_preset("cpu"), resolution=(100, 100))  # refused once the model is known
    with pytest.raises(UserError, match="resolution 100x100 does not fit this model"):
        export_bundle(ExportRequest(str(file), preset, tmp_path / "b", progress=False, warm_cache=False,
                                    tokenizer=str(model / "tokenizer")))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["temp"] and not any(temp.iterdir())


def test_the_bundle_from_the_file_equals_the_bundle_from_the_folder(checkpoints, tiny_bundle: Path, tmp_path: Path):
    """``tiny_bundle`` is the tiny folder exported with the cpu preset, seed 0 (shared with other test files)."""
    model, file = checkpoints["tiny"]
    out = export_bundle(ExportRequest(str(file), load_preset("cpu"), tmp_path / "b", progress=False,
                                      warm_cache=False, tokenizer=str(model / "tokenizer")))
    def chunks(bundle: Path) -> dict[str, list[tuple[str, str]]]:
        manifest = load_manifest(bundle)
        return {c: [(ch.id, ch.file.sha256) for ch in manifest.component(c).chunks] for c in manifest.components}

    assert chunks(out) == chunks(tiny_bundle)
    folder_json, file_json = (json.loads((b / "manifest.json").read_text()) for b in (tiny_bundle, out))
    assert file_json["tokenizer"] == folder_json["tokenizer"]
    source = file_json.pop("model")
    folder_json.pop("model")
    assert file_json == folder_json  # equal apart from where the weights came from
    assert source["name"] == "tiny" and source["source"] == str(file.resolve())
    assert source["single_file"]["arch"] == "tiny" and len(source["single_file"]["sha256"]) == 64


def test_random_model_writes_the_single_file(tmp_path: Path, capsys):
    assert main(["random-model", str(tmp_path / "m"), "--arch", "tiny", "--single-file",
                 str(tmp_path / "m.safetensors")]) == 0
    assert "original-layout checkpoint" in capsys.readouterr().out
    assert detect_arch(tmp_path / "m.safetensors", read_shapes(tmp_path / "m.safetensors")) == "tiny"


def test_random_model_refuses_a_single_file_it_cannot_write_before_building(tmp_path: Path, capsys):
    code = main(["random-model", str(tmp_path / "m"), "--arch", "tiny-lcm", "--single-file",
                 str(tmp_path / "m.safetensors")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "has no original layout pocketsd writes" in err
    assert not any(tmp_path.iterdir())
