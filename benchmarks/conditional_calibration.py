"""Calibration of the conditional (stratified) label tests and the verdict on planted heads.

    PYTHONPATH=src python benchmarks/conditional_calibration.py [--seeds 400] [--only DESIGN:CONTROLS ...] [--out DIR]

Designs (tests/core/planted_conditional.py): a class feature (``feature``), labels that are a
function of the offset (``offset``), labels leaning on the offset without a feature
(``tilted``: the false-positive rate of the stratified tests, with a dominant shared query
direction and a head that reads position), coin-flip labels (``null``) and a rival attribute
that fully explains the labels (``role``). Each run: 99 label-permuted draws, 99 random
subspaces, 99 null draws, α = 0.05. ``--only feature:offset tilted:none`` runs some
design:controls pairs (one JSON each in ``--out``; several processes can share the work);
the table is printed from every JSON in ``--out``: the share of each verdict, the rejection
rates of the label test and of the label-permuted swap (± binomial standard error) and the
effect quantiles behind the effect floors.
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

RUNS = (
    "feature:offset", "offset:offset", "tilted:offset", "tilted:none", "null:offset",
    "role:offset,role", "role:offset",
)  # fmt: skip


def _q(xs: list[float], p: float) -> float:
    return float(torch.quantile(torch.tensor(xs, dtype=torch.float64), p))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=400)
    ap.add_argument("--only", nargs="*", default=list(RUNS))
    ap.add_argument("--out", type=Path, default=Path("conditional_calibration"))
    args = ap.parse_args()
    torch.set_num_threads(1)
    args.out.mkdir(parents=True, exist_ok=True)
    for run in args.only:
        design, ctl = run.split(":")
        control = () if ctl == "none" else tuple(ctl.split(","))
        t0 = time.perf_counter()
        r = rates([design], range(args.seeds), control=control, n_perm=99, n_random=99, n_null=99)
        r = r[design] | {"seconds": time.perf_counter() - t0, "run": run}
        (args.out / f"{run.replace(':', '_').replace(',', '+')}.json").write_text(json.dumps(r))
        print(f"{run}: {r['seconds']:.0f} s", flush=True)
    print("| design : controls | seeds | verdicts | label test rejects | permuted swap rejects | "
          "mixed | label effect − permuted: 1 % / 50 % / 99 % | Δp − random: 1 % / 50 % / 99 % |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for path in sorted(args.out.glob("*.json")):
        r = json.loads(path.read_text())
        st = ", ".join(f"{k} {v:.3f}" for k, v in sorted(r["status"].items(), key=lambda x: -x[1]))
        se = math.sqrt(max(r["label_reject"] * (1 - r["label_reject"]), 1e-12) / r["n"])
        le, sw = r["label_effect"], r["swap_effect"]
        print(f"| {r['run']} | {r['n']} | {st} | {r['label_reject']:.3f} ± {se:.3f} | "
              f"{r['permuted_reject']:.3f} | {r['mixed']:.2f} | {_q(le, .01):.3f} / {_q(le, .5):.3f} / "
              f"{_q(le, .99):.3f} | {_q(sw, .01):.3f} / {_q(sw, .5):.3f} / {_q(sw, .99):.3f} |")  # fmt: skip


if __name__ == "__main__":
    main()
