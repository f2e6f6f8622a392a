"""Generate the puller's CRI stubs from proto/cri/runtime/v1/*.proto (`make cri-stubs`).

Runs grpcio-tools' protoc with its Python, gRPC and mypy-protobuf plugins into a scratch
directory, points the generated imports at the package the stubs live in
(`runtime.v1` -> `cedar.puller.cri`), and writes the result to
services/puller/cedar/puller/cri/. With `--check` it writes nothing and exits 1 when the
committed stubs differ from what the .proto files generate (the drift test runs it so).
Touches only those two folders and a temporary directory. A dev tool: needs grpcio-tools
and mypy-protobuf (`pip install -e '.[dev]'`).
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROTO_DIR = ROOT / "proto" / "cri"
SOURCES = (
    "runtime/v1/api.proto",
    "runtime/v1/image_service.proto",
    "runtime/v1/runtime_service.proto",
)
OUT_DIR = ROOT / "services" / "puller" / "cedar" / "puller" / "cri"
PACKAGE = "cedar.puller.cri"
_IMPORT = re.compile(r"^from runtime\.v1 import ", re.M)
_GENERATED = re.compile(r"_pb2(_grpc)?\.pyi?$")


def _plugin(name: str) -> str:
    """A protoc plugin installed next to this interpreter (the venv's bin), else on PATH."""
    here = Path(sys.executable).parent / name
    if here.is_file() and os.access(here, os.X_OK):
        return str(here)
    for folder in os.environ.get("PATH", "").split(os.pathsep):
        candidate = Path(folder) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    raise SystemExit(f"{name} not found: install the dev dependencies (pip install -e '.[dev]')")


def generate() -> dict[str, str]:
    """File name -> text of every generated stub, imports pointing at cedar.puller.cri."""
    try:
        from grpc_tools import protoc
    except ImportError as err:
        raise SystemExit("grpcio-tools is not installed: pip install -e '.[dev]'") from err
    import importlib.resources

    well_known = str(importlib.resources.files("grpc_tools") / "_proto")
    with tempfile.TemporaryDirectory(prefix="cedar-cri-") as scratch:
        args = [
            "protoc",
            f"-I{PROTO_DIR}",
            f"-I{well_known}",
            f"--plugin=protoc-gen-mypy={_plugin('protoc-gen-mypy')}",
            f"--plugin=protoc-gen-mypy_grpc={_plugin('protoc-gen-mypy_grpc')}",
            f"--python_out={scratch}",
            f"--grpc_python_out={scratch}",
            f"--mypy_out={scratch}",
            f"--mypy_grpc_out={scratch}",
            *SOURCES,
        ]
        code = protoc.main(args)
        if code != 0:
            raise SystemExit(f"protoc failed with code {code}")
        out: dict[str, str] = {}
        for path in sorted((Path(scratch) / "runtime" / "v1").iterdir()):
            if not _GENERATED.search(path.name) or path.name.startswith("api_pb2_grpc"):
                continue  # api.proto declares no service: its gRPC module would be empty
            out[path.name] = _IMPORT.sub(f"from {PACKAGE} import ", path.read_text())
        return out


def drift(generated: dict[str, str], folder: Path = OUT_DIR) -> list[str]:
    """Names of stubs in `folder` that differ from `generated`, are missing, or are extra."""
    committed = {p.name for p in folder.iterdir() if _GENERATED.search(p.name)}
    changed = [
        name
        for name, text in generated.items()
        if not (folder / name).is_file() or (folder / name).read_text() != text
    ]
    return sorted({*changed, *(committed - set(generated))})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--check", action="store_true", help="only report drift (exit 1)")
    args = parser.parse_args(argv)
    generated = generate()
    stale = drift(generated)
    if args.check:
        if stale:
            print(f"CRI stubs drifted from proto/cri: {', '.join(stale)}; run `make cri-stubs`")
            return 1
        print(f"CRI stubs match proto/cri ({len(generated)} files)")
        return 0
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    for name in stale:
        target = OUT_DIR / name
        if name in generated:
            target.write_text(generated[name])
        else:
            target.unlink()
    print(f"wrote {len(stale)} of {len(generated)} CRI stubs to {OUT_DIR.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
