"""The auth callout's exceptions, all under `NatsAuthError`. Pure: no I/O, touches nothing.

A `Refusal` is the answer "this client may not connect", with the `reason` counted in
`cedar_nats_auth_requests{result="refused",reason=...}` and logged with its cause; it is
answered to nats-server as an authorization response carrying an error. A `BadRequest` is
an authorization request that cannot be read or was not signed by a NATS server: there is
nobody to answer, so it is only logged and counted.
"""

from __future__ import annotations

from cedar.runtime.errors import CedarError, ConfigError

# Refusal reasons: the metric's label values (public interface, docs/deploying.md).
NO_TOKEN = "no_token"
MALFORMED_TOKEN = "malformed_token"
WRONG_AUDIENCE = "wrong_audience"
EXPIRED = "expired"
UNAUTHENTICATED = "unauthenticated"
WRONG_SERVICE_ACCOUNT = "wrong_service_account"
NOT_POD_BOUND = "not_pod_bound"
NO_NODE = "no_node"
BAD_NODE = "bad_node"
REVIEW_FAILED = "review_failed"
REASONS = (
    NO_TOKEN,
    MALFORMED_TOKEN,
    WRONG_AUDIENCE,
    EXPIRED,
    UNAUTHENTICATED,
    WRONG_SERVICE_ACCOUNT,
    NOT_POD_BOUND,
    NO_NODE,
    BAD_NODE,
    REVIEW_FAILED,
)


class NatsAuthError(CedarError):
    """Root of every error the auth callout raises on purpose."""


class NatsAuthConfigError(NatsAuthError, ConfigError):
    """An auth callout setting is unusable (the issuer seed, say); the message says which."""


class JwtError(NatsAuthError, ValueError):
    """A NATS JWT or nkey that cannot be decoded, or whose signature does not verify."""


class BadRequest(NatsAuthError, ValueError):
    """An authorization request that is not one nats-server signed; nobody can be answered."""


class Refusal(NatsAuthError):
    """The client may not connect: `reason` (one of REASONS) and the cause, for the log."""

    def __init__(self, reason: str, cause: str) -> None:
        super().__init__(f"{reason}: {cause}")
        self.reason = reason
        self.cause = cause
