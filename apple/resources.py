"""Lay a CoreML bundle out as the ``Resources`` folder Apple's Swift ``StableDiffusionPipeline`` loads unchanged.

    pocketsd apple-resources BUNDLE --out Resources

Files get the names the Swift loader looks for (``TextEncoder``, ``Unet`` or ``UnetChunk1``/``UnetChunk2``,
``VAEDecoder``, ``VAEEncoder``, ``vocab.json``, ``merges.txt``); their features already have the names and shapes it
feeds and reads (see ``contract.py``). Next to them goes our own ``manifest.json``, rewritten to these file names, for
loaders that read the manifest (and take any number of chunks). On macOS with Xcode's command line tools each
package is compiled to the ``.mlmodelc`` that Swift loads; elsewhere the layout says so and stays compilable.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from pocketsd.apple.contract import MAX_UNET_CHUNKS, TOKENIZER_FILES, chained_inputs_ok, file_names, models_for
from pocketsd.errors import BundleError, UserError
from pocketsd.runtime.hashing import sha256_path, size_of
from pocketsd.runtime.manifest import SECOND_TOKENIZER, Component, FileRef, Manifest, load_manifest
from pocketsd.runtime.tokenizer import TOKENIZER_JSON
from pocketsd.staging import check_target, staged_folder

log = logging.getLogger(__name__)
NOT_COMPILED = ("not compiled: .mlmodelc needs macOS with Xcode's command line tools (xcrun coremlcompiler); run "
                "`pocketsd apple-resources` there, or compile in the app with MLModel.compileModel(at:)")


def _apple_files(manifest: Manifest) -> dict[str, list[str]]:
    """component → Resources names of its chunks; refuses what the Swift loader cannot load."""
    if manifest.target.get("backend") != "coreml":
        raise UserError(f"the bundle was exported for {manifest.target.get('backend')!r}, not CoreML",
                        "export with a CoreML preset: --preset iphone or --preset mac", code="apple")
    names = {}
    for model in models_for(list(manifest.components)):
        if model.component not in manifest.components:
            if model.required:
                raise UserError(f"the bundle has no {model.component}, which Apple's pipeline requires",
                                "export all components", code="apple")
            continue
        n = len(manifest.components[model.component].chunks)
        limit = MAX_UNET_CHUNKS if model.component == "unet" else 1
        if n > limit:
            raise UserError(
                f"Apple's Swift pipeline loads {model.component} in at most {limit} chunk(s); this bundle has {n}",
                f"export with --chunks {model.component}={limit} for Apple's layout; the bundle itself keeps all "
                f"{n} chunks for manifest-aware loaders", code="apple")
        names[model.component] = file_names(model.component, n)
    return names


def _compile(package: Path, out_dir: Path) -> str:
    if sys.platform != "darwin" or shutil.which("xcrun") is None:
        return NOT_COMPILED
    subprocess.run(["xcrun", "coremlcompiler", "compile", str(package), str(out_dir)], check=True,
                   capture_output=True)
    return "compiled"


def _rewritten(component: Component, names: list[str], root: Path) -> Component:
    chunks = []
    for chunk, name in zip(component.chunks, names):
        path = root / f"{name}.mlpackage"
        chunks.append(replace(chunk, file=FileRef(path.name, sha256_path(path), size_of(path))))
    return replace(component, chunks=tuple(chunks))


def write_resources(bundle_dir: str | Path, out_dir: str | Path, compile_models: bool = True) -> dict[str, Any]:
    bundle, out = Path(bundle_dir), check_target(out_dir, "Resources")  # before reading anything
    manifest = load_manifest(bundle)
    if out.resolve().is_relative_to(bundle.resolve()):  # it would copy the bundle into itself
        raise UserError(f"--out {out} is inside the bundle {bundle}", "write the Resources folder outside the bundle",
                        code="apple")
    names = _apple_files(manifest)
    with staged_folder(out, "Resources") as staging:
        report = _fill(bundle, manifest, names, staging, compile_models)
    return report


def _fill(bundle: Path, manifest: Manifest, names: dict[str, list[str]], root: Path, compile_models: bool
          ) -> dict[str, Any]:
    compiled: dict[str, str] = {}
    for component, files in names.items():
        for chunk, name in zip(manifest.components[component].chunks, files):
            shutil.copytree(bundle / chunk.file.path, root / f"{name}.mlpackage")
            package = root / f"{name}.mlpackage"
            compiled[name] = _compile(package, root) if compile_models else "not compiled: asked not to"
    tokenizer = {}
    # Swift reads vocab.json and merges.txt; tokenizer.json goes along for loaders that read our manifest.
    for name in (*TOKENIZER_FILES, TOKENIZER_JSON):
        ref = manifest.tokenizer["files"].get(name)
        if ref is None:
            raise BundleError(f"the bundle's tokenizer has no {name}", "re-export the bundle")
        shutil.copyfile(bundle / ref.path, root / name)
        tokenizer[name] = FileRef(name, sha256_path(root / name), size_of(root / name))
    # SDXL's second tokenizer (its own pad token) goes along as it is in the bundle, for manifest-aware loaders;
    # Swift builds both from vocab.json and merges.txt
    for ref in manifest.tokenizer.get(SECOND_TOKENIZER, {}).get("files", {}).values():
        (root / ref.path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(bundle / ref.path, root / ref.path)
    components = {c: _rewritten(manifest.components[c], names[c], root) for c in names}
    rewritten = replace(manifest, components=components, plan=None,
                        tokenizer={**manifest.tokenizer, "files": tokenizer})
    rewritten.write(root)
    problems = check_layout(root)
    if problems:
        raise BundleError(f"the Resources layout breaks Apple's contract: {problems[0]}", "; ".join(problems[1:]))
    report = {"files": {n: compiled[n] for n in compiled}, "tokenizer": list(TOKENIZER_FILES)}
    (root / "pocketsd-resources.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def check_layout(root: str | Path) -> list[str]:
    """Everything in a Resources folder that Apple's Swift pipeline would not load or would misread."""
    from pocketsd.export.backends.coreml.check import read_spec

    root = Path(root)
    manifest = load_manifest(root)
    dims, problems = manifest.dims, []
    for name in TOKENIZER_FILES:
        if not (root / name).is_file():
            problems.append(f"{name} is missing")
    for model in models_for(list(manifest.components)):
        if model.component not in manifest.components:
            continue
        component = manifest.components[model.component]
        files = file_names(model.component, len(component.chunks))
        specs = []
        for name in files:
            if not (root / f"{name}.mlpackage").is_dir():
                problems.append(f"{name}.mlpackage is missing")
                return problems
            specs.append(read_spec(root / f"{name}.mlpackage"))
        problems += _check_features(model, specs, dims)
    return problems


def _check_features(model: Any, specs: list[Any], dims: dict[str, int]) -> list[str]:
    problems = []
    first, last = specs[0], specs[-1]
    inputs = {f.name: f for f in first.inputs}
    for feature in model.inputs:
        found = inputs.get(feature.name) if feature.name else first.inputs[0]
        if found is None and len(specs) > 1:
            found = next((f for s in specs for f in s.inputs if f.name == feature.name), None)
        want = (feature.dtype, feature.shape(dims))
        if found is None or (found.dtype, found.shape) != want:
            problems.append(f"{model.file}: input {feature.name or '#0'} is "
                            f"{None if found is None else (found.dtype, found.shape)}, Swift needs {want}")
    outputs = {f.name: f for f in last.outputs}
    for feature in model.outputs:
        found = outputs.get(feature.name) if feature.name else last.outputs[0]
        want = (feature.dtype, feature.shape(dims))
        if found is None or (found.dtype, found.shape) != want:
            problems.append(f"{model.file}: output {feature.name or '#0'} is "
                            f"{None if found is None else (found.dtype, found.shape)}, Swift needs {want}")
    if model.single_output and len(last.outputs) != 1:
        problems.append(f"{model.file}: the last model has {len(last.outputs)} outputs; Swift reads only the first")
    problems += chained_inputs_ok([[f.name for f in s.inputs] for s in specs],
                                  [[f.name for f in s.outputs] for s in specs],
                                  [f.name for f in model.inputs if f.name])
    return problems
