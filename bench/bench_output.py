"""What ``pocketsd bench`` writes: ``result.json`` (everything), ``result.md`` (tables and the ratios that matter)
and ``chart.png`` (UNet call time per contender and resolution, with the spread of the calls)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

POCKETSD = "pocketsd"


def _s(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f} s"


def _median(row: dict[str, Any]) -> float | None:
    return row.get("unet_call_s", {}).get("median")


def _state(row: dict[str, Any]) -> str:
    if row.get("skipped"):
        return f"skipped: {row['skipped']}"
    if row.get("error"):
        return f"FAILED: {row['error']}"
    return f"FAILED generate: {row['generate_error']}" if row.get("generate_error") else "ok"


def _rate(row: dict[str, Any], gflop: float | None, ceiling: float) -> str:
    """GFLOP/s of the median UNet call, and its share of ``ceiling``: the fp32 MatMul's, never compared with a bf16
    engine (a ``ceiling`` of 0 for those: the bf16 MatMul was not measured there)."""
    median = _median(row)
    if not (median and gflop):
        return "-"
    rate = gflop / median
    if "bf16" in str(row.get("engine")):
        return f"{rate:.0f} ({100 * rate / ceiling:.0f}% of bf16)" if ceiling else f"{rate:.0f} (bf16)"
    return f"{rate:.0f} ({100 * rate / ceiling:.0f}%)"


def _row_line(row: dict[str, Any], gflop: float | None, ceiling: float) -> str:
    call = row.get("unet_call_s")
    spread = f"{call['median']:.3f} s ({call['min']:.3f}–{call['max']:.3f})" if call else "-"
    gflops = _rate(row, gflop, 0 if "bf16" in str(row.get("engine")) else ceiling)
    rss = "/".join(f"{row[k] / 1e3:.1f}" if row.get(k) else "-" for k in ("peak_rss_calls_mb", "peak_rss_generate_mb"))
    disk = f"{row['bundle_disk_bytes'] / 1e9:.2f} GB" if row.get("bundle_disk_bytes") else "-"
    agreement = row.get("vs_reference")
    same = "-" if not agreement else ("identical" if agreement["psnr_db"] is None else
                                      f"{agreement['max_abs']:.1e} max abs, {agreement['psnr_db']:.0f} dB")
    return (f"| {row['contender']} | {row.get('unet_chunks', '-')} | {_s(row.get('cold_load_s'))} | "
            f"{_s(row.get('warm_load_s'))} | {spread} | {gflops} | {same} | {_s(row.get('generate_s'), 1)} | "
            f"{rss} GB | {disk} | {row.get('group') or '-'} | {_state(row)} |")


def _reference(size: dict[str, Any]) -> str:
    return next((r["vs_reference"]["reference"] for r in size["rows"] if r.get("vs_reference")), "reference")


def _peer_line(best: str, ours: dict[str, Any], name: str, row: dict[str, Any]) -> str:
    """The peer's median call over the fastest pocketsd contender's, from the calls that interleaved with its own (a
    pace worker beside it: race.py) when there were any."""
    pace = row.get("vs_fastest")
    if pace and pace.get("interleaved") and pace.get("contender") == best:
        orders = pace.get("by_load_order", [])
        each = f"; by load order {' / '.join(f'{r:.2f}×' for r in orders)}" if len(orders) > 1 else ""
        return (f"- {best} vs {name}: **{pace['ratio']:.2f}×** faster (interleaved: {pace['pocketsd_median_s']:.3f} s "
                f"beside its {pace['peer_median_s']:.3f} s{each})")
    return (f"- {best} vs {name}: **{_median(row) / _median(ours):.2f}×** faster (not interleaved: it ran in another "
            "group)")


def _ratios(size: dict[str, Any]) -> list[str]:
    """The ratios the issue asks for: pocketsd's fastest engine against every peer, chunked against unchunked."""
    rows = {r["contender"]: r for r in size["rows"] if _median(r)}
    ours = {n: r for n, r in rows.items() if r["kind"] == POCKETSD}
    if not ours:
        return ["- no pocketsd contender finished"]
    best = min(ours, key=lambda n: _median(ours[n]))
    lines = [f"- fastest pocketsd: **{best}** ({_median(ours[best]):.3f} s per UNet call)"]
    for name, row in rows.items():
        if row["kind"] != POCKETSD:
            lines.append(_peer_line(best, ours[best], name, row))
    for name, row in ours.items():
        whole = rows.get(f"{name}-1chunk")
        if whole and not name.endswith("-1chunk"):
            apart = "" if row.get("group") == whole.get("group") else " (not interleaved: they ran in different groups)"
            lines.append(f"- chunked ({row.get('unet_chunks')} UNet chunks) vs unchunked, {row['engine']}: "
                         f"**{_median(row) / _median(whole):.3f}×** the unchunked time{apart}")
    for name, row in ours.items():
        if row.get("generate_s") and row.get("cold_load_s"):
            share = 100 * row["cold_load_s"] / row["generate_s"]
            later = f", in a later process {row['load_new_process_s']:.2f} s" if row.get("load_new_process_s") else ""
            fresh = row.get("first_load_no_cache_s")
            uncached = f", first load on a machine without its cache {fresh:.2f} s" if fresh else ""
            lines.append(f"- {name}: cold start {row['cold_load_s']:.2f} s = {share:.1f}% of its end-to-end run; "
                         f"reload in the same process {row['warm_load_s']:.2f} s{later}{uncached}")
    return lines


def _load_order_line(orders: int) -> str:
    if orders < 2:
        return "Each group of workers ran once (`--load-orders 1`): the worker loaded first may read slower."
    return ("Each group of workers ran twice, loaded in one order and then the reverse; a median is the geometric mean "
            "of the two runs' medians (bench/race.py: on the box it was written on, the worker loaded first read 8–20% "
            "slower).")


def markdown(result: dict[str, Any], command: str) -> str:
    m = result["machine"]
    ceiling = max(c["gflops"] for c in result["matmul_ceiling"])
    lines = [f"# pocketsd bench: {result['model']}, preset {result['preset']}", "",
             f"`{command}`", "",
             f"Machine: {m['cpu']}, {m['logical_cores']} logical cores ({m['physical_cores']} physical), "
             f"{m['memory_gb']} GB; ISA: {' '.join(m['isa_flags'])}; {m['os']}, Python {m['python']}.",
             "Versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()) + ".",
             f"Large fp32 MatMul (onnxruntime, {result['matmul_ceiling'][0]['size']}³): "
             + " / ".join(f"{c['gflops']:.0f}" for c in result["matmul_ceiling"]) + " GFLOP/s (start / end of run).",
             f"Threads: {result['threads'] or 'all cores'}; UNet calls: {result['warmup']} warm-up, then "
             f"{result['calls']} per contender, interleaved; end to end: {result['steps']} steps, euler, guidance 7.5.",
             _load_order_line(result.get("load_orders", 1)), ""]
    for size in result["resolutions"]:
        gflop = size.get("unet_gflop_per_call")
        lines += [f"## {size['size']}×{size['size']}" + (f" (UNet call: {gflop:.4g} GFLOP)" if gflop else ""), "",
                  "| contender | UNet chunks | cold load | warm load | UNet call, median (min–max) | GFLOP/s (% of "
                  f"MatMul) | output vs {_reference(size)} | generate {result['steps']} steps | "
                  "peak RSS calls/generate | on disk | group | state |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [_row_line(r, gflop, ceiling) for r in size["rows"]]
        lines += ["", *_ratios(size)]
        for uses, bundle in size["bundles"].items():
            export = bundle.get("export", {})
            cost = export.get("reused") or (f"{export['wall_s']:.0f} s, peak RSS {export['peak_rss_mb'] / 1e3:.1f} GB"
                                            if "wall_s" in export else "-")
            lines.append(f"- export of the {uses} bundle: {cost}" + (f" — {bundle['error']}" if "error" in bundle
                                                                      else ""))
        lines.append("")
    if "batch_one" in result:
        lines += _batch_one_lines(result["batch_one"], ceiling)
    return "\n".join(lines)


def _batch_one_lines(section: dict[str, Any], ceiling: float) -> list[str]:
    """pocketsd's chunked UNet at batch 1: its GFLOP/s against the MatMul ceiling measured just before and after
    these calls (the issue's 85% target), fp32 engines against the fp32 MatMul, bf16 ones against OpenVINO's bf16."""
    gflop = section.get("unet_gflop_per_call")
    ceilings = {engine: max(c["gflops"] for c in runs) for engine, runs in section.get("matmul_ceiling", {}).items()}
    fp32 = ceilings.get("onnxruntime", ceiling)
    lines = [f"## {section['size']}×{section['size']}, UNet batch 1" + (f" (UNet call: {gflop:.4g} GFLOP)" if gflop
                                                                         else ""), ""]
    if ceilings:
        lines += ["Large MatMul just before and after these calls: " + "; ".join(
            f"{engine} " + " / ".join(f"{c['gflops']:.0f}" for c in runs) + " GFLOP/s"
            for engine, runs in section["matmul_ceiling"].items()), ""]
    lines += ["| contender | UNet chunks | UNet call, median (min–max) | GFLOP/s (% of MatMul) | state |",
              "|---|---|---|---|---|"]
    for row in section["rows"]:
        call = row.get("unet_call_s")
        spread = f"{call['median']:.3f} s ({call['min']:.3f}–{call['max']:.3f})" if call else "-"
        bf16 = "bf16" in str(row.get("engine"))
        rate = _rate(row, gflop, ceilings.get("openvino-bf16", 0) if bf16 else fp32)
        lines.append(f"| {row['contender']} | {row.get('unet_chunks', '-')} | {spread} | {rate} | {_state(row)} |")
    export = section["bundles"].get("batch1", {}).get("export", {})
    if "wall_s" in export:
        lines += ["", f"- export of the batch-1 bundle: {export['wall_s']:.0f} s, peak RSS "
                      f"{export['peak_rss_mb'] / 1e3:.1f} GB"]
    return [*lines, ""]


def chart(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = result["resolutions"]
    fig, axes = plt.subplots(1, len(sizes), figsize=(6.5 * len(sizes), 0.55 * len(result["contenders"]) + 1.8),
                             squeeze=False)
    for ax, size in zip(axes[0], sizes):
        rows = size["rows"]
        names = [r["contender"] for r in rows]
        medians = [_median(r) or 0.0 for r in rows]
        low = [m - r["unet_call_s"]["min"] if _median(r) else 0 for m, r in zip(medians, rows)]
        high = [r["unet_call_s"]["max"] - m if _median(r) else 0 for m, r in zip(medians, rows)]
        colors = ["tab:blue" if r["kind"] == POCKETSD else "tab:gray" for r in rows]
        ax.barh(names, medians, xerr=[low, high], color=colors, capsize=3)
        for i, r in enumerate(rows):  # the label right of the bar's whisker, where no bar or whisker covers it
            label = f"{medians[i]:.2f} s" if _median(r) else ("skipped" if r.get("skipped") else "failed")
            ax.text(medians[i] + high[i], i, f" {label}", va="center", fontsize=8)
        ax.set_xlim(right=max(m + h for m, h in zip(medians, high)) * 1.15 or 1.0)
        ax.invert_yaxis()
        ax.set_xlabel("seconds per UNet call (median; bars: min–max)")
        ax.set_title(f"{size['size']}×{size['size']}, UNet batch {_batch(size)}")
    fig.suptitle(f"pocketsd bench: {Path(result['model']).name} on {result['machine']['cpu']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _batch(size: dict[str, Any]) -> Any:
    return next((b["dims"]["unet_batch"] for b in size["bundles"].values() if "dims" in b), "?")


def write_results(result: dict[str, Any], out: Path, command: str) -> None:
    """result.json, result.md and chart.png in ``out``, each written whole (temporary file, then renamed)."""
    out.mkdir(parents=True, exist_ok=True)
    for name, write in (("result.json", lambda p: p.write_text(json.dumps(result, indent=2) + "\n")),
                        ("result.md", lambda p: p.write_text(markdown(result, command) + "\n")),
                        ("chart.png", lambda p: chart(result, p))):
        temporary = out / f".{name}.tmp{Path(name).suffix}"
        write(temporary)
        os.replace(temporary, out / name)
