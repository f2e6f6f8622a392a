"""The auth callout's wiring: the issuer key, the Kubernetes client, and the responder.

`load_issuer` reads the issuer seed file (the only secret this service holds); `main` is the
cedar.runtime.service entry point: it answers authorization requests until stopped. I/O:
the seed file here; NATS and the API through responder.py.
"""

from __future__ import annotations

import logging

from cedar.nats_auth.errors import JwtError, NatsAuthConfigError
from cedar.nats_auth.nkeyjwt import Signer
from cedar.nats_auth.responder import READINESS_CHECK, Responder
from cedar.nats_auth.settings import NatsAuthSettings
from cedar.runtime.kube import KubeClient, KubeConfig
from cedar.runtime.service import Runtime

READINESS_CHECKS = (READINESS_CHECK,)
log = logging.getLogger("cedar.nats_auth")


def load_issuer(settings: NatsAuthSettings) -> Signer:
    """The issuer account's key from CEDAR_AUTH_ISSUER_SEED_FILE; NatsAuthConfigError
    saying what is wrong (never the seed)."""
    path = settings.auth_issuer_seed_file
    if path is None:
        raise NatsAuthConfigError(
            "CEDAR_AUTH_ISSUER_SEED_FILE is required: the issuer account's nkey seed "
            "(`cedar nats-auth --new-issuer-seed FILE` makes one)"
        )
    try:
        seed = path.read_bytes()
    except OSError as err:
        raise NatsAuthConfigError(f"cannot read the issuer seed file {path}: {err}") from err
    try:
        return Signer(seed)
    except JwtError as err:
        raise NatsAuthConfigError(f"{path}: {err}") from err


async def main(runtime: Runtime[NatsAuthSettings], signer: Signer, kube_config: KubeConfig) -> None:
    """Answer NATS authorization requests until `runtime.stop`."""
    settings = runtime.settings
    kube = KubeClient(kube_config, timeout=settings.auth_review_timeout.total_seconds())
    try:
        responder = Responder(settings, signer, kube)
        await responder.serve(runtime.bus, runtime.health, runtime.stop)
    finally:
        await kube.close()
