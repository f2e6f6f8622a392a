"""Print or re-publish the recorded changes of a time window, oldest first.

Oldest first means by when each thing happened (the watcher's observation time, the
puller's or allocator's decision time); the window itself is chosen by when CEDAR_HISTORY
stored the messages.

Reads CEDAR_HISTORY, the stream that keeps every workload image set and namespace event
the watcher published, every decision the pullers took (pull, pulled, skip and why,
failed, prune) and every allocator audit record, for CEDAR_HISTORY_RETENTION (7 days by
default). The filters select the records that concern an object: `--namespace team-a
--name web` finds the Deployment's changes, its ReplicaSets' (owner), the pullers'
decisions taken for it and, with `--kind Namespace`, the allocator's records for its
namespace.

With `--to SUBJECT` the selected messages are re-published, unchanged, to SUBJECT (under
cedar.replay.), in order, each with its original subject in the `Cedar-Original-Subject`
header. SUBJECT is captured by the stream CEDAR_REPLAY (created on first use, messages kept
24 hours), so a `cedar puller --dry-run --from-subject SUBJECT` started before or after the
replay sees them, as do plain NATS subscribers that are connected at the time.

environment:
  CEDAR_NATS_URL       NATS server(s), comma separated (default nats://127.0.0.1:4222)
  CEDAR_NATS_USER      NATS user, if the server wants one
  CEDAR_NATS_PASSWORD  its password
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import UTC, datetime

from nats.js import JetStreamContext

from cedar.ops import common, natsio, window
from cedar.ops.errors import OpsError
from cedar.ops.records import Filters, Record, decode
from cedar.ops.tables import render
from cedar.proto import subjects
from cedar.runtime.bus import ensure_stream
from cedar.runtime.settings import CommonSettings
from cedar.runtime.topology import replay_stream

EPILOG = """\
record types (the TYPE column; --kind accepts them as well as Kubernetes kinds):
  workload   a workload's image set as the watcher published it (or "deleted")
  namespace  a namespace event (what the allocator consumes)
  decision   a puller's decision: pull, pulled, refresh, skip, failed, prune, evicted
  audit      an allocator audit record: claim, release, free, adopt, tamper, ...

examples:
  cedar replay --since 2h
  cedar replay --since 2026-11-23T10:00:00Z --until 2026-11-23T10:05:00Z -o json
  cedar replay --since 1d --namespace team-a --name web
  cedar replay --since 1h --node node-1 --image registry.example/app:v1
  cedar replay --since 30m --kind decision
  cedar replay --since 1h --namespace team-a --to cedar.replay.incident-42
      (then: CEDAR_NODE_NAME=node-1 cedar puller --dry-run --from-subject cedar.replay.incident-42)

exit status: 0 (also when nothing matched), 1 when NATS cannot be read, 2 on bad options.
"""


def replay_subject(text: str) -> str:
    """`--to` as a subject under cedar.replay. (a bare name is put under it)."""
    subject = text.strip()
    if not subject or any(c in subject for c in " \t*>") or ".." in subject:
        raise OpsError(f"invalid --to subject {text!r}", code=2)
    prefix = subjects.REPLAY_PREFIX + "."
    if not subject.startswith(prefix):
        if subject.startswith("cedar."):
            raise OpsError(
                f"--to {text!r}: replay subjects must be under {prefix} so that nothing "
                "mistakes a replay for live state",
                code=2,
            )
        subject = prefix + subject
    return subject


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--since",
        default="1h",
        metavar="TIME",
        help="start of the window: a duration ago (90s, 10m, 2h, 7d) or an RFC 3339 time "
        "(default 1h)",
    )
    parser.add_argument(
        "--until", metavar="TIME", help="end of the window, same forms (default: now)"
    )
    parser.add_argument(
        "--kind",
        metavar="K",
        help="Deployment, ReplicaSet, DaemonSet, StatefulSet, Job, CronJob, Prepull, Namespace, "
        "or a record type (workload, namespace, decision, audit); case-insensitive",
    )
    parser.add_argument("--namespace", "-n", metavar="NS", help="records about this namespace")
    parser.add_argument(
        "--name", metavar="N", help="records about the object N (a workload or its owner)"
    )
    parser.add_argument("--node", metavar="NODE", help="only this node's puller decisions")
    parser.add_argument(
        "--image",
        metavar="REF",
        help="only records naming this image (normalised: nginx = docker.io/library/nginx:latest)",
    )
    common.add_output_argument(parser)
    parser.add_argument(
        "--to",
        metavar="SUBJECT",
        help="re-publish the selected messages to SUBJECT (under cedar.replay.) instead of "
        "printing them",
    )
    common.add_nats_arguments(parser)


def _normalize_image(text: str) -> str:
    from cedar.proto.imageref import InvalidReference, normalize

    try:
        return normalize(text)
    except InvalidReference as err:
        raise OpsError(f"--image {text!r}: {err}", code=2) from err


def filters_from(args: argparse.Namespace) -> Filters:
    return Filters(
        kind=args.kind,
        namespace=args.namespace,
        name=args.name,
        node=args.node,
        image=_normalize_image(args.image) if args.image else None,
    )


async def select(
    js: JetStreamContext, win: window.Window, filters: Filters
) -> tuple[list[Record], int]:
    """The matching records of the window, oldest first, and how many the window held."""
    selected: list[Record] = []
    seen = 0
    async for msg in natsio.read_stream(js, subjects.STREAM_HISTORY, start_time=win.since):
        if win.until is not None and msg.stored_at > win.until:
            break
        seen += 1
        record = decode(msg.seq, msg.stored_at, msg.subject, msg.data, msg.headers)
        if record.matches(filters):
            selected.append(record)
    # The history stream receives workload and namespace events through sourcing, a little
    # after the pullers' decisions that they caused may have been stored directly: order by
    # when each thing happened, not by when the history stored it.
    selected.sort(key=lambda r: (r.at, r.seq))
    return selected, seen


def table(records: list[Record]) -> str:
    rows = [(r.seq, window.format_time(r.at), r.type, r.object(), r.summary()) for r in records]
    return render(("SEQ", "TIME", "TYPE", "OBJECT", "DETAIL"), rows)


async def republish(
    js: JetStreamContext, settings: CommonSettings, subject: str, records: list[Record]
) -> None:
    await ensure_stream(js, replay_stream(settings))
    for r in records:
        headers = {
            subjects.ORIGINAL_SUBJECT_HEADER: r.subject,
            subjects.ORIGINAL_SEQ_HEADER: str(r.seq),
            subjects.ORIGINAL_TIME_HEADER: r.stored_at.isoformat(),
        }
        await js.publish(subject, r.raw, headers=headers, stream=subjects.STREAM_REPLAY)


def main(args: argparse.Namespace) -> int:
    async def body() -> int:
        settings = common.settings_from(args)
        try:
            win = window.parse_window(args.since, args.until, datetime.now(UTC))
        except ValueError as err:
            raise OpsError(str(err), code=2) from err
        filters = filters_from(args)
        target = replay_subject(args.to) if args.to else None
        nc = await natsio.connect(settings, "cedar-replay")
        try:
            js = nc.jetstream(timeout=10)
            records, seen = await select(js, win, filters)
            if target is not None:
                await republish(js, settings, target, records)
                print(
                    f"re-published {len(records)} of {seen} messages to {target} "
                    f"(stream {subjects.STREAM_REPLAY})",
                    file=sys.stderr,
                )
                return 0
        finally:
            await natsio.close(nc)
        if args.output == "json":
            for r in records:
                print(json.dumps(r.as_json(), separators=(",", ":")))
        elif records:
            print(table(records))
        if args.output != "json":
            until = window.format_time(win.until) if win.until else "now"
            print(
                f"{len(records)} of {seen} records from {window.format_time(win.since)} to {until}",
                file=sys.stderr,
            )
        return 0

    return common.run_command("replay", body)
