"""An export killed outright (SIGKILL: no cleanup runs) at 4 points spread over its duration (one in each quarter)
never leaves anything at --out but a complete bundle, never a folder beside it that reads as a bundle, and the same
export run again succeeds and removes what the killed ones left (pocketsd/staging.py)."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pocketsd.errors import BundleError
from pocketsd.runtime.manifest import load_manifest
from pocketsd.runtime.sessions import verify_chunk
from pocketsd.staging import abandoned_staging

pytest.importorskip("torch")
pytestmark = [pytest.mark.export, pytest.mark.slow]

KILLS = 4
LANES = 2  # exports run two at a time (one per core here), each lane in its own folder
SEED = 20261205


# Two components, not four: what is checked (staging, rename, leftovers) is the same for any export, and 4 kills of
# a shorter export keep `make test` short. The text encoder is cut in two, so the bundle has several chunk files.
PRESET = "backend: onnx\ncomponents: [text_encoder, vae_decoder]\nsplit:\n  text_encoder: {n_chunks: 2}\n"


def command(model: Path, out: Path) -> list[str]:
    preset = out.parent / "kill-preset.yaml"
    if not preset.exists():
        preset.write_text(PRESET)
    return [sys.executable, "-m", "pocketsd.cli", "export", "--quiet", "--no-warm-cache", "--preset", str(preset),
            "--model", str(model), "--out", str(out)]


ENV = {**os.environ, "POCKETSD_NO_CACHE": "1"}  # no per-user cache entries written by processes killed mid-way


def complete(bundle: Path) -> bool:
    """Whether ``bundle`` reads and every chunk file matches its sha256."""
    manifest = load_manifest(bundle)
    for component in manifest.components.values():
        for chunk in component.chunks:
            verify_chunk(bundle, chunk, disk_cache=False)
    return True


def check_after_kill(lane: Path, out: Path) -> dict[str, int]:
    """The invariants after one kill; returns what was found, for the summary."""
    seen = {"finished": 0, "left": 0, "left_with_manifest": 0}
    if out.exists():
        assert complete(out), f"{out} exists but is not a complete bundle"
        seen["finished"] = 1
        shutil.rmtree(out)  # as a user would before exporting there again
    for entry in lane.iterdir():
        if entry.name == "kill-preset.yaml":
            continue
        assert entry.name.startswith(f".{out.name}.partial-"), f"unexpected {entry} beside {out}"
        assert abandoned_staging(entry), f"{entry} is not recognised as left by a killed export"
        with pytest.raises(BundleError, match="interrupted"):
            load_manifest(entry)  # it never reads as a bundle, even with a manifest written in it
        seen["left"] += 1
        seen["left_with_manifest"] += (entry / "manifest.json").exists()
    return seen


def run_lane(model: Path, lane: Path, delays: list[float], results: list, errors: list) -> None:
    out = lane / "bundle"
    try:
        for delay in delays:
            proc = subprocess.Popen(command(model, out), env=ENV, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL)
            time.sleep(delay)
            proc.kill()  # SIGKILL, this very process only
            proc.wait()
            results.append((delay, check_after_kill(lane, out)))
        rerun = subprocess.run(command(model, out), env=ENV, capture_output=True, text=True)
        assert rerun.returncode == 0, rerun.stderr
        assert complete(out)
        assert sorted(p.name for p in lane.iterdir()) == sorted([out.name, "kill-preset.yaml"]), \
            "the re-run left staging folders"
    except BaseException as exc:  # noqa: BLE001 - reported by the test thread
        errors.append(exc)


def timed_exports(model: Path, root: Path) -> float:
    """One full export per lane, at the same time (as the kills run): their mean wall time."""
    def one(i: int) -> None:
        out = root / f"timing-{i}"
        start = time.perf_counter()
        subprocess.run(command(model, out), env=ENV, check=True, capture_output=True)
        times.append(time.perf_counter() - start)
        assert complete(out)

    times: list[float] = []
    threads = [threading.Thread(target=one, args=(i,)) for i in range(LANES)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(times) == LANES
    return sum(times) / len(times)


def test_sigkill_at_random_points_leaves_no_bundle_lookalike(tiny_model_dir: Path, tmp_path: Path):
    duration = timed_exports(tiny_model_dir, tmp_path)
    rng = random.Random(SEED)
    # stratified: one kill in each KILLS-th of the export's duration, at a random point within it
    delays = [duration * (i + rng.random()) / KILLS for i in range(KILLS)]
    rng.shuffle(delays)
    results: list = []
    errors: list = []
    lanes = [tmp_path / f"lane-{i}" for i in range(LANES)]
    threads = []
    for i, lane in enumerate(lanes):
        lane.mkdir()
        threads.append(threading.Thread(target=run_lane, args=(tiny_model_dir, lane, delays[i::LANES], results,
                                                                   errors)))
        threads[-1].start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    assert len(results) == KILLS
    left = sum(seen["left"] for _, seen in results)
    print(f"export {duration:.1f} s; {KILLS} kills: {sum(s['finished'] for _, s in results)} after the bundle was "
          f"in place, {left} staging folders left ({sum(s['left_with_manifest'] for _, s in results)} with a "
          "manifest), all removed by the re-runs")
