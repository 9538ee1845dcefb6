"""The built-in tasks as commands (``qkcov filter``, ``qkcov binding``, ``qkcov agreement``)
and ``qkcov tasks export NAME --out FILE.jsonl``.

A task command only builds its records and calls the pipeline (:func:`qkcov.pipeline.run`);
``qkcov run`` on the exported records with the same flags gives the same numbers.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..runtime import is_main_process
from .common import COMMON, add_common_flags, add_config_flags, add_resume_flag, config_from_args

__all__ = ["register", "run_task", "export"]


def _task_flags(p: Any, name: str) -> None:
    from ..tasks.builtin import SHARED_FIELDS, TASKS

    spec = TASKS[name]
    group = p.add_argument_group(f"{name} task options")
    add_config_flags(group, spec.config, skip=(*SHARED_FIELDS, "design", *spec.skip_fields))


def _task_options(name: str, args: argparse.Namespace) -> dict[str, Any]:
    import dataclasses

    from ..tasks.builtin import SHARED_FIELDS, TASKS

    names = {f.name for f in dataclasses.fields(TASKS[name].config)} - set(SHARED_FIELDS)
    return {k: v for k, v in vars(args).items() if k in names}


def register(subparsers: Any) -> None:
    from ..pipeline import RunConfig
    from ..tasks.builtin import TASKS

    for name, spec in TASKS.items():
        p = subparsers.add_parser(
            name,
            help=spec.help,
            description=f"{spec.help}. Builds the task's contrast records and runs the whole "
            "pipeline on them (the same as `qkcov tasks export` + `qkcov run`).",
        )
        add_common_flags(p)
        add_config_flags(p, RunConfig, skip=COMMON)
        add_resume_flag(p)
        _task_flags(p, name)
        p.set_defaults(func=run_task, task=name)

    tp = subparsers.add_parser(
        "tasks", help="export the built-in tasks as contrast records (JSONL)"
    )
    tsub = tp.add_subparsers(dest="tasks_command", metavar="<export>")
    ep = tsub.add_parser("export", help="write a built-in task's records to a JSONL file")
    esub = ep.add_subparsers(dest="task", metavar="<task>")
    for name, spec in TASKS.items():
        e = esub.add_parser(name, help=spec.help)
        e.add_argument("--out", type=Path, required=True, help="JSONL file to write")
        e.add_argument(
            "--force",
            action="store_true",
            help="replace an existing --out file (without it an existing file is refused "
            "unless it already holds exactly these records)",
        )
        add_config_flags(e, RunConfig, only=("seed", "chat"))
        _task_flags(e, name)
        e.set_defaults(func=export)


def _binding_extras(
    model: Any, tokenizer: Any, records: list[Any], cfg: Any
) -> list[dict[str, Any]]:
    """Task accuracy of the order-ID records held out (is the binding task solved at all?)."""
    from ..engine.accuracy import task_accuracy
    from ..engine.contrast import resolve_records

    held = [r for r in records if r.feature == "order" and r.meta.get("split") == "heldout"]
    if not held:
        return []
    acc = task_accuracy(
        model,
        tokenizer,
        resolve_records(tokenizer, held, chat=cfg.chat),
        batch_size=cfg.batch_size,
        progress=False,
    )
    return [
        {
            "caption": "Task accuracy: argmax of the next-token score over the candidate letters, held-out order records",
            "columns": ["n", "accuracy", "chance", "p(answer)"],
            "rows": [
                [
                    acc["n"],
                    round(acc["accuracy"], 3),
                    round(acc["chance"], 3),
                    round(acc["p_answer"], 3),
                ]
            ],
        }
    ]


EXTRAS = {"binding": _binding_extras}


def run_task(args: argparse.Namespace) -> int:
    from ..pipeline import RunConfig
    from ..pipeline import run as run_pipeline
    from ..tasks.builtin import TASKS, build_task_records

    cfg = config_from_args(RunConfig, args)
    spec = TASKS[args.task]
    records = build_task_records(
        args.task, seed=cfg.seed, chat=cfg.chat, **_task_options(args.task, args)
    )
    section = {"key": spec.name, "title": spec.title, "order": spec.order, "text": list(spec.text)}
    result = run_pipeline(
        cfg, records, args.out, quiet=args.quiet, section=section,
        extras=EXTRAS.get(args.task), resume=args.resume, force=args.force,
        command_line=getattr(args, "command_line", None),
    )  # fmt: skip
    if is_main_process():  # under torchrun the other ranks print nothing
        print(result.summary(wide=getattr(args, "wide", False)))
        print(f"report: {Path(args.out) / 'report.html'}")
    return 0


def export(args: argparse.Namespace) -> int:
    from ..artifacts import check_replaceable, read_regular_bytes
    from ..tasks.builtin import build_task_records
    from ..tasks.records import records_jsonl, save_records

    if args.out.is_dir():
        raise ValueError(f"--out {args.out}: is a folder, expected a .jsonl file path")
    records = build_task_records(
        args.task, seed=args.seed, chat=args.chat, **_task_options(args.task, args)
    )
    same = False
    if args.out.is_file() and not args.out.is_symlink() and not args.force:
        # a JSONL file carries no seal: only a file holding exactly these records is "ours"
        try:
            same = read_regular_bytes(args.out) == records_jsonl(records)
        except ValueError:
            same = False
    if not same:
        check_replaceable(args.out, force=args.force)
    save_records(args.out, records)
    print(f"{len(records)} records -> {args.out}")
    return 0
