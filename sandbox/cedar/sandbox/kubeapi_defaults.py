"""Pure: the defaults the real API server fills into workloads on every write.

Only those a client of the sandbox reads back: a Deployment's replicas, strategy, revision
history limit and progress deadline (pkg/apis/apps/v1/defaults.go SetDefaults_Deployment),
a ReplicaSet's and a StatefulSet's replicas, and in every pod template the PodSpec and
Container defaults of pkg/apis/core/v1/defaults.go (restartPolicy, dnsPolicy, schedulerName,
terminationGracePeriodSeconds, securityContext; per container imagePullPolicy,
terminationMessagePath and -Policy, a port's protocol). `kubectl describe` dereferences
some of them, and Cedar reads `imagePullPolicy`. No I/O.
"""

from __future__ import annotations

import re
from typing import Any

from cedar.sandbox.kubeapi_ops import JsonObj, ResourceType

_REFERENCE = re.compile(r"^[a-z0-9][a-z0-9._\-/:@]*$")


def pull_policy_for(image: Any) -> str:
    """SetDefaults_Container: `Always` for the `latest` tag (also when no tag is given),
    `IfNotPresent` for any other tag, a digest, or a reference that does not parse."""
    if not isinstance(image, str) or not _REFERENCE.match(image) or "@" in image:
        return "IfNotPresent"
    last = image.rsplit("/", 1)[-1]
    tag = last.split(":", 1)[1] if ":" in last else "latest"
    return "Always" if tag == "latest" else "IfNotPresent"


def _container(container: Any) -> None:
    if not isinstance(container, dict):
        return
    if not container.get("imagePullPolicy"):
        container["imagePullPolicy"] = pull_policy_for(container.get("image"))
    container.setdefault("terminationMessagePath", "/dev/termination-log")
    container.setdefault("terminationMessagePolicy", "File")
    container.setdefault("resources", {})
    for port in container.get("ports") or []:
        if isinstance(port, dict):
            port.setdefault("protocol", "TCP")


def _pod_template(template: Any, *, job: bool) -> None:
    if not isinstance(template, dict):
        return
    spec = template.get("spec")
    if not isinstance(spec, dict):
        return
    if not job:
        spec.setdefault("restartPolicy", "Always")  # a Job's must be given (validation)
    spec.setdefault("dnsPolicy", "ClusterFirst")
    spec.setdefault("schedulerName", "default-scheduler")
    spec.setdefault("terminationGracePeriodSeconds", 30)
    spec.setdefault("securityContext", {})
    for field in ("initContainers", "containers"):
        entries = spec.get(field)
        if isinstance(entries, list):
            for container in entries:
                _container(container)


def apply_defaults(res: ResourceType, obj: JsonObj) -> None:
    """Fill the defaults of `res` into `obj` in place (its spec, when there is one)."""
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return
    kind = res.kind
    if kind in ("Deployment", "ReplicaSet", "StatefulSet") and spec.get("replicas") is None:
        spec["replicas"] = 1
    if kind == "Deployment":
        strategy = spec.setdefault("strategy", {})
        if isinstance(strategy, dict):
            strategy.setdefault("type", "RollingUpdate")
            if strategy["type"] == "RollingUpdate":
                rolling = strategy.setdefault("rollingUpdate", {})
                if isinstance(rolling, dict):
                    rolling.setdefault("maxUnavailable", "25%")
                    rolling.setdefault("maxSurge", "25%")
        spec.setdefault("revisionHistoryLimit", 10)
        spec.setdefault("progressDeadlineSeconds", 600)
    if kind in ("Deployment", "ReplicaSet", "DaemonSet", "StatefulSet"):
        _pod_template(spec.get("template"), job=False)
    elif kind == "Job":
        _pod_template(spec.get("template"), job=True)
    elif kind == "CronJob":
        job_spec = (spec.get("jobTemplate") or {}).get("spec")
        if isinstance(job_spec, dict):
            _pod_template(job_spec.get("template"), job=True)
