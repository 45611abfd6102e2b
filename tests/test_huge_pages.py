"""The 2 MiB-page setting: when it applies, how the CLI's generate restarts with it, what the bench gives each
contender's worker, and that a started process really runs on huge pages where the kernel allows them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pocketsd import huge_pages
from pocketsd.bench import contenders
from pocketsd.bench.contenders import by_names, worker_environment
from pocketsd.cli import main as cli_main
from pocketsd.huge_pages import ADDED, OPT_OUT, TUNABLE, applies, as_given, with_huge_pages

LINUX = sys.platform.startswith("linux")
HOST = {"mode": lambda: "madvise", "glibc": lambda: (2, 36)}


@pytest.mark.skipif(not LINUX, reason="glibc tunables are Linux only")
def test_the_tunable_is_added_to_what_was_there_and_marked_as_pocketsds():
    env = with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "PATH": "/bin"}, **HOST)
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{TUNABLE}" and env[ADDED] == "1"
    assert env["PATH"] == "/bin"
    assert as_given(env) == {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "PATH": "/bin"}
    assert as_given(with_huge_pages({}, **HOST)) == {}


@pytest.mark.parametrize("env, mode, glibc", [
    ({OPT_OUT: "0"}, "madvise", (2, 36)),  # turned off
    ({"GLIBC_TUNABLES": TUNABLE}, "madvise", (2, 36)),  # the user set it: nothing to add, nothing to take away
    ({}, "never", (2, 36)),  # the kernel gives no huge pages
    ({}, "", (2, 36)),  # no transparent huge pages at all
    ({}, "madvise", (2, 34)),  # glibc before the tunable
    ({}, "madvise", (0, 0)),  # another C library
])
def test_it_does_not_apply(env: dict, mode: str, glibc: tuple):
    assert not applies(env, mode=lambda: mode, glibc=lambda: glibc)
    assert with_huge_pages(env, mode=lambda: mode, glibc=lambda: glibc) == env
    assert as_given(env) == env  # a tunable the user set stays


def test_the_kernel_mode_is_the_bracketed_word(tmp_path: Path):
    (tmp_path / "enabled").write_text("always [madvise] never\n")
    assert huge_pages.thp_mode(tmp_path / "enabled") == "madvise"
    assert huge_pages.thp_mode(tmp_path / "missing") == ""


def test_generate_from_the_console_restarts_itself_with_the_tunable(monkeypatch: pytest.MonkeyPatch):
    restarts: list[tuple] = []
    monkeypatch.setattr(huge_pages, "applies", lambda env: True)
    monkeypatch.setattr(huge_pages.os, "execve", lambda *args: restarts.append(args))
    monkeypatch.setattr(sys, "orig_argv", [sys.executable, "-m", "pocketsd", "generate", "b", "--prompt", "p"])
    monkeypatch.setattr(sys, "argv", ["pocketsd", "generate", "missing-bundle", "--prompt", "p", "--out", "o.png"])
    assert cli_main() == 2  # execve did not replace the process here: it goes on (and the bundle is missing)
    (executable, argv, env), = restarts
    assert executable == sys.executable and argv == sys.orig_argv
    assert TUNABLE in env["GLIBC_TUNABLES"].split(":") and env[ADDED] == "1"
    # a call from Python (argv given) never replaces the caller's process; nor does a command that runs no model
    assert cli_main(["generate", "missing-bundle", "--prompt", "p", "--out", "o.png"]) == 2
    monkeypatch.setattr(sys, "argv", ["pocketsd", "inspect", "missing-bundle"])
    assert cli_main() == 2
    assert len(restarts) == 1


def test_pocketsd_workers_run_on_huge_pages_and_peers_in_the_users_environment(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(huge_pages, "applies", lambda env, **_: TUNABLE not in env.get("GLIBC_TUNABLES", ""))
    monkeypatch.setenv("GLIBC_TUNABLES", f"glibc.malloc.arena_max=2:{TUNABLE}")
    monkeypatch.setenv(ADDED, "1")  # the bench itself was started by a pocketsd that added the tunable
    named = {c.name: worker_environment(c) for c in contenders.CONTENDERS}
    for name in ("pocketsd-onnxruntime", "pocketsd-openvino-bf16", "pocketsd-openvino-bf16-1chunk",
                 "openvino-huge-pages"):
        assert TUNABLE in named[name]["GLIBC_TUNABLES"], name
    for name in ("onnxruntime", "openvino", "diffusers-torch", "optimum"):
        assert named[name]["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=2" and ADDED not in named[name], name
    assert {c.name for c in by_names(None) if c.huge_pages} == {
        c.name for c in contenders.CONTENDERS if c.kind == "pocketsd"} | {"openvino-huge-pages"}


@pytest.mark.skipif(not (LINUX and applies({k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"})),
                    reason="needs Linux, glibc 2.35+ and transparent huge pages in madvise or always mode")
def test_a_process_started_with_the_tunable_gets_huge_pages(tmp_path: Path):
    """64 MiB from malloc (numpy), touched: on huge pages with the tunable, on none without (madvise mode)."""
    probe = ("import numpy as np; a = np.ones(1 << 23); "
             "print([l.split()[1] for l in open('/proc/self/smaps_rollup') if l.startswith('AnonHugePages')][0])")
    base = as_given({k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"})
    with_pages = int(subprocess.run([sys.executable, "-c", probe], env=with_huge_pages(base), capture_output=True,
                                    text=True, check=True).stdout)
    assert with_pages >= 32 * 1024  # kB
    if huge_pages.thp_mode() == "madvise":
        without = int(subprocess.run([sys.executable, "-c", probe], env=base, capture_output=True, text=True,
                                     check=True).stdout)
        assert without < with_pages
