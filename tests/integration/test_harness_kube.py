"""The simulated Kubernetes API, proven with the official `kubernetes` client and raw aiohttp."""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
import kubernetes
import pytest
from kubernetes.client import ApiClient, ApiException, AppsV1Api, CoreV1Api

from cedar.runtime.kube import KubeClient, load_config
from cedar.sandbox.errors import ApiError, SandboxError, UnknownResourceError
from cedar.sandbox.kubeapi import KubeAPI
from cedar.sandbox.kubeapi_controls import per_second
from cedar.sandbox.kubeapi_ops import apply_patch, parse_field_selector, parse_label_selector

MERGE = "application/merge-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"

# A stuck stream must fail the test, not hang it (not a timing assertion).
STREAM_GUARD = 20


def deployment(name: str, namespace: str = "tenant-a", **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "app", "image": f"registry.local/{name}:1"}]},
            },
        },
    }


def replicaset(name: str, namespace: str) -> dict[str, Any]:
    return {**deployment(name, namespace), "kind": "ReplicaSet"}


@pytest.fixture
def apps(kube_client: ApiClient) -> AppsV1Api:
    return AppsV1Api(kube_client)


@pytest.fixture
def core(kube_client: ApiClient) -> CoreV1Api:
    return CoreV1Api(kube_client)


class WatchThread:
    """Runs a blocking `kubernetes.watch.Watch().stream(...)` and queues what it yields."""

    def __init__(self, func: Any, **kwargs: Any) -> None:
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.error: BaseException | None = None
        self.watch = kubernetes.watch.Watch()
        self._thread = threading.Thread(target=self._run, args=(func, kwargs), daemon=True)
        self._thread.start()

    def _run(self, func: Any, kwargs: dict[str, Any]) -> None:
        try:
            for event in self.watch.stream(func, **kwargs):
                self.events.put(event)
        except BaseException as exc:
            self.error = exc
        finally:
            self.events.put({"type": "<END>"})

    def next(self) -> dict[str, Any]:
        return self.events.get(timeout=STREAM_GUARD)

    def next_of(self, *types: str) -> dict[str, Any]:
        while (event := self.next())["type"] not in types:
            pass
        return event

    def join(self) -> None:
        self._thread.join(STREAM_GUARD)
        assert not self._thread.is_alive()


# ------------------------------------------------------------------ pure rules


def test_label_selectors() -> None:
    sel = parse_label_selector("app=web,tier!=db,env in (prod, stage),team notin (x),owner,!tmp")
    assert sel is not None
    good = {"app": "web", "tier": "fe", "env": "prod", "team": "y", "owner": "me"}
    assert sel(good)
    assert not sel({**good, "env": "dev"})
    assert not sel({**good, "team": "x"})
    assert not sel({**good, "tmp": "1"})
    assert not sel({k: v for k, v in good.items() if k != "owner"})
    assert parse_label_selector("") is None


def test_field_selector_and_patches() -> None:
    sel = parse_field_selector("metadata.name=a,involvedObject.kind!=Pod")
    assert sel is not None
    assert sel({"metadata": {"name": "a"}, "involvedObject": {"kind": "Namespace"}})
    assert not sel({"metadata": {"name": "a"}, "involvedObject": {"kind": "Pod"}})
    obj = {"metadata": {"annotations": {"a": "1", "b": "2"}}}
    assert apply_patch(obj, MERGE, {"metadata": {"annotations": {"a": None, "c": "3"}}}) == {
        "metadata": {"annotations": {"b": "2", "c": "3"}}
    }
    ops = [
        {"op": "replace", "path": "/metadata/annotations/a", "value": "9"},
        {"op": "add", "path": "/metadata/labels", "value": {"x/y": "z"}},
        {"op": "remove", "path": "/metadata/annotations/b"},
    ]
    assert apply_patch(obj, "application/json-patch+json", ops) == {
        "metadata": {"annotations": {"a": "9"}, "labels": {"x/y": "z"}}
    }


def test_control_errors_are_sandbox_errors(kube_api: KubeAPI) -> None:
    with pytest.raises(UnknownResourceError) as unknown:
        kube_api.resource("widgets")
    assert isinstance(unknown.value, KeyError) and isinstance(unknown.value, SandboxError)
    kube_api.create(deployment("web"))
    with pytest.raises(ApiError) as exists:
        kube_api.create(deployment("web"))
    assert exists.value.code == 409 and isinstance(exists.value, SandboxError)
    with pytest.raises(TimeoutError) as waited:
        kube_api.wait_for_watches("deployments", timeout=0.05)
    assert isinstance(waited.value, SandboxError)


# ------------------------------------------------------------------ official client


def test_create_and_paginated_list(kube_api: KubeAPI, apps: AppsV1Api, core: CoreV1Api) -> None:
    core.create_namespace({"metadata": {"name": "tenant-a"}})
    core.create_namespace({"metadata": {"name": "tenant-b"}})
    for i in range(13):
        apps.create_namespaced_deployment("tenant-a", deployment(f"a{i:02}", tier="web"))
    for i in range(12):
        apps.create_namespaced_deployment("tenant-b", deployment(f"b{i:02}", "tenant-b"))

    names: list[str] = []
    token: str | None = None
    list_rvs = set()
    pages = 0
    while True:
        page = apps.list_deployment_for_all_namespaces(limit=10, _continue=token)
        pages += 1
        names += [d.metadata.name for d in page.items]
        list_rvs.add(page.metadata.resource_version)
        token = page.metadata._continue
        if not token:
            break
    assert pages == 3
    assert sorted(names) == names and len(set(names)) == 25
    assert list_rvs == {kube_api.resource_version}  # every page reports the snapshot RV

    created = apps.read_namespaced_deployment("a00", "tenant-a")
    assert created.metadata.generation == 1
    assert created.metadata.uid and created.metadata.creation_timestamp
    assert int(created.metadata.resource_version) > 0

    only_b = apps.list_namespaced_deployment("tenant-b", limit=5)
    assert [d.metadata.name for d in only_b.items] == [f"b{i:02}" for i in range(5)]
    web = apps.list_deployment_for_all_namespaces(label_selector="tier in (web)")
    assert len(web.items) == 13
    one = apps.list_deployment_for_all_namespaces(field_selector="metadata.name=b03")
    assert [d.metadata.namespace for d in one.items] == ["tenant-b"]
    with pytest.raises(ApiException) as exc:
        apps.create_namespaced_deployment("tenant-a", deployment("a00"))
    assert exc.value.status == 409
    with pytest.raises(ApiException) as exc:
        apps.read_namespaced_deployment("missing", "tenant-a")
    assert exc.value.status == 404


def test_generation_and_conflicts(kube_api: KubeAPI, apps: AppsV1Api) -> None:
    created = apps.create_namespaced_deployment("tenant-a", deployment("web"))
    rv0 = int(created.metadata.resource_version)

    status_only = kube_api.update_status("deployments", "tenant-a", "web", {"replicas": 0})
    assert status_only["metadata"]["generation"] == 1
    assert int(status_only["metadata"]["resourceVersion"]) > rv0

    scaled = apps.patch_namespaced_deployment(
        "web", "tenant-a", {"spec": {"replicas": 2}}, _content_type=MERGE
    )
    assert scaled.metadata.generation == 2
    assert scaled.status.replicas == 0  # the main resource keeps the status

    labelled = apps.patch_namespaced_deployment(
        "web", "tenant-a", {"metadata": {"labels": {"x": "y"}}}, _content_type=MERGE
    )
    assert labelled.metadata.generation == 2

    stale = apps.read_namespaced_deployment("web", "tenant-a")
    stale.metadata.resource_version = created.metadata.resource_version
    with pytest.raises(ApiException) as exc:
        apps.replace_namespaced_deployment("web", "tenant-a", stale)
    assert exc.value.status == 409

    fresh = apps.read_namespaced_deployment("web", "tenant-a")
    fresh.spec.replicas = 5
    replaced = apps.replace_namespaced_deployment("web", "tenant-a", fresh)
    assert replaced.metadata.generation == 3

    before = kube_api.resource_version
    noop = apps.patch_namespaced_deployment(
        "web", "tenant-a", {"spec": {"replicas": 5}}, _content_type=MERGE
    )
    assert noop.metadata.resource_version == before == kube_api.resource_version


def test_watch_streams_changes_and_bookmarks(kube_api: KubeAPI, apps: AppsV1Api) -> None:
    apps.create_namespaced_deployment("tenant-a", deployment("before"))
    start_rv = apps.list_deployment_for_all_namespaces().metadata.resource_version
    kube_api.create(deployment("replayed"))  # after the list RV: replayed from history

    watcher = WatchThread(
        apps.list_deployment_for_all_namespaces,
        resource_version=start_rv,
        allow_watch_bookmarks=True,
        timeout_seconds=STREAM_GUARD,
    )
    first = watcher.next()
    assert (first["type"], first["object"].metadata.name) == ("ADDED", "replayed")

    kube_api.wait_for_watches("deployments")
    apps.create_namespaced_deployment("tenant-a", deployment("live"))
    apps.patch_namespaced_deployment(
        "live", "tenant-a", {"spec": {"replicas": 1}}, _content_type=MERGE
    )
    apps.delete_namespaced_deployment("live", "tenant-a")

    seen = [watcher.next_of("ADDED", "MODIFIED", "DELETED") for _ in range(3)]
    assert [(e["type"], e["object"].metadata.name) for e in seen] == [
        ("ADDED", "live"),
        ("MODIFIED", "live"),
        ("DELETED", "live"),
    ]
    assert seen[1]["object"].metadata.generation == 2
    rvs = [int(e["raw_object"]["metadata"]["resourceVersion"]) for e in seen]
    assert rvs == sorted(rvs) and len(set(rvs)) == 3

    bookmark = watcher.next_of("BOOKMARK")
    assert int(bookmark["raw_object"]["metadata"]["resourceVersion"]) >= rvs[-1]
    assert watcher.watch.resource_version == bookmark["raw_object"]["metadata"]["resourceVersion"]
    kube_api.break_watches()  # a clean end: the client stops (no retry with timeout_seconds)
    assert watcher.next_of("<END>")
    watcher.join()
    assert watcher.error is None


def test_watch_without_resource_version_lists_first(kube_api: KubeAPI, apps: AppsV1Api) -> None:
    kube_api.create(deployment("one"))
    kube_api.create(deployment("other", "tenant-b"))
    watcher = WatchThread(apps.list_namespaced_deployment, namespace="tenant-a", timeout_seconds=1)
    assert watcher.next()["object"].metadata.name == "one"
    assert watcher.next()["type"] == "<END>"  # the server honoured timeoutSeconds
    watcher.join()


def test_expire_watches_gives_410(kube_api: KubeAPI, apps: AppsV1Api) -> None:
    old_rv = apps.list_deployment_for_all_namespaces().metadata.resource_version
    watcher = WatchThread(
        apps.list_deployment_for_all_namespaces,
        resource_version=old_rv,
        timeout_seconds=STREAM_GUARD,  # also disables the client's silent retry after 410
    )
    kube_api.wait_for_watches("deployments")
    kube_api.expire_watches()
    assert watcher.next()["type"] == "<END>"
    watcher.join()
    assert isinstance(watcher.error, ApiException) and watcher.error.status == 410

    again = WatchThread(
        apps.list_deployment_for_all_namespaces, resource_version=old_rv, timeout_seconds=5
    )
    assert again.next()["type"] == "<END>"
    again.join()
    assert isinstance(again.error, ApiException) and again.error.status == 410

    # A fresh list gives an RV that can be watched again.
    new_rv = apps.list_deployment_for_all_namespaces().metadata.resource_version
    resumed = WatchThread(
        apps.list_deployment_for_all_namespaces, resource_version=new_rv, timeout_seconds=5
    )
    kube_api.wait_for_watches("deployments")
    kube_api.create(deployment("after"))
    assert resumed.next()["object"].metadata.name == "after"
    kube_api.break_watches()
    resumed.join()
    assert resumed.error is None


def test_continue_token_expires(kube_api: KubeAPI, apps: AppsV1Api) -> None:
    for i in range(4):
        kube_api.create(deployment(f"d{i}"))
    page = apps.list_deployment_for_all_namespaces(limit=2)
    kube_api.expire_watches()
    with pytest.raises(ApiException) as exc:
        apps.list_deployment_for_all_namespaces(limit=2, _continue=page.metadata._continue)
    assert exc.value.status == 410


def test_patch_namespace_annotations(kube_api: KubeAPI, core: CoreV1Api) -> None:
    created = core.create_namespace({"metadata": {"name": "tenant-a"}})
    assert created.status.phase == "Active"

    merged = core.patch_namespace(
        "tenant-a", {"metadata": {"annotations": {"cedar.io/selinux-level": "s0:c1,c2"}}},
        _content_type=MERGE,
    )  # fmt: skip
    assert merged.metadata.annotations == {"cedar.io/selinux-level": "s0:c1,c2"}

    # The client's default for a dict body is a strategic merge patch.
    strategic = core.patch_namespace("tenant-a", {"metadata": {"annotations": {"other": "x"}}})
    assert strategic.metadata.annotations == {"cedar.io/selinux-level": "s0:c1,c2", "other": "x"}
    assert kube_api.requests("patch", "namespaces") == 2

    removed = core.patch_namespace(
        "tenant-a", {"metadata": {"annotations": {"other": None}}}, _content_type=STRATEGIC
    )
    assert removed.metadata.annotations == {"cedar.io/selinux-level": "s0:c1,c2"}

    json_patched = core.patch_namespace(
        "tenant-a",
        [{"op": "replace", "path": "/metadata/annotations/cedar.io~1selinux-level", "value": "x"}],
    )
    assert json_patched.metadata.annotations == {"cedar.io/selinux-level": "x"}

    node = kube_api.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": "n1"}})
    assert "namespace" not in node["metadata"]
    patched = core.patch_node("n1", {"metadata": {"labels": {"kubernetes.io/os": "linux"}}})
    assert patched.metadata.labels == {"kubernetes.io/os": "linux"}


def test_delete_namespace_removes_its_objects(kube_api: KubeAPI, core: CoreV1Api) -> None:
    core.create_namespace({"metadata": {"name": "tenant-a"}})
    kube_api.create(deployment("web"))
    kube_api.create(replicaset("web-1", "tenant-a"))
    kube_api.create(replicaset("keep", "tenant-b"))
    core.delete_namespace("tenant-a")
    # Terminating first; the namespace controller empties and removes it (see
    # tests/integration/test_kube_fidelity.py for the whole sequence).
    kube_api.wait_gone("namespaces", None, "tenant-a")
    assert kube_api.list("deployments") == []
    assert [rs["metadata"]["name"] for rs in kube_api.list("replicasets")] == ["keep"]


def test_create_event(kube_api: KubeAPI, core: CoreV1Api) -> None:
    # An Event about a Namespace (cluster-scoped) lives in `default`.
    event = {
        "metadata": {"generateName": "tenant-a.", "namespace": "default"},
        "involvedObject": {"kind": "Namespace", "name": "tenant-a", "apiVersion": "v1"},
        "reason": "MCSLabelRestored",
        "message": "annotation tampered with; restored s0:c1,c2",
        "type": "Warning",
        "source": {"component": "cedar-mcs-allocator"},
    }
    created = core.create_namespaced_event("default", event)
    assert created.metadata.name.startswith("tenant-a.")
    recorded = kube_api.events_for("default")
    assert [e["reason"] for e in recorded] == ["MCSLabelRestored"]
    assert kube_api.events_for("tenant-a") == []
    found = core.list_namespaced_event(
        "default", field_selector="involvedObject.name=tenant-a,reason=MCSLabelRestored"
    )
    assert len(found.items) == 1


def test_forbid_gives_403(kube_api: KubeAPI, apps: AppsV1Api, core: CoreV1Api) -> None:
    kube_api.forbid("replicasets")
    with pytest.raises(ApiException) as exc:
        apps.list_replica_set_for_all_namespaces()
    assert exc.value.status == 403
    assert json.loads(exc.value.body)["reason"] == "Forbidden"
    watcher = WatchThread(apps.list_replica_set_for_all_namespaces, timeout_seconds=5)
    assert watcher.next()["type"] == "<END>"
    watcher.join()
    assert isinstance(watcher.error, ApiException) and watcher.error.status == 403
    assert apps.list_deployment_for_all_namespaces().items == []  # others are allowed
    kube_api.allow("replicasets")
    assert apps.list_replica_set_for_all_namespaces().items == []


def test_fail_next(kube_api: KubeAPI, core: CoreV1Api) -> None:
    core.create_namespace({"metadata": {"name": "tenant-a"}})
    kube_api.fail_next("patch", "namespaces", count=2, status=500)
    body = {"metadata": {"annotations": {"a": "b"}}}
    for _ in range(2):
        with pytest.raises(ApiException) as exc:
            core.patch_namespace("tenant-a", body, _content_type=MERGE)
        assert exc.value.status == 500
    assert core.patch_namespace("tenant-a", body, _content_type=MERGE).metadata.annotations
    assert kube_api.requests("patch", "namespaces") == 3
    assert kube_api.requests("create") == 1


def test_restart_keeps_state(kube_api: KubeAPI, apps: AppsV1Api) -> None:
    kube_api.create(deployment("web"))
    url = kube_api.url
    watcher = WatchThread(
        apps.list_deployment_for_all_namespaces,
        resource_version=kube_api.resource_version,
        timeout_seconds=STREAM_GUARD,
    )
    kube_api.wait_for_watches("deployments")
    kube_api.restart()
    assert watcher.next()["type"] == "<END>"  # the open watch was cut
    watcher.join()
    assert kube_api.url == url
    assert [d.metadata.name for d in apps.list_deployment_for_all_namespaces().items] == ["web"]


def test_bulk_load(kube_api: KubeAPI, apps: AppsV1Api) -> None:
    count = kube_api.load(replicaset(f"rs-{i:04}", f"ns-{i % 7}") for i in range(2000))
    assert count == 2000
    seen = 0
    token = None
    while True:
        page = apps.list_replica_set_for_all_namespaces(limit=500, _continue=token)
        seen += len(page.items)
        token = page.metadata._continue
        if not token:
            break
    assert seen == 2000
    assert len(kube_api.list("replicasets", namespace="ns-3")) == len(range(3, 2000, 7))


# ------------------------------------------------------------------ raw aiohttp


async def test_aiohttp_raw_watch(kube_api: KubeAPI) -> None:
    kube_api.create(deployment("web"))
    rv = kube_api.resource_version
    url = f"{kube_api.url}/apis/apps/v1/namespaces/tenant-a/deployments"
    params = {
        "watch": "1",
        "resourceVersion": rv,
        "allowWatchBookmarks": "true",
        "timeoutSeconds": str(STREAM_GUARD),
    }
    timeout = aiohttp.ClientTimeout(sock_read=STREAM_GUARD)
    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(url, params=params) as response,
    ):
        assert response.status == 200
        assert response.headers.get("Transfer-Encoding") == "chunked"
        kube_api.patch("deployments", "tenant-a", "web", {"spec": {"replicas": 3}})
        kube_api.create(deployment("elsewhere", "tenant-b"))  # filtered out by namespace
        kube_api.delete("deployments", "tenant-a", "web")
        events: list[dict[str, Any]] = []
        while len([e for e in events if e["type"] != "BOOKMARK"]) < 2:
            events.append(json.loads(await response.content.readline()))
        changes = [(e["type"], e["object"]["metadata"]["name"]) for e in events]
        assert [c for c in changes if c[0] != "BOOKMARK"] == [
            ("MODIFIED", "web"),
            ("DELETED", "web"),
        ]
        while (event := json.loads(await response.content.readline()))["type"] != "BOOKMARK":
            pass
        assert event["object"]["kind"] == "Deployment"
        kube_api.break_watches()
        rest = await response.content.read()  # returns: the stream ended cleanly
        assert all(json.loads(line)["type"] == "BOOKMARK" for line in rest.splitlines())

    async with (
        aiohttp.ClientSession(timeout=timeout) as session,
        session.get(url, params={"watch": "1", "resourceVersion": rv}) as response,
    ):
        await kube_api.await_watches("deployments")
        kube_api.expire_watches()
        while (error := json.loads(await response.content.readline()))["type"] != "ERROR":
            assert error["type"] in ("MODIFIED", "DELETED")  # the history up to the expiry
        assert error["object"]["code"] == 410
        assert error["object"]["reason"] == "Expired"
        assert await response.content.read() == b""


async def test_aiohttp_watch_failures(kube_api: KubeAPI) -> None:
    url = f"{kube_api.url}/apis/apps/v1/replicasets"
    timeout = aiohttp.ClientTimeout(sock_read=STREAM_GUARD)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        kube_api.fail_next("watch", "replicasets", status=503)
        async with session.get(url, params={"watch": "1"}) as response:
            assert response.status == 503
            assert (await response.json())["kind"] == "Status"

        async with session.get(url, params={"watch": "1"}) as response:
            await kube_api.await_watches("replicasets")
            kube_api.break_watches(abrupt=True)
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.content.read()

        response = await session.get(url, params={"watch": "1"})
        await kube_api.await_watches("replicasets")
        response.close()  # the client goes away: the server forgets the watch
        await kube_api.await_watches("replicasets", 0, exactly=True)
    assert kube_api.requests("watch", "replicasets") == 3


# ------------------------------------------------------------------ fault modes
#
# Each mode answers as the real API server does; kubeapi_faults.py cites the Kubernetes
# sources (maxinflight.go / priority-and-fairness.go for 429, responsewriters/writers.go for
# Retry-After from a Status, cacher.go and handlers/watch.go for a watch's 410 ERROR event).

NAMESPACES = "/api/v1/namespaces"


def _auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Accept": "application/json"}


async def test_throttle_answers_as_the_flow_control_filters(kube_api: KubeAPI) -> None:
    kube_api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "tenant-a"}})
    timeout = aiohttp.ClientTimeout(sock_read=STREAM_GUARD)
    async with aiohttp.ClientSession(timeout=timeout, headers=_auth("t")) as session:
        kube_api.fault("throttle", retry_after=7)
        for params in ({}, {"watch": "1"}):  # a watch is throttled before its stream starts
            async with session.get(kube_api.url + NAMESPACES, params=params) as response:
                assert response.status == 429
                assert response.headers["Retry-After"] == "7"
                assert response.content_type == "text/plain"
                assert await response.text() == "Too many requests, please try again later.\n"
        kube_api.clear_faults()
        kube_api.fault("throttle", retry_after=3, body="status")
        async with session.get(kube_api.url + NAMESPACES + "/tenant-a") as response:
            assert response.status == 429
            assert response.headers["Retry-After"] == "3"
            status = await response.json()
        assert (status["kind"], status["code"], status["reason"]) == (
            "Status",
            429,
            "TooManyRequests",
        )
        assert status["details"]["retryAfterSeconds"] == 3
        kube_api.clear_faults()
        async with session.get(kube_api.url + NAMESPACES + "/tenant-a") as response:
            assert response.status == 200
    outcomes = [r.outcome for r in kube_api.request_log()]
    assert outcomes == ["throttle", "throttle", "throttle", "served"]


async def test_fail_reset_and_narrowing(kube_api: KubeAPI) -> None:
    kube_api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "tenant-a"}})
    one = kube_api.url + NAMESPACES + "/tenant-a"
    timeout = aiohttp.ClientTimeout(sock_read=STREAM_GUARD)
    async with aiohttp.ClientSession(timeout=timeout, headers=_auth("victim")) as session:
        kube_api.fault("fail", status=503, retry_after=2, verbs=["list"], clients=["victim"])
        async with session.get(kube_api.url + NAMESPACES) as response:
            assert response.status == 503
            assert response.headers["Retry-After"] == "2"
            body = await response.json()
            assert (body["reason"], body["details"]["retryAfterSeconds"]) == (
                "ServiceUnavailable",
                2,
            )
        async with session.get(one) as response:  # a get: not this fault's verb
            assert response.status == 200
        async with session.get(
            kube_api.url + NAMESPACES, headers=_auth("bystander")
        ) as response:  # another client
            assert response.status == 200
        kube_api.clear_faults()
        kube_api.fault("reset", resources=["namespaces"])
        with pytest.raises(aiohttp.ClientConnectionError):  # no byte of an answer
            async with session.get(one) as response:
                await response.read()
        kube_api.clear_faults()
        async with session.get(one) as response:
            assert response.status == 200
    seen = [(r.client, r.verb, r.outcome) for r in kube_api.request_log()]
    # aiohttp sends an idempotent request again once when its connection drops (RFC 9112
    # 9.3.1), so the reset GET may have arrived twice.
    assert 1 <= seen.count(("victim", "get", "reset")) <= 2
    assert [entry for entry in seen if entry[2] != "reset"] == [
        ("victim", "list", "fail"),
        ("victim", "get", "served"),
        ("bystander", "list", "served"),
        ("victim", "get", "served"),
    ]


async def test_stall_sends_headers_then_never_finishes(kube_api: KubeAPI) -> None:
    kube_api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "tenant-a"}})
    kube_api.fault("stall")
    timeout = aiohttp.ClientTimeout(sock_read=0.5)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(kube_api.url + NAMESPACES) as response:
            assert response.status == 200  # the headers came
            begun = await response.content.readany()
            assert begun.startswith(b'{"kind":"List"')
            with pytest.raises(aiohttp.ServerTimeoutError):  # the rest never does
                await response.read()
        params = {"watch": "1", "allowWatchBookmarks": "true"}
        async with session.get(kube_api.url + NAMESPACES, params=params) as response:
            assert response.status == 200
            with pytest.raises(aiohttp.ServerTimeoutError):  # not even a bookmark
                await response.content.readline()
    kube_api.clear_faults()
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(sock_read=STREAM_GUARD)) as s,
        s.get(kube_api.url + NAMESPACES) as response,
    ):
        assert [i["metadata"]["name"] for i in (await response.json())["items"]] == ["tenant-a"]


def test_expire_mode_gives_every_watch_410(kube_api: KubeAPI, apps: AppsV1Api) -> None:
    kube_api.fault("expire")
    current = apps.list_deployment_for_all_namespaces().metadata.resource_version  # served
    for rv in (current, None):  # even a current resourceVersion, even none
        watcher = WatchThread(
            apps.list_deployment_for_all_namespaces,
            resource_version=rv,
            timeout_seconds=STREAM_GUARD,
        )
        assert watcher.next()["type"] == "<END>"
        watcher.join()
        assert isinstance(watcher.error, ApiException) and watcher.error.status == 410
    kube_api.clear_faults()
    kube_api.create(deployment("web"))
    resumed = WatchThread(
        apps.list_deployment_for_all_namespaces, resource_version=current, timeout_seconds=5
    )
    assert resumed.next()["object"].metadata.name == "web"
    kube_api.break_watches()
    resumed.join()
    assert resumed.error is None
    assert [r.outcome for r in kube_api.request_log(verb="watch")] == [
        "expire",
        "expire",
        "served",
    ]


async def test_restart_with_down_time(kube_api: KubeAPI) -> None:
    kube_api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "tenant-a"}})
    timeout = aiohttp.ClientTimeout(sock_read=STREAM_GUARD)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        async with session.get(kube_api.url + NAMESPACES, params={"watch": "1"}) as response:
            await kube_api.await_watches("namespaces")
            kube_api.stop(abrupt=True)  # as if the process died: the stream is reset
            with pytest.raises(aiohttp.ClientPayloadError):
                await response.read()
        with pytest.raises(aiohttp.ClientConnectorError):  # down: the port refuses
            async with session.get(kube_api.url + NAMESPACES):
                pass
        kube_api.start()
        async with session.get(kube_api.url + NAMESPACES, params={"watch": "1"}) as response:
            await kube_api.await_watches("namespaces")
            restarting = asyncio.create_task(asyncio.to_thread(kube_api.restart, 0.3))
            await response.read()  # a graceful stop ends the watch cleanly
            await restarting
        async with session.get(kube_api.url + NAMESPACES) as response:  # the same state
            assert [i["metadata"]["name"] for i in (await response.json())["items"]] == ["tenant-a"]


async def test_request_log_per_client_and_second(kube_api: KubeAPI, tmp_path: Path) -> None:
    """Clients are told apart by their token: here Cedar's own client, through a kubeconfig."""
    client = KubeClient(load_config(str(kube_api.write_kubeconfig(tmp_path / "kc", "svc-a"))))
    try:
        start = time.monotonic()
        for _ in range(5):
            await client.request("GET", NAMESPACES)
        end = time.monotonic()
    finally:
        await client.close()
    async with (
        aiohttp.ClientSession(headers=_auth("svc-b")) as session,
        session.get(kube_api.url + NAMESPACES) as response,
    ):
        assert response.status == 200
    mine = kube_api.request_log(client="svc-a", verb="list", resource="namespaces")
    assert len(mine) == 5 and all(start <= r.at <= end for r in mine)
    assert kube_api.peak_rate(client="svc-a") == 5  # all within one second: a burst of 5
    assert kube_api.peak_rate(window=1e-9, client="svc-a") == 1
    assert kube_api.peak_rate(client="svc-b") == 1
    assert sum(per_second(mine, start, start + 1)) == 5
    assert {r.client for r in kube_api.request_log()} == {"svc-a", "svc-b"}
