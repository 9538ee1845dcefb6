"""Wall time of `qkcov run` on the default model: 240 agreement records (~20 tokens), 3 auto
heads, and what the significance statistics (permutation null + bootstrap) and the causal
tests (label-permuted baselines, centroid patch, causal rank curve) add to it.

``--causal-only`` skips the no-statistics run. Prints ``run_seconds=`` (defaults) and ``stats_overhead=`` (time of the permutation null and
bootstrap ÷ the rest of the run), plus the whole-run ratio against ``--n-permutations 0
--n-bootstrap 0``; ``causal_overhead=`` (defaults ÷ ``--n-permuted 0 --causal-max-rank 0``
− 1, whole runs) and ``causal_overhead_phases=`` (the extra time of the swaps and subspaces
phases ÷ the rest of the run, robust to noise elsewhere), measured in one process on one
loaded model.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

from qkcov.models.loading import load_model
from qkcov.pipeline import RunConfig, run
from qkcov.tasks.builtin import build_task_records


def main() -> None:
    import sys

    causal_only = "--causal-only" in sys.argv  # skip the no-statistics run
    lm = load_model("smollm2-135m")
    records = build_task_records("agreement", n=240)
    n_tokens = [len(lm.tokenizer(r.prompt)["input_ids"]) for r in records]
    print(f"records={len(records)} mean_tokens={sum(n_tokens) / len(n_tokens):.1f}")
    cfg = RunConfig(heads="auto:3")
    times, phases = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, c in (
            ("defaults", cfg),
            ("no_stats", dataclasses.replace(cfg, n_permutations=0, n_bootstrap=0)),
            ("no_causal", dataclasses.replace(cfg, n_permuted=0, causal_max_rank=0)),
        ):
            if causal_only and name == "no_stats":
                continue
            t0 = time.perf_counter()
            result = run(c, records, Path(tmp) / name, quiet=True, loaded=(lm.model, lm.tokenizer))
            times[name] = time.perf_counter() - t0
            phases[name] = result.timings
            print(f"[{name}] {times[name]:.1f} s; phases {result.timings}")
            print(result.summary())
    print(f"run_seconds={times['defaults']:.1f}")
    if not causal_only:
        print(
            f"stats_overhead_wall={times['defaults'] / times['no_stats'] - 1:.3f} (whole runs; noisy)"
        )
        # the null and the bootstrap run in the "subspaces" phase (record statistics are kept
        # during the ΔC capture at no measurable cost): their share, robust to noise elsewhere
        extra = phases["defaults"]["subspaces"] - phases["no_stats"]["subspaces"]
        print(f"stats_overhead={extra / (times['defaults'] - extra):.3f}")
    print(f"causal_overhead={times['defaults'] / times['no_causal'] - 1:.3f} (whole runs; noisy)")
    extra = sum(phases["defaults"][k] - phases["no_causal"][k] for k in ("swaps", "subspaces"))
    print(f"causal_overhead_phases={extra / (times['defaults'] - extra):.3f}")


if __name__ == "__main__":
    main()
