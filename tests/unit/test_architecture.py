"""The layers of docs/architecture.md: what import-linter checks, and what it cannot.

`make lint` runs the contracts in .importlinter. These tests check that the contracts are
the ones the architecture page describes and that they bite: a violating import in a copy of
the tree makes `lint-imports` fail. They also check what no import tool sees: every module
says what it is in its first docstring, the modules that say "Pure" are exactly the ones the
pure-modules contract covers, and no module of a service is over 500 lines.
"""

from __future__ import annotations

import ast
import configparser
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAYER_FOLDERS = (
    "cli",
    "ops",
    "sandbox",
    "runtime",
    "proto",
    *(f"services/{s}" for s in ("watcher", "puller", "mcs-allocator", "nats-auth")),
)
MAX_SERVICE_MODULE_LINES = 500


def _modules() -> dict[str, Path]:
    """Every module of the `cedar` package, by dotted name."""
    found: dict[str, Path] = {}
    for folder in LAYER_FOLDERS:
        for path in sorted((REPO / folder / "cedar").rglob("*.py")):
            parts = path.relative_to(REPO / folder).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def _docstring(path: Path) -> str:
    return ast.get_docstring(ast.parse(path.read_text())) or ""


def _contracts() -> configparser.ConfigParser:
    parser = configparser.ConfigParser()
    parser.read(REPO / ".importlinter")
    return parser


def _lines(value: str) -> list[str]:
    return [line.strip() for line in value.splitlines() if line.strip()]


def test_every_module_says_what_it_is_for() -> None:
    missing = [
        name
        for name, path in _modules().items()
        if path.read_text().strip() and not _docstring(path).strip()
    ]
    assert not missing, f"modules without a docstring saying what they are for: {missing}"


def test_the_pure_contract_covers_exactly_the_modules_that_say_pure() -> None:
    said = {
        name
        for name, path in _modules().items()
        if re.search(r"\bpure\b", _docstring(path).split("\n", 1)[0], re.I)
    }
    contract = _contracts()["importlinter:contract:pure-modules"]
    listed = set(_lines(contract["source_modules"]))
    assert said - listed == set(), "say Pure in the docstring but are not in .importlinter"
    assert listed - said == set(), "in the pure contract but their docstring does not say Pure"
    forbidden = set(_lines(contract["forbidden_modules"]))
    for io in ("nats", "aiohttp", "aiodocker", "kubernetes", "cedar.runtime.bus"):
        assert io in forbidden


def test_the_layers_are_the_ones_the_architecture_page_names() -> None:
    layers = _lines(_contracts()["importlinter:contract:layers"]["layers"])
    assert layers == [
        "cedar.cli",
        "cedar.ops",
        "cedar.watcher | cedar.puller | cedar.mcs_allocator | cedar.nats_auth | cedar.sandbox",
        "cedar.runtime",
        "cedar.proto",
    ]
    roots = set(_lines(_contracts()["importlinter"]["root_packages"]))
    assert roots == {name for name in _modules() if name.count(".") == 1}


def test_no_service_module_is_a_god_module() -> None:
    too_long = {
        name: n
        for name, path in _modules().items()
        if path.is_relative_to(REPO / "services")
        and (n := len(path.read_text().splitlines())) > MAX_SERVICE_MODULE_LINES
    }
    assert not too_long, f"split these (lines): {too_long}"


def _lint_copy(tmp_path: Path, violation: str | None) -> subprocess.CompletedProcess[str]:
    """lint-imports over a copy of the tree, with one module added that imports `violation`."""
    paths = []
    for folder in LAYER_FOLDERS:
        dest = tmp_path / folder
        shutil.copytree(REPO / folder / "cedar", dest / "cedar")
        paths.append(str(dest))
    if violation is not None:
        (tmp_path / "ops" / "cedar" / "ops" / "violation.py").write_text(
            f'"""A module that breaks a layer."""\n\nimport {violation}\n'
        )
    shutil.copy(REPO / ".importlinter", tmp_path / ".importlinter")
    # -S: no .pth files, so the editable install's finder cannot point back at the checkout.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*paths, sysconfig.get_paths()["purelib"]])}
    return subprocess.run(
        [
            sys.executable,
            "-S",
            "-c",
            "from importlinter.cli import lint_imports_command; lint_imports_command()",
            "--no-cache",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )


def test_the_contracts_pass_on_the_tree_and_fail_on_a_violation(tmp_path: Path) -> None:
    clean = _lint_copy(tmp_path / "clean", None)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    broken = _lint_copy(tmp_path / "broken", "cedar.puller")
    assert broken.returncode != 0
    assert "cedar.ops.violation -> cedar.puller" in broken.stdout, broken.stdout
