"""Run a node's puller: keep this node's image store equal to what its workloads need.

The puller follows the desired image sets on NATS (stream CEDAR_WORKLOADS), keeps the
workloads whose pods could run on this node (nodeSelector, required node affinity,
taints/tolerations, os/arch), pulls what is missing (most-wanted first, at most
CEDAR_MAX_CONCURRENT_PULLS at once) into the image store the kubelet uses, through the CRI
of containerd or CRI-O or through the Docker engine (CEDAR_RUNTIME), refreshes tags every
CEDAR_REFRESH_INTERVAL, prunes in-scope images nobody wanted for CEDAR_PRUNE_AFTER, and
publishes each image's state to KV cedar-node-status. With CEDAR_REGISTRY_FLEET_PULLS, pulls
from a registry take a fleet-wide lease first (KV cedar-fleet-leases). A node registered
with the taint cedar.io/warming:NoSchedule has it removed once its images are present, or
after CEDAR_WARM_TIMEOUT.

environment (each option below overrides its variable):
  CEDAR_NODE_NAME             this node's name (required; downward API spec.nodeName)
  CEDAR_NATS_URL              NATS server(s), comma separated (default nats://127.0.0.1:4222)
  CEDAR_RUNTIME               auto, docker or cri (default auto: the Node's
                              containerRuntimeVersion, then the usual sockets)
  CEDAR_CRI_ENDPOINT          the CRI runtime's socket (e.g. unix:///run/containerd/containerd.sock)
  CEDAR_CRI_TIMEOUT           limit of one CRI call other than a pull (default 30s)
  DOCKER_HOST                 Docker engine (default unix:///var/run/docker.sock)
  CEDAR_REGISTRY_AUTH_FILE    .dockerconfigjson with registry credentials (never logged)
  CEDAR_INSECURE_REGISTRIES   registries probed over http (127.0.0.1/localhost always are)
  CEDAR_MAX_CONCURRENT_PULLS  parallel pulls (default 3)
  CEDAR_REGISTRY_FLEET_PULLS  host=N,...,*=N: pulls at once from a registry across the whole
                              fleet (default: not paced)
  CEDAR_FLEET_LEASE_TTL       a dead puller's fleet lease lapses after this (default 30s)
  CEDAR_WARM_TIMEOUT          lift cedar.io/warming this long after the node was created,
                              whatever is missing (default 10m)
  CEDAR_REFRESH_INTERVAL      re-pull tag references this often (default 1h; digests never)
  CEDAR_REFRESH_JITTER        fraction of the interval a node spreads refreshes over (0.1)
  CEDAR_PRUNE_LABEL           key=value (or key): images carrying it are prunable
  CEDAR_PRUNE_REPOSITORIES    comma-separated repository prefixes that are prunable
  CEDAR_PRUNE_AFTER           prune only images undesired this long (default 72h)
  CEDAR_PRUNE_INTERVAL        prune this often, and once at start (default 24h)
  CEDAR_DOCKER_ROOT           the engine's data root as mounted here (the disk guard; on CRI
                              the runtime's ImageFsInfo is used without it)
  CEDAR_MIN_FREE_BYTES        below this much free space new pulls wait (default 5 GiB)
  CEDAR_PULL_TIMEOUT          give up one pull after this long (default 15m)
  CEDAR_REGISTRY_PROBE_TTL    cache of a registry's /v2/ answer (default 15s)
  CEDAR_REGISTRY_PROBE_TIMEOUT  one /v2/ probe's limit (default 5s)
  CEDAR_BACKOFF_BASE          first retry wait of a failed pull (default 2s)
  CEDAR_BACKOFF_MAX           cap of the per-image retry backoff (default 10m)
  CEDAR_PERMANENT_RETRY       retry of not_found/unauthorized/invalid images (default 1h)
  CEDAR_RESYNC_INTERVAL       re-list the engine at least this often (default 60s)
  CEDAR_NODE_FROM_API         read labels/taints from the Node object (default true)
  CEDAR_NODE_LABELS           k=v,... used when the Node is not read from the API
  CEDAR_NODE_TAINTS           key=value:Effect,... likewise
  KUBECONFIG                  kubeconfig; in-cluster config inside a pod
  CEDAR_METRICS_PORT          /metrics, /healthz, /readyz (default 9102)
  CEDAR_LOG_LEVEL             DEBUG, INFO, WARNING or ERROR (default INFO)
  CEDAR_DRY_RUN, CEDAR_FROM_SUBJECT  as --dry-run and --from-subject
Durations accept 90s, 10m, 72h, 7d or plain seconds.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pydantic import ValidationError

EPILOG = """\
examples:
  CEDAR_NODE_NAME=node-1 cedar puller
  cedar puller --node-name node-1 --no-node-from-api --node-labels disktype=ssd
  cedar puller --node-name node-1 --runtime cri --cri-endpoint /run/containerd/containerd.sock
  cedar puller --node-name node-1 --registry-fleet-pulls 'harbor.example.com=40,*=100'
  cedar puller --node-name node-1 --dry-run --from-subject cedar.replay.workloads.>
"""

# option -> settings field; every option mirrors a CEDAR_* variable.
_OPTIONS: tuple[tuple[str, str, str], ...] = (
    ("--node-name", "node_name", "this node's name (CEDAR_NODE_NAME)"),
    ("--nats-url", "nats_url", "NATS server(s) (CEDAR_NATS_URL)"),
    ("--runtime", "runtime", "auto, docker or cri (CEDAR_RUNTIME)"),
    ("--cri-endpoint", "cri_endpoint", "CRI runtime socket (CEDAR_CRI_ENDPOINT)"),
    ("--docker-host", "docker_host", "Docker engine (DOCKER_HOST)"),
    ("--registry-auth-file", "registry_auth_file", ".dockerconfigjson (CEDAR_REGISTRY_AUTH_FILE)"),
    ("--insecure-registries", "insecure_registries", "http registries (CEDAR_INSECURE_REGISTRIES)"),
    (
        "--max-concurrent-pulls",
        "max_concurrent_pulls",
        "parallel pulls (CEDAR_MAX_CONCURRENT_PULLS)",
    ),
    (
        "--registry-fleet-pulls",
        "registry_fleet_pulls",
        "fleet-wide pulls per registry, host=N,*=N (CEDAR_REGISTRY_FLEET_PULLS)",
    ),
    ("--fleet-lease-ttl", "fleet_lease_ttl", "fleet lease TTL (CEDAR_FLEET_LEASE_TTL)"),
    ("--warm-timeout", "warm_timeout", "warm-up gate timeout (CEDAR_WARM_TIMEOUT)"),
    ("--refresh-interval", "refresh_interval", "tag refresh interval (CEDAR_REFRESH_INTERVAL)"),
    ("--prune-label", "prune_label", "prune scope label (CEDAR_PRUNE_LABEL)"),
    ("--prune-repositories", "prune_repositories", "prune scope (CEDAR_PRUNE_REPOSITORIES)"),
    ("--prune-after", "prune_after", "undesired this long (CEDAR_PRUNE_AFTER)"),
    ("--prune-interval", "prune_interval", "prune period (CEDAR_PRUNE_INTERVAL)"),
    ("--docker-root", "docker_root", "engine data root (CEDAR_DOCKER_ROOT)"),
    ("--min-free-bytes", "min_free_bytes", "disk guard (CEDAR_MIN_FREE_BYTES)"),
    ("--pull-timeout", "pull_timeout", "one pull's limit (CEDAR_PULL_TIMEOUT)"),
    ("--registry-probe-ttl", "registry_probe_ttl", "probe cache (CEDAR_REGISTRY_PROBE_TTL)"),
    ("--backoff-max", "backoff_max", "retry backoff cap (CEDAR_BACKOFF_MAX)"),
    ("--permanent-retry", "permanent_retry", "slow retry (CEDAR_PERMANENT_RETRY)"),
    ("--node-labels", "node_labels", "labels without the API (CEDAR_NODE_LABELS)"),
    ("--node-taints", "node_taints", "taints without the API (CEDAR_NODE_TAINTS)"),
    ("--kubeconfig", "kubeconfig", "kubeconfig file (KUBECONFIG)"),
    ("--metrics-port", "metrics_port", "metrics/health port (CEDAR_METRICS_PORT)"),
    ("--log-level", "log_level", "log level (CEDAR_LOG_LEVEL)"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for option, dest, text in _OPTIONS:
        parser.add_argument(option, dest=dest, default=None, help=text)
    parser.add_argument(
        "--node-from-api",
        dest="node_from_api",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="read labels/taints from the Node object (CEDAR_NODE_FROM_API, default true)",
    )
    parser.add_argument(
        "--dry-run",
        dest="dry_run",
        action="store_true",
        default=None,
        help="never touch the engine: log (and record) each decision it would take",
    )
    parser.add_argument(
        "--from-subject",
        dest="from_subject",
        default=None,
        metavar="SUBJECT",
        help="take WorkloadImageSet messages from this core NATS subject instead of the "
        "CEDAR_WORKLOADS stream (e.g. events re-published by `cedar replay`)",
    )


def build_settings(args: argparse.Namespace) -> Any:
    from cedar.puller.settings import PullerSettings

    fields = [dest for _, dest, _ in _OPTIONS] + ["node_from_api", "dry_run", "from_subject"]
    overrides = {f: getattr(args, f) for f in fields if getattr(args, f, None) is not None}
    return PullerSettings(**overrides)


def main(args: argparse.Namespace) -> int:
    from cedar.puller.app import READINESS_CHECKS
    from cedar.puller.app import main as puller_main
    from cedar.runtime.service import run

    try:
        settings = build_settings(args)
        settings.node  # noqa: B018 - validates that the node name is set
    except (ValidationError, ValueError) as err:
        print(f"cedar puller: invalid settings: {err}", file=sys.stderr)
        return 2
    return run("puller", settings, puller_main, checks=READINESS_CHECKS)
