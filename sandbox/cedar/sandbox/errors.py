"""Pure: the sandbox's exception tree, every error under `SandboxError` (a `CedarError`).

Where a builtin fits, an error inherits it too, so callers that catch the builtin
(`RuntimeError`, `FileNotFoundError`, `TimeoutError`, ...) keep working.
"""

from __future__ import annotations

from typing import Any

from cedar.runtime.errors import CedarError


class SandboxError(CedarError):
    """Root of the errors of the sandbox's servers and of the simulated Kubernetes API."""


class BinaryNotFoundError(SandboxError, FileNotFoundError):
    """A server binary is not installed (``make test`` installs them)."""


class PackageNotFoundError(SandboxError, RuntimeError):
    """A Python package a sandbox server needs is not installed (``make test`` installs it)."""


class ServerStartError(SandboxError, RuntimeError):
    """A sandbox server did not start or become ready; the message says why (its log's tail)."""


class SocketPathTooLongError(SandboxError, ValueError):
    """A directory is too deep for the unix socket paths a server would create under it."""


class DockerCommandError(SandboxError, RuntimeError):
    """The docker CLI failed, or did not print what it should; the message carries its output."""


class WaitTimeoutError(SandboxError, TimeoutError):
    """A condition a sandbox call waits for was not reached in time."""


class UnknownResourceError(SandboxError, KeyError):
    """A test named a resource the simulated Kubernetes API does not serve."""


class ApiError(SandboxError):
    """A failure the simulated Kubernetes API reports as a `kind: Status` body with an HTTP code."""

    def __init__(
        self, code: int, reason: str, message: str, details: dict[str, Any] | None = None
    ) -> None:
        super().__init__(f"{code} {reason}: {message}")
        self.code = code
        self.reason = reason
        self.message = message
        self.details = details or {}

    def status(self) -> dict[str, Any]:
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "details": self.details,
            "code": self.code,
        }
