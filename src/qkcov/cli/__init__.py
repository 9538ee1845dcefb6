"""``qkcov <command>``: every command writes JSON + safetensors artifacts, then figures."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["main", "build_parser", "COMMAND_MODULES"]

# Each module defines ``register(subparsers)``, adding its command(s) with ``func=run``.
COMMAND_MODULES = (
    "demo",
    "run",
    "toy",
    "verify",
    "contrast",
    "filter",
    "binding",
    "tasks",
    "report",
)


class CLIError(ValueError):
    """A user-facing error: printed as one line, exit status 2."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qkcov",
        description=(
            "Explain why an attention head attends where it does. For one head, estimate the "
            "contrastive covariance between queries and keys that do / do not share a feature, "
            "split it into low-rank query/key subspaces, test them causally by swapping keys "
            "inside them, and attribute attention logits to them exactly."
        ),
        epilog="Start with `qkcov demo`; `qkcov <command> --help` explains each command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"qkcov.cli.{name}")
        except ModuleNotFoundError as err:  # a command still under construction
            if err.name and err.name.startswith("qkcov.cli."):
                continue
            raise
        module.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 1
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError) as err:
        print(f"qkcov {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"qkcov {args.command}: interrupted", file=sys.stderr)
        return 130
