"""Calibration of the rank test on real per-record statistics: the default model's agreement
contrast (240 records), three heads (the ones the scan picks on real labels). Each coin-flip
seed relabels the records (a record's positive and negative keys exchanged with probability
1/2), which is a draw from the null whatever the data: the fraction of seeds found significant
is the test's false-positive rate on real structure. Also prints the real labels' test.

Usage: python benchmarks/significance_calibration_real.py [n_seeds] [cache.safetensors]
(default 40 seeds; with a cache path the per-record statistics are saved there on the first
run and read back on later ones, so the model is not loaded again).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from qkcov.artifacts import load_tensors, read_tensor_metadata, save_tensors
from qkcov.core.statistics import RecordStats, bootstrap, permutation_null, significance
from qkcov.engine.contrast import resolve_records, run_contrast
from qkcov.models.loading import load_model
from qkcov.tasks.builtin import build_task_records

HEADS = [(13, 8), (25, 2), (13, 6)]


def main() -> None:
    n_seeds = int(sys.argv[1]) if len(sys.argv) > 1 else 40
    cache = Path(sys.argv[2]) if len(sys.argv) > 2 else None
    names = [f"L{la}H{h}." for la, h in HEADS]
    if cache is not None and cache.is_file():
        tensors, groups = load_tensors(cache), read_tensor_metadata(cache)["groups"]
        stats = [RecordStats.from_tensors(tensors, groups, p) for p in names]
    else:
        lm = load_model("smollm2-135m")
        resolved = resolve_records(lm.tokenizer, build_task_records("agreement", n=240))
        res = run_contrast(
            lm.model, lm.tokenizer, resolved, HEADS, keep_records=True, progress=False
        )
        stats = [res.record_stats[h] for h in HEADS]
        if cache is not None:
            tensors = {
                k: v
                for p, st in zip(names, stats, strict=True)
                for k, v in st.to_tensors(p).items()
            }
            save_tensors(cache, tensors, {"groups": stats[0].groups})
    for head, st in zip(HEADS, stats, strict=True):
        start = time.perf_counter()
        sig = significance(st.delta(), permutation_null(st, 200, seed=1))
        boot = bootstrap(st, 200, seed=2)
        sec = time.perf_counter() - start
        print(
            f"L{head[0]}H{head[1]} real: p={sig.p_value:.4f} rank_null={sig.rank_null} "
            f"rank_parallel={sig.rank_parallel} rank_energy={sig.rank_energy} "
            f"rank_ci={boot.rank_ci} (percentile {boot.rank_ci_percentile}) "
            f"distinct={sig.n_distinct}/{sig.n_records} null+bootstrap {sec:.1f} s"
        )
        both = st.has_pos & st.has_neg
        hits = hits_raw = 0
        ranks = []
        for seed in range(n_seeds):
            g = torch.Generator().manual_seed(seed)
            flip = both & (torch.rand(st.n, generator=g) < 0.5)
            signs = torch.where(flip, -1.0, 1.0).double()
            s = significance(st.delta(signs=signs), permutation_null(st, 200, seed=100 + seed))
            hits += s.significant
            hits_raw += s.p_value_raw_top < 0.05
            ranks.append(s.rank_null)
        print(
            f"L{head[0]}H{head[1]} coin-flip, {n_seeds} seeds: significant {hits / n_seeds:.3f} "
            f"(raw top p < 0.05: {hits_raw / n_seeds:.3f}), max rank {max(ranks)}"
        )


if __name__ == "__main__":
    main()
