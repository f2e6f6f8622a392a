"""A puller speaks only for its node: NATS auth callout on a real nats-server.

The server runs Cedar's own deploy/nats/accounts.conf and the component's
deploy/components/nats-auth-callout/auth-callout.conf, and `cedar nats-auth` (the
Responder in this process, and once the CLI as a process of its own) answers its
authorization requests with TokenReviews against the simulated API, whose bound tokens and
TokenReview are those of kubernetes/kubernetes (sandbox/cedar/sandbox/kubeapi_auth.py).

- A puller with node A's token writes A's status keys, prune clocks and decisions through
  the puller's own code (StatusPublisher, PruneClocks) and is denied B's, the server's log
  naming the refused user `puller:node-a`; it cannot reconfigure the buckets either.
- Tokens for the wrong audience, expired, of another ServiceAccount, of a deleted Pod, and
  garbage are refused, as is the static `puller` password: each is counted by reason.
- The watcher, the allocator and ops keep their static users.
- A rotated token is sent (the puller reconnects when the kubelet rewrites the file) and
  checked again; a grant that runs out closes the connection and fails /healthz; pullers
  come back after NATS restarts while the callout is away.
- `cedar nats-auth` as a process: serves, counts, stops on SIGTERM; refuses bad settings.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import nats
import pytest
from nats.aio.client import Client as NatsClient
from nats.errors import Error as NatsError
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from pydantic import SecretStr

from cedar.nats_auth.app import load_issuer
from cedar.nats_auth.nkeyjwt import Signer, new_account_seed
from cedar.nats_auth.responder import Responder
from cedar.nats_auth.settings import NatsAuthSettings
from cedar.proto import subjects
from cedar.puller.plan import ImageRecord
from cedar.puller.prune_state import PruneClocks
from cedar.puller.status import StatusPublisher
from cedar.runtime import topology
from cedar.runtime.bus import Bus
from cedar.runtime.health import Health
from cedar.runtime.kube import KubeClient, KubeError, load_config
from cedar.runtime.settings import CommonSettings
from cedar.sandbox.kubeapi import KubeAPI
from cedar.sandbox.kubeapi_auth import TOKEN_REVIEWS
from cedar.sandbox.nats import NatsServer
from cedar.sandbox.procs import find_binary, free_port
from tests.harness.nats_server import start_or_fail
from tests.harness.waiting import eventually

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
ACCOUNTS = REPO / "deploy" / "nats" / "accounts.conf"
COMPONENT = REPO / "deploy" / "components" / "nats-auth-callout"
PASSWORD_VARIABLES = {
    "watcher": "WATCHER_PASSWORD",
    "puller": "PULLER_PASSWORD",
    "mcs-allocator": "MCS_ALLOCATOR_PASSWORD",
    "ops": "OPS_PASSWORD",
}
NAMESPACE, PULLER_SA = "cedar-system", "cedar-puller"
_VIOLATION = re.compile(
    r'"CEDAR/user:(?P<user>[^"]+)" - (?P<kind>Publish|Subscription) Violation'
    r' - Subject "(?P<subject>[^"]+)"'
)


def password(user: str) -> str:
    return f"pw-{user}-callout"


def write_secrets(conf: Path, issuer: str) -> None:
    """The Secret cedar-nats-server's two files: passwords.conf and nats-auth.conf."""
    (conf / "passwords.conf").write_text(
        "".join(f'{var}: "{password(user)}"\n' for user, var in PASSWORD_VARIABLES.items())
    )
    (conf / "nats-auth.conf").write_text(
        f'NATS_AUTH_PASSWORD: "{password("nats-auth")}"\nNATS_AUTH_ISSUER: "{issuer}"\n'
    )


class CalloutServer(NatsServer):
    """JetStream with Cedar's accounts.conf and the component's auth-callout.conf."""

    def __init__(self, store_dir: Path, issuer: str) -> None:
        self.issuer = issuer
        super().__init__(store_dir, server_name="callout-test")

    def command(self) -> list[str]:
        conf = self.store_dir.parent
        shutil.copy(ACCOUNTS, conf / "accounts.conf")
        shutil.copy(COMPONENT / "auth-callout.conf", conf / "auth-callout.conf")
        write_secrets(conf, self.issuer)
        (conf / "server.conf").write_text(
            f'server_name: "{self.server_name}"\n'
            f"listen: 127.0.0.1:{self.port}\n"
            f"http: 127.0.0.1:{self.monitor_port}\n"
            f'jetstream {{ store_dir: "{self.store_dir}" }}\n'
            "include ./accounts.conf\n"
            "include ./auth-callout.conf\n"
        )
        return [find_binary("nats-server"), "-c", str(conf / "server.conf")]

    def mark(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def log_since(self, mark: int) -> str:
        with self.log_path.open("rb") as f:
            f.seek(mark)
            return f.read().decode(errors="replace")

    def refusals(self, mark: int) -> set[tuple[str, str, str]]:
        return {
            (m["user"], m["kind"], m["subject"]) for m in _VIOLATION.finditer(self.log_since(mark))
        }


@dataclass
class World:
    api: KubeAPI
    nats: CalloutServer
    kubeconfig: Path
    seed_file: Path
    tmp: Path

    def settings(self) -> NatsAuthSettings:
        return NatsAuthSettings(
            nats_url=self.nats.url,
            nats_user="nats-auth",
            nats_password=SecretStr(password("nats-auth")),
            auth_issuer_seed_file=self.seed_file,
            kubeconfig=str(self.kubeconfig),
            pod_name="test",
        )

    def token_file(self, name: str, token: str) -> Path:
        path = self.tmp / f"{name}.token"
        path.write_text(token)
        return path


def _pod(name: str, node: str, service_account: str = PULLER_SA) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {
            "serviceAccountName": service_account,
            "nodeName": node,
            "containers": [{"name": "puller", "image": "cedar"}],
        },
    }


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("callout")
    seed_file = tmp / "issuer.seed"
    seed_file.write_bytes(new_account_seed())
    issuer = Signer(seed_file.read_bytes()).public_key
    api = KubeAPI().start()
    for node in ("node-a", "node-b", "node-c.example.com"):
        api.create({"apiVersion": "v1", "kind": "Node", "metadata": {"name": node}})
    api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NAMESPACE}})
    api.create(_pod("puller-a", "node-a"))
    api.create(_pod("puller-b", "node-b"))
    api.create(_pod("puller-c", "node-c.example.com"))
    api.create(_pod("intruder", "node-a", service_account="other"))
    server = start_or_fail(CalloutServer(tmp / "nats" / "store", issuer))
    try:
        yield World(api, server, api.write_kubeconfig(tmp / "kubeconfig"), seed_file, tmp)
    finally:
        server.stop()
        api.stop()


@contextlib.asynccontextmanager
async def serving(settings: NatsAuthSettings) -> AsyncIterator[Responder]:
    """The callout in this process, answering until the block ends."""
    health, stop = Health(), asyncio.Event()
    bus = Bus(settings, "cedar-nats-auth-test", health)
    assert await bus.connect()
    kube = KubeClient(load_config(settings.kubeconfig), timeout=5)
    responder = Responder(settings, load_issuer(settings), kube)
    task = asyncio.create_task(responder.serve(bus, health, stop))
    await eventually(lambda: health.ready, what="the callout subscribed")
    try:
        yield responder
    finally:
        stop.set()
        await task
        await bus.close()
        await kube.close()


@pytest.fixture
async def callout(world: World) -> AsyncIterator[Responder]:
    async with serving(world.settings()) as responder:
        yield responder


def count(result: str, reason: str) -> float:
    value = REGISTRY.get_sample_value(
        "cedar_nats_auth_requests_total", {"result": result, "reason": reason}
    )
    return value or 0.0


async def puller_bus(world: World, token_file: Path, *, check: float = 30.0) -> Bus:
    """The puller's own connection code, with CEDAR_NATS_TOKEN_FILE set (looked at again
    every `check` seconds)."""
    settings = CommonSettings(nats_url=world.nats.url, nats_token_file=token_file, pod_name="p")
    bus = Bus(settings, "cedar-puller-p", Health())
    bus.token_check_interval = check
    assert await asyncio.wait_for(bus.connect(), 15)
    return bus


async def try_connect(world: World, **auth: Any) -> NatsError | None:
    try:
        nc = await nats.connect(
            world.nats.url, allow_reconnect=False, max_reconnect_attempts=0, **auth
        )
    except NatsError as err:
        return err
    await nc.close()
    return None


# ------------------------------------------------------------------ the puller's rights


async def test_a_puller_writes_its_own_node_and_is_denied_anothers(
    world: World, callout: Responder
) -> None:
    token = world.api.mint_token(NAMESPACE, PULLER_SA, "puller-a", audiences=["nats"])
    before = count("accepted", "none")
    bus = await puller_bus(world, world.token_file("a", token))
    try:
        assert count("accepted", "none") == before + 1
        # What the puller does at start: the shared streams (create only) and its buckets.
        await bus.ensure(streams=topology.service_streams(CommonSettings()), update=False)
        buckets = await bus.ensure(
            buckets=[
                topology.node_status_bucket(CommonSettings()),
                topology.puller_state_bucket(CommonSettings()),
            ]
        )
        status_kv = buckets[subjects.KV_NODE_STATUS]
        status = StatusPublisher("node-a", bus.js, status_kv)
        clocks = PruneClocks("node-a", buckets[subjects.KV_PULLER_STATE], dry_run=False)
        image = "registry.example/team/web:v1"
        await status.publish_image(ImageRecord(image, state="present"), ("Deployment/t/web",))
        await status.decision(image, "pulled", "desired")
        await clocks.track("sha256:abc", 1000.0)
        await clocks.load()
        entry = await status_kv.get(subjects.node_status_key("node-a", image))
        assert json.loads(entry.value or b"{}")["node"] == "node-a"
        assert clocks.since == {"sha256:abc": 1000.0}

        # Another node's keys and decisions, and the buckets' configuration: refused.
        mark = world.nats.mark()
        denied = (
            f"$KV.{subjects.KV_NODE_STATUS}.{subjects.node_status_key('node-b', image)}",
            f"$KV.{subjects.KV_PULLER_STATE}.node-b.abc",
            subjects.decisions_subject("node-b"),
            f"$KV.{subjects.KV_NODE_STATUS}.node-a_evil.abc",  # another node's token prefix
            f"$JS.API.STREAM.UPDATE.KV_{subjects.KV_NODE_STATUS}",
            f"$JS.API.STREAM.PURGE.KV_{subjects.KV_NODE_STATUS}",
        )
        for subject in denied:
            await bus.nc.publish(subject, b"{}")
        await bus.nc.flush()
        expected = {("puller:node-a", "Publish", s) for s in denied}
        await eventually(
            lambda: world.nats.refusals(mark) >= expected,
            what="the server refusing node-a's writes for others",
            details=lambda: world.nats.log_since(mark),
        )
        keys = await status_kv.keys()
        assert all(k.startswith("node-a.") for k in keys), keys
    finally:
        await bus.close()


async def test_the_node_comes_from_the_token_with_dots_as_in_every_subject(
    world: World, callout: Responder
) -> None:
    token = world.api.mint_token(NAMESPACE, PULLER_SA, "puller-c", audiences=["nats"])
    bus = await puller_bus(world, world.token_file("c", token))
    try:
        buckets = await bus.ensure(buckets=[topology.node_status_bucket(CommonSettings())])
        kv = buckets[subjects.KV_NODE_STATUS]
        key = subjects.node_status_key("node-c.example.com", "img")
        assert key.startswith("node-c_example_com.")
        await kv.put(key, b"{}")
        assert (await kv.get(key)).value == b"{}"
    finally:
        await bus.close()


# ------------------------------------------------------------------ refusals


async def test_bad_tokens_are_refused_and_counted_by_reason(
    world: World, callout: Responder
) -> None:
    api = world.api
    api.create(_pod("puller-gone", "node-a"))
    gone = api.mint_token(NAMESPACE, PULLER_SA, "puller-gone", audiences=["nats"])
    api.delete("pods", NAMESPACE, "puller-gone")
    cases = {
        "wrong_audience": {"token": api.mint_token(NAMESPACE, PULLER_SA, "puller-a")},
        "expired": {
            "token": api.mint_token(
                NAMESPACE, PULLER_SA, "puller-a", audiences=["nats"], issued_at=time.time() - 7200
            )
        },
        "wrong_service_account": {
            "token": api.mint_token(NAMESPACE, "other", "intruder", audiences=["nats"])
        },
        "unauthenticated": {"token": gone},
        "malformed_token": {"token": "garbage-not-a-token"},
        "no_token": {"user": "puller", "password": password("puller")},
    }
    for reason, auth in cases.items():
        before = count("refused", reason)
        err = await try_connect(world, **auth)
        assert err is not None and "authorization violation" in str(err).lower(), (reason, err)
        assert count("refused", reason) == before + 1, reason
    # A request no server signed (only the server can send one) gets no answer, only a count.
    before = count("unreadable", "bad_request")
    assert await callout.answer(b"\xff not a request") is None
    assert count("unreadable", "bad_request") == before + 1


async def test_a_token_forged_for_another_node_is_refused(world: World, callout: Responder) -> None:
    """The node comes from the API's answer, never from the token's own claims: a token
    edited to name node-b no longer verifies."""
    token = world.api.mint_token(NAMESPACE, PULLER_SA, "puller-a", audiences=["nats"])
    header, claims, signature = token.split(".")
    data = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
    data["kubernetes.io"]["node"]["name"] = "node-b"
    forged = base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()
    before = count("refused", "unauthenticated")
    assert await try_connect(world, token=f"{header}.{forged}.{signature}") is not None
    assert count("refused", "unauthenticated") == before + 1


async def test_the_other_services_keep_their_static_users(world: World, callout: Responder) -> None:
    before = sum(count("refused", r) for r in ("no_token", "malformed_token"))
    for user in ("watcher", "mcs-allocator", "ops"):
        nc: NatsClient = await nats.connect(
            world.nats.url,
            user=user,
            password=password(user),
            inbox_prefix=f"_INBOX.cedar-{user}",
            allow_reconnect=False,
        )
        try:
            info = await nc.jetstream().account_info()  # $JS.API.INFO, allowed to each
            assert info is not None
        finally:
            await nc.close()
    # A wrong password is refused by the server itself.
    assert await try_connect(world, user="watcher", password="wrong") is not None
    # They bypass the callout: nothing was asked of it.
    assert sum(count("refused", r) for r in ("no_token", "malformed_token")) == before


# ------------------------------------------------------------------ expiry and rotation


async def test_a_rotated_token_is_sent_and_checked_again(world: World, callout: Responder) -> None:
    token_file = world.token_file(
        "rotating", world.api.mint_token(NAMESPACE, PULLER_SA, "puller-a", audiences=["nats"])
    )
    bus = await puller_bus(world, token_file, check=0.1)
    try:
        accepted = count("accepted", "none")
        # The kubelet writes the next token; here it is another Pod's, on another node, so
        # that the new grant shows the connection was authorized again with the new file.
        token_file.write_text(
            world.api.mint_token(NAMESPACE, PULLER_SA, "puller-b", audiences=["nats"])
        )
        await eventually(
            lambda: count("accepted", "none") > accepted and bus.connected,
            what="the puller reconnecting with the rotated token",
        )
        mark = world.nats.mark()
        await bus.nc.publish(subjects.decisions_subject("node-a"), b"{}")
        await bus.nc.flush()
        await eventually(
            lambda: (
                ("puller:node-b", "Publish", "cedar.decisions.node-a") in world.nats.refusals(mark)
            ),
            what="the new grant being node-b's",
            details=lambda: world.nats.log_since(mark),
        )
    finally:
        await bus.close()


async def test_a_grant_that_runs_out_fails_healthz(world: World, callout: Responder) -> None:
    """A token the kubelet did not rotate in time: the server closes the connection at the
    grant's expiry (nats-py does not reconnect after that), and the service is restarted."""
    callout.user_ttl = 2.0  # instead of CEDAR_AUTH_USER_TTL's 24 h
    token = world.api.mint_token(NAMESPACE, PULLER_SA, "puller-a", audiences=["nats"])
    bus = await puller_bus(world, world.token_file("stale", token))
    try:
        assert bus.health.alive
        await eventually(lambda: not bus.health.alive, what="the expired grant failing /healthz")
        assert not bus.connected
    finally:
        callout.user_ttl = 24 * 3600.0
        await bus.close()


async def test_pullers_come_back_when_nats_and_the_callout_do(world: World) -> None:
    """NATS restarts while the callout is away: the puller's reconnects are refused (the
    server times out waiting for an answer) until the callout is back, then it is in."""
    token = world.api.mint_token(NAMESPACE, PULLER_SA, "puller-a", audiences=["nats"])
    async with serving(world.settings()):
        bus = await puller_bus(world, world.token_file("restart", token))
    try:
        await asyncio.to_thread(world.nats.restart)
        mark = world.nats.mark()
        await eventually(
            lambda: "authentication error" in world.nats.log_since(mark),
            within=30,
            what="a reconnect refused while nobody answers for the callout",
        )
        assert not bus.connected
        async with serving(world.settings()):
            await eventually(lambda: bus.connected, within=30, what="the puller back in")
            buckets = await bus.ensure(buckets=[topology.node_status_bucket(CommonSettings())])
            await buckets[subjects.KV_NODE_STATUS].put(
                subjects.node_status_key("node-a", "after-restart"), b"{}"
            )
        assert bus.health.alive
    finally:
        await bus.close()


# ------------------------------------------------------------------ the command


def test_the_command_serves_and_stops_on_sigterm(world: World) -> None:
    port = free_port()
    env = {
        **os.environ,
        "CEDAR_NATS_URL": world.nats.url,
        "CEDAR_NATS_USER": "nats-auth",
        "CEDAR_NATS_PASSWORD": password("nats-auth"),
        "CEDAR_AUTH_ISSUER_SEED_FILE": str(world.seed_file),
        "KUBECONFIG": str(world.kubeconfig),
        "CEDAR_METRICS_PORT": str(port),
    }
    code = (
        "import argparse, sys\n"
        "from cedar.nats_auth import cli\n"
        "p = argparse.ArgumentParser(); cli.add_arguments(p)\n"
        "sys.exit(cli.main(p.parse_args([])))\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        asyncio.run(_through_the_command(world, port))
    finally:
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr[-3000:]


async def _through_the_command(world: World, port: int) -> None:
    base = f"http://127.0.0.1:{port}"
    async with aiohttp.ClientSession() as http:

        async def ready() -> bool:
            try:
                async with http.get(f"{base}/readyz") as resp:
                    return resp.status == 200
            except aiohttp.ClientError:
                return False

        await eventually(ready, within=30, what="cedar nats-auth ready")
        token = world.api.mint_token(NAMESPACE, PULLER_SA, "puller-b", audiences=["nats"])
        bus = await puller_bus(world, world.token_file("cli", token))
        await bus.close()
        async with http.get(f"{base}/metrics") as resp:
            text = await resp.text()
    samples = {
        (s.labels.get("result"), s.labels.get("reason")): s.value
        for family in text_string_to_metric_families(text)
        if family.name == "cedar_nats_auth_requests"
        for s in family.samples
        if s.name.endswith("_total")
    }
    assert samples == {("accepted", "none"): 1.0}


def test_the_command_refuses_bad_settings(world: World, tmp_path: Path) -> None:
    bad = tmp_path / "seed"
    bad.write_text("SUAEXAMPLENOTANACCOUNTSEED")
    code = (
        "import argparse, sys\n"
        "from cedar.nats_auth import cli\n"
        "p = argparse.ArgumentParser(); cli.add_arguments(p)\n"
        "sys.exit(cli.main(p.parse_args(sys.argv[1:])))\n"
    )
    for args, said in (
        ([], "CEDAR_AUTH_ISSUER_SEED_FILE is required"),
        (["--issuer-seed-file", str(bad)], "not an nkey seed"),
        (["--issuer-seed-file", str(world.seed_file), "--service-accounts", "x"], "namespace/name"),
    ):
        env = {k: v for k, v in os.environ.items() if not k.startswith("CEDAR_")}
        proc = subprocess.run(
            [sys.executable, "-c", code, *args],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 2 and said in proc.stderr, (args, proc.stderr)
        assert "SUAEXAMPLE" not in proc.stderr


def test_the_component_nats_conf_is_valid(tmp_path: Path) -> None:
    for name in ("nats.conf", "auth-callout.conf"):
        shutil.copy(COMPONENT / name, tmp_path / name)
    shutil.copy(ACCOUNTS, tmp_path / "accounts.conf")
    issuer = Signer(new_account_seed()).public_key
    write_secrets(tmp_path, issuer)
    proc = subprocess.run(
        [find_binary("nats-server"), "-t", "-c", str(tmp_path / "nats.conf")],
        env={**os.environ, "SERVER_NAME": "nats-0"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# ------------------------------------------------------------------ the simulated TokenReview


async def test_the_simulated_tokenreview_is_served_as_the_real_one(world: World) -> None:
    """Over HTTP, as pkg/registry/authentication/tokenreview/storage.go serves it: 201 with
    the review and its status; an empty token is a 400 (the checks themselves:
    tests/unit/test_nats_auth_tokenreview.py)."""
    kube = KubeClient(load_config(str(world.kubeconfig)))
    token = world.api.mint_token(NAMESPACE, PULLER_SA, "puller-a", audiences=["nats"])
    body = {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview"}
    before = world.api.requests("create", "tokenreviews")
    try:
        spec = {"token": token, "audiences": ["nats"]}
        review = await kube.create(TOKEN_REVIEWS, body | {"spec": spec})
        assert review["kind"] == "TokenReview" and review["spec"] == spec
        assert review["status"]["authenticated"] is True
        with pytest.raises(KubeError, match="token is required") as refused:
            await kube.create(TOKEN_REVIEWS, body | {"spec": {"token": ""}})
        assert refused.value.status == 400
    finally:
        await kube.close()
    assert world.api.requests("create", "tokenreviews") == before + 2
