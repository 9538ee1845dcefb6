"""What honest p-value floors and the conditional label nulls cost `qkcov run`: agreement
records on the default model, the heads the scan picks, the whole analysis alternated between
configurations ``--reps`` times in one process, on one intra-op thread; reports the process's
CPU seconds (robust to other load on a shared machine) beside wall seconds, minimum of each.

    PYTHONPATH=src python benchmarks/conditional_cost.py [--n 120] [--reps 2]

Configurations: ``old`` (20 label-permuted draws, unconditioned: the defaults before the
conditional nulls), ``draws`` (99 draws, unconditioned), ``defaults`` (99 draws, conditioned
on the offset). Prints ``<name>_seconds`` and each one's overhead over ``old``.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from qkcov.models.loading import load_model
from qkcov.pipeline import RunConfig, _analyze, plan_records
from qkcov.runtime import Timer
from qkcov.tasks.builtin import build_task_records


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--n", type=int, default=120)
    p.add_argument("--heads", default="auto:2")
    a = p.parse_args()
    torch.set_num_threads(1)
    lm = load_model("smollm2-135m")
    records = build_task_records("agreement", n=a.n)
    cfg = RunConfig(heads=a.heads)
    has_control = any(f.name == "control" for f in dataclasses.fields(RunConfig))
    cond = {"control": "none"} if has_control else {}
    configs = {
        "old": dataclasses.replace(cfg, n_permuted=20, **cond),
        "draws": dataclasses.replace(cfg, n_permuted=99, **cond),
    }
    if has_control:
        configs["defaults"] = dataclasses.replace(cfg, n_permuted=99, control="offset")
    total: dict[str, list[float]] = {k: [] for k in configs}
    wall: dict[str, list[float]] = {k: [] for k in configs}
    for rep in range(a.reps):
        for name, c in configs.items():
            t = Timer("run", quiet=True)
            cpu0 = time.process_time()
            res = _analyze(lm.model, lm.tokenizer, plan_records(records, c), c, t, "smollm2-135m")
            total[name].append(time.process_time() - cpu0)
            wall[name].append(t.total())
            verdicts = [(h.name, h.verdict.status if h.verdict else None) for h in res.heads]
            print(f"[{name} {rep}] cpu {total[name][-1]:.1f} s, wall {t.total():.1f} s; phases "
                  f"{ {k: round(v, 1) for k, v in t.seconds.items()} }; {verdicts}", flush=True)  # fmt: skip
    base = min(total["old"])
    for name, ts in total.items():
        print(f"{name}_cpu_seconds={min(ts):.1f} wall={min(wall[name]):.1f} "
              f"overhead_vs_old={min(ts) / base - 1:.3f}")  # fmt: skip


if __name__ == "__main__":
    main()
