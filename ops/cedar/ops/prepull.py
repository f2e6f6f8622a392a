"""Pre-pull a release's images on every eligible node, and wait until they are there.

For release pipelines, before `kubectl apply`: the manifests are validated strictly
against the pinned Kubernetes version shown below (unknown fields are errors, as in `make
test`); any invalid document refuses the whole run with the validator's message. The images of
every workload (Deployment, ReplicaSet, DaemonSet, StatefulSet, Job, CronJob, Pod) are
published as desired for a limited time (`--ttl`, default 2h) on CEDAR_WORKLOADS, as
`kind: Prepull` entries that pullers treat like any workload (same scheduling rules) and
that expire by themselves. Then the command waits, with a progress bar on stderr, until
every eligible node reports every image present (KV cedar-node-status), or `--timeout`.

Eligible nodes are the nodes whose puller reports status (KV cedar-node-status) and
whose labels and taints admit the workload. Labels and taints are read from the Node
objects when a Kubernetes configuration is available (KUBECONFIG, ~/.kube/config or
in-cluster); otherwise every reporting node counts as eligible, except those whose puller
records a `skip` decision for the image.

Exit status: 0 when every image is present on every eligible node; 1 otherwise (what is
missing where and why is printed), or when NATS cannot be reached; 2 when a manifest is
invalid or an option is wrong.

environment:
  CEDAR_NATS_URL       NATS server(s), comma separated (default nats://127.0.0.1:4222)
  CEDAR_NATS_USER      NATS user, if the server wants one
  CEDAR_NATS_PASSWORD  its password
  KUBECONFIG           where to read Node objects (optional; see above)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import BucketNotFoundError, NotFoundError
from pydantic import ValidationError

from cedar.ops import common, manifests, natsio
from cedar.ops.errors import OpsError
from cedar.ops.progress import Progress
from cedar.ops.tables import render
from cedar.proto import subjects
from cedar.proto.models import NodeImageStatus, PodScheduling, PullerDecision, WorkloadImageSet
from cedar.proto.scheduling import NodeInfo, admits, node_from_object
from cedar.runtime.bus import ensure_stream
from cedar.runtime.durations import parse_duration
from cedar.runtime.settings import CommonSettings
from cedar.runtime.topology import service_streams

EPILOG = f"""\
Kubernetes version of the schemas: {manifests.KUBERNETES_VERSION} (--kubernetes-version).

examples:
  cedar prepull release/*.yaml
  cedar prepull --ttl 6h --timeout 20m deploy/
  helm template app ./chart | cedar prepull -
  cedar prepull --validate-only release.yaml
  cedar prepull --no-wait release.yaml && kubectl apply -f release.yaml

exit status: 0 all present on every eligible node, 1 something missing (listed) or NATS
unreachable, 2 invalid manifest or option.
"""


def _duration(text: str) -> timedelta:
    value = parse_duration(text)
    if not isinstance(value, timedelta) or value <= timedelta(0):
        raise argparse.ArgumentTypeError(f"invalid duration {text!r} (use 90s, 10m, 2h, 7d)")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "files",
        nargs="+",
        metavar="FILE",
        help="manifest files (YAML, multi-document or List; a directory means its *.yaml, "
        "*.yml, *.json; - reads standard input)",
    )
    parser.add_argument(
        "--ttl",
        type=_duration,
        default=timedelta(hours=2),
        metavar="DURATION",
        help="how long the images stay desired without a workload (default 2h)",
    )
    parser.add_argument(
        "--timeout",
        type=_duration,
        default=timedelta(minutes=10),
        metavar="DURATION",
        help="how long to wait for every eligible node (default 10m)",
    )
    parser.add_argument(
        "--namespace",
        "-n",
        default="default",
        metavar="NS",
        help="namespace of manifests that name none (default: default)",
    )
    parser.add_argument(
        "--kubernetes-version",
        default=manifests.KUBERNETES_VERSION,
        metavar="X.Y.Z",
        help=f"schemas to validate against (default {manifests.KUBERNETES_VERSION})",
    )
    parser.add_argument(
        "--kubeconfig", metavar="FILE", help="read Node objects with this kubeconfig (KUBECONFIG)"
    )
    parser.add_argument(
        "--no-kube",
        action="store_true",
        help="do not read Node objects: every reporting node is eligible unless its puller skips",
    )
    parser.add_argument(
        "--validate-only", action="store_true", help="validate and list the images; publish nothing"
    )
    parser.add_argument(
        "--no-wait", action="store_true", help="publish and exit 0 without waiting for the nodes"
    )
    common.add_output_argument(parser)
    common.add_nats_arguments(parser)


# --- pure: what must be where ----------------------------------------------------------


@dataclass
class Tracker:
    """Which (node, image) pairs must become present, from what the nodes report. Pure."""

    targets: list[WorkloadImageSet]
    node_info: dict[str, NodeInfo] | None = None  # None: labels and taints unknown
    statuses: dict[tuple[str, str], NodeImageStatus] = field(default_factory=dict)
    nodes: set[str] = field(default_factory=set)
    skipped: set[tuple[str, str]] = field(default_factory=set)

    def images(self) -> list[str]:
        return sorted({ref for t in self.targets for ref in t.references()})

    def invalid(self) -> list[tuple[str, str]]:
        """(workload, why) for images the watcher's parser rejects: they can never be pulled."""
        return [
            (t.owner.kind + "/" + t.owner.name if t.owner else t.identity, f"{c.image}: {c.error}")
            for t in self.targets
            for c in t.containers
            if c.reference is None
        ]

    def see_status(self, status: NodeImageStatus) -> None:
        self.nodes.add(status.node)
        self.statuses[(status.node, status.image)] = status

    def forget_status(self, node: str, image: str) -> None:
        self.statuses.pop((node, image), None)

    def see_decision(self, decision: PullerDecision) -> None:
        if decision.action == "skip":
            self.skipped.add((decision.node, decision.image))

    def _admitted(self, scheduling: PodScheduling, node: str) -> bool:
        if self.node_info is None:
            return True
        info = self.node_info.get(node)
        # A node that reports but has no Node object (yet): count it, rather than hide it.
        return info is None or admits(scheduling, info)

    def wanted(self) -> dict[tuple[str, str], list[str]]:
        """(node, image) -> the workloads that make that node eligible for that image."""
        pairs: dict[tuple[str, str], list[str]] = {}
        for t in self.targets:
            who = f"{t.owner.kind}/{t.namespace}/{t.owner.name}" if t.owner else t.identity
            for node in self.nodes:
                if not self._admitted(t.scheduling, node):
                    continue
                for ref in t.references():
                    if (node, ref) not in self.skipped:
                        pairs.setdefault((node, ref), []).append(who)
        return pairs

    def progress(self) -> tuple[int, int]:
        wanted = self.wanted()
        done = sum(1 for pair in wanted if self._present(pair))
        return done, len(wanted)

    def _present(self, pair: tuple[str, str]) -> bool:
        status = self.statuses.get(pair)
        return status is not None and status.state == "present"

    def complete(self) -> bool:
        done, total = self.progress()
        return total > 0 and done == total

    def missing(self) -> list[dict[str, Any]]:
        rows = []
        for (node, image), who in sorted(self.wanted().items()):
            if self._present((node, image)):
                continue
            status = self.statuses.get((node, image))
            if status is None:
                state, why = "no report", "the node's puller has not reported this image"
            else:
                state = "missing" if status.state == "desired" else status.state
                why = ": ".join(x for x in (status.reason, status.error) if x) or "-"
            rows.append(
                {"node": node, "image": image, "state": state, "why": why, "workloads": who}
            )
        return rows


# --- I/O ---------------------------------------------------------------------------------


async def _read_nodes(kubeconfig: str | None) -> dict[str, NodeInfo] | None:
    from cedar.runtime.kube import KubeClient, KubeError, load_config

    try:
        config = load_config(kubeconfig)
    except Exception as err:  # the client raises several types for "no configuration"
        print(
            f"note: not reading Node objects ({err}); every node that reports status counts "
            "as eligible",
            file=sys.stderr,
        )
        return None
    client = KubeClient(config, timeout=10)
    nodes: dict[str, NodeInfo] = {}
    try:
        async for items, _ in client.list_pages("/api/v1/nodes"):
            for obj in items:
                info = node_from_object(obj)
                nodes[info.name] = info
    except KubeError as err:
        print(f"note: cannot list Node objects ({err}); using puller reports", file=sys.stderr)
        return None
    finally:
        await client.close()
    return nodes


def _load_targets(args: argparse.Namespace, now: datetime) -> list[WorkloadImageSet]:
    stdin_text = sys.stdin.read() if "-" in args.files else None
    try:
        docs = manifests.load(manifests.read_files(args.files, stdin_text))
    except manifests.ManifestError as err:
        raise OpsError(str(err), code=2) from err
    if not docs:
        raise OpsError("no manifests in " + " ".join(args.files), code=2)
    problems = [p for p in (manifests.validate(m, args.kubernetes_version) for m in docs) if p]
    if problems:
        for p in problems:
            print(f"invalid: {p}", file=sys.stderr)
        raise OpsError(
            f"{len(problems)} of {len(docs)} manifests are invalid; nothing was published", code=2
        )
    targets = []
    for m in docs:
        try:
            wis = manifests.prepull_set(m, now, args.ttl, args.namespace)
        except manifests.ManifestError as err:
            raise OpsError(str(err), code=2) from err
        if wis is not None:
            targets.append(wis)
    return targets


async def _ensure_streams(js: JetStreamContext, settings: CommonSettings) -> None:
    """Create Cedar's streams when no service has yet (a prepull before the first start).

    Existing streams are left as they are: their configuration is the services' business.
    """
    for config in service_streams(settings):
        await ensure_stream(js, config, update=False)


async def _publish(js: JetStreamContext, targets: Iterable[WorkloadImageSet], ttl: float) -> None:
    for wis in targets:
        await js.publish(
            subjects.workload_subject(wis.kind, wis.namespace, wis.name),
            wis.model_dump_json().encode(),
            msg_ttl=ttl,
        )


async def _follow(
    nc: NatsClient,
    js: JetStreamContext,
    tracker: Tracker,
    deadline: float,
    progress: Progress | None,
) -> None:
    """Apply status updates and skip decisions until complete or the deadline passes."""
    images = set(tracker.images())

    async def on_decision(msg: Msg) -> None:
        with contextlib.suppress(ValidationError):
            decision = PullerDecision.model_validate_json(msg.data)
            if decision.image in images:
                tracker.see_decision(decision)

    decisions = await nc.subscribe(f"{subjects.DECISIONS_PREFIX}.>", cb=on_decision)
    watcher: Any = None
    try:
        while True:
            if progress is not None and tracker.nodes:
                done, total = tracker.progress()
                progress.total = total
                progress.update(done, f"{len(tracker.nodes)} nodes")
            if tracker.complete():
                return
            left = deadline - time.monotonic()
            if left <= 0:
                return
            if watcher is None:
                # The first puller to start creates the bucket; until then, look again.
                try:
                    kv = await js.key_value(subjects.KV_NODE_STATUS)
                    watcher = await kv.watchall()
                except (BucketNotFoundError, NotFoundError):
                    await asyncio.sleep(min(left, 1.0))
                    continue
            try:
                entry = await watcher.updates(timeout=min(left, 1.0))
            except (TimeoutError, NatsError):
                continue
            if entry is None:
                continue  # the end of the initial values
            if entry.operation in ("DEL", "PURGE"):
                for node, image in list(tracker.statuses):
                    if subjects.node_status_key(node, image) == entry.key:
                        tracker.forget_status(node, image)
                continue
            with contextlib.suppress(ValidationError):
                tracker.see_status(NodeImageStatus.model_validate_json(entry.value or b""))
    finally:
        with contextlib.suppress(NatsError, TimeoutError):
            await decisions.unsubscribe()
        if watcher is not None:
            with contextlib.suppress(NatsError, TimeoutError):
                await watcher.stop()


def _report(tracker: Tracker, output: str) -> int:
    missing = tracker.missing()
    done, total = tracker.progress()
    if output == "json":
        print(
            json.dumps(
                {
                    "complete": tracker.complete(),
                    "present": done,
                    "wanted": total,
                    "nodes": sorted(tracker.nodes),
                    "images": tracker.images(),
                    "missing": missing,
                    "invalid": [{"workload": w, "why": why} for w, why in tracker.invalid()],
                },
                separators=(",", ":"),
            )
        )
    else:
        if not tracker.nodes:
            print(
                "no node reports status in cedar-node-status: is any `cedar puller` running "
                "and connected to this NATS?"
            )
        elif tracker.complete():
            print(
                f"all {len(tracker.images())} images present on every eligible node "
                f"({done} image-node pairs on {len(tracker.nodes)} nodes)"
            )
        else:
            print(f"{done} of {total} image-node pairs present; missing:")
            rows = [
                (m["node"], m["image"], m["state"], m["why"], ", ".join(m["workloads"]))
                for m in missing
            ]
            print(render(("NODE", "IMAGE", "STATE", "WHY", "WANTED BY"), rows, max_width=90))
        for who, why in tracker.invalid():
            print(f"invalid image reference in {who}: {why}")
    return 0 if tracker.complete() and not tracker.invalid() else 1


def main(args: argparse.Namespace) -> int:
    async def body() -> int:
        settings = common.settings_from(args)
        now = datetime.now(UTC)
        targets = _load_targets(args, now)
        tracker = Tracker(targets)
        if args.validate_only:
            for image in tracker.images():
                print(image)
            for who, why in tracker.invalid():
                print(f"invalid image reference in {who}: {why}", file=sys.stderr)
            print(
                f"{len(targets)} workloads, {len(tracker.images())} images: manifests valid "
                f"for Kubernetes {args.kubernetes_version}",
                file=sys.stderr,
            )
            return 0
        if not targets:
            print("no workloads in these manifests: nothing to pre-pull", file=sys.stderr)
            return 0
        if not args.no_kube and not args.no_wait:
            tracker.node_info = await _read_nodes(args.kubeconfig)
        nc = await natsio.connect(settings, "cedar-prepull")
        try:
            js = nc.jetstream(timeout=10)
            try:
                await _ensure_streams(js, settings)
                await _publish(js, targets, args.ttl.total_seconds())
            except NatsError as err:
                raise OpsError(
                    f"cannot publish to {subjects.STREAM_WORKLOADS} ({err}); is Cedar's "
                    "watcher (or `cedar up`) running against this NATS?"
                ) from err
            print(
                f"published {len(tracker.images())} images of {len(targets)} workloads as "
                f"desired until {(now + args.ttl).isoformat(timespec='seconds')}",
                file=sys.stderr,
            )
            if args.no_wait:
                return 0
            progress = Progress(0, "prepull") if args.output == "table" else None
            deadline = time.monotonic() + args.timeout.total_seconds()
            try:
                await _follow(nc, js, tracker, deadline, progress)
            finally:
                if progress is not None:
                    progress.close()
        finally:
            await natsio.close(nc)
        return _report(tracker, args.output)

    return common.run_command("prepull", body)
