"""Run the watcher: Kubernetes workloads and namespaces -> NATS JetStream.

Lists and watches Deployments, ReplicaSets, DaemonSets, StatefulSets, Jobs, CronJobs and
Namespaces, and publishes each workload's image set (and each namespace's lifecycle) to
JetStream, where pullers and the MCS allocator follow it. Only real changes are published;
a deleted workload leaves a deletion marker.

environment (flags override them):
  CEDAR_NATS_URL                  NATS server(s), comma separated (default nats://127.0.0.1:4222)
  KUBECONFIG                      kubeconfig file; in-cluster config when unset inside a pod
  CEDAR_WATCH_KINDS               kinds to watch, comma separated (default: all of
                                  Deployment,ReplicaSet,DaemonSet,StatefulSet,Job,CronJob,Namespace)
  CEDAR_WATCH_PREVIOUS_REVISIONS  older ReplicaSets of a Deployment kept warm (default 1)
  CEDAR_WATCH_NAMESPACE           watch only this namespace (default: all namespaces)
  CEDAR_WATCH_PAGE_SIZE           objects per list page (default 500)
  CEDAR_WATCH_TIMEOUT_SECONDS     lifetime of one watch request (default 300)
  CEDAR_HISTORY_RETENTION         how long deletion markers and history are kept (default 7d)
  CEDAR_PUBLISH_MAX_INFLIGHT      publishes awaiting their ack at once (default 4000)
  CEDAR_PUBLISH_ACK_TIMEOUT       seconds before an unacknowledged publish is retried (default 5)
  CEDAR_MAX_MESSAGE_BYTES         larger image sets are reported as bad objects (default 900000)
  CEDAR_METRICS_PORT              port of /metrics, /healthz, /readyz (default 9101)
  CEDAR_NATS_USER, CEDAR_NATS_PASSWORD, CEDAR_NATS_REPLICAS, CEDAR_LOG_LEVEL
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pydantic import ValidationError

EPILOG = """\
examples:
  cedar watcher                                  # every kind, every namespace
  CEDAR_WATCH_KINDS=Deployment,Namespace cedar watcher
  cedar watcher --namespace tenant-a --previous-revisions 2

/readyz turns ready once NATS is connected and every enabled kind has been listed in full.
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nats-url", help="NATS server(s) (CEDAR_NATS_URL)")
    parser.add_argument("--kubeconfig", help="kubeconfig file (KUBECONFIG)")
    parser.add_argument(
        "--kinds", help="comma-separated kinds to watch (CEDAR_WATCH_KINDS)", metavar="KINDS"
    )
    parser.add_argument(
        "--namespace", help="watch only this namespace (CEDAR_WATCH_NAMESPACE)", metavar="NS"
    )
    parser.add_argument(
        "--previous-revisions",
        type=int,
        metavar="N",
        help="older Deployment revisions kept warm (CEDAR_WATCH_PREVIOUS_REVISIONS)",
    )
    parser.add_argument(
        "--page-size", type=int, metavar="N", help="objects per list page (CEDAR_WATCH_PAGE_SIZE)"
    )
    parser.add_argument(
        "--metrics-port", type=int, metavar="PORT", help="metrics/health port (CEDAR_METRICS_PORT)"
    )
    parser.add_argument("--log-level", help="DEBUG, INFO, WARNING or ERROR (CEDAR_LOG_LEVEL)")


def build_settings(args: argparse.Namespace) -> Any:
    from cedar.watcher.settings import WatcherSettings

    overrides: dict[str, Any] = {
        field: value
        for field, value in (
            ("nats_url", args.nats_url),
            ("KUBECONFIG", args.kubeconfig),  # the field's alias: the standard variable
            ("watch_kinds", args.kinds),
            ("watch_namespace", args.namespace),
            ("watch_previous_revisions", args.previous_revisions),
            ("watch_page_size", args.page_size),
            ("metrics_port", args.metrics_port),
            ("log_level", args.log_level),
        )
        if value is not None
    }
    # Init arguments take precedence over the environment.
    return WatcherSettings(**overrides)


def main(args: argparse.Namespace) -> int:
    from cedar.runtime.service import run
    from cedar.watcher import app
    from cedar.watcher.informer import health_check_name

    try:
        settings = build_settings(args)
    except ValidationError as err:
        print(f"cedar watcher: invalid settings:\n{err}", file=sys.stderr)
        return 2
    app.TUNE_GC = True
    checks = tuple(health_check_name(kind) for kind in settings.kinds)
    return run("watcher", settings, app.main, checks=checks)
