"""The bench's side of a worker process: start it, send requests, read answers, and turn a crash into one line."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any


class WorkerError(Exception):
    """A request failed in the worker (or the worker died); the message is one line."""


class WorkerProcess:
    def __init__(self, name: str, command: list[str], log: Path) -> None:
        self.name = name
        self.log = log
        log.parent.mkdir(parents=True, exist_ok=True)
        self._log_handle = log.open("w")
        self._process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=self._log_handle, text=True, bufsize=1)

    def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send one request and wait for its answer; WorkerError with one line if it failed."""
        process = self._process
        assert process.stdin is not None and process.stdout is not None  # both are pipes (Popen above)
        try:
            process.stdin.write(json.dumps({"op": op, **fields}) + "\n")
            process.stdin.flush()
            line = process.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        if not line:
            code = process.wait()
            raise WorkerError(f"worker exited (code {code}) during {op}: {self._last_log_line()}")
        answer = json.loads(line)
        if not answer.get("ok"):
            raise WorkerError(f"{op}: {answer.get('error', 'failed')}")
        return answer

    def _last_log_line(self) -> str:
        self._log_handle.flush()
        if self._process.returncode == -9:
            return "killed by SIGKILL (out of memory?)"
        lines = [line.strip() for line in self.log.read_text(errors="replace").splitlines() if line.strip()]
        return lines[-1][:300] if lines else f"nothing on stderr (see {self.log})"

    def close(self) -> None:
        process = self._process
        if process.poll() is None:
            try:
                assert process.stdin is not None
                process.stdin.write(json.dumps({"op": "quit"}) + "\n")
                process.stdin.close()
                process.wait(timeout=60)
            except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                process.kill()
                process.wait()
        self._log_handle.close()

    def __enter__(self) -> "WorkerProcess":
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()
