"""What the causal tests (label-permuted baselines, centroid patch, causal rank curve) add to
`qkcov run` at the defaults: 240 agreement records on the default model, 3 heads (those the
scan picks), the whole analysis alternated with and without them (``--n-permuted 0
--causal-max-rank 0``) ``--reps`` times in one process; the minimum of each (robust to other
load on the machine) gives ``causal_overhead=`` (whole analysis) and ``causal_overhead_swaps=``
(extra swap-phase time ÷ the analysis without the tests). Artifacts are not written.
"""

from __future__ import annotations

import argparse
import dataclasses

from qkcov.models.loading import load_model
from qkcov.pipeline import RunConfig, _analyze, plan_records
from qkcov.runtime import Timer
from qkcov.tasks.builtin import build_task_records


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--n", type=int, default=240)
    a = p.parse_args()
    lm = load_model("smollm2-135m")
    records = build_task_records("agreement", n=a.n)
    cfg = RunConfig(heads="auto:3")
    configs = {
        "defaults": cfg,
        "no_causal": dataclasses.replace(cfg, n_permuted=0, causal_max_rank=0),
    }
    total = {k: [] for k in configs}
    swaps = {k: [] for k in configs}
    for rep in range(a.reps):
        for name, c in configs.items():
            t = Timer("run", quiet=True)
            res = _analyze(lm.model, lm.tokenizer, plan_records(records, c), c, t, "smollm2-135m")
            total[name].append(t.total())
            swaps[name].append(t.seconds["swaps"])
            print(f"[{name} {rep}] {t.total():.1f} s; phases "
                  f"{ {k: round(v, 1) for k, v in t.seconds.items()} }; heads "
                  f"{[h.name for h in res.heads]}", flush=True)  # fmt: skip
    t_d, t_n = min(total["defaults"]), min(total["no_causal"])
    extra = min(swaps["defaults"]) - min(swaps["no_causal"])
    print(f"analysis_seconds defaults={t_d:.1f} no_causal={t_n:.1f}")
    print(f"causal_overhead={t_d / t_n - 1:.3f}")
    print(f"causal_overhead_swaps={extra / t_n:.3f}")


if __name__ == "__main__":
    main()
