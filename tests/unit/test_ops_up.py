"""`cedar up`'s pure parts, and the operator commands' --help."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from cedar.cli import main as cedar_main
from cedar.ops import up


def test_state_dir() -> None:
    assert up.state_dir("/x/y", {}) == Path("/x/y")
    assert up.state_dir(None, {"XDG_STATE_HOME": "/s"}) == Path("/s/cedar")
    assert up.state_dir(None, {}) == Path.home() / ".local" / "state" / "cedar"


def test_local_address() -> None:
    assert up.local_address("nats://127.0.0.1:4222") == ("127.0.0.1", 4222)
    assert up.local_address("nats://localhost") == ("localhost", 4222)
    assert up.local_address("nats://127.0.0.1:5000,nats://10.0.0.2:4222") == ("127.0.0.1", 5000)
    assert up.local_address("nats://nats.cedar-system:4222") is None


def test_examples_and_samples() -> None:
    examples = up.default_examples()
    assert (examples / "workloads.yaml").exists()
    samples = up.sample_images((examples / "images.txt").read_text())
    assert ("tenants/web:v1", 4_000_000) in samples
    text = (examples / "workloads.yaml").read_text()
    repos = {s[0] for s in samples}
    # Every image the examples name is one the sandbox builds.
    for line in up.rewrite_registry(text, "127.0.0.1:5000").splitlines():
        if "image:" in line:
            ref = line.split("image:", 1)[1].strip()
            assert ref.startswith("127.0.0.1:5000/")
            assert ref.removeprefix("127.0.0.1:5000/") in repos
    objects = up._load_examples(examples, "127.0.0.1:5000", {"kubernetes.io/arch": "arm64"})
    (node,) = [o for o in objects if o["kind"] == "Node"]
    assert node["metadata"]["labels"]["kubernetes.io/arch"] == "arm64"


def test_snapshot_readiness() -> None:
    snap = up.Snapshot(services={"watcher": "ready", "puller": "ready", "mcs-allocator": "ready"})
    assert not snap.warm()
    snap.images = [("n1", "r/a:v1", "present", "", "Deployment/a/b")]
    snap.namespaces = [("team-a", "s0:c1,c2")]
    assert snap.warm()
    assert re.search(r"^team-a\s+s0:c1,c2$", snap.render(), re.MULTILINE)
    before = snap.key()
    snap.images.append(("n1", "r/b:v1", "pulling", "", "Deployment/a/c"))
    assert not snap.warm() and snap.key() != before


@pytest.mark.parametrize("command", ["up", "replay", "status", "prepull"])
def test_help_is_complete(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cedar_main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert "environment:" in text and "CEDAR_NATS_URL" in text
    assert "examples:" in text and f"cedar {command}" in text
    for flag in {
        "up": ["--sandbox", "--exit-when-ready", "--state-dir", "--timeout", "--nats-url"],
        "replay": ["--since", "--until", "--kind", "--namespace", "--name", "--to", "--output"],
        "status": ["--image", "--node", "--namespaces", "--output", "--nats-url"],
        "prepull": ["--ttl", "--timeout", "--validate-only", "--kubeconfig", "--output"],
    }[command]:
        assert flag in text


def test_up_without_a_cluster_says_so_and_starts_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "missing"))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    assert cedar_main(["up", "--state-dir", str(tmp_path / "state")]) == 2
    err = capsys.readouterr().err
    assert "no Kubernetes configuration" in err and "cedar up --sandbox" in err
    assert not (tmp_path / "state" / "nats").exists()
