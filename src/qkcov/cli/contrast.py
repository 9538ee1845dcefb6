"""``qkcov contrast``: ΔC, subspaces and their significance only (``qkcov run --steps ''``)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..runtime import is_main_process
from .common import COMMON, add_common_flags, add_config_flags, add_resume_flag, config_from_args

__all__ = ["register", "run"]

_DESCRIPTION = """\
ΔC = E[q k+^T] - E[q k-^T] per head, feature and group (and pooled) for a JSONL of contrast
records (docs/contrast-records.md), split into query/key subspaces with the permutation-null
rank (or energy), p-values and bootstrap CIs — the first half of `qkcov run`, without
projections, swaps or attribution. The file is validated first; nothing is computed or
written from a file with an invalid line. Writes OUT/run.json, OUT/run.safetensors, figures
and OUT/report.html."""


def register(subparsers: Any) -> None:
    from ..pipeline import RunConfig

    p = subparsers.add_parser(
        "contrast",
        help="ΔC, ranks, significance and subspaces per head for a JSONL of contrast records",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--data", required=True, type=Path, help="JSONL file of contrast records")
    add_common_flags(p)
    add_config_flags(p, RunConfig, skip=(*COMMON, "steps", "n_swap", "n_attribution", "n_centroid"))
    add_resume_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..pipeline import RunConfig
    from ..pipeline import run as run_pipeline

    cfg = config_from_args(RunConfig, args, steps="")
    section = {
        "key": f"contrast-{args.data.stem}",
        "title": f"Contrastive covariance: {args.data.name}",
    }
    result = run_pipeline(
        cfg,
        args.data,
        args.out,
        quiet=args.quiet,
        section=section,
        resume=args.resume,
        force=args.force,
        command_line=getattr(args, "command_line", None),
    )
    if is_main_process():  # under torchrun the other ranks print nothing
        print(result.summary(wide=getattr(args, "wide", False)))
        print(f"report: {Path(args.out) / 'report.html'}")
    return 0
