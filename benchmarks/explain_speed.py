"""``qkcov explain`` against its limit: a lean forward over the corpus plus the offline math.

In one process, interleaved (explain, lean, math, explain, lean, math, …):

- ``lean``: ``model(input_ids, attention_mask)`` over the same batches the explain pass runs
  (right padding, position ids from the mask, no cache, last position's logits only, under
  ``torch.inference_mode``), every layer;
- ``math``: the explain pass' own arithmetic on q/k captured beforehand (kept per batch, then
  :meth:`qkcov.core.explain.LayerSums.update` for every layer and batch, and
  :func:`qkcov.core.explain.explain_head` for every head), timed without the forward;
- ``explain``: :func:`qkcov.engine.explain.explain_heads` (hooks, forward, sums, finalise).

Prints ``explain_over_limit = explain ÷ (lean + math)`` per repeat and their mean, the peak RSS
rise during ``explain`` (``VmRSS`` sampled every 5 ms) against the formula
``heads × ((hypotheses + 1) × D² + hypotheses²) × 8`` bytes, and the corpus size.

    python benchmarks/explain_speed.py [--docs 360] [--repeats 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
import time
from pathlib import Path

import torch


def _vm(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--docs", type=int, default=360)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from qkcov.core.explain import LayerSums, explain_head, memory_bytes
    from qkcov.engine.explain import explain_heads, plan_corpus, tokenize_corpus
    from qkcov.models.capture import LayerCall, attention_hooks, padded_forward
    from qkcov.models.loading import load_model, model_info
    from qkcov.tasks.corpus import default_corpus
    from qkcov.tasks.hypotheses import resolve_hypotheses

    lm = load_model("smollm2-135m")
    model, tok = lm.model, lm.tokenizer
    info = model_info(model)
    texts = default_corpus(args.docs)
    t0 = time.perf_counter()
    plan = plan_corpus(tokenize_corpus(tok, texts), resolve_hypotheses())
    t_plan = time.perf_counter() - t0
    heads = [(l, h) for l in range(info.n_layers) for h in range(info.n_heads)]
    order = sorted(range(len(plan.seqs)), key=lambda i: len(plan.seqs[i]))
    batches = [order[s : s + args.batch_size] for s in range(0, len(order), args.batch_size)]
    pad = tok.pad_token_id or 0
    print(
        f"corpus: {len(texts)} documents, {len(plan.seqs)} sequences, {plan.n_tokens} tokens; "
        f"{len(heads)} heads x {len(plan.hypotheses)} hypotheses; plan {t_plan:.1f} s"
    )

    def lean() -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            for idx in batches:
                bt = plan.batch(idx, pad)
                padded_forward(model, bt["input_ids"], bt["attention_mask"], logits_to_keep=1)
        return time.perf_counter() - t

    def math_only() -> float:
        total = 0.0
        sums = {l: LayerSums(list(range(info.n_heads)), len(plan.hypotheses), info.head_dim)
                for l in range(info.n_layers)}  # fmt: skip
        for idx in batches:
            bt = plan.batch(idx, pad)
            kept: dict[int, tuple] = {}

            def keep(call: LayerCall, kept=kept) -> None:
                k = call.key.repeat_interleave(call.group_size, dim=1)
                kept[call.layer] = (call.query.clone(), k.clone(), call.scaling, call.softcap)

            with torch.no_grad(), attention_hooks(model, dict.fromkeys(range(info.n_layers), keep)):
                padded_forward(model, bt["input_ids"], bt["attention_mask"], logits_to_keep=1)
            t = time.perf_counter()
            t_batch = time.perf_counter()
            for layer, (q, k, sc, cap) in kept.items():
                sums[layer].update(q, k, bt["pos"], bt["weights"], bt["allowed"], sc, cap)
            t_batch = time.perf_counter() - t
            total += t_batch
        t = time.perf_counter()
        for l, h in heads:
            explain_head(sums[l], h, plan.names, layer=l, name=f"L{l}H{h}")
        return total + (time.perf_counter() - t)

    def full() -> tuple[float, int]:
        import ctypes
        import gc
        import threading

        gc.collect()
        with contextlib.suppress(OSError, AttributeError):  # hand freed heap back to the OS
            ctypes.CDLL("libc.so.6").malloc_trim(0)

        base = _vm("VmRSS")
        peak = [base]
        stop = threading.Event()

        def poll() -> None:  # VmHWM cannot be reset in every container: sample VmRSS
            while not stop.wait(0.005):
                peak[0] = max(peak[0], _vm("VmRSS"))

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        t = time.perf_counter()
        explain_heads(model, plan, heads, batch_size=args.batch_size, progress=False, pad_id=pad)
        dt = time.perf_counter() - t
        stop.set()
        th.join()
        return dt, peak[0] - base

    ratios = []
    for r in range(args.repeats):
        e, peak = full()  # first: the other phases' freed memory would hide its allocations
        a = lean()
        m = math_only()
        ratios.append(e / (a + m))
        print(
            f"repeat {r}: lean {a:.1f} s, math {m:.1f} s, explain {e:.1f} s -> "
            f"explain_over_limit={e / (a + m):.3f} (explain / lean = {e / a:.2f}); "
            + f"peak RSS rise {peak / 2**20:.0f} MiB (VmRSS sampled every 5 ms)"
        )
    formula = memory_bytes(len(heads), len(plan.hypotheses), info.head_dim)
    print(f"explain_over_limit mean={sum(ratios) / len(ratios):.3f}")
    print(
        f"memory formula: {len(heads)} heads x (({len(plan.hypotheses)} + 1) x {info.head_dim}^2 "
        f"+ {len(plan.hypotheses)}^2) x 8 B = {formula / 2**20:.0f} MiB of float64 sums"
    )


if __name__ == "__main__":
    main()
