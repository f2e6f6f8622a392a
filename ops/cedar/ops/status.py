"""Summarise the fleet from NATS: which nodes have which images, which namespace has which level.

Reads the desired image set (stream CEDAR_WORKLOADS: every live workload's images, and
unexpired `cedar prepull` entries) and what each node's puller reports (KV
cedar-node-status). For each desired image it shows on how many of the nodes that report
it the image is present, pulling, missing or failed, and why the failures failed. A puller
reports only the images its node is eligible for, so the nodes counted for an image are the
nodes whose scheduling admits at least one workload that wants it.

`--image REF` lists the nodes for one image, `--node N` the images of one node, and
`--namespaces` the tenant namespaces with their SELinux MCS levels (KV cedar-mcs-ledger)
and how much of the label pool is used.

environment:
  CEDAR_NATS_URL            NATS server(s), comma separated (default nats://127.0.0.1:4222)
  CEDAR_NATS_USER           NATS user, if the server wants one
  CEDAR_NATS_PASSWORD       its password
  the allocator's pool settings, read to size the pool for --namespaces:
  CEDAR_MCS_CATEGORIES            categories (default 1024)
  CEDAR_MCS_CATEGORIES_PER_LABEL  categories per label (default 2)
  CEDAR_MCS_QUARANTINE            quarantine of released labels (default 7d)
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from math import comb
from typing import Any

from nats.js import JetStreamContext
from pydantic import Field, ValidationError

from cedar.ops import common, natsio
from cedar.ops.desired import (
    ImageSummary,
    current_workloads,
    desired_images,
    parse_statuses,
    state_of,
    summarize,
)
from cedar.ops.errors import OpsError
from cedar.ops.tables import render
from cedar.ops.window import format_time
from cedar.proto import subjects
from cedar.proto.ledger import LABEL_PREFIX, NS_PREFIX, LabelEntry, NsEntry
from cedar.proto.models import NodeImageStatus, WorkloadImageSet
from cedar.runtime.durations import Duration
from cedar.runtime.settings import CommonSettings

EPILOG = """\
columns of the default view:
  NODES     nodes whose puller reports the image (the nodes eligible for it)
  PRESENT   in the node's image cache      PULLING  being pulled now
  MISSING   wanted there, not pulled yet   FAILED   last pull failed (REASONS says why)

examples:
  cedar status
  cedar status --image registry.example/tenants/app:v1
  cedar status --node worker-3
  cedar status --namespaces
  cedar status -o json | jq 'select(.failed > 0)'

exit status: 0, 1 when NATS cannot be read, 2 on bad options.
"""


class StatusSettings(CommonSettings):
    # The allocator's pool settings, read under the same names, to size the pool.
    mcs_categories: int = Field(default=1024, ge=3, le=1024)
    mcs_categories_per_label: int = Field(default=2, ge=2, le=3)
    mcs_quarantine: Duration = Field(default=timedelta(days=7))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    view = parser.add_mutually_exclusive_group()
    view.add_argument("--image", metavar="REF", help="list the nodes reporting this image")
    view.add_argument("--node", metavar="N", help="list the images node N reports")
    view.add_argument(
        "--namespaces",
        action="store_true",
        help="list namespaces with their SELinux MCS level, and the label pool's use",
    )
    common.add_output_argument(parser)
    common.add_nats_arguments(parser)


async def read_desired(js: JetStreamContext, now: datetime) -> dict[str, list[WorkloadImageSet]]:
    messages: list[WorkloadImageSet] = []
    async for msg in natsio.read_stream(js, subjects.STREAM_WORKLOADS):
        if not msg.data:
            continue
        try:
            messages.append(WorkloadImageSet.model_validate_json(msg.data))
        except ValidationError:
            continue  # not ours to judge here; the watcher's own metrics count bad objects
    return desired_images(current_workloads(messages, now).values())


async def read_statuses(js: JetStreamContext) -> list[NodeImageStatus]:
    values = await natsio.read_bucket(js, subjects.KV_NODE_STATUS)
    statuses, bad = parse_statuses(values.values())
    if bad:
        print(f"warning: {bad} unreadable entries in {subjects.KV_NODE_STATUS}", file=sys.stderr)
    return statuses


def _short_digest(digest: str | None) -> str:
    return digest[:19] if digest else "-"


def _workloads_cell(names: tuple[str, ...] | list[str]) -> str:
    if not names:
        return "-"
    if len(names) == 1:
        return names[0]
    return f"{names[0]} (+{len(names) - 1})"


def fleet_view(summaries: list[ImageSummary], nodes: int) -> str:
    rows = []
    for s in summaries:
        reasons = ",".join(f"{r}:{n}" for r, n in sorted(s.reasons.items()))
        rows.append(
            (
                s.image,
                _workloads_cell(s.workloads),
                s.reporting,
                len(s.nodes["present"]),
                len(s.nodes["pulling"]),
                len(s.nodes["missing"]),
                len(s.nodes["failed"]),
                reasons,
            )
        )
    table = render(
        ("IMAGE", "WANTED BY", "NODES", "PRESENT", "PULLING", "MISSING", "FAILED", "REASONS"),
        rows,
        max_width=80,
    )
    warm = sum(1 for s in summaries if s.reporting and len(s.nodes["present"]) == s.reporting)
    footer = (
        f"{len(summaries)} desired images, {nodes} nodes reporting, "
        f"{warm} images present on every node that reports them"
    )
    return f"{table}\n\n{footer}"


def image_view(statuses: list[NodeImageStatus]) -> str:
    rows = [
        (
            st.node,
            state_of(st),
            _short_digest(st.digest),
            st.reason,
            format_time(st.updated_at),
            st.error,
        )
        for st in sorted(statuses, key=lambda s: s.node)
    ]
    return render(("NODE", "STATE", "DIGEST", "REASON", "UPDATED", "ERROR"), rows, max_width=100)


def node_view(statuses: list[NodeImageStatus]) -> str:
    rows = [
        (
            st.image,
            state_of(st),
            _short_digest(st.digest),
            st.reason,
            format_time(st.updated_at),
            _workloads_cell(st.workloads),
        )
        for st in sorted(statuses, key=lambda s: s.image)
    ]
    return render(
        ("IMAGE", "STATE", "DIGEST", "REASON", "UPDATED", "WANTED BY"), rows, max_width=80
    )


@dataclass(frozen=True)
class NamespaceLevel:
    namespace: str
    uid: str
    level: str
    state: str  # allocated, quarantined (released, not reusable yet), reusable
    at: datetime | None
    replica: str
    annotated: bool | None  # None: unknown (no ns.<uid> entry)

    def as_json(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "uid": self.uid,
            "level": self.level,
            "state": self.state,
            "at": self.at.isoformat() if self.at else None,
            "replica": self.replica,
            "annotated": self.annotated,
        }


def ledger_levels(
    ledger: dict[str, bytes], now: datetime, quarantine: timedelta
) -> list[NamespaceLevel]:
    """Labels from the allocator's ledger (`label.*` for the truth, `ns.*` for the
    annotation's state), read with the allocator's own decoders. Unreadable entries are
    left out. Pure."""
    written: dict[str, bool] = {}
    labels: list[LabelEntry] = []
    for key, raw in ledger.items():
        try:
            if key.startswith(NS_PREFIX):
                entry = NsEntry.decode(key, raw, 0)
                written[entry.uid] = entry.written
            elif key.startswith(LABEL_PREFIX):
                labels.append(LabelEntry.decode(key, raw, 0))
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
    levels = []
    for label in labels:
        state: str = label.state
        if state == "quarantined" and now - label.at >= quarantine:
            state = "reusable"
        levels.append(
            NamespaceLevel(
                namespace=label.namespace,
                uid=label.uid,
                level=str(label.level),
                state=state,
                at=label.at,
                replica=label.replica,
                annotated=written.get(label.uid) if state == "allocated" else None,
            )
        )
    levels.sort(key=lambda n: (n.state != "allocated", n.namespace, n.level))
    return levels


def pool_use(levels: list[NamespaceLevel], settings: StatusSettings) -> dict[str, Any]:
    total = comb(settings.mcs_categories, settings.mcs_categories_per_label)
    allocated = sum(1 for n in levels if n.state == "allocated")
    quarantined = sum(1 for n in levels if n.state == "quarantined")
    return {
        "categories": settings.mcs_categories,
        "categories_per_label": settings.mcs_categories_per_label,
        "total": total,
        "allocated": allocated,
        "quarantined": quarantined,
        "free": total - allocated - quarantined,
    }


def namespaces_view(
    levels: list[NamespaceLevel], pool: dict[str, Any], quarantine: timedelta
) -> str:
    rows = []
    for n in levels:
        since = format_time(n.at) if n.at else "-"
        state = n.state
        if n.state == "quarantined" and n.at is not None:
            state = f"quarantined until {format_time(n.at + quarantine)}"
        elif n.annotated is False:
            state = "allocated (annotation pending)"
        rows.append((n.namespace, n.level, state, since, n.replica))
    table = render(("NAMESPACE", "LEVEL", "STATE", "SINCE", "BY"), rows)
    used = 100.0 * (pool["allocated"] + pool["quarantined"]) / max(pool["total"], 1)
    footer = (
        f"pool: {pool['total']} labels ({pool['categories']} categories, "
        f"{pool['categories_per_label']} per label): {pool['allocated']} allocated, "
        f"{pool['quarantined']} quarantined, {pool['free']} free ({used:.3f}% used)"
    )
    return f"{table}\n\n{footer}" if rows else footer


def _print_json_lines(objects: list[dict[str, Any]]) -> None:
    for obj in objects:
        print(json.dumps(obj, separators=(",", ":"), default=str))


def main(args: argparse.Namespace) -> int:
    async def body() -> int:
        overrides: dict[str, Any] = {"nats_url": args.nats_url} if args.nats_url else {}
        try:
            settings = StatusSettings(**overrides)
        except ValidationError as err:
            raise OpsError(f"invalid settings: {err}", code=2) from err
        image = None
        if args.image:
            from cedar.proto.imageref import InvalidReference, normalize

            try:
                image = normalize(args.image)
            except InvalidReference as err:
                raise OpsError(f"--image {args.image!r}: {err}", code=2) from err
        now = datetime.now(UTC)
        nc = await natsio.connect(settings, "cedar-status")
        try:
            js = nc.jetstream(timeout=10)
            if args.namespaces:
                ledger = await natsio.read_bucket(js, subjects.KV_MCS_LEDGER)
                levels = ledger_levels(ledger, now, settings.mcs_quarantine)
                pool = pool_use(levels, settings)
                if args.output == "json":
                    _print_json_lines([n.as_json() for n in levels] + [{"pool": pool}])
                else:
                    print(namespaces_view(levels, pool, settings.mcs_quarantine))
                return 0
            statuses = await read_statuses(js)
            if image is not None:
                desired = await read_desired(js, now)
                mine = [s for s in statuses if s.image == image]
                if args.output == "json":
                    _print_json_lines([json.loads(s.model_dump_json()) for s in mine])
                else:
                    wanted = [w.identity for w in desired.get(image, [])]
                    print(f"{image}: wanted by {', '.join(wanted) or 'no live workload'}")
                    print(image_view(mine) if mine else "no node reports this image")
                return 0
            if args.node:
                mine = [s for s in statuses if s.node == args.node]
                if args.output == "json":
                    _print_json_lines([json.loads(s.model_dump_json()) for s in mine])
                elif mine:
                    print(node_view(mine))
                else:
                    print(f"node {args.node} reports no images", file=sys.stderr)
                return 0
            desired = await read_desired(js, now)
        finally:
            await natsio.close(nc)
        summaries = summarize(desired, statuses)
        nodes = len({s.node for s in statuses})
        if args.output == "json":
            _print_json_lines([s.as_json() for s in summaries])
        else:
            print(fleet_view(summaries, nodes))
        return 0

    return common.run_command("status", body)
