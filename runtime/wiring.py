"""A manifest's wiring: every chunk input bound to a component input or an earlier chunk's output, dtypes and shapes
agreeing (per-row chunks: one row of what feeds them). ``manifest_from_dict`` runs it on every manifest it reads."""

from __future__ import annotations

from pocketsd.contract import DTYPES
from pocketsd.errors import BundleError
from pocketsd.runtime.manifest import CHUNK_FORMATS, MANIFEST_NAME, Chunk, Manifest, TensorSpec


def check_wiring(manifest: Manifest, where: str = MANIFEST_NAME) -> None:
    """Every chunk input is bound to a component input or an earlier chunk's output of the same dtype and shape."""
    for component in manifest.components.values():
        known: dict[str, TensorSpec] = {f"input:{t.name}": t for t in component.inputs}
        for chunk in component.chunks:
            if chunk.format not in CHUNK_FORMATS:
                raise BundleError(f"{where}: chunk {chunk.id} has unknown format {chunk.format!r}")
            rows = {_check_bound(where, chunk.id, spec, known, chunk.per_row) for spec in chunk.inputs}
            if chunk.per_row and len(rows) != 1:
                raise BundleError(f"{where}: per-row chunk {chunk.id} is fed batches of different sizes "
                                  f"({sorted(rows)}) or none", "the manifest is inconsistent; re-export the bundle")
            for spec in chunk.outputs:
                known[f"{chunk.id}:{spec.name}"] = _batched(where, chunk, spec, rows)
        for spec in component.outputs:
            _check_bound(where, f"{component.id} (output)", spec, known)


def _batched(where: str, chunk: Chunk, spec: TensorSpec, rows: set[int]) -> TensorSpec:
    """What a chunk's output is to its readers: itself, or for a per-row chunk its rows stacked to the batch."""
    if not chunk.per_row:
        return spec
    if not spec.shape or spec.shape[0] != 1:
        raise BundleError(f"{where}: per-row chunk {chunk.id} output {spec.name!r} is {list(spec.shape)}, not one row",
                          "the manifest is inconsistent; re-export the bundle")
    return TensorSpec(spec.name, spec.dtype, (next(iter(rows)), *spec.shape[1:]), spec.source)


def _check_bound(where: str, owner: str, spec: TensorSpec, known: dict[str, TensorSpec], per_row: bool = False
                 ) -> int:
    """Check that ``spec`` is fed by a known tensor of its dtype and shape (for a per-row chunk's input: of its
    shape but for the batch, and ``spec`` one row); returns the batch it is fed with."""
    if spec.dtype not in DTYPES:
        raise BundleError(f"{where}: {owner} tensor {spec.name!r} has unknown dtype {spec.dtype!r}")
    source = known.get(spec.source or "")
    if source is None:
        raise BundleError(
            f"{where}: {owner} input {spec.name!r} comes from {spec.source!r}, which no component input or earlier "
            "chunk provides",
            "the manifest is inconsistent; re-export the bundle",
        )
    row_fits = bool(spec.shape) and spec.shape[0] == 1 and source.shape[1:] == spec.shape[1:] and bool(source.shape)
    if (not row_fits if per_row else source.shape != spec.shape) or source.dtype != spec.dtype:
        raise BundleError(
            f"{where}: {owner} input {spec.name!r} is {spec.dtype}{list(spec.shape)} but {spec.source} is "
            f"{source.dtype}{list(source.shape)}",
            "the manifest is inconsistent; re-export the bundle",
        )
    return source.shape[0] if source.shape else 0
