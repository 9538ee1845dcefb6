"""Wall time saved by explicit ``--heads``: only the named heads' layers are computed for the
swap targets (the forward stops after the deepest one) instead of the all-head scan.

240 agreement records on the default model, ``--heads L13H8``, in one process on one loaded
model: the same run with the explicit-heads path and with the all-layer scan it replaced
(``attention_rows`` forced to every layer). Prints both scan-phase and whole-run times and
their ratios, and checks the two runs give identical numbers.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from pathlib import Path

import qkcov.engine.scan as scan
from qkcov.models.loading import load_model
from qkcov.pipeline import RunConfig, run
from qkcov.tasks.builtin import build_task_records


def main() -> None:
    lm = load_model("smollm2-135m")
    records = build_task_records("agreement", n=240)
    cfg = RunConfig(heads="L13H8", n_permutations=50, n_bootstrap=0, n_random=20)
    original = scan.attention_rows

    def all_layers(*args, **kwargs):
        kwargs["layers"] = None  # the former path: every layer's rows
        return original(*args, **kwargs)

    times, scans, summaries = {}, {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fn in (("explicit", original), ("all_heads", all_layers)):
            scan.attention_rows = fn
            try:
                t0 = time.perf_counter()
                res = run(dataclasses.replace(cfg), records, Path(tmp) / name, quiet=True,
                          loaded=(lm.model, lm.tokenizer))  # fmt: skip
                times[name] = time.perf_counter() - t0
            finally:
                scan.attention_rows = original
            scans[name] = res.timings.get("scan", 0.0)
            summaries[name] = res.summary()
            print(f"[{name}] run {times[name]:.1f} s, scan phase {scans[name]:.2f} s")
    assert summaries["explicit"] == summaries["all_heads"], "the two paths disagree"
    print(summaries["explicit"])
    print(
        f"scan_saved_s={scans['all_heads'] - scans['explicit']:.1f} "
        f"scan_ratio={scans['all_heads'] / max(scans['explicit'], 1e-9):.1f}x "
        f"run_saved_s={times['all_heads'] - times['explicit']:.1f} "
        f"run_ratio={times['all_heads'] / times['explicit']:.2f}x"
    )


if __name__ == "__main__":
    main()
