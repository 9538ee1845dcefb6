"""Swap engine speed and memory: full-forward reference vs the fast engine (``run_swaps``).

Default model (SmolLM2-135M), one head at layer 22 of 30, 32 filter prompts, 2 subspace
conditions. Times, on the same prompts/conditions:

- reference (one full forward per condition and draw, ``tests/_swap_reference.py``) vs fast
  at ``n_random=10, n_random_downstream=3`` -> ``swap_speedup=``;
- fast at ``n_random=100`` (reference at 100 draws is extrapolated from its measured cost per
  condition-forward, which is linear in the number of conditions; ``--measure-old-100``
  measures it instead);
- fast with every draw measured downstream (``n_random_downstream = n_random = 10``).

Peak memory of the swap phase (peak RSS above the RSS after loading, sampled every ms, in a
fresh child process) for a tiny Llama at vocab 103 and 50,000, reference vs fast.

    python benchmarks/swap_speed.py [--prompts 32] [--layer 22] [--head 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from _swap_reference import _run_swaps_reference  # noqa: E402
from qkcov.core.subspace import random_orthonormal  # noqa: E402
from qkcov.engine.contrast import resolve_records  # noqa: E402
from qkcov.engine.scan import attention_rows  # noqa: E402
from qkcov.engine.swaps import run_swaps, swap_pairs  # noqa: E402
from qkcov.tasks import build_filter_records  # noqa: E402
from qkcov.tasks.filter import FilterTaskConfig  # noqa: E402

CATS = ("fruits", "animals", "vehicles", "countries")


def _setup(model, tok, n: int, layer: int, head: int, head_dim: int):
    build, _ = build_filter_records(FilterTaskConfig(categories=CATS, n_build=n, n_heldout=0))
    resolved = resolve_records(tok, build)
    rows = attention_rows(model, tok, resolved, batch_size=8, progress=False)
    pairs = swap_pairs(resolved, rows[:, layer, head], seed=0)
    bases = {
        "sub4": random_orthonormal(head_dim, 4, seed=1),
        "sub12": random_orthonormal(head_dim, 12, seed=2),
    }
    return resolved, pairs, bases


def _timed(fn) -> tuple[float, dict]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _memory_child(mode: str, vocab: int) -> None:
    from qkcov.models.tiny import tiny_model, tiny_tokenizer

    model, tok = tiny_model("llama", vocab_size=vocab), tiny_tokenizer()
    resolved, pairs, bases = _setup(model, tok, 32, 1, 1, 16)
    fn = _run_swaps_reference if mode == "old" else run_swaps
    base = _rss_mib()
    peak, stop = [base], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    fn(model, tok, resolved, 1, 1, pairs, bases, n_random=10, progress=False)
    stop.set()
    t.join()
    print(json.dumps({"peak_above_loaded_mib": peak[0] - base}))


def _memory(mode: str, vocab: int) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", mode, "--vocab", str(vocab)],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_above_loaded_mib"]


def _print_memory() -> None:
    for vocab in (103, 50_000):
        m_old, m_new = _memory("old", vocab), _memory("new", vocab)
        print(f"peak_mib vocab={vocab}: reference={m_old:.1f} fast={m_new:.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--layer", type=int, default=22)
    p.add_argument("--head", type=int, default=3)
    p.add_argument("--measure-old-100", action="store_true")
    p.add_argument("--memory-only", action="store_true", help="only the tiny-model memory part")
    p.add_argument("--memory-child", choices=["old", "new"], help=argparse.SUPPRESS)
    p.add_argument("--vocab", type=int, default=103, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        _memory_child(args.memory_child, args.vocab)
        return

    if args.memory_only:
        _print_memory()
        return
    from qkcov.models.loading import load_model

    loaded = load_model("smollm2-135m")
    model, tok, info = loaded.model, loaded.tokenizer, loaded.info
    resolved, pairs, bases = _setup(model, tok, args.prompts, args.layer, args.head, info.head_dim)
    L, H = args.layer, args.head
    common = dict(batch_size=8, progress=False)

    def run(**kw):
        return run_swaps(model, tok, resolved, L, H, pairs, bases, **common, **kw)

    def old(**kw):
        return _run_swaps_reference(model, tok, resolved, L, H, pairs, bases, **common, **kw)

    print(f"torch threads={torch.get_num_threads()} prompts={len(resolved)} head=L{L}H{H}")
    run(n_random=2, n_random_downstream=1)  # warm-up
    t_old10, _ = _timed(lambda: old(n_random=10))
    t_new10, _ = _timed(lambda: run(n_random=10, n_random_downstream=3))
    t_new100, _ = _timed(lambda: run(n_random=100, n_random_downstream=3))
    t_all10, _ = _timed(lambda: run(n_random=10, n_random_downstream=10))
    k = len(bases)
    conds = lambda r: 1 + k + k * r + 1  # noqa: E731  reference forwards per batch
    if args.measure_old_100:
        t_old100, _ = _timed(lambda: old(n_random=100))
        how = "measured"
    else:
        t_old100, how = t_old10 * conds(100) / conds(10), "extrapolated"
    print(f"reference n_random=10: {t_old10:.2f}s ({conds(10)} full forwards per batch)")
    print(f"fast n_random=10 n_random_downstream=3: {t_new10:.2f}s")
    print(f"fast n_random=100 n_random_downstream=3: {t_new100:.2f}s")
    print(f"fast n_random=10 n_random_downstream=10: {t_all10:.2f}s")
    print(f"reference n_random=100 ({how}): {t_old100:.2f}s")
    print(f"swap_speedup_n100={t_old100 / t_new100:.2f} ({how} reference)")
    print(f"swap_speedup_all_downstream={t_old10 / t_all10:.2f}")
    _print_memory()
    print(f"swap_speedup={t_old10 / t_new10:.2f}")


if __name__ == "__main__":
    main()
