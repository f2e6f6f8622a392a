"""The image-reference parser: tables of valid and invalid references, plus properties."""

from __future__ import annotations

import pickle

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from cedar.proto.imageref import (
    DOCKER_HUB,
    ImageReference,
    InvalidReference,
    canonical_registry,
    normalize,
    parse,
)

H64 = "0123456789abcdef" * 4
H128 = H64 * 2
SHA = f"sha256:{H64}"

VALID: list[tuple[str, str]] = [
    ("nginx", "docker.io/library/nginx:latest"),
    ("nginx:1.25", "docker.io/library/nginx:1.25"),
    ("nginx:latest", "docker.io/library/nginx:latest"),
    ("library/nginx", "docker.io/library/nginx:latest"),
    ("user/app", "docker.io/user/app:latest"),
    ("user/app:1", "docker.io/user/app:1"),
    ("docker.io/nginx", "docker.io/library/nginx:latest"),
    ("docker.io/library/nginx:1", "docker.io/library/nginx:1"),
    ("docker.io/user/app", "docker.io/user/app:latest"),
    ("index.docker.io/library/nginx", "docker.io/library/nginx:latest"),
    ("index.docker.io/nginx", "docker.io/library/nginx:latest"),
    ("registry-1.docker.io/user/app:2", "docker.io/user/app:2"),
    ("registry.hub.docker.com/nginx", "docker.io/library/nginx:latest"),
    ("Index.Docker.IO/nginx", "docker.io/library/nginx:latest"),
    ("docker.io:443/nginx", "docker.io:443/nginx:latest"),
    ("localhost/app", "localhost/app:latest"),
    ("localhost:5000/a/b:c", "localhost:5000/a/b:c"),
    ("localhost", "docker.io/library/localhost:latest"),
    ("localhost:5000", "docker.io/library/localhost:5000"),
    ("127.0.0.1:5000/x", "127.0.0.1:5000/x:latest"),
    ("127.0.0.1/x:1", "127.0.0.1/x:1"),
    ("[::1]:5000/x", "[::1]:5000/x:latest"),
    ("[::1]/x:t", "[::1]/x:t"),
    ("[FE80::1]:5000/x", "[fe80::1]:5000/x:latest"),
    ("gcr.io/a/b/c", "gcr.io/a/b/c:latest"),
    ("GCR.io/a", "gcr.io/a:latest"),
    (
        "my-registry.example.com:8443/team/app:v1.2.3",
        "my-registry.example.com:8443/team/app:v1.2.3",
    ),
    ("registry:5000/x", "registry:5000/x:latest"),
    ("a/b@" + SHA, "docker.io/a/b@" + SHA),
    ("a:t@" + SHA, "docker.io/library/a:t@" + SHA),
    ("nginx@" + SHA, "docker.io/library/nginx@" + SHA),
    ("gcr.io/x@sha512:" + H128, "gcr.io/x@sha512:" + H128),
    ("x@sha384:" + H64 + H64[:32], "docker.io/library/x@sha384:" + H64 + H64[:32]),
    (
        "x@multihash+base58:" + "0AbCdEf" * 5,
        "docker.io/library/x@multihash+base58:" + "0AbCdEf" * 5,
    ),
    ("a__b/c__d", "docker.io/a__b/c__d:latest"),
    ("a--b/c---d", "docker.io/a--b/c---d:latest"),
    ("a-b.c_d", "docker.io/library/a-b.c_d:latest"),
    ("docker.io/my.org/app", "docker.io/my.org/app:latest"),
    ("docker.io/localhost/app", "docker.io/localhost/app:latest"),
    ("x:" + "a" * 128, "docker.io/library/x:" + "a" * 128),
    ("x:_", "docker.io/library/x:_"),
    ("x:V1.0-RC_1", "docker.io/library/x:V1.0-RC_1"),
    ("0/1/2", "docker.io/0/1/2:latest"),
    ("a" * 237, "docker.io/library/" + "a" * 237 + ":latest"),
    ("gcr.io/" + "a" * 248, "gcr.io/" + "a" * 248 + ":latest"),
]


@pytest.mark.parametrize(("text", "expected"), VALID)
def test_valid_references_normalise(text: str, expected: str) -> None:
    ref = parse(text)
    assert str(ref) == expected
    assert normalize(text) == expected
    assert parse(expected) == ref
    assert parse(ref.familiar()) == ref


INVALID: list[tuple[str, str]] = [
    ("", "empty reference"),
    (" ", "whitespace"),
    ("nginx ", "whitespace"),
    (" nginx", "whitespace"),
    ("ngi nx", "whitespace"),
    ("nginx\t", "whitespace"),
    ("nginx\n", "whitespace"),
    ("nginx:1\r", "whitespace"),
    ("nginx\u00a0", "whitespace"),
    ("nginx\x00", "control character"),
    ("nginx\x7f", "control character"),
    ("Nginx", "must be lowercase"),
    ("user/App", "must be lowercase"),
    ("User/app", "must be lowercase"),
    ("gcr.io/Team/app", "must be lowercase"),
    ("LOCALHOST/app", "must be lowercase"),
    ("nginx;rm", "invalid character ';'"),
    ("nginx|sh", "invalid character '|'"),
    ("nginx&", "invalid character '&'"),
    ("$(id)", "invalid character '$'"),
    ("nginx`id`", "invalid character '`'"),
    ("a(b)", "invalid character '('"),
    ("a<b", "invalid character '<'"),
    ("a>b", "invalid character '>'"),
    ("a'b", "invalid character"),
    ('a"b', "invalid character"),
    ("a*b", "invalid character '*'"),
    ("a\\b", "invalid character"),
    ("a..b", "invalid separator"),
    ("a._b", "invalid separator"),
    ("a___b", "invalid separator"),
    ("-a", "start and end"),
    ("a-", "start and end"),
    ("_a", "start and end"),
    ("a.", "start and end"),
    (".a/b", "invalid registry host"),
    ("/a", "empty component"),
    ("a/", "empty component"),
    ("a//b", "empty component"),
    ("gcr.io/", "empty component"),
    ("gcr.io//x", "empty component"),
    ("a/b+c", "invalid character '+'"),
    ("a/[b]", "invalid character '['"),
    ("x/a:b/c", "invalid character ':'"),
    ("nginx:", "empty tag"),
    ("gcr.io/x:", "empty tag"),
    ("nginx@", "empty digest"),
    ("nginx:1@", "empty digest"),
    (":tag", "empty repository"),
    ("@" + SHA, "empty repository"),
    ("nginx:.x", "must start with"),
    ("nginx:-x", "must start with"),
    ("nginx:" + "a" * 129, "longer than 128"),
    ("nginx:a+b", "tag 'a+b'"),
    ("nginx:a[b", "tag"),
    ("a@sha256:" + H64[:63], "sha256 must be 64 lowercase hex"),
    ("a@sha256:" + H64 + "0", "sha256 must be 64 lowercase hex"),
    ("a@sha256:" + H64.upper(), "sha256 must be 64 lowercase hex"),
    ("a@sha256:" + "g" * 64, "sha256 must be 64 lowercase hex"),
    ("a@sha512:" + H64, "sha512 must be 128 lowercase hex"),
    ("a@SHA256:" + H64, "must be lowercase"),
    ("a@" + H64, "algorithm:hex"),
    ("a@:" + H64, "algorithm:hex"),
    ("a@md5", "algorithm:hex"),
    ("a@1md5:" + H64, "algorithm '1md5'"),
    ("a@foo_:" + H64, "algorithm 'foo_'"),
    ("a@foo:" + H64[:31], "at least 32 hex"),
    ("a@foo:" + "z" * 40, "at least 32 hex"),
    ("a@" + SHA + "@" + SHA, "more than one '@'"),
    ("a@sha256:abc/def", "sha256 must be 64"),
    (H64, "image ID"),
    ("gcr.io/" + "a" * 249, "longer than 255"),
    ("a" * 238, "longer than 255"),
    ("x/" + "a/" * 123 + "a", "longer than 255"),
    ("-gcr.io/x", "invalid registry host"),
    ("gcr..io/x", "invalid registry host"),
    ("gcr.io:port/x", "invalid registry host"),
    ("a:b/c", "invalid registry host"),
    ("[]:5000/x", "invalid registry host"),
    ("[::1/x", "invalid registry host"),
    ("ngïnx", "non-ASCII"),
    ("nginx:ta\u0261", "non-ASCII"),
    ("\u0430pp", "non-ASCII"),
    ("émoji/\U0001f600", "non-ASCII"),
]


@pytest.mark.parametrize(("text", "fragment"), INVALID)
def test_invalid_references_say_why(text: str, fragment: str) -> None:
    with pytest.raises(InvalidReference) as info:
        parse(text)
    err = info.value
    assert err.reference == text
    assert fragment in err.reason
    assert str(err) == f"invalid image reference {text!r}: {err.reason}"
    assert isinstance(err, ValueError)


def test_non_string_input_is_an_invalid_reference() -> None:
    with pytest.raises(InvalidReference, match="must be a string"):
        parse(None)  # type: ignore[arg-type]


def test_invalid_reference_pickles() -> None:
    with pytest.raises(InvalidReference) as info:
        parse("Bad")
    copy = pickle.loads(pickle.dumps(info.value))
    assert (copy.reference, copy.reason, str(copy)) == ("Bad", info.value.reason, str(info.value))


def test_properties_of_a_hub_reference() -> None:
    ref = parse("nginx")
    assert ref == ImageReference("docker.io", "library/nginx", "latest", None)
    assert ref.name == "docker.io/library/nginx"
    assert not ref.is_digest
    assert ref.pull_ref == "docker.io/library/nginx:latest"
    assert ref.api_host == "registry-1.docker.io"
    assert ref.familiar() == "nginx:latest"
    assert parse("user/app:1").familiar() == "user/app:1"
    assert parse("docker.io/library/a/b").familiar() == "library/a/b:latest"


def test_properties_of_a_private_digested_reference() -> None:
    ref = parse(f"127.0.0.1:5000/team/x:1@{SHA}")
    assert ref.registry == "127.0.0.1:5000"
    assert ref.repository == "team/x"
    assert (ref.tag, ref.digest) == ("1", SHA)
    assert ref.is_digest
    assert ref.pull_ref == f"127.0.0.1:5000/team/x@{SHA}"
    assert ref.api_host == "127.0.0.1:5000"
    assert ref.familiar() == f"127.0.0.1:5000/team/x:1@{SHA}"
    assert str(ref) == f"127.0.0.1:5000/team/x:1@{SHA}"
    untagged = parse(f"127.0.0.1:5000/x@{SHA}")
    assert untagged.tag is None
    assert untagged.familiar() == f"127.0.0.1:5000/x@{SHA}"
    assert parse(f"a@{SHA}").familiar() == f"a@{SHA}"


def test_familiar_keeps_registry_when_path_would_read_as_one() -> None:
    assert parse("docker.io/my.org/app:1").familiar() == "docker.io/my.org/app:1"
    assert parse("docker.io/localhost/app").familiar() == "docker.io/localhost/app:latest"
    assert parse("docker.io/library/my.app").familiar() == "my.app:latest"


def test_references_are_hashable_and_cached() -> None:
    assert parse("nginx") is parse("nginx")
    assert len({parse("nginx"), parse("docker.io/library/nginx:latest")}) == 1


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("docker.io", DOCKER_HUB),
        ("index.docker.io", DOCKER_HUB),
        ("registry-1.docker.io", DOCKER_HUB),
        ("registry.hub.docker.com", DOCKER_HUB),
        ("Registry-1.Docker.IO", DOCKER_HUB),
        ("https://index.docker.io/v1/", DOCKER_HUB),
        ("http://localhost:5000", "localhost:5000"),
        ("GCR.io", "gcr.io"),
        ("127.0.0.1:5000", "127.0.0.1:5000"),
        ("[FE80::1]:5000", "[fe80::1]:5000"),
        ("docker.io:443", "docker.io:443"),
        (" quay.io ", "quay.io"),
    ],
)
def test_canonical_registry(host: str, expected: str) -> None:
    assert canonical_registry(host) == expected


# --- properties -------------------------------------------------------------------------

_ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"
_alnum = st.text(alphabet=_ALNUM, min_size=1, max_size=8)
_separator = st.sampled_from([".", "_", "__", "-", "--", "---"])


@st.composite
def _component(draw: st.DrawFn, allow_dot: bool = True) -> str:
    text = draw(_alnum)
    for _ in range(draw(st.integers(0, 2))):
        sep = draw(_separator)
        if sep == "." and not allow_dot:
            sep = "_"
        text += sep + draw(_alnum)
    return text


_port = st.integers(0, 65535).map(lambda port: f":{port}")
_registry = st.one_of(
    st.none(),
    st.sampled_from(
        [
            "docker.io",
            "index.docker.io",
            "registry-1.docker.io",
            "registry.hub.docker.com",
            "localhost",
            "localhost:5000",
            "[::1]:5000",
            "[fe80::a:B]",
            "127.0.0.1:5000",
        ]
    ),
    st.builds(
        lambda parts, tld, port: ".".join([*parts, tld]) + port,
        st.lists(_alnum, min_size=1, max_size=3),
        st.sampled_from(["io", "com", "Example", "x-y"]),
        st.one_of(st.just(""), _port),
    ),
)
_tag = st.one_of(
    st.none(),
    st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True),
    st.just("t" * 128),
)
_hex = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64)
_digest = st.one_of(
    st.none(),
    _hex.map(lambda h: f"sha256:{h}"),
    _hex.map(lambda h: f"sha512:{h}{h}"),
    st.text(alphabet="0123456789abcdefABCDEF", min_size=32, max_size=70).map(
        lambda h: f"tarsum.v1+sha256:{h}"
    ),
)


@st.composite
def _parts(draw: st.DrawFn) -> tuple[str | None, str, str | None, str | None]:
    registry = draw(_registry)
    first = draw(_component(allow_dot=registry is not None))
    rest = draw(st.lists(_component(), max_size=3))
    path = "/".join([first, *rest])
    return registry, path, draw(_tag), draw(_digest)


def _join(registry: str | None, path: str, tag: str | None, digest: str | None) -> str:
    text = f"{registry}/{path}" if registry is not None else path
    if tag is not None:
        text += f":{tag}"
    if digest is not None:
        text += f"@{digest}"
    return text


@given(_parts())
@example((None, "nginx", None, None))
@example(("docker.io", "my.org/app", "1", None))
def test_valid_references_round_trip(parts: tuple[str | None, str, str | None, str | None]) -> None:
    registry, path, tag, digest = parts
    text = _join(registry, path, tag, digest)
    ref = parse(text)

    expected_registry = DOCKER_HUB if registry is None else canonical_registry(registry)
    expected_path = path
    if expected_registry == DOCKER_HUB and "/" not in path:
        expected_path = "library/" + path
    assert ref.registry == expected_registry
    assert ref.repository == expected_path
    assert ref.digest == digest
    assert ref.tag == (tag if tag is not None or digest is not None else "latest")

    assert parse(str(ref)) == ref
    assert normalize(normalize(text)) == normalize(text)
    assert parse(ref.familiar()) == ref
    assert normalize(ref.familiar()) == normalize(text)
    assert parse(ref.pull_ref).name == ref.name


_JUNK = " \t\n\r\v\f\u00a0\u2028;|&$`()<>'\"\\*?!{}#~%^=,"


@given(_parts(), st.data())
def test_junk_characters_are_rejected(
    parts: tuple[str | None, str, str | None, str | None], data: st.DataObject
) -> None:
    registry, path, tag, digest = parts
    junk = data.draw(st.sampled_from(_JUNK), label="junk")
    text = _join(registry, path, tag, digest)
    at = data.draw(st.integers(0, len(text)), label="position")
    with pytest.raises(InvalidReference):
        parse(text[:at] + junk + text[at:])


@given(_parts(), st.data())
def test_upper_case_in_repository_path_is_rejected(
    parts: tuple[str | None, str, str | None, str | None], data: st.DataObject
) -> None:
    registry, path, tag, digest = parts
    upper = data.draw(st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZ"), label="upper")
    at = data.draw(st.integers(0, len(path)), label="position")
    text = _join(registry, path[:at] + upper + path[at:], tag, digest)
    with pytest.raises(InvalidReference, match="must be lowercase"):
        parse(text)


def _parses_or_says_why(text: str) -> None:
    try:
        ref = parse(text)
    except InvalidReference as err:
        assert err.reference == text
        assert err.reason
        return
    assert parse(str(ref)) == ref
    assert parse(ref.familiar()) == ref


@given(st.text())
def test_arbitrary_text_only_raises_invalid_reference(text: str) -> None:
    _parses_or_says_why(text)


@settings(max_examples=300)
@given(st.text(alphabet="ab19Z.-_/:@[]+", max_size=30))
def test_structural_noise_only_raises_invalid_reference(text: str) -> None:
    _parses_or_says_why(text)
