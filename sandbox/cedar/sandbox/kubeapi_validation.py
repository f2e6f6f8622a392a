"""Pure: the real API server's validation of what Cedar writes, with its `422 Invalid` body.

What kube-apiserver checks on every create and update of the fields Cedar and its tests
write, and nothing it does not:

- labels: keys are qualified names (`[prefix/]name`, the prefix a DNS subdomain), values
  are at most 63 characters of `[A-Za-z0-9._-]`, starting and ending alphanumeric
  (staging/src/k8s.io/apimachinery/pkg/apis/meta/v1/validation/validation.go ValidateLabels,
  staging/src/k8s.io/apimachinery/pkg/util/validation/validation.go);
- annotations: keys are qualified names (case does not matter), keys and values together at
  most 256 KiB (staging/src/k8s.io/apimachinery/pkg/api/validation/objectmeta.go);
- core/v1 Events: the namespace rule of legacyValidateEvent, and for events.k8s.io/v1 the
  required fields of ValidateEventCreate (pkg/apis/core/validation/events.go).

Errors come out as the apimachinery `NewInvalid` Status: `<Kind> "<name>" is invalid: <field>:
<detail>` with one cause per field error (staging/src/k8s.io/apimachinery/pkg/api/errors/
errors.go, .../util/validation/field/errors.go). No I/O.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from cedar.sandbox.errors import ApiError

JsonObj = dict[str, Any]

TOTAL_ANNOTATION_SIZE_LIMIT = 256 * 1024
_LABEL_VALUE_MAX = 63
_QUALIFIED_NAME_MAX = 63
_DNS1123_SUBDOMAIN_MAX = 253

_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
_DNS1123_SUBDOMAIN = re.compile(
    r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)

_QUALIFIED_FMT = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
_QUALIFIED_MSG = (
    "name part must consist of alphanumeric characters, '-', '_' or '.', and must start and "
    "end with an alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', "
    f"regex used for validation is '{_QUALIFIED_FMT}')"
)
_LABEL_VALUE_MSG = (
    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or "
    "'.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or "
    "'my_value',  or '12345', regex used for validation is '(" + _QUALIFIED_FMT + ")?')"
)
_SUBDOMAIN_MSG = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' "
    "or '.', and must start and end with an alphanumeric character (e.g. 'example.com', regex "
    "used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)


@dataclass(frozen=True)
class FieldError:
    """One field error: `type` is the apimachinery ErrorType (FieldValueInvalid, ...)."""

    type: str
    field: str
    value: Any
    detail: str

    def body(self) -> str:
        """`ErrorBody()`: the message without the field name."""
        words = {
            "FieldValueInvalid": "Invalid value",
            "FieldValueRequired": "Required value",
            "FieldValueTooLong": "Too long",
            "FieldValueForbidden": "Forbidden",
        }[self.type]
        if self.type in ("FieldValueRequired", "FieldValueTooLong", "FieldValueForbidden"):
            text = words
        elif isinstance(self.value, str):
            text = f"{words}: {json.dumps(self.value)}"
        else:
            text = f"{words}: {self.value}"
        return f"{text}: {self.detail}" if self.detail else text

    def __str__(self) -> str:
        return f"{self.field}: {self.body()}"


def invalid(kind: str, group: str, name: str, errors: list[FieldError]) -> ApiError:
    """The `422 Invalid` Status the real server answers for `errors` (at least one)."""
    unique: list[FieldError] = []
    for error in errors:
        if str(error) not in {str(e) for e in unique}:
            unique.append(error)
    joined = ", ".join(str(e) for e in unique)
    aggregate = joined if len(unique) == 1 else f"[{joined}]"
    qualified = f"{kind}.{group}" if group else kind
    return ApiError(
        422,
        "Invalid",
        f"{qualified} {json.dumps(name)} is invalid: {aggregate}",
        {
            "name": name,
            "group": group,
            "kind": kind,
            "causes": [{"reason": e.type, "message": e.body(), "field": e.field} for e in unique],
        },
    )


# ---------------------------------------------------------------- names


def qualified_name_errors(value: str) -> list[str]:
    """`IsQualifiedName`: the messages for a bad `[prefix/]name`, empty when it is good."""
    parts = value.split("/")
    if len(parts) == 1:
        name = parts[0]
    elif len(parts) == 2:
        prefix, name = parts
        if not prefix:
            return ["prefix part must be non-empty"]
        problems = [f"prefix part {m}" for m in dns1123_subdomain_errors(prefix)]
        if problems:
            return problems
    else:
        return [
            "a qualified name "
            + _QUALIFIED_MSG.replace("name part must", "must", 1)
            + " with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')"
        ]
    if not name:
        return ["name part must be non-empty"]
    if len(name) > _QUALIFIED_NAME_MAX:
        return [f"name part must be no more than {_QUALIFIED_NAME_MAX} characters"]
    if not _QUALIFIED_NAME.match(name):
        return [_QUALIFIED_MSG]
    return []


def dns1123_subdomain_errors(value: str) -> list[str]:
    problems = []
    if len(value) > _DNS1123_SUBDOMAIN_MAX:
        problems.append(f"must be no more than {_DNS1123_SUBDOMAIN_MAX} characters")
    if not _DNS1123_SUBDOMAIN.match(value):
        problems.append(_SUBDOMAIN_MSG)
    return problems


def label_value_errors(value: str) -> list[str]:
    problems = []
    if len(value) > _LABEL_VALUE_MAX:
        problems.append(f"must be no more than {_LABEL_VALUE_MAX} characters")
    if not _LABEL_VALUE.match(value):
        problems.append(_LABEL_VALUE_MSG)
    return problems


# ---------------------------------------------------------------- metadata


def metadata_errors(meta: JsonObj) -> list[FieldError]:
    """Label and annotation errors of one object's metadata (create and update alike)."""
    errors: list[FieldError] = []
    labels = meta.get("labels")
    if labels is not None and not isinstance(labels, dict):
        errors.append(FieldError("FieldValueInvalid", "metadata.labels", labels, "not a map"))
        labels = None
    for key, value in (labels or {}).items():
        for msg in qualified_name_errors(str(key)):
            errors.append(FieldError("FieldValueInvalid", "metadata.labels", key, msg))
        if not isinstance(value, str):
            errors.append(
                FieldError("FieldValueInvalid", "metadata.labels", value, "must be a string")
            )
            continue
        for msg in label_value_errors(value):
            errors.append(FieldError("FieldValueInvalid", "metadata.labels", value, msg))
    annotations = meta.get("annotations")
    if annotations is not None and not isinstance(annotations, dict):
        errors.append(
            FieldError("FieldValueInvalid", "metadata.annotations", annotations, "not a map")
        )
        annotations = None
    total = 0
    for key, value in (annotations or {}).items():
        for msg in qualified_name_errors(str(key).lower()):
            errors.append(FieldError("FieldValueInvalid", "metadata.annotations", key, msg))
        if not isinstance(value, str):
            errors.append(
                FieldError("FieldValueInvalid", "metadata.annotations", value, "must be a string")
            )
            continue
        total += len(str(key).encode()) + len(value.encode())
    if total > TOTAL_ANNOTATION_SIZE_LIMIT:
        errors.append(
            FieldError(
                "FieldValueTooLong",
                "metadata.annotations",
                "",
                f"must have at most {TOTAL_ANNOTATION_SIZE_LIMIT} bytes",
            )
        )
    return errors


# ---------------------------------------------------------------- events


def event_errors(api_version: str, event: JsonObj) -> list[FieldError]:
    """Errors of an Event on create (pkg/apis/core/validation/events.go).

    core/v1 Events get the legacy rule only; events.k8s.io/v1 ones the strict one too. An
    events.k8s.io/v1 `regarding` is the core `involvedObject`, its `note` the `message`.
    """
    namespace = (event.get("metadata") or {}).get("namespace") or ""
    strict = api_version == "events.k8s.io/v1"
    involved = event.get("regarding" if strict else "involvedObject") or {}
    involved_ns = involved.get("namespace") or "" if isinstance(involved, dict) else ""
    path = "involvedObject.namespace"  # the internal field's name, for both versions
    errors: list[FieldError] = []
    mismatch = FieldError("FieldValueInvalid", path, involved_ns, "does not match event.namespace")
    if not event.get("eventTime"):
        if not involved_ns:
            if namespace not in ("", "default"):
                errors.append(mismatch)
        elif namespace != involved_ns:
            errors.append(mismatch)
    else:
        if not involved_ns and namespace not in ("default", "kube-system"):
            errors.append(mismatch)
        controller = event.get("reportingController") or ""
        if not controller:
            errors.append(FieldError("FieldValueRequired", "reportingController", "", ""))
        for msg in qualified_name_errors(controller) if controller else []:
            errors.append(FieldError("FieldValueInvalid", "reportingController", controller, msg))
        instance = event.get("reportingInstance") or ""
        if not instance:
            errors.append(FieldError("FieldValueRequired", "reportingInstance", "", ""))
        elif len(instance) > 128:
            errors.append(
                FieldError(
                    "FieldValueInvalid", "reportingInstance", "", "can have at most 128 characters"
                )
            )
        action = event.get("action") or ""
        if not action:
            errors.append(FieldError("FieldValueRequired", "action", "", ""))
        elif len(action) > 128:
            errors.append(
                FieldError("FieldValueInvalid", "action", "", "can have at most 128 characters")
            )
        reason = event.get("reason") or ""
        if not reason:
            errors.append(FieldError("FieldValueRequired", "reason", "", ""))
        elif len(reason) > 128:
            errors.append(
                FieldError("FieldValueInvalid", "reason", "", "can have at most 128 characters")
            )
        message = event.get("note" if strict else "message") or ""
        if len(message) > 1024:
            errors.append(
                FieldError("FieldValueInvalid", "message", "", "can have at most 1024 characters")
            )
    if strict and not event.get("eventTime"):
        errors.append(FieldError("FieldValueRequired", "eventTime", "", ""))
    if strict and event.get("type") not in ("Normal", "Warning"):
        errors.append(
            FieldError("FieldValueInvalid", "type", "", f"has invalid value: {event.get('type')}")
        )
    return errors
