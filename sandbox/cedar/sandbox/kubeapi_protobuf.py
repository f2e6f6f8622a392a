"""Pure: decoding the protobuf bodies kubectl sends, into the JSON the real server would store.

kubectl's typed clients (`kubectl create namespace`, `kubectl create deployment`) send
`application/vnd.kubernetes.protobuf`: the 4 bytes `k8s\\0`, then a runtime.Unknown
(typeMeta, raw, contentEncoding, contentType; staging/src/k8s.io/apimachinery/pkg/runtime/
serializer/protobuf/protobuf.go) whose `raw` is the object in the field numbering of the
API's generated.proto files (staging/src/k8s.io/api/core/v1, apps/v1;
staging/src/k8s.io/apimachinery/pkg/apis/meta/v1). Go's generated marshallers write every
non-pointer field, empty or not; the JSON the server returns omits the empty ones
(`omitempty`) and keeps a pointer's zero (`replicas: 0`), and so does this decoder.

Only the kinds and fields those two commands send are known here. A body of another kind,
or one with a non-empty field this decoder does not know, is refused with a 415 that says
so, never decoded into something else. No I/O.
"""

from __future__ import annotations

from typing import Any

from cedar.sandbox.errors import ApiError

MAGIC = b"k8s\x00"
PROTOBUF = "application/vnd.kubernetes.protobuf"

# A schema: field number -> (JSON name, kind, sub-schema). Kinds: "str", "int" (omitted when
# 0), "int!" (a pointer: kept when 0), "bool", "msg" (a struct: kept when empty), "msg?" (a
# pointer), "strs" (repeated string), "msgs" (repeated message), "map" (string to string),
# "time" (metav1.Time), "intstr" (IntOrString).
Schema = dict[int, tuple[str, str, Any]]

_OWNER: Schema = {
    1: ("kind", "str", None),
    3: ("name", "str", None),
    4: ("uid", "str", None),
    5: ("apiVersion", "str", None),
    6: ("controller", "bool!", None),
    7: ("blockOwnerDeletion", "bool!", None),
}
_META: Schema = {
    1: ("name", "str", None),
    2: ("generateName", "str", None),
    3: ("namespace", "str", None),
    5: ("uid", "str", None),
    6: ("resourceVersion", "str", None),
    7: ("generation", "int", None),
    8: ("creationTimestamp", "time", None),
    11: ("labels", "map", None),
    12: ("annotations", "map", None),
    13: ("ownerReferences", "msgs", _OWNER),
    14: ("finalizers", "strs", None),
}
_REQUIREMENT: Schema = {
    1: ("key", "str", None),
    2: ("operator", "str", None),
    3: ("values", "strs", None),
}
_SELECTOR: Schema = {1: ("matchLabels", "map", None), 2: ("matchExpressions", "msgs", _REQUIREMENT)}
_PORT: Schema = {
    1: ("name", "str", None),
    2: ("hostPort", "int", None),
    3: ("containerPort", "int", None),
    4: ("protocol", "str", None),
    5: ("hostIP", "str", None),
}
_ENV: Schema = {1: ("name", "str", None), 2: ("value", "str", None)}
_RESOURCES: Schema = {}
_CONTAINER: Schema = {
    1: ("name", "str", None),
    2: ("image", "str", None),
    3: ("command", "strs", None),
    4: ("args", "strs", None),
    5: ("workingDir", "str", None),
    6: ("ports", "msgs", _PORT),
    7: ("env", "msgs", _ENV),
    8: ("resources", "msg", _RESOURCES),
    13: ("terminationMessagePath", "str", None),
    14: ("imagePullPolicy", "str", None),
    16: ("stdin", "bool", None),
    17: ("stdinOnce", "bool", None),
    18: ("tty", "bool", None),
    20: ("terminationMessagePolicy", "str", None),
}
_POD_SPEC: Schema = {
    2: ("containers", "msgs", _CONTAINER),
    3: ("restartPolicy", "str", None),
    4: ("terminationGracePeriodSeconds", "int!", None),
    6: ("dnsPolicy", "str", None),
    7: ("nodeSelector", "map", None),
    8: ("serviceAccountName", "str", None),
    9: ("serviceAccount", "str", None),
    10: ("nodeName", "str", None),
    11: ("hostNetwork", "bool", None),
    12: ("hostPID", "bool", None),
    13: ("hostIPC", "bool", None),
    16: ("hostname", "str", None),
    17: ("subdomain", "str", None),
    19: ("schedulerName", "str", None),
    20: ("initContainers", "msgs", _CONTAINER),
    24: ("priorityClassName", "str", None),
}
_TEMPLATE: Schema = {1: ("metadata", "msg", _META), 2: ("spec", "msg", _POD_SPEC)}
_ROLLING: Schema = {1: ("maxUnavailable", "intstr", None), 2: ("maxSurge", "intstr", None)}
_STRATEGY: Schema = {1: ("type", "str", None), 2: ("rollingUpdate", "msg?", _ROLLING)}
_DEPLOYMENT_SPEC: Schema = {
    1: ("replicas", "int!", None),
    2: ("selector", "msg?", _SELECTOR),
    3: ("template", "msg", _TEMPLATE),
    4: ("strategy", "msg", _STRATEGY),
    5: ("minReadySeconds", "int", None),
    6: ("revisionHistoryLimit", "int!", None),
    7: ("paused", "bool", None),
    9: ("progressDeadlineSeconds", "int!", None),
}
_IGNORED: Schema = {}  # a status: the server drops what a client sends on create
_NAMESPACE: Schema = {
    1: ("metadata", "msg", _META),
    2: ("spec", "msg", {1: ("finalizers", "strs", None)}),
    3: ("status", "ignore", None),
}
_DEPLOYMENT: Schema = {
    1: ("metadata", "msg", _META),
    2: ("spec", "msg", _DEPLOYMENT_SPEC),
    3: ("status", "ignore", None),
}
KINDS: dict[tuple[str, str], Schema] = {
    ("v1", "Namespace"): _NAMESPACE,
    ("apps/v1", "Deployment"): _DEPLOYMENT,
}


def _unsupported(message: str) -> ApiError:
    return ApiError(
        415,
        "UnsupportedMediaType",
        f"the sandbox's simulated API cannot decode this protobuf body: {message}; "
        "send JSON instead (e.g. kubectl create -f FILE)",
    )


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise _unsupported("a truncated varint")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return value, pos


def fields(data: bytes) -> list[tuple[int, int, int | bytes]]:
    """The (field number, wire type, value) of one message, in order."""
    found: list[tuple[int, int, int | bytes]] = []
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        value: int | bytes
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise _unsupported("a truncated field")
            value, pos = data[pos : pos + length], pos + length
        elif wire in (1, 5):
            size = 8 if wire == 1 else 4
            value, pos = int.from_bytes(data[pos : pos + size], "little"), pos + size
        else:
            raise _unsupported(f"wire type {wire}")
        found.append((number, wire, value))
    return found


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _text(value: int | bytes) -> str:
    if not isinstance(value, bytes):
        raise _unsupported("a string field that is not length-delimited")
    return value.decode("utf-8")


def _time(value: bytes) -> str | None:
    import datetime

    seconds = 0
    for number, _, item in fields(value):
        if number == 1 and isinstance(item, int):
            seconds = _signed(item)
    if not seconds:
        return None
    stamp = datetime.datetime.fromtimestamp(seconds, datetime.UTC)
    return stamp.strftime("%Y-%m-%dT%H:%M:%SZ")


def _intstr(value: bytes) -> int | str:
    kind, number_value, text = 0, 0, ""
    for number, _, item in fields(value):
        if number == 1 and isinstance(item, int):
            kind = item
        elif number == 2 and isinstance(item, int):
            number_value = _signed(item)
        elif number == 3:
            text = _text(item)
    return text if kind == 1 else number_value


def decode_message(data: bytes, schema: Schema, where: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for number, _wire, value in fields(data):
        known = schema.get(number)
        if known is None:
            if value in (0, b""):
                continue  # an empty field Go always writes; the JSON would omit it
            raise _unsupported(f"field {number} of {where} is not known to the sandbox")
        name, kind, sub = known
        path = f"{where}.{name}"
        if kind == "ignore":
            continue
        if kind in ("int", "int!"):
            assert isinstance(value, int)
            if value or kind == "int!":
                out[name] = _signed(value)
        elif kind in ("bool", "bool!"):
            if value or kind == "bool!":
                out[name] = bool(value)
        elif kind == "str":
            if text := _text(value):
                out[name] = text
        elif kind == "strs":
            out.setdefault(name, []).append(_text(value))
        elif kind == "map":
            entry = {n: _text(v) for n, _, v in fields(_bytes(value))}
            out.setdefault(name, {})[entry.get(1, "")] = entry.get(2, "")
        elif kind == "time":
            if stamp := _time(_bytes(value)):
                out[name] = stamp
        elif kind == "intstr":
            out[name] = _intstr(_bytes(value))
        elif kind in ("msg", "msg?"):
            out[name] = decode_message(_bytes(value), sub, path)
        elif kind == "msgs":
            out.setdefault(name, []).append(decode_message(_bytes(value), sub, path))
    return out


def _bytes(value: int | bytes) -> bytes:
    if not isinstance(value, bytes):
        raise _unsupported("a message field that is not length-delimited")
    return value


def decode(body: bytes) -> dict[str, Any]:
    """The JSON object of a protobuf request body (see the module's docstring)."""
    if not body.startswith(MAGIC):
        raise _unsupported("it does not start with the k8s protobuf envelope")
    api_version = kind = ""
    raw = b""
    for number, _, value in fields(body[len(MAGIC) :]):
        if number == 1:
            for n, _, v in fields(_bytes(value)):
                if n == 1:
                    api_version = _text(v)
                elif n == 2:
                    kind = _text(v)
        elif number == 2:
            raw = _bytes(value)
        elif number == 3 and value:
            raise _unsupported(f"content encoding {_text(value)!r}")
    schema = KINDS.get((api_version, kind))
    if schema is None:
        known = ", ".join(k for _, k in KINDS)
        raise _unsupported(f"{api_version} {kind} (protobuf is decoded for {known} only)")
    obj = decode_message(raw, schema, kind)
    return {"apiVersion": api_version, "kind": kind, **obj}
