"""Time the full Fig. 2 grid (18 cells: N, M ∈ {3, 5, 7} × binary/gaussian), as `qkcov toy ranks`.

Usage: python benchmarks/toy_grid.py [--out DIR] [--seed S]   (not a test)

Prints one row per cell, then
``grid_seconds=<s> cells=<n> exact_ranks=<k> min_val_acc=<x> max_analytic_err=<y>``.
Requirement: exact ranks in every cell, val_acc >= 0.95, analytic error < 0.05, <= 180 s.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from qkcov.toy.experiments import grid_configs, run_ranks
from qkcov.toy.model import TrainConfig


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--out", type=Path, default=None, help="keep artifacts here (default: temp dir)"
    )
    parser.add_argument("--seed", type=int, default=0, help="grid seed (default 0)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        t0 = time.perf_counter()
        rows = run_ranks(
            out,
            grid_configs(seed=args.seed),
            TrainConfig(seed=args.seed),
            progress=False,
        )
        total = time.perf_counter() - t0
    head = f"{'variant':9s} {'norm':6s} {'N':>2s} {'M':>2s} {'r1':>3s} {'r2':>3s} {'val_acc':>8s} {'oracle':>7s} {'err_z1':>7s} {'err_z2':>7s} {'steps':>5s}"
    print(head)
    for r in rows:
        norm = r["latent_norm"] if r["variant"] == "gaussian" else "-"
        print(
            f"{r['variant']:9s} {norm:6s} {r['N']:2d} {r['M']:2d} {r['rank_z1']:3d} {r['rank_z2']:3d} "
            f"{r['val_accuracy']:8.4f} {r['oracle_accuracy']:7.4f} {r['analytic_rel_err_z1']:7.4f} "
            f"{r['analytic_rel_err_z2']:7.4f} {r['steps']:5d}"
        )
    exact = sum(r["rank_z1"] == r["N"] and r["rank_z2"] == r["M"] for r in rows)
    min_acc = min(r["val_accuracy"] for r in rows)
    worst = max(max(r["analytic_rel_err_z1"], r["analytic_rel_err_z2"]) for r in rows)
    print(
        f"grid_seconds={total:.1f} cells={len(rows)} exact_ranks={exact} "
        f"min_val_acc={min_acc:.4f} max_analytic_err={worst:.4f}"
    )


if __name__ == "__main__":
    main()
