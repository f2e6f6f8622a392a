"""One table of pods and namespaces for every form of the pod-level admission decision.

`cedar.mcs_allocator.podlevel.decide_pod` (the webhook's), the CEL of the admission
policies in deploy/mcs-allocator/ (tests/unit/test_mcs_admission_cel.py) and the webhook
over TLS (tests/integration/test_mcs_webhook.py) all run these cases and must agree with
each other and with the expectations here. The tests in this file check the pure function.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import pytest

from cedar.mcs_allocator.podlevel import (
    NamespaceLevel,
    PodRules,
    decide_pod,
    describe,
    level_patch,
    mismatch,
    pod_levels,
)
from cedar.mcs_allocator.settings import DEFAULT_EXCLUDE, AllocatorSettings
from cedar.sandbox.kubeapi_ops import json_patch

ANNOTATION = "cedar.io/selinux-level"
LEVEL = "s0:c1,c2"
OTHER = "s0:c1,c3"
EXCLUDED = frozenset({*DEFAULT_EXCLUDE, "cedar-system"})


def namespace(name: str, level: str | None = None, **labels: str) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "uid": f"uid-{name}"}
    if level is not None:
        meta["annotations"] = {ANNOTATION: level, "team": "x"}
    meta["labels"] = {"kubernetes.io/metadata.name": name, **labels}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta}


NAMESPACES = {
    "tenant-a": namespace("tenant-a", LEVEL),
    "tenant-new": namespace("tenant-new"),
    "kube-system": namespace("kube-system"),
    "default": namespace("default", "s0:c7,c8"),
    "cedar-system": namespace("cedar-system"),
}


def container(name: str = "app", **security: Any) -> dict[str, Any]:
    c: dict[str, Any] = {"name": name, "image": "registry.example/app:1"}
    if security:
        c["securityContext"] = security
    return c


def pod(
    ns: str = "tenant-a",
    *,
    context: dict[str, Any] | None = None,
    containers: list[dict[str, Any]] | None = None,
    init: list[dict[str, Any]] | None = None,
    ephemeral: list[dict[str, Any]] | None = None,
    os: str | None = None,
) -> dict[str, Any]:
    spec: dict[str, Any] = {"containers": containers or [container()]}
    if context is not None:
        spec["securityContext"] = context
    if init is not None:
        spec["initContainers"] = init
    if ephemeral is not None:
        spec["ephemeralContainers"] = ephemeral
    if os is not None:
        spec["os"] = {"name": os}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p", "namespace": ns, "uid": "pod-uid", "labels": {"app": "x"}},
        "spec": spec,
    }


def sel(**options: str) -> dict[str, Any]:
    return {"seLinuxOptions": dict(options)}


def debug(**security: Any) -> dict[str, Any]:
    return {
        "name": "debug",
        "image": "busybox",
        "targetContainerName": "app",
        **({"securityContext": security} if security else {}),
    }


@dataclass(frozen=True)
class Case:
    id: str
    pod: dict[str, Any]
    allowed: bool
    rule: str
    set_level: str | None = None
    # UPDATE of pods/ephemeralcontainers: `pod` is the new object, `old` the pod before.
    old: dict[str, Any] | None = None
    contains: tuple[str, ...] = field(default_factory=tuple)

    @property
    def namespace(self) -> str:
        return str(self.pod["metadata"]["namespace"])

    @property
    def operation(self) -> str:
        return "CREATE" if self.old is None else "UPDATE"


def ephemeral_update(
    base: dict[str, Any], new_debug: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    old = copy.deepcopy(base)
    new = copy.deepcopy(base)
    new["spec"]["ephemeralContainers"] = [new_debug]
    return new, old


RUNNING = pod(context=sel(level=LEVEL))
OLD_POD = pod()  # created before the policies: no level
EPH_BAD, EPH_BAD_OLD = ephemeral_update(RUNNING, debug(seLinuxOptions={"level": OTHER}))
EPH_OK, EPH_OK_OLD = ephemeral_update(RUNNING, debug())
EPH_ON_OLD, EPH_ON_OLD_OLD = ephemeral_update(OLD_POD, debug())
EPH_PRIV, EPH_PRIV_OLD = ephemeral_update(RUNNING, debug(privileged=True))

REQUIRES = f"namespace tenant-a requires level {LEVEL}"

CASES = [
    Case("plain pod gets the level", pod(), True, "mutated", LEVEL),
    Case(
        "a securityContext without seLinuxOptions gets it",
        pod(context={"runAsNonRoot": True}),
        True,
        "mutated",
        LEVEL,
    ),
    Case(
        "seLinuxOptions with a type only: the level is added, the type kept",
        pod(context=sel(type="container_t")),
        True,
        "mutated",
        LEVEL,
    ),
    Case("an empty level counts as absent", pod(context=sel(level="")), True, "mutated", LEVEL),
    Case("the namespace's own level", pod(context=sel(level=LEVEL)), True, "admitted"),
    Case(
        "another pod-level level is refused, not corrected",
        pod(context=sel(level=OTHER)),
        False,
        "pod-level",
        contains=(OTHER, REQUIRES),
    ),
    Case(
        "one container with another level",
        pod(containers=[container("web"), container("side", seLinuxOptions={"level": OTHER})]),
        False,
        "container-level",
        contains=("container side", OTHER, REQUIRES),
    ),
    Case(
        "a container repeating the namespace's level",
        pod(containers=[container("web", seLinuxOptions={"level": LEVEL})]),
        True,
        "mutated",
        LEVEL,
    ),
    Case(
        "an init container with another level",
        pod(init=[container("setup", seLinuxOptions={"level": OTHER})]),
        False,
        "container-level",
        contains=("init container setup", OTHER, REQUIRES),
    ),
    Case(
        "an ephemeral container with another level",
        EPH_BAD,
        False,
        "container-level",
        old=EPH_BAD_OLD,
        contains=("ephemeral container debug", OTHER, REQUIRES),
    ),
    Case("an ephemeral container at the pod's level", EPH_OK, True, "admitted", old=EPH_OK_OLD),
    Case(
        "an ephemeral container on a pod from before the policies",
        EPH_ON_OLD,
        False,
        "pod-level",
        old=EPH_ON_OLD_OLD,
        contains=("has no spec.securityContext.seLinuxOptions.level", REQUIRES),
    ),
    Case(
        "a privileged ephemeral container",
        EPH_PRIV,
        False,
        "privileged",
        old=EPH_PRIV_OLD,
        contains=("ephemeral container debug is privileged", REQUIRES),
    ),
    Case(
        "spc_t at pod level",
        pod(context=sel(type="spc_t")),
        False,
        "pod-type",
        contains=("spc_t", REQUIRES),
    ),
    Case(
        "unconfined_t in a container",
        pod(containers=[container("web", seLinuxOptions={"type": "unconfined_t"})]),
        False,
        "container-type",
        contains=("container web", "unconfined_t", REQUIRES),
    ),
    Case(
        "container_t in a container",
        pod(containers=[container("web", seLinuxOptions={"type": "container_t"})]),
        True,
        "mutated",
        LEVEL,
    ),
    Case(
        "a privileged container",
        pod(containers=[container("web", privileged=True)]),
        False,
        "privileged",
        contains=("container web is privileged", "spc_t", REQUIRES),
    ),
    Case(
        "a privileged init container",
        pod(init=[container("setup", privileged=True)]),
        False,
        "privileged",
        contains=("init container setup is privileged", REQUIRES),
    ),
    Case(
        "privileged: false is fine",
        pod(containers=[container("web", privileged=False)]),
        True,
        "mutated",
        LEVEL,
    ),
    Case(
        "the level is checked before privileged",
        pod(context=sel(level=OTHER), containers=[container("web", privileged=True)]),
        False,
        "pod-level",
        contains=(OTHER, REQUIRES),
    ),
    Case(
        "no level yet: refused, saying it is being assigned",
        pod("tenant-new"),
        False,
        "no-level",
        contains=("tenant-new has no SELinux level yet", "assigning"),
    ),
    Case(
        "no level yet, whatever the pod asks for",
        pod("tenant-new", context=sel(level=OTHER)),
        False,
        "no-level",
        contains=("assigning",),
    ),
    Case("an excluded namespace is untouched", pod("kube-system"), True, "out-of-scope"),
    Case(
        "an excluded namespace with a level is untouched too",
        pod("default", context=sel(type="spc_t"), containers=[container(privileged=True)]),
        True,
        "out-of-scope",
    ),
    Case("Cedar's own namespace is untouched", pod("cedar-system"), True, "out-of-scope"),
    Case("a Windows pod is left alone", pod(os="windows"), True, "windows"),
]

RULES = PodRules(allowed_types=("container_t",))


def namespace_level(name: str) -> NamespaceLevel:
    meta = NAMESPACES[name]["metadata"]
    level = (meta.get("annotations") or {}).get(ANNOTATION, "")
    return NamespaceLevel(name, level, name not in EXCLUDED)


def decided(case: Case) -> Any:
    return decide_pod(case.pod, namespace_level(case.namespace), RULES, operation=case.operation)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_the_pure_decision(case: Case) -> None:
    decision = decided(case)
    assert (decision.allowed, decision.rule, decision.set_level) == (
        case.allowed,
        case.rule,
        case.set_level,
    )
    for text in case.contains:
        assert text in decision.message
    if not case.allowed and case.namespace == "tenant-a":
        assert LEVEL in decision.message, "every refusal names the expected level"


@pytest.mark.parametrize("case", [c for c in CASES if c.set_level], ids=lambda c: c.id)
def test_the_patch_sets_the_level_and_keeps_the_rest(case: Case) -> None:
    patched = json_patch(case.pod, level_patch(case.pod, LEVEL))
    assert patched["spec"]["securityContext"]["seLinuxOptions"]["level"] == LEVEL
    before = copy.deepcopy(case.pod)
    before.setdefault("spec", {}).setdefault("securityContext", {}).setdefault(
        "seLinuxOptions", {}
    )["level"] = LEVEL
    assert patched == before
    again = decide_pod(patched, namespace_level("tenant-a"), RULES)
    assert again.allowed and again.set_level is None


def test_the_table_covers_every_rule() -> None:
    from cedar.mcs_allocator.podlevel import RULES as ALL_RULES

    assert set(ALL_RULES) <= {c.rule for c in CASES}


def test_the_table_uses_the_settings_defaults() -> None:
    settings = AllocatorSettings()
    assert settings.mcs_annotation == ANNOTATION
    assert settings.excluded == EXCLUDED
    assert settings.allowed_types == RULES.allowed_types


def test_what_the_watchdog_keeps_and_finds() -> None:
    running = pod_levels(pod(context=sel(level=LEVEL)))
    assert running is not None and mismatch(running, LEVEL) is None
    assert mismatch(running, OTHER) == ("the pod", LEVEL)
    unset = pod_levels(pod())
    assert unset is not None and mismatch(unset, LEVEL) == ("the pod", "")
    assert "a pair the runtime chose" in describe("the pod", "")
    side = pod_levels(
        pod(context=sel(level=LEVEL), init=[container("setup", seLinuxOptions={"level": OTHER})])
    )
    assert side is not None and mismatch(side, LEVEL) == ("init container setup", OTHER)
    done = pod(context=sel(level=OTHER))
    done["status"] = {"phase": "Succeeded"}
    assert pod_levels(done) is None
    assert pod_levels(pod(os="windows")) is None
