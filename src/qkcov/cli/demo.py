"""``qkcov demo``: every experiment, small, into ./qkcov-demo/, then the HTML report."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

__all__ = ["register", "run", "DEMO_TASKS"]

# Task sizes of the demo (the commands' defaults are larger); every other setting is the
# pipeline's default, so `qkcov <task>` with these options reproduces a demo section.
DEMO_TASKS: dict[str, dict[str, Any]] = {
    "filter": {"n_build": 120, "n_heldout": 48},
    "binding": {"n_pairs": 3, "n_build": 80, "n_heldout": 32},
    "agreement": {"n": 160},
}


def register(subparsers: argparse._SubParsersAction) -> None:
    from .common import add_config_flags, add_out_flags

    p = subparsers.add_parser(
        "demo",
        help="run a quick version of every experiment and write an HTML report",
        description=(
            "Runs the toy-model experiments (rank recovery, projections, key swaps, interaction "
            "matrix) and the pipeline on three built-in tasks (filter heads, binding, "
            "subject-verb agreement) on the embedded default model, explains every head without "
            "labels (qkcov explain: OUT/explain/atlas.html), then writes OUT/report.html."
        ),
    )
    from ..pipeline import RunConfig

    add_config_flags(
        p, RunConfig, only=("model", "device", "dtype", "device_map", "heads", "batch_size", "seed")
    )
    add_out_flags(p, default=Path("qkcov-demo"), help="output folder (default: ./qkcov-demo)")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--wide", action="store_true", help="print every column of the summary tables")
    p.add_argument("--skip-llm", action="store_true", help="run only the toy-model sections")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..artifacts import RunFolder
    from ..pipeline import RunConfig
    from ..pipeline import run as run_pipeline
    from ..report import build_report
    from ..tasks.builtin import TASKS, build_task_records
    from ..toy.experiments import run_toy_demo
    from .common import config_from_args

    t0 = time.perf_counter()
    cfg = config_from_args(RunConfig, args, heads="auto:2" if args.heads == "auto" else args.heads)
    rows: list[tuple[str, Any]] = []
    with RunFolder(args.out, command="demo", force=args.force) as staging:
        print(f"[demo] toy model experiments -> {args.out / 'toy'}", flush=True)
        run_toy_demo(staging / "toy", quick=True, progress=not args.quiet)
        loaded = None
        if not args.skip_llm:
            from ..models.loading import load_model
            from ..pipeline import _load_kwargs

            lm = load_model(cfg.model, **_load_kwargs(cfg))
            loaded = (lm.model, lm.tokenizer)
            from .tasks import EXTRAS

            for name, options in DEMO_TASKS.items():
                spec = TASKS[name]
                print(f"[demo] {name} on {cfg.model} -> {args.out / name}", flush=True)
                records = build_task_records(name, seed=cfg.seed, chat=cfg.chat, **options)
                section = {
                    "key": name,
                    "title": spec.title,
                    "order": spec.order,
                    "text": list(spec.text),
                }
                result = run_pipeline(
                    cfg,
                    records,
                    staging / name,
                    quiet=args.quiet,
                    loaded=loaded,
                    section=section,
                    extras=EXTRAS.get(name),
                )
                rows.append((name, result))
            from ..explainer import ExplainConfig, explain

            print(f"[demo] explain: every head of {cfg.model}, no labels -> {args.out / 'explain'}",
                  flush=True)  # fmt: skip
            ecfg = ExplainConfig(model=cfg.model, seed=cfg.seed, batch_size=cfg.batch_size)
            explained = explain(lm.model, lm.tokenizer, config=ecfg, progress=not args.quiet,
                                model_name=cfg.model)  # fmt: skip
            explained._write(staging / "explain")  # the demo's own staging folder
        build_report(staging, title="qkcov demo")
    for name, result in rows:
        print(f"\n{name}:\n{result.summary(wide=args.wide)}")
    if not args.skip_llm:
        print(f"\nexplain (best 5 of {len(explained.heads)} heads; atlas: "
              f"{args.out / 'explain' / 'atlas.html'}):\n{explained.summary(5)}")  # fmt: skip
    print(f"\n[demo] {time.perf_counter() - t0:.0f} s; report: {args.out / 'report.html'}")
    return 0
