"""The operator commands' error: one line for the person who ran the command. No I/O."""

from __future__ import annotations

from cedar.runtime.errors import CedarError


class OpsError(CedarError):
    """A failure to explain to the operator in one line (exit code 1, or 2 for usage)."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code
