"""``export_bundle``: diffusers folder → capture → plan → write → parity gate → bundle, for each component.

The bundle is assembled in a staging folder beside ``--out`` and renamed into place only when every lossy step passed
its quality gate, every chunk and component its parity check, and one denoising step ran through the runtime; on any
failure (or Ctrl-C) the staging folder is removed and ``--out`` is untouched.
"""

from __future__ import annotations

import gc
import logging
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from pocketsd import __version__
from pocketsd.errors import ModelError, PresetError
from pocketsd.export.backends.base import Prepared, backend_for
from pocketsd.export.bundle_files import file_ref, write_plan, write_tokenizer
from pocketsd.export.capture import capture
from pocketsd.export.check_component import check_component
from pocketsd.export.components import SD_COMPONENTS, ComponentSpec, Dims, components_for
from pocketsd.export.components.group_norm_stats import STATS_INPUT, group_norm_stats_spec, manifest_tiling_fields
from pocketsd.export.components.unet import with_timestep_cond
from pocketsd.export.components.vae_decoder import HEAD_ID, HEAD_OUTPUT, HEAD_SPEC, TAIL_SPEC
from pocketsd.export.lora import LoraFile, check_lora_files, fuse_loras
from pocketsd.export.model_loader import ModelFolder, load_module, open_model_folder
from pocketsd.export.preset import Preset
from pocketsd.export.random_model import BUILTIN_MODELS, builtin_model_folder
from pocketsd.export.read_back import check_scheduler, read_back
from pocketsd.export.round_trip import round_trip
from pocketsd.export.single_file import is_single_file, open_single_file
from pocketsd.export.write_component import WrittenComponent, write_component
from pocketsd.runtime.manifest import SCHEMA_VERSION, Manifest, load_manifest
from pocketsd.runtime.sessions import graph_cache_chunks, warm_graph_cache
from pocketsd.staging import staged_folder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ExportRequest:
    model: str  # "tiny", "shapes", a diffusers folder, or a single-file checkpoint (.safetensors, original layout)
    preset: Preset
    out: Path
    seed: int = 0
    progress: bool = True
    warm_cache: bool = True  # open the ONNX chunks once in place, filling onnxruntime's graph cache (_warm_cache)
    variant: str | None = None  # weights variant to load (fp16 ...); None: full precision, else the only one there
    loras: tuple[tuple[str, float], ...] = ()  # (LoRA file, scale), fused into the weights in this order
    tokenizer: str | None = None  # a single-file checkpoint's tokenizer/ folder (the file holds none)
    prediction_type: str | None = None  # a single-file checkpoint's (SD 2.x files do not say)


def _model_folder(request: ExportRequest, stack: ExitStack) -> tuple[ModelFolder, dict[str, Any]]:
    """The diffusers folder to export, and the manifest's ``model`` fields saying where it came from. ``tiny`` and a
    single-file checkpoint become a diffusers folder in a temporary folder that ``stack`` removes."""
    model, variant = request.model, request.variant
    if is_single_file(model):
        return open_single_file(model, request.tokenizer, variant, stack, request.progress, request.prediction_type)
    if request.tokenizer is not None:
        raise ModelError(f"--tokenizer is for a single-file checkpoint; {model} has its own tokenizer",
                         "leave out --tokenizer", code="tokenizer")
    if request.prediction_type is not None:
        raise ModelError(f"--prediction-type is for a single-file checkpoint; {model}'s scheduler config says what "
                         "its UNet predicts", "leave out --prediction-type", code="prediction-type")
    if model in BUILTIN_MODELS:
        scratch = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pocketsd-builtin-")))
        return (open_model_folder(builtin_model_folder(model, scratch), variant),
                {"source": BUILTIN_MODELS[model], "name": model})
    folder = open_model_folder(model, variant)
    return folder, {"source": str(Path(model).resolve()), "name": Path(model).resolve().name}


def resolve_dims(folder: ModelFolder, preset: Preset) -> Dims:
    unet, vae, text = folder.config("unet"), folder.config("vae"), folder.config("text_encoder")
    text_2 = folder.config("text_encoder_2") if folder.family == "sdxl" else {}
    scale = 2 ** (len(vae["block_out_channels"]) - 1)
    native = int(unet["sample_size"]) * scale
    height, width = preset.resolution or (native, native)
    multiple = scale * 2 ** (len(unet["block_out_channels"]) - 1)
    if height % multiple or width % multiple:
        raise PresetError(f"resolution {height}x{width} does not fit this model",
                          f"height and width must be multiples of {multiple} (native size: {native}x{native})")
    context = int(text["hidden_size"]) + int(text_2.get("hidden_size", 0))
    if context != unet["cross_attention_dim"]:
        raise ModelError(f"text encoder width {context} differs from the UNet's cross-attention width "
                         f"{unet['cross_attention_dim']}: the model folder mixes two models",
                         "copy the text_encoder/ (and text_encoder_2/) folders from the UNet's own model")
    pooled = int(text_2.get("projection_dim", 0))
    if text_2 and int(unet.get("projection_class_embeddings_input_dim") or 0) != pooled + 6 * int(
            unet.get("addition_time_embed_dim") or 0):
        raise ModelError("the UNet's added conditioning does not fit the second text encoder's projection "
                         f"({pooled}) and six time ids: the model folder mixes two models",
                         "copy text_encoder_2/ from the UNet's own model")
    latent, unet_in = int(unet.get("out_channels", 4)), int(unet.get("in_channels", 4))
    if unet_in not in (latent, 2 * latent + 1) or int(vae.get("latent_channels", 4)) != latent:
        raise ModelError(f"a UNet with {unet_in} input and {latent} output channels over a VAE with "
                         f"{vae.get('latent_channels', 4)} latent channels is not a model pocketsd can export",
                         f"supported: {latent} input channels (text to image) or {2 * latent + 1} (inpainting)",
                         code="unsupported-model")
    return Dims(height=height, width=width, latent_channels=latent, unet_in_channels=unet_in, vae_scale_factor=scale,
                text_length=int(text["max_position_embeddings"]), text_hidden=context,
                text_hidden_1=int(text["hidden_size"]) if text_2 else 0,
                text_hidden_2=int(text_2.get("hidden_size", 0)), pooled_dim=pooled,
                time_cond_dim=int(unet.get("time_cond_proj_dim") or 0),
                vocab_size=int(text["vocab_size"]), unet_batch=preset.unet_batch,
                vae_tile=preset.vae_tiling.tile if preset.vae_tiling else 0,
                vae_overlap=preset.vae_tiling.overlap if preset.vae_tiling else 0,
                vae_head_channels=int(vae["block_out_channels"][-1]))


def _tiled(spec: ComponentSpec, dims: Dims) -> bool:
    return spec.id in ("vae_decoder", "vae_encoder") and dims.vae_tiling() is not None


def _decoder_head(preset: Preset, dims: Dims) -> bool:
    """Whether the tiled decoder's head (up to its mid block) runs whole: export/components/vae_decoder.py."""
    return (preset.vae_tiling is not None and preset.vae_tiling.mid_block == "whole"
            and _tiled(SD_COMPONENTS["vae_decoder"], dims))


def export_components(preset: Preset, dims: Dims) -> tuple[str, ...]:
    """The preset's components, with the decoder's head just before the decoder where it runs whole, and SDXL's
    second text encoder just after the first (it follows the first's settings)."""
    head = _decoder_head(preset, dims)
    sdxl = _family(dims) == "sdxl"

    def expand(c: str) -> tuple[str, ...]:
        if c == "vae_decoder" and head:
            return HEAD_ID, c
        return (c, "text_encoder_2") if c == "text_encoder" and sdxl else (c,)

    return tuple(c for c in preset.components for c in expand(c))


def _family(dims: Dims) -> str:
    return "sdxl" if dims.text_hidden_2 else "sd"


def component_spec(component_id: str, model: Any, dims: Dims, preset: Preset) -> ComponentSpec:
    """The component's spec; a tiled VAE component with ``vae_tiling.group_norm: image`` gets the statistics I/O
    of export/components/group_norm_stats.py, sized from ``model``'s GroupNorms."""
    if component_id == HEAD_ID:
        return HEAD_SPEC
    if component_id == "vae_decoder" and _decoder_head(preset, dims):
        spec = TAIL_SPEC
    else:
        spec = components_for(_family(dims))[component_id]
        if component_id == "unet" and dims.time_cond_dim:
            spec = with_timestep_cond(spec)
    if _tiled(spec, dims) and preset.vae_tiling is not None and preset.vae_tiling.group_norm == "image":
        return group_norm_stats_spec(spec, model)
    return spec


def _tiling_extra(spec: ComponentSpec, dims: Dims) -> dict[str, Any]:
    """A VAE component exported at one tile's size says so (``Component.extra["tiling"]``, runtime/manifest.py),
    how its GroupNorms are normalized (with whole-image statistics it takes, ``image``, or per tile), and which
    component runs whole before it (``head``)."""
    if not _tiled(spec, dims):
        return {}
    names = [io.name for io in spec.inputs]
    group_norm = manifest_tiling_fields() if STATS_INPUT in names else {"group_norm": "tile"}
    head = {"head": HEAD_ID} if HEAD_OUTPUT in names else {}
    return {"tiling": {**dims.vae_tiling(), **group_norm, **head}}


def _module_for(folder: ModelFolder, components: tuple[str, ...], index: int, kept: dict[str, Any],
                loras: tuple[LoraFile, ...]) -> Any:
    """The sub-model of ``components[index]`` with the LoRAs fused: loaded once, and kept in ``kept`` only while a
    later component needs it (the VAE's decoder and encoder), so that the caller's reference is the last one to it."""
    specs = components_for(folder.family)
    subfolder = {**{c: s.subfolder for c, s in specs.items()}, HEAD_ID: HEAD_SPEC.subfolder}
    sub = subfolder[components[index]]
    module = kept.pop(sub, None)
    if module is None:
        module = fuse_loras(load_module(folder, sub), sub, loras)
    if any(subfolder[c] == sub for c in components[index + 1:]):
        kept[sub] = module
    return module


def _conditioning(folder: ModelFolder) -> dict[str, Any]:
    """What SDXL's prompt encoding reads from the pipeline's config: whether an absent negative prompt is zeros."""
    if folder.family != "sdxl":
        return {}
    return {"force_zeros_for_empty_prompt": bool(folder.model_index.get("force_zeros_for_empty_prompt", True))}


def export_bundle(request: ExportRequest) -> Path:
    """Every check raises inside the staging folder, before its rename: the scheduler config first (seconds), then
    the lossy steps' quality gates and the parity gate per component, the runtime reading the manifest back, and one
    denoising step through the runtime (export/round_trip.py)."""
    loras = check_lora_files(request.loras)
    with staged_folder(request.out, "bundle") as staging, ExitStack() as stack:
        folder, source = _model_folder(request, stack)
        check_scheduler(folder.scheduler_config.get("_class_name"), folder.scheduler_config,
                        str(folder.path / "scheduler" / "scheduler_config.json"))
        _export_into(folder, source, request, staging, loras).write(staging)
        round_trip(staging, read_back(staging))
    if request.warm_cache:
        _warm_cache(Path(request.out), request.progress)
    return Path(request.out)


def _warm_cache(bundle: Path, progress: bool) -> None:
    """Fill onnxruntime's graph cache (runtime/graph_cache.py) from the bundle in its final folder, so that the user's
    first load finds it: on SD 1.5 cpu at 512² that load took 22.6 s with the cache empty and 2.9 s with it, against
    198 s for a 20-step generate. Only a cache: a failure here is one warning, and the bundle stands."""
    try:
        manifest = load_manifest(bundle)
        chunks = graph_cache_chunks(bundle, manifest)
        if not chunks:
            return
        log.info("warming onnxruntime's graph cache (%d chunks)", len(chunks))
        with tqdm(total=len(chunks), desc="warm cache", unit="chunk", disable=not progress) as bar:
            warm_graph_cache(bundle, manifest, on_chunk=lambda _chunk: bar.update())
    except Exception as exc:  # noqa: BLE001 - the bundle is complete; the first load writes the cache instead
        log.warning("onnxruntime's graph cache not warmed (%s: %s): the first load of %s will take longer",
                    type(exc).__name__, " ".join(str(exc).split()), bundle)


def _prepare(spec: ComponentSpec, model: Any, dims: Dims, preset: Preset, seed: int, scratch: Path) -> Prepared:
    """Attention form (every backend), then the backend's lossy step (CoreML compression, ONNX weight quantization),
    before capture and cut so that chunks balance by their stored bytes. ``scratch``: the export's staging folder,
    for the step's large temporary files (the mixed-bit search's spill: beside the bundle, not in a /tmp that may
    be memory)."""
    from pocketsd.export.components.attention import set_attention

    set_attention(model, preset.attention.form, slice_mb=preset.attention.slice_mb)
    return backend_for(preset.backend).prepare(spec, model, dims, preset, seed, scratch)


def _write_with_torch(component_id: str, model: Any, dims: Dims, request: ExportRequest,
                      staging: Path) -> WrittenComponent:
    """Prepare, capture and write one component's chunks: every torch object of the component lives and dies here."""
    preset = request.preset
    spec = component_spec(component_id, model, dims, preset)
    prepared = _prepare(spec, model, dims, preset, request.seed, staging)
    captured = capture(spec, prepared.model, dims, seed=request.seed,
                       shared_prefix=preset.split_for(spec.settings_id).shared_prefix)
    written = write_component(captured, preset, staging, progress=request.progress,
                              weight_bytes=prepared.weight_bytes, compressed=prepared.compressed,
                              extra={**prepared.extra, **_tiling_extra(spec, dims)})
    written.fp32 = prepared.fp32
    return written


def _export_into(folder: ModelFolder, source: dict[str, Any], request: ExportRequest, staging: Path,
                 loras: tuple[LoraFile, ...]) -> Manifest:
    preset = request.preset
    dims = resolve_dims(folder, preset)
    components, plans = {}, {}
    order = export_components(preset, dims)
    bar = tqdm(total=len(order), desc="export", unit="component", disable=not request.progress)
    kept: dict[str, Any] = {}
    with bar:
        for index, component_id in enumerate(order):
            bar.set_postfix_str(component_id)
            written = _write_with_torch(component_id, _module_for(folder, order, index, kept, loras), dims,
                                        request, staging)
            gc.collect()  # the model's last references sit in reference cycles (fx graphs, exported programs)
            components[component_id] = check_component(written, staging, progress=request.progress)
            plans[component_id] = written.plan.to_dict()
            bar.update()
    vae = folder.config("vae")
    return Manifest(
        schema_version=SCHEMA_VERSION,
        model={**source, "pipeline": folder.model_index.get("_class_name"),
               "family": folder.family, **_conditioning(folder),
               "weights_variants": {sub: folder.variants.get(sub) for sub in sorted(folder.variants)},
               "loras": [lora.to_dict() for lora in loras]},
        target={"preset": preset.name, "preset_source": preset.source, "backend": preset.backend,
                "precision": preset.precision, "config": preset.to_dict()},
        dims={"height": dims.height, "width": dims.width, "latent_height": dims.latent_height,
              "latent_width": dims.latent_width, "latent_channels": dims.latent_channels,
              "unet_in_channels": dims.unet_sample_channels,
              "vae_scale_factor": dims.vae_scale_factor, "text_length": dims.text_length,
              "text_hidden": dims.text_hidden, "vocab_size": dims.vocab_size, "unet_batch": dims.unet_batch,
              **({"text_hidden_1": dims.text_hidden_1, "text_hidden_2": dims.text_hidden_2,
                  "pooled_dim": dims.pooled_dim} if dims.text_hidden_2 else {}),
              **({"time_cond_dim": dims.time_cond_dim} if dims.time_cond_dim else {})},
        latent_scaling_factor=float(vae.get("scaling_factor", 0.18215)),
        tokenizer=write_tokenizer(folder, staging, dims.text_length),
        scheduler={"class_name": folder.scheduler_config.get("_class_name"),
                   "config": {k: v for k, v in folder.scheduler_config.items()}},
        components=components,
        plan=file_ref(staging, write_plan(staging, plans)),
        created_by=f"pocketsd {__version__}",
    )
