"""The harness's private containerd: its CRI answers, pulls land where the kubelet looks, the
Docker engine's namespace is invisible to the CRI, pods run with runc, and stop leaves nothing.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from grpc import aio

from cedar.puller.cri import api_pb2 as pb
from cedar.puller.cri.image_service_pb2_grpc import ImageServiceStub
from cedar.puller.cri.runtime_service_pb2_grpc import RuntimeServiceStub
from cedar.sandbox.containerd import Containerd, image_archive
from cedar.sandbox.dockerd import _pids_mentioning
from cedar.sandbox.procs import pid_alive
from tests.harness.containerd import hold_image
from tests.harness.registry import ImageMaker

pytestmark = pytest.mark.integration


async def test_a_cri_pull_is_visible_to_ctr_in_the_k8s_namespace(
    containerd: Containerd, make_images: ImageMaker
) -> None:
    (ref,) = await make_images.make(1, 64 * 1024)
    async with aio.insecure_channel(containerd.endpoint) as channel:
        version = await RuntimeServiceStub(channel).Version(pb.VersionRequest(version="v1"))
        assert version.runtime_name == "containerd"
        assert version.runtime_api_version == "v1"
        pulled = await ImageServiceStub(channel).PullImage(
            pb.PullImageRequest(image=pb.ImageSpec(image=ref)), timeout=60
        )
    assert pulled.image_ref.startswith("sha256:")
    names = containerd.images()
    assert ref in names
    assert pulled.image_ref in names
    assert ref not in containerd.images(namespace="moby")


async def test_an_image_in_dockers_namespace_is_invisible_to_the_cri(
    containerd: Containerd,
) -> None:
    # What the Docker engine's containerd store holds (namespace moby) is not the kubelet's.
    moby_ref = "cedar.local/only-in-moby:v1"
    archive = image_archive(moby_ref, [("file", b"x", 0o644)], entrypoint=["/file"])
    containerd.import_image(archive, namespace="moby")
    k8s_ref = "cedar.local/in-k8s:v1"
    containerd.import_image(image_archive(k8s_ref, [("file", b"y", 0o644)]))
    async with aio.insecure_channel(containerd.endpoint) as channel:
        images = ImageServiceStub(channel)
        listed = await images.ListImages(pb.ListImagesRequest())
        tags = {t for i in listed.images for t in i.repo_tags}
        hidden = await images.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=moby_ref)))
        seen = await images.ImageStatus(pb.ImageStatusRequest(image=pb.ImageSpec(image=k8s_ref)))
    assert moby_ref not in tags and not hidden.HasField("image")
    assert k8s_ref in tags and seen.image.id


async def test_a_pod_holds_an_image_and_stop_leaves_no_process(
    fresh_containerd: Containerd, make_images: ImageMaker, tmp_path: Path
) -> None:
    (ref,) = await make_images.make(1, 64 * 1024)
    async with aio.insecure_channel(fresh_containerd.endpoint) as channel:
        await ImageServiceStub(channel).PullImage(
            pb.PullImageRequest(image=pb.ImageSpec(image=ref)), timeout=60
        )
        runtime = RuntimeServiceStub(channel)
        async with hold_image(fresh_containerd.endpoint, ref, tmp_path / "pods") as container:
            listed = await runtime.ListContainers(pb.ListContainersRequest())
            (found,) = [c for c in listed.containers if c.id == container]
            assert found.state == pb.CONTAINER_CREATED
            assert found.image_ref.startswith("sha256:")
            # The pod's pause process runs under runc, with this containerd's shim.
            assert _pids_mentioning(str(fresh_containerd.socket_path))
        listed = await runtime.ListContainers(pb.ListContainersRequest())
        assert not [c for c in listed.containers if c.id == container]
    # A pod left running when containerd stops: its shim and pause process go too.
    async with hold_image(fresh_containerd.endpoint, ref, tmp_path / "left"):
        shims = _pids_mentioning(str(fresh_containerd.socket_path))
        pauses = children_running(shims, b"/pause")
        assert pauses, "the pod's pause process runs under the shim"
        fresh_containerd.stop()
    assert not _pids_mentioning(str(fresh_containerd.socket_path))
    assert not [pid for pid in pauses if pid_alive(pid)]
    mounts = await asyncio.to_thread(Path("/proc/self/mountinfo").read_text)
    assert str(fresh_containerd.base_dir) not in mounts


def children_running(parents: list[int], cmdline: bytes) -> list[int]:
    """PIDs whose parent is one of `parents` and whose command line is `cmdline`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rpartition(")")[2].split()
            argv = (entry / "cmdline").read_bytes().rstrip(b"\0")
        except OSError:
            continue
        if len(stat) > 1 and int(stat[1]) in parents and argv == cmdline:
            found.append(int(entry.name))
    return found
