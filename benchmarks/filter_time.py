"""Wall-clock of ``qkcov filter`` with default settings (target: <= 4 minutes on 2 CPU cores).

Not a test. Usage::

    python benchmarks/filter_time.py [--model smollm2-135m] [--out DIR] [--threads 2]

Prints the per-stage timings recorded in ``filter.json`` and the total, model load included.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from qkcov.artifacts import read_json
from qkcov.cli import main as cli_main
from qkcov.models.loading import DEFAULT_MODEL

BUDGET_S = 240.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=DEFAULT_MODEL)
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: a temp dir)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out or Path(tempfile.mkdtemp(prefix="qkcov-filter-bench-"))
    t0 = time.perf_counter()
    code = cli_main(["filter", "--model", args.model, "--out", str(out), "--quiet"])
    wall = time.perf_counter() - t0
    if code != 0:
        print(f"qkcov filter failed with exit code {code}")
        return code
    info = read_json(out / "filter.json")
    report = {
        "model": args.model,
        "threads": args.threads,
        "wall_s": round(wall, 1),
        "budget_s": BUDGET_S,
        "within_budget": wall <= BUDGET_S,
        "stages_s": info["timings_s"],
        "n_records": info["n_records"],
        "best_head": info["best_head"],
        "out": str(out),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
