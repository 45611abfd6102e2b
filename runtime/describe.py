"""What ``pocketsd inspect`` shows: a bundle's components, chunks, sizes and parity figures, from its manifest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pocketsd.runtime.manifest import Chunk, Manifest


def _chunk_row(chunk: Chunk) -> dict[str, Any]:
    return {
        "id": chunk.id, "file": chunk.file.path, "format": chunk.format, "sha256": chunk.file.sha256,
        "bytes": sum(f.bytes for f in chunk.files), "weight_bytes": chunk.weight_bytes,
        "optimized_for": f"{chunk.optimized.engine} {chunk.optimized.version}" if chunk.optimized else None,
        "psnr_db": chunk.parity.psnr_db if chunk.parity else None,
        "max_abs": chunk.parity.max_abs if chunk.parity else None,
        "modules": list(chunk.modules),
        "per_row": chunk.per_row,
        "inputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "source": t.source}
                   for t in chunk.inputs],
        "outputs": [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in chunk.outputs],
        **({"extra": chunk.extra} if chunk.extra else {}),
    }


def describe(manifest: Manifest, bundle_dir: Path) -> dict[str, Any]:
    plans = {}
    if manifest.plan is not None:
        plans = json.loads((Path(bundle_dir) / manifest.plan.path).read_text()).get("components", {})
    return {
        "bundle": str(bundle_dir), "schema_version": manifest.schema_version, "model": manifest.model,
        "target": {k: v for k, v in manifest.target.items() if k != "config"}, "dims": manifest.dims,
        "config": manifest.target.get("config", {}),
        "components": [
            {"id": c.id, "chunks": [_chunk_row(ch) for ch in c.chunks],
             "psnr_db": c.parity.psnr_db if c.parity else None, "max_abs": c.parity.max_abs if c.parity else None,
             "min_psnr_db": c.parity.min_psnr_db if c.parity else None,
             "bytes": sum(_chunk_row(ch)["bytes"] for ch in c.chunks),
             "plan": {k: plans.get(c.id, {}).get(k) for k in ("strategy", "request", "reason", "cuts")},
             **({"extra": c.extra} if c.extra else {})}
            for c in manifest.components.values()
        ],
    }


def _mb(n: int) -> str:
    return f"{n / 1e6:9.2f}"


def _db(x: float | None) -> str:
    return "        -" if x is None else f"{x:9.1f}"


def _notes(extra: dict[str, Any]) -> list[str]:
    lines = []
    compression = extra.get("compression")
    if compression:
        modes = ", ".join(f"{mode} ×{n}" for mode, n in compression["modes"].items()) or "none"
        lines.append(f"{'':<16} compression: {modes} layers; simulated PSNR {compression['psnr_db']:.1f} dB "
                     f"(PyTorch); {compression['stored_weight_bytes'] / 1e6:.2f} MB stored of "
                     f"{compression['fp32_weight_bytes'] / 1e6:.2f} MB fp32")
        mixed = compression.get("mixed_bit")
        if mixed:
            bits = ", ".join(f"{b}-bit ×{n}" for b, n in mixed["bits_histogram"].items())
            lines.append(f"{'':<16} mixed-bit: {bits}; average {mixed['average_bits']:.2f} bits")
    quantization = extra.get("quantization")
    if quantization:
        q = quantization
        block = f" (blocks of {q['block_size']})" if "block_size" in q else ""
        lines.append(f"{'':<16} quantization: {q['mode']}{block} ×{q['layers']} layers; PSNR {q['psnr_db']:.1f} dB "
                     f"vs fp32 (PyTorch, gate ≥ {q['min_psnr_db']:.1f} dB); {q['stored_weight_bytes'] / 1e6:.1f} MB "
                     f"stored of {q['fp32_weight_bytes'] / 1e6:.1f} MB fp32")
    if extra.get("parity_not_run"):
        lines.append(f"{'':<16} parity: {extra['parity_not_run']}")
    return lines


def _run_line(info: dict[str, Any]) -> str:
    """How the bundle runs: memory policy and attention form (its preset's), VAE tiles (the decoder's own record)."""
    config = info.get("config", {})
    attention = config.get("attention") or {}
    tiling = next((c.get("extra", {}).get("tiling") for c in info["components"] if c["id"] == "vae_decoder"), None)
    parts = [f"memory {config.get('runtime', {}).get('memory', 'resident')}",
             f"attention {attention.get('form', 'original')}"
             + (f" (score blocks ≤ {attention['slice_mb']:g} MiB)" if attention.get("form") == "sliced" else ""),
             f"VAE in {tiling['tile_height']}×{tiling['tile_width']} latent tiles, overlap {tiling['overlap']}"
             + (", whole-image GroupNorm statistics (2 passes)" if tiling.get("group_norm") == "image" else "")
             + (f", decoder's mid block whole ({tiling['head']})" if tiling.get("head") else "")
             if tiling else "VAE untiled"]
    optimized = sorted({ch["optimized_for"] for c in info["components"] for ch in c["chunks"] if ch["optimized_for"]})
    if optimized:
        parts.append(f"graphs optimized at export for {', '.join(optimized)}")
    return "run      " + ", ".join(parts)


def format_table(info: dict[str, Any]) -> str:
    dims, target = info["dims"], info["target"]
    lines = [
        f"bundle   {info['bundle']}  (manifest {info['schema_version']})",
        f"model    {info['model'].get('name')}  ({info['model'].get('source')})",
        f"target   preset {target.get('preset')}, backend {target.get('backend')}, precision {target.get('precision')}",
        f"dims     {dims['height']}x{dims['width']} image, {dims['latent_height']}x{dims['latent_width']} latent, "
        f"UNet batch {dims['unet_batch']}, text {dims['text_length']} tokens",
        _run_line(info),
        "",
        f"{'chunk':<16} {'format':<9} {'file MB':>9} {'weights MB':>10} {'PSNR dB':>9} {'max abs':>10}  modules",
    ]
    for comp in info["components"]:
        for ch in comp["chunks"]:
            mods = ", ".join(ch["modules"][:3]) + (" …" if len(ch["modules"]) > 3 else "")
            mods = f"(run once per distinct row) {mods}" if ch["per_row"] else mods
            max_abs = "-" if ch["max_abs"] is None else f"{ch['max_abs']:.2e}"
            lines.append(f"{ch['id']:<16} {ch['format']:<9} {_mb(ch['bytes'])} {_mb(ch['weight_bytes']):>10} "
                         f"{_db(ch['psnr_db'])} {max_abs:>10}  {mods}")
        max_abs = "-" if comp["max_abs"] is None else f"{comp['max_abs']:.2e}"
        needs = "" if comp["min_psnr_db"] is None else f"needs ≥ {comp['min_psnr_db']} dB"
        lines.append(f"{comp['id'] + ' (all)':<16} {'':<9} {_mb(comp['bytes'])} {'':>10} {_db(comp['psnr_db'])} "
                     f"{max_abs:>10}  {needs}".rstrip())
        if comp["plan"].get("reason"):
            lines.append(f"{'':<16} plan: {comp['plan']['reason']}")
        lines += _notes(comp.get("extra", {}))
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
