"""Flags derived from the config dataclasses, so flag, field and default cannot drift.

Every field of a config becomes ``--field-name`` with the field's default and its
``metadata["help"]``; the common model flags (:data:`COMMON`) come from
:class:`qkcov.pipeline.RunConfig` and mean the same on every model command.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Iterable
from pathlib import Path
from typing import Any

__all__ = [
    "COMMON",
    "add_config_flags",
    "add_common_flags",
    "add_resume_flag",
    "add_out_flags",
    "out_path",
    "config_from_args",
    "flag_name",
]

COMMON = ("model", "device", "dtype", "device_map", "heads", "batch_size", "seed")


def flag_name(field_name: str) -> str:
    return "--" + field_name.replace("_", "-")


def _base_type(tp: Any) -> Any:
    """``int | None`` → ``int``; ``tuple[str, ...] | None`` → ``tuple``."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0]) if len(args) == 1 else str
    return origin or tp


def add_config_flags(
    parser: argparse.ArgumentParser | Any,
    cls: type,
    *,
    only: Iterable[str] | None = None,
    skip: Iterable[str] = (),
) -> None:
    """One flag per dataclass field of ``cls`` (``only`` / ``skip`` select fields)."""
    hints = typing.get_type_hints(cls)
    only = None if only is None else list(only)
    skip = set(skip)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name in only if only is not None else list(fields):
        if name in skip:
            continue
        f = fields[name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        help_text = f.metadata.get("help", "")
        tp = _base_type(hints[name])
        if tp is bool:
            if default:
                parser.add_argument(
                    f"--no-{name.replace('_', '-')}",
                    dest=name,
                    action="store_false",
                    help=f"turn off: {help_text}",
                )
            else:
                parser.add_argument(flag_name(name), dest=name, action="store_true", help=help_text)
            continue
        if tp is tuple or tp is list:
            parser.add_argument(
                flag_name(name),
                dest=name,
                nargs="+",
                default=default,
                help=f"{help_text} (default: {default})",
            )
            continue
        conv = tp if tp in (int, float, str) else str
        parser.add_argument(
            flag_name(name),
            dest=name,
            type=conv,
            default=default,
            metavar=name.upper(),
            help=f"{help_text} (default: {default})",
        )


def out_path(text: str) -> Path:
    """``--out`` value: a non-empty path (``''`` would be the working directory)."""
    if not text.strip():
        raise argparse.ArgumentTypeError(f"expected a folder path, got {text!r}")
    return Path(text)


def add_out_flags(
    parser: argparse.ArgumentParser | Any,
    *,
    default: Path | None = None,
    help: str = "output folder (one complete run, replaced as a whole)",
) -> None:
    """``--out`` and the :class:`~qkcov.artifacts.OutputConfig` flags (``--force``)."""
    from ..artifacts import OutputConfig

    kw: dict[str, Any] = {"required": True} if default is None else {"default": default}
    parser.add_argument(
        "--out",
        type=out_path,
        help=help + "; an existing folder is replaced only when empty or a complete qkcov run",
        **kw,
    )
    add_config_flags(parser, OutputConfig)


def add_common_flags(parser: argparse.ArgumentParser | Any, *, out: bool = True) -> None:
    """``--model --device --dtype --device-map --heads --batch-size --seed --out --force
    --quiet --wide``."""
    from ..pipeline import RunConfig

    add_config_flags(parser, RunConfig, only=COMMON)
    if out:
        add_out_flags(parser)
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    parser.add_argument(
        "--wide",
        action="store_true",
        help="print every column of the summary table (default: a compact table)",
    )


def add_resume_flag(parser: argparse.ArgumentParser | Any) -> None:
    """``--resume``: continue an interrupted run from its checkpoints (``--checkpoint-every``)."""
    parser.add_argument(
        "--resume",
        action="store_true",
        help="continue an interrupted run into the same --out from its checkpoints (refused if settings or data differ)",
    )


def config_from_args(cls: type, args: argparse.Namespace, **extra: Any) -> Any:
    """Build ``cls`` from the parsed flags that name its fields (validated in ``__post_init__``)."""
    names = {f.name for f in dataclasses.fields(cls)}
    kw = {k: v for k, v in vars(args).items() if k in names}
    kw.update(extra)
    return cls(**kw)
