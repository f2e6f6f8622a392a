"""Choosing the runtime, the disk guard on a CRI runtime, the settings, and the CRI stubs'
agreement with proto/cri (regenerated here with grpcio-tools and compared)."""

from __future__ import annotations

import argparse
import importlib.util
import os
from collections.abc import Collection
from pathlib import Path

import pytest

from cedar.puller import cli
from cedar.puller.cri import api_pb2 as pb
from cedar.puller.cri import image_service_pb2, runtime_service_pb2
from cedar.puller.disk import DiskGuard
from cedar.puller.engine import ImageFs, RuntimeVersion
from cedar.puller.runtime_choice import (
    CONTAINERD_SOCKET,
    CRI_DOCKERD_SOCKET,
    CRIO_SOCKET,
    DOCKER_SOCKET,
    choose,
    cri_endpoint,
    socket_path,
)
from cedar.puller.settings import PullerSettings

REPO = Path(__file__).resolve().parents[2]


def pick(
    runtime: str = "auto",
    *,
    endpoint: str | None = None,
    docker_host: str = "unix:///var/run/docker.sock",
    explicit: bool = False,
    node: str | None = None,
    sockets: Collection[str] = (),
) -> tuple[str, str]:
    choice = choose(
        runtime,
        cri_endpoint_setting=endpoint,
        docker_host=docker_host,
        docker_host_explicit=explicit,
        node_runtime_version=node,
        exists=lambda path: path in sockets,
    )
    assert choice.why
    return choice.api, choice.endpoint


def test_explicit_runtime_decides() -> None:
    assert pick("docker", sockets={CONTAINERD_SOCKET}) == ("docker", "unix:///var/run/docker.sock")
    assert pick("cri") == ("cri", f"unix://{CONTAINERD_SOCKET}")
    assert pick("cri", sockets={CRIO_SOCKET}) == ("cri", f"unix://{CRIO_SOCKET}")
    assert pick("cri", endpoint="/run/k3s/containerd/containerd.sock") == (
        "cri",
        "unix:///run/k3s/containerd/containerd.sock",
    )


def test_auto_follows_settings_then_the_node_then_the_sockets() -> None:
    assert pick(endpoint="unix:///x.sock", explicit=True) == ("cri", "unix:///x.sock")
    assert pick(docker_host="unix:///d.sock", explicit=True, node="containerd://1.7.2") == (
        "docker",
        "unix:///d.sock",
    )
    assert pick(node="containerd://1.7.2") == ("cri", f"unix://{CONTAINERD_SOCKET}")
    assert pick(node="cri-o://1.30.2", sockets={CONTAINERD_SOCKET}) == (
        "cri",
        f"unix://{CRIO_SOCKET}",
    )
    assert pick(node="docker://24.0.5", sockets={DOCKER_SOCKET}) == (
        "docker",
        "unix:///var/run/docker.sock",
    )
    # Kubernetes >= 1.24 with Docker: the kubelet talks to cri-dockerd; so can the puller.
    assert pick(node="docker://24.0.5", sockets={CRI_DOCKERD_SOCKET}) == (
        "cri",
        f"unix://{CRI_DOCKERD_SOCKET}",
    )
    assert pick(sockets={CRIO_SOCKET, DOCKER_SOCKET}) == ("cri", f"unix://{CRIO_SOCKET}")
    assert pick(sockets={DOCKER_SOCKET}) == ("docker", "unix:///var/run/docker.sock")
    assert pick() == ("docker", "unix:///var/run/docker.sock")  # as before there was a choice
    assert pick(node="remote://weird", sockets={CONTAINERD_SOCKET})[0] == "cri"


def test_endpoints_and_paths() -> None:
    assert socket_path("unix:///run/x.sock") == "/run/x.sock"
    assert socket_path("unix:/run/x.sock") == "/run/x.sock"
    assert socket_path("/run/x.sock") == "/run/x.sock"
    assert socket_path("tcp://127.0.0.1:1") is None
    assert cri_endpoint("/run/x.sock") == "unix:///run/x.sock"
    assert cri_endpoint("unix:///run/x.sock") == "unix:///run/x.sock"


def test_runtime_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CEDAR_NODE_NAME", "n")
    monkeypatch.delenv("DOCKER_HOST", raising=False)
    s = PullerSettings()
    assert s.runtime == "auto" and s.cri_endpoint is None and not s.docker_host_explicit
    assert s.cri_timeout.total_seconds() == 30
    monkeypatch.setenv("CEDAR_RUNTIME", "cri")
    monkeypatch.setenv("CEDAR_CRI_ENDPOINT", "/run/containerd/containerd.sock")
    monkeypatch.setenv("DOCKER_HOST", "unix:///tmp/d.sock")
    s = PullerSettings()
    assert s.runtime == "cri" and s.cri_endpoint == "/run/containerd/containerd.sock"
    assert s.docker_host_explicit
    monkeypatch.setenv("CEDAR_RUNTIME", "podman")
    with pytest.raises(ValueError, match="runtime"):
        PullerSettings()


def test_cli_runtime_options() -> None:
    parser = argparse.ArgumentParser()
    cli.add_arguments(parser)
    args = parser.parse_args(
        ["--node-name", "n", "--runtime", "cri", "--cri-endpoint", "unix:///c.sock"]
    )
    s = cli.build_settings(args)
    assert s.runtime == "cri" and s.cri_endpoint == "unix:///c.sock"
    assert cli.__doc__ is not None
    for var in ("CEDAR_RUNTIME", "CEDAR_CRI_ENDPOINT", "CEDAR_CRI_TIMEOUT"):
        assert var in cli.__doc__


class FsEngine:
    """An engine that only answers ImageFsInfo (all the disk guard asks)."""

    def __init__(self, fs: ImageFs | None) -> None:
        self.fs = fs

    async def image_fs(self) -> ImageFs | None:
        return self.fs

    async def version(self) -> RuntimeVersion:
        return RuntimeVersion("fake", "0")


async def test_disk_guard_on_the_image_filesystem_the_runtime_names(tmp_path: Path) -> None:
    guard = DiskGuard(None, 2**62, FsEngine(ImageFs(str(tmp_path), 0)))  # type: ignore[arg-type]
    assert await guard.check() and guard.measured == str(tmp_path)
    guard.min_free_bytes = 0
    assert not await guard.check()


async def test_disk_guard_falls_back_to_its_own_root_when_it_is_the_same_filesystem(
    tmp_path: Path,
) -> None:
    hidden = ImageFs("/var/lib/containerd/not-mounted-here", used_bytes=1)
    guard = DiskGuard(None, 2**62, FsEngine(hidden), own_root=str(tmp_path))  # type: ignore[arg-type]
    assert await guard.check() and guard.measured == str(tmp_path)
    st = os.statvfs(tmp_path)
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    elsewhere = ImageFs("/var/lib/containerd/not-mounted-here", used_bytes=used + 2**40)
    guard = DiskGuard(None, 2**62, FsEngine(elsewhere), own_root=str(tmp_path))  # type: ignore[arg-type]
    assert not await guard.check() and guard.measured is None  # another filesystem: off
    assert not await DiskGuard(None, 2**62, FsEngine(None)).check()  # type: ignore[arg-type]
    # CEDAR_DOCKER_ROOT, when set, is what is measured, whatever the engine says.
    rooted = DiskGuard(str(tmp_path), 2**62, FsEngine(elsewhere))  # type: ignore[arg-type]
    assert await rooted.check() and rooted.measured == str(tmp_path)


def test_the_stubs_are_the_cri_subset_with_upstream_names() -> None:
    assert pb.DESCRIPTOR.package == "runtime.v1"
    images = image_service_pb2.DESCRIPTOR.services_by_name["ImageService"]
    runtime = runtime_service_pb2.DESCRIPTOR.services_by_name["RuntimeService"]
    assert images.full_name == "runtime.v1.ImageService"
    assert runtime.full_name == "runtime.v1.RuntimeService"
    for method in (*images.methods, *runtime.methods):
        # Every upstream method is Name(NameRequest) returns (NameResponse).
        assert method.input_type.name == f"{method.name}Request", method.name
        assert method.output_type.name == f"{method.name}Response", method.name
    assert {m.name for m in images.methods} == {
        "ListImages",
        "ImageStatus",
        "PullImage",
        "RemoveImage",
        "ImageFsInfo",
    }


def _generator() -> object:
    spec = importlib.util.spec_from_file_location("cri_generate", REPO / "proto/cri/generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_match_the_proto_files(tmp_path: Path) -> None:
    gen = _generator()
    generated = gen.generate()  # type: ignore[attr-defined]
    stale = gen.drift(generated)  # type: ignore[attr-defined]
    assert not stale, f"{stale} differ from proto/cri: run `make cri-stubs`"
    # And the comparison bites: an edited stub or a stray one is drift.
    for name, text in generated.items():
        (tmp_path / name).write_text(text)
    first = sorted(generated)[0]
    (tmp_path / first).write_text(generated[first] + "# edited\n")
    (tmp_path / "stray_pb2.py").write_text("")
    assert gen.drift(generated, tmp_path) == sorted([first, "stray_pb2.py"])  # type: ignore[attr-defined]
