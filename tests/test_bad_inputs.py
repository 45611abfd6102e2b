"""The bad-input battery: every case gives one line on stderr in the ``error[code]: message — hint`` form, exit code
2 (130 for Ctrl-C), no traceback, and leaves the folder it ran in exactly as it was (no partial bundle, PNG,
Resources folder or staging folder). The CLI's ``main`` runs in-process on copies of one tiny model and bundle."""

from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from pocketsd.cli import main
from pocketsd.runtime.manifest import load_manifest

pytest.importorskip("torch")
pytestmark = pytest.mark.export


class Env:
    """One case's folder: copies of the tiny model and bundle made on first use, and the paths a command writes."""

    def __init__(self, tmp: Path, model: Path, bundle: Path) -> None:
        self.tmp, self._model, self._bundle = tmp, model, bundle
        self.out, self.png = tmp / "out", tmp / "x.png"

    @functools.cached_property
    def bundle(self) -> Path:
        return Path(shutil.copytree(self._bundle, self.tmp / "bundle"))

    @functools.cached_property
    def left(self) -> Path:
        """A copy of the bundle named as the staging folder of a killed export."""
        return Path(shutil.copytree(self._bundle, self.tmp / f".b.partial-{dead_pid()}-x"))

    @functools.cached_property
    def model(self) -> Path:
        return Path(shutil.copytree(self._model, self.tmp / "model"))

    def manifest(self, change: Callable[[dict[str, Any]], Any]) -> None:
        path = self.bundle / "manifest.json"
        data = json.loads(path.read_text())
        change(data)
        path.write_text(json.dumps(data))

    def chunk(self, component: str = "text_encoder", index: int = 0) -> Any:
        return load_manifest(self.bundle).component(component).chunks[index]

    def file(self, name: str, text: str) -> Path:
        (self.tmp / name).write_text(text)
        return self.tmp / name

    @functools.cached_property
    def single_file(self) -> Path:
        from pocketsd.export.original_layout import write_original_layout
        return write_original_layout(self._model, self.tmp / "tiny.safetensors")

    @functools.cached_property
    def sd2_file(self) -> Path:
        from pocketsd.export.original_layout import write_original_layout
        from pocketsd.export.random_model import builtin_configs, write_random_model
        model = write_random_model(self.tmp / "sd2-model", builtin_configs("tiny-sd21"))
        return write_original_layout(model, self.tmp / "sd2.safetensors")

    def tensors(self, name: str, keys: tuple[str, ...]) -> Path:  # a safetensors file of these (4, 4) tensors
        return save_file({key: np.zeros((4, 4), np.float32) for key in keys}, str(self.tmp / name)) or self.tmp / name


def gen(*extra: str) -> Callable[[Env], list[str]]:
    return lambda e: ["generate", str(e.bundle), "--prompt", "a cat", "--steps", "3", "--seed", "1", "--out",
                      str(e.png), "--quiet", *extra]


def export(*extra: str, model: Callable[[Env], Any] = lambda e: e.model) -> Callable[[Env], list[str]]:
    return lambda e: ["export", "--quiet", "--no-warm-cache", "--model", str(model(e)), "--out", str(e.out), *extra]


def preset(yaml_text: str) -> Callable[[Env], list[str]]:
    return lambda e: export("--preset", str(e.file("mine.yaml", yaml_text)))(e)


def unet0(d: dict[str, Any]) -> dict[str, Any]:
    return d["components"]["unet"]["chunks"][0]


def truncate(e: Env, empty: bool) -> None:
    path = e.bundle / e.chunk("unet", 1).file.path
    path.write_bytes(b"" if empty else path.read_bytes()[: path.stat().st_size // 2])


def rename_weights(e: Env, *names: str) -> None:
    weights = e.model / "unet" / "diffusion_pytorch_model.safetensors"
    for name in names:
        shutil.copyfile(weights, e.model / "unet" / name)
    weights.unlink()


def link_outside(e: Env) -> None:
    data = e.bundle / e.chunk().data_files[0].path
    shutil.move(data, e.tmp / "elsewhere.data")
    data.symlink_to(e.tmp / "elsewhere.data")


def external_data_outside(e: Env) -> None:
    """The text encoder's graph rewritten to read its weights from ../../outside.data, its sha256 updated: a bundle
    made to read a file outside itself, consistent in every other way."""
    import onnx

    from pocketsd.runtime.hashing import sha256_path

    chunk = e.chunk()
    graph = e.bundle / chunk.file.path
    outside = e.tmp / "outside.data"
    shutil.copyfile(e.bundle / chunk.data_files[0].path, outside)
    model = onnx.load(str(graph), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = os.path.relpath(outside, graph.parent)
    onnx.save(model, str(graph))

    def update(d: dict[str, Any]) -> None:
        ref = d["components"]["text_encoder"]["chunks"][0]["file"]
        ref.update(sha256=sha256_path(graph), bytes=graph.stat().st_size)
        d["components"]["text_encoder"]["chunks"][0].pop("optimized", None)

    e.manifest(update)


def dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def nan_at_unet_call(call: int, output: str = "noise_pred", value: float = np.nan):
    """Patch: the chunk session that returns ``output`` gives ``value`` everywhere on its ``call``-th run."""
    def patch(monkeypatch: pytest.MonkeyPatch, e: Env) -> None:
        from pocketsd.runtime.sessions import OnnxSession

        original, calls = OnnxSession.run, {"n": 0}

        def run(self: OnnxSession, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
            out = original(self, feeds)
            if output in out:
                calls["n"] += 1
                if calls["n"] == call:
                    out[output] = np.full_like(out[output], value)
            return out

        monkeypatch.setattr(OnnxSession, "run", run)
    return patch


def fail_writing(error: BaseException):
    """Patch: the first component's write leaves a partial file in the staging folder, then ``error`` (a full disk,
    Ctrl-C) is raised, as a write that fails half-way would."""
    def patch(monkeypatch: pytest.MonkeyPatch, e: Env) -> None:
        def write(component_id: str, model: Any, dims: Any, request: Any, staging: Path) -> Any:
            (staging / component_id).mkdir()
            (staging / component_id / f"{component_id}.00.onnx").write_bytes(b"\0" * 1000)
            if isinstance(error, OSError):
                raise OSError(error.errno, error.strerror, str(staging / component_id / f"{component_id}.00.onnx"))
            raise error

        monkeypatch.setattr("pocketsd.export.exporter._write_with_torch", write)
    return patch


def png_disk_full(monkeypatch: pytest.MonkeyPatch, e: Env) -> None:
    from PIL import Image

    def save(self: Any, fp: Any, *args: Any, **kwargs: Any) -> None:
        Path(fp).write_bytes(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", save)


def read_only_parent(monkeypatch: pytest.MonkeyPatch, e: Env) -> None:
    """--out in a read-only folder. As root, chmod does not stop writes: the refusal the OS would give is simulated
    at the one place the export creates something there (the staging folder)."""
    ro = e.tmp / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    e.out = ro / "b"
    if os.access(ro, os.W_OK):  # root
        def denied(*args: Any, **kwargs: Any) -> str:
            raise PermissionError(errno.EACCES, "Permission denied", str(ro))

        monkeypatch.setattr(tempfile, "mkdtemp", denied)


@dataclass(frozen=True)
class Case:
    id: str
    argv: Callable[[Env], list[str]]
    expect: str
    setup: Callable[[Env], Any] = lambda e: None
    patch: Callable[[pytest.MonkeyPatch, Env], Any] | None = None
    code: int = 2


CASES = [
    # -- generate: the bundle folder and its manifest
    Case("gen-missing-bundle", lambda e: ["generate", str(e.tmp / "nope"), "--prompt", "a", "--out", str(e.png)],
         "does not exist"),
    Case("gen-bundle-is-a-file", lambda e: ["generate", str(e.file("f", "x")), "--prompt", "a", "--out", str(e.png)],
         "is a file, not a bundle folder"),
    Case("gen-not-a-bundle", lambda e: ["generate", str(e.tmp), "--prompt", "a", "--out", str(e.png)],
         "manifest.json is missing"),
    Case("gen-manifest-not-json", gen(), "is not valid JSON",
         lambda e: (e.bundle / "manifest.json").write_text("{\"format\": ")),
    Case("gen-manifest-empty", gen(), "is not valid JSON", lambda e: (e.bundle / "manifest.json").write_text("")),
    Case("gen-manifest-a-list", gen(), "holds a list, not an object",
         lambda e: (e.bundle / "manifest.json").write_text("[]")),
    Case("gen-manifest-string-for-int", gen(), "dims.height is a string '128', not an integer",
         lambda e: e.manifest(lambda d: d["dims"].update(height="128"))),
    Case("gen-manifest-list-for-object", gen(), "components is a list, not an object",
         lambda e: e.manifest(lambda d: d.update(components=[]))),
    Case("gen-manifest-missing-key", gen(), "components.unet.chunks[0].file is missing",
         lambda e: e.manifest(lambda d: unet0(d).pop("file"))),
    Case("gen-manifest-nan-scale", gen(), "latent_scaling_factor is nan, not a finite number",
         lambda e: e.manifest(lambda d: d.update(latent_scaling_factor=float("nan")))),
    Case("gen-manifest-future-schema", gen(), "schema '2.0'; this pocketsd reads 1.x",
         lambda e: e.manifest(lambda d: d.update(schema_version="2.0"))),
    Case("gen-manifest-no-schema", gen(), "schema None", lambda e: e.manifest(lambda d: d.pop("schema_version"))),
    Case("gen-manifest-missing-dims", gen(), "dims.latent_height is missing",
         lambda e: e.manifest(lambda d: d["dims"].pop("latent_height"))),
    Case("gen-path-dotdot", gen(), "is '../x.onnx', a path outside the bundle folder",
         lambda e: e.manifest(lambda d: unet0(d)["file"].update(path="../x.onnx"))),
    Case("gen-path-absolute", gen(), "is '/etc/hostname', a path outside the bundle folder",
         lambda e: e.manifest(lambda d: unet0(d)["file"].update(path="/etc/hostname"))),
    Case("gen-symlink-outside", gen(), "leads outside the bundle", link_outside),
    Case("gen-external-data-outside", gen(), "outside.data', which is not one of the chunk's files",
         external_data_outside),
    Case("gen-truncated-chunk", gen(), "does not match its sha256", lambda e: truncate(e, False)),
    Case("gen-empty-chunk", gen(), "does not match its sha256", lambda e: truncate(e, True)),
    Case("gen-missing-chunk", gen(), "is missing (named in",
         lambda e: (e.bundle / e.chunk("unet", 2).file.path).unlink()),
    Case("gen-interrupted-staging-folder",
         lambda e: ["generate", str(e.left), "--prompt", "a", "--out", str(e.png)],
         "is the staging folder of an export or copy that was interrupted"),
    # -- generate: command-line values
    Case("gen-unknown-engine", gen("--engine", "tensorrt"), "unknown engine 'tensorrt'"),
    Case("gen-unknown-scheduler", gen("--scheduler", "ddpm"), "unknown scheduler 'ddpm'"),
    Case("gen-unknown-memory", gen("--memory", "swap"), "unknown memory policy 'swap'"),
    Case("gen-unknown-compute-units", gen("--compute-units", "tpu"), "argument --compute-units: invalid choice"),
    Case("gen-negative-steps", gen("--steps", "-3"), "--steps is -3"),
    Case("gen-zero-images", gen("--num-images", "0"), "--num-images is 0"),
    Case("gen-steps-not-a-number", gen("--steps", "many"), "argument --steps: invalid int value: 'many'"),
    Case("gen-guidance-nan", gen("--guidance", "nan"), "--guidance is nan"),
    Case("gen-strength-out-of-range", gen("--init-image", "x.png", "--strength", "1.5"), "--strength is 1.5"),
    Case("gen-mask-without-init-image", gen("--mask", "m.png"), "--mask needs --init-image"),
    Case("gen-mask-missing", lambda e: gen("--init-image", str(e.tmp / "i.png"), "--mask", str(e.tmp / "no.png"))(e),
         "no.png does not exist", lambda e: Image.new("RGB", (128, 128)).save(e.tmp / "i.png")),
    Case("gen-out-in-missing-folder", lambda e: gen()(e)[:-3] + ["--out", str(e.tmp / "no" / "x.png")],
         "is not a folder"),
    # -- generate: what happens while it runs
    Case("gen-nan-at-step-2", gen("--scheduler", "euler"), "step 2 of 3: the UNet output holds NaN",
         patch=nan_at_unet_call(2)),
    Case("gen-inf-from-text-encoder", gen(), "before the first step: the text encoder output holds inf",
         patch=nan_at_unet_call(1, "last_hidden_state", np.inf)),
    Case("gen-png-disk-full", gen(), "x.png: No space left on device", patch=png_disk_full),
    # -- inspect
    Case("inspect-not-a-bundle", lambda e: ["inspect", str(e.tmp)], "manifest.json is missing"),
    Case("inspect-missing", lambda e: ["inspect", str(e.tmp / "nope")], "does not exist"),
    Case("inspect-wrong-type", lambda e: ["inspect", str(e.bundle)], "weight_bytes is a string 'big'",
         lambda e: e.manifest(lambda d: unet0(d).update(weight_bytes="big"))),
    Case("inspect-unknown-dtype", lambda e: ["inspect", str(e.bundle)], "dtype is 'complex64', not one of",
         lambda e: e.manifest(lambda d: unet0(d)["inputs"][0].update(dtype="complex64"))),
    Case("inspect-duplicate-chunk", lambda e: ["inspect", str(e.bundle)], "repeats a chunk id",
         lambda e: e.manifest(lambda d: d["components"]["unet"]["chunks"][1].update(id=unet0(d)["id"]))),
    Case("inspect-bad-sha256", lambda e: ["inspect", str(e.bundle)], "not a sha256 in hex",
         lambda e: e.manifest(lambda d: unet0(d)["file"].update(sha256="abc"))),
    # -- apple-resources
    Case("apple-onnx-bundle", lambda e: ["apple-resources", str(e.bundle), "--out", str(e.out)],
         "exported for 'onnx', not CoreML"),
    Case("apple-out-not-empty", lambda e: ["apple-resources", str(e.bundle), "--out", str(e.out)],
         "already exists and is not empty", lambda e: (e.out.mkdir(), (e.out / "keep").write_text("mine"))),
    Case("apple-out-inside-bundle", lambda e: ["apple-resources", str(e.bundle), "--out", str(e.bundle / "R")],
         "is inside the bundle"),
    Case("apple-missing-bundle", lambda e: ["apple-resources", str(e.tmp / "nope"), "--out", str(e.out)],
         "does not exist"),
    # -- export: the model folder
    Case("export-missing-model", export(model=lambda e: e.tmp / "nope"), "does not exist"),
    Case("export-model-is-a-file", export(model=lambda e: e.file("m", "x")), "is a file"),
    Case("export-model-index-not-json", export(), "model_index.json",
         lambda e: (e.model / "model_index.json").write_text("{")),
    Case("export-lora-missing", export("--lora", "/nonexistent/style.safetensors:0.8"),
         "LoRA file /nonexistent/style.safetensors does not exist"),
    Case("export-lora-pickle", lambda e: export("--lora", str(e.file("style.ckpt", "x")))(e),
         "is not a .safetensors file"),
    Case("export-variant-not-there", export("--variant", "fp16"), "variant 'fp16' is not there"),
    Case("export-variant-bad-name", export("--variant", "../fp16"), "is not a weights variant name"),
    Case("export-several-variants", export(), "has several weight variants (bf16, fp16)",
         lambda e: rename_weights(e, "diffusion_pytorch_model.fp16.safetensors",
                                  "diffusion_pytorch_model.bf16.safetensors")),
    Case("export-sharded-incomplete", export(), "holds incomplete sharded weights",
         lambda e: rename_weights(e, "diffusion_pytorch_model-00001-of-00002.safetensors",
                                  "diffusion_pytorch_model.safetensors.index.json")),
    Case("export-pickles-only", export(), "only pickled weights found (diffusion_pytorch_model.bin)",
         lambda e: rename_weights(e, "diffusion_pytorch_model.bin")),
    Case("export-truncated-weights", export(), "cannot load the text_encoder",
         lambda e: (e.model / "text_encoder/model.safetensors").write_bytes(b"\x10\0\0\0\0\0\0\0{")),
    # -- export: a single-file checkpoint
    Case("export-single-file-unknown-keys",
         export(model=lambda e: e.tensors("mystery.safetensors", ("encoder.weight", "head.bias"))),
         "error[unknown-checkpoint]: mystery.safetensors matches no architecture pocketsd knows"),
    Case("export-single-file-no-tokenizer", export(model=lambda e: e.single_file),
         "tiny.safetensors is a single-file checkpoint, which holds no tokenizer — pass --tokenizer DIR"),
    Case("export-single-file-pickled", export(model=lambda e: e.file("model.ckpt", "x")),
         "is a pickled checkpoint: pocketsd never loads pickles"),
    Case("export-tokenizer-for-a-folder", export("--tokenizer", "tok"), "--tokenizer is for a single-file checkpoint"),
    Case("export-single-file-sd2-no-prediction-type",
         lambda e: export("--tokenizer", str(e.model / "tokenizer"), model=lambda e: e.sd2_file)(e),
         "error[prediction-type]: sd2.safetensors is an SD 2.x checkpoint (tiny-sd21), and its weights do not say"),
    Case("export-prediction-type-for-a-folder", export("--prediction-type", "epsilon"),
         "--prediction-type is for a single-file checkpoint"),
    # -- export: presets and command-line values
    Case("export-preset-components-mapping", preset("components: {unet: {bogus_key: 1}}\n"),
         "mine.yaml: components is a mapping ({'unet': {'bogus_key': 1}}), not a non-empty list"),
    Case("export-preset-number-for-list", preset("components: 3\n"), "components is a number (3), not a non-empty"),
    Case("export-preset-number-for-modules", preset("split: {unet: {at_modules: 3}}\n"),
         "split.unet.at_modules must be a non-empty list of module paths"),
    Case("export-preset-string-for-bool", preset("runtime: {low_memory: 'yes'}\n"),
         "runtime.low_memory is 'yes' — allowed: True, False"),
    Case("export-preset-list-for-mapping", preset("split: [unet]\n"), "split must be a mapping, not a list"),
    Case("export-preset-string-for-int", preset("runtime: {threads: '4'}\n"), "runtime.threads is '4', not an integer"),
    Case("export-preset-not-yaml", preset("split: {unet: [\n"), "is not valid YAML"),
    Case("export-preset-empty", preset(""), "mine.yaml: <top> is empty"),
    Case("export-unknown-preset", export("--preset", "turbo"), "unknown preset 'turbo'"),
    Case("export-resolution-not-multiple", export("--resolution", "100x100"), "--resolution is 100x100"),
    Case("export-max-chunk-nan", export("--max-chunk-mb", "nan"), "--max-chunk-mb is nan"),
    Case("export-bad-chunks", export("--chunks", "unet=many"), "expected COMPONENT=N"),
    Case("export-negative-seed", export("--seed", "-1"), "--seed is -1"),
    Case("export-out-not-empty", export(), "already exists and is not empty",
         lambda e: (e.out.mkdir(), (e.out / "keep").write_text("mine"))),
    # -- export: the output location while writing
    Case("export-disk-full", export(), "cannot write the bundle to", patch=fail_writing(
        OSError(errno.ENOSPC, "No space left on device"))),
    Case("export-read-only-folder", export(), "Permission denied", patch=read_only_parent),
    Case("export-interrupted", export(), "error[interrupted]: interrupted", patch=fail_writing(KeyboardInterrupt()),
         code=130),
]


def snapshot(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): (p.lstat().st_size if not p.is_dir() else -1) for p in root.rglob("*")}


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path: Path, tiny_model_dir: Path, tiny_bundle: Path, capsys,
                   monkeypatch: pytest.MonkeyPatch):
    env = Env(tmp_path, tiny_model_dir, tiny_bundle)
    case.setup(env)
    if case.patch is not None:
        case.patch(monkeypatch, env)
    argv = case.argv(env)
    capsys.readouterr()
    before = snapshot(tmp_path)
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == case.code, err
    assert len(err.splitlines()) == 1 and err.startswith("error["), err
    assert "Traceback" not in err and case.expect in err, err
    assert snapshot(tmp_path) == before  # nothing written, nothing left half-written, nothing removed
    print(f"{case.id}: {err}")  # the messages, for `pytest -rP`


def test_the_battery_is_broad():
    commands = {c.id.split("-")[0] for c in CASES}
    assert len(CASES) >= 30 and commands == {"gen", "inspect", "apple", "export"}
