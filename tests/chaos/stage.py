"""The stage of a fault-suite run: real servers, Cedar's real services, the load, and the
end-state checks, shared by the NATS-cluster and the process-kill tests.

`Stage` brings up: the simulated Kubernetes API (in this process, as the harness does), a
registry that wants a password (so pullers really use CEDAR_REGISTRY_AUTH_FILE), small
images pushed to it, a three-server NATS cluster with Cedar's streams and buckets at R3,
the tap on every server, and one watcher, two allocators and three pullers as processes.
`Stage.outcome()` waits for Cedar to settle and reads back everything the tests assert on.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import random
import re
import secrets
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client as NatsClient

from cedar.proto import subjects
from cedar.proto.models import NamespaceEvent, NodeImageStatus, WorkloadImageSet
from cedar.sandbox import images
from cedar.sandbox.dockerd import DockerEngine
from cedar.sandbox.kubeapi import KubeAPI
from cedar.sandbox.nats_cluster import NatsCluster
from cedar.sandbox.registry import Registry
from tests.chaos import churn, observe
from tests.chaos.fleet import Fleet

NODES = ["node-0", "node-1", "node-2"]
POOLS = ["a", "b", "c"]
EXCLUDED = {"kube-system", "kube-public", "kube-node-lease", "default", "cedar-system"}
FULL = os.environ.get("CEDAR_CHAOS_FULL") == "1"


@dataclass
class Outcome:
    """Everything the assertions look at, read once Cedar has settled (or given up)."""

    settled: bool
    settle_seconds: float
    tenant_namespaces: list[str]
    annotations: dict[str, str | None]
    uids: dict[str, str]
    relabelled: dict[str, list[str | None]]
    ledger: dict[str, dict[str, Any]]
    desired_expected: dict[str, set[str]]
    desired_reported: dict[str, set[str]]
    workload_mismatches: list[str]
    history_check: observe.HistoryCheck
    unstored_publishes: list[str]
    history_duplicates: list[str]
    dead_services: list[str]
    unexpected_exits: dict[str, list[int]]
    crash_lines: list[str]
    secret_hits: list[str]
    counts: dict[str, Any] = field(default_factory=dict)
    logs: str = ""


def _short_dir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


class Stage:
    def __init__(self, log_dir: Path, docker_engine: DockerEngine, builder: DockerEngine) -> None:
        self.log_dir = log_dir
        self.docker_engine = docker_engine
        self.builder = builder
        self.base = _short_dir("cedar-chaos-")
        self.password = "pw-" + secrets.token_hex(12)
        self.user = "puller-" + secrets.token_hex(3)
        self.registry = Registry(self.base / "registry", htpasswd={self.user: self.password})
        self.kube = KubeAPI(bookmark_interval=1.0)
        self.cluster = NatsCluster(self.base / "nats")
        self.tap = observe.BusTap(self.cluster.urls)
        self.kubeconfig = self.log_dir / "kubeconfig"
        self.auth_file = self.base / "dockerconfig.json"
        self.annotations = observe.AnnotationLog(self.kubeconfig)
        self.fleet = Fleet(
            self.log_dir / "services", nats_url=self.cluster.url, kubeconfig=self.kubeconfig
        )
        self.images: list[str] = []
        self.rng = random.Random(int(os.environ.get("CEDAR_CHAOS_SEED", "0")) or None)
        self.tenants: list[str] = []
        self.scrapes: list[str] = []
        # Workloads go to every tenant namespace there is, the burst's too.
        self.load = churn.Churn(self.kube, self.tenants, [], POOLS, self.rng, per_second=10.0)

    # --------------------------------------------------------------- bring up and down

    async def up(self, *, image_count: int = 6, initial_workloads: int = 20) -> None:
        (self.log_dir / "services").mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self.registry.start)
        self.images = await images.amake_images(
            self.builder, self.registry, image_count, 32 * 1024, prefix="chaos/img"
        )
        host = self.registry.host
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        self.auth_file.write_text(json.dumps({"auths": {host: {"auth": token}}}))
        self.kube.start()
        self.kube.write_kubeconfig(self.kubeconfig)
        for name, pool in zip(NODES, POOLS, strict=True):
            self.kube.create(churn.node(name, pool))
        for name in ("kube-system", "default", "cedar-system"):
            self.kube.create(churn.namespace(name))
        seed = [f"seed-{i}" for i in range(5)]
        for name in seed:
            self.kube.create(churn.namespace(name))
        self.tenants += seed
        self.load.images = self.images
        for _ in range(initial_workloads):
            self.load.step()
        await asyncio.to_thread(self.cluster.start)
        await self.tap.start()
        self.annotations.start()
        self.fleet.watcher()
        self.fleet.allocator("allocator-0")
        self.fleet.allocator("allocator-1")
        for name in NODES:
            self.fleet.puller(name, self.docker_engine.host, self.auth_file)
        self.fleet.start()
        await self.wait(self.fleet.all_ready, 90, "every service ready")

    async def down(self) -> None:
        await asyncio.to_thread(self.fleet.stop)
        await self.tap.close()
        await self.annotations.stop()
        await asyncio.to_thread(self.cluster.stop)
        self.kube.stop()
        await asyncio.to_thread(self.registry.stop)
        # Keep the servers' logs with the test's, then drop the stores.
        for node in self.cluster:
            if node.log_path.exists():
                shutil.copy(node.log_path, self.log_dir / f"{node.server_name}.log")
        shutil.rmtree(self.base, ignore_errors=True)

    async def wait(self, check: Any, within: float, what: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            ok = await asyncio.to_thread(check)
            if ok:
                return
            if loop.time() > deadline:
                raise AssertionError(f"gave up after {within}s waiting for {what}\n{self.logs()}")
            await asyncio.sleep(0.25)

    def logs(self) -> str:
        return self.fleet.logs() + "\n" + self.cluster.log_tails(15)

    async def connect(self) -> NatsClient:
        return await nats.connect(
            servers=self.cluster.urls, connect_timeout=2, max_reconnect_attempts=-1
        )

    # --------------------------------------------------------------- the load

    def labelled(self) -> int:
        return sum(1 for v in self.current_annotations().values() if v)

    def current_annotations(self) -> dict[str, str | None]:
        return {
            ns["metadata"]["name"]: (ns["metadata"].get("annotations") or {}).get(
                observe.ANNOTATION
            )
            for ns in self.kube.list("namespaces")
            if ns["metadata"]["name"] not in EXCLUDED
        }

    def uids(self) -> dict[str, str]:
        return {
            ns["metadata"]["name"]: ns["metadata"]["uid"] for ns in self.kube.list("namespaces")
        }

    def scrape(self) -> None:
        """Keep every running service's /metrics, for the credential scan."""
        for proc in self.fleet:
            if proc.alive:
                with contextlib.suppress(OSError):
                    self.scrapes.append(proc.get("/metrics"))

    async def leader_of(self, stream: str) -> str:
        nc = await self.connect()
        try:
            for _ in range(100):
                try:
                    info = await nc.jetstream(timeout=3).stream_info(stream)
                except Exception:
                    await asyncio.sleep(0.2)
                    continue
                if info.cluster is not None and info.cluster.leader:
                    return str(info.cluster.leader)
                await asyncio.sleep(0.2)
            raise AssertionError(f"{stream} has no leader")
        finally:
            await nc.close()

    # --------------------------------------------------------------- the end state

    async def _read(self) -> dict[str, Any]:
        nc = await self.connect()
        try:
            js = nc.jetstream(timeout=10)
            ledger_raw = await observe.read_bucket(js, subjects.KV_MCS_LEDGER)
            status_raw = await observe.read_bucket(js, subjects.KV_NODE_STATUS)
            workloads = await observe.read_last_per_subject(
                js, subjects.STREAM_WORKLOADS, f"{subjects.WORKLOADS_PREFIX}.>"
            )
            namespaces = await observe.read_last_per_subject(
                js, subjects.STREAM_NAMESPACES, f"{subjects.NAMESPACES_PREFIX}.>"
            )
            history = await observe.read_all(js, subjects.STREAM_HISTORY)
            history_last = (await js.stream_info(subjects.STREAM_HISTORY)).state.last_seq
            sources = {}
            for stream in (subjects.STREAM_WORKLOADS, subjects.STREAM_NAMESPACES):
                info = await js.stream_info(stream)
                sources[stream] = [
                    {"name": s.name, "lag": s.lag, "active": s.active, "error": s.error}
                    for s in info.sources or []
                ]
        finally:
            await nc.close()
        return {
            "ledger": {k: json.loads(v) for k, v in ledger_raw.items()},
            "status": [NodeImageStatus.model_validate_json(v) for v in status_raw.values()],
            "workloads": workloads,
            "namespaces": namespaces,
            "history": history,
            "history_last_seq": history_last,
            "sources": sources,
        }

    def _settled(self, state: dict[str, Any]) -> list[str]:
        """What still differs from where Cedar must end (empty once settled)."""
        problems = []
        annotations = self.current_annotations()
        unlabelled = [n for n, v in annotations.items() if not v]
        if unlabelled:
            problems.append(f"{len(unlabelled)} namespaces unlabelled, e.g. {unlabelled[:3]}")
        by_uid: dict[str, list[str]] = {}
        for key, value in state["ledger"].items():
            if key.startswith("label.") and value.get("state") == "allocated":
                by_uid.setdefault(value["uid"], []).append(value["level"])
        uids = {
            ns["metadata"]["name"]: ns["metadata"]["uid"] for ns in self.kube.list("namespaces")
        }
        expected = {uids[n]: [v] for n, v in annotations.items() if v}
        if by_uid != expected:
            problems.append("ledger labels differ from the annotations")
        reported = _reported(state["status"])
        wanted = churn.expected_desired(self.kube, NODES)
        for name in NODES:
            if reported.get(name, set()) != wanted[name]:
                problems.append(f"{name}: desired set differs")
        mismatches = _workload_mismatches(self.kube, state["workloads"])
        mismatches += _namespace_mismatches(self.kube, state["namespaces"])
        if mismatches:
            problems.append(f"{len(mismatches)} messages differ from the API")
        return problems

    async def outcome(self, within: float) -> Outcome:
        """Wait up to `within` s for Cedar to settle, then read back everything."""
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + within
        while True:
            state = await self._read()
            problems = await asyncio.to_thread(self._settled, state)
            if not problems or loop.time() > deadline:
                break
            await asyncio.sleep(1.0)
        settle = loop.time() - started
        # The last-value streams copy the history and may lag behind it: wait until each
        # holds the history's last message of every subject, within limits. The state
        # read then must still be a settled one: a read that is not (seen once in a full
        # cluster run: half the ledger's keys missing from one read, the next read whole,
        # the allocators having released nothing) is read again, and counted.
        caught_up = None
        unsettled_reads = 0
        history_deadline = loop.time() + 60
        while True:
            state = await self._read()
            check = _history_check(state)
            still = await asyncio.to_thread(self._settled, state) if not problems else []
            unsettled_reads += bool(still)
            if not check.stale and not still:
                caught_up = loop.time() - started - settle
                break
            if loop.time() > history_deadline:
                break
            await asyncio.sleep(1.0)
        self.scrape()
        annotations = self.current_annotations()
        uids = {
            ns["metadata"]["name"]: ns["metadata"]["uid"] for ns in self.kube.list("namespaces")
        }
        history = state["history"]
        unstored, dupes = _published_vs_history(
            self.tap, history, set(state["workloads"]) | set(state["namespaces"])
        )
        self._dump_unstored(unstored, history)
        return Outcome(
            settled=not problems,
            settle_seconds=settle,
            tenant_namespaces=sorted(annotations),
            annotations=annotations,
            uids=uids,
            relabelled=self.annotations.relabelled(),
            ledger=state["ledger"],
            desired_expected=churn.expected_desired(self.kube, NODES),
            desired_reported=_reported(state["status"]),
            workload_mismatches=_workload_mismatches(self.kube, state["workloads"])
            + _namespace_mismatches(self.kube, state["namespaces"]),
            history_check=check,
            unstored_publishes=unstored,
            history_duplicates=dupes,
            dead_services=self.fleet.dead(),
            unexpected_exits={p.name: p.unexpected_exits for p in self.fleet if p.unexpected_exits},
            crash_lines=self.crash_lines(),
            secret_hits=self.secret_hits(),
            counts={
                "settle_seconds": round(settle, 1),
                "problems_at_deadline": problems,
                "desired_diff": _desired_diff(
                    churn.expected_desired(self.kube, NODES), _reported(state["status"])
                ),
                "tapped_by_subject": _histogram(self.tap),
                "last_values_caught_up_after": caught_up,
                "end_reads_unsettled": unsettled_reads,
                "last_values_stale": check.stale[:50],
                "last_value_sources": state["sources"],
                "history_lost": check.lost,
                "history_messages": len(history),
                "tapped_messages": len(self.tap.seen),
                "churn": dict(self.load.ops),
                "kills": {p.name: p.kills for p in self.fleet},
                "starts": {p.name: p.starts for p in self.fleet},
            },
            logs=self.logs(),
        )

    def _dump_unstored(self, unstored: list[str], history: list[Any]) -> None:
        """What was published and what is kept, for each subject with an unstored publish."""
        subjects_ = {u.split()[0] for u in unstored}
        published = self.tap.published_by_watcher()
        report: dict[str, Any] = {}
        for subject in sorted(subjects_)[:50]:
            report[subject] = {
                "published": published.get(subject, {}),
                "kept": [
                    [(m.headers or {}).get("Nats-Msg-Id"), observe.observed_at(m.data)]
                    for m in history
                    if m.subject == subject
                ],
            }
        (self.log_dir / "unstored.json").write_text(json.dumps(report, indent=1))

    def crash_lines(self) -> list[str]:
        """Log lines that say a service died of an error or hit an unhandled exception."""
        found = []
        pattern = re.compile(r"stopped on an error|Traceback|Task exception was never retrieved")
        for proc in self.fleet:
            for line in proc.log_text().splitlines():
                if pattern.search(line):
                    found.append(f"{proc.name}: {line[:300]}")
        return found

    def secret_hits(self) -> list[str]:
        """Where the registry password (or its base64 auth) shows up in captured bytes."""
        token = base64.b64encode(f"{self.user}:{self.password}".encode())
        needles = [self.password.encode(), token]
        haystacks: dict[str, bytes] = {"nats messages": self.tap.every_byte()}
        for proc in self.fleet:
            haystacks[f"log of {proc.name}"] = proc.log_path.read_bytes()
        haystacks["metrics"] = "\n".join(self.scrapes).encode()
        for node in self.cluster:
            if node.log_path.exists():
                haystacks[f"log of {node.server_name}"] = node.log_path.read_bytes()
        return [
            f"{needle[:6]!r}... in {where}"
            for where, data in haystacks.items()
            for needle in needles
            if needle in data
        ]


def _history_check(state: dict[str, Any]) -> observe.HistoryCheck:
    return observe.check_history(
        state["history"], state["history_last_seq"], {**state["workloads"], **state["namespaces"]}
    )


def _desired_diff(
    wanted: dict[str, set[str]], reported: dict[str, set[str]]
) -> dict[str, dict[str, list[str]]]:
    out = {}
    for node, refs in wanted.items():
        got = reported.get(node, set())
        if got != refs:
            out[node] = {"extra": sorted(got - refs), "missing": sorted(refs - got)}
    return out


def _histogram(tap: observe.BusTap) -> dict[str, int]:
    """Messages seen per subject family (first two tokens), the largest first."""
    counts: dict[str, int] = {}
    for seen in tap.seen:
        family = ".".join(seen.subject.split(".")[:2])
        counts[family] = counts.get(family, 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: -kv[1])[:15])


def _reported(statuses: list[NodeImageStatus]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for status in statuses:
        out.setdefault(status.node, set()).add(status.image)
    return out


def _workload_mismatches(kube: KubeAPI, stored: dict[str, Any]) -> list[str]:
    """Subjects whose last stored message does not say what the API holds now."""
    expected = churn.api_workloads(kube)
    out = []
    for subject, item in expected.items():
        msg = stored.get(subject)
        if msg is None:
            out.append(f"{subject}: nothing stored")
            continue
        wis = WorkloadImageSet.model_validate_json(msg.data)
        if not churn.same_content(wis, item):
            out.append(
                f"{subject}: stored {wis.containers} {wis.scheduling}, API {item.containers}"
            )
    for subject, msg in stored.items():
        if subject not in expected and not WorkloadImageSet.model_validate_json(msg.data).deleted:
            out.append(f"{subject}: live in NATS, gone from the API")
    return out


def _namespace_mismatches(kube: KubeAPI, stored: dict[str, Any]) -> list[str]:
    """Namespaces whose last stored event does not say what the API holds now."""
    out = []
    live = set()
    for ns in kube.list("namespaces"):
        meta = ns["metadata"]
        subject = subjects.namespace_subject(meta["name"])
        live.add(subject)
        msg = stored.get(subject)
        if msg is None:
            out.append(f"{subject}: nothing stored")
            continue
        event = NamespaceEvent.model_validate_json(msg.data)
        annotations = meta.get("annotations") or {}
        if event.deleted or event.uid != meta["uid"] or event.annotations != annotations:
            out.append(f"{subject}: stored {event.annotations}, API {annotations}")
    for subject, msg in stored.items():
        if subject not in live and not NamespaceEvent.model_validate_json(msg.data).deleted:
            out.append(f"{subject}: live in NATS, gone from the API")
    return out


def _published_vs_history(
    tap: observe.BusTap, history: list[Any], stored_subjects: set[str]
) -> tuple[list[str], list[str]]:
    """What the watcher published that the history lacks, and messages it holds twice.

    A publish may rightly be missing when a later change of its subject replaced it, or
    when nothing at all is stored for its subject: the object was deleted before the
    publish was ever acknowledged, so the watcher dropped it (and there is nothing to mark
    deleted). That nothing live is left behind is checked against the API elsewhere.
    """
    stored: dict[str, dict[str, float]] = {}
    copies: dict[tuple[str, str], int] = {}
    for msg in history:
        msg_id = (msg.headers or {}).get("Nats-Msg-Id")
        if msg_id is None:
            continue
        stored.setdefault(msg.subject, {})[msg_id] = observe.observed_at(msg.data)
        copies[(msg.subject, msg_id)] = copies.get((msg.subject, msg_id), 0) + 1
    unstored = []
    for subject, published in tap.published_by_watcher().items():
        if subject not in stored_subjects:
            continue
        kept = stored.get(subject, {})
        newest_kept = max(kept.values(), default=0.0)
        for msg_id, at in published.items():
            if msg_id not in kept and at >= newest_kept:
                unstored.append(f"{subject} {msg_id}")
    dupes = [f"{s} {m} x{n}" for (s, m), n in copies.items() if n > 1]
    return unstored, dupes
