"""Docker/OCI image references (the distribution/reference grammar), as pure logic.

Grammar, after github.com/distribution/reference::

    reference        := name [ ":" tag ] [ "@" digest ]
    name             := [ host [ ":" port ] "/" ] path-component [ "/" path-component ]*
    host             := domain-name | "[" ipv6 "]"        (an IPv4 address is a domain-name)
    path-component   := [a-z0-9]+ ( separator [a-z0-9]+ )*
    separator        := "." | "_" | "__" | "-"+
    tag              := [\\w][\\w.-]{0,127}
    digest           := algorithm ":" hex

Normalisation follows Docker's ``ParseNormalizedNamed``: a missing registry means Docker
Hub, a single-component Docker Hub path gets ``library/``, and ``latest`` is implied when
neither tag nor digest is given. Two deliberate differences from Docker: a first component
with upper-case letters is a (rejected) path component rather than a registry, so that
"Nginx/app" fails loudly instead of naming a host called "Nginx"; and every Docker Hub alias
folds to ``docker.io`` (Docker folds only ``index.docker.io``), with registry hosts
lower-cased, so that one image has one name on the bus. Digests with algorithms other than
sha256/sha384/sha512 pass if they fit the general grammar, though the engine cannot pull them.

Parsing runs for every container of every workload event, hence the precompiled patterns
and the cache in front of the parser.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

__all__ = [
    "DOCKER_HUB",
    "DOCKER_HUB_ALIASES",
    "DOCKER_HUB_API_HOST",
    "NAME_TOTAL_LENGTH_MAX",
    "TAG_LENGTH_MAX",
    "ImageReference",
    "InvalidReference",
    "canonical_registry",
    "normalize",
    "parse",
]

DOCKER_HUB = "docker.io"
# docker.io is only the name; the registry API of Docker Hub answers on this host.
DOCKER_HUB_API_HOST = "registry-1.docker.io"
DOCKER_HUB_ALIASES: frozenset[str] = frozenset(
    {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
)
OFFICIAL_REPO_PREFIX = "library/"
DEFAULT_TAG = "latest"
NAME_TOTAL_LENGTH_MAX = 255
TAG_LENGTH_MAX = 128

# Length of the hex part for the algorithms the Docker engine (go-digest) implements.
_KNOWN_DIGEST_LENGTHS: dict[str, int] = {"sha256": 64, "sha384": 96, "sha512": 128}

# Every character that can appear anywhere in a valid reference; one scan with this rejects
# whitespace, shell metacharacters and non-ASCII text before any finer checks run.
_ALLOWED = re.compile(r"[A-Za-z0-9._\-/:@\[\]+]+")
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = re.compile(
    rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?"
)
_PATH_COMPONENT = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
_DIGEST_ALGORITHM = re.compile(r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*")
_DIGEST_HEX = re.compile(r"[0-9a-fA-F]{32,}")
_LOWER_HEX = re.compile(r"[0-9a-f]+")
# A bare 64-hex string is an image ID, not a name; Docker refuses it for that reason.
_IMAGE_ID = re.compile(r"[a-f0-9]{64}")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")


class InvalidReference(ValueError):
    """A string that is not a valid image reference; ``reason`` says what is wrong."""

    reference: str
    reason: str

    def __init__(self, reference: str, reason: str) -> None:
        # Both go to args so that the exception pickles and unpickles intact.
        super().__init__(reference, reason)
        self.reference = reference
        self.reason = reason

    def __str__(self) -> str:
        return f"invalid image reference {self.reference!r}: {self.reason}"


@dataclass(frozen=True, slots=True)
class ImageReference:
    """A parsed, normalised image reference.

    ``registry`` is always set (``docker.io`` for Docker Hub); ``tag`` is ``None`` only when
    a digest was given without a tag.
    """

    registry: str
    repository: str
    tag: str | None
    digest: str | None

    @property
    def name(self) -> str:
        return f"{self.registry}/{self.repository}"

    @property
    def is_digest(self) -> bool:
        """Pinned by digest: the content can never change, so it never needs re-pulling."""
        return self.digest is not None

    @property
    def pull_ref(self) -> str:
        # The engine resolves name@digest exactly; a tag next to a digest would be ignored.
        if self.digest is not None:
            return f"{self.name}@{self.digest}"
        return f"{self.name}:{self.tag or DEFAULT_TAG}"

    @property
    def api_host(self) -> str:
        return DOCKER_HUB_API_HOST if self.registry == DOCKER_HUB else self.registry

    def __str__(self) -> str:
        text = self.name
        if self.tag is not None:
            text += f":{self.tag}"
        if self.digest is not None:
            text += f"@{self.digest}"
        return text

    def familiar(self) -> str:
        """Docker's short form, e.g. ``nginx:latest`` or ``127.0.0.1:5000/x:1``."""
        name = self.name
        if self.registry == DOCKER_HUB:
            path = self.repository
            if path.startswith(OFFICIAL_REPO_PREFIX) and path.count("/") == 1:
                path = path[len(OFFICIAL_REPO_PREFIX) :]
            # A Docker Hub path whose first component looks like a host ("my.org/app")
            # would be read back as a registry; keep the registry there to stay unambiguous.
            first, slash, _ = path.partition("/")
            if not (slash and _looks_like_host(first)):
                name = path
        if self.tag is not None:
            name += f":{self.tag}"
        if self.digest is not None:
            name += f"@{self.digest}"
        return name


def _looks_like_host(component: str) -> bool:
    return component == "localhost" or "." in component or ":" in component


def canonical_registry(host: str) -> str:
    """Fold a registry host to the form used in references and for matching credentials.

    The host part is lower-cased (DNS is case-insensitive) and Docker Hub's aliases become
    ``docker.io``. Keys of a ``.dockerconfigjson`` such as ``https://index.docker.io/v1/``
    are accepted too: scheme and path are dropped.
    """
    text = host.strip()
    text = _SCHEME.sub("", text, count=1)
    text = text.split("/", 1)[0]
    if text.startswith("["):
        end = text.find("]")
        hostpart, port = (text[: end + 1], text[end + 1 :]) if end != -1 else (text, "")
    else:
        hostpart, colon, portnum = text.partition(":")
        port = colon + portnum
    hostpart = hostpart.lower()
    if not port and hostpart in DOCKER_HUB_ALIASES:
        return DOCKER_HUB
    return hostpart + port


def normalize(text: str) -> str:
    """The canonical fully-qualified form of ``text``.

    ``normalize("nginx") == "docker.io/library/nginx:latest"``
    """
    return str(parse(text))


def parse(text: str) -> ImageReference:
    """Parse and normalise an image reference; raises :class:`InvalidReference`."""
    if not isinstance(text, str):
        raise InvalidReference(repr(text), f"must be a string, not {type(text).__name__}")
    return _parse(text)


def _bad_character_reason(text: str) -> str:
    for char in text:
        if char.isspace():
            return "contains whitespace"
        if not char.isascii():
            return f"contains non-ASCII character {char!r}"
        if not char.isprintable():
            return f"contains control character {char!r}"
        if not _ALLOWED.fullmatch(char):
            return f"contains invalid character {char!r}"
    raise AssertionError("unreachable: called without a bad character")  # pragma: no cover


def _path_component_reason(component: str) -> str:
    if component.lower() != component:
        return "repository name must be lowercase"
    for char in component:
        if not (char.isalnum() or char in "._-"):
            return f"path component {component!r} contains invalid character {char!r}"
    if not component[0].isalnum() or not component[-1].isalnum():
        return f"path component {component!r} must start and end with a letter or digit"
    return (
        f"path component {component!r} has an invalid separator"
        " (allowed: '.', '_', '__', or one or more '-')"
    )


def _digest_reason(digest: str) -> str | None:
    algorithm, colon, hexpart = digest.partition(":")
    if not colon or not algorithm:
        return f"digest {digest!r} must have the form algorithm:hex"
    if not _DIGEST_ALGORITHM.fullmatch(algorithm):
        return f"digest algorithm {algorithm!r} is invalid"
    expected = _KNOWN_DIGEST_LENGTHS.get(algorithm)
    if expected is not None:
        if len(hexpart) != expected or not _LOWER_HEX.fullmatch(hexpart):
            return f"digest {algorithm} must be {expected} lowercase hex characters"
        return None
    if algorithm.lower() in _KNOWN_DIGEST_LENGTHS:
        return f"digest algorithm {algorithm!r} must be lowercase"
    if not _DIGEST_HEX.fullmatch(hexpart):
        return f"digest {digest!r} must have at least 32 hex characters after the algorithm"
    return None


@lru_cache(maxsize=8192)
def _parse(text: str) -> ImageReference:
    def fail(reason: str) -> InvalidReference:
        return InvalidReference(text, reason)

    if not text:
        raise fail("empty reference")
    if not _ALLOWED.fullmatch(text):
        raise fail(_bad_character_reason(text))
    if _IMAGE_ID.fullmatch(text):
        raise fail("a 64-character hex string is an image ID, not a repository name")

    remainder, at, digest_text = text.partition("@")
    digest: str | None = None
    if at:
        if not digest_text:
            raise fail("empty digest after '@'")
        if "@" in digest_text:
            raise fail("contains more than one '@'")
        reason = _digest_reason(digest_text)
        if reason is not None:
            raise fail(reason)
        digest = digest_text

    # A ':' after the last '/' starts the tag; one before it belongs to a registry port.
    tag: str | None = None
    colon = remainder.rfind(":")
    if colon > remainder.rfind("/"):
        tag = remainder[colon + 1 :]
        remainder = remainder[:colon]
        if not tag:
            raise fail("empty tag after ':'")
        if len(tag) > TAG_LENGTH_MAX:
            raise fail(f"tag {tag[:20]!r}... is longer than {TAG_LENGTH_MAX} characters")
        if not _TAG.fullmatch(tag):
            if tag[0] in ".-":
                raise fail(f"tag {tag!r} must start with a letter, digit or '_'")
            raise fail(f"tag {tag!r} may contain only letters, digits, '_', '.' and '-'")
    if not remainder:
        raise fail("empty repository name")

    first, slash, rest = remainder.partition("/")
    if slash and _looks_like_host(first):
        if not _HOST.fullmatch(first):
            raise fail(f"invalid registry host {first!r}")
        registry = canonical_registry(first)
        path = rest
    else:
        registry = DOCKER_HUB
        path = remainder

    for component in path.split("/"):
        if not component:
            raise fail("repository path has an empty component (leading, trailing or '//')")
        if not _PATH_COMPONENT.fullmatch(component):
            raise fail(_path_component_reason(component))

    if registry == DOCKER_HUB and "/" not in path:
        path = OFFICIAL_REPO_PREFIX + path
    if len(registry) + 1 + len(path) > NAME_TOTAL_LENGTH_MAX:
        raise fail(f"repository name is longer than {NAME_TOTAL_LENGTH_MAX} characters")
    if tag is None and digest is None:
        tag = DEFAULT_TAG
    return ImageReference(registry=registry, repository=path, tag=tag, digest=digest)
