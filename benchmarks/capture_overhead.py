"""Capture overhead: bare forward vs capture + ΔC accumulation (all heads of 4 layers).

Same batches through (a) a bare forward and (b) ``capture_qk`` with ``on_capture``
accumulating into :class:`ContrastiveCovariance` (one per layer, a group per head); both
compute only the last-token logits. Timing is interleaved (bare, capture, bare, ...) and the
median of the per-pair ratios is reported (medians and minima are printed too). Peak memory of each mode is measured in a fresh child process
(peak RSS above the RSS right after loading, sampled every millisecond). The last line is
``overhead_ratio=<capture time / bare time>``.

    python benchmarks/capture_overhead.py [--model smollm2-135m] [--repeats 7]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time

import torch

from qkcov.core.covariance import ContrastiveCovariance
from qkcov.models.capture import QKSites, capture_qk, position_ids_from_mask, tokenize_batch
from qkcov.models.loading import DEFAULT_MODEL, format_prompt, load_model
from qkcov.models.positions import find_span

ITEMS = ["apple", "dog", "car", "banana", "France", "cat", "truck", "cherry", "Spain", "horse"]


def _prompts(tok, n: int) -> tuple[list[str], QKSites]:
    texts, keys = [], []
    for i in range(n):
        items = [ITEMS[(i + 3 * j) % len(ITEMS)] for j in range(4 + i % 4)]
        text = format_prompt(tok, "\n".join(f"- {w}" for w in items) + "\nWhich are the fruits?")
        texts.append(text)
        keys.append([find_span(tok, text, items[0]).last, find_span(tok, text, items[1]).last])
    return texts, QKSites([[-1]] * n, keys)


def _batches(tok, texts, sites, batch_size):
    out = []
    for s in range(0, len(texts), batch_size):
        ids, mask = tokenize_batch(tok, texts[s : s + batch_size], "left")
        out.append((ids, mask, sites.subset(s, s + batch_size)))
    return out


def _bare(model, batches) -> None:
    with torch.no_grad():
        for ids, mask, _ in batches:
            model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from_mask(mask),
                  use_cache=False, logits_to_keep=1)  # fmt: skip


def _capture(model, batches, layers, accs, stop_early: bool = False) -> None:
    def on_capture(layer, rec):
        acc = accs[layer]
        heads = torch.arange(len(rec.heads)).repeat(rec.q.shape[0])  # row-major (row, head)
        q = rec.q.reshape(-1, rec.q.shape[-1])
        k = rec.k.reshape(rec.q.shape[0], 2, *rec.k.shape[1:])  # [N, pos/neg, H, D]
        acc.update(q, k[:, 0].reshape(q.shape), k[:, 1].reshape(q.shape), group=heads)

    for ids, mask, sites in batches:
        capture_qk(model, ids, mask, sites, layers, on_capture=on_capture, stop_early=stop_early)


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _memory_child(args) -> None:
    loaded = load_model(args.model)
    model, info = loaded.model, loaded.info
    texts, sites = _prompts(loaded.tokenizer, args.prompts)
    batches = _batches(loaded.tokenizer, texts, sites, args.batch_size)
    layers = _layers(info.n_layers)
    accs = {layer: ContrastiveCovariance(info.head_dim, groups=info.n_heads) for layer in layers}
    base = _rss_mib()
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_mib())
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    if args.memory_child == "bare":
        _bare(model, batches)
    else:
        _capture(model, batches, layers, accs)
    stop.set()
    t.join()
    print(json.dumps({"peak_rss_mib": peak[0], "peak_above_loaded_mib": peak[0] - base}))


def _layers(n_layers: int) -> list[int]:
    return [n_layers // 4, n_layers // 2 - 1, n_layers // 2 + 2, 3 * n_layers // 4]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=DEFAULT_MODEL)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--memory-child", choices=["bare", "capture"], help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.memory_child:
        _memory_child(args)
        return

    loaded = load_model(args.model)
    model, info = loaded.model, loaded.info
    texts, sites = _prompts(loaded.tokenizer, args.prompts)
    batches = _batches(loaded.tokenizer, texts, sites, args.batch_size)
    layers = _layers(info.n_layers)
    accs = {layer: ContrastiveCovariance(info.head_dim, groups=info.n_heads) for layer in layers}
    print(f"model={loaded.name} layers={layers} heads=all({info.n_heads}) prompts={len(texts)} "
          f"batch_size={args.batch_size} max_len={max(b[0].shape[1] for b in batches)} "
          f"threads={torch.get_num_threads()}")  # fmt: skip
    _bare(model, batches)  # warm-up both paths
    _capture(model, batches, layers, accs)
    times: dict[str, list[float]] = {"bare": [], "capture": []}
    ratios = []
    for rep in range(args.repeats):
        # Adjacent pairs in alternating order: a shared machine's load drifts slowly, so
        # the per-pair ratio is far less noisy than either time alone.
        order = ("bare", "capture") if rep % 2 == 0 else ("capture", "bare")
        pair = {}
        for mode in order:
            t0 = time.perf_counter()
            _bare(model, batches) if mode == "bare" else _capture(model, batches, layers, accs)
            pair[mode] = time.perf_counter() - t0
            times[mode].append(pair[mode])
        ratios.append(pair["capture"] / pair["bare"])
    med = {m: statistics.median(v) for m, v in times.items()}
    for m, v in times.items():
        print(f"{m}: median {med[m]:.3f}s  min {min(v):.3f}s  runs={[round(x, 3) for x in v]}")
    print(f"ratio of medians={med['capture'] / med['bare']:.4f}  "
          f"ratio of minima={min(times['capture']) / min(times['bare']):.4f}  "
          f"per-pair ratios={[round(r, 3) for r in ratios]}")  # fmt: skip
    # The library default also stops each forward after the deepest captured layer; report
    # that speed-up separately (overhead_ratio above compares full forwards only).
    early = []
    for _ in range(max(3, args.repeats // 3)):
        t0 = time.perf_counter()
        _bare(model, batches)
        t1 = time.perf_counter()
        _capture(model, batches, layers, accs, stop_early=True)
        early.append((time.perf_counter() - t1) / (t1 - t0))
    print(f"early_exit_ratio={statistics.median(early):.4f}  (capture with stop_early=True / bare)")
    for mode in ("bare", "capture"):
        out = subprocess.run(
            [sys.executable, __file__, "--model", args.model, "--prompts", str(args.prompts),
             "--batch-size", str(args.batch_size), "--memory-child", mode],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        mem = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{mode}: peak_rss={mem['peak_rss_mib']:.0f}MiB "
              f"peak_above_loaded={mem['peak_above_loaded_mib']:.1f}MiB")  # fmt: skip
    print(f"overhead_ratio={statistics.median(ratios):.4f}")  # median of per-pair ratios


if __name__ == "__main__":
    main()
