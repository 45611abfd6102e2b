"""Presets: strict YAML in ``split_configs/`` → frozen dataclasses.

Every key is checked: an unknown key, a bad value or an impossible combination is a :class:`PresetError` naming the
file, the key path and what is allowed. Nothing is warned about and dropped. CLI overrides (``--chunks``,
``--max-chunk-mb``, ``--resolution``) go through the same checks.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any, Mapping

import yaml

from pocketsd.contract import COMPUTE_UNITS, DEFAULT_COMPUTE_UNITS, DEFAULT_DEPLOYMENT_TARGET, DEPLOYMENT_TARGETS
from pocketsd.errors import PresetError
from pocketsd.export.compression.quality_gates import QUANT_MIN_PSNR_DB
from pocketsd.export.preset_reader import YamlReader, shown
from pocketsd.export.split_strategies import SplitRequest
from pocketsd.runtime.execution import MEMORY_POLICIES

COMPONENT_IDS = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
BACKENDS = ("onnx", "coreml")
PRECISIONS = {"onnx": ("fp32",), "coreml": ("fp32", "fp16")}
_TOP_KEYS = ("name", "description", "backend", "precision", "resolution", "unet_batch", "components", "split",
             "parity", "runtime", "coreml", "attention", "vae_tiling", "quantize")


@dataclass(frozen=True)
class ParityConfig:
    min_psnr_db: float = 60.0
    per_component: Mapping[str, float] = field(default_factory=dict)

    def threshold(self, component: str) -> float:
        return self.per_component.get(component, self.min_psnr_db)


@dataclass(frozen=True)
class RuntimeConfig:
    threads: int = 0
    low_memory: bool = False  # onnxruntime: no memory arena / pattern planning
    memory: str = "resident"  # resident | stream | prefetch (see runtime/execution.py)


ATTENTION_FORMS = ("original", "split_einsum", "sliced")


@dataclass(frozen=True)
class AttentionConfig:
    """How attention layers are written at export. ``sliced`` computes attention in query slices so that no score
    block (heads × query slice × keys × 4 bytes) exceeds ``slice_mb`` megabytes."""

    form: str = "original"
    slice_mb: float = 16.0


GROUP_NORM_STATS = ("image", "tile")
MID_BLOCK_MODES = ("whole", "tile")


@dataclass(frozen=True)
class VaeTiling:
    """The VAE is exported at one tile's size and run over overlapping tiles, blended (latent pixels).
    ``group_norm``: ``image`` runs the tiles twice, normalizing every GroupNorm in the second pass with its
    statistics averaged over all tiles of the first (export/components/group_norm_stats.py); ``tile`` runs them
    once, each tile with its own statistics. ``mid_block``: ``whole`` runs the decoder's head (up to its mid block,
    whose attention is global) once on the whole latent and tiles only the rest (export/components/vae_decoder.py);
    ``tile`` tiles the whole decoder."""

    tile: int = 32
    overlap: int = 8
    group_norm: str = "image"
    mid_block: str = "whole"


QUANT_MODES = ("int8", "int4")
# The quality gate's defaults (quantized component vs fp32) and their calibration: export/compression/quality_gates.py.


@dataclass(frozen=True)
class WeightQuantization:
    """ONNX weight-only quantization of one component: int8 per output channel, or int4 in blocks of
    ``block_size`` input channels. ``min_psnr_db`` gates the export (quantized vs fp32)."""

    mode: str
    block_size: int = 128
    min_psnr_db: float = 35.0


@dataclass(frozen=True)
class CoreMLConfig:
    deployment_target: str = DEFAULT_DEPLOYMENT_TARGET
    compute_units: str = DEFAULT_COMPUTE_UNITS  # the runtime's default on macOS
    attention: str = "original"  # attention::original (GPU) or attention::split_einsum (Neural Engine)
    compression: Mapping[str, Any] = field(default_factory=dict)  # component id → CompressionConfig

    def to_dict(self) -> dict[str, Any]:
        return {"deployment_target": self.deployment_target, "compute_units": self.compute_units,
                "attention": self.attention,
                "compression": {k: _plain(asdict(v)) for k, v in self.compression.items()}}


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


@dataclass(frozen=True)
class Preset:
    name: str
    source: str
    backend: str = "onnx"
    precision: str = "fp32"
    description: str = ""
    resolution: tuple[int, int] | None = None  # (height, width); None: the model's native size
    unet_batch: int = 2
    components: tuple[str, ...] = COMPONENT_IDS
    split: Mapping[str, SplitRequest] = field(default_factory=dict)
    parity: ParityConfig = field(default_factory=ParityConfig)
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    coreml: CoreMLConfig = field(default_factory=CoreMLConfig)
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    vae_tiling: VaeTiling | None = None
    quantize: Mapping[str, WeightQuantization] = field(default_factory=dict)  # component id → quantization

    def split_for(self, component: str) -> SplitRequest:
        return self.split.get(component, self.split.get("default", SplitRequest()))

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "backend": self.backend, "precision": self.precision,
            "resolution": list(self.resolution) if self.resolution else None, "unet_batch": self.unet_batch,
            "components": list(self.components),
            "split": {k: r.fields() for k, r in self.split.items()},
            "parity": {"min_psnr_db": self.parity.min_psnr_db, "per_component": dict(self.parity.per_component)},
            "runtime": vars(self.runtime), **({"coreml": self.coreml.to_dict()} if self.backend == "coreml" else {}),
            "attention": vars(self.attention), "vae_tiling": vars(self.vae_tiling) if self.vae_tiling else None,
            "quantize": {k: vars(v) for k, v in self.quantize.items()},
        }


def parse_resolution(value: Any, where: YamlReader) -> tuple[int, int] | None:
    if value is None:
        return None
    text = str(value)
    match = re.fullmatch(r"\s*(\d+)\s*[xX×]\s*(\d+)\s*", text) or re.fullmatch(r"\s*(\d+)\s*", text)
    if not match:
        where.fail(f"is {value!r}", "write HEIGHTxWIDTH, e.g. 512x512")
    h = int(match.group(1))
    w = int(match.group(2)) if match.lastindex == 2 else h
    if h % 8 or w % 8 or h <= 0 or w <= 0:
        where.fail(f"is {h}x{w}", "height and width must be positive multiples of 8 (64 for most UNets)")
    return h, w


def _split_request(reader: YamlReader, shared_prefix: str | None) -> SplitRequest:
    """One component's split. ``shared_prefix``: None where this component may ask for one, else why it may not."""
    reader.only(("n_chunks", "max_mb", "at_modules", "shared_prefix"))
    prefix = reader.choice("shared_prefix", (True, False), False)
    if prefix and shared_prefix is not None:
        reader.at("shared_prefix").fail(shared_prefix, "remove shared_prefix")
    if len(set(reader.data) - {"shared_prefix"}) != 1:
        reader.fail("must set exactly one of n_chunks, max_mb, at_modules")
    if "n_chunks" in reader.data:
        return SplitRequest(n_chunks=reader.number("n_chunks", 1, int, 1), shared_prefix=prefix)
    if "max_mb" in reader.data:
        return SplitRequest(max_bytes=int(reader.number("max_mb", 1, float, 0.001) * 1_000_000), shared_prefix=prefix)
    modules = reader.data["at_modules"]
    if not isinstance(modules, list) or not modules or not all(isinstance(m, str) for m in modules):
        reader.at("at_modules").fail("must be a non-empty list of module paths", "e.g. [down_blocks.2, mid_block]")
    return SplitRequest(at_modules=tuple(modules), shared_prefix=prefix)


def _no_shared_prefix(component: str, backend: str, unet_batch: int) -> str | None:
    """Why ``component`` of such a preset cannot ask for ``shared_prefix`` (None: it can)."""
    if component != "unet":
        return "is only for the unet, whose guided batch rows share their latents"
    if backend != "onnx":
        return "is only for onnx presets (Apple's Swift pipeline runs the UNet as its chunks were cut for it)"
    if unet_batch != 2:
        return "needs unet_batch: 2 (a batch-1 UNet runs each guided row as a call of its own)"
    return None


def preset_from_dict(data: Any, source: str) -> Preset:
    top = YamlReader(data, source)
    top.only(_TOP_KEYS)
    backend = top.choice("backend", BACKENDS, "onnx")
    precision = top.choice("precision", PRECISIONS[backend], "fp32")
    components = _components(top)
    split_reader = top.child("split")
    split_reader.only((*COMPONENT_IDS, "default"))
    unet_batch = top.choice("unet_batch", (1, 2), 2)
    split = {key: _split_request(split_reader.child(key), _no_shared_prefix(key, backend, unet_batch))
             for key in split_reader.data}
    par = top.child("parity")
    par.only(("min_psnr_db", "per_component"))
    per = par.child("per_component")
    per.only(COMPONENT_IDS)
    run = top.child("runtime")
    run.only(("threads", "low_memory", "memory"))
    low = run.choice("low_memory", (True, False), False)
    memory = run.choice("memory", MEMORY_POLICIES, "resident")
    if top.data.get("coreml") and backend != "coreml":
        top.at("coreml").fail("is set but backend is not coreml", "remove it or set backend: coreml")
    coreml = _coreml_config(top.child("coreml"), components) if backend == "coreml" else CoreMLConfig()
    attention = _attention_config(top, coreml)
    if top.data.get("quantize") and backend != "onnx":
        top.at("quantize").fail("is set but backend is not onnx",
                                "CoreML presets compress with coreml.compression instead")
    quantize = _quantize_config(top.child("quantize"), components)
    tiling = _vae_tiling(top.child("vae_tiling")) if top.data.get("vae_tiling") is not None else None
    if tiling is not None and backend == "coreml":  # Apple's Swift pipeline calls the VAE once, at full size
        top.at("vae_tiling").fail("is set but backend is coreml",
                                  "Apple's Swift pipeline runs the VAE untiled; remove vae_tiling for CoreML presets")
    return Preset(
        name=_text(top, "name") or Path(source).stem, source=source, backend=backend, precision=precision,
        description=_text(top, "description"),
        resolution=parse_resolution(top.data.get("resolution"), top.at("resolution")),
        unet_batch=unet_batch, components=components, split=split,
        parity=ParityConfig(par.number("min_psnr_db", 60.0, float),
                            {k: per.number(k, 0.0, float) for k in per.data}),
        runtime=RuntimeConfig(run.number("threads", 0, int), low, memory), coreml=coreml,
        attention=attention, vae_tiling=tiling, quantize=quantize,
    )


def _components(top: YamlReader) -> tuple[str, ...]:
    """``components``: a list of component ids. A mapping is refused, not read as its keys."""
    value = top.data.get("components", list(COMPONENT_IDS))
    if not isinstance(value, list) or not value or not all(isinstance(c, str) for c in value):
        top.at("components").fail(f"is {shown(value)}, not a non-empty list of component ids",
                                  f"a list of: {', '.join(COMPONENT_IDS)}")
    for c in value:
        if c not in COMPONENT_IDS:
            top.at("components").fail(f"names unknown component {c!r}", f"known: {', '.join(COMPONENT_IDS)}")
    if len(set(value)) != len(value):
        top.at("components").fail(f"names a component twice ({', '.join(value)})", "give each component once")
    return tuple(value)


def _text(top: YamlReader, key: str) -> str:
    value = "" if top.data.get(key) is None else top.data.get(key)
    if not isinstance(value, str):
        top.at(key).fail(f"is {shown(value)}, not text", "quote it: key: \"text\"")
    return value


def _attention_config(top: YamlReader, coreml: CoreMLConfig) -> AttentionConfig:
    """Top-level ``attention: {form, slice_mb}``; a CoreML preset may give the form as ``coreml.attention`` instead."""
    if top.data.get("attention") is None:
        return AttentionConfig(form=coreml.attention)
    if "attention" in (top.data.get("coreml") or {}):
        top.at("coreml.attention").fail("is set as well as the top-level attention", "keep one of them")
    reader = top.child("attention")
    reader.only(("form", "slice_mb"))
    return AttentionConfig(form=reader.choice("form", ATTENTION_FORMS, "original"),
                           slice_mb=reader.number("slice_mb", 16.0, float, 0.001))


def _vae_tiling(reader: YamlReader) -> VaeTiling:
    reader.only(("tile", "overlap", "group_norm", "mid_block"))
    tiling = VaeTiling(tile=reader.number("tile", 32, int, 8), overlap=reader.number("overlap", 8, int, 0),
                       group_norm=reader.choice("group_norm", GROUP_NORM_STATS, "image"),
                       mid_block=reader.choice("mid_block", MID_BLOCK_MODES, "whole"))
    if tiling.overlap * 2 > tiling.tile:
        reader.at("overlap").fail(f"is {tiling.overlap}, more than half the tile ({tiling.tile})",
                                  "use an overlap of at most tile / 2 latent pixels")
    return tiling


def _quantize_config(reader: YamlReader, components: tuple[str, ...]) -> dict[str, WeightQuantization]:
    reader.only((*COMPONENT_IDS, "default"))
    default = reader.data.get("default")
    out: dict[str, WeightQuantization] = {}
    for component in components:
        if component in reader.data:
            item = reader.child(component)
        elif default is not None:
            item = reader.child("default")
        else:
            continue
        if item.data is None or item.data == {}:
            continue
        item.only(("weights", "block_size", "min_psnr_db"))
        mode = item.choice("weights", QUANT_MODES, None)
        block = item.number("block_size", 128, int, 16)
        if block & (block - 1) or block > 256:  # onnxruntime's MatMulNBits takes blocks of 16..256
            item.at("block_size").fail(f"is {block}, not a power of two from 16 to 256", "use 32, 64, 128 or 256")
        out[component] = WeightQuantization(mode, block, item.number("min_psnr_db", QUANT_MIN_PSNR_DB[mode], float))
    return out


def _coreml_config(reader: YamlReader, components: tuple[str, ...]) -> CoreMLConfig:
    reader.only(("deployment_target", "compute_units", "attention", "compression"))
    target = reader.choice("deployment_target", tuple(DEPLOYMENT_TARGETS), DEFAULT_DEPLOYMENT_TARGET)
    compression = reader.child("compression")
    compression.only(components)
    from pocketsd.export.compression.coreml_optimize import parse_compression

    return CoreMLConfig(
        deployment_target=target,
        compute_units=reader.choice("compute_units", tuple(COMPUTE_UNITS), DEFAULT_COMPUTE_UNITS),
        attention=reader.choice("attention", ATTENTION_FORMS, "original"),
        compression={c: parse_compression(compression.data[c], f"{reader.source}: {compression.path}.{c}", target)
                     for c in compression.data},
    )


def builtin_presets() -> list[str]:
    folder = resources.files("pocketsd.split_configs")
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def load_preset(name_or_file: str) -> Preset:
    """A built-in preset by name (``cpu``) or a YAML file path."""
    text, source = preset_text(name_or_file)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise PresetError(f"{source} is not valid YAML: {exc}".splitlines()[0]) from None
    return preset_from_dict(data, source)


def preset_text(name_or_file: str) -> tuple[str, str]:
    """The YAML text of a built-in preset (``cpu``) or a preset file, and where it came from."""
    path = Path(name_or_file)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.is_file():
            raise PresetError(f"preset file {path} does not exist", f"built-in presets: {', '.join(builtin_presets())}")
        text, source = path.read_text(), str(path)
    else:
        resource = resources.files("pocketsd.split_configs") / f"{name_or_file}.yaml"
        if not resource.is_file():
            raise PresetError(f"unknown preset {name_or_file!r}", f"built-in presets: {', '.join(builtin_presets())}"
                              " — or pass a YAML file")
        text, source = resource.read_text(), f"split_configs/{name_or_file}.yaml"
    return text, source


def with_overrides(preset: Preset, chunks: Mapping[str, int] | None = None, max_chunk_mb: float | None = None,
                   resolution: str | None = None) -> Preset:
    """Apply CLI overrides; they are validated like preset keys (source ``command line``)."""
    split = dict(preset.split)
    cli = YamlReader({}, "command line")
    if max_chunk_mb is not None:
        if not math.isfinite(max_chunk_mb) or max_chunk_mb <= 0:
            cli.at("--max-chunk-mb").fail(f"is {max_chunk_mb}", "give a positive number of megabytes")
        budget = int(max_chunk_mb * 1_000_000)
        split = {c: SplitRequest(max_bytes=budget, shared_prefix=preset.split_for(c).shared_prefix)
                 for c in COMPONENT_IDS}
    for component, n in (chunks or {}).items():
        if component not in COMPONENT_IDS:
            cli.at("--chunks").fail(f"names unknown component {component!r}", f"known: {', '.join(COMPONENT_IDS)}")
        if n < 1:
            cli.at("--chunks").fail(f"asks for {n} chunks of {component}", "ask for at least 1")
        # one chunk is the unchunked model, as the preset's cut would have it without any cut: no shared prefix
        split[component] = SplitRequest(n_chunks=n, shared_prefix=n > 1 and preset.split_for(component).shared_prefix)
    res = parse_resolution(resolution, cli.at("--resolution")) if resolution else preset.resolution
    return replace(preset, split=split, resolution=res)
