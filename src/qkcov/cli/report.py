"""``qkcov report DIR``: one self-contained HTML page from the artifacts under DIR."""

from __future__ import annotations

import argparse

from ..report.html import report_run_folder

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="write DIR/report.html embedding every experiment's figures and key numbers",
        description=(
            "Collect every experiment folder under DIR (each has a section.json written by its "
            "command) into one self-contained DIR/report.html: figures are embedded, interactive "
            "plots work offline. DIR is first checked against its manifest.json (written last by "
            "every run): a modified, missing or foreign file is refused."
        ),
    )
    p.add_argument(
        "dir",
        help="output folder of one or more qkcov commands (e.g. ./qkcov-demo), or a folder of "
        "run folders (writes DIR/index.html linking each run)",
    )
    p.add_argument(
        "--title",
        default=None,
        help="page title (default: a run's records file and features; 'qkcov report' for several)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..artifacts import MANIFEST_FILE
    from ..report.compare import run_folders, write_index

    if not (Path(args.dir) / MANIFEST_FILE).is_file() and run_folders(args.dir):
        print(write_index(args.dir))  # a folder of runs: an index page linking each
        return 0
    path = report_run_folder(args.dir, title=args.title)
    print(path)
    return 0
