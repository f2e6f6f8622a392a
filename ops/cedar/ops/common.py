"""Options and plumbing every operator command shares."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from pydantic import ValidationError

from cedar.ops.errors import OpsError
from cedar.runtime.settings import CommonSettings


def add_nats_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--nats-url",
        metavar="URL",
        help="NATS server(s), comma separated (default: $CEDAR_NATS_URL or nats://127.0.0.1:4222)",
    )


def add_output_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-o",
        "--output",
        choices=("table", "json"),
        default="table",
        help="table for people (default), json for scripts (one JSON object per line)",
    )


def settings_from(args: argparse.Namespace) -> CommonSettings:
    overrides: dict[str, Any] = {}
    if getattr(args, "nats_url", None):
        overrides["nats_url"] = args.nats_url
    try:
        return CommonSettings(**overrides)
    except ValidationError as err:
        raise OpsError(f"invalid settings: {err}", code=2) from err


def run_command(name: str, body: Callable[[], Coroutine[Any, Any, int]]) -> int:
    """Run an async command body; OpsError becomes one line on stderr, Ctrl-C exit 130."""
    try:
        return asyncio.run(body())
    except OpsError as err:
        print(f"cedar {name}: {err}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `cedar replay | head`: the reader went away, which is not an error.
        return 0
