"""Node matching: nodeSelector, required node affinity, taints and tolerations."""

from __future__ import annotations

import pytest

from cedar.proto.models import (
    NodeSelectorRequirement,
    NodeSelectorTerm,
    PodScheduling,
    Toleration,
)
from cedar.proto.scheduling import (
    NodeInfo,
    Taint,
    admits,
    node_from_object,
    parse_labels,
    parse_taints,
    static_node,
)

NODE = NodeInfo(
    name="node-1",
    labels={
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
        "disktype": "ssd",
        "cpus": "16",
    },
)


def req(key: str, op: str, *values: str) -> NodeSelectorRequirement:
    return NodeSelectorRequirement(key=key, operator=op, values=values)  # type: ignore[arg-type]


def affinity(*terms: tuple[NodeSelectorRequirement, ...]) -> PodScheduling:
    return PodScheduling(
        required_node_affinity=tuple(NodeSelectorTerm(match_expressions=t) for t in terms)
    )


def test_no_constraints_admit() -> None:
    assert admits(PodScheduling(), NODE)


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ({"disktype": "ssd"}, True),
        ({"disktype": "hdd"}, False),
        ({"kubernetes.io/arch": "arm64"}, False),
        ({"kubernetes.io/os": "linux", "kubernetes.io/arch": "amd64"}, True),
        ({"kubernetes.io/os": "windows"}, False),
        ({"missing": ""}, False),
    ],
)
def test_node_selector(selector: dict[str, str], expected: bool) -> None:
    assert admits(PodScheduling(node_selector=selector), NODE) is expected


@pytest.mark.parametrize(
    ("requirement", "expected"),
    [
        (req("disktype", "In", "ssd", "nvme"), True),
        (req("disktype", "In", "hdd"), False),
        (req("missing", "In", "x"), False),
        (req("disktype", "NotIn", "hdd"), True),
        (req("disktype", "NotIn", "ssd"), False),
        (req("missing", "NotIn", "x"), True),
        (req("disktype", "Exists"), True),
        (req("missing", "Exists"), False),
        (req("missing", "DoesNotExist"), True),
        (req("disktype", "DoesNotExist"), False),
        (req("cpus", "Gt", "8"), True),
        (req("cpus", "Gt", "16"), False),
        (req("cpus", "Lt", "32"), True),
        (req("cpus", "Lt", "4"), False),
        (req("disktype", "Gt", "1"), False),  # not an integer
        (req("missing", "Lt", "1"), False),
        (req("kubernetes.io/arch", "In", "arm64"), False),
    ],
)
def test_affinity_operators(requirement: NodeSelectorRequirement, expected: bool) -> None:
    assert admits(affinity((requirement,)), NODE) is expected


def test_terms_are_ored_and_expressions_anded() -> None:
    both = (req("disktype", "In", "ssd"), req("cpus", "Gt", "32"))
    assert not admits(affinity(both), NODE)
    assert admits(affinity(both, (req("disktype", "Exists"),)), NODE)


def test_empty_term_matches_nothing() -> None:
    scheduling = PodScheduling(required_node_affinity=(NodeSelectorTerm(),))
    assert not admits(scheduling, NODE)


def test_match_fields_node_name() -> None:
    term = NodeSelectorTerm(match_fields=(req("metadata.name", "In", "node-1"),))
    assert admits(PodScheduling(required_node_affinity=(term,)), NODE)
    other = NodeSelectorTerm(match_fields=(req("metadata.name", "In", "node-2"),))
    assert not admits(PodScheduling(required_node_affinity=(other,)), NODE)


TAINTED = NodeInfo(
    name="gpu-1",
    labels=dict(NODE.labels),
    taints=(Taint("gpu", "NoSchedule", "true"), Taint("soft", "PreferNoSchedule")),
)


@pytest.mark.parametrize(
    ("tolerations", "expected"),
    [
        ((), False),
        ((Toleration(key="gpu", operator="Equal", value="true", effect="NoSchedule"),), True),
        ((Toleration(key="gpu", operator="Equal", value="false"),), False),
        ((Toleration(key="gpu", operator="Exists"),), True),
        ((Toleration(key="gpu", operator="Exists", effect="NoExecute"),), False),
        ((Toleration(operator="Exists"),), True),  # empty key + Exists tolerates everything
        ((Toleration(key="other", operator="Exists"),), False),
    ],
)
def test_tolerations(tolerations: tuple[Toleration, ...], expected: bool) -> None:
    assert admits(PodScheduling(tolerations=tolerations), TAINTED) is expected


def test_no_execute_taint_blocks() -> None:
    node = NodeInfo(name="n", taints=(Taint("dedicated", "NoExecute", "db"),))
    assert not admits(PodScheduling(), node)
    tol = Toleration(key="dedicated", value="db", effect="NoExecute")
    assert admits(PodScheduling(tolerations=(tol,)), node)


def test_condition_taints_are_ignored() -> None:
    node = NodeInfo(
        name="new",
        taints=(
            Taint("node.kubernetes.io/not-ready", "NoSchedule"),
            Taint("node.kubernetes.io/not-ready", "NoExecute"),
            Taint("node.kubernetes.io/unreachable", "NoExecute"),
            Taint("node.kubernetes.io/disk-pressure", "NoSchedule"),
        ),
    )
    assert admits(PodScheduling(), node)


def test_node_from_object() -> None:
    node = node_from_object(
        {
            "metadata": {"name": "n1", "labels": {"a": "b"}},
            "spec": {"taints": [{"key": "k", "value": "v", "effect": "NoSchedule"}]},
        }
    )
    assert node == NodeInfo(name="n1", labels={"a": "b"}, taints=(Taint("k", "NoSchedule", "v"),))


def test_static_node_parsing() -> None:
    assert parse_labels("a=1, b=2,c") == {"a": "1", "b": "2", "c": ""}
    assert parse_taints("gpu=true:NoSchedule,dedicated:NoExecute") == (
        Taint("gpu", "NoSchedule", "true"),
        Taint("dedicated", "NoExecute", ""),
    )
    with pytest.raises(ValueError, match="taint"):
        parse_taints("gpu=true")
    node = static_node("n", "kubernetes.io/arch=arm64,zone=a")
    assert node.labels["kubernetes.io/arch"] == "arm64"
    assert node.labels["kubernetes.io/os"] == "linux"
    assert node.labels["zone"] == "a"


def test_mismatch_says_why() -> None:
    from cedar.proto.scheduling import Taint, mismatch

    node = NodeInfo(
        "n1",
        {"kubernetes.io/arch": "amd64"},
        (
            Taint("dedicated", "NoSchedule", "gpu"),
            Taint("node.kubernetes.io/not-ready", "NoExecute"),
        ),
    )
    assert mismatch(PodScheduling(node_selector={"kubernetes.io/arch": "arm64"}), node) == (
        "nodeSelector kubernetes.io/arch=arm64 (node has kubernetes.io/arch=amd64)"
    )
    assert mismatch(PodScheduling(), node) == "taint dedicated=gpu:NoSchedule not tolerated"
    tolerant = PodScheduling(tolerations=(Toleration(key="dedicated", operator="Exists"),))
    assert mismatch(tolerant, node) is None  # the not-ready condition taint is ignored
