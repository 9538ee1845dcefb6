"""Calibration of the conditional (stratified) label tests and the verdict on planted heads.

    PYTHONPATH=src python benchmarks/conditional_calibration.py [--seeds 400]

Designs (tests/core/planted_conditional.py): a class feature, labels that are a function of
the offset, labels leaning on the offset without a feature (``tilted``: the false-positive
rate of the stratified tests, with a dominant shared query direction and a head that reads
position), coin-flip labels (``null``), and a rival attribute (``role``) that fully explains
the labels. Defaults of a run: 99 label-permuted draws, 99 random subspaces, 199 null draws.
Prints per design the share of each verdict, the rejection rates of the label test and of the
label-permuted swap at α = 0.05 (± binomial standard error) and the effect quantiles behind
the effect floors.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "core"))

from planted_conditional import rates  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=400)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    seeds = range(args.seeds)
    kw = dict(n_perm=99, n_random=99, n_null=199)
    t0 = time.perf_counter()
    runs = {
        "feature (offset)": rates(["feature"], seeds, **kw)["feature"],
        "offset (offset)": rates(["offset"], seeds, **kw)["offset"],
        "tilted (offset)": rates(["tilted"], seeds, **kw)["tilted"],
        "tilted (no control)": rates(["tilted"], seeds, control=(), **kw)["tilted"],
        "null (offset)": rates(["null"], seeds, **kw)["null"],
        "role (offset,role)": rates(["role"], seeds, control=("offset", "role"), **kw)["role"],
        "role (offset)": rates(["role"], seeds, **kw)["role"],
    }
    secs = time.perf_counter() - t0

    def q(xs: list[float], p: float) -> float:
        return float(torch.quantile(torch.tensor(xs, dtype=torch.float64), p))

    print(f"{args.seeds} seeds per design, α = 0.05, {secs:.0f} s")
    print(
        "| design (controls) | verdicts | label test rejects | permuted swap rejects | "
        "mixed | label effect − permuted: 1 % / 50 % / 99 % | Δp − random: 1 % / 50 % / 99 % |"
    )
    print("|---|---|---|---|---|---|---|")
    for name, r in runs.items():
        st = ", ".join(f"{k} {v:.3f}" for k, v in sorted(r["status"].items(), key=lambda x: -x[1]))
        se = math.sqrt(max(r["label_reject"] * (1 - r["label_reject"]), 1e-12) / r["n"])
        le, se_ = r["label_effect"], r["swap_effect"]
        print(f"| {name} | {st} | {r['label_reject']:.3f} ± {se:.3f} | {r['permuted_reject']:.3f} | "
              f"{r['mixed']:.2f} | {q(le, .01):.3f} / {q(le, .5):.3f} / {q(le, .99):.3f} | "
              f"{q(se_, .01):.3f} / {q(se_, .5):.3f} / {q(se_, .99):.3f} |")  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
