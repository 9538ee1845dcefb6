"""Time `qkcov binding` with its defaults on the default model (requirement: <= 240 s, 2 cores).

Usage: python benchmarks/binding_time.py [--model NAME] [--out DIR] [--pairs N]   (not a test)

Runs the CLI command in this process (model loading included), then prints the per-phase
timings from binding.json and one line
``binding_seconds=<wall> cpu_seconds=<process cpu> threads=<torch threads> accuracy=<a>
chance=<c> head=<best> order_delta_p=<x> random_delta_p=<mean±std> explained=<f>``.
Wall time depends on other load on the machine; cpu_seconds / threads estimates the wall
time of an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from qkcov.artifacts import read_json
from qkcov.cli import main as cli_main
from qkcov.models.loading import DEFAULT_MODEL


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=DEFAULT_MODEL, help="model (default %(default)s)")
    parser.add_argument("--out", type=Path, default=None, help="keep artifacts (default: temp)")
    parser.add_argument("--pairs", type=int, default=None, help="pairs (default: the CLI's)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        argv = ["binding", "--model", args.model, "--out", str(out), "--quiet"]
        if args.pairs is not None:
            argv += ["--pairs", str(args.pairs)]
        c0, t0 = time.process_time(), time.perf_counter()
        rc = cli_main(argv)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if rc != 0:
            raise SystemExit(f"qkcov binding failed with exit status {rc}")
        info = read_json(out / "binding.json")
    for phase, sec in info["timings"].items():
        print(f"{phase:24s} {sec:8.1f}s")
    best = info["heads"][0]
    rnd = best["random"]["order"]["delta_p"]
    print(
        f"binding_seconds={wall:.1f} cpu_seconds={cpu:.1f} threads={torch.get_num_threads()} "
        f"accuracy={info['accuracy']['accuracy']:.3f} chance={info['accuracy']['chance']:.3f} "
        f"head={best['name']} order_delta_p={best['swap']['order']['delta_p']:.3f} "
        f"random_delta_p={rnd['mean']:.3f}±{rnd['std']:.3f} "
        f"explained={best['explained_fraction']:.3f}"
    )


if __name__ == "__main__":
    main()
