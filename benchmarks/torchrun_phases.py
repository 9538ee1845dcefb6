"""Per-rank work of every phase under torchrun: the same `qkcov run` (default model, agreement
records, 3 auto heads) on 1 and on N processes (gloo on CPU, one thread per process so that
a rank's seconds measure its own work), each rank printing its own phase timings.

Prints, per phase, the seconds of every rank and ``per_rank_ratio`` = the slowest rank of the
N-process run ÷ the one-process run (1/N when a phase is split evenly; 1 when every rank
repeats it). Phases that do no forward are offline math on gathered results and may repeat.

    python benchmarks/torchrun_phases.py [--records 480] [--nproc 2] [--heads auto:3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

MARK = "PHASES "


def _worker(args: argparse.Namespace) -> None:
    from qkcov.models.loading import load_model
    from qkcov.pipeline import RunConfig, run
    from qkcov.tasks.builtin import build_task_records

    lm = load_model("smollm2-135m")
    records = build_task_records("agreement", n=args.records)
    cfg = RunConfig(heads=args.heads)
    result = run(cfg, records, args.out, quiet=True, loaded=(lm.model, lm.tokenizer))
    rank = int(os.environ.get("RANK", "0"))
    print(MARK + json.dumps({"rank": rank, "timings": result.timings}), flush=True)


def _launch(nproc: int, args: argparse.Namespace, out: Path) -> list[dict]:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", __file__, "--worker", "--records", str(args.records),
           "--heads", args.heads, "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise SystemExit(f"torchrun with {nproc} processes failed:\n{proc.stderr[-3000:]}")
    rows = [
        json.loads(line[len(MARK) :]) for line in proc.stdout.splitlines() if line.startswith(MARK)
    ]
    return sorted(rows, key=lambda r: r["rank"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=480)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--heads", default="auto:3")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return _worker(args)
    with tempfile.TemporaryDirectory() as tmp:
        one = _launch(1, args, Path(tmp) / "one")[0]["timings"]
        many = _launch(args.nproc, args, Path(tmp) / "many")
    print(f"records={args.records} heads={args.heads} nproc={args.nproc} (OMP_NUM_THREADS=1)")
    print(f"{'phase':<14}{'1 proc':>9}" + "".join(f"{'rank ' + str(r['rank']):>9}" for r in many)
          + f"{'per_rank_ratio':>16}")  # fmt: skip
    for phase, t1 in one.items():
        ranks = [r["timings"].get(phase, 0.0) for r in many]
        ratio = max(ranks) / t1 if t1 > 0.05 else float("nan")
        print(f"{phase:<14}{t1:>9.2f}" + "".join(f"{t:>9.2f}" for t in ranks) + f"{ratio:>16.2f}")
    tot1, totn = sum(one.values()), max(sum(r["timings"].values()) for r in many)
    print(f"per_rank_ratio_total={totn / tot1:.2f} (1/{args.nproc} = {1 / args.nproc:.2f} is even)")


if __name__ == "__main__":
    main()
