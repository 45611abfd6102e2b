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

A chunk with ``"per_row": true`` (schema 1.2) was exported at batch 1: its inputs and outputs are listed at one row,
it is run for each row of the tensors that feed it (once for rows that are equal), and its readers see its outputs
stacked to that batch (runtime/per_row.py; the exporter makes one of a guided UNet's shared prefix).

This module is torch-free: the exporter builds these dataclasses and writes them, the runtime reads them.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from pocketsd.contract import DTYPE_BYTES, DTYPES  # noqa: F401  (re-exported: others import them from here)
from pocketsd.errors import BundleError
from pocketsd.runtime.json_fields import Field, kind
from pocketsd.staging import abandoned_staging

FORMAT = "pocketsd-bundle"
# 1.1: chunks may carry an optimized graph (ignored by 1.0 readers). 1.2: a chunk may be ``per_row`` (a 1.1 reader
# refuses such a bundle at its wiring check: the chunk's one-row shapes do not match what feeds it)
SCHEMA_VERSION = "1.2"
MANIFEST_NAME = "manifest.json"
SECOND_TOKENIZER = "text_encoder_2"  # the tokenizer entry's key for SDXL's second tokenizer (see _tokenizer)
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
    here (export/backends/onnx/optimized.py)."""

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
    # Exported at batch 1 and run once per row of the component's batch, once for rows whose inputs are equal
    # (runtime/per_row.py); its inputs and outputs are listed at batch 1, what feeds it and reads it at the batch.
    per_row: bool = False

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
        files.extend(self.tokenizer.get(SECOND_TOKENIZER, {}).get("files", {}).values())
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


# Every value is read through json_fields.Field, so that a damaged or hand-edited manifest (a string where a number
# belongs, a list where an object does, a missing key) is one BundleError naming the key path, never a KeyError or
# TypeError from deep inside the runtime (tests/runtime/test_manifest_fuzz.py feeds it random documents).

_SHA256 = re.compile(r"[0-9a-f]{64}")


def _tensor(f: Field) -> TensorSpec:
    dtype = f.key("dtype").str()
    if dtype not in DTYPES:
        raise f.key("dtype").fail(f"is {dtype!r}, not one of {', '.join(DTYPES)}")
    return TensorSpec(name=f.key("name").str(), dtype=dtype, shape=tuple(d.int() for d in f.key("shape").list()),
                      source=f.key("source", None).optional_str())


def bundle_path(f: Field) -> str:
    """A file path of the bundle: relative, inside it, in POSIX form. ``../x``, ``/etc/x``, ``C:\\x`` are refused
    here, before anything is opened; symlinks that lead outside are refused by ``load_manifest``."""
    text = f.str()
    parts = PurePosixPath(text).parts
    if ("\\" in text or "\0" in text or text.startswith("/") or PureWindowsPath(text).drive or ".." in parts
            or text.strip("./") == ""):
        raise f.fail(f"is {text!r}, a path outside the bundle folder",
                     "a bundle names only files inside itself; this manifest was not written by pocketsd export, "
                     "do not use it")
    return text


def _file(f: Field) -> FileRef:
    sha = f.key("sha256").str()
    if not _SHA256.fullmatch(sha):
        raise f.key("sha256").fail(f"is {sha[:80]!r}, not a sha256 in hex")
    return FileRef(path=bundle_path(f.key("path")), sha256=sha, bytes=f.key("bytes").int())


def _files(f: Field) -> tuple[FileRef, ...]:
    return tuple(_file(x) for x in f.list())


def _parity(f: Field) -> Parity | None:
    if f.value is None:
        return None  # a PSNR may be +inf (identical outputs): not required finite
    return Parity(psnr_db=f.key("psnr_db").number(finite=False), max_abs=f.key("max_abs").number(finite=False),
                  min_psnr_db=f.key("min_psnr_db").number(finite=False))


def _optimized(f: Field) -> OptimizedGraph | None:
    if f.value is None:
        return None
    return OptimizedGraph(engine=f.key("engine").str(), version=f.key("version").str(), level=f.key("level").str(),
                          file=_file(f.key("file")), data_files=_files(f.key("data_files", [])))


def _chunk(f: Field) -> Chunk:
    return Chunk(
        id=f.key("id").str(),
        format=f.key("format").str(),
        file=_file(f.key("file")),
        weight_bytes=f.key("weight_bytes").int(),
        inputs=tuple(_tensor(t) for t in f.key("inputs").list()),
        outputs=tuple(_tensor(t) for t in f.key("outputs").list()),
        modules=tuple(m.str(empty=True) for m in f.key("modules", []).list()),
        data_files=_files(f.key("data_files", [])),
        parity=_parity(f.key("parity", None)),
        extra=dict(f.key("extra", {}).obj()),
        optimized=_optimized(f.key("optimized", None)),
        per_row=f.key("per_row", False).bool(),
    )


def _component(name: str, f: Field) -> Component:
    component_id = f.key("id").str()
    if component_id != name:
        raise f.key("id").fail(f"is {component_id!r}, but the component is listed as {name!r}")
    chunks = tuple(_chunk(c) for c in f.key("chunks").list())
    ids = [c.id for c in chunks]
    if not chunks or len(set(ids)) != len(ids):
        raise f.key("chunks").fail("is empty" if not chunks else f"repeats a chunk id ({', '.join(ids)})")
    return Component(
        id=component_id,
        inputs=tuple(_tensor(t) for t in f.key("inputs").list()),
        outputs=tuple(_tensor(t) for t in f.key("outputs").list()),
        chunks=chunks,
        parity=_parity(f.key("parity", None)),
        extra=dict(f.key("extra", {}).obj()),
    )


def _tokenizer(f: Field) -> dict[str, Any]:
    """The tokenizer entry, its files as FileRefs; SDXL's second tokenizer is the same kind of entry, nested under
    ``text_encoder_2`` (the component it feeds)."""
    second = f.key(SECOND_TOKENIZER, None)
    nested = {} if second.value is None else {SECOND_TOKENIZER: _tokenizer(second)}
    return {**f.obj(), "files": {k: _file(v) for k, v in f.key("files", {}).items()}, **nested}


def manifest_from_dict(d: Any, where: str = MANIFEST_NAME) -> Manifest:
    """A manifest from parsed JSON. Anything wrong with it raises ``BundleError`` naming the key path."""
    top = Field(d, where)
    if not isinstance(d, dict):
        raise BundleError(f"{where} is not a pocketsd bundle manifest (it holds {kind(d)}, not an object)",
                          "pass the --out folder of `pocketsd export`")
    if d.get("format") != FORMAT:
        raise BundleError(f"{where} is not a pocketsd bundle manifest (format={d.get('format')!r})")
    version = d.get("schema_version")
    major = version.split(".")[0] if isinstance(version, str) else None
    if major != SCHEMA_VERSION.split(".")[0]:
        raise BundleError(
            f"{where} has manifest schema {version!r}; this pocketsd reads {SCHEMA_VERSION.split('.')[0]}.x",
            "install the pocketsd version that wrote the bundle, or re-export it with this one",
            code="bundle-version",
        )
    tokenizer = top.key("tokenizer")
    plan = top.key("plan", None)
    manifest = Manifest(
        schema_version=version,
        model=dict(top.key("model").obj()),
        target=dict(top.key("target").obj()),
        dims={k: v.int() for k, v in top.key("dims").items()},
        latent_scaling_factor=top.key("latent_scaling_factor").number(),
        tokenizer=_tokenizer(tokenizer),
        scheduler=dict(top.key("scheduler").obj()),
        components={k: _component(k, v) for k, v in top.key("components").items()},
        plan=None if plan.value is None else _file(plan),
        created_by=str(d.get("created_by", "")),
    )
    from pocketsd.runtime.wiring import check_wiring  # here: wiring.py reads this module's dataclasses

    check_wiring(manifest, where)
    return manifest


def load_manifest(bundle_dir: str | Path) -> Manifest:
    """Read and validate ``manifest.json``; checks that every file it names is present and inside the bundle, symlinks
    followed (not yet their hashes)."""
    root = Path(bundle_dir)
    path = root / MANIFEST_NAME
    if root.exists() and not root.is_dir():
        raise BundleError(f"{root} is a file, not a bundle folder", "pass the --out folder of `pocketsd export`")
    if not root.is_dir():
        raise BundleError(f"bundle folder {root} does not exist", "pass the --out folder of `pocketsd export`")
    left = abandoned_staging(root)
    if left:
        raise BundleError(f"{root} is the staging folder of an export or copy that was interrupted ({left}), not a "
                          "bundle", "delete it; the next export to the same folder also removes it")
    if not path.is_file():
        raise BundleError(f"{path} is missing: {root} is not a pocketsd bundle", "pass the --out folder of an export")
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and bad UTF-8 are ValueErrors
        raise BundleError(f"{path} is not valid JSON ({str(exc)[:120]})", "re-export the bundle") from None
    except OSError as exc:
        raise BundleError(f"cannot read {path}: {exc.strerror or exc}") from None
    manifest = manifest_from_dict(data, str(path))
    inside = root.resolve()
    for ref in manifest.all_files():
        full = root / ref.path
        if not full.exists():
            raise BundleError(f"{full} is missing (named in {path})", "re-export or re-copy the bundle")
        if not full.resolve().is_relative_to(inside):  # a symlink (of it or a folder above it) leading out
            raise BundleError(f"{full} leads outside the bundle (to {full.resolve()})",
                              "a bundle's files must lie inside its folder; copy the bundle with its files, "
                              "not links to them")
    return manifest
