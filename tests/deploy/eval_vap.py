"""Evaluates a ValidatingAdmissionPolicy's CEL against admission requests.

Runs under the tools venv (cel-python), not the project's: reads
{"policy": <VAP object>, "cases": [{"object", "oldObject", "username"}]} as JSON
on stdin and prints one JSON list of booleans (allowed or not), one per case.
Variables are evaluated in order and exposed as `variables.<name>`, as the
API server does.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import celpy  # type: ignore[import-not-found]
from celpy import celtypes  # type: ignore[import-not-found]


def evaluate(env: Any, expr: str, activation: dict[str, Any]) -> Any:
    program = env.program(env.compile(expr))
    return program.evaluate(activation)


def main() -> None:
    data = json.load(sys.stdin)
    spec = data["policy"]["spec"]
    env = celpy.Environment()
    results = []
    for case in data["cases"]:
        activation: dict[str, Any] = {
            "object": celpy.json_to_cel(case["object"]),
            "oldObject": celpy.json_to_cel(case.get("oldObject")),
            "request": celpy.json_to_cel(
                {
                    "operation": "CREATE" if case.get("oldObject") is None else "UPDATE",
                    "userInfo": {"username": case["username"]},
                }
            ),
        }
        variables: dict[str, Any] = {}
        for var in spec.get("variables", []):
            activation["variables"] = celtypes.MapType(
                {celtypes.StringType(k): v for k, v in variables.items()}
            )
            variables[var["name"]] = evaluate(env, var["expression"], activation)
        activation["variables"] = celtypes.MapType(
            {celtypes.StringType(k): v for k, v in variables.items()}
        )
        allowed = True
        for validation in spec["validations"]:
            value = evaluate(env, validation["expression"], activation)
            if not isinstance(value, celtypes.BoolType):
                raise SystemExit(f"{validation['expression']!r} gave {value!r}, not a bool")
            allowed = allowed and bool(value)
        results.append(allowed)
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
