"""Verdicts on real contrasts on the default model: both swap baselines (random and
label-permuted subspaces), the label-sensitive centroid patch, the causal rank and the verdict
of each auto-selected head, for a contrast and its coin-flip relabelling.

``python benchmarks/causal_real.py agreement|name-mover|name-mover-io-first|list|filter|binding
[--n N] [--out DIR]`` prints one line
per head and contrast; a coin-flip relabelling (each record's positive and negative swapped by
a fair coin) should get ``no-evidence``.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from qkcov.models.loading import load_model
from qkcov.pipeline import RunConfig, run
from qkcov.tasks.builtin import build_task_records
from qkcov.tasks.records import coin_flip

sys.path.insert(0, str(Path(__file__).parent))
from name_mover import build as build_name_mover  # noqa: E402


def _f(x, nd=3):
    return "–" if x is None else f"{x:.{nd}f}"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument(
        "task",
        choices=["agreement", "name-mover", "name-mover-io-first", "list", "filter", "binding"],
    )
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--out", default=None)
    p.add_argument("--only", choices=["real", "coin-flip"], default=None)
    p.add_argument(
        "--heads", default=None, help="heads to study (default: auto:3 on the real labels, "
        "then the same heads for the coin-flip relabelling)",
    )  # fmt: skip
    a = p.parse_args()
    lm = load_model("smollm2-135m")
    if a.task in ("agreement", "filter", "binding"):
        real = build_task_records(a.task, n=a.n)
    elif a.task == "list":  # five capitals listed, "The capital of X is" (significance_real.py)
        from significance_real import list_records

        real = list_records(a.n)
    else:
        real = build_name_mover(a.n, seed=0, io_first=a.task.endswith("io-first"))
    out_root = Path(a.out or tempfile.mkdtemp())
    heads = a.heads or "auto:3"
    for label, recs in (("real", real), ("coin-flip", coin_flip(real, seed=1))):
        if a.only not in (None, label):
            continue
        t0 = time.perf_counter()
        res = run(RunConfig(heads=heads), recs, out_root / f"{a.task}-{label}", quiet=True,
                  loaded=(lm.model, lm.tokenizer))  # fmt: skip
        heads = ",".join(h.name for h in res.heads)  # the coin-flip run studies the same heads
        print(f"== {a.task} {label}: {len(recs)} records, {time.perf_counter() - t0:.0f} s")
        print(res.summary())
        for h in res.to_dict()["heads"]:
            ev = h["verdict"]["evidence"]
            print(
                f"{a.task} {label} {h['name']}: verdict={h['verdict']['status']} "
                f"p_null={_f(ev.get('p_null'))} rank_null={ev.get('rank_null')} "
                f"rank_energy={ev.get('rank_energy')} causal_rank={ev.get('causal_rank')} "
                f"dp={_f(ev.get('delta_p'))} ci={ev.get('delta_p_ci')} random={_f(ev.get('random_mean'))} "
                f"p_random={_f(ev.get('p_vs_random'))} permuted={_f(ev.get('permuted_mean'))} "
                f"p_permuted={_f(ev.get('p_vs_permuted'))} label={_f(ev.get('label_effect'))} "
                f"label_perm={_f(ev.get('label_permuted_mean'))} p_label={_f(ev.get('p_label'))} "
                f"full={_f(ev.get('full_key'))}"
            )  # fmt: skip


if __name__ == "__main__":
    main()
