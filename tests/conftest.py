"""Shared fixtures. Expensive artifacts (the tiny model, its bundle) are built once per test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Each pytest-xdist worker gets its share of the cores for OpenMP (torch's intra-op threads, in the worker and in the
# processes it starts). With torch's default of every core in each of two workers on a 2-core box, its threads
# wait on each other at every parallel region while the other worker holds a core: a tiny txt2img parity test took
# 8 s beside a busy core instead of 0.6 s, and `make test` 774 s instead of 520 s. Set before torch is imported.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if _WORKERS:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

# Session fixtures whose files `make test` keeps on one pytest-xdist worker (--dist loadgroup), so that each is
# built once, not once per worker: the CoreML conversion of the tiny model takes about a minute.
SHARED_ON_ONE_WORKER = ("tiny_iphone_bundle",)
# Groups started before all others, longest first: xdist starts the groups with the most tests first, which would
# leave these (long, with few tests) for the end, one worker busy with them while the other idles. Seconds: roughly,
# from `make test` on 2 cores.
START_FIRST = (
    "shared-fixtures",  # ~300: the iphone bundle and the other CoreML exports
    "tests/bench/test_bench_command.py",  # ~230
    "tests/export/test_export_kill.py",  # ~120, one test
    "tests/export/test_export_tiny.py",  # ~110
    "tests/export/test_lora.py",  # ~90
    "tests/bench/test_low_memory_bench.py",  # ~60
    "tests/apple/test_sdxl_resources.py",  # ~55
)


def xdist_group(path: str, tests: Path = Path(__file__).parent) -> str:
    """The group of the test file ``path`` (relative to the rootdir, as in node ids): the file itself (its module
    fixtures are built once), or ``shared-fixtures`` for every file that names a fixture of SHARED_ON_ONE_WORKER."""
    text = (tests.parent / path).read_text(encoding="utf-8") if path.endswith(".py") else ""
    return "shared-fixtures" if any(name in text for name in SHARED_ON_ONE_WORKER) else path


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """``--dist loadgroup`` by xdist_group(): xdist 3.8 puts a test's group into its node id (``item._nodeid``), which
    pytest 9 no longer reads, so every test would be a group of its own and each worker would build every module
    fixture. Groups are handed out most tests first, as xdist does, after those of START_FIRST."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from functools import cache

    from xdist.scheduler import LoadScopeScheduling

    class ByGroup(LoadScopeScheduling):
        _split_scope = staticmethod(cache(lambda nodeid: xdist_group(nodeid.split("::")[0])))

        def _assign_work_unit(self, node: object) -> None:
            for group in reversed(START_FIRST):
                if group in self.workqueue:
                    self.workqueue.move_to_end(group, last=False)
            super()._assign_work_unit(node)

    return ByGroup(config, log)


# Tolerances in one table (see README "Tests"). Never widened by a default.
TOL = {
    "chunked_vs_unchunked_max_abs": 1e-5,
    "export_min_psnr_db": 60.0,
    "scheduler_max_abs": 1e-5,
    "pipeline_min_psnr_db": 40.0,
    # a quantized tiny bundle's image against the fp32 bundle's (2 steps, seed 0; measured 54.9 dB int8, 39.6 dB
    # int4 UNet in blocks of 16 + int8 text encoder and VAE)
    "int8_image_min_psnr_db": 40.0,
    "int4_image_min_psnr_db": 25.0,
    # the tiny model's image with its VAE in 3×3 tiles of 8 latent pixels (overlap 2) against the untiled bundle's:
    # measured 24.8–27.5 dB (decode), 30.3–31.0 (txt2img), 26.8–28.9 (img2img) on seeds 0–2; unrelated images
    # score 14 dB and a flat gray one 16.6 dB. Random weights and tiles half the image wide: a guard, not a
    # quality claim (bench/vae_tiling_quality.py measures the full SD 1.5 VAE)
    "tiled_tiny_min_psnr_db": 22.0,
    # a two-pass tiled VAE bundle (whole-image GroupNorm statistics) against the same two passes in PyTorch
    # (bench/vae_tiling_quality.py's hooks): the decoded image in [0, 1], measured 1.1–1.3e-6 on seeds 0–2; the
    # encoder's moments relative to their largest magnitude, measured 0.8–1.1e-6. Export error plus float32
    # statistics summed in another order (numpy averages in float64): the same bound as chunked vs unchunked
    "two_pass_vs_torch_max_abs": 1e-5,
}


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("torch")
    from pocketsd.export.random_model import builtin_configs, write_random_model

    return write_random_model(tmp_path_factory.mktemp("models") / "tiny", builtin_configs("tiny"))


@pytest.fixture(scope="session")
def tiny_bundle(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model exported with the cpu preset (UNet in 4 chunks), as `make demo` does."""
    from pocketsd.export.exporter import ExportRequest, export_bundle
    from pocketsd.export.preset import load_preset

    out = tmp_path_factory.mktemp("bundles") / "tiny-cpu"
    return export_bundle(ExportRequest(str(tiny_model_dir), load_preset("cpu"), out, progress=False))


@pytest.fixture(scope="session")
def tiny_iphone_bundle(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model with the iphone preset (6-bit palettized UNet in Apple's two-chunk form, CoreML)."""
    pytest.importorskip("coremltools")
    from pocketsd.export.exporter import ExportRequest, export_bundle
    from pocketsd.export.preset import load_preset

    out = tmp_path_factory.mktemp("bundles") / "tiny-iphone"
    return export_bundle(ExportRequest(str(tiny_model_dir), load_preset("iphone"), out, progress=False))


def random_model_and_bundle(arch: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A built-in random architecture (``random-model --arch``) written and exported with the cpu preset."""
    from pocketsd.export.exporter import ExportRequest, export_bundle
    from pocketsd.export.preset import load_preset
    from pocketsd.export.random_model import builtin_configs, write_random_model

    model = write_random_model(tmp_path_factory.mktemp("models") / arch, builtin_configs(arch))
    out = tmp_path_factory.mktemp("bundles") / f"{arch}-cpu"
    return model, export_bundle(ExportRequest(str(model), load_preset("cpu"), out, progress=False, warm_cache=False))
