"""Significance on real data: real labels vs a coin-flip relabelling (each record's positive and
negative keys exchanged with probability 1/2, so no feature separates them), on the default
model, for the agreement task (240 records), the built-in filter task and a list-retrieval
contrast (96 prompts "Cities: <five capitals>. The capital of <country> is"; positive: the
right city, negatives: the other four), where one shared query direction dominates the null.

Usage: python benchmarks/significance_real.py [agreement] [filter] [list]. Prints per task, label set and head: p-value, rank (null rule), rank (energy), rank 95 % CI, the
former raw parallel-analysis rank and raw top p,
stability of the pooled ΔC, and the Bonferroni-combined p of the per-group ΔCs. The heads are chosen once by the scan on the real labels and kept for the coin flip.
"""

from __future__ import annotations

import random
import sys

from qkcov.models.loading import load_model
from qkcov.pipeline import analyze
from qkcov.tasks.builtin import build_task_records
from qkcov.tasks.records import ContrastRecord, coin_flip

CAPITALS = {
    "France": "Paris", "Italy": "Rome", "Japan": "Tokyo", "Egypt": "Cairo", "Peru": "Lima",
    "Spain": "Madrid", "Germany": "Berlin", "Russia": "Moscow", "China": "Beijing",
    "Greece": "Athens", "Kenya": "Nairobi", "Canada": "Ottawa",
}  # fmt: skip


def list_records(n: int = 96, seed: int = 0) -> list[ContrastRecord]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        countries = rng.sample(list(CAPITALS), 5)
        ask = rng.choice(countries)
        prompt = f"Cities: {', '.join(CAPITALS[c] for c in countries)}. The capital of {ask} is"
        out.append(
            ContrastRecord.from_dict(
                {
                    "prompt": prompt,
                    "positives": [{"text": CAPITALS[ask]}],
                    "negatives": [{"text": CAPITALS[c]} for c in countries if c != ask],
                }
            )
        )
    return out


def main() -> None:
    lm = load_model("smollm2-135m")
    tasks = {
        "agreement": build_task_records("agreement", n=240),
        "filter": build_task_records("filter"),
        "list": list_records(),
    }
    wanted = sys.argv[1:] or list(tasks)
    for task, records in tasks.items():
        if task not in wanted:
            continue
        real = analyze(lm.model, lm.tokenizer, records, heads="auto:3", steps="", progress=False)
        heads = ",".join(h.name for h in real.heads)
        flip = analyze(
            lm.model, lm.tokenizer, coin_flip(records), heads=heads, steps="", progress=False
        )
        for label, res in (("real", real), ("coin-flip", flip)):
            sub = res.timings.get("subspaces", float("nan"))
            print(f"{task} {label}: subspaces + statistics {sub:.1f} s of {res.seconds:.1f} s")
            for h in res.heads:
                s = h.headline.significance
                print(
                    f"{task:9s} {label:9s} {h.name:6s} p={s['p_value']:.4f} rank_null={h.headline.rank} "
                    f"rank_energy={s['rank_energy']} rank_ci={s['rank_ci']} "
                    f"rank_parallel={s.get('rank_parallel')} p_raw_top={s.get('p_value_raw_top')} "
                    f"stability_deg={s['stability_deg'] if s['stability_deg'] is None else round(s['stability_deg'], 1)} "
                    f"significant={s['significant']} "
                    f"groups_p={next(iter(h.features.values())).groups_p_value}"
                )


if __name__ == "__main__":
    main()
