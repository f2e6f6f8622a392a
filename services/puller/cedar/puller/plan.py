"""What to pull next, and how each image's bookkeeping moves. Pure: no I/O; times are floats.

It touches only its arguments: the desired set, the engine's listing, the records. Order:
images missing from the engine first, the ones most workloads want before the rest, then
tag references whose refresh is due. An image in flight is never started twice; an image
in backoff, behind an open registry breaker, or waiting for disk is not started.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from typing import Literal

from cedar.proto.imageref import ImageReference, InvalidReference, parse
from cedar.proto.models import ImageState
from cedar.puller.prune import LocalImage

PERMANENT_REASONS = frozenset({"not_found", "unauthorized", "invalid_reference"})
PullKind = Literal["pull", "refresh"]


@dataclass
class ImageRecord:
    """The puller's memory of one desired image."""

    image: str
    state: ImageState = "missing"
    digest: str | None = None
    reason: str | None = None
    error: str | None = None
    failures: int = 0
    next_attempt: float = 0.0
    refresh_at: float | None = None
    brought: bool = False  # this puller pulled it (so its disappearance is an eviction)
    evictions: int = 0
    wanted_at: float | None = None  # watcher observation time of the event that added it
    settled_at: float = 0.0  # when the last pull finished (a listing older than that is stale)


@dataclass(frozen=True)
class Policy:
    refresh_interval: float
    refresh_jitter: float
    backoff_base: float
    backoff_max: float
    permanent_retry: float
    node: str


@dataclass
class Plan:
    pulls: list[tuple[str, PullKind]] = field(default_factory=list)
    invalid: list[tuple[str, str]] = field(default_factory=list)  # (image, why)
    blocked_registry: list[str] = field(default_factory=list)
    next_wakeup: float | None = None  # earliest time something becomes due


def parse_image(image: str) -> ImageReference | None:
    try:
        return parse(image)
    except InvalidReference:
        return None


def present_index(images: list[LocalImage]) -> dict[str, tuple[str, str | None]]:
    """Normalised reference -> (image id, manifest digest) for everything in the engine."""
    index: dict[str, tuple[str, str | None]] = {}
    for image in images:
        digests: dict[str, str] = {}
        for text in image.repo_digests:
            ref = parse_image(text)
            if ref is not None and ref.digest is not None:
                digests[ref.name] = ref.digest
                index[f"{ref.name}@{ref.digest}"] = (image.id, ref.digest)
        for text in image.repo_tags:
            ref = parse_image(text)
            if ref is not None:
                index[str(ref)] = (image.id, digests.get(ref.name))
    return index


def lookup(index: dict[str, tuple[str, str | None]], image: str) -> tuple[str, str | None] | None:
    """The (image id, digest) in `index` that satisfies the desired reference `image`."""
    ref = parse_image(image)
    if ref is None:
        return None
    if ref.digest is not None:
        return index.get(f"{ref.name}@{ref.digest}")
    return index.get(str(ref))


def spread(node: str, image: str) -> float:
    """A stable number in [0, 1) per node and image: the per-node jitter of refreshes."""
    digest = hashlib.blake2b(f"{node}\0{image}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def refresh_delay(policy: Policy, image: str, *, after_start: bool) -> float:
    """Seconds until a tag reference is re-pulled.

    Right after start, refreshes spread over a whole interval (a fleet restarting together
    must not hit the registry together); after a pull, over the last `refresh_jitter` of it.
    """
    u = spread(policy.node, image)
    if after_start:
        return policy.refresh_interval * u
    return policy.refresh_interval * (1.0 - policy.refresh_jitter * u)


def failure_delay(policy: Policy, reason: str, failures: int, rng: random.Random) -> float:
    if reason in PERMANENT_REASONS:
        # Slow and jittered: a typo in one manifest must not become a registry hot loop.
        return policy.permanent_retry * (0.9 + 0.2 * rng.random())
    ceiling = min(policy.backoff_max, policy.backoff_base * 2.0 ** min(failures - 1, 30))
    return ceiling * (0.1 + 0.9 * rng.random())


def on_pull_started(record: ImageRecord) -> None:
    record.state = "pulling"


def on_pull_succeeded(
    record: ImageRecord, policy: Policy, digest: str | None, now: float, *, by_digest: bool
) -> None:
    record.state = "present"
    record.digest = digest or record.digest
    record.reason = record.error = None
    record.failures = 0
    record.next_attempt = 0.0
    record.brought = True
    record.refresh_at = (
        None if by_digest else now + refresh_delay(policy, record.image, after_start=False)
    )


def on_pull_failed(
    record: ImageRecord,
    policy: Policy,
    *,
    reason: str,
    error: str,
    now: float,
    rng: random.Random,
    present: bool,
) -> None:
    record.failures += 1
    record.settled_at = now
    record.reason, record.error = reason, error
    delay = failure_delay(policy, reason, record.failures, rng)
    if present:
        # A failed refresh leaves a usable image; try the refresh again later.
        record.state = "present"
        record.refresh_at = now + delay
    else:
        record.state = "failed"
        record.next_attempt = now + delay


def on_evicted(record: ImageRecord, policy: Policy, now: float, rng: random.Random) -> float:
    """The image this puller brought disappeared (kubelet's image GC). Returns the wait.

    Each eviction doubles the wait before pulling it again, so that the puller and kubelet
    never fight over the same disk in a loop.
    """
    record.evictions += 1
    record.brought = False
    record.state = "missing"
    delay = min(policy.backoff_max, policy.backoff_base * 2.0 ** min(record.evictions, 30))
    delay *= 0.5 + 0.5 * rng.random()
    record.next_attempt = max(record.next_attempt, now + delay)
    return delay


def observe_present(
    record: ImageRecord, policy: Policy, digest: str | None, now: float, *, by_digest: bool
) -> None:
    """The engine has it (found at start or pulled by someone else)."""
    if record.state in ("missing", "failed"):
        # Present after all (pulled by someone else): the old failure no longer applies.
        record.reason = record.error = None
        record.failures = 0
    if record.state != "pulling":
        record.state = "present"
    if digest:
        record.digest = digest
    if record.refresh_at is None and not by_digest:
        record.refresh_at = now + refresh_delay(policy, record.image, after_start=True)


def plan(
    desired: Collection[str],
    priority: Callable[[str], int],
    present: Mapping[str, str | None],
    in_flight: Collection[str],
    records: Mapping[str, ImageRecord],
    *,
    now: float,
    slots: int,
    registry_down: Collection[str] = (),
    disk_low: bool = False,
) -> Plan:
    """Choose up to `slots` pulls. `present` maps desired images in the engine to digests."""
    result = Plan()
    missing: list[tuple[int, str]] = []
    refresh: list[tuple[float, str]] = []

    def wake(at: float) -> None:
        if result.next_wakeup is None or at < result.next_wakeup:
            result.next_wakeup = at

    for image in desired:
        ref = parse_image(image)
        if ref is None:
            result.invalid.append((image, "invalid reference"))
            continue
        if image in in_flight:
            continue
        record = records.get(image)
        if image not in present:
            if record is not None and record.next_attempt > now:
                wake(record.next_attempt)
                continue
            if ref.registry in registry_down:
                result.blocked_registry.append(image)
                continue
            missing.append((-priority(image), image))
        elif not ref.is_digest and record is not None and record.refresh_at is not None:
            if record.refresh_at > now:
                wake(record.refresh_at)
            elif ref.registry in registry_down:
                result.blocked_registry.append(image)
            else:
                refresh.append((record.refresh_at, image))

    if disk_low:
        return result
    missing.sort()
    refresh.sort()
    for _, image in missing:
        if len(result.pulls) >= slots:
            break
        result.pulls.append((image, "pull"))
    for _, image in refresh:
        if len(result.pulls) >= slots:
            break
        result.pulls.append((image, "refresh"))
    return result
