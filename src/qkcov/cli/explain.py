"""``qkcov explain``: what does each head read? Hypotheses from tokens, every head in one pass."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..runtime import is_main_process
from .common import add_config_flags, add_out_flags, config_from_args

__all__ = ["register", "run"]

_DESCRIPTION = """\
Explain every attention head of a model without labels: hypotheses computed from the tokens
alone (previous-token, offset bins, same-token, induction, first-token, same-word,
delimiter, capitalised, number, and your own --hypothesis). For each head, what it selects
(its attention-logit variance among the keys after the first) is split exactly over the
hypotheses in greedy order, with the unexplained rest; the first key's part (the gate: how
much the head attends at all) is reported apart. Each hypothesis also gets ΔC between the
keys satisfying it and offset-matched keys that don't, and its key subspace. One forward
over the corpus serves every head.

Writes OUT/explain.json (heads sorted by the share of their top hypothesis; one sentence
each), OUT/explain.safetensors (every subspace) and OUT/atlas.html (layer x head grid)."""

_COMMON = ("model", "device", "dtype", "device_map", "batch_size", "seed")


def register(subparsers: Any) -> None:
    from ..explainer import ExplainConfig
    from ..pipeline import RunConfig

    p = subparsers.add_parser(
        "explain",
        help="what each head reads: token hypotheses ranked by their share of every head's logit variance, an atlas",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_flags(p, RunConfig, only=_COMMON)  # the same flags as every model command
    add_config_flags(p, ExplainConfig, skip=_COMMON)
    add_out_flags(p)
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..explainer import ExplainConfig, run_explain

    cfg = config_from_args(ExplainConfig, args)
    result = run_explain(
        cfg, args.out, quiet=args.quiet, force=args.force,
        command_line=getattr(args, "command_line", None),
    )  # fmt: skip
    if is_main_process():  # under torchrun the other ranks print nothing
        print(result.summary())
        print(f"atlas: {Path(args.out) / 'atlas.html'}")
    return 0
