"""``qkcov export RUN --head L13H8 --feature number --out FILE``: one subspace of a saved run
as a portable file (safetensors + JSON; :class:`qkcov.export.Subspace`)."""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export",
        help="write one head's query/key subspace of a run to a file other tools can load",
        description=(
            "Write the query and key subspaces of one head and feature of a saved run (bases, "
            "singular values, ranks, head, frame post-RoPE, model) to FILE (safetensors, the "
            "fields also in FILE with suffix .json). Load it with qkcov.Subspace.load(FILE); "
            "recipes for PyTorch / Hugging Face, TransformerLens and nnsight: docs/export.md."
        ),
    )
    p.add_argument("run_dir", metavar="RUN", help="a run folder (qkcov run / contrast / tasks)")
    p.add_argument("--head", required=True, help="head name, e.g. L13H8")
    p.add_argument("--feature", default=None, help="feature name (default: the run's first)")
    p.add_argument("--group", default="pooled", help="group of the feature (default: pooled)")
    p.add_argument("--out", required=True, type=Path, help="file to write (.safetensors)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..export import load_subspace

    sub = load_subspace(args.run_dir, args.head, args.feature, args.group)
    path = sub.save(args.out)
    print(repr(sub))
    print(path)
    return 0
