"""Wall time of `qkcov run` on the default model: 240 agreement records (~20 tokens), 3 auto
heads, and what the significance statistics (permutation null + bootstrap) add to it.

Prints ``run_seconds=`` (defaults) and ``stats_overhead=`` (defaults ÷ the same run with
``--n-permutations 0 --n-bootstrap 0``, minus 1), measured in one process on one loaded model.
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
    lm = load_model("smollm2-135m")
    records = build_task_records("agreement", n=240)
    n_tokens = [len(lm.tokenizer(r.prompt)["input_ids"]) for r in records]
    print(f"records={len(records)} mean_tokens={sum(n_tokens) / len(n_tokens):.1f}")
    cfg = RunConfig(heads="auto:3")
    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, c in (
            ("defaults", cfg),
            ("no_stats", dataclasses.replace(cfg, n_permutations=0, n_bootstrap=0)),
        ):
            t0 = time.perf_counter()
            result = run(c, records, Path(tmp) / name, quiet=True, loaded=(lm.model, lm.tokenizer))
            times[name] = time.perf_counter() - t0
            print(f"[{name}] {times[name]:.1f} s; phases {result.timings}")
            print(result.summary())
    print(f"run_seconds={times['defaults']:.1f}")
    print(f"stats_overhead={times['defaults'] / times['no_stats'] - 1:.3f}")


if __name__ == "__main__":
    main()
