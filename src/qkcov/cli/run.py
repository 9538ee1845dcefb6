"""``qkcov run``: the whole method on any JSONL of contrast records."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..runtime import is_main_process
from .common import COMMON, add_common_flags, add_config_flags, add_resume_flag, config_from_args

__all__ = ["register", "run"]

_DESCRIPTION = """\
The whole method on your own contrast records (docs/contrast-records.md): seeded build /
held-out split, head scan, ΔC per feature, group and pooled, subspaces (rank by the
permutation null or energy), significance and bootstrap, projections, in-forward key swaps
against equal-rank random subspaces and the full-key swap, exact logit attribution.

Writes OUT/run.json (the contract scripts read), OUT/run.safetensors, figures, section.json
and OUT/report.html. Every input is checked before the model loads; OUT holds one complete
run or none."""


def register(subparsers: Any) -> None:
    from ..pipeline import RunConfig

    p = subparsers.add_parser(
        "run",
        help="the whole method (ΔC, subspaces, significance, projections, swaps, attribution) on any contrast records",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, type=Path, help="JSONL file of contrast records")
    add_common_flags(p)
    add_config_flags(p, RunConfig, skip=COMMON)
    add_resume_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..pipeline import RunConfig
    from ..pipeline import run as run_pipeline

    cfg = config_from_args(RunConfig, args)
    result = run_pipeline(
        cfg, args.data, args.out, quiet=args.quiet, resume=args.resume, force=args.force,
        command_line=getattr(args, "command_line", None),
    )  # fmt: skip
    if is_main_process():  # under torchrun the other ranks print nothing
        print(result.summary(wide=getattr(args, "wide", False)))
        print(f"report: {Path(args.out) / 'report.html'}")
    return 0
