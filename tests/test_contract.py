"""pocketsd/contract.py: the one table of dtypes, CoreML targets and compute units, and the component I/O names that
export, runtime, the Apple layout and bench share."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pocketsd import contract
from pocketsd.errors import PresetError

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", contract.DTYPES)
def test_every_dtype_is_a_numpy_dtype_of_its_stated_size(name):
    assert np.dtype(name).itemsize == contract.DTYPE_BYTES[name]
    assert np.dtype(name).name == name  # the manifest's names are numpy's: arrays are made with astype(name)


def test_the_dtype_views_come_from_the_contract():
    from pocketsd.runtime import manifest

    assert manifest.DTYPES is contract.DTYPES and manifest.DTYPE_BYTES is contract.DTYPE_BYTES
    spec = manifest.TensorSpec("t", "float16", (2, 3))
    assert spec.nbytes == 12


def test_the_contract_imports_nothing_but_the_standard_library():
    code = ("import sys; import pocketsd.contract; "
            "heavy = {'numpy', 'torch', 'onnx', 'onnxruntime', 'coremltools'} & set(sys.modules); "
            "assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_deployment_targets_levels_and_spec_versions():
    targets = contract.DEPLOYMENT_TARGETS
    assert set(targets) == {"iOS16", "iOS17", "iOS18", "macOS13", "macOS14", "macOS15"}
    for name, target in targets.items():
        assert target.name == name
        assert target.spec_version == target.level - 9  # iOS16 → 7, iOS17 → 8, iOS18 → 9
        if name.startswith("macOS"):
            assert target.level == int(name[len("macOS"):]) + 3  # macOS13 ↔ iOS16
        else:
            assert target.level == int(name[len("iOS"):])
    assert contract.targets_at(18) == "iOS18/macOS15" and contract.DEFAULT_DEPLOYMENT_TARGET in targets


def test_spec_versions_and_levels_agree_with_coremltools():
    ct = pytest.importorskip("coremltools", reason="coremltools is not installed (pip install 'pocketsd[coreml]')")
    for name, target in contract.DEPLOYMENT_TARGETS.items():
        assert int(getattr(ct.target, name)) == target.spec_version, name  # ct.target's values are spec versions
        assert getattr(ct.target, name) == getattr(ct.target, f"iOS{target.level}"), name  # macOS13 is iOS16's alias


def test_every_target_and_compute_unit_is_accepted_by_a_preset():
    from pocketsd.export.compression.coreml_config import TARGET_LEVELS, parse_compression
    from pocketsd.export.preset import CoreMLConfig, YamlReader, _coreml_config

    assert TARGET_LEVELS == {n: t.level for n, t in contract.DEPLOYMENT_TARGETS.items()}
    for name in contract.DEPLOYMENT_TARGETS:
        for units in contract.COMPUTE_UNITS:
            config = _coreml_config(YamlReader({"deployment_target": name, "compute_units": units}, "t.yaml", "coreml"),
                                    ("unet",))
            assert config == CoreMLConfig(deployment_target=name, compute_units=units)
        assert parse_compression({"global": {"mode": "palettize", "nbits": 6}}, "u", name).global_config
    with pytest.raises(PresetError, match="iOS16/macOS13") as error:
        parse_compression({}, "u", "iOS26")
    assert all(name in error.value.hint for name in contract.DEPLOYMENT_TARGETS)


def test_compute_units_feed_the_cli_and_the_coreml_session():
    from pocketsd.cli import build_parser

    parser = build_parser()
    generate = next(a for a in parser._subparsers._group_actions[0].choices["generate"]._actions
                    if a.dest == "compute_units")
    assert tuple(generate.choices) == tuple(contract.COMPUTE_UNITS)
    coreml_session = pytest.importorskip("pocketsd.runtime.coreml_session")
    assert coreml_session.COMPUTE_UNITS is contract.COMPUTE_UNITS


def _names(specs):
    return tuple(io.name for io in specs)


def test_component_specs_use_the_contract_names():
    from pocketsd.export.components import text_encoder, unet, vae_decoder, vae_encoder

    te, un, dec, enc = contract.TEXT_ENCODER_IO, contract.UNET_IO, contract.VAE_DECODER_IO, contract.VAE_ENCODER_IO
    assert _names(text_encoder.SPEC.inputs) == (te.input_ids,)
    assert _names(text_encoder.SPEC.outputs) == (te.last_hidden_state, te.pooled_outputs)
    assert _names(unet.SPEC.inputs) == (un.sample, un.timestep, un.encoder_hidden_states)
    assert _names(unet.SPEC.outputs) == (un.noise_pred,)
    assert _names(vae_decoder.SPEC.inputs) == _names(vae_decoder.HEAD_SPEC.inputs) == (dec.z,)
    assert _names(vae_decoder.SPEC.outputs) == _names(vae_decoder.TAIL_SPEC.outputs) == (dec.image,)
    assert _names(vae_encoder.SPEC.inputs) == (enc.x,) and _names(vae_encoder.SPEC.outputs) == (enc.latent,)


def test_the_names_on_disk_never_change():
    """Bundles already written and Apple's Swift pipeline read these exact names."""
    assert dataclasses.asdict(contract.TEXT_ENCODER_IO) == {
        "input_ids": "input_ids", "last_hidden_state": "last_hidden_state", "pooled_outputs": "pooled_outputs",
        "hidden_embeds": "hidden_embeds"}
    assert dataclasses.asdict(contract.UNET_IO) == {"sample": "sample", "timestep": "timestep",
                                                    "encoder_hidden_states": "encoder_hidden_states",
                                                    "noise_pred": "noise_pred", "text_embeds": "text_embeds",
                                                    "time_ids": "time_ids", "timestep_cond": "timestep_cond"}
    assert dataclasses.asdict(contract.VAE_DECODER_IO) == {"z": "z", "image": "image"}
    assert dataclasses.asdict(contract.VAE_ENCODER_IO) == {"x": "x", "latent": "latent"}


def test_apple_contract_and_bench_inputs_use_the_contract_names():
    from pocketsd.apple.contract import MODELS
    from pocketsd.bench.worker_protocol import unet_inputs

    unet_model = next(m for m in MODELS if m.component == "unet")
    un = contract.UNET_IO
    assert [f.name for f in unet_model.inputs] == [un.sample, un.timestep, un.encoder_hidden_states]
    text_model = next(m for m in MODELS if m.component == "text_encoder")
    assert [f.name for f in text_model.outputs] == [contract.TEXT_ENCODER_IO.last_hidden_state]
    assert list(unet_inputs(8, 8)) == [un.sample, un.timestep, un.encoder_hidden_states]


def test_worker_protocol_loads_the_contract_by_path_without_pocketsd():
    """optimum's worker imports worker_protocol.py by path in an environment without pocketsd."""
    code = ("import sys, importlib.abc\n"
            "class Block(importlib.abc.MetaPathFinder):\n"
            "    def find_spec(self, name, path=None, target=None):\n"
            "        if name.split('.')[0] == 'pocketsd': raise ImportError(name)\n"
            "sys.meta_path.insert(0, Block())\n"
            f"sys.path.insert(0, {str(ROOT / 'bench')!r})\n"
            "import worker_protocol\n"
            "assert list(worker_protocol.unet_inputs(8, 8)) == ['sample', 'timestep', 'encoder_hidden_states']\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
