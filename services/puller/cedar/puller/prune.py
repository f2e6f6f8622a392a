"""Which local images may be removed. Pure: no I/O; it touches only its arguments.

An image is removed only if all three hold:

(a) it is in the prune scope: it carries the `CEDAR_PRUNE_LABEL` label (`key=value`, or
    `key` for any value), or one of its repositories starts with a prefix listed in
    `CEDAR_PRUNE_REPOSITORIES` (then all of its names must). Nothing outside the scope is
    ever touched; with neither setting, nothing is.
(b) no workload has wanted it on this node for `CEDAR_PRUNE_AFTER`, counted from when it
    stopped being desired (the caller keeps those times in NATS KV so they survive restarts);
(c) no container, running or merely created, uses it.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field

from cedar.proto.imageref import InvalidReference, parse


@dataclass(frozen=True)
class LocalImage:
    """An image in the engine, as `GET /images/json` lists it."""

    id: str
    repo_tags: tuple[str, ...] = ()
    repo_digests: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)

    def references(self) -> set[str]:
        """Normalised references naming this image: name:tag and name@digest forms."""
        refs: set[str] = set()
        for text in (*self.repo_tags, *self.repo_digests):
            if text in ("<none>:<none>", "<none>@<none>"):
                continue
            try:
                refs.add(str(parse(text)))
            except InvalidReference:
                continue
        return refs

    def repositories(self) -> set[str]:
        names: set[str] = set()
        for text in (*self.repo_tags, *self.repo_digests):
            try:
                names.add(parse(text).name)
            except InvalidReference:
                continue
        return names


@dataclass(frozen=True)
class Scope:
    label: tuple[str, str | None] | None = None
    prefixes: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, label: str | None, prefixes: Iterable[str]) -> Scope:
        parsed: tuple[str, str | None] | None = None
        if label:
            key, sep, value = label.partition("=")
            parsed = (key.strip(), value.strip() if sep else None)
        return cls(label=parsed, prefixes=tuple(_normalise_prefix(p) for p in prefixes))

    @property
    def empty(self) -> bool:
        return self.label is None and not self.prefixes

    def contains(self, image: LocalImage) -> bool:
        if self.label is not None:
            key, value = self.label
            if key in image.labels and (value is None or image.labels[key] == value):
                return True
        if self.prefixes:
            # Every name must be in scope: removing the image removes all of its names, and
            # a name outside the scope must never be touched.
            names = image.repositories()
            return bool(names) and all(
                any(name.startswith(p) for p in self.prefixes) for name in names
            )
        return False


def _normalise_prefix(prefix: str) -> str:
    """Let operators write `registry.example.com/team/` or a familiar Hub name like `team/`."""
    text = prefix.strip()
    first = text.split("/", 1)[0]
    if "/" in text and ("." in first or ":" in first or first == "localhost"):
        return text
    # Docker Hub names carry docker.io/ (and library/ for single components) once parsed.
    return "docker.io/" + text


def is_desired(image: LocalImage, desired: Collection[str]) -> bool:
    refs = image.references()
    if refs & set(desired):
        return True
    # A desired name:tag@digest is satisfied by the local name@digest.
    for want in desired:
        if "@" in want:
            name, _, digest = want.partition("@")
            base = name.rsplit(":", 1)[0] if name.rfind(":") > name.rfind("/") else name
            if f"{base}@{digest}" in refs:
                return True
    return False


@dataclass
class PruneDecision:
    remove: list[LocalImage] = field(default_factory=list)
    # Image IDs in scope, undesired, not yet old enough: id -> when it stopped being desired.
    track: dict[str, float] = field(default_factory=dict)
    # IDs whose "undesired since" record should be dropped (desired again, or gone).
    forget: set[str] = field(default_factory=set)
    kept_in_use: list[str] = field(default_factory=list)


def decide(
    images: Iterable[LocalImage],
    desired: Collection[str],
    undesired_since: Mapping[str, float],
    used_image_ids: Collection[str],
    *,
    scope: Scope,
    now: float,
    prune_after: float,
) -> PruneDecision:
    decision = PruneDecision()
    seen: set[str] = set()
    desired_set = set(desired)
    for image in images:
        seen.add(image.id)
        if scope.empty or not scope.contains(image):
            continue
        if is_desired(image, desired_set):
            if image.id in undesired_since:
                decision.forget.add(image.id)
            continue
        since = undesired_since.get(image.id)
        if since is None:
            decision.track[image.id] = now
            continue
        if now - since < prune_after:
            continue
        if image.id in used_image_ids:
            decision.kept_in_use.append(image.id)
            continue
        decision.remove.append(image)
    decision.forget |= {i for i in undesired_since if i not in seen}
    return decision
