"""The `cedar` command.

Each subcommand lives in a module with `add_arguments(parser)` and `main(args) -> int`,
imported only when that subcommand is used.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from cedar.runtime.version import __version__

# (command, module, one-line summary)
COMMANDS: tuple[tuple[str, str, str], ...] = (
    (
        "watcher",
        "cedar.watcher.cli",
        "run the watcher: workloads and namespaces -> NATS",
    ),
    (
        "puller",
        "cedar.puller.cli",
        "run a node's puller: desired images -> the node's image store (CRI or Docker)",
    ),
    (
        "mcs-allocator",
        "cedar.mcs_allocator.cli",
        "run the allocator: a unique SELinux MCS level per tenant namespace",
    ),
    (
        "nats-auth",
        "cedar.nats_auth.cli",
        "run the NATS auth callout: a puller gets its own node's rights only",
    ),
    ("up", "cedar.ops.up", "run all three services, with an embedded NATS server if needed"),
    ("replay", "cedar.ops.replay", "print or re-publish recorded events of a time window"),
    (
        "status",
        "cedar.ops.status",
        "which nodes have which images; namespaces' levels",
    ),
    ("prepull", "cedar.ops.prepull", "pre-pull a release's images on every eligible node and wait"),
)

ENVIRONMENT = """\
environment:
  CEDAR_NATS_URL            NATS server(s), comma separated (default nats://127.0.0.1:4222)
  KUBECONFIG                kubeconfig file; in-cluster config when unset inside a pod
  CEDAR_NODE_NAME           the puller's node (required for `cedar puller`)
  DOCKER_HOST               Docker engine the puller drives (default unix:///var/run/docker.sock)
  CEDAR_REGISTRY_AUTH_FILE  .dockerconfigjson file with registry credentials
  CEDAR_METRICS_PORT        port of /metrics, /healthz, /readyz
                            (default: watcher 9101, puller 9102, mcs-allocator 9103)
  CEDAR_MCS_ANNOTATION      namespace annotation carrying the level (default cedar.io/selinux-level)
  CEDAR_LOG_LEVEL           DEBUG, INFO, WARNING or ERROR (default INFO)
`cedar COMMAND --help` lists each command's own options and variables."""


def build_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    """Every command with its summary; only `chosen`'s module is imported and its options
    registered, so `cedar status` does not pay for the Docker or Kubernetes clients."""
    parser = argparse.ArgumentParser(
        prog="cedar",
        description=(
            "Cedar keeps Kubernetes nodes' image caches warm so that scaled-to-zero tenants "
            "start in seconds, and gives every tenant namespace a unique SELinux MCS level."
        ),
        epilog=ENVIRONMENT,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"cedar {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    for name, module_name, summary in COMMANDS:
        module = importlib.import_module(module_name) if name == chosen else None
        command = sub.add_parser(
            name,
            help=summary,
            description=getattr(module, "__doc__", None) or summary,
            formatter_class=argparse.RawDescriptionHelpFormatter,
            epilog=getattr(module, "EPILOG", None),
        )
        command.set_defaults(_module=module_name)
        if module is not None:
            module.add_arguments(command)
    return parser


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    chosen = next((a for a in args_list if not a.startswith("-")), None)
    parser = build_parser(chosen)
    args = parser.parse_args(args_list)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    result: int = importlib.import_module(args._module).main(args)
    return result
