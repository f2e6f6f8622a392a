"""Run the NATS auth callout: pullers connect with their Pod's token, get one node's rights.

nats-server (deploy/components/nats-auth-callout) sends every client that is not one of
its `auth_users` to this service on `$SYS.REQ.USER.AUTH`. The client's token is checked
with a Kubernetes TokenReview: it must be a bound token of an allowed ServiceAccount
(cedar-system/cedar-puller), issued for the audience `nats`, still valid, naming its Pod's
node. The answer is a user JWT, signed by the issuer account, that may write that node's
status keys, prune clocks and decisions and no other node's; anything else is refused,
logged with its cause and counted in cedar_nats_auth_requests.

environment (each option below overrides its variable):
  CEDAR_NATS_URL                NATS server(s), comma separated (default nats://127.0.0.1:4222)
  CEDAR_NATS_USER               this service's own NATS user (an auth_users entry)
  CEDAR_NATS_PASSWORD           its password
  CEDAR_AUTH_ISSUER_SEED_FILE   the issuer account's nkey seed (SA...; required); nats.conf's
                                auth_callout issuer is its public key
  CEDAR_AUTH_ACCOUNT            the NATS account pullers are placed in (default CEDAR)
  CEDAR_AUTH_AUDIENCE           the audience tokens must be for (default nats)
  CEDAR_AUTH_SERVICE_ACCOUNTS   namespace/name,... accepted (default cedar-system/cedar-puller)
  CEDAR_AUTH_USER_TTL           longest life of a granted user, never past its token (24h)
  CEDAR_AUTH_REVIEW_TIMEOUT     limit of one TokenReview (default 5s)
  CEDAR_AUTH_MAX_INFLIGHT       requests answered at once (default 32)
  KUBECONFIG                    kubeconfig; in-cluster config inside a pod
  CEDAR_METRICS_PORT            /metrics, /healthz, /readyz (default 9104)
  CEDAR_LOG_LEVEL               DEBUG, INFO, WARNING or ERROR (default INFO)
Durations accept 90s, 10m, 72h, 7d or plain seconds.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from pydantic import ValidationError

EPILOG = """\
examples:
  cedar nats-auth --new-issuer-seed /secrets/issuer.seed   # prints the issuer's public key
  CEDAR_AUTH_ISSUER_SEED_FILE=/secrets/issuer.seed CEDAR_NATS_USER=nats-auth cedar nats-auth
"""

# option -> settings field; every option mirrors a CEDAR_* variable.
_OPTIONS: tuple[tuple[str, str, str], ...] = (
    ("--nats-url", "nats_url", "NATS server(s) (CEDAR_NATS_URL)"),
    (
        "--issuer-seed-file",
        "auth_issuer_seed_file",
        "issuer nkey seed (CEDAR_AUTH_ISSUER_SEED_FILE)",
    ),
    ("--account", "auth_account", "account pullers are placed in (CEDAR_AUTH_ACCOUNT)"),
    ("--audience", "auth_audience", "token audience (CEDAR_AUTH_AUDIENCE)"),
    ("--service-accounts", "auth_service_accounts", "accepted (CEDAR_AUTH_SERVICE_ACCOUNTS)"),
    ("--user-ttl", "auth_user_ttl", "granted user's longest life (CEDAR_AUTH_USER_TTL)"),
    ("--review-timeout", "auth_review_timeout", "one TokenReview (CEDAR_AUTH_REVIEW_TIMEOUT)"),
    ("--max-inflight", "auth_max_inflight", "requests at once (CEDAR_AUTH_MAX_INFLIGHT)"),
    ("--kubeconfig", "kubeconfig", "kubeconfig file (KUBECONFIG)"),
    ("--metrics-port", "metrics_port", "metrics/health port (CEDAR_METRICS_PORT)"),
    ("--log-level", "log_level", "log level (CEDAR_LOG_LEVEL)"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for option, dest, text in _OPTIONS:
        parser.add_argument(option, dest=dest, default=None, help=text)
    parser.add_argument(
        "--new-issuer-seed",
        dest="new_issuer_seed",
        default=None,
        metavar="FILE",
        help="write a new issuer account seed to FILE (mode 0600, never overwritten), print "
        "its public key (nats.conf's auth_callout issuer) and exit",
    )


def build_settings(args: argparse.Namespace) -> Any:
    from cedar.nats_auth.settings import NatsAuthSettings

    fields = [dest for _, dest, _ in _OPTIONS]
    overrides = {f: getattr(args, f) for f in fields if getattr(args, f, None) is not None}
    return NatsAuthSettings(**overrides)


def _new_issuer_seed(path: Path) -> int:
    from cedar.nats_auth.nkeyjwt import Signer, new_account_seed

    seed = new_account_seed()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as err:
        print(f"cedar nats-auth: cannot create {path}: {err}", file=sys.stderr)
        return 1
    with os.fdopen(fd, "wb") as f:
        f.write(seed + b"\n")
    print(Signer(seed).public_key)
    return 0


def main(args: argparse.Namespace) -> int:
    if getattr(args, "new_issuer_seed", None):
        return _new_issuer_seed(Path(args.new_issuer_seed))

    from cedar.nats_auth import app
    from cedar.nats_auth.errors import NatsAuthConfigError
    from cedar.runtime.kube import KubeConfigError, load_config
    from cedar.runtime.service import Runtime, run

    try:
        settings = build_settings(args)
        signer = app.load_issuer(settings)
        kube_config = load_config(settings.kubeconfig)
    except (ValidationError, NatsAuthConfigError, KubeConfigError) as err:
        print(f"cedar nats-auth: invalid settings: {err}", file=sys.stderr)
        return 2

    async def serve(runtime: Runtime[Any]) -> None:
        await app.main(runtime, signer, kube_config)

    return run("nats-auth", settings, serve, checks=app.READINESS_CHECKS)
