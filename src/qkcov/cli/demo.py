"""``qkcov demo``: every experiment, small, into ./qkcov-demo/, then the HTML report."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ..report import build_report

__all__ = ["register", "run"]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run a quick version of every experiment and write an HTML report",
        description=(
            "Runs the toy-model experiments (rank recovery, projections, key swaps, interaction "
            "matrix) and the LLM experiments (filter heads for categories, binding heads for "
            "box-letter binding) on the embedded default model, then writes OUT/report.html."
        ),
    )
    p.add_argument("--out", default="qkcov-demo", help="output folder (default: ./qkcov-demo)")
    p.add_argument(
        "--model", default=None, help="model for the LLM sections (default: smollm2-135m)"
    )
    p.add_argument("--skip-llm", action="store_true", help="run only the toy-model sections")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..toy.experiments import run_toy_demo

    out = Path(args.out)
    summary: dict[str, object] = {}
    t0 = time.perf_counter()
    print(f"[demo] toy model experiments -> {out / 'toy'}")
    summary["toy"] = run_toy_demo(out / "toy", quick=True)
    if not args.skip_llm:
        from ..experiments.binding import run_binding_demo
        from ..experiments.filter import run_filter_demo
        from ..models.loading import DEFAULT_MODEL

        model = args.model or DEFAULT_MODEL
        print(f"[demo] filter heads on {model} -> {out / 'filter'}")
        summary["filter"] = run_filter_demo(out / "filter", model=model)
        print(f"[demo] binding heads on {model} -> {out / 'binding'}")
        summary["binding"] = run_binding_demo(out / "binding", model=model)
    report = build_report(out, title="qkcov demo")
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(summary, indent=2, default=str))
    print(f"[demo] report: {report}")
    return 0
