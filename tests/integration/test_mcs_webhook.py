"""The admission webhook end to end: real TLS (a CA made by trustme), AdmissionReview v1
requests as kube-apiserver sends them, namespaces looked up in the simulated API.

Every case of the shared table (tests/unit/test_mcs_admission_table.py) goes through HTTPS
and must come back as `podlevel.decide_pod` (and so the admission policies' CEL) decides:
the same refusals with the same messages, and a JSON Patch that makes the same pod. Then
what only the served webhook does: dryRun and oldObject requests, a namespace the watch
has not delivered yet, a certificate rotated under it, malformed requests, and
`cedar mcs-allocator` serving it with CEDAR_MCS_WEBHOOK_PORT.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import ssl
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import trustme

from cedar.mcs_allocator.nscache import NamespaceCache
from cedar.mcs_allocator.podlevel import level_patch
from cedar.mcs_allocator.scope import Scope
from cedar.mcs_allocator.webhook import PATH, CertFiles, Webhook
from cedar.runtime.kube import KubeClient, load_config
from cedar.sandbox.kubeapi import KubeAPI
from cedar.sandbox.kubeapi_ops import json_patch
from cedar.sandbox.procs import free_port
from tests.harness import waiting
from tests.unit.test_mcs_admission_table import (
    ANNOTATION,
    CASES,
    EXCLUDED,
    LEVEL,
    NAMESPACES,
    RULES,
    Case,
    decided,
    pod,
)

pytestmark = pytest.mark.integration


def write_cert(ca: trustme.CA, directory: Path) -> tuple[Path, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    issued = ca.issue_cert("127.0.0.1", "localhost", "cedar-mcs-webhook.cedar-system.svc")
    cert, key = directory / "tls.crt", directory / "tls.key"
    # Written aside and renamed, as the kubelet swaps a Secret volume's files.
    for path, data in (
        (cert, b"".join(blob.bytes() for blob in issued.cert_chain_pems)),
        (key, issued.private_key_pem.bytes()),
    ):
        tmp = path.with_suffix(".new")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return cert, key


def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def review(
    case_pod: dict[str, Any], *, old: dict[str, Any] | None = None, dry_run: bool = False
) -> dict[str, Any]:
    """An AdmissionReview as kube-apiserver sends it (admission/v1 AdmissionRequest)."""
    meta = case_pod["metadata"]
    ephemeral = old is not None
    request: dict[str, Any] = {
        "uid": str(uuid.uuid4()),
        "kind": {"group": "", "version": "v1", "kind": "Pod"},
        "resource": {"group": "", "version": "v1", "resource": "pods"},
        "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
        "requestResource": {"group": "", "version": "v1", "resource": "pods"},
        "name": meta["name"],
        "namespace": meta["namespace"],
        "operation": "UPDATE" if ephemeral else "CREATE",
        "userInfo": {
            "username": "system:serviceaccount:kube-system:replicaset-controller",
            "groups": ["system:serviceaccounts", "system:authenticated"],
        },
        "object": case_pod,
        "oldObject": old,
        "dryRun": dry_run,
        "options": {
            "apiVersion": "meta.k8s.io/v1",
            "kind": "UpdateOptions" if ephemeral else "CreateOptions",
        },
    }
    if ephemeral:
        request["subResource"] = "ephemeralcontainers"
        request["requestSubResource"] = "ephemeralcontainers"
    return {"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview", "request": request}


async def post(url: str, body: Any, ca: trustme.CA) -> tuple[int, Any]:
    """POST over a new TLS connection that trusts only `ca`; (status, JSON or text)."""
    connector = aiohttp.TCPConnector(ssl=client_context(ca))
    async with aiohttp.ClientSession(connector=connector) as session:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        async with session.post(url, data=data, headers=headers) as resp:
            text = await resp.text()
            try:
                return resp.status, json.loads(text)
            except ValueError:
                return resp.status, text


class Served:
    def __init__(
        self,
        api: KubeAPI,
        webhook: Webhook,
        cache: NamespaceCache,
        ca: trustme.CA,
        certs: tuple[Path, Path],
    ) -> None:
        self.api = api
        self.webhook = webhook
        self.cache = cache
        self.ca = ca
        self.certs = certs
        self.url = f"https://127.0.0.1:{webhook.port}{PATH}"

    async def send(self, body: Any, *, ca: trustme.CA | None = None) -> tuple[int, Any]:
        return await post(self.url, body, ca or self.ca)


@pytest.fixture
async def served(kube_api: KubeAPI, kubeconfig: Path, tmp_path: Path) -> AsyncIterator[Served]:
    for ns in NAMESPACES.values():
        kube_api.create(ns)
    ca = trustme.CA()
    cert, key = write_cert(ca, tmp_path / "tls")
    client = KubeClient(load_config(str(kubeconfig)))
    cache = NamespaceCache(client, Scope.of(EXCLUDED, ""), ANNOTATION)
    webhook = Webhook(cache, RULES, CertFiles(str(cert), str(key)))
    stop = asyncio.Event()
    task = asyncio.create_task(cache.run(stop))
    await webhook.start("127.0.0.1", 0)
    await asyncio.wait_for(cache.synced.wait(), 10)
    try:
        yield Served(kube_api, webhook, cache, ca, (cert, key))
    finally:
        stop.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await webhook.stop()
        await client.close()


def outcome(response: dict[str, Any], case_pod: dict[str, Any]) -> tuple[bool, dict[str, Any], str]:
    answer = response["response"]
    if not answer["allowed"]:
        return False, case_pod, answer["status"]["message"]
    patched = case_pod
    if "patch" in answer:
        assert answer["patchType"] == "JSONPatch"
        patched = json_patch(case_pod, json.loads(base64.b64decode(answer["patch"])))
    return True, patched, ""


async def test_the_table_over_tls(served: Served) -> None:
    for i, case in enumerate(CASES):
        body = review(case.pod, old=case.old, dry_run=bool(i % 2))
        status, response = await served.send(body)
        assert status == 200, (case.id, response)
        assert response["response"]["uid"] == body["request"]["uid"]
        allowed, patched, message = outcome(response, case.pod)
        decision = decided(case)
        assert (allowed, message) == (decision.allowed, decision.message), case.id
        expected = case.pod
        if decision.set_level is not None:
            expected = json_patch(case.pod, level_patch(case.pod, decision.set_level))
        assert patched == expected, case.id
        if not allowed:
            assert response["response"]["status"]["code"] == 403


async def test_a_namespace_labelled_after_the_watch_is_read_fresh(served: Served) -> None:
    served.api.create({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "team-late"}})
    status, response = await served.send(review(pod("team-late")))
    assert status == 200 and not response["response"]["allowed"]
    assert "cedar-mcs-allocator is assigning it" in response["response"]["status"]["message"]
    before = served.cache.gets
    served.api.patch(
        "namespaces", None, "team-late", {"metadata": {"annotations": {ANNOTATION: LEVEL}}}
    )
    # Right after the PATCH, whether or not the watch has delivered it yet:
    status, response = await served.send(review(pod("team-late")))
    allowed, patched, _ = outcome(response, pod("team-late"))
    assert allowed and patched["spec"]["securityContext"]["seLinuxOptions"]["level"] == LEVEL
    assert served.cache.gets >= before
    status, response = await served.send(review(pod("no-such-namespace")))
    assert not response["response"]["allowed"]
    assert response["response"]["status"]["code"] == 404


async def test_the_namespace_cache_follows_the_watch(served: Served) -> None:
    served.api.patch(
        "namespaces", None, "tenant-a", {"metadata": {"annotations": {ANNOTATION: "s0:c5,c6"}}}
    )

    def delivered() -> bool:
        hit = served.cache.cached("tenant-a")
        return hit is not None and hit.view.level == "s0:c5,c6"

    await waiting.eventually(delivered, 10, "the watch to deliver the new level")
    gets = served.cache.gets
    _, response = await served.send(review(pod()))
    allowed, patched, _ = outcome(response, pod())
    assert allowed and patched["spec"]["securityContext"]["seLinuxOptions"]["level"] == "s0:c5,c6"
    assert served.cache.gets == gets, "a namespace with a level is answered from the cache"


async def test_a_rotated_certificate_is_served_without_a_restart(
    served: Served, tmp_path: Path
) -> None:
    new_ca = trustme.CA()
    write_cert(new_ca, served.certs[0].parent)
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await served.send(review(pod()), ca=new_ca)  # not reloaded yet
    assert served.webhook.certs.reload()
    status, _ = await served.send(review(pod()), ca=new_ca)
    assert status == 200
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await served.send(review(pod()))  # the old CA no longer vouches for it
    # A half-written rotation is not loaded: the current certificate stays.
    served.certs[1].write_bytes(b"-----BEGIN PRIVATE KEY-----\nbroken\n")
    assert not served.webhook.certs.reload()
    status, _ = await served.send(review(pod()), ca=new_ca)
    assert status == 200


async def test_malformed_requests_are_refused_clearly(served: Served) -> None:
    status, text = await served.send(b"{not json")
    assert status == 400 and "invalid AdmissionReview" in text
    wrong = review(pod())
    wrong["apiVersion"] = "admission.k8s.io/v1beta1"
    status, text = await served.send(wrong)
    assert status == 400 and "admissionReviewVersions" in text
    no_uid = review(pod())
    del no_uid["request"]["uid"]
    status, _ = await served.send(no_uid)
    assert status == 400
    # Something it is not registered for is let through untouched.
    other = review(pod())
    other["request"]["kind"] = {"group": "apps", "version": "v1", "kind": "Deployment"}
    status, response = await served.send(other)
    assert status == 200 and response["response"] == {
        "uid": other["request"]["uid"],
        "allowed": True,
    }


async def get(url: str, ca: trustme.CA) -> int:
    connector = aiohttp.TCPConnector(ssl=client_context(ca))
    async with aiohttp.ClientSession(connector=connector) as session, session.get(url) as resp:
        return resp.status


async def test_readiness_on_the_webhook_port(served: Served) -> None:
    assert await get(f"https://127.0.0.1:{served.webhook.port}/readyz", served.ca) == 200
    served.webhook.certs.loaded = False
    assert await get(f"https://127.0.0.1:{served.webhook.port}/readyz", served.ca) == 503


def allocator_env(nats_url: str, kubeconfig: Path, **env: str) -> dict[str, str]:
    return {
        **os.environ,
        "CEDAR_NATS_URL": nats_url,
        "KUBECONFIG": str(kubeconfig),
        "CEDAR_METRICS_PORT": str(free_port()),
        "CEDAR_POD_NAME": "webhook-test",
        **env,
    }


async def test_cedar_mcs_allocator_serves_it(
    kube_api: KubeAPI, kubeconfig: Path, nats_url: str, tmp_path: Path
) -> None:
    for ns in NAMESPACES.values():
        kube_api.create(ns)
    ca = trustme.CA()
    cert, key = write_cert(ca, tmp_path / "tls")
    port = free_port()
    log_path = tmp_path / "allocator.log"
    with log_path.open("wb") as log:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "cedar.cli",
            "mcs-allocator",
            env=allocator_env(
                nats_url,
                kubeconfig,
                CEDAR_MCS_WEBHOOK_PORT=str(port),
                CEDAR_MCS_WEBHOOK_HOST="127.0.0.1",
                CEDAR_MCS_WEBHOOK_CERT=str(cert),
                CEDAR_MCS_WEBHOOK_KEY=str(key),
            ),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:

        async def ready() -> bool:
            try:
                return await get(f"https://127.0.0.1:{port}/readyz", ca) == 200
            except aiohttp.ClientError:
                return proc.returncode is not None  # stop waiting: it exited

        await waiting.eventually(ready, 30, "the webhook to be ready", details=log_path.read_text)
        assert proc.returncode is None, log_path.read_text()
        case: Case = CASES[0]
        status, response = await post(f"https://127.0.0.1:{port}{PATH}", review(case.pod), ca)
        allowed, patched, _ = outcome(response, case.pod)
        assert status == 200 and allowed
        assert patched["spec"]["securityContext"]["seLinuxOptions"]["level"] == LEVEL
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 25)
        except TimeoutError:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, log_path.read_text()


async def test_an_unusable_certificate_stops_the_service_with_a_clear_error(
    kubeconfig: Path, nats_url: str, tmp_path: Path
) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "cedar.cli",
        "mcs-allocator",
        env=allocator_env(
            nats_url,
            kubeconfig,
            CEDAR_MCS_WEBHOOK_PORT=str(free_port()),
            CEDAR_MCS_WEBHOOK_CERT=str(tmp_path / "missing.crt"),
            CEDAR_MCS_WEBHOOK_KEY=str(tmp_path / "missing.key"),
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    text = out.decode(errors="replace")
    assert proc.returncode == 1, text
    assert "cannot serve the admission webhook" in text
    assert "missing.crt" in text
