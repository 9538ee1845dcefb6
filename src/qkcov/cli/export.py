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
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing --out file qkcov did not write (or that was changed since)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..artifacts import check_replaceable
    from ..export import load_subspace

    check_replaceable(args.out.with_suffix(".json"), force=args.force)  # before any work
    sub = load_subspace(args.run_dir, args.head, args.feature, args.group)
    path = sub.save(args.out, force=args.force)
    print(repr(sub))
    print(path)
    return 0
