"""Soak: the three services as real `cedar` processes under bounded continuous churn.

What runs: the simulated Kubernetes API in this process (Deployment and namespace
controllers on, as in `cedar up --sandbox`), a private nats-server, a private dockerd as the
node's engine and the session's registry holding the images; `cedar watcher`, `cedar puller`
(really pulling, pruning and re-pulling through the engine) and `cedar mcs-allocator` as
subprocesses. For CEDAR_SOAK_SECONDS (default 1200) namespaces are replaced and Deployments
created, scaled, given other images and replaced, at most RATE changes a second. The
population is steady (NS_TARGET namespaces of APPS_TARGET Deployments, names from bounded
pools), so what a correct Cedar must hold has a steady size; only ReplicaSet names (the
template's hash) keep being new, as in a cluster, and the deletion markers of the old ones
stay in NATS until their TTL, not in a service's memory. The images in use drift through the
pool, so the puller keeps pulling what comes into use and pruning what went out of it. The
node's heartbeat is kept up, as a kubelet does.

Every SAMPLE_EVERY seconds each service's resident memory and open descriptors are read from
/proc/<pid> and its asyncio task count from its `/debug/tasks`. After the warm-up, memory must
stay flat (the median of the last minute at most RSS_GROWTH times the median of the minute
after the warm-up), and descriptors and tasks too (at most a small constant more). Each
service must have kept working to the end, and stop cleanly (exit 0) when asked. The table of
samples is printed at the end (run with `-s` to see it on success).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from cedar.runtime.http import open_fds, rss_bytes
from cedar.sandbox.dockerd import DockerEngine
from cedar.sandbox.kubeapi import KubeAPI
from cedar.sandbox.nats import NatsServer
from cedar.sandbox.procs import free_port, kill_pid, log_tail
from cedar.sandbox.registry import Registry
from tests.harness.registry import ImageMaker
from tests.harness.waiting import eventually
from tests.soak.churn import NODE, RATE, TENANT_LABEL, Churn, node_object


def soak_seconds() -> int | None:
    """CEDAR_SOAK_SECONDS (default 1200); None when it is not a number of seconds >= 120."""
    try:
        seconds = int(os.environ.get("CEDAR_SOAK_SECONDS", "1200"))
    except ValueError:
        return None
    return seconds if seconds >= 120 else None


SOAK_SECONDS = soak_seconds() or 0
SAMPLE_EVERY = 10.0
RSS_GROWTH = 1.10
FD_SLACK = 8
TASK_SLACK = 5
SERVICES = ("watcher", "puller", "mcs-allocator")
ANNOTATION = "cedar.io/selinux-level"

IMAGES = 24
# A small MCS pool with a short quarantine, so labels are reused and the ledger's size is
# steady during the run: C(16, 2) = 120 labels for 16 live namespaces and those in quarantine.
MCS_ENV = {"CEDAR_MCS_CATEGORIES": "16", "CEDAR_MCS_QUARANTINE": "90s"}
# Which counter of each service says it is still working, and the counters in the table.
WORK = {
    "watcher": ("cedar_watcher_publishes_total",),
    "puller": ("cedar_puller_pulls_total", "cedar_puller_pruned_total"),
    "mcs-allocator": ("cedar_mcs_allocations_total",),
}

pytestmark = [pytest.mark.soak, pytest.mark.timeout(SOAK_SECONDS + 900)]


def warmup_and_window(seconds: int) -> tuple[float, float]:
    """The warm-up excluded from the checks, and the length of the windows compared."""
    warmup = min(180.0, seconds / 4)
    return warmup, min(60.0, (seconds - warmup) / 3)


# ------------------------------------------------------------------------- the services


@dataclass
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def tail(self) -> str:
        return f"--- {self.name} ({self.log}):\n{log_tail(self.log, 30)}"

    def complaints(self) -> Counter[tuple[str, str]]:
        """(level, message) of the WARNING and ERROR lines of its JSON log, counted."""
        found: Counter[tuple[str, str]] = Counter()
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                found[("UNSTRUCTURED", line[:120])] += 1
                continue
            if entry.get("level") in ("WARNING", "ERROR", "CRITICAL"):
                found[(entry["level"], str(entry.get("msg"))[:120])] += 1
        return found


@dataclass
class Sandbox:
    api: KubeAPI
    nats: NatsServer
    engine: DockerEngine
    images: list[str]
    missing: str
    services: dict[str, Service]

    def tails(self) -> str:
        return "\n".join(s.tail() for s in self.services.values())

    def stop_services(self) -> dict[str, int | None]:
        """SIGTERM each service, as Kubernetes does; their exit codes (None: had to be killed)."""
        for service in self.services.values():
            if service.proc.poll() is None:
                service.proc.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        for name, service in self.services.items():
            try:
                codes[name] = service.proc.wait(40)
            except subprocess.TimeoutExpired:
                codes[name] = None
                kill_pid(service.proc.pid)
                service.proc.wait(10)
        return codes


def start_service(name: str, env: dict[str, str], logs: Path) -> Service:
    port = free_port()
    log = logs / f"{name}.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cedar.cli", name],
            env={**env, "CEDAR_METRICS_PORT": str(port), "CEDAR_POD_NAME": f"soak-{name}"},
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return Service(name, proc, port, log)


@pytest.fixture
def sandbox(
    fresh_nats: NatsServer,
    registry: Registry,
    make_images: ImageMaker,
    fresh_docker_engine: DockerEngine,
    tmp_path: Path,
) -> Iterator[Sandbox]:
    prefix = f"cedar-soak/s{uuid.uuid4().hex[:6]}"
    images = make_images(IMAGES, 32 * 1024, prefix=f"{prefix}/img")
    missing = f"{registry.host}/{prefix}/never-pushed:v1"
    api = KubeAPI(bookmark_interval=5.0, deployment_controller=True, require_namespaces=True)
    api.start()
    services: dict[str, Service] = {}
    try:
        api.create(node_object())
        kubeconfig = api.write_kubeconfig(tmp_path / "kubeconfig")
        env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "CEDAR_NATS_URL": fresh_nats.url,
            "CEDAR_METRICS_HOST": "127.0.0.1",
            "CEDAR_LOG_LEVEL": "INFO",
        }
        puller_env = {
            **env,
            **fresh_docker_engine.env(),
            "CEDAR_RUNTIME": "docker",
            "CEDAR_NODE_NAME": NODE,
            "CEDAR_NODE_FROM_API": "true",
            "CEDAR_DOCKER_ROOT": str(fresh_docker_engine.data_root),
            "CEDAR_RESYNC_INTERVAL": "10s",
            "CEDAR_REFRESH_INTERVAL": "2m",
            "CEDAR_PRUNE_REPOSITORIES": f"{registry.host}/{prefix}/",
            "CEDAR_PRUNE_AFTER": "30s",
            "CEDAR_PRUNE_INTERVAL": "15s",
        }
        logs = tmp_path / "logs"
        logs.mkdir()
        services["watcher"] = start_service("watcher", env, logs)
        services["puller"] = start_service("puller", puller_env, logs)
        services["mcs-allocator"] = start_service("mcs-allocator", {**env, **MCS_ENV}, logs)
        yield Sandbox(api, fresh_nats, fresh_docker_engine, images, missing, services)
    finally:
        for service in services.values():
            if service.proc.poll() is None:
                kill_pid(service.proc.pid, grace=30)
                service.proc.wait(10)
        api.stop()


# ------------------------------------------------------------------------- the samples


@dataclass(frozen=True)
class Sample:
    at: float  # seconds since the churn started
    service: str
    rss: int
    fds: int
    tasks: int
    work: dict[str, float]


def metric_total(text: str, name: str) -> float:
    """The sum of every series of `name` in a Prometheus text exposition."""
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            head, value = line.rsplit(" ", 1)
            if head == name or head.startswith(name + "{"):
                total += float(value)
    return total


async def sample(session: aiohttp.ClientSession, service: Service, at: float) -> Sample:
    assert service.proc.poll() is None, f"{service.name} exited\n{service.tail()}"
    base = f"http://127.0.0.1:{service.port}"
    async with session.get(f"{base}/debug/tasks") as resp:
        assert resp.status == 200, f"{service.name}: /debug/tasks answered {resp.status}"
        report = await resp.json()
    async with session.get(f"{base}/metrics") as resp:
        text = await resp.text()
    proc = Path(f"/proc/{service.proc.pid}")
    rss, fds = rss_bytes(proc), open_fds(proc)
    assert rss is not None and fds is not None, f"{service.name}: no /proc/{service.proc.pid}"
    assert report["pid"] == service.proc.pid
    work = {name: metric_total(text, name) for name in WORK[service.name]}
    return Sample(at, service.name, rss, fds, int(report["tasks"]), work)


def table(samples: list[Sample]) -> str:
    lines = [f"{'t (s)':>7} {'service':<14} {'RSS MiB':>8} {'fds':>5} {'tasks':>6}  work"]
    for s in samples:
        work = " ".join(f"{k.removeprefix('cedar_')}={v:g}" for k, v in s.work.items())
        mib = s.rss / 1024 / 1024
        lines.append(f"{s.at:7.0f} {s.service:<14} {mib:8.1f} {s.fds:5d} {s.tasks:6d}  {work}")
    return "\n".join(lines)


@dataclass(frozen=True)
class Verdict:
    service: str
    rss: tuple[float, float]  # medians: the minute after the warm-up, the last minute
    fds: tuple[float, float]
    tasks: tuple[float, float]
    work: dict[str, tuple[float, float]]  # counters at the end of the warm-up, at the end

    def problems(self) -> list[str]:
        found = []
        if self.rss[1] > RSS_GROWTH * self.rss[0]:
            growth = self.rss[1] / self.rss[0] - 1
            found.append(f"{self.service}: RSS grew {growth:.1%} after the warm-up")
        if self.fds[1] > self.fds[0] + FD_SLACK:
            found.append(f"{self.service}: open fds {self.fds[0]:g} -> {self.fds[1]:g}")
        if self.tasks[1] > self.tasks[0] + TASK_SLACK:
            found.append(f"{self.service}: asyncio tasks {self.tasks[0]:g} -> {self.tasks[1]:g}")
        if not any(end > start for start, end in self.work.values()):
            found.append(f"{self.service}: no work after the warm-up ({self.work})")
        return found

    def line(self) -> str:
        mib = [v / 1024 / 1024 for v in self.rss]
        return (
            f"{self.service:<14} RSS {mib[0]:.1f} -> {mib[1]:.1f} MiB "
            f"({mib[1] / mib[0] - 1:+.1%}), fds {self.fds[0]:g} -> {self.fds[1]:g}, "
            f"tasks {self.tasks[0]:g} -> {self.tasks[1]:g}, work "
            + ", ".join(f"{k} {a:g} -> {b:g}" for k, (a, b) in self.work.items())
        )


def verdict(service: str, samples: list[Sample], seconds: int) -> Verdict:
    warmup, window = warmup_and_window(seconds)
    mine = [s for s in samples if s.service == service]
    first = [s for s in mine if warmup <= s.at < warmup + window]
    last = [s for s in mine if s.at >= seconds - window]
    assert first and last, f"{service}: too few samples ({len(mine)})"

    def medians(attr: str) -> tuple[float, float]:
        return (
            statistics.median(getattr(s, attr) for s in first),
            statistics.median(getattr(s, attr) for s in last),
        )

    work = {k: (first[0].work[k], last[-1].work[k]) for k in WORK[service]}
    return Verdict(service, medians("rss"), medians("fds"), medians("tasks"), work)


# ---------------------------------------------------------------------------- the test


async def everything_ready(session: aiohttp.ClientSession, sandbox: Sandbox) -> bool:
    for service in sandbox.services.values():
        assert service.proc.poll() is None, f"{service.name} exited\n{service.tail()}"
        try:
            async with session.get(f"http://127.0.0.1:{service.port}/readyz") as resp:
                if resp.status != 200:
                    return False
        except (aiohttp.ClientError, TimeoutError):  # not listening yet, or busy starting
            return False
    return True


def labelled_distinct(api: KubeAPI) -> bool:
    """Every live tenant namespace has its level, and no two share one."""
    levels = []
    for ns in api.list("namespaces", label_selector=f"{TENANT_LABEL}=true"):
        meta = ns["metadata"]
        if meta.get("deletionTimestamp"):
            continue
        level = (meta.get("annotations") or {}).get(ANNOTATION)
        if not level:
            return False
        levels.append(level)
    return len(levels) == len(set(levels))


async def test_services_stay_flat_under_continuous_churn(sandbox: Sandbox, tmp_path: Path) -> None:
    seconds = soak_seconds()
    if seconds is None:
        pytest.fail("CEDAR_SOAK_SECONDS must be a whole number of seconds, at least 120")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        await eventually(
            lambda: everything_ready(session, sandbox),
            120,
            "every service ready",
            details=sandbox.tails,
        )
        loop = asyncio.get_running_loop()
        churn = Churn(sandbox.api, sandbox.images, sandbox.missing)
        start = loop.time()
        churning = asyncio.create_task(churn.run(start + seconds))
        samples: list[Sample] = []
        try:
            due = start
            while not churning.done():
                at = loop.time() - start
                for service in sandbox.services.values():
                    samples.append(await sample(session, service, at))
                due += SAMPLE_EVERY
                await asyncio.wait({churning}, timeout=max(0.0, due - loop.time()))
            churning.result()
            at = loop.time() - start
            for service in sandbox.services.values():
                samples.append(await sample(session, service, at))
        finally:
            churning.cancel()
        print(f"\nsoak: {seconds} s of churn; samples every {SAMPLE_EVERY:g} s")
        print(table(samples))
        rate = churn.writes / seconds
        print(
            f"changes: {churn.writes} ({rate:.1f}/s)",
            dict(churn.done),
            "refused:",
            dict(churn.refused),
        )
        verdicts = [verdict(name, samples, seconds) for name in SERVICES]
        for v in verdicts:
            print(v.line())
        # Kept whether the test passes or not (pytest shows prints only with -s).
        (tmp_path / "soak.txt").write_text(
            table(samples) + "\n" + "\n".join(v.line() for v in verdicts) + "\n"
        )
        complaints = {name: s.complaints() for name, s in sandbox.services.items()}
        for name, found in complaints.items():
            for (level, msg), count in found.most_common(10):
                print(f"{name}: {count} x {level} {msg}")
        # Caught up once the churn stops: every namespace has a level of its own.
        await eventually(
            lambda: labelled_distinct(sandbox.api), 60, "namespaces labelled", details=sandbox.tails
        )
    problems = [p for v in verdicts for p in v.problems()]
    problems += [
        f"{name}: {count} x {level} {msg}"
        for name, found in complaints.items()
        for (level, msg), count in found.items()
        if level != "WARNING"
    ]
    assert not problems, "\n".join(problems) + "\n" + table(samples)
    assert churn.writes >= seconds * RATE / 2, churn.done  # the churn kept (near) its rate
    codes = sandbox.stop_services()
    assert codes == dict.fromkeys(SERVICES, 0), f"{codes}\n{sandbox.tails()}"
