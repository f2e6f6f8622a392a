"""The simulated Kubernetes API behaves as the real one where Cedar depends on it.

Each test names the Kubernetes source the behaviour comes from (kubernetes/kubernetes), and
each failed against the simulator before the behaviour was added. The kubectl matrix is in
tests/e2e/test_kubectl.py.
"""

from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import pytest

from cedar.sandbox.errors import ApiError
from cedar.sandbox.kubeapi import KubeAPI
from cedar.sandbox.kubeapi_deployments import compute_hash, fnv32a, safe_encode

# A stuck wait must fail the test, not hang it (not a timing assertion).
GUARD = 20.0


def namespace(name: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}


def deployment(
    name: str, ns: str = "tenant-a", image: str = "app:1", **meta: Any
) -> dict[str, Any]:
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": ns, **meta},
        "spec": {
            "replicas": 0,
            "selector": {"matchLabels": {"app": name}},
            "template": {
                "metadata": {"labels": {"app": name}},
                "spec": {"containers": [{"name": "app", "image": image}]},
            },
        },
    }


def core_event(ns: str, involved: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": "x.", "namespace": ns},
        "involvedObject": involved,
        "reason": "MCSLevelTampered",
        "message": "restored",
        "type": "Warning",
        **extra,
    }


def eventually(check: Callable[[], Any], what: str, within: float = GUARD) -> Any:
    deadline = time.monotonic() + within
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def rejected(call: Callable[[], Any]) -> ApiError:
    with pytest.raises(ApiError) as caught:
        call()
    return caught.value


@pytest.fixture
def api() -> Iterator[KubeAPI]:
    """Short controller delays, so a test need not wait as long as a real cluster."""
    server = KubeAPI(
        namespace_delay=0.3,
        node_startup_grace=0.5,
        node_monitor_grace=0.5,
        deployment_controller=True,
    ).start()
    try:
        yield server
    finally:
        server.stop()


class Watch:
    """A raw HTTP watch (the simulator's own wire format) read from a thread."""

    def __init__(self, url: str) -> None:
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._read(url)), daemon=True)
        self._thread.start()

    async def _read(self, url: str) -> None:
        timeout = aiohttp.ClientTimeout(sock_read=GUARD)
        async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as resp:
            while line := await resp.content.readline():
                self.lines.put(json.loads(line))

    def next(self) -> dict[str, Any]:
        return self.lines.get(timeout=GUARD)


# ---------------------------------------------------------------- 1. Events


def test_event_namespace_must_match_its_involved_object(api: KubeAPI) -> None:
    """pkg/apis/core/validation/events.go legacyValidateEvent: an Event about a
    cluster-scoped object (no involvedObject.namespace) lives in `default` or nowhere; one
    about a namespaced object lives in that object's namespace."""
    cluster_scoped = {"kind": "Namespace", "name": "tenant-a", "apiVersion": "v1"}
    error = rejected(lambda: api.create(core_event("tenant-a", cluster_scoped)))
    name = error.details["name"]
    assert name.startswith("x.")
    # The body the real server answered with (issue 12), cause by cause.
    assert error.status() == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": f'Event "{name}" is invalid: involvedObject.namespace: Invalid value: "": '
        "does not match event.namespace",
        "reason": "Invalid",
        "details": {
            "name": name,
            "group": "",
            "kind": "Event",
            "causes": [
                {
                    "reason": "FieldValueInvalid",
                    "message": 'Invalid value: "": does not match event.namespace',
                    "field": "involvedObject.namespace",
                }
            ],
        },
        "code": 422,
    }
    assert api.create(core_event("default", cluster_scoped))["metadata"]["namespace"] == "default"
    namespaced = {"kind": "Deployment", "name": "web", "namespace": "tenant-a"}
    assert api.create(core_event("tenant-a", namespaced))["metadata"]["namespace"] == "tenant-a"
    elsewhere = rejected(lambda: api.create(core_event("tenant-b", namespaced)))
    assert elsewhere.code == 422
    assert 'Invalid value: "tenant-a": does not match event.namespace' in elsewhere.message
    # An update is held to the same rule (ValidateEventUpdate starts with the legacy check).
    ok = api.events_for("tenant-a")[0]
    moved = {**ok, "involvedObject": {**ok["involvedObject"], "namespace": "tenant-b"}}
    assert rejected(lambda: api.update(moved)).code == 422


def test_events_k8s_io_v1_takes_the_strict_rules(api: KubeAPI) -> None:
    """events.go ValidateEventCreate: events.k8s.io/v1 requires eventTime,
    reportingController, reportingInstance, action and reason; with eventTime set an Event
    about a cluster-scoped object may also be in kube-system."""
    regarding = {"kind": "Node", "name": "n1", "apiVersion": "v1"}
    bare = {
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        "metadata": {"name": "e1", "namespace": "kube-system"},
        "regarding": regarding,
        "type": "Normal",
    }
    error = rejected(lambda: api.create(bare))
    # Without eventTime the legacy rule applies too: kube-system is not `default`.
    assert {c["field"] for c in error.details["causes"]} == {
        "eventTime",
        "involvedObject.namespace",
    }
    timed = {**bare, "eventTime": "2026-01-01T00:00:00.000000Z"}
    error = rejected(lambda: api.create(timed))
    assert {c["field"] for c in error.details["causes"]} == {
        "reportingController",
        "reportingInstance",
        "action",
        "reason",
    }
    full = {
        **timed,
        "reportingController": "cedar.io/mcs-allocator",
        "reportingInstance": "replica-0",
        "action": "Restore",
        "reason": "MCSLevelTampered",
    }
    assert api.create(full)["metadata"]["namespace"] == "kube-system"
    in_tenant = {**full, "metadata": {"name": "e2", "namespace": "tenant-a"}}
    assert rejected(lambda: api.create(in_tenant)).code == 422


# ---------------------------------------------------------------- 2. metadata


def test_labels_and_annotations_are_validated(api: KubeAPI) -> None:
    """staging/src/k8s.io/apimachinery/pkg/api/validation/objectmeta.go
    (ValidateAnnotations, 256 KiB in total) and pkg/apis/meta/v1/validation/validation.go
    (ValidateLabels): keys are qualified names, label values at most 63 characters."""
    api.create(namespace("tenant-a"))
    good = {"cedar.io/selinux-level": "s0:c1,c2", "Example.COM/Mixed_Case": "any value at all"}
    api.patch("namespaces", None, "tenant-a", {"metadata": {"annotations": good}})

    bad_key = rejected(
        lambda: api.patch(
            "namespaces", None, "tenant-a", {"metadata": {"annotations": {"a b": "x"}}}
        )
    )
    assert bad_key.code == 422
    assert bad_key.message.startswith('Namespace "tenant-a" is invalid: metadata.annotations: ')
    assert bad_key.details["causes"][0]["field"] == "metadata.annotations"
    assert 'Invalid value: "a b": name part must consist of alphanumeric' in bad_key.message

    too_big = {"metadata": {"annotations": {"big": "x" * (256 * 1024)}}}
    error = rejected(lambda: api.patch("namespaces", None, "tenant-a", too_big))
    assert error.details["causes"] == [
        {
            "reason": "FieldValueTooLong",
            "message": "Too long: must have at most 262144 bytes",
            "field": "metadata.annotations",
        }
    ]
    bad_value = {"metadata": {"labels": {"team": "not valid!"}}}
    assert rejected(lambda: api.patch("namespaces", None, "tenant-a", bad_value)).code == 422
    long_value = {"metadata": {"labels": {"team": "x" * 64}}}
    assert "must be no more than 63 characters" in (
        rejected(lambda: api.patch("namespaces", None, "tenant-a", long_value)).message
    )
    bad_prefix = deployment("web", labels={"Not_A.Domain/x": "y"})
    assert "prefix part" in rejected(lambda: api.create(bad_prefix)).message
    # Nothing of the refused writes was stored.
    stored = api.get("namespaces", None, "tenant-a") or {}
    assert stored["metadata"]["annotations"] == good
    assert "labels" not in stored["metadata"]


def test_resource_version_conflict_is_the_real_409(api: KubeAPI) -> None:
    """staging/src/k8s.io/apiserver/pkg/registry/generic/registry/store.go Update with
    apimachinery's NewConflict: the qualified resource, OptimisticLockErrorMsg."""
    created = api.create(deployment("web"))
    api.patch("deployments", "tenant-a", "web", {"spec": {"replicas": 1}})
    stale = {"metadata": {"resourceVersion": created["metadata"]["resourceVersion"]}}
    error = rejected(lambda: api.patch("deployments", "tenant-a", "web", stale))
    assert error.status() == {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": 'Operation cannot be fulfilled on deployments.apps "web": the object has '
        "been modified; please apply your changes to the latest version and try again",
        "reason": "Conflict",
        "details": {"name": "web", "group": "apps", "kind": "deployments"},
        "code": 409,
    }
    missing = rejected(lambda: api.delete("deployments", "tenant-a", "nope"))
    assert missing.message == 'deployments.apps "nope" not found'


# ---------------------------------------------------------------- 3. namespace deletion


def test_namespace_deletion_goes_through_terminating(api: KubeAPI) -> None:
    """pkg/registry/core/namespace/storage/storage.go Delete (deletionTimestamp, phase
    Terminating, the `kubernetes` finalizer stays), staging/src/k8s.io/apiserver/pkg/admission/
    plugin/namespace/lifecycle/admission.go (no new content), then
    pkg/controller/namespace/deletion/namespaced_resources_deleter.go (content, conditions,
    finalizer, gone)."""
    created = api.create(namespace("tenant-a"))
    assert created["spec"]["finalizers"] == ["kubernetes"]
    assert created["status"] == {"phase": "Active"}
    api.create(deployment("web"))
    rv = api.resource_version
    ns_watch = Watch(f"{api.url}/api/v1/namespaces?watch=1&resourceVersion={rv}")
    dep_watch = Watch(f"{api.url}/apis/apps/v1/deployments?watch=1&resourceVersion={rv}")
    api.wait_for_watches("namespaces")
    api.wait_for_watches("deployments")

    answered = api.delete("namespaces", None, "tenant-a")
    assert answered["status"]["phase"] == "Terminating"
    assert answered["metadata"]["deletionTimestamp"]
    assert answered["spec"]["finalizers"] == ["kubernetes"]
    still = api.get("namespaces", None, "tenant-a")
    assert still is not None and still["status"]["phase"] == "Terminating"
    refused = rejected(lambda: api.create(deployment("late")))
    assert refused.code == 403
    assert refused.message == (
        'deployments.apps "late" is forbidden: unable to create new content in namespace '
        "tenant-a because it is being terminated"
    )
    assert refused.details["causes"] == [
        {
            "reason": "NamespaceTerminating",
            "message": "namespace tenant-a is being terminated",
            "field": "metadata.namespace",
        }
    ]
    again = rejected(lambda: api.delete("namespaces", None, "tenant-a"))
    assert again.code == 409 and "ensuring all content is removed" in again.message

    terminating = ns_watch.next()
    assert terminating["type"] == "MODIFIED"
    assert terminating["object"]["status"]["phase"] == "Terminating"
    content = dep_watch.next()
    assert (content["type"], content["object"]["metadata"]["name"]) == ("DELETED", "web")
    conditions = ns_watch.next()
    assert conditions["type"] == "MODIFIED"
    assert {c["type"] for c in conditions["object"]["status"]["conditions"]} >= {
        "NamespaceContentRemaining",
        "NamespaceFinalizersRemaining",
    }
    gone = ns_watch.next()
    assert gone["type"] == "DELETED"
    rvs = [int(e["object"]["metadata"]["resourceVersion"]) for e in (terminating, content, gone)]
    assert rvs == sorted(rvs), "Terminating, then the content, then the namespace"
    assert api.get("namespaces", None, "tenant-a") is None
    # The name is free again, for a new namespace with a new uid.
    assert api.create(namespace("tenant-a"))["metadata"]["uid"] != created["metadata"]["uid"]


# ---------------------------------------------------------------- 4. nodes


def _taints(api: KubeAPI, name: str) -> list[tuple[str, str]]:
    node = api.get("nodes", None, name) or {}
    return [(t["key"], t["effect"]) for t in (node.get("spec") or {}).get("taints") or []]


def test_node_without_kubelet_is_tainted_then_unreachable(api: KubeAPI) -> None:
    """plugin/pkg/admission/nodetaint/admission.go (TaintNodesAtCreation: not-ready at
    create), pkg/controller/nodelifecycle/node_lifecycle_controller.go
    (doNoScheduleTaintingPass removes it from a Node without conditions; tryUpdateNodeHealth
    marks a Node that never posted status Ready=Unknown after the startup grace period;
    the taints follow: unreachable NoSchedule and NoExecute)."""
    created = api.create(
        {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": "n1"},
            "spec": {"taints": [{"key": "gpu", "value": "true", "effect": "NoSchedule"}]},
        }
    )
    assert [(t["key"], t["effect"]) for t in created["spec"]["taints"]] == [
        ("gpu", "NoSchedule"),
        ("node.kubernetes.io/not-ready", "NoSchedule"),
    ]
    eventually(lambda: _taints(api, "n1") == [("gpu", "NoSchedule")], "not-ready removed")
    eventually(
        lambda: ("node.kubernetes.io/unreachable", "NoSchedule") in _taints(api, "n1"),
        "unreachable after the startup grace period",
    )
    node = api.get("nodes", None, "n1") or {}
    ready = next(c for c in node["status"]["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("Unknown", "NodeStatusNeverUpdated")
    assert sorted(_taints(api, "n1")) == [
        ("gpu", "NoSchedule"),
        ("node.kubernetes.io/unreachable", "NoExecute"),
        ("node.kubernetes.io/unreachable", "NoSchedule"),
    ]
    # A kubelet posting Ready=True: the controller takes its taints off again.
    status = {**node["status"], "conditions": [{**ready, "status": "True", "reason": "Up"}]}
    api.update_status("nodes", None, "n1", status)
    eventually(lambda: _taints(api, "n1") == [("gpu", "NoSchedule")], "taints removed")


# ---------------------------------------------------------------- 5. Deployments


def test_generation_follows_spec_and_deployment_annotations(api: KubeAPI) -> None:
    """pkg/registry/apps/deployment/strategy.go PrepareForUpdate: a Deployment's generation
    goes up on a spec or an annotation change (annotations are copied to its ReplicaSets);
    pkg/registry/apps/replicaset/strategy.go: a ReplicaSet's on a spec change only."""
    assert api.create(deployment("web", revisionHistoryLimit=1))["metadata"]["generation"] == 1

    def generation() -> int:
        return int((api.get("deployments", "tenant-a", "web") or {})["metadata"]["generation"])

    api.patch("deployments", "tenant-a", "web", {"spec": {"replicas": 2}})
    assert generation() == 2
    api.patch("deployments", "tenant-a", "web", {"metadata": {"annotations": {"team": "blue"}}})
    assert generation() == 3
    api.patch("deployments", "tenant-a", "web", {"metadata": {"labels": {"tier": "web"}}})
    api.update_status("deployments", "tenant-a", "web", {"replicas": 0})
    assert generation() == 3
    rs = api.create({**deployment("standalone"), "kind": "ReplicaSet"})
    api.patch("replicasets", "tenant-a", "standalone", {"metadata": {"annotations": {"a": "b"}}})
    assert (api.get("replicasets", "tenant-a", "standalone") or {})["metadata"]["generation"] == 1
    assert rs["metadata"]["generation"] == 1


def test_pod_template_hash_is_fnv32a_safe_encoded() -> None:
    """pkg/controller/controller_utils.go ComputeHash: FNV-1a 32, the collision count as 8
    little-endian bytes, SafeEncodeString (staging/src/k8s.io/apimachinery/pkg/util/rand)."""
    assert fnv32a(b"") == 0x811C9DC5  # the FNV-1a offset basis and published test vectors
    assert fnv32a(b"a") == 0xE40C292C
    assert fnv32a(b"foobar") == 0xBF9CF968
    # Each byte % 27 picks from bcdfghjklmnpqrstvwxz2456789: "0" is 48, 48 % 27 = 21, "4".
    assert safe_encode("0123456789") == "456789bcdf"
    template = deployment("web")["spec"]["template"]
    first = compute_hash(template, None)
    assert compute_hash(json.loads(json.dumps(template)), None) == first
    assert (
        compute_hash(template, 1)
        != first
        != compute_hash(deployment("web", image="x")["spec"]["template"], None)
    )
    assert set(first) <= set("bcdfghjklmnpqrstvwxz2456789")


def _replicasets(api: KubeAPI, owner: str) -> dict[str, dict[str, Any]]:
    return {
        rs["metadata"]["name"]: rs
        for rs in api.list("replicasets", namespace="tenant-a")
        if any(r.get("name") == owner for r in rs["metadata"].get("ownerReferences") or [])
    }


def _revisions(api: KubeAPI, owner: str) -> dict[str, tuple[str, int]]:
    annotations = "deployment.kubernetes.io/revision"
    return {
        name: (rs["metadata"]["annotations"][annotations], rs["spec"]["replicas"])
        for name, rs in _replicasets(api, owner).items()
    }


def test_deployment_controller_keeps_a_replicaset_per_template(api: KubeAPI) -> None:
    """pkg/controller/deployment/sync.go getNewReplicaSet and cleanupDeployment,
    pkg/controller/deployment/util/deployment_util.go SetNewReplicaSetAnnotations."""
    created = api.create(
        {
            **deployment("web"),
            "metadata": {**deployment("web")["metadata"], "annotations": {"team": "blue"}},
        }
    )
    api.patch(
        "deployments", "tenant-a", "web", {"spec": {"revisionHistoryLimit": 1, "replicas": 3}}
    )
    first = eventually(lambda: _replicasets(api, "web"), "the first ReplicaSet")
    (name,) = first
    rs = first[name]
    hash_ = rs["metadata"]["labels"]["pod-template-hash"]
    assert name == f"web-{hash_}"
    assert rs["spec"]["selector"]["matchLabels"] == {"app": "web", "pod-template-hash": hash_}
    assert rs["spec"]["template"]["metadata"]["labels"]["pod-template-hash"] == hash_
    owner = rs["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"], owner["controller"]) == (
        "Deployment",
        created["metadata"]["uid"],
        True,
    )
    assert rs["metadata"]["annotations"]["team"] == "blue"  # copied from the Deployment
    eventually(lambda: _revisions(api, "web") == {name: ("1", 3)}, "replicas 3, revision 1")
    eventually(
        lambda: (
            (api.get("deployments", "tenant-a", "web") or {})["metadata"]["annotations"].get(
                "deployment.kubernetes.io/revision"
            )
            == "1"
        ),
        "the Deployment's revision",
    )

    def set_image(image: str) -> None:
        current = api.get("deployments", "tenant-a", "web") or {}
        current["spec"]["template"]["spec"]["containers"][0]["image"] = image
        api.update(current)

    set_image("app:2")
    second = eventually(lambda: set(_replicasets(api, "web")) - {name}, "the second ReplicaSet")
    (name2,) = second
    eventually(lambda: _revisions(api, "web") == {name: ("1", 0), name2: ("2", 3)}, "rollout")
    # The first template comes back: its ReplicaSet is the new one again, revision 3.
    set_image("app:1")
    eventually(lambda: _revisions(api, "web") == {name: ("3", 3), name2: ("2", 0)}, "rollback")
    history = _replicasets(api, "web")[name]["metadata"]["annotations"]
    assert history["deployment.kubernetes.io/revision-history"] == "1"
    # A third template: with revisionHistoryLimit 1, the oldest old ReplicaSet goes.
    set_image("app:3")
    eventually(
        lambda: len(_replicasets(api, "web")) == 2 and name2 not in _replicasets(api, "web"),
        "cleanup",
    )
    # Deleting the Deployment takes its ReplicaSets with it (background garbage collection).
    api.delete("deployments", "tenant-a", "web")
    eventually(lambda: not _replicasets(api, "web"), "garbage collection")


def test_deployment_controller_is_off_unless_asked(kube_api: KubeAPI) -> None:
    """Tests that write a Deployment's ReplicaSets themselves get none from a controller."""
    kube_api.create(deployment("web"))
    kube_api.create({**deployment("other"), "kind": "ReplicaSet"})
    time.sleep(0.3)  # what a running controller would have needed; nothing may appear
    assert [rs["metadata"]["name"] for rs in kube_api.list("replicasets")] == ["other"]


# ---------------------------------------------------------------- 6. watch delivery


async def test_watch_event_arrives_after_the_response() -> None:
    """staging/src/k8s.io/apiserver/pkg/storage/cacher/cacher.go: watches are served from
    the watch cache, fed asynchronously from etcd's watch: a client sees its own write's
    response first and its watch event later, never within the response."""
    api = KubeAPI(watch_delay=1.0).start()
    try:
        rv = api.resource_version
        url = f"{api.url}/apis/apps/v1/namespaces/tenant-a/deployments"
        timeout = aiohttp.ClientTimeout(sock_read=GUARD)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            watch = await session.get(url, params={"watch": "1", "resourceVersion": rv})
            await api.await_watches("deployments")
            async with session.post(url, json=deployment("web")) as created:
                assert created.status == 201
                written = await created.json()
            # Answered, and the watch event is still held back (a second is far longer than
            # this check takes): it is not part of the write.
            held = api.store.pending(api.resource("deployments"), int(rv))
            assert held is not None and held.events == [] and held.due is not None
            event = json.loads(await watch.content.readline())
            assert event["type"] == "ADDED"
            assert (
                event["object"]["metadata"]["resourceVersion"]
                == written["metadata"]["resourceVersion"]
            )
            watch.close()
        # A list sees the write at once.
        assert [d["metadata"]["name"] for d in api.list("deployments")] == ["web"]
    finally:
        api.stop()
