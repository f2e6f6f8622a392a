"""The watcher against the simulated Kubernetes API and a real NATS server.

Every test gets its own NATS server (`fresh_nats`) so the streams hold only what the test
did. Waits poll NATS with short sleeps up to a deadline; nothing asserts on elapsed time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from cedar.proto import subjects
from cedar.proto.models import NamespaceEvent, WorkloadImageSet
from cedar.runtime.bus import Bus
from cedar.runtime.health import Health
from cedar.runtime.service import Runtime
from cedar.sandbox.kubeapi import KubeAPI
from cedar.sandbox.nats import NatsServer
from cedar.watcher import app, informer, metrics
from cedar.watcher.settings import WatcherSettings
from tests.harness import waiting

pytestmark = pytest.mark.integration

T = TypeVar("T")
NS = "tenant-a"


# ---------------------------------------------------------------- helpers


class RunningWatcher:
    def __init__(self, settings: WatcherSettings) -> None:
        self.settings = settings
        self.health = Health()
        self.bus = Bus(settings, "cedar-watcher-test", self.health)
        self.runtime: Runtime[WatcherSettings] = Runtime("watcher", settings, self.health, self.bus)
        self.task: asyncio.Task[None] | None = None
        # As app.main does first thing; done here too so that `ready` cannot be seen
        # before the watcher has even started.
        for kind in settings.kinds:
            self.health.require(informer.health_check_name(kind))

    async def start(self) -> RunningWatcher:
        await self.bus.connect()
        self.task = asyncio.create_task(app.main(self.runtime))
        return self

    async def stop(self) -> None:
        self.runtime.stop.set()
        if self.task is not None:
            await asyncio.wait_for(self.task, 30)
        await self.bus.close()

    @property
    def js(self) -> Any:
        return self.bus.js

    async def wait_ready(self, deadline_s: float = 20.0) -> None:
        await eventually(lambda: _const(self.health.ready), deadline_s, "watcher ready")


async def _const(value: T) -> T:
    return value


@contextlib.asynccontextmanager
async def watcher(
    nats: NatsServer, kubeconfig: Path, **overrides: Any
) -> AsyncIterator[RunningWatcher]:
    settings = WatcherSettings(
        nats_url=nats.url,
        kubeconfig=str(kubeconfig),
        metrics_port=0,
        publish_ack_timeout=2.0,
        **overrides,
    )
    running = await RunningWatcher(settings).start()
    try:
        yield running
    finally:
        await running.stop()


async def eventually(
    probe: Callable[[], Awaitable[T]], within: float = 15.0, what: str = "condition"
) -> T:
    """Poll `probe`; a probe that raises (NATS not there yet) counts as not yet."""
    result: T = await waiting.eventually(probe, within, what, ignore=(Exception,))
    return result


async def last_msg(js: Any, subject: str) -> Any | None:
    stream = (
        subjects.STREAM_NAMESPACES
        if subject.startswith(subjects.NAMESPACES_PREFIX)
        else subjects.STREAM_WORKLOADS
    )
    try:
        return await js.get_last_msg(stream, subject)
    except NotFoundError:
        return None


async def workload(js: Any, kind: str, name: str, ns: str = NS) -> WorkloadImageSet | None:
    msg = await last_msg(js, subjects.workload_subject(kind, ns, name))
    return None if msg is None else WorkloadImageSet.model_validate_json(msg.data)


async def wait_workload(
    js: Any,
    kind: str,
    name: str,
    check: Callable[[WorkloadImageSet], bool] = lambda w: not w.deleted,
    ns: str = NS,
) -> WorkloadImageSet:
    async def probe() -> WorkloadImageSet | None:
        item = await workload(js, kind, name, ns)
        return item if item is not None and check(item) else None

    return await eventually(probe, what=f"{kind}/{ns}/{name}")


async def read_stream(js: Any, stream: str, flt: str) -> list[Any]:
    """Every message of `stream` matching `flt`, from the start: what a consumer rebuilding
    its state reads (one pass; done when it reaches the stream's last sequence)."""
    sub = await js.pull_subscribe(
        flt,
        stream=stream,
        config=ConsumerConfig(
            deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE, filter_subject=flt
        ),
    )
    messages: list[Any] = []
    try:
        remaining = (await sub.consumer_info()).num_pending or 0
        while remaining > 0:
            for msg in await sub.fetch(min(remaining, 500), timeout=5):
                messages.append(msg)
                remaining = msg.metadata.num_pending or 0
    finally:
        await sub.unsubscribe()
    return messages


def template(image: str, **pod: Any) -> dict[str, Any]:
    return {"spec": {"containers": [{"name": "app", "image": image}], **pod}}


def make(kind: str, name: str, image: str, ns: str = NS, **spec: Any) -> dict[str, Any]:
    api_version = "batch/v1" if kind in ("Job", "CronJob") else "apps/v1"
    body: dict[str, Any]
    if kind == "CronJob":
        body = {"schedule": "*/5 * * * *", "jobTemplate": {"spec": {"template": template(image)}}}
    else:
        body = {"template": template(image)}
        if kind in ("Deployment", "ReplicaSet", "StatefulSet"):
            body["replicas"] = 2
    body.update(spec)
    return {
        "apiVersion": api_version,
        "kind": kind,
        "metadata": {"name": name, "namespace": ns},
        "spec": body,
    }


def namespace(name: str, **labels: str) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}}


def set_image(obj: dict[str, Any], image: str) -> dict[str, Any]:
    spec = obj["spec"]
    pod = spec["jobTemplate"]["spec"]["template"] if obj["kind"] == "CronJob" else spec["template"]
    pod["spec"]["containers"][0]["image"] = image
    return obj


def revision(deployment: dict[str, Any], number: int, image: str, ns: str = NS) -> dict[str, Any]:
    """What the Deployment controller would create for one rollout."""
    meta = deployment["metadata"]
    rs = make("ReplicaSet", f"{meta['name']}-{number}", image, ns=ns, replicas=0)
    rs["metadata"]["annotations"] = {"deployment.kubernetes.io/revision": str(number)}
    rs["metadata"]["ownerReferences"] = [
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "name": meta["name"],
            "uid": meta["uid"],
            "controller": True,
        }
    ]
    return rs


def counter(metric: Any, **labels: str) -> float:
    value: float = metric.labels(**labels)._value.get()
    return value


KINDS = ("Deployment", "ReplicaSet", "DaemonSet", "StatefulSet", "Job", "CronJob")


# ---------------------------------------------------------------- tests


async def test_every_kind_create_update_scale_delete(
    kube_api: KubeAPI, kubeconfig: Path, fresh_nats: NatsServer
) -> None:
    kube_api.create(namespace(NS, team="a"))
    kube_api.create(make("Deployment", "pre-existing", "nginx:1.25"))
    async with watcher(fresh_nats, kubeconfig) as w:
        await w.wait_ready()
        js = w.js
        item = await wait_workload(js, "Deployment", "pre-existing")
        assert item.references() == {"docker.io/library/nginx:1.25"}
        ns_msg = await eventually(lambda: last_msg(js, subjects.namespace_subject(NS)))
        assert NamespaceEvent.model_validate_json(ns_msg.data).labels == {"team": "a"}

        created = {
            kind: kube_api.create(make(kind, kind.lower(), f"{kind.lower()}:1")) for kind in KINDS
        }
        for kind in KINDS:
            item = await wait_workload(js, kind, kind.lower())
            assert item.references() == {f"docker.io/library/{kind.lower()}:1"}
            assert item.uid == created[kind]["metadata"]["uid"]
            assert item.owner is None

        for kind in KINDS:
            kube_api.update(set_image(created[kind], f"{kind.lower()}:2"))
        for kind in KINDS:
            want = {f"docker.io/library/{kind.lower()}:2"}
            await wait_workload(js, kind, kind.lower(), lambda w, want=want: w.references() == want)

        for kind in ("Deployment", "ReplicaSet", "StatefulSet"):
            kube_api.patch(kind, NS, kind.lower(), {"spec": {"replicas": 0}})
        for kind in ("Deployment", "ReplicaSet", "StatefulSet"):
            scaled = await wait_workload(js, kind, kind.lower(), lambda w: w.replicas == 0)
            assert scaled.references(), "a scaled-to-zero workload keeps its images"

        # Status-only writes publish nothing: the Deployment's message stays the one stored.
        before = await last_msg(js, subjects.workload_subject("Deployment", NS, "deployment"))
        kube_api.update_status(
            "deployments", NS, "deployment", {"replicas": 0, "observedGeneration": 9}
        )
        kube_api.update(
            set_image(kube_api.get("Deployment", NS, "pre-existing") or {}, "nginx:1.26")
        )
        await wait_workload(
            js,
            "Deployment",
            "pre-existing",
            lambda w: w.references() == {"docker.io/library/nginx:1.26"},
        )
        after = await last_msg(js, subjects.workload_subject("Deployment", NS, "deployment"))
        assert before is not None and after is not None and after.seq == before.seq

        for kind in KINDS:
            kube_api.delete(kind, NS, kind.lower())
        for kind in KINDS:
            marker = await wait_workload(js, kind, kind.lower(), lambda w: w.deleted)
            assert marker.containers == ()
            msg = await last_msg(js, subjects.workload_subject(kind, NS, kind.lower()))
            assert msg.headers["Nats-TTL"] == str(7 * 86400)

        kube_api.delete("namespaces", None, NS)
        ns_marker = await eventually(lambda: _ns_deleted(js, NS), what="namespace deletion marker")
        assert ns_marker.deleted
        await wait_workload(js, "Deployment", "pre-existing", lambda w: w.deleted)


async def _ns_deleted(js: Any, name: str) -> NamespaceEvent | None:
    msg = await last_msg(js, subjects.namespace_subject(name))
    if msg is None:
        return None
    event = NamespaceEvent.model_validate_json(msg.data)
    return event if event.deleted else None


@pytest.mark.parametrize("previous", [1, 0])
async def test_rollout_keeps_previous_revisions(
    kube_api: KubeAPI, kubeconfig: Path, fresh_nats: NatsServer, previous: int
) -> None:
    deployment = kube_api.create(make("Deployment", "web", "app:1"))
    kube_api.create(revision(deployment, 1, "app:1"))
    async with watcher(fresh_nats, kubeconfig, watch_previous_revisions=previous) as w:
        await w.wait_ready()
        js = w.js
        rev1 = await wait_workload(js, "ReplicaSet", "web-1")
        assert rev1.owner is not None and rev1.owner.name == "web" and rev1.revision == 1

        kube_api.update(set_image(kube_api.get("Deployment", NS, "web") or {}, "app:2"))
        kube_api.create(revision(deployment, 2, "app:2"))
        await wait_workload(js, "ReplicaSet", "web-2")
        if previous == 0:
            await wait_workload(js, "ReplicaSet", "web-1", lambda w: w.deleted)
        else:
            kube_api.create(revision(deployment, 3, "app:3"))
            await wait_workload(js, "ReplicaSet", "web-3")
            await wait_workload(js, "ReplicaSet", "web-1", lambda w: w.deleted)
            kept = await workload(js, "ReplicaSet", "web-2")
            assert kept is not None and not kept.deleted
            assert kept.references() == {"docker.io/library/app:2"}
            # The current revision goes away: the dropped one is kept again (read anew).
            kube_api.delete("ReplicaSet", NS, "web-3")
            await wait_workload(js, "ReplicaSet", "web-3", lambda w: w.deleted)
            back = await wait_workload(js, "ReplicaSet", "web-1")
            assert back.references() == {"docker.io/library/app:1"}
        current = await wait_workload(
            js, "Deployment", "web", lambda w: w.references() == {"docker.io/library/app:2"}
        )
        assert current.owner is None


async def test_gone_mid_stream_relists_and_reports_deletions_in_the_gap(
    kube_api: KubeAPI, kubeconfig: Path, fresh_nats: NatsServer
) -> None:
    for name in ("a", "b", "c"):
        kube_api.create(make("Deployment", name, f"{name}:1"))
    async with watcher(fresh_nats, kubeconfig, watch_kinds="Deployment") as w:
        await w.wait_ready()
        js = w.js
        for name in ("a", "b", "c"):
            await wait_workload(js, "Deployment", name)
        expired_before = counter(metrics.RELISTS, kind="Deployment", reason="expired")
        lists_before = kube_api.requests("list", "deployments")
        # The relist fails once, so the changes below surely fall in the gap.
        kube_api.fail_next("list", "deployments", count=1, status=500)
        kube_api.expire_watches()
        kube_api.delete("Deployment", NS, "b")
        kube_api.create(make("Deployment", "d", "d:1"))
        kube_api.update(set_image(kube_api.get("Deployment", NS, "c") or {}, "c:2"))
        await wait_workload(js, "Deployment", "b", lambda w: w.deleted)
        await wait_workload(js, "Deployment", "d")
        await wait_workload(
            js, "Deployment", "c", lambda w: w.references() == {"docker.io/library/c:2"}
        )
        assert counter(metrics.RELISTS, kind="Deployment", reason="expired") > expired_before
        assert kube_api.requests("list", "deployments") >= lists_before + 2
        untouched = await workload(js, "Deployment", "a")
        assert untouched is not None and not untouched.deleted


async def test_api_server_restart(
    kube_api: KubeAPI, kubeconfig: Path, fresh_nats: NatsServer
) -> None:
    kube_api.create(make("Deployment", "a", "a:1"))
    kube_api.create(make("Deployment", "b", "b:1"))
    async with watcher(fresh_nats, kubeconfig, watch_kinds="Deployment,Namespace") as w:
        await w.wait_ready()
        js = w.js
        await wait_workload(js, "Deployment", "b")
        kube_api.stop()
        kube_api.delete("Deployment", NS, "a")
        kube_api.create(make("Deployment", "c", "c:1"))
        kube_api.start()
        await wait_workload(js, "Deployment", "a", lambda w: w.deleted)
        await wait_workload(js, "Deployment", "c")
        # And the watch works again afterwards.
        kube_api.wait_for_watches("deployments")
        kube_api.create(make("Deployment", "e", "e:1"))
        await wait_workload(js, "Deployment", "e")


async def test_nats_outage_loses_nothing_and_publishes_nothing_twice(
    kube_api: KubeAPI, kubeconfig: Path, fresh_nats: NatsServer
) -> None:
    kube_api.create(make("Deployment", "web", "web:1"))
    kube_api.create(make("Deployment", "doomed", "doomed:1"))
    async with watcher(fresh_nats, kubeconfig, watch_kinds="Deployment") as w:
        await w.wait_ready()
        js = w.js
        await wait_workload(js, "Deployment", "doomed")
        fresh_nats.stop()
        await eventually(lambda: _const(not w.bus.connected), what="disconnect seen")
        web = kube_api.get("Deployment", NS, "web") or {}
        for version in range(2, 7):
            web = kube_api.update(set_image(web, f"web:{version}"))
        kube_api.delete("Deployment", NS, "doomed")
        kube_api.create(make("Deployment", "ephemeral", "eph:1"))
        kube_api.delete("Deployment", NS, "ephemeral")
        kube_api.create(make("Deployment", "new", "new:1"))
        await eventually(
            lambda: _const(metrics.PENDING_PUBLISHES._value.get() >= 3), what="pending changes"
        )
        fresh_nats.start()
        await wait_workload(
            js, "Deployment", "web", lambda w: w.references() == {"docker.io/library/web:6"}
        )
        await wait_workload(js, "Deployment", "doomed", lambda w: w.deleted)
        await wait_workload(js, "Deployment", "new")
        assert await workload(js, "Deployment", "ephemeral") is None
        await eventually(lambda: _const(len(w.runtime.bus.js._publish_async_futures) == 0))
        history = await eventually(
            lambda: _history_complete(js, 5), what="history to hold every stored change"
        )
        per_subject: dict[str, int] = {}
        for msg in history:
            per_subject[msg.subject] = per_subject.get(msg.subject, 0) + 1
        # Initial publish + one coalesced update for web; publish + marker for doomed.
        assert per_subject == {
            subjects.workload_subject("Deployment", NS, "web"): 2,
            subjects.workload_subject("Deployment", NS, "doomed"): 2,
            subjects.workload_subject("Deployment", NS, "new"): 1,
        }


async def _history_complete(js: Any, count: int) -> list[Any] | None:
    messages = await read_stream(js, subjects.STREAM_HISTORY, f"{subjects.WORKLOADS_PREFIX}.>")
    return messages if len(messages) >= count else None


async def test_two_watchers_at_once_each_change_stored_once(
    kube_api: KubeAPI, kubeconfig: Path, fresh_nats: NatsServer
) -> None:
    for i in range(20):
        kube_api.create(make("Deployment", f"app{i}", f"app{i}:1"))
    async with (
        watcher(fresh_nats, kubeconfig, watch_kinds="Deployment") as one,
        watcher(fresh_nats, kubeconfig, watch_kinds="Deployment") as two,
    ):
        await one.wait_ready()
        await two.wait_ready()
        js = one.js
        for i in range(20):
            await wait_workload(js, "Deployment", f"app{i}")
        for i in range(10):
            obj = kube_api.get("Deployment", NS, f"app{i}") or {}
            kube_api.update(set_image(obj, f"app{i}:2"))
        kube_api.delete("Deployment", NS, "app19")
        await wait_workload(js, "Deployment", "app19", lambda w: w.deleted)
        for i in range(10):
            await wait_workload(
                js,
                "Deployment",
                f"app{i}",
                lambda w, i=i: w.references() == {f"docker.io/library/app{i}:2"},
            )
        info = await js.stream_info(subjects.STREAM_WORKLOADS)
        # 20 creations + 10 updates + 1 marker, each stored exactly once.
        assert info.state.last_seq == 31
        assert counter(metrics.PUBLISHES, result="duplicate") >= 1


async def test_malformed_and_invalid_objects_do_not_stop_the_stream(
    kube_api: KubeAPI, kubeconfig: Path, fresh_nats: NatsServer
) -> None:
    bad_before = counter(metrics.BAD_OBJECTS, kind="Deployment", reason="invalid_image")
    kube_api.create(make("Deployment", "invalid", "Not A/Valid:Ref"))
    no_image = make("Deployment", "no-image", "x")
    del no_image["spec"]["template"]["spec"]["containers"][0]["image"]
    kube_api.create(no_image)
    weird = make("Deployment", "weird", "ok:1")
    weird["spec"]["template"]["spec"]["tolerations"] = [{"operator": "Sometimes"}, "x"]
    weird["spec"]["template"]["spec"]["containers"].append("not-a-container")
    kube_api.create(weird)
    huge = make("Deployment", "huge", "huge:1")
    huge["spec"]["template"]["spec"]["containers"][0]["env"] = [
        {"name": f"V{i}", "value": "x" * 1000} for i in range(3000)
    ]
    kube_api.create(huge)
    no_template = make("Deployment", "no-template", "x")
    del no_template["spec"]["template"]
    kube_api.create(no_template)
    async with watcher(fresh_nats, kubeconfig, watch_kinds="Deployment") as w:
        await w.wait_ready()
        js = w.js
        invalid = await wait_workload(js, "Deployment", "invalid")
        (container,) = invalid.containers
        assert container.reference is None and container.error
        assert container.image == "Not A/Valid:Ref"
        missing = await wait_workload(js, "Deployment", "no-image")
        assert missing.containers[0].error and missing.references() == set()
        assert (await wait_workload(js, "Deployment", "weird")).references() == {
            "docker.io/library/ok:1"
        }
        assert (await wait_workload(js, "Deployment", "huge")).references() == {
            "docker.io/library/huge:1"
        }
        assert (await wait_workload(js, "Deployment", "no-template")).containers == ()
        assert counter(metrics.BAD_OBJECTS, kind="Deployment", reason="invalid_image") > bad_before
        # Still watching.
        kube_api.create(make("Deployment", "after", "after:1"))
        await wait_workload(js, "Deployment", "after")


async def test_consumer_rebuilds_state_after_watcher_stopped_and_restart_diffs(
    kube_api: KubeAPI, kubeconfig: Path, fresh_nats: NatsServer
) -> None:
    kube_api.create(namespace(NS))
    for name in ("a", "b", "c"):
        kube_api.create(make("Deployment", name, f"{name}:1"))
    kube_api.create(make("DaemonSet", "agent", "agent:1"))
    settings = {"watch_kinds": "Deployment,DaemonSet,Namespace"}
    async with watcher(fresh_nats, kubeconfig, **settings) as w:
        await w.wait_ready()
        await wait_workload(w.js, "DaemonSet", "agent")
        kube_api.delete("Deployment", NS, "c")
        await wait_workload(w.js, "Deployment", "c", lambda w: w.deleted)
    # The watcher is gone; a new consumer rebuilds the desired set from NATS alone.
    reader = Bus(WatcherSettings(nats_url=fresh_nats.url), "reader", Health())
    await reader.connect()
    try:
        js = reader.js
        messages = await read_stream(
            js, subjects.STREAM_WORKLOADS, f"{subjects.WORKLOADS_PREFIX}.>"
        )
        state = {m.subject: WorkloadImageSet.model_validate_json(m.data) for m in messages}
        desired = {item.identity: item.references() for item in state.values() if not item.deleted}
        assert desired == {
            f"Deployment/{NS}/a": {"docker.io/library/a:1"},
            f"Deployment/{NS}/b": {"docker.io/library/b:1"},
            f"DaemonSet/{NS}/agent": {"docker.io/library/agent:1"},
        }
        assert state[subjects.workload_subject("Deployment", NS, "c")].deleted
        last_seq = (await js.stream_info(subjects.STREAM_WORKLOADS)).state.last_seq

        # Changes while no watcher runs; the next one publishes exactly those.
        kube_api.delete("Deployment", NS, "b")
        kube_api.create(make("Deployment", "d", "d:1"))
        async with watcher(fresh_nats, kubeconfig, **settings) as again:
            await again.wait_ready()
            await wait_workload(js, "Deployment", "b", lambda w: w.deleted)
            await wait_workload(js, "Deployment", "d")
            info = await js.stream_info(subjects.STREAM_WORKLOADS)
            assert info.state.last_seq == last_seq + 2  # a, agent and the namespace unchanged
    finally:
        await reader.close()


async def test_forbidden_kind_reported_once_while_others_work(
    kube_api: KubeAPI,
    kubeconfig: Path,
    fresh_nats: NatsServer,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(informer, "FORBIDDEN_RETRY_MIN_SECONDS", 0.05)
    kube_api.forbid("daemonsets")
    kube_api.create(make("Deployment", "web", "web:1"))
    kube_api.create(make("DaemonSet", "agent", "agent:1"))
    caplog.set_level(logging.ERROR, logger="cedar.watcher.informer")
    async with watcher(fresh_nats, kubeconfig, watch_kinds="Deployment,DaemonSet") as w:
        await w.wait_ready()
        await wait_workload(w.js, "Deployment", "web")
        await eventually(
            lambda: _const(kube_api.requests("list", "daemonsets") >= 3), what="list retries"
        )
        reported = [r for r in caplog.records if "may not list/watch DaemonSet" in r.getMessage()]
        assert len(reported) == 1
        assert metrics.FORBIDDEN.labels(kind="DaemonSet")._value.get() == 1
        kube_api.allow("daemonsets")
        await wait_workload(w.js, "DaemonSet", "agent")
        assert metrics.FORBIDDEN.labels(kind="DaemonSet")._value.get() == 0


async def test_not_ready_until_every_kind_synced(
    kube_api: KubeAPI, kubeconfig: Path, fresh_nats: NatsServer
) -> None:
    kube_api.fail_next("list", "replicasets", count=10_000, status=500)
    async with watcher(fresh_nats, kubeconfig, watch_kinds="Deployment,ReplicaSet") as w:
        await eventually(
            lambda: _const(w.health.report()["checks"].get("synced:Deployment")),
            what="Deployment synced",
        )
        await eventually(
            lambda: _const(kube_api.requests("list", "replicasets") >= 2), what="RS list retried"
        )
        report = w.health.report()
        assert report["checks"]["nats"] is True
        assert report["checks"]["synced:ReplicaSet"] is False
        assert report["ready"] is False
        kube_api.reset()  # clears the injected failures
        await w.wait_ready()
