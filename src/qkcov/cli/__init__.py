"""``qkcov <command>``: every command writes JSON + safetensors artifacts, then figures."""

from __future__ import annotations

import argparse
import difflib
import importlib
import json
import shlex
import sys
from collections.abc import Sequence
from typing import Any

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
    """A user-facing error: printed as one line, exit status 2 (``prog``: the command it
    concerns, e.g. ``qkcov tasks export``)."""

    def __init__(self, message: str, prog: str | None = None) -> None:
        super().__init__(message)
        self.prog = prog


class Parser(argparse.ArgumentParser):
    """Every qkcov parser: no prefix matching (``--head`` is not ``--heads``); sub-command
    parsers inherit the class."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["allow_abbrev"] = False
        super().__init__(*args, **kwargs)


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


def _suggest(word: str, choices: Sequence[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=2, cutoff=0.6)
    if not close:
        return ""
    return "; did you mean " + " or ".join(close) + "?"


def check_words(parser: argparse.ArgumentParser, argv: Sequence[str]) -> None:
    """Unknown commands and flags refused in one line with the closest known ones
    (``--hedas`` → ``--heads``), before argparse (whose message has no suggestion, and which
    reports a missing required flag before an unknown one)."""
    prog = ["qkcov"]
    rest = list(argv)
    if "--" in rest:
        rest = rest[: rest.index("--")]
    i = 0
    while True:  # descend through the sub-commands named in argv
        sub = _subparsers(parser)
        if sub is None:
            break
        j = next((k for k in range(i, len(rest)) if not rest[k].startswith("-")), None)
        if j is None:
            break
        word = rest[j]
        if word not in sub.choices:
            if any(a in ("-h", "--help") for a in rest[i:j]):
                return
            raise CLIError(
                f"unknown command {word!r}{_suggest(word, sub.choices)}"
                f" (commands: {', '.join(sub.choices)})",
                " ".join(prog),
            )
        parser, prog, i = sub.choices[word], [*prog, word], j + 1
    known = parser._option_string_actions
    for word in rest[i:]:
        if not word.startswith("--") or word == "--":
            continue
        flag = word.split("=", 1)[0]
        if flag not in known:
            flags = [f for f in known if f.startswith("--")]
            raise CLIError(
                f"unknown flag {flag}{_suggest(flag, flags)}"
                f" (`{' '.join(prog)} --help` lists the flags)",
                " ".join(prog),
            )


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="qkcov",
        description=(
            "Explain why an attention head attends where it does. For one head, estimate the "
            "contrastive covariance between queries and keys that do / do not share a feature, "
            "split it into low-rank query/key subspaces, test them causally by swapping keys "
            "inside them, and attribute attention logits to them exactly."
        ),
        epilog="Start with `qkcov demo`; `qkcov <command> --help` explains each command.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>", parser_class=Parser)
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
        check_words(parser, argv)
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
        prog = getattr(err, "prog", None) or prog
        print(f"{prog}: error: {_describe(err)}", file=sys.stderr)
        return 2
    except Exception as err:
        line = _artifact_error(err)
        if line is None:
            raise
        print(f"{prog}: error: {line}", file=sys.stderr)
        return 2
