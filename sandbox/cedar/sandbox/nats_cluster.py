"""Three (or more) real ``nats-server`` processes with routes and JetStream on 127.0.0.1.

For the fault suite: a server can be SIGKILLed and restarted with its store, and cut off
from the others (a network partition) and healed. I/O: runs ``nats-server`` children (each
with a config file and its JetStream store under ``base_dir``), asks their monitoring ports
about routes and the JetStream meta leader, and relays every route connection through a
TCP link of its own (``links.py``), which is what a partition cuts.

Why links and not a config reload: a partition must look to the servers like the network
failing, not like an operator removing a route. Each ordered pair of servers (A dials B)
has its own link, so cutting the links into and out of one server isolates exactly it
while the others stay connected, and the servers keep retrying their routes as they would
across a real partition. Every server advertises a cluster address that refuses
connections, so a server can never learn a direct path to another through gossip and
bypass its links; and none tells its clients about the others (`no_advertise`): clients
are given every server's URL, and a test's per-server subscriber stays on its server.
"""

from __future__ import annotations

import json
import os
import signal
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from cedar.sandbox.errors import ServerStartError
from cedar.sandbox.links import LinkHub, TcpLink
from cedar.sandbox.nats import NatsServer
from cedar.sandbox.procs import free_port, wait_for

__all__ = ["ClusterNode", "NatsCluster"]


class ClusterNode(NatsServer):
    """One member of a `NatsCluster`: a ``nats-server`` run from a config file.

    Its ports (client, monitor, route) and store are kept across restarts.
    """

    def __init__(
        self,
        store_dir: Path,
        *,
        server_name: str,
        cluster_name: str,
        extra_config: str = "",
        binary: str | None = None,
    ) -> None:
        super().__init__(store_dir, server_name=server_name, binary=binary)
        self.cluster_name = cluster_name
        self.route_port = free_port()
        # Never listened on: what this server advertises for gossip (see the module).
        self.advertise_port = free_port()
        self.extra_config = extra_config
        self.route_urls: list[str] = []  # filled in by the cluster: one link per peer

    @property
    def config_path(self) -> Path:
        return self.store_dir.parent / f"{self.server_name}.conf"

    def config(self) -> str:
        routes = "\n".join(f"    {url!s}" for url in self.route_urls)
        return (
            f'server_name: "{self.server_name}"\n'
            f"listen: 127.0.0.1:{self.port}\n"
            f"http: 127.0.0.1:{self.monitor_port}\n"
            f'jetstream {{ store_dir: "{self.store_dir}" }}\n'
            "cluster {\n"
            f'  name: "{self.cluster_name}"\n'
            f"  listen: 127.0.0.1:{self.route_port}\n"
            f'  advertise: "127.0.0.1:{self.advertise_port}"\n'
            # Clients are given every server's URL; none learns of others behind its back.
            "  no_advertise: true\n"
            "  routes: [\n"
            f"{routes}\n"
            "  ]\n"
            "}\n"
            f"{self.extra_config}\n"
        )

    def command(self) -> list[str]:
        return [self._binary or _nats_binary(), "-c", str(self.config_path)]

    def prepare(self) -> None:
        super().prepare()
        self.config_path.write_text(self.config())

    def kill(self) -> None:
        """SIGKILL: no lame-duck mode, no flush; the store stays as the crash left it."""
        pid = self.pid
        if pid is not None and self.is_running:
            os.kill(pid, signal.SIGKILL)
        self.stop()  # reaps it and forgets the process

    def monitor(self, path: str, timeout: float = 2.0) -> dict[str, Any]:
        """A monitoring endpoint's JSON (``varz``, ``routez``, ``jsz?...``)."""
        with urllib.request.urlopen(f"{self.monitor_url}/{path}", timeout=timeout) as resp:
            body = json.loads(resp.read())
        if not isinstance(body, dict):
            raise ServerStartError(f"{self.server_name}: /{path} did not answer an object")
        return body

    def peers(self) -> set[str]:
        """Names of the servers this one has a route to now."""
        routes = self.monitor("routez").get("routes") or []
        return {str(r.get("remote_name") or r.get("remote_id")) for r in routes}

    def meta_leader(self) -> str | None:
        """The JetStream meta leader as this server sees it."""
        meta = self.monitor("jsz").get("meta_cluster") or {}
        leader = meta.get("leader")
        return str(leader) if leader else None


def _nats_binary() -> str:
    from cedar.sandbox.procs import find_binary

    return find_binary("nats-server")


class NatsCluster:
    """`size` clustered JetStream servers named ``<prefix>-0`` ... under ``base_dir``.

    `url` lists every client URL (comma separated), as CEDAR_NATS_URL takes it.
    """

    def __init__(
        self,
        base_dir: str | Path,
        size: int = 3,
        *,
        name: str = "cedar-chaos",
        prefix: str = "n",
        extra_config: str = "",
    ) -> None:
        if size < 2:
            raise ValueError("a cluster needs at least two servers")
        self.base_dir = Path(base_dir)
        self.name = name
        self.nodes = [
            ClusterNode(
                self.base_dir / f"{prefix}-{i}" / "store",
                server_name=f"{prefix}-{i}",
                cluster_name=name,
                extra_config=extra_config,
            )
            for i in range(size)
        ]
        self.hub = LinkHub()
        # links[(a, b)]: the link node a dials to reach node b's route port.
        self.links: dict[tuple[int, int], TcpLink] = {}
        for a, node in enumerate(self.nodes):
            for b, peer in enumerate(self.nodes):
                if a != b:
                    link = self.hub.add(peer.route_port)
                    self.links[(a, b)] = link
                    node.route_urls.append(f"nats://127.0.0.1:{link.port}")

    def __iter__(self) -> Iterator[ClusterNode]:
        return iter(self.nodes)

    def __getitem__(self, index: int) -> ClusterNode:
        return self.nodes[index]

    @property
    def url(self) -> str:
        return ",".join(node.url for node in self.nodes)

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def index_of(self, server_name: str) -> int:
        for i, node in enumerate(self.nodes):
            if node.server_name == server_name:
                return i
        raise KeyError(f"no server named {server_name!r} in {self.name}")

    # --- lifecycle ----------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> NatsCluster:
        """Start every server and wait until all routes are up and JetStream has a leader."""
        self.hub.start()
        try:
            for node in self.nodes:
                node.start()
            self.wait_formed(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        self.hub.stop()

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- faults -------------------------------------------------------------------------

    def kill(self, index: int) -> None:
        self.nodes[index].kill()

    def restart(self, index: int) -> None:
        """Start a stopped or killed server again (same ports, same store)."""
        self.nodes[index].start()

    def partition(self, index: int) -> None:
        """Cut every route into and out of server `index`, now and until `heal`."""
        for (a, b), link in self.links.items():
            if index in (a, b):
                link.cut()

    def heal(self, index: int | None = None) -> None:
        """Let the routes of `index` (or of every server) through again."""
        for (a, b), link in self.links.items():
            if index is None or index in (a, b):
                link.heal()

    # --- state --------------------------------------------------------------------------

    def formed(self, members: Sequence[int] | None = None) -> bool:
        """Whether each of `members` (default all) routes to every other member and they
        agree on one JetStream meta leader among them."""
        chosen = list(range(len(self.nodes)) if members is None else members)
        names = {self.nodes[i].server_name for i in chosen}
        leaders = set()
        for i in chosen:
            node = self.nodes[i]
            if not node.is_running:
                return False
            try:
                if not (names - {node.server_name}) <= node.peers():
                    return False
                leaders.add(node.meta_leader())
            except (OSError, ValueError):
                return False
        return len(leaders) == 1 and None not in leaders and leaders <= names

    def wait_formed(self, timeout: float = 60.0, members: Sequence[int] | None = None) -> None:
        wait_for(
            lambda: self.formed(members), timeout, interval=0.1, what=f"cluster {self.name} formed"
        )

    def isolated(self, index: int) -> bool:
        """Whether server `index` has no route to any other server (and they none to it)."""
        node = self.nodes[index]
        try:
            if node.is_running and node.peers():
                return False
            for i, other in enumerate(self.nodes):
                if i != index and other.is_running and node.server_name in other.peers():
                    return False
        except (OSError, ValueError):
            return False
        return True

    def log_tails(self, lines: int = 30) -> str:
        return "\n".join(f"--- {n.server_name}\n{n.log_tail(lines)}" for n in self.nodes)

    def __repr__(self) -> str:
        return f"<NatsCluster {self.name} {self.nodes}>"
