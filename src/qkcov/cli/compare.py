"""``qkcov compare RUN RUN ... [--out PAGE.html]``: did these runs find the same subspaces?"""

from __future__ import annotations

import argparse
from pathlib import Path

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compare",
        help="principal angles, ranks and swap effects of the same heads across runs",
        description=(
            "For every head and feature present in several runs (two seeds, two data sets, "
            "bfloat16 vs float32, ...): principal angles between their key and query subspaces "
            "(rank in force and energy rank), ranks and headline swap effects side by side. "
            "Runs on different models are refused (nothing is compared). Reads artifacts only."
        ),
    )
    p.add_argument("runs", nargs="+", metavar="RUN", help="two or more run folders")
    p.add_argument("--out", type=Path, default=None, help="write the comparison page (HTML) here")
    p.add_argument("--json", type=Path, default=None, help="write the comparison as JSON here")
    p.add_argument(
        "--force",
        action="store_true",
        help="replace an existing --out/--json file qkcov did not write (or that was changed "
        "since); without it only qkcov's own unchanged files are replaced",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..artifacts import check_replaceable
    from ..comparison import compare

    for flag, path in (("--out", args.out), ("--json", args.json)):
        if path is not None:  # before any work: refuse a file qkcov did not write
            check_replaceable(path, force=args.force, flag=flag)
    cmp = compare(args.runs)
    print(cmp.summary())
    if args.out is not None:
        from ..report.compare import write_comparison_page

        print(f"page: {write_comparison_page(cmp, args.out, force=args.force)}")
    if args.json is not None:
        from ..artifacts import write_json

        write_json(args.json, {"format": "qkcov-compare/1", **cmp.to_dict()}, seal=True)
    return 0
