"""``qkcov <command>``: every command writes JSON + safetensors artifacts, then figures."""

from __future__ import annotations

import argparse
import importlib
import json
import shlex
import sys
from collections.abc import Sequence

from ..config import InputError  # torch-free: the error handling stays cheap to import

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
    "export",
    "compare",
    "explain",
)


class CLIError(InputError):
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


def _describe(err: BaseException) -> str:
    """One line for an I/O or decoding error, naming the file when the error knows it."""
    if isinstance(err, OSError) and err.filename is not None:
        reason = err.strerror or str(err)
        if err.filename2 is not None:
            return f"{err.filename} -> {err.filename2}: {reason}"
        return f"{err.filename}: {reason}"
    if isinstance(err, UnicodeDecodeError):
        return f"a file is not valid UTF-8 ({err.reason} at byte {err.start})"
    if isinstance(err, json.JSONDecodeError):
        return f"invalid JSON ({err.msg} at line {err.lineno} column {err.colno})"
    return " ".join(str(err).split("\n")[:1]) if isinstance(err, OSError) else str(err)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so every ``finally`` (the run lock, the staging
    folder) cleans up as it does for Ctrl-C."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def _artifact_error(err: BaseException) -> str | None:
    """One line for an error a tampered artifact raises past the loading boundaries (which
    name the file themselves), or ``None`` for any other exception."""
    name = type(err).__name__
    if name in ("SafetensorError", "LinAlgError") or isinstance(err, RecursionError):
        what = {"SafetensorError": "a safetensors file is not valid",
                "LinAlgError": "linear algebra failed on an artifact's numbers"}.get(
            name, "a JSON artifact is nested too deeply")  # fmt: skip
        return f"{what} ({' '.join(str(err).split())[:200]})"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; errors become one line on stderr (exit 2), Ctrl-C exit 130,
    SIGTERM exit 143 (both after the run's lock and staging folder are cleaned up).

    The handling is in place before any command module (torch, transformers) is imported.
    """
    import signal
    import threading

    argv = list(sys.argv[1:] if argv is None else argv)
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    else:
        previous = None
    try:
        return _main(argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _main(argv: list[str]) -> int:
    name = next((a for a in argv if not a.startswith("-")), "")
    prog = f"qkcov {name}" if name in COMMAND_MODULES else "qkcov"
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 1
        args.command_line = shlex.join(["qkcov", *argv])
        prog = f"qkcov {args.command}"
        return int(args.func(args) or 0)
    except Terminated:
        print(f"{prog}: terminated (SIGTERM)", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except (OSError, ValueError) as err:  # incl. FileNotFoundError, UnicodeDecodeError, JSON
        print(f"{prog}: error: {_describe(err)}", file=sys.stderr)
        return 2
    except Exception as err:
        line = _artifact_error(err)
        if line is None:
            raise
        print(f"{prog}: error: {line}", file=sys.stderr)
        return 2
