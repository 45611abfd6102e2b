"""LoRA files fused at export equal diffusers' ``load_lora_weights`` + ``fuse_lora`` (parity tier), in both key layouts.

The LoRA is made here with peft on the tiny model (random, non-zero up weights, so it changes the picture), saved by
diffusers' ``save_lora_weights`` (diffusers layout) and rewritten in kohya's layout (``lora_unet_…``,
``lora_te_…``, ``.alpha``). Tolerance: ``TOL["pipeline_min_psnr_db"]`` on the decoded image.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import TOL

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")
pytestmark = pytest.mark.export

from safetensors.torch import load_file, save_file  # noqa: E402

from pocketsd.cli import main  # noqa: E402
from pocketsd.errors import ModelError  # noqa: E402
from pocketsd.export.lora import check_lora_files, parse_lora_arg  # noqa: E402
from pocketsd.export.parity import compare  # noqa: E402
from pocketsd.runtime.manifest import load_manifest  # noqa: E402
from pocketsd.runtime.pipeline import Pipeline  # noqa: E402
from tests.runtime.test_pipeline_parity import NEGATIVE, PROMPT, TorchNoise  # noqa: E402

SCALE = 0.7
RANK = 4


def make_lora(model_dir: Path, out: Path, seed: int = 0) -> Path:
    """A rank-4 LoRA on every attention projection of the UNet and the text encoder, diffusers layout. peft's own
    ``inject_adapter_in_model`` for the text encoder: transformers 5's ``add_adapter`` wants peft >= 0.22."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    torch.manual_seed(seed)
    pipe.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                    "out_proj"]), pipe.text_encoder)
    _give_lora_b_weights(pipe.unet, pipe.text_encoder)
    out.mkdir(parents=True, exist_ok=True)
    diffusers.StableDiffusionPipeline.save_lora_weights(
        out, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder), weight_name="lora.safetensors")
    return out / "lora.safetensors"


def _give_lora_b_weights(*modules: torch.nn.Module) -> None:
    """peft starts every LoRA's B at zero (a no-op LoRA): give them weights, so that fusing one changes the model."""
    for module in modules:
        for name, param in module.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=1.0)


def fuse_by_hand(text_encoder, lora_file: Path, scale: float, prefix: str = "text_encoder") -> None:
    """W += scale * up @ down (alpha = rank), for each text-encoder layer of the file (the reference for the text
    encoder: diffusers would go through transformers' load_adapter, which needs peft >= 0.22 here)."""
    state = load_file(lora_file)
    modules = dict(text_encoder.named_modules())
    for key, down in state.items():
        if key.startswith(f"{prefix}.") and ".lora_A." in key:
            up = state[key.replace(".lora_A.", ".lora_B.")]
            target = key.removeprefix(f"{prefix}.").split(".lora_A.")[0]
            target = target if target in modules else target.removeprefix("text_model.")
            with torch.no_grad():
                modules[target].weight += scale * (up @ down)  # alpha = rank: diffusers reads no alpha from this file


def make_sdxl_lora(model_dir: Path, out: Path) -> Path:
    """A rank-4 LoRA on the UNet's attention and both text encoders' q/v projections of an SDXL model, diffusers
    layout (``text_encoder_2.`` keys for the second encoder)."""
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict

    pipe = diffusers.StableDiffusionXLPipeline.from_pretrained(model_dir)
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    for encoder in (pipe.text_encoder, pipe.text_encoder_2):
        inject_adapter_in_model(LoraConfig(r=RANK, lora_alpha=RANK, target_modules=["q_proj", "v_proj"]), encoder)
    _give_lora_b_weights(pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    out.mkdir(parents=True, exist_ok=True)
    diffusers.StableDiffusionXLPipeline.save_lora_weights(
        out, unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        text_encoder_2_lora_layers=get_peft_model_state_dict(pipe.text_encoder_2), weight_name="xl.safetensors")
    return out / "xl.safetensors"


def to_kohya(diffusers_file: Path, out: Path, sdxl_unet: dict | None = None) -> Path:
    """The same LoRA in kohya's key layout (what most shared LoRA files use). With ``sdxl_unet`` (the UNet's config),
    as kohya's SDXL trainer writes it: the UNet's layers under their original (SGM) names (``input_blocks_4_1_…``),
    the text encoders as ``lora_te1_`` and ``lora_te2_``, with transformers' names."""
    from pocketsd.export.original_layout import PREFIXES, original_name

    kohya = {}
    for key, value in load_file(diffusers_file).items():
        stem, kind = key.rsplit(".lora_", 1)
        module, part = stem.split(".", 1)
        if sdxl_unet is not None and module == "unet":
            part = original_name("unet", f"{part}.weight", sdxl_unet).removeprefix(PREFIXES["unet"])[:-len(".weight")]
        elif sdxl_unet is not None and not part.startswith("text_model."):
            part = f"text_model.{part}"
        prefixes = {"unet": "lora_unet_", "text_encoder": "lora_te1_" if sdxl_unet else "lora_te_",
                    "text_encoder_2": "lora_te2_"}
        name = prefixes[module] + part.replace(".", "_")
        kohya[f"{name}.{'lora_down' if kind.startswith('A') else 'lora_up'}.weight"] = value.contiguous()
        kohya[f"{name}.alpha"] = torch.tensor(float(RANK))
    save_file(kohya, out)
    return out


@pytest.fixture(scope="module")
def lora_file(tiny_model_dir: Path, tmp_path_factory) -> Path:
    return make_lora(tiny_model_dir, tmp_path_factory.mktemp("lora"))


def fused_reference(model_dir: Path, lora_file: Path, scheduler: str):
    """diffusers' pipeline with the LoRA fused at SCALE (UNet by diffusers, text encoder by hand) and ``scheduler``."""
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    state, alphas = diffusers.StableDiffusionPipeline.lora_state_dict(str(lora_file))
    diffusers.StableDiffusionPipeline.load_lora_into_unet(state, alphas, pipe.unet)
    pipe.unet.fuse_lora(lora_scale=SCALE)
    fuse_by_hand(pipe.text_encoder, lora_file, SCALE)
    return pipe


@pytest.fixture(scope="module")
def expected(tiny_model_dir: Path, lora_file: Path) -> np.ndarray:
    pipe = fused_reference(tiny_model_dir, lora_file, "EulerDiscreteScheduler")
    return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=6, guidance_scale=7.0,
                latents=latents(), output_type="np").images[0]


@pytest.fixture(scope="module")
def expected_lcm(tiny_model_dir: Path, lora_file: Path) -> np.ndarray:
    """An LCM-LoRA's use: the LoRA fused, the LCM scheduler, 4 steps, guidance off (as diffusers documents it)."""
    pipe = fused_reference(tiny_model_dir, lora_file, "LCMScheduler")
    return pipe(PROMPT, num_inference_steps=4, guidance_scale=1.0, latents=latents(),
                generator=torch.Generator().manual_seed(3), output_type="np").images[0]


def latents() -> torch.Tensor:
    return torch.randn((1, 4, 16, 16), generator=torch.Generator().manual_seed(17))


def ours(bundle: Path) -> np.ndarray:
    return Pipeline.from_bundle(bundle)(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=6, guidance_scale=7.0,
                                        scheduler="euler", latents=latents().numpy(), output_type="np")


def export(model: Path, out: Path, *loras: str) -> int:
    args = ["export", "--quiet", "--no-warm-cache", "--model", str(model), "--out", str(out), "--chunks", "unet=1"]
    for lora in loras:
        args += ["--lora", lora]
    return main(args)


@pytest.mark.parametrize("layout", ["diffusers", "kohya"])
def test_fused_lora_matches_diffusers_fuse_lora(tiny_model_dir, tiny_bundle, lora_file, expected, expected_lcm,
                                                layout, tmp_path):
    path = lora_file if layout == "diffusers" else to_kohya(lora_file, tmp_path / "kohya.safetensors")
    assert export(tiny_model_dir, tmp_path / "b", f"{path}:{SCALE}") == 0
    actual = ours(tmp_path / "b")
    assert compare(expected, actual).psnr_db >= TOL["pipeline_min_psnr_db"]
    assert compare(ours(tiny_bundle), actual).psnr_db < 35, "the LoRA must change the picture"
    if layout == "diffusers":  # the LCM-LoRA way of using the same bundle
        lcm = Pipeline.from_bundle(tmp_path / "b")(PROMPT, num_inference_steps=4, guidance_scale=1.0, scheduler="lcm",
                                                   latents=latents().numpy(), generator=TorchNoise(3),
                                                   output_type="np")
        assert compare(expected_lcm, lcm).psnr_db >= TOL["pipeline_min_psnr_db"]
    recorded = load_manifest(tmp_path / "b").model["loras"]
    assert recorded == [{"file": path.name, "sha256": check_lora_files(((str(path), 1.0),))[0].sha256,
                         "scale": SCALE}]


def test_lora_scale_argument():
    assert parse_lora_arg("a.safetensors") == ("a.safetensors", 1.0)
    assert parse_lora_arg("dir/a.safetensors:0.5") == ("dir/a.safetensors", 0.5)
    assert parse_lora_arg("C:/x/a.safetensors") == ("C:/x/a.safetensors", 1.0)
    with pytest.raises(ModelError, match="not a finite number"):
        parse_lora_arg("a.safetensors:nan")


def test_a_lora_for_another_architecture_is_refused(tiny_model_dir, lora_file, tmp_path, capsys):
    state = load_file(lora_file)
    renamed = tmp_path / "renamed.safetensors"  # SDXL-style module names: no such layers in this model
    save_file({k.replace("down_blocks", "input_blocks"): v for k, v in state.items()}, renamed)
    wider = tmp_path / "wider.safetensors"  # the right names, the widths of a bigger model
    save_file({k: torch.cat([v, v], dim=1).contiguous() if ".lora_A." in k else v for k, v in state.items()}, wider)
    for lora in (renamed, wider):
        out = tmp_path / f"out-{lora.stem}"
        assert export(tiny_model_dir, out, str(lora)) == 2
        err = capsys.readouterr().err
        assert f"LoRA {lora.name} does not fit this model" in err and "Traceback" not in err, err
        assert len(err.strip().splitlines()) <= 2 and not out.exists()


def test_lora_files_are_checked_before_anything_is_loaded(tmp_path):
    (tmp_path / "l.ckpt").write_bytes(b"pickle")
    (tmp_path / "none.safetensors").write_bytes(b"")
    save_file({"w": torch.zeros(2)}, tmp_path / "plain.safetensors")
    for name, message in (("l.ckpt", "is not a .safetensors file"), ("missing.safetensors", "does not exist"),
                          ("none.safetensors", "cannot read LoRA file"), ("plain.safetensors", "holds no LoRA")):
        with pytest.raises(ModelError, match=message):
            check_lora_files(((str(tmp_path / name), 1.0),))


def test_an_sdxl_lora_in_kohyas_layout_fuses_as_the_same_lora_in_diffusers_layout(tmp_path: Path):
    """kohya's SDXL LoRAs name the UNet's layers by the original SGM blocks: fused at export (export/lora.py), each
    of the UNet and both text encoders gets exactly the weights the diffusers-layout file gives it, and they differ
    from the model's own. (The diffusers-layout file's export against diffusers: tests/runtime/test_sdxl_parity.py)"""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from pocketsd.export.lora import fuse_loras
    from pocketsd.export.random_model import builtin_configs, write_random_model

    model = write_random_model(tmp_path / "xl", builtin_configs("tiny-sdxl"))
    lora = make_sdxl_lora(model, tmp_path / "lora")
    unet_config = dict(diffusers.UNet2DConditionModel.load_config(model / "unet"))
    kohya = to_kohya(lora, tmp_path / "kohya.safetensors", sdxl_unet=unet_config)
    assert any(k.startswith("lora_unet_input_blocks_") for k in load_file(kohya))
    loaders = {"unet": lambda: diffusers.UNet2DConditionModel.from_pretrained(model / "unet"),
               "text_encoder": lambda: CLIPTextModel.from_pretrained(model / "text_encoder"),
               "text_encoder_2": lambda: CLIPTextModelWithProjection.from_pretrained(model / "text_encoder_2")}
    for sub, load in loaders.items():
        plain = load().state_dict()
        fused = [fuse_loras(load(), sub, check_lora_files(((str(f), SCALE),))).state_dict() for f in (lora, kohya)]
        assert fused[0].keys() == fused[1].keys() == plain.keys(), sub
        changed = [k for k in plain if not torch.equal(plain[k], fused[0][k])]
        assert changed, f"the LoRA must change the {sub}"
        for key in plain:
            torch.testing.assert_close(fused[1][key], fused[0][key], rtol=0, atol=1e-6, msg=f"{sub} {key}")
