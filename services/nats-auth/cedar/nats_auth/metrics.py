"""The auth callout's metrics. Names are public interface: see docs/deploying.md.

Touches only the process's Prometheus registry (served on /metrics by cedar.runtime).
"""

from __future__ import annotations

from prometheus_client import Counter, Histogram

REQUESTS = Counter(
    "cedar_nats_auth_requests",
    "Authorization requests answered, by result (accepted, refused, unreadable) and the "
    "refusal's reason (no_token, malformed_token, wrong_audience, expired, unauthenticated, "
    "wrong_service_account, not_pod_bound, no_node, bad_node, review_failed; none when "
    "accepted, bad_request when unreadable).",
    ["result", "reason"],
)
REVIEW_DURATION = Histogram(
    "cedar_nats_auth_review_duration_seconds",
    "Time one TokenReview took, answered or not.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
