"""The two kinds of error pocketsd raises.

A ``UserError`` is something the user can fix (a missing file, a bad preset, an impossible request): it carries a
short code and a hint, and the CLI prints it as one line and exits non-zero. Anything else that escapes is our bug
and keeps its traceback. Library code never uses ``assert`` on user input.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input, printed by the CLI as ``error[code]: message (hint)``."""

    code = "user-error"

    def __init__(self, message: str, hint: str | None = None, *, code: str | None = None,
                 details: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        self.details = details  # optional multi-line table the CLI prints after the one line (e.g. parity)
        if code is not None:
            self.code = code

    def one_line(self) -> str:
        text = f"error[{self.code}]: {self.message}"
        if self.hint:
            text += f" — {self.hint}"
        return " ".join(text.split())


class ModelError(UserError):
    """The model folder is missing, incomplete or of an unsupported kind."""

    code = "model"


class PresetError(UserError):
    """A preset (YAML) or a CLI override is invalid: unknown key, bad value, impossible combination."""

    code = "preset"


class PlanError(UserError):
    """The split request cannot be satisfied for this graph (too many chunks, too small a budget, unknown module)."""

    code = "plan"


class ParityError(UserError):
    """An exported chunk or component does not match PyTorch within the preset's thresholds."""

    code = "parity"


class BundleError(UserError):
    """A bundle is missing, corrupted, or of a manifest version this runtime cannot read."""

    code = "bundle"


class OutputError(UserError):
    """The output location cannot be written."""

    code = "output"


class GenerateError(UserError):
    """A generation request is invalid (unknown scheduler, wrong init image size, ...)."""

    code = "generate"


class InternalError(RuntimeError):
    """A broken invariant inside pocketsd: a bug, reported with its traceback."""
