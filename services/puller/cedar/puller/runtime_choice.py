"""Which engine the puller drives, and where. Pure: no I/O; the caller says which sockets exist.

`CEDAR_RUNTIME=docker` or `cri` decides outright: the Docker engine at DOCKER_HOST, or the
CRI at CEDAR_CRI_ENDPOINT (else the first of the usual CRI sockets that exists, else
containerd's). `auto` (the default) goes down this list and stops at the first that says:

1. CEDAR_CRI_ENDPOINT is set: the CRI there; DOCKER_HOST is set: the Docker engine there
   (so an existing Docker deployment keeps what it had);
2. the Node's `status.nodeInfo.containerRuntimeVersion`: `containerd://...` and
   `cri-o://...` are CRI runtimes at their usual sockets; `docker://...` is the Docker engine
   (or cri-dockerd's CRI when only its socket is there);
3. the first of the usual sockets that exists (containerd, CRI-O, cri-dockerd, Docker);
4. the Docker engine at DOCKER_HOST's default, as before there was a choice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

CONTAINERD_SOCKET = "/run/containerd/containerd.sock"
CRIO_SOCKET = "/var/run/crio/crio.sock"
CRI_DOCKERD_SOCKET = "/var/run/cri-dockerd.sock"
DOCKER_SOCKET = "/var/run/docker.sock"
CRI_SOCKETS = (CONTAINERD_SOCKET, CRIO_SOCKET, CRI_DOCKERD_SOCKET)

Api = Literal["docker", "cri"]


@dataclass(frozen=True)
class RuntimeChoice:
    api: Api
    endpoint: str  # a DOCKER_HOST value, or a CRI endpoint (unix:///path)
    why: str  # for the log line: what decided it


def socket_path(endpoint: str) -> str | None:
    """The filesystem path of a `unix://` endpoint (or of a bare absolute path), else None."""
    text = endpoint.strip()
    if text.startswith("unix://"):
        text = text.removeprefix("unix://")
    elif text.startswith("unix:"):
        text = text.removeprefix("unix:")
    return text if text.startswith("/") else None


def cri_endpoint(text: str) -> str:
    """`unix:///path` for a CRI endpoint written as a path or as a unix URL (as kubelet's
    --container-runtime-endpoint accepts both)."""
    path = socket_path(text)
    return f"unix://{path}" if path is not None else text.strip()


def choose(
    runtime: str,
    *,
    cri_endpoint_setting: str | None,
    docker_host: str,
    docker_host_explicit: bool,
    node_runtime_version: str | None,
    exists: Callable[[str], bool],
) -> RuntimeChoice:
    """The engine to drive; `exists(path)` says whether a socket is there."""

    def cri(why: str, preferred: str | None = None) -> RuntimeChoice:
        if cri_endpoint_setting:
            return RuntimeChoice("cri", cri_endpoint(cri_endpoint_setting), why)
        if preferred is not None:
            return RuntimeChoice("cri", f"unix://{preferred}", why)
        found = next((s for s in CRI_SOCKETS if exists(s)), CONTAINERD_SOCKET)
        return RuntimeChoice("cri", f"unix://{found}", why)

    def docker(why: str) -> RuntimeChoice:
        return RuntimeChoice("docker", docker_host, why)

    if runtime == "docker":
        return docker("CEDAR_RUNTIME=docker")
    if runtime == "cri":
        return cri("CEDAR_RUNTIME=cri")
    if cri_endpoint_setting:
        return cri("CEDAR_CRI_ENDPOINT is set")
    if docker_host_explicit:
        return docker("DOCKER_HOST is set")
    reported = (node_runtime_version or "").strip()
    if reported.startswith("containerd://"):
        return cri(f"the Node reports {reported}", CONTAINERD_SOCKET)
    if reported.startswith("cri-o://"):
        return cri(f"the Node reports {reported}", CRIO_SOCKET)
    if reported.startswith("docker://"):
        docker_socket = socket_path(docker_host) or DOCKER_SOCKET
        if not exists(docker_socket) and exists(CRI_DOCKERD_SOCKET):
            return cri(f"the Node reports {reported}; only cri-dockerd's socket is here")
        return docker(f"the Node reports {reported}")
    for path in (*CRI_SOCKETS, DOCKER_SOCKET):
        if exists(path):
            why = f"{path} exists"
            return docker(why) if path == DOCKER_SOCKET else cri(why, path)
    return docker("no runtime socket found; the Docker engine's default")
