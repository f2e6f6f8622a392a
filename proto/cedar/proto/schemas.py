"""Generate the JSON Schema files under proto/schemas/ from the models.

python -m cedar.proto.schemas [DIR]     # default: proto/schemas next to this package
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from cedar.proto.models import CONTRACTS

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "schemas"


def render() -> dict[str, str]:
    """File name -> JSON text, for every contract."""
    out = {}
    for name, model in CONTRACTS.items():
        schema = model.model_json_schema()
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        out[f"{name}.v1.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    return out


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    target = Path(args[0]) if args else DEFAULT_DIR
    target.mkdir(parents=True, exist_ok=True)
    for file_name, text in render().items():
        (target / file_name).write_text(text)
        print(target / file_name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
