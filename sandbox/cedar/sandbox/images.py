"""Make real, distinct images of a chosen size and push them to a sandbox registry.

I/O: runs the docker CLI (``import``, ``login``, ``push``, ``rmi``) against a Docker engine,
in a private DOCKER_CONFIG under the engine's directory. An image is one layer: a tarball of
random (incompressible, so the registry really stores and serves ``size_bytes``) data,
streamed from Python into ``docker import``, then pushed with the docker CLI. Local copies
are removed afterwards so that a later pull really goes to the registry.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import io
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, ParamSpec, TypeVar

from cedar.sandbox.dockerd import DockerEngine
from cedar.sandbox.errors import DockerCommandError
from cedar.sandbox.registry import Registry

P = ParamSpec("P")
R = TypeVar("R")

__all__ = [
    "amake_images",
    "apush_new_content",
    "make_images",
    "push_image",
    "push_new_content",
]

_DIGEST_RE = re.compile(r"digest: (sha256:[0-9a-f]{64})")
# The image's CMD: `docker create` needs one; the file exists but is not meant to run.
_CMD = "/cedar-image"
_CHUNK = 1 << 20


class _RandomReader(io.RawIOBase):
    """``size`` bytes of os.urandom, read lazily (never the whole layer in memory)."""

    def __init__(self, size: int) -> None:
        self._left = size

    def readable(self) -> bool:
        return True

    def read(self, n: int | None = -1) -> bytes:
        if n is None or n < 0:
            n = self._left
        n = min(n, self._left, _CHUNK)
        self._left -= n
        return os.urandom(n)


def _write_layer(out: IO[bytes], ref: str, size_bytes: int) -> None:
    stamp = f"{ref}\n{uuid.uuid4()}\n".encode()
    now = time.time()
    with tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        marker = tarfile.TarInfo(_CMD.lstrip("/"))
        marker.size, marker.mode, marker.mtime = len(stamp), 0o755, now
        tar.addfile(marker, io.BytesIO(stamp))
        data = tarfile.TarInfo("data")
        data.type, data.mode, data.mtime = tarfile.DIRTYPE, 0o755, now
        tar.addfile(data)
        blob = tarfile.TarInfo("data/random.bin")
        blob.size, blob.mode, blob.mtime = size_bytes, 0o644, now
        tar.addfile(blob, _RandomReader(size_bytes))


def _import(
    engine: DockerEngine,
    ref: str,
    size_bytes: int,
    labels: Mapping[str, str] | None,
    config_dir: Path,
) -> None:
    changes = ["--change", f"CMD [{json.dumps(_CMD)}]"]
    for key, value in (labels or {}).items():
        changes += ["--change", f"LABEL {key}={json.dumps(value)}"]
    cmd = [engine.cli, "import", *changes, "-", ref]
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=engine.env(config_dir),
    )
    assert proc.stdin is not None
    # Its output is a single line, so writing all of stdin first cannot deadlock.
    with contextlib.suppress(BrokenPipeError):
        _write_layer(proc.stdin, ref, size_bytes)
    # communicate() flushes and closes stdin (end of the tar stream), then collects output.
    out, err = proc.communicate(timeout=300)
    if proc.returncode != 0:
        raise DockerCommandError(
            f"`docker import` of {ref} failed with code {proc.returncode}: "
            f"{err.decode(errors='replace').strip() or out.decode(errors='replace').strip()}"
        )


def _registry_host(registry: Registry | str) -> str:
    return registry.host if isinstance(registry, Registry) else registry


def _resolve_auth(registry: Registry | str, auth: tuple[str, str] | None) -> tuple[str, str] | None:
    if auth is not None:
        return auth
    return registry.credentials if isinstance(registry, Registry) else None


class _LoginSession:
    """A private DOCKER_CONFIG, logged in to the registry when credentials are given."""

    def __init__(
        self, engine: DockerEngine, registry: Registry | str, auth: tuple[str, str] | None
    ) -> None:
        self.engine, self.host, self.auth = engine, _registry_host(registry), auth
        self.dir = Path(tempfile.mkdtemp(prefix="cli-", dir=engine.base_dir))

    def __enter__(self) -> Path:
        if self.auth is not None:
            user, password = self.auth
            self.engine.docker(
                "login",
                "--username",
                user,
                "--password-stdin",
                self.host,
                input=password,
                config_dir=self.dir,
            )
        return self.dir

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _push(engine: DockerEngine, ref: str, config_dir: Path) -> str:
    out = engine.docker("push", ref, config_dir=config_dir).stdout
    match = _DIGEST_RE.search(out)
    if match is None:
        raise DockerCommandError(f"`docker push {ref}` printed no digest:\n{out}")
    return match.group(1)


def _build_and_push(
    engine: DockerEngine,
    ref: str,
    *,
    size_bytes: int,
    labels: Mapping[str, str] | None,
    config_dir: Path,
    keep_local: bool,
) -> str:
    _import(engine, ref, size_bytes, labels, config_dir)
    digest = _push(engine, ref, config_dir)
    if not keep_local:
        engine.docker("rmi", ref, config_dir=config_dir)
    return digest


def push_image(
    engine: DockerEngine,
    registry: Registry | str,
    ref: str,
    size_bytes: int,
    *,
    labels: Mapping[str, str] | None = None,
    auth: tuple[str, str] | None = None,
    keep_local: bool = False,
) -> str:
    """Build one image with fresh random content as ``ref``, push it, return its digest.

    ``auth`` defaults to the registry's own credentials (``Registry.credentials``).
    """
    with _LoginSession(engine, registry, _resolve_auth(registry, auth)) as config_dir:
        return _build_and_push(
            engine,
            ref,
            size_bytes=size_bytes,
            labels=labels,
            config_dir=config_dir,
            keep_local=keep_local,
        )


def make_images(
    engine: DockerEngine,
    registry: Registry | str,
    count: int,
    size_bytes: int,
    *,
    prefix: str = "cedar-test/img",
    tag: str = "v1",
    labels: Mapping[str, str] | None = None,
    auth: tuple[str, str] | None = None,
    keep_local: bool = False,
    workers: int | None = None,
) -> list[str]:
    """Push ``count`` distinct images of about ``size_bytes`` each; return their references.

    References are ``HOST:PORT/{prefix}-{i}:{tag}``. ``auth`` (user, password) defaults
    to the registry's own credentials. Unless ``keep_local``, the local copies are
    removed from ``engine`` so that tests really pull.
    """
    if count <= 0:
        return []
    host = _registry_host(registry)
    refs = [f"{host}/{prefix}-{i}:{tag}" for i in range(count)]
    # Import hashes the layer and push uploads it: both mostly wait on the daemon, so a
    # few in flight use a 2-core machine better than one at a time.
    pool_size = workers if workers is not None else min(count, 4)
    with (
        _LoginSession(engine, registry, _resolve_auth(registry, auth)) as config_dir,
        ThreadPoolExecutor(max_workers=pool_size, thread_name_prefix="make-images") as pool,
    ):
        futures = [
            pool.submit(
                _build_and_push,
                engine,
                ref,
                size_bytes=size_bytes,
                labels=labels,
                config_dir=config_dir,
                keep_local=keep_local,
            )
            for ref in refs
        ]
        for fut in futures:
            fut.result()
    return refs


def push_new_content(
    engine: DockerEngine,
    registry: Registry | str,
    ref: str,
    size_bytes: int = 256 * 1024,
    *,
    labels: Mapping[str, str] | None = None,
    auth: tuple[str, str] | None = None,
    keep_local: bool = False,
) -> str:
    """Re-push ``ref`` (same tag) with new content; return the new manifest digest."""
    return push_image(
        engine, registry, ref, size_bytes, labels=labels, auth=auth, keep_local=keep_local
    )


def _in_thread(fn: Callable[P, R]) -> Callable[P, Coroutine[Any, Any, R]]:
    """`fn` as a coroutine function that runs it in a worker thread, for asyncio callers."""

    @functools.wraps(fn)
    async def run(*args: P.args, **kwargs: P.kwargs) -> R:
        return await asyncio.to_thread(fn, *args, **kwargs)

    return run


amake_images = _in_thread(make_images)
apush_new_content = _in_thread(push_new_content)
