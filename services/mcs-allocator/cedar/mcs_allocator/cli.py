"""Run the MCS allocator: give every tenant namespace a unique SELinux level.

Consumes namespace events from NATS (the shared durable consumer `mcs-allocator`, so run
as many replicas as you like), claims a free label `s0:cA,cB` by compare-and-set in the
NATS KV bucket `cedar-mcs-ledger`, and writes it to the namespace annotation. Released
labels are quarantined before reuse; tampered annotations are restored. With the
admission policies of deploy/mcs-allocator/ (or its webhook) tenant pods run at their
namespace's level; the watchdog reports pods that do not, and NFS volumes can be given the
tenant's mount context.

environment:
  CEDAR_NATS_URL                  NATS server(s), comma separated (default nats://127.0.0.1:4222)
  KUBECONFIG                      kubeconfig file; in-cluster config when unset inside a pod
  CEDAR_NAMESPACE                 Cedar's own namespace, never labelled (default cedar-system)
  CEDAR_MCS_ANNOTATION            annotation carrying the level (default cedar.io/selinux-level)
  CEDAR_MCS_EXCLUDE               namespaces never labelled, comma separated
                                  (default kube-system,kube-public,kube-node-lease,default)
  CEDAR_MCS_SELECTOR              only namespaces matching this label selector (default: all)
  CEDAR_MCS_CATEGORIES            categories c0..cN-1 (default 1024)
  CEDAR_MCS_CATEGORIES_PER_LABEL  2 (default; 523,776 labels of 1024) or 3
  CEDAR_MCS_QUARANTINE            how long a released label rests before reuse (default 7d)
  CEDAR_MCS_RESYNC_INTERVAL       full reconcile with the API every (default 10m)
  CEDAR_MCS_SNAPSHOT_INTERVAL     check for a due ledger snapshot every; 0: none (default 10m)
  CEDAR_MCS_OPENSHIFT_COMPAT      also write openshift.io/sa.scc.mcs (default false)
  CEDAR_MCS_MAX_IN_FLIGHT         namespace events handled at once per replica (default 64)
  CEDAR_MCS_ALLOWED_TYPES         SELinux types tenant pods may ask for (default container_t)
  CEDAR_MCS_WEBHOOK_PORT          serve the pod admission webhook (HTTPS) here (default: off)
  CEDAR_MCS_WEBHOOK_CERT          its certificate chain (default /etc/cedar/webhook/tls.crt)
  CEDAR_MCS_WEBHOOK_KEY           its key (default /etc/cedar/webhook/tls.key)
  CEDAR_MCS_WEBHOOK_RELOAD        check the two files for a rotation every (default 10s)
  CEDAR_MCS_WATCHDOG              report pods running at another level (default true)
  CEDAR_MCS_NFS_CONTEXT           give NFS PVs their tenant's mount context (default false)
  CEDAR_MCS_NFS_CONTEXT_TYPE      the context's SELinux type (default container_file_t)
  CEDAR_MCS_NFS_CSI_DRIVERS       CSI drivers that mount NFS (default nfs.csi.k8s.io)
  CEDAR_HISTORY_RETENTION         how long the audit trail is kept (default 7d)
  CEDAR_METRICS_PORT              /metrics, /healthz, /readyz (default 9103)
  CEDAR_POD_NAME                  this replica's name in the audit trail (default: host name)
  CEDAR_LOG_LEVEL                 DEBUG, INFO, WARNING or ERROR (default INFO)
"""

from __future__ import annotations

import argparse
import os
import sys

from pydantic import ValidationError

EPILOG = """\
metrics: cedar_mcs_labels{state}, cedar_mcs_allocations_total{result},
cedar_mcs_tamper_total, cedar_mcs_conflicts, cedar_mcs_patch_failures_total,
cedar_mcs_admissions_total{result,rule}, cedar_mcs_admission_seconds,
cedar_mcs_pod_mismatches, cedar_mcs_volume_contexts_total{result}, cedar_mcs_volume_conflicts.
docs: docs/mcs-allocator.md (ledger schema, behaviour)."""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="log each decision it would take; write nothing (no API calls, no ledger writes)",
    )
    parser.add_argument(
        "--from-subject",
        metavar="SUBJECT",
        help="take NamespaceEvents from this NATS subject instead of the durable consumer "
        "(e.g. events re-published by `cedar replay`); use with --dry-run",
    )
    parser.add_argument("--metrics-port", type=int, help="overrides CEDAR_METRICS_PORT")
    parser.add_argument("--nats-url", help="overrides CEDAR_NATS_URL")


def main(args: argparse.Namespace) -> int:
    from cedar.mcs_allocator.app import main as service_main
    from cedar.mcs_allocator.settings import AllocatorSettings
    from cedar.runtime.service import run

    overrides: dict[str, object] = {
        "dry_run": bool(args.dry_run),
        "from_subject": args.from_subject,
        "kubeconfig": os.environ.get("KUBECONFIG"),
    }
    if args.metrics_port is not None:
        overrides["metrics_port"] = args.metrics_port
    if args.nats_url:
        overrides["nats_url"] = args.nats_url
    try:
        settings = AllocatorSettings(**overrides)  # type: ignore[arg-type]
    except ValidationError as err:
        print(f"cedar mcs-allocator: invalid settings:\n{err}", file=sys.stderr)
        return 2
    return run("mcs-allocator", settings, service_main, checks=("ledger",))
