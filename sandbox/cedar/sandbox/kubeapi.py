"""A simulated Kubernetes API server for tests and `cedar up --sandbox`: the façade.

It speaks HTTP like the real one (list with pagination and selectors, watch with
resourceVersion, bookmarks and 410 Expired, create/update/patch/delete, Status errors), so the
official `kubernetes` client and raw aiohttp clients run unchanged against it. The control
methods (`create`, `expire_watches`, `forbid`, ...) are plain thread-safe calls, usable from
sync tests, async tests and service threads. Fault modes (`fault`: throttling, failures,
resets, stalls, 410 on every watch; `restart` with a down time) and the request log
(`request_log`, `peak_rate`: requests per second per client and verb) are for the fault
suite.

The controllers of a real control plane that Cedar depends on run beside it
(kubeapi_controllers.py): namespace deletion, node lifecycle taints, and, when asked for,
the Deployment controller. docs/operations.md says what the sandbox's API supports and
what it does not.

I/O: through its parts, a TCP port and the kubeconfig file. `KubeAPI` only puts them together
and resolves the loose resource names tests use: the server's thread and socket
(kubeapi_server.py), the HTTP handlers (kubeapi_http.py), the state (kubeapi_store.py, with
the rules for one object in kubeapi_objects.py and for selectors and patches in
kubeapi_ops.py), the controllers and the test controls (kubeapi_controls.py).
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from cedar.sandbox.errors import ApiError, WaitTimeoutError
from cedar.sandbox.kubeapi_auth import TokenReviews
from cedar.sandbox.kubeapi_controllers import Controllers, Timings
from cedar.sandbox.kubeapi_controls import Controls, Fault, Request, peak_rate
from cedar.sandbox.kubeapi_http import ApiHandler
from cedar.sandbox.kubeapi_ops import (
    MERGE_PATCH,
    RESOURCES,
    JsonObj,
    ResourceTable,
    ResourceType,
    WatchFilter,
    parse_label_selector,
)
from cedar.sandbox.kubeapi_server import ServerThread, write_kubeconfig
from cedar.sandbox.kubeapi_store import Store

__all__ = ["SYSTEM_NAMESPACES", "KubeAPI"]

SYSTEM_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")


class KubeAPI:
    """The simulated API server plus its test-control surface.

    `bookmark_interval` is how often a watch that allows bookmarks gets one (seconds);
    `history_limit` is how many events per resource a watch can resume across;
    `watch_delay` is how long after a write its watch event is delivered (never 0 on a
    real server; 0 only for a test that must not have it). The controllers' timings:
    `namespace_delay` before a deleted Namespace's content and then itself go,
    `node_startup_grace` and `node_monitor_grace` before a Node nobody heartbeats turns
    Ready=Unknown and unreachable; `deployment_controller` runs the Deployment controller
    (off for tests that write a Deployment's ReplicaSets themselves);
    `require_namespaces` refuses objects in a namespace that does not exist, as the real
    NamespaceLifecycle admission does (off for tests that skip creating namespaces), and
    with it the server's own namespaces exist from the start (`SYSTEM_NAMESPACES`).
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        bookmark_interval: float = 60.0,
        history_limit: int = 10_000,
        resources: Iterable[ResourceType] = RESOURCES,
        watch_delay: float = 0.02,
        namespace_delay: float = 1.0,
        node_startup_grace: float = 60.0,
        node_monitor_grace: float = 50.0,
        deployment_controller: bool = False,
        require_namespaces: bool = False,
    ) -> None:
        self.table = ResourceTable(resources)
        self._controls = Controls()
        self._server = ServerThread(host, port)
        self.store = Store(
            self.table,
            history_limit=history_limit,
            on_change=self._server.notify,
            watch_delay=watch_delay,
            require_namespaces=require_namespaces,
        )
        self._http = ApiHandler(self.table, self.store, self._controls, bookmark_interval)
        self.tokens = TokenReviews(self.table, self.store)  # bound tokens and TokenReview
        self._http.token_reviews = self.tokens
        timings = Timings(
            namespace_delay=namespace_delay,
            node_startup_grace=node_startup_grace,
            node_monitor_grace=node_monitor_grace,
            deployment_controller=deployment_controller,
        )
        self._controllers = Controllers(self.table, self.store, timings)
        if require_namespaces:
            # The namespaces the real API server creates itself at start-up
            # (pkg/controlplane/controller/systemnamespaces).
            for name in SYSTEM_NAMESPACES:
                self.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})

    # ================================================================ lifecycle

    @property
    def host(self) -> str:
        return self._server.host

    @property
    def port(self) -> int:
        """The port it listens on (chosen at the first start when 0 was asked for)."""
        return self._server.port

    @property
    def url(self) -> str:
        return self._server.url

    @property
    def running(self) -> bool:
        return self._server.running

    def start(self) -> KubeAPI:
        self._server.start(self._http.handle, self._controllers.run)
        return self

    def stop(self, *, abrupt: bool = False) -> None:
        """Stop serving: open watches end (abrupt: their connections are reset, as when
        the server process dies); the state stays for the next `start`."""
        self._server.stop(abrupt)

    def restart(self, down_for: float = 0.0, *, abrupt: bool = False) -> None:
        """Like an API server restart: open connections are cut, nothing listens for
        `down_for` seconds (connections are refused), then the same state on the same port.
        It blocks for `down_for`: from an async test, run it in a thread."""
        self.stop(abrupt=abrupt)
        time.sleep(down_for)
        self.start()

    def __enter__(self) -> KubeAPI:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def write_kubeconfig(self, path: str | Path, token: str = "cedar-sandbox-token") -> Path:
        """A kubeconfig (JSON is valid YAML) for this server: plain HTTP, a dummy `token`.
        The request log names each client by its token: give each service its own."""
        return write_kubeconfig(path, self.url, token)

    # ================================================================ objects

    @property
    def resource_version(self) -> str:
        return str(self.store.resource_version)

    def resource(self, kind_or_plural: str | ResourceType) -> ResourceType:
        """`"deployments"`, `"Deployment"` or `"apps/v1/deployments"`."""
        return self.table.lookup(kind_or_plural)

    def _resource_of(self, obj: JsonObj) -> ResourceType:
        return self.table.by_kind(obj.get("apiVersion", ""), obj.get("kind", ""))

    def create(self, obj: JsonObj) -> JsonObj:
        """Create from a full object (`apiVersion`, `kind`, `metadata.name`/`namespace`)."""
        res = self._resource_of(obj)
        return self.store.create(res, obj, (obj.get("metadata") or {}).get("namespace"))

    def load(self, objects: Iterable[JsonObj]) -> int:
        """Create many objects quickly (benchmarks); returns how many."""
        by_res: dict[ResourceType, list[JsonObj]] = {}
        for obj in objects:
            by_res.setdefault(self._resource_of(obj), []).append(obj)
        return sum(self.store.load(res, objs) for res, objs in by_res.items())

    def update(self, obj: JsonObj) -> JsonObj:
        """Replace the whole object, status included; bumps generation if `spec` changed."""
        res = self._resource_of(obj)
        meta = obj.get("metadata") or {}
        body = {**obj, "metadata": {k: v for k, v in meta.items() if k != "resourceVersion"}}
        return self.store.replace(res, meta.get("namespace"), meta["name"], body, keep_status=False)

    def update_status(
        self, kind_or_plural: str, namespace: str | None, name: str, status: JsonObj
    ) -> JsonObj:
        """A status-only write: resourceVersion changes, generation does not."""
        res = self.resource(kind_or_plural)
        return self.store.replace(res, namespace, name, {"status": status}, subresource="status")

    def patch(
        self,
        kind_or_plural: str,
        namespace: str | None,
        name: str,
        patch: Any,
        content_type: str = MERGE_PATCH,
    ) -> JsonObj:
        return self.store.patch(self.resource(kind_or_plural), namespace, name, content_type, patch)

    def delete(self, kind_or_plural: str, namespace: str | None, name: str) -> JsonObj:
        """Delete; a Namespace only turns Terminating here (see `wait_gone`)."""
        return self.store.delete(self.resource(kind_or_plural), namespace, name)

    def wait_gone(
        self, kind_or_plural: str, namespace: str | None, name: str, timeout: float = 10.0
    ) -> None:
        """Block until the object no longer exists (a deleted Namespace: its controller)."""
        deadline = time.monotonic() + timeout
        while self.get(kind_or_plural, namespace, name) is not None:
            if time.monotonic() > deadline:
                raise WaitTimeoutError(f"{kind_or_plural} {namespace}/{name} still exists")
            time.sleep(0.01)

    async def await_gone(
        self, kind_or_plural: str, namespace: str | None, name: str, within: float = 10.0
    ) -> None:
        """`wait_gone` for async tests: yields to the caller's event loop."""
        deadline = time.monotonic() + within
        while self.get(kind_or_plural, namespace, name) is not None:
            if time.monotonic() > deadline:
                raise WaitTimeoutError(f"{kind_or_plural} {namespace}/{name} still exists")
            await asyncio.sleep(0.01)

    def get(self, kind_or_plural: str, namespace: str | None, name: str) -> JsonObj | None:
        try:
            return self.store.get(self.resource(kind_or_plural), namespace, name)
        except ApiError as e:
            if e.code == 404:
                return None
            raise

    def list(
        self,
        kind_or_plural: str,
        namespace: str | None = None,
        label_selector: str | None = None,
    ) -> builtins.list[JsonObj]:
        flt = WatchFilter(namespace=namespace, labels=parse_label_selector(label_selector))
        return self.store.list_objects(self.resource(kind_or_plural), flt)

    def events_for(self, namespace: str | None = None) -> builtins.list[JsonObj]:
        """Recorded Kubernetes Events (core v1 and events.k8s.io/v1), oldest first."""
        events: builtins.list[JsonObj] = []
        for res in self.table.all:
            if res.kind == "Event":
                events += self.store.list_objects(res, WatchFilter(namespace=namespace))
        events.sort(key=lambda e: int(e["metadata"]["resourceVersion"]))
        return events

    def mint_token(
        self,
        namespace: str,
        service_account: str,
        pod: str,
        *,
        audiences: builtins.list[str] | None = None,
        expiration_seconds: int = 3600,
        issued_at: float | None = None,
    ) -> str:
        """A bound token of `service_account` for `pod` (which must run as it), as the
        kubelet gets for a projected serviceAccountToken volume (kubeapi_auth.py)."""
        return self.tokens.mint(
            namespace,
            service_account,
            pod,
            audiences=audiences,
            expiration_seconds=expiration_seconds,
            issued_at=issued_at,
        )

    def reset(self) -> None:
        """Fresh state: no objects, counters, failures or forbids; open watches get 410."""
        self.store.reset()
        self._controls.reset()

    # ================================================================ test control

    def expire_watches(self) -> None:
        """Compact history: open watches get a 410 ERROR event, re-watching an old RV too."""
        self.store.expire()

    def break_watches(self, *, abrupt: bool = False) -> None:
        """Cut open watch connections without an error event (abrupt: reset, no final chunk)."""
        self._server.break_watches(abrupt)

    def forbid(self, plural: str, verbs: Iterable[str] = ("list", "watch")) -> None:
        """Answer these verbs on this resource with 403 Forbidden until `allow`."""
        self._controls.forbid(self.resource(plural).plural, verbs)

    def allow(self, plural: str) -> None:
        self._controls.allow(self.resource(plural).plural)

    def fail_next(self, verb: str, plural: str, count: int = 1, status: int = 500) -> None:
        """The next `count` requests of `verb` (get, list, watch, create, update, patch,
        delete) on `plural` (e.g. "namespaces", "deployments/status") fail with `status`."""
        base, _, sub = plural.partition("/")
        name = self.resource(base).plural + (f"/{sub}" if sub else "")
        self._controls.fail_next(verb, name, count, status)

    def fault(
        self,
        kind: str,
        *,
        status: int = 0,
        retry_after: int | None = None,
        body: str = "apf",
        verbs: Iterable[str] | None = None,
        resources: Iterable[str] | None = None,
        clients: Iterable[str] | None = None,
    ) -> Fault:
        """Answer every matching request with fault `kind` until `clear_faults`:
        "throttle" (429, Retry-After `retry_after`, default 1; `body` "apf" plain text as
        the flow-control filters send, or "status" with details.retryAfterSeconds), "fail"
        (`status`, default 500), "reset", "stall" or "expire" (every watch: 410 ERROR).
        `verbs`, `resources` (loose names, or "deployments/status") and `clients` (tokens)
        narrow it."""
        plurals = None
        if resources is not None:
            plurals = frozenset(
                self.resource(base).plural + (f"/{sub}" if sub else "")
                for base, _, sub in (r.partition("/") for r in resources)
            )
        fault = Fault(
            kind,
            status=status,
            retry_after=retry_after,
            body=body,
            verbs=None if verbs is None else frozenset(v.lower() for v in verbs),
            plurals=plurals,
            clients=None if clients is None else frozenset(clients),
        )
        self._controls.inject(fault)
        return fault

    def clear_faults(self) -> None:
        """End every fault mode (forbids and `fail_next` failures stay)."""
        self._controls.clear()

    @contextlib.contextmanager
    def faulty(self, kind: str, **options: Any) -> Iterator[Fault]:
        """`fault` for the duration of a `with` block."""
        try:
            yield self.fault(kind, **options)
        finally:
            self.clear_faults()

    def request_log(
        self,
        *,
        client: str | None = None,
        verb: str | None = None,
        resource: str | None = None,
        since: float | None = None,
        until: float | None = None,
    ) -> builtins.list[Request]:
        """Every request the server saw that matches, oldest first; `since` and `until`
        are `time.monotonic()` readings."""
        plural = None if resource is None else self.resource(resource).plural
        return self._controls.log(client=client, verb=verb, plural=plural, since=since, until=until)

    def peak_rate(self, window: float = 1.0, **match: Any) -> int:
        """The most matching requests (`request_log`'s filters) in any `window` seconds."""
        return peak_rate(self.request_log(**match), window)

    def requests(self, verb: str | None = None, plural: str | None = None) -> int:
        """How many requests the server got, optionally only of one verb and/or resource."""
        return self._controls.requests(verb, plural)

    def request_counts(self) -> dict[tuple[str, str], int]:
        return self._controls.request_counts()

    def open_watches(self, plural: str | None = None) -> int:
        return self._controls.open_watches(None if plural is None else self.resource(plural).plural)

    def _watches_reached(self, plural: str, count: int, exactly: bool) -> bool:
        current = self.open_watches(plural)
        return current == count if exactly else current >= count

    def wait_for_watches(
        self, plural: str, count: int = 1, timeout: float = 10.0, *, exactly: bool = False
    ) -> None:
        """Block until at least (or exactly) `count` watches of `plural` are open.

        A test's sync point: a write made before the watch is open would not be streamed live.
        """
        deadline = time.monotonic() + timeout
        while not self._watches_reached(plural, count, exactly):
            if time.monotonic() > deadline:
                raise WaitTimeoutError(f"{self.open_watches(plural)} open watches of {plural}")
            time.sleep(0.01)

    async def await_watches(
        self, plural: str, count: int = 1, within: float = 10.0, *, exactly: bool = False
    ) -> None:
        """`wait_for_watches` for async tests: yields to the caller's event loop."""
        deadline = time.monotonic() + within
        while not self._watches_reached(plural, count, exactly):
            if time.monotonic() > deadline:
                raise WaitTimeoutError(f"{self.open_watches(plural)} open watches of {plural}")
            await asyncio.sleep(0.01)
