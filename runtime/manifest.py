"""The bundle manifest: the one contract between exporter, runtime, bench and apple/.

A bundle is a folder with ``manifest.json``. Everything a reader needs is in it: which chunk files exist and their
sha256, each chunk's inputs and outputs (name, dtype, shape), and for every chunk input where its value comes from:
``input:<component input>`` or ``<chunk id>:<output name>``. Nothing is found by file-name conventions.

Component ``extra`` entries a reader acts on:

``tiling``  (``vae_decoder``, ``vae_encoder``) the component was exported at one tile's size and is run over
    overlapping tiles of the image, blended (:mod:`pocketsd.runtime.tiling`)::

        "tiling": {"space": "latent", "tile_height": 32, "tile_width": 32, "overlap": 8}

    Sizes are in latent pixels: the decoder's ``z`` is ``[1, C, tile_height, tile_width]`` and the encoder's ``x``
    ``vae_scale_factor`` times that in pixels; ``overlap`` latent pixels are shared by neighbouring tiles. The
    manifest's ``dims`` keep the whole image's sizes. Absent: the component takes the whole latent / image.

    ``"group_norm": "tile"`` (or absent): each tile is normalized with its own GroupNorm statistics, one pass.
    ``"group_norm": "image"``: the runtime makes two passes over the tiles, and the entry names three more tensors
    of the component::

        "group_norm": "image", "stats_input": "gn_stats", "use_stats_input": "gn_use_stats",
        "stats_output": "gn_tile_stats"

    ``stats_input`` float32 ``[n_norms, 1, groups, 2]`` (each GroupNorm's mean and mean square per group) is what
    the GroupNorms normalize with when ``use_stats_input`` (float32 ``[1]``) is 1; at 0 they use the tile's own.
    ``stats_output`` (shaped as ``stats_input``) is the tile's own statistics in that pass. Pass 1 runs every tile
    with 0 and collects them, pass 2 runs every tile with 1 and their average over the tiles.

    ``"head": "<component id>"``: that component (untiled, one input, one output) first runs once on the whole
    latent, and its output, not the latent, is what the tiles cut: the tiled component's first input has the
    head's output channels (the decoder's head is its mid block, export/components/vae_decoder.py).

This module is torch-free: the exporter builds these dataclasses and writes them, the runtime reads them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pocketsd.errors import BundleError

FORMAT = "pocketsd-bundle"
SCHEMA_VERSION = "1.1"  # 1.1: chunks may carry an optimized graph (ignored by 1.0 readers)
MANIFEST_NAME = "manifest.json"
DTYPES = ("float32", "float16", "int64", "int32", "bool")  # bool: e.g. a causal mask crossing a text-encoder cut
DTYPE_BYTES = {"float32": 4, "float16": 2, "int64": 8, "int32": 4, "bool": 1}
CHUNK_FORMATS = ("onnx", "mlpackage")


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor at a static shape. ``source`` is set on chunk inputs and component outputs."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    source: str | None = None

    @property
    def nbytes(self) -> int:
        size = 1
        for dim in self.shape:
            size *= dim
        return size * DTYPE_BYTES[self.dtype]


@dataclass(frozen=True)
class FileRef:
    """A file (or an .mlpackage folder) of the bundle, relative to the bundle root."""

    path: str
    sha256: str
    bytes: int


@dataclass(frozen=True)
class Parity:
    """How far an exported chunk or component is from PyTorch on seeded inputs."""

    psnr_db: float
    max_abs: float
    min_psnr_db: float


@dataclass(frozen=True)
class OptimizedGraph:
    """An ONNX chunk's graph as an engine's optimizer left it, stored at export so that opening skips that work.

    Only ``engine`` at exactly ``version`` may use it (it holds that engine's own operators); any other reads the
    chunk's ``file``. Its tensors live in the chunk's ``data_files``, except those the optimizer made: ``data_files``
    here (export/onnx_optimized.py)."""

    engine: str
    version: str
    level: str
    file: FileRef
    data_files: tuple[FileRef, ...] = ()


@dataclass(frozen=True)
class Chunk:
    id: str
    format: str
    file: FileRef
    weight_bytes: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    modules: tuple[str, ...]
    data_files: tuple[FileRef, ...] = ()
    parity: Parity | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    optimized: OptimizedGraph | None = None

    @property
    def files(self) -> tuple[FileRef, ...]:
        """Every file of the chunk: its graph, its data, and its optimized graph's files."""
        optimized = () if self.optimized is None else (self.optimized.file, *self.optimized.data_files)
        return (self.file, *self.data_files, *optimized)


@dataclass(frozen=True)
class Component:
    id: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    chunks: tuple[Chunk, ...]
    parity: Parity | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def chunk(self, chunk_id: str) -> Chunk:
        for chunk in self.chunks:
            if chunk.id == chunk_id:
                return chunk
        raise BundleError(f"component {self.id!r} has no chunk {chunk_id!r}")


@dataclass(frozen=True)
class Manifest:
    schema_version: str
    model: dict[str, Any]
    target: dict[str, Any]
    dims: dict[str, int]
    latent_scaling_factor: float
    tokenizer: dict[str, Any]
    scheduler: dict[str, Any]
    components: dict[str, Component]
    plan: FileRef | None = None
    created_by: str = ""

    def component(self, component_id: str) -> Component:
        try:
            return self.components[component_id]
        except KeyError:
            raise BundleError(
                f"the bundle has no {component_id!r} component",
                f"it has: {', '.join(self.components)}; re-export with that component enabled",
            ) from None

    def all_files(self) -> list[FileRef]:
        files: list[FileRef] = list(self.tokenizer.get("files", {}).values())
        if self.plan is not None:
            files.append(self.plan)
        for component in self.components.values():
            for chunk in component.chunks:
                files.extend(chunk.files)
        return files

    def to_dict(self) -> dict[str, Any]:
        body = asdict(self)
        return {"format": FORMAT, **body}

    def write(self, bundle_dir: Path) -> Path:
        path = Path(bundle_dir) / MANIFEST_NAME
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n")
        return path


# ---------------------------------------------------------------------------------------------------------------
# Reading


def _tensor(d: dict[str, Any]) -> TensorSpec:
    return TensorSpec(name=d["name"], dtype=d["dtype"], shape=tuple(int(x) for x in d["shape"]), source=d.get("source"))


def _file(d: dict[str, Any]) -> FileRef:
    return FileRef(path=d["path"], sha256=d["sha256"], bytes=int(d["bytes"]))


def _parity(d: dict[str, Any] | None) -> Parity | None:
    return None if d is None else Parity(**d)


def _optimized(d: dict[str, Any] | None) -> OptimizedGraph | None:
    if d is None:
        return None
    return OptimizedGraph(engine=str(d["engine"]), version=str(d["version"]), level=str(d["level"]),
                          file=_file(d["file"]), data_files=tuple(_file(f) for f in d.get("data_files", ())))


def _chunk(d: dict[str, Any]) -> Chunk:
    return Chunk(
        id=d["id"],
        format=d["format"],
        file=_file(d["file"]),
        weight_bytes=int(d["weight_bytes"]),
        inputs=tuple(_tensor(t) for t in d["inputs"]),
        outputs=tuple(_tensor(t) for t in d["outputs"]),
        modules=tuple(d.get("modules", ())),
        data_files=tuple(_file(f) for f in d.get("data_files", ())),
        parity=_parity(d.get("parity")),
        extra=dict(d.get("extra", {})),
        optimized=_optimized(d.get("optimized")),
    )


def _component(d: dict[str, Any]) -> Component:
    return Component(
        id=d["id"],
        inputs=tuple(_tensor(t) for t in d["inputs"]),
        outputs=tuple(_tensor(t) for t in d["outputs"]),
        chunks=tuple(_chunk(c) for c in d["chunks"]),
        parity=_parity(d.get("parity")),
        extra=dict(d.get("extra", {})),
    )


def manifest_from_dict(d: dict[str, Any], where: str = MANIFEST_NAME) -> Manifest:
    if d.get("format") != FORMAT:
        raise BundleError(f"{where} is not a pocketsd bundle manifest (format={d.get('format')!r})")
    version = str(d.get("schema_version", ""))
    major = version.split(".")[0]
    if major != SCHEMA_VERSION.split(".")[0]:
        raise BundleError(
            f"{where} has manifest schema {version!r}; this pocketsd reads {SCHEMA_VERSION.split('.')[0]}.x",
            "install the pocketsd version that wrote the bundle, or re-export it with this one",
            code="bundle-version",
        )
    try:
        manifest = Manifest(
            schema_version=version,
            model=dict(d["model"]),
            target=dict(d["target"]),
            dims={k: int(v) for k, v in d["dims"].items()},
            latent_scaling_factor=float(d["latent_scaling_factor"]),
            tokenizer={**d["tokenizer"], "files": {k: _file(v) for k, v in d["tokenizer"].get("files", {}).items()}},
            scheduler=dict(d["scheduler"]),
            components={k: _component(v) for k, v in d["components"].items()},
            plan=_file(d["plan"]) if d.get("plan") else None,
            created_by=str(d.get("created_by", "")),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise BundleError(f"{where} is malformed: {type(exc).__name__}: {exc}", "re-export the bundle") from None
    check_wiring(manifest, where)
    return manifest


def load_manifest(bundle_dir: str | Path) -> Manifest:
    """Read and validate ``manifest.json``; checks that every file it names is present (not yet their hashes)."""
    root = Path(bundle_dir)
    path = root / MANIFEST_NAME
    if not root.is_dir():
        raise BundleError(f"bundle folder {root} does not exist", "pass the --out folder of `pocketsd export`")
    if not path.is_file():
        raise BundleError(f"{path} is missing: {root} is not a pocketsd bundle", "pass the --out folder of an export")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path} is not valid JSON ({exc})", "re-export the bundle") from None
    manifest = manifest_from_dict(data, str(path))
    for ref in manifest.all_files():
        if not (root / ref.path).exists():
            raise BundleError(f"{root / ref.path} is missing (named in {path})", "re-export or re-copy the bundle")
    return manifest


def check_wiring(manifest: Manifest, where: str = MANIFEST_NAME) -> None:
    """Every chunk input is bound to a component input or an earlier chunk's output of the same dtype and shape."""
    for component in manifest.components.values():
        known: dict[str, TensorSpec] = {f"input:{t.name}": t for t in component.inputs}
        for chunk in component.chunks:
            if chunk.format not in CHUNK_FORMATS:
                raise BundleError(f"{where}: chunk {chunk.id} has unknown format {chunk.format!r}")
            for spec in chunk.inputs:
                _check_bound(where, chunk.id, spec, known)
            for spec in chunk.outputs:
                known[f"{chunk.id}:{spec.name}"] = spec
        for spec in component.outputs:
            _check_bound(where, f"{component.id} (output)", spec, known)


def _check_bound(where: str, owner: str, spec: TensorSpec, known: dict[str, TensorSpec]) -> None:
    if spec.dtype not in DTYPES:
        raise BundleError(f"{where}: {owner} tensor {spec.name!r} has unknown dtype {spec.dtype!r}")
    source = known.get(spec.source or "")
    if source is None:
        raise BundleError(
            f"{where}: {owner} input {spec.name!r} comes from {spec.source!r}, which no component input or earlier "
            "chunk provides",
            "the manifest is inconsistent; re-export the bundle",
        )
    if source.shape != spec.shape or source.dtype != spec.dtype:
        raise BundleError(
            f"{where}: {owner} input {spec.name!r} is {spec.dtype}{list(spec.shape)} but {spec.source} is "
            f"{source.dtype}{list(source.shape)}",
            "the manifest is inconsistent; re-export the bundle",
        )
