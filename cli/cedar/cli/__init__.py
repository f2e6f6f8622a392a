"""The `cedar` command line: the top layer, which may import every other one.

It parses the command line and hands over to one command's module; nothing else lives here.
"""

from cedar.cli.main import COMMANDS, build_parser, main

__all__ = ["COMMANDS", "build_parser", "main"]
